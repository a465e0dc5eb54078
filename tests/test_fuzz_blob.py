"""Mutated real blobs through both readers (bench/fuzz_blob.py runs 10,000 of them; this a few hundred),
and every single-bit flip of a real blob through `weightless verify`."""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path

import pytest

from tests import onnx_factory
from tests.cli_helpers import run_cli
from weightless_cli.stages import decode

REPO = Path(__file__).resolve().parents[1]


def _load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_blob", REPO / "bench" / "fuzz_blob.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_blob"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzzer()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return fuzz.make_bases(tmp_path_factory.mktemp("fuzz-bases"))


@pytest.fixture
def known_memory(monkeypatch):
    """Decoding's memory check sees a fixed 4 GiB, so forged huge tensors are refused the same way
    on every machine (and never actually allocated on a big one)."""
    monkeypatch.setattr(decode, "available_memory", lambda: 4 << 30)


def test_field_model_reproduces_every_real_blob(bases):
    """The fuzzer's own format model must be exact, or its forged blobs would test nothing."""
    assert {b.name for b in bases} == {spec.name for spec in fuzz.BASE_SPECS}
    for base in bases:
        assert base.layout.encode() == base.data, base.name


def test_a_few_hundred_mutations_end_cleanly(bases, tmp_path, known_memory):
    results = fuzz.run_cases(range(300), 2026, bases, tmp_path)
    failures = [f"#{r.index} {r.base} {r.kind}: {r.outcome}: {r.detail}" for r in results if r.failed]
    assert not failures, "\n".join(failures)
    outcomes = collections.Counter(r.outcome for r in results)
    # Raw damage is always caught; forged blobs with valid checksums reach the decoders and sometimes decode.
    assert outcomes["rejected"] > 150 and outcomes["decoded"] > 15, outcomes
    assert all(r.outcome == "rejected" for r in results if r.kind.startswith("raw:"))
    reasons = " ".join(r.detail for r in results if r.outcome == "rejected")
    for deep in ("Bloomier", "corrupt sparse", "corrupt csr-huffman", "ONNX checker", "GiB of memory"):
        assert deep in reasons, f"no forged case reached {deep!r}"
    assert max(r.peak_bytes for r in results) < 64 << 20


def test_a_forged_huge_tensor_is_refused_before_allocating(bases, tmp_path, known_memory):
    import numpy as np

    rng = np.random.default_rng(0)
    for base in bases:
        layout = base.layout.copy()
        kind = fuzz._bomb(rng, layout)
        case = fuzz.Case(0, base.name, f"forged:{kind}", True, layout.encode())
        result = fuzz.run_case(case, base, tmp_path / "bomb.wl", 16 << 20)
        assert result.outcome == "rejected" and "GiB of memory" in result.detail, result
        assert len(case.data) < len(base.data) + 1024  # a few KiB that declare 16 GiB


def test_every_single_bit_flip_of_a_real_blob_is_exit_3(capsys, tmp_path):
    source = onnx_factory.save(onnx_factory.mlp(sizes=(8, 4)), tmp_path / "tiny.onnx")
    quantized, blob = tmp_path / "tiny.q.onnx", tmp_path / "tiny.wl"
    assert run_cli(capsys, "quantize", source, "-o", quantized, "--clusters", "4", "--min-params", "0").code == 0
    assert run_cli(capsys, "encode", quantized, "-o", blob, "--min-params", "0", "-q").code == 0
    assert run_cli(capsys, "verify", blob, "--reference", quantized).code == 0
    data = blob.read_bytes()
    assert 400 < len(data) < 1000  # small enough to flip every bit through the CLI
    bad = tmp_path / "flipped.wl"
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        bad.write_bytes(bytes(flipped))
        result = run_cli(capsys, "verify", bad)
        assert result.code == 3, (bit, result.err)
        assert result.err.count("\n") == 1 and f"weightless: error: {bad}: " in result.err, (bit, result.err)
