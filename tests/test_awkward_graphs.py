"""Stages on graphs nobody here trained: RNNs, fp16, fixed batch sizes, crashes mid-write."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

from tests import onnx_factory as factory
from tests.cli_helpers import run_cli
from weightless_cli.model import OnnxModel


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_rnn_weights_are_selected_and_still_run(capsys, tmp_path, op):
    src = factory.save(factory.rnn_model(op), tmp_path / "rnn.onnx")
    model = OnnxModel.load(src)
    roles = {t.name: t.role for t in model.weights}
    assert roles == {f"{op.lower()}.W": "weight", f"{op.lower()}.R": "weight", f"{op.lower()}.B": "bias"}
    out = tmp_path / "rnn.q.onnx"
    assert run_cli(capsys, "prune", src, "-o", tmp_path / "rnn.p.onnx", "--sparsity", "0.5").code == 0
    assert run_cli(capsys, "quantize", tmp_path / "rnn.p.onnx", "-o", out, "--clusters", "8").code == 0
    x = np.random.default_rng(0).normal(size=(5, 2, 12)).astype(np.float32)
    assert np.isfinite(ort.InferenceSession(str(out)).run(None, {"input": x})[0]).all()


def test_fp16_model_with_fixed_batch(capsys, tmp_path):
    src = factory.save(factory.mlp(sizes=(64, 32, 10), dtype=np.float16, batch=4), tmp_path / "h.onnx")
    out = tmp_path / "h.q.onnx"
    assert run_cli(capsys, "quantize", src, "-o", out, "--clusters", "8", "--min-params", "0").code == 0
    tensor = OnnxModel.load(out).weight("fc1.weight")
    assert tensor.dtype == "float16" and np.unique(tensor.array()).size <= 8
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float16)
    assert ort.InferenceSession(str(out)).run(None, {"input": x})[0].shape == (4, 10)


def test_sigkill_mid_write_leaves_old_output_or_none(tmp_path):
    """Kill a writing stage at random moments: the output is always whole or absent."""
    src = factory.save(factory.mlp(sizes=(1024, 1024, 10)), tmp_path / "big.onnx")
    out = tmp_path / "out.onnx"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "weightless_cli", "quantize", str(src), "-o", str(out), "-f", "--clusters", "16",
               "-q"]
    subprocess.run(command, check=True, env=env)
    good = out.read_bytes()
    for delay in (0.3, 0.6, 0.9, 1.2):
        process = subprocess.Popen(command, env=env)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert out.read_bytes() == good  # the same inputs give the same bytes, or the old file stayed
        OnnxModel.load(out)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in {"big.onnx", "out.onnx"}]
    # A killed process cannot clean its temporary file, but it never has the output's name.
    assert all(name.startswith(".out.onnx.") and name.endswith(".tmp") for name in leftovers)
