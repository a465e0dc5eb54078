"""decompose and inspect --profile through the CLI."""

import numpy as np
import onnxruntime as ort

from tests import onnx_factory as factory
from tests.cli_helpers import run_cli


def test_decompose_at_full_rank_runs_the_same(capsys, tmp_path):
    src = factory.save(factory.mlp(sizes=(64, 48, 10)), tmp_path / "m.onnx")
    out = tmp_path / "low.onnx"
    result = run_cli(capsys, "decompose", src, "-o", out, "--energy", "0.9", "--runs", "0", "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["model"]["params_after"] < report["model"]["params_before"]
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    assert ort.InferenceSession(str(out)).run(None, {"input": x})[0].shape == (4, 10)
    assert run_cli(capsys, "decompose", src, "-o", tmp_path / "x.onnx", "--rank", "2", "--energy", "0.9").code == 2


def test_profile_needs_data_and_sums_to_one(capsys, tmp_path):
    src = factory.save(factory.mlp(sizes=(64, 48, 10)), tmp_path / "m.onnx")
    assert run_cli(capsys, "inspect", src, "--profile").code == 2
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32))
    result = run_cli(capsys, "inspect", src, "--profile", "--data", tmp_path / "d.npz", "--runs", "2", "--json")
    assert result.code == 0, result.err
    shares = [row["share_time"] for row in result.json()["by_op"]]
    assert abs(sum(shares) - 1) < 1e-6 and {row["op"] for row in result.json()["by_op"]} >= {"Gemm"}
