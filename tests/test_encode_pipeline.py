"""encode → verify → decode → decode-and-eval through the CLI, on small models and the real sample model."""

import numpy as np
import onnxruntime as ort
import pytest

from tests import onnx_factory as factory
from tests.cli_helpers import run_cli
from weightless_cli.codecs.container import load_blob
from weightless_cli.model import OnnxModel
from weightless_cli.stages.decode import false_positive_bound


@pytest.fixture
def quantized_mlp(capsys, tmp_path):
    src = factory.save(factory.mlp(sizes=(256, 128, 10)), tmp_path / "mlp.onnx")
    pruned, quant = tmp_path / "mlp.p.onnx", tmp_path / "mlp.q.onnx"
    assert run_cli(capsys, "prune", src, "-o", pruned, "--sparsity", "0.9").code == 0
    assert run_cli(capsys, "quantize", pruned, "-o", quant, "--clusters", "8").code == 0
    return quant


def test_encode_verify_decode(capsys, tmp_path, quantized_mlp):
    blob = tmp_path / "m.wl"
    result = run_cli(capsys, "encode", quantized_mlp, "-o", blob, "--fp-bits", "5", "--json")
    assert result.code == 0, result.err
    report = result.json()
    rows = {row["name"]: row for row in report["tensors"]}
    assert rows["fc1.weight"]["codec"] == "bloomier" and rows["fc1.weight"]["t"] == 4 + 5
    assert rows["fc1.bias"]["codec"] == "raw"
    assert report["file"]["blob_bytes"] == blob.stat().st_size
    assert report["file"]["ratio"] > 4

    result = run_cli(capsys, "verify", blob, "--reference", quantized_mlp, "--json")
    assert result.code == 0, result.err
    checked = {row["name"]: row for row in result.json()["tensors"]}
    assert checked["fc1.weight"]["wrong_nonzeros"] == 0 and checked["fc1.bias"]["ok"]

    decoded = tmp_path / "d.onnx"
    assert run_cli(capsys, "decode", blob, "-o", decoded).code == 0
    reference, restored = OnnxModel.load(quantized_mlp), OnnxModel.load(decoded)
    for name in ("fc1.weight", "fc2.weight"):
        want, got = reference.weight(name).array(), restored.weight(name).array()
        stored = want != 0
        np.testing.assert_array_equal(got[stored], want[stored])
        false_positives = int(np.count_nonzero(got[~stored]))
        assert false_positives <= false_positive_bound(int((~stored).sum()), 8, 9)
        assert set(np.unique(got[got != 0])) <= set(np.unique(want[want != 0]))
    np.testing.assert_array_equal(restored.weight("fc1.bias").array(), reference.weight("fc1.bias").array())
    x = np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32)
    assert ort.InferenceSession(str(decoded)).run(None, {"input": x})[0].shape == (8, 10)


def test_encode_is_deterministic_and_seed_matters(capsys, tmp_path, quantized_mlp):
    for name, seed in (("a.wl", 0), ("b.wl", 0), ("c.wl", 7)):
        assert run_cli(capsys, "encode", quantized_mlp, "-o", tmp_path / name, "--seed", seed, "-q").code == 0
    assert (tmp_path / "a.wl").read_bytes() == (tmp_path / "b.wl").read_bytes()
    assert (tmp_path / "a.wl").read_bytes() != (tmp_path / "c.wl").read_bytes()


def test_verify_fails_with_exit_1_against_the_wrong_reference(capsys, tmp_path, quantized_mlp):
    blob = tmp_path / "m.wl"
    assert run_cli(capsys, "encode", quantized_mlp, "-o", blob, "-q").code == 0
    other = tmp_path / "other.q.onnx"
    src = factory.save(factory.mlp(sizes=(256, 128, 10), seed=9), tmp_path / "other.onnx")
    assert run_cli(capsys, "quantize", src, "-o", other, "--clusters", "8").code == 0
    result = run_cli(capsys, "verify", blob, "--reference", other)
    assert result.code == 1 and "verification failed" in result.err


