"""inspect / prune / quantize through the CLI: conventions, exit codes, ORT still runs."""

import numpy as np
import onnxruntime as ort
import pytest

from tests import onnx_factory as factory
from tests.cli_helpers import run_cli
from weightless_cli.model import OnnxModel


@pytest.fixture
def mlp_path(tmp_path):
    return factory.save(factory.mlp(sizes=(256, 128, 10)), tmp_path / "mlp.onnx")


def test_inspect_json(capsys, mlp_path):
    result = run_cli(capsys, "inspect", mlp_path, "--json")
    assert result.code == 0, result.err
    summary = result.json()
    assert summary["totals"]["params"] == 256 * 128 + 128 + 128 * 10 + 10
    assert summary["by_op"][0]["op"] == "Gemm" and summary["by_op"][0]["params_share"] == 1.0
    names = {t["name"]: t for t in summary["tensors"]}
    assert names["fc1.weight"]["role"] == "weight" and names["fc1.weight"]["distinct"] > 1000


def test_inspect_human_output_goes_to_stderr(capsys, mlp_path):
    result = run_cli(capsys, "inspect", mlp_path)
    assert result.code == 0 and result.out == "" and "fc1.weight" in result.err


def test_prune_then_quantize_runs_in_onnxruntime(capsys, tmp_path, mlp_path):
    pruned, quant = tmp_path / "p.onnx", tmp_path / "q.onnx"
    result = run_cli(capsys, "prune", mlp_path, "-o", pruned, "--sparsity", "0.8", "--sparsity", "fc2.weight=0.5",
                     "--json")
    assert result.code == 0, result.err
    achieved = {t["name"]: round(t["sparsity_after"] * t["params"]) for t in result.json()["tensors"]}
    assert achieved == {"fc1.weight": round(0.8 * 256 * 128), "fc2.weight": 128 * 10 // 2}
    result = run_cli(capsys, "quantize", pruned, "-o", quant, "--bits", "5", "--json")
    assert result.code == 0, result.err
    model = OnnxModel.load(quant)
    for name in ("fc1.weight", "fc2.weight"):
        values = model.weight(name).array()
        assert np.unique(values[values != 0]).size <= 32
        assert np.array_equal(values == 0, OnnxModel.load(pruned).weight(name).array() == 0)
    x = np.random.default_rng(0).normal(size=(64, 256)).astype(np.float32)
    original = ort.InferenceSession(str(mlp_path)).run(None, {"input": x})[0]
    compressed = ort.InferenceSession(str(quant)).run(None, {"input": x})[0]
    # Pruning 80 % of random weights changes logits, but they must stay correlated.
    assert np.corrcoef(original.ravel(), compressed.ravel())[0, 1] > 0.8
    # Graph untouched: same ops, same opset, same names.
    assert [n.op_type for n in model.proto.graph.node] == [n.op_type for n in OnnxModel.load(mlp_path).proto.graph.node]


def test_refuses_to_clobber_without_force(capsys, tmp_path, mlp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"precious")
    result = run_cli(capsys, "prune", mlp_path, "-o", out, "--sparsity", "0.5")
    assert result.code == 2 and "already exists" in result.err and out.read_bytes() == b"precious"
    assert run_cli(capsys, "prune", mlp_path, "-o", out, "--sparsity", "0.5", "-f").code == 0
    assert OnnxModel.load(out).weight("fc1.weight").params == 256 * 128


def test_failed_stage_leaves_no_output(capsys, tmp_path, mlp_path):
    out = tmp_path / "out.onnx"
    result = run_cli(capsys, "quantize", mlp_path, "-o", out, "--clusters", "fc1.weight=100000")
    assert result.code == 2
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("args, code, message", [
    (["prune", "{missing}", "-o", "{out}", "--sparsity", "0.5"], 3, "no such file"),
    (["prune", "{notonnx}", "-o", "{out}", "--sparsity", "0.5"], 3, "not an ONNX model"),
    (["prune", "{mlp}", "-o", "{out}", "--sparsity", "1.5"], 2, "outside [0, 1)"),
    (["prune", "{mlp}", "-o", "{out}", "--sparsity", "0.5", "--layers", "nope*"], 2, "no weight tensor matches"),
    (["quantize", "{mlp}", "-o", "{out}", "--clusters", "16", "--layers", "fc2.bias"], 2, "distinct nonzero values"),
    (["quantize", "{mlp}", "-o", "{out}"], 2, "either --clusters"),
    (["prune", "{mlp}"], 2, "Missing option"),
])
def test_errors_are_one_line_with_documented_codes(capsys, tmp_path, mlp_path, args, code, message):
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
    paths = {"missing": tmp_path / "missing.onnx", "notonnx": tmp_path / "junk.onnx", "mlp": mlp_path,
             "out": tmp_path / "out.onnx"}
    result = run_cli(capsys, *[a.format(**paths) for a in args])
    assert result.code == code, result.err
    assert message in result.err and "Traceback" not in result.err
    if code == 3:
        assert result.err.count("\n") == 1 and str(paths[args[1][1:-1]]) in result.err


def test_quantized_model_is_left_alone_with_warning(capsys, tmp_path):
    path = factory.save(factory.quantized_model(), tmp_path / "q.onnx")
    result = run_cli(capsys, "prune", path, "-o", tmp_path / "out.onnx", "--sparsity", "0.5")
    assert result.code == 0 and "already quantized" in result.err
    before, after = OnnxModel.load(path), OnnxModel.load(tmp_path / "out.onnx")
    assert before.proto.graph == after.proto.graph


def test_same_inputs_give_identical_bytes(capsys, tmp_path, mlp_path):
    for name in ("a.onnx", "b.onnx"):
        assert run_cli(capsys, "quantize", mlp_path, "-o", tmp_path / name, "--clusters", "16", "-q").code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_if_constant_and_external_models_round_trip(capsys, tmp_path):
    for name, model, external in [("if", factory.if_model(), False), ("const", factory.constant_node_model(), False),
                                  ("ext", factory.mlp(), True), ("shared", factory.shared_initializer_model(), False)]:
        src = factory.save(model, tmp_path / f"{name}.onnx", external=external)
        pruned, quant = tmp_path / f"{name}.p.onnx", tmp_path / f"{name}.q.onnx"
        assert run_cli(capsys, "prune", src, "-o", pruned, "--sparsity", "0.5", "--min-params", "0").code == 0
        assert run_cli(capsys, "quantize", pruned, "-o", quant, "--clusters", "4", "--min-params", "0").code == 0
        assert (tmp_path / f"{name}.q.onnx.data").exists() == external
        x = np.random.default_rng(0).normal(size=(3, *[d.dim_value or 3 for d in
                                                  model.graph.input[0].type.tensor_type.shape.dim][1:]))
        outputs = ort.InferenceSession(str(quant)).run(None, {"input": x.astype(np.float32)})
        assert np.isfinite(outputs[0]).all()