def test_every_single_byte_corruption_is_exit_3(capsys, tmp_path):
    src = factory.save(factory.mlp(sizes=(16, 8, 4)), tmp_path / "tiny.onnx")
    quant, blob = tmp_path / "tiny.q.onnx", tmp_path / "tiny.wl"
    assert run_cli(capsys, "quantize", src, "-o", quant, "--clusters", "4", "--min-params", "0").code == 0
    assert run_cli(capsys, "encode", quant, "-o", blob, "--min-params", "0", "-q").code == 0
    data = blob.read_bytes()
    bad = tmp_path / "bad.wl"
    for position in range(len(data)):
        corrupt = bytearray(data)
        corrupt[position] ^= 0x5A
        bad.write_bytes(bytes(corrupt))
        result = run_cli(capsys, "verify", bad)
        assert result.code == 3, (position, result.err)
        assert result.err.count("\n") == 1 and "Traceback" not in result.err


def test_encode_refuses_unclustered_tensor(capsys, tmp_path):
    src = factory.save(factory.mlp(sizes=(256, 300, 10)), tmp_path / "raw.onnx")
    result = run_cli(capsys, "encode", src, "-o", tmp_path / "x.wl")
    assert result.code == 2 and "not clustered" in result.err and not (tmp_path / "x.wl").exists()


def test_decode_and_eval_on_the_sample_model(capsys, tmp_path, mnist_cache):
    src = "sample_models/lenet-300-100.onnx"
    pruned, quant, blob = tmp_path / "p.onnx", tmp_path / "q.onnx", tmp_path / "m.wl"
    assert run_cli(capsys, "prune", src, "-o", pruned, "--sparsity", "0.9").code == 0
    assert run_cli(capsys, "quantize", pruned, "-o", quant, "--bits", "4").code == 0
    assert run_cli(capsys, "encode", quant, "-o", blob, "--fp-bits", "9", "-q").code == 0
    plain = run_cli(capsys, "eval", quant, "--data", "mnist", "--limit", "2000", "--json").json()
    result = run_cli(capsys, "decode-and-eval", blob, "--data", "mnist", "--limit", "2000", "--reference", quant,
                     "--max-drop", "1.0", "--json")
    assert result.code == 0, result.err
    decoded = result.json()
    assert decoded["samples"] == 2000 and decoded["agreement"] > 0.97
    assert abs(decoded["accuracy"] - plain["accuracy"]) < 0.01
    assert len(load_blob(blob).tensors) == 6


def test_gate_exit_codes(capsys, tmp_path, mnist_cache):
    src = "sample_models/lenet-300-100.onnx"
    ruined = tmp_path / "ruined.onnx"
    assert run_cli(capsys, "prune", src, "-o", ruined, "--sparsity", "0.999").code == 0
    failing = run_cli(capsys, "eval", ruined, "--data", "mnist", "--limit", "1000", "--reference", src,
                      "--max-drop", "1")
    assert failing.code == 1 and "accuracy gate failed" in failing.err
    assert run_cli(capsys, "eval", ruined, "--data", "mnist", "--limit", "1000", "--reference", src,
                   "--max-drop", "100").code == 0


@pytest.mark.parametrize("quantize_args, codec", [
    (["--method", "uniform", "--bits", "8", "--per-channel"], "dpred"),
    (["--bits", "3", "--outliers", "0.02"], "outlier"),
    (["--method", "rowwise", "--bits", "4"], "rowwise"),
])
def test_value_grid_codecs_through_the_cli(capsys, tmp_path, quantize_args, codec):
    src = factory.save(factory.mlp(sizes=(128, 64, 10)), tmp_path / "m.onnx")
    quant, blob = tmp_path / "q.onnx", tmp_path / "m.wl"
    assert run_cli(capsys, "quantize", src, "-o", quant, *quantize_args).code == 0
    result = run_cli(capsys, "encode", quant, "-o", blob, "--codec", codec, "--json")
    assert result.code == 0, result.err
    assert {row["codec"] for row in result.json()["tensors"]} == {codec, "raw"}
    checked = run_cli(capsys, "verify", blob, "--reference", quant, "--json")
    assert checked.code == 0 and all(row["ok"] for row in checked.json()["tensors"])
