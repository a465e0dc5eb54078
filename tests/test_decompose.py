"""decompose: Tucker-2 / truncated SVD factors, rank selection (EVBMF, energy, fixed), the
graph rewrite checked against onnxruntime, MAC counts, and the file stage."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.onnx_factory import constant_node_model, mlp, shared_initializer_model
from weightless_cli.errors import UsageError
from weightless_cli.model import OnnxModel, Selection
from weightless_cli.stages.decompose import (
    RankSpec,
    decompose_file,
    decompose_model,
    energy_rank,
    evbmf,
    evbmf_from_singular_values,
    measure_latencies,
    node_macs,
    svd_factors,
    total_macs,
    tucker2,
    tucker2_ranks,
    vb_tau_bar,
)

ROOT = Path(__file__).resolve().parent.parent
FULL = RankSpec("rank", 10_000)  # clipped to each matrix's full rank


# ---------------------------------------------------------------- models


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)  # gives the outputs their shapes
    onnx.checker.check_model(model, full_check=True)
    return model


def _float_input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_model(kernel: np.ndarray, bias: bool = True, in_size: int = 11, group: int = 1, **attrs) -> onnx.ModelProto:
    """input → Conv(kernel) → Relu → output, the conv named conv1."""
    inits = [numpy_helper.from_array(kernel.astype(np.float32), "conv1.weight")]
    inputs = ["input", "conv1.weight"]
    if bias:
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, kernel.shape[0]).astype(np.float32), "conv1.bias"))
        inputs.append("conv1.bias")
    in_channels = kernel.shape[1] * group
    nodes = [helper.make_node("Conv", inputs, ["c"], "conv1", group=group, **attrs),
             helper.make_node("Relu", ["c"], ["output"], "relu1")]
    return _model(nodes, [_float_input("input", ["N", in_channels, in_size, in_size])],
                  [_float_input("output", None)], inits)


def gemm_model(weight: np.ndarray, trans_a: int, trans_b: int, alpha: float, beta: float, bias: bool,
               k: int, n: int) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(weight.astype(np.float32), "fc.weight")]
    inputs = ["input", "fc.weight"]
    if bias:
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, n).astype(np.float32), "fc.bias"))
        inputs.append("fc.bias")
    nodes = [helper.make_node("Gemm", inputs, ["output"], "fc", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)]
    shape = [k, "N"] if trans_a else ["N", k]
    return _model(nodes, [_float_input("input", shape)], [_float_input("output", None)], inits)


def matmul_model(weight: np.ndarray, weight_first: bool, x_shape) -> onnx.ModelProto:
    inputs = ["w", "input"] if weight_first else ["input", "w"]
    nodes = [helper.make_node("MatMul", inputs, ["h"], "mm"), helper.make_node("Add", ["h", "b"], ["output"], "add")]
    bias_shape = (weight.shape[0], 1) if weight_first else (weight.shape[1],)
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w"),
             numpy_helper.from_array(np.full(bias_shape, 0.5, np.float32), "b")]
    return _model(nodes, [_float_input("input", x_shape)], [_float_input("output", None)], inits)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def _max_diff(before: onnx.ModelProto, after: onnx.ModelProto, x: np.ndarray) -> float:
    return float(np.max(np.abs(_run(before, x) - _run(after, x))))


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _low_rank(rows: int, cols: int, rank: int, seed: int, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols)) / math.sqrt(rank)
    return matrix + noise * rng.normal(size=(rows, cols))


def _tucker_kernel(out_ch: int, in_ch: int, k: int, rank_out: int, rank_in: int, seed: int) -> np.ndarray:
    """A kernel of exact multilinear rank (rank_out, rank_in) on its channel modes."""
    rng = np.random.default_rng(seed)
    core = rng.normal(size=(rank_out, rank_in, k, k))
    return np.einsum("rqhw,tr,sq->tshw", core, rng.normal(size=(out_ch, rank_out)), rng.normal(size=(in_ch, rank_in)))


# ---------------------------------------------------------------- equivalence at full rank


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "pads": [1, 2, 0, 1]},
    {"strides": [2, 1], "dilations": [2, 2], "pads": [2, 2, 2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {},
])
def test_tucker2_conv_matches_onnxruntime_at_full_rank(attrs):
    kernel = np.random.default_rng(0).normal(0, 0.2, size=(7, 5, 3, 3))
    model = conv_model(kernel, **attrs)
    result, rows = decompose_model(model, ["conv1.weight"], FULL, only_if_smaller=False)
    assert rows[0]["decomposed"] and rows[0]["kind"] == "tucker2" and rows[0]["ranks"] == [5, 7]
    x = np.random.default_rng(1).normal(size=(3, 5, 11, 11))
    assert _max_diff(model, result, x) <= 1e-4


def test_pointwise_conv_uses_two_convs_and_keeps_stride_and_padding():
    kernel = np.random.default_rng(2).normal(0, 0.2, size=(6, 9, 1, 1))
    model = conv_model(kernel, strides=[2, 2], pads=[1, 0, 1, 1])
    result, rows = decompose_model(model, ["conv1.weight"], FULL, only_if_smaller=False)
    assert rows[0]["kind"] == "svd" and rows[0]["ranks"] == [6]
    assert [n.op_type for n in result.graph.node] == ["Conv", "Conv", "Relu"]
    assert _max_diff(model, result, np.random.default_rng(3).normal(size=(2, 9, 11, 11))) <= 1e-4


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta,bias", [(1.0, 1.0, True), (0.5, 2.0, True), (1.5, 1.0, False)])
def test_svd_gemm_matches_onnxruntime_at_full_rank(trans_a, trans_b, alpha, beta, bias):
    k, n = 12, 9
    weight = np.random.default_rng(4).normal(size=(n, k) if trans_b else (k, n))
    model = gemm_model(weight, trans_a, trans_b, alpha, beta, bias, k, n)
    result, rows = decompose_model(model, ["fc.weight"], FULL, only_if_smaller=False)
    assert rows[0]["decomposed"] and rows[0]["ranks"] == [9]
    first, last = _weights(result)["fc.weight.svd_first"], _weights(result)["fc.weight.svd_last"]
    # The factors keep the original layout: stored transposed when transB=1.
    assert first.shape == ((9, k) if trans_b else (k, 9)) and last.shape == ((n, 9) if trans_b else (9, n))
    x = np.random.default_rng(5).normal(size=(k, 4) if trans_a else (4, k))
    assert _max_diff(model, result, x) <= 1e-4


@pytest.mark.parametrize("weight_first,x_shape", [(False, [3, 4, 10]), (False, [10]), (True, [2, 10, 5])])
def test_svd_matmul_matches_onnxruntime_at_full_rank(weight_first, x_shape):
    weight = np.random.default_rng(6).normal(size=(8, 10) if weight_first else (10, 8))
    model = matmul_model(weight, weight_first, x_shape)
    result, rows = decompose_model(model, ["w"], FULL, only_if_smaller=False)
    assert rows[0]["decomposed"]
    assert [n.op_type for n in result.graph.node] == ["MatMul", "MatMul", "Add"]
    assert _max_diff(model, result, np.random.default_rng(7).normal(size=x_shape)) <= 1e-4


def test_matmul_weight_from_a_constant_node_is_replaced_and_the_constant_dropped():
    model = constant_node_model()
    result, rows = decompose_model(model, ["W"], FULL, only_if_smaller=False)
    assert rows[0]["decomposed"]
    assert [n.op_type for n in result.graph.node] == ["MatMul", "MatMul"]
    assert _max_diff(model, result, np.random.default_rng(8).normal(size=(5, 32))) <= 1e-4


# ---------------------------------------------------------------- graph structure and names


def test_tucker2_graph_shapes_names_and_untouched_nodes():
    kernel = _tucker_kernel(16, 12, 3, rank_out=4, rank_in=3, seed=9)
    model = conv_model(kernel, pads=[1, 1, 1, 1], strides=[2, 2])
    result, rows = decompose_model(model, ["conv1.weight"], RankSpec("energy", 0.999999))
    assert rows[0]["ranks"] == [3, 4] and rows[0]["params_after"] == 3 * 12 + 4 * 3 * 9 + 16 * 4
    weights = _weights(result)
    assert weights["conv1.weight.tucker_first"].shape == (3, 12, 1, 1)
    assert weights["conv1.weight.tucker_core"].shape == (4, 3, 3, 3)
    assert weights["conv1.weight.tucker_last"].shape == (16, 4, 1, 1)
    assert "conv1.weight" not in weights and weights["conv1.bias"].shape == (16,)
    nodes = result.graph.node
    assert [n.name for n in nodes] == ["conv1.tucker_first", "conv1.tucker_core", "conv1.tucker_last", "relu1"]
    assert list(nodes[2].input) == ["c.tucker_core", "conv1.weight.tucker_last", "conv1.bias"]
    assert list(nodes[2].output) == ["c"]
    core_attrs = {a.name: helper.get_attribute_value(a) for a in nodes[1].attribute}
    assert core_attrs["strides"] == [2, 2] and core_attrs["pads"] == [1, 1, 1, 1]
    assert nodes[3] == model.graph.node[1]  # every other node untouched
    assert result.opset_import == model.opset_import
    onnx.checker.check_model(result, full_check=True)
    # The kernel has exactly this multilinear rank, so the factors reproduce the layer.
    assert _max_diff(model, result, np.random.default_rng(10).normal(size=(2, 12, 11, 11))) <= 1e-4


def test_new_names_never_clash_with_existing_ones():
    kernel = _tucker_kernel(16, 12, 3, 2, 2, seed=11)
    model = conv_model(kernel)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "conv1.weight.tucker_core"))
    result, _ = decompose_model(model, ["conv1.weight"], RankSpec("rank", 2))
    names = [t.name for t in result.graph.initializer]
    assert "conv1.weight.tucker_core_1" in names and len(names) == len(set(names))


def test_layers_that_cannot_or_should_not_be_decomposed_are_left_with_a_reason():
    grouped = conv_model(np.random.default_rng(12).normal(size=(8, 2, 3, 3)), group=4)
    _, rows = decompose_model(grouped, ["conv1.weight"], RankSpec("rank", 1))
    assert not rows[0]["decomposed"] and "grouped" in rows[0]["reason"]

    shared = shared_initializer_model()
    result, rows = decompose_model(shared, ["shared.weight"], RankSpec("rank", 2))
    assert not rows[0]["decomposed"] and "read by 2" in rows[0]["reason"]
    assert result.graph == shared.graph

    dense = conv_model(np.random.default_rng(13).normal(size=(8, 6, 3, 3)))
    _, rows = decompose_model(dense, ["conv1.weight"], RankSpec("rank", 8))  # 36 + 432 + 64 > 432 params
    assert not rows[0]["decomposed"] and "no saving" in rows[0]["reason"]

    _, rows = decompose_model(dense, ["conv1.bias"], RankSpec("rank", 1))
    assert not rows[0]["decomposed"] and "input 2, not as its kernel" in rows[0]["reason"]


def test_report_rows_have_the_same_keys_in_the_order_asked():
    kernel = _tucker_kernel(16, 12, 3, 2, 2, seed=31)
    _, rows = decompose_model(conv_model(kernel), ["conv1.bias", "conv1.weight", "nothing"], RankSpec("rank", 2))
    assert [r["tensor"] for r in rows] == ["conv1.bias", "conv1.weight", "nothing"]
    assert [r["decomposed"] for r in rows] == [False, True, False]
    assert len({tuple(sorted(r)) for r in rows}) == 1
    assert rows[1]["macs_before"] == 16 * 9 * 9 * 12 * 9 and rows[0]["node"] == "conv1" and rows[2]["node"] is None


def test_float16_weights_stay_float16():
    model = mlp((32, 24, 10), dtype=np.float16)
    result, rows = decompose_model(model, ["fc1.weight"], RankSpec("rank", 4))
    assert rows[0]["decomposed"] and rows[0]["ranks"] == [4]
    factors = {name: w for name, w in _weights(result).items() if ".svd_" in name}
    assert {w.dtype for w in factors.values()} == {np.dtype(np.float16)} and len(factors) == 2
    x = np.random.default_rng(30).normal(size=(3, 32)).astype(np.float16)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    out = ort.InferenceSession(result.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    assert out.shape == (3, 10) and out.dtype == np.float16


def test_gemm_before_opset_11_is_skipped():
    model = gemm_model(_low_rank(8, 12, 2, 14), 0, 1, 1.0, 1.0, True, 12, 8)
    model.opset_import[0].version = 10
    _, rows = decompose_model(model, ["fc.weight"], RankSpec("rank", 2))
    assert not rows[0]["decomposed"] and "opset 11" in rows[0]["reason"]


# ---------------------------------------------------------------- factorizations


def test_svd_factors_are_exact_at_full_rank_and_best_at_lower_rank():
    matrix = np.random.default_rng(15).normal(size=(20, 13))
    first, second = svd_factors(matrix, 13)
    assert first.shape == (20, 13) and second.shape == (13, 13)
    np.testing.assert_allclose(first @ second, matrix, atol=1e-10)
    first, second = svd_factors(matrix, 4)
    s = np.linalg.svd(matrix, compute_uv=False)
    # Eckart–Young: the rank-4 truncation's error is exactly the dropped singular values.
    assert math.isclose(np.linalg.norm(matrix - first @ second), math.sqrt(np.sum(s[4:] ** 2)), rel_tol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(first, axis=0), np.linalg.norm(second, axis=1))


def test_tucker2_is_exact_at_the_kernels_multilinear_rank_and_hooi_helps_when_truncated():
    kernel = _tucker_kernel(10, 8, 3, rank_out=4, rank_in=3, seed=16)
    factors = tucker2(kernel, 4, 3)
    np.testing.assert_allclose(factors.reconstruct(), kernel, atol=1e-9)
    noisy = kernel + np.random.default_rng(17).normal(0, 0.5, size=kernel.shape)
    refined = np.linalg.norm(tucker2(noisy, 2, 2).reconstruct() - noisy)
    hosvd = np.linalg.norm(tucker2(noisy, 2, 2, iterations=0).reconstruct() - noisy)
    assert refined <= hosvd + 1e-9


def test_factorization_is_deterministic():
    kernel = np.random.default_rng(18).normal(size=(9, 7, 3, 3))
    a, b = tucker2(kernel, 3, 4), tucker2(kernel.copy(), 3, 4)
    for x, y in zip((a.first, a.core, a.last), (b.first, b.core, b.last), strict=True):
        assert np.array_equal(x, y)


# ---------------------------------------------------------------- rank selection


def test_energy_rank_is_the_smallest_rank_holding_the_share():
    s = np.array([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert [energy_rank(s, e) for e in (0.5, 9 / 14, 0.65, 13 / 14, 0.93, 1.0)] == [1, 1, 2, 2, 3, 3]
    matrix = np.diag([10.0, 5.0, 1.0, 0.5])
    assert RankSpec("energy", 0.95).choose(matrix) == 2  # (100 + 25) / 126.25 = 0.990 ≥ 0.95 > 100/126.25


def test_tucker2_ranks_follow_the_mode_unfoldings():
    kernel = _tucker_kernel(12, 10, 3, rank_out=5, rank_in=2, seed=19)
    assert tucker2_ranks(kernel, RankSpec("energy", 0.999999)) == (5, 2)
    assert tucker2_ranks(kernel, RankSpec("rank", 11)) == (11, 10)
    noisy = kernel + np.random.default_rng(20).normal(0, 0.01, size=kernel.shape)
    assert tucker2_ranks(noisy, RankSpec("vbmf")) == (5, 2)


@pytest.mark.parametrize("rows,cols,rank,noise", [(50, 80, 5, 0.1), (100, 300, 10, 1.0), (64, 64, 3, 0.5),
                                                   (300, 784, 20, 0.05), (10, 256, 4, 0.1)])
def test_evbmf_recovers_the_rank_and_noise_of_low_rank_plus_noise(rows, cols, rank, noise):
    rng = np.random.default_rng(rows + cols)
    matrix = rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols)) + noise * rng.normal(size=(rows, cols))
    for oriented in (matrix, matrix.T):
        estimate = evbmf(oriented)
        assert estimate.rank == rank
        assert estimate.sigma2 == pytest.approx(noise**2, rel=0.1)


def test_evbmf_of_pure_noise_keeps_nothing_and_of_zeros_is_zero():
    assert evbmf(np.random.default_rng(21).normal(size=(40, 90))).rank == 0
    assert evbmf(np.zeros((5, 7))).rank == 0
    assert RankSpec("vbmf").choose(np.zeros((5, 7))) == 1  # a layer keeps at least one component
    with pytest.raises(ValueError):
        evbmf_from_singular_values(np.ones(3), 4, 9)


def test_tau_bar_is_the_zero_of_psi():
    assert vb_tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)
    for alpha in (0.01, 0.3, 1.0):
        tau = vb_tau_bar(alpha)
        assert math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau == pytest.approx(0, abs=1e-9)


def test_rank_spec_parsing():
    assert RankSpec.parse() == RankSpec("vbmf")
    assert RankSpec.parse(rank=4) == RankSpec("rank", 4)
    assert RankSpec.parse(energy=0.9) == RankSpec("energy", 0.9)
    with pytest.raises(UsageError, match="only one"):
        RankSpec.parse(rank=4, vbmf=True)
    with pytest.raises(UsageError):
        RankSpec("rank", 0)
    with pytest.raises(UsageError):
        RankSpec("energy", 1.5)
    with pytest.raises(UsageError):
        RankSpec("tucker")


# ---------------------------------------------------------------- multiply-adds


def test_macs_of_the_digit_recognizer_match_the_layer_formulas():
    model = onnx.load(ROOT / "sample_models" / "digit-recognizer.onnx")
    expected = (32 * 28 * 28 * 1 * 9) + (64 * 14 * 14 * 32 * 9) + (128 * 7 * 7 * 64 * 9) + 1152 * 256 + 256 * 10
    assert total_macs(model) == expected


def test_macs_per_sample_for_fixed_batch_and_for_the_decomposed_layers():
    weight = _low_rank(9, 12, 2, seed=22)  # [N, K] with transB=1
    model = gemm_model(weight, 0, 1, 1.0, 1.0, True, 12, 9)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8  # fixed batch of 8
    assert node_macs(model) == [12 * 9]
    result, rows = decompose_model(model, ["fc.weight"], RankSpec("rank", 2))
    assert rows[0]["macs_before"] == 108 and rows[0]["macs_after"] == 12 * 2 + 2 * 9
    assert node_macs(result) == [24, 18]


# ---------------------------------------------------------------- the file stage


def test_decompose_file_writes_a_checked_smaller_model_deterministically(tmp_path):
    source = tmp_path / "in.onnx"
    kernel = _tucker_kernel(16, 12, 3, 4, 3, seed=23) + np.random.default_rng(24).normal(0, 0.01, (16, 12, 3, 3))
    onnx.save(conv_model(kernel, pads=[1, 1, 1, 1]), source)
    outputs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    reports = [decompose_file(source, out, Selection(), RankSpec("vbmf"), latency_runs=2, batch_sizes=(1, 3))
               for out in outputs]
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    report = reports[0]
    assert report["method"] == "EVBMF" and report["warnings"] == []
    [layer] = report["layers"]
    assert layer["decomposed"] and layer["ranks"] == [3, 4] and layer["tensor"] == "conv1.weight"
    summary = report["model"]
    assert summary["params_after"] < summary["params_before"] and summary["macs_after"] < summary["macs_before"]
    assert set(summary["latency_ms_before"]) == {"1", "3"} and all(v > 0 for v in summary["latency_ms_after"].values())
    assert all(summary["latency_min_ms_after"][b] <= summary["latency_ms_after"][b] for b in ("1", "3"))
    loaded = OnnxModel.load(outputs[0])  # passes the loader's checker
    assert {t.name for t in loaded.weights} == {"conv1.bias", "conv1.weight.tucker_first",
                                                "conv1.weight.tucker_core", "conv1.weight.tucker_last"}
    x = np.random.default_rng(25).normal(size=(2, 12, 11, 11))
    scale = np.max(np.abs(_run(onnx.load(source), x)))
    assert _max_diff(onnx.load(source), loaded.proto, x) < 0.02 * scale  # only the small noise is lost


def test_latency_of_several_models_fixed_batches_and_unmeasurable_inputs():
    free = gemm_model(_low_rank(9, 12, 2, seed=32), 0, 1, 1.0, 1.0, True, 12, 9)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(free)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 5
    symbolic = onnx.ModelProto()
    symbolic.CopyFrom(free)
    symbolic.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "K"
    timings = measure_latencies([m.SerializeToString() for m in (free, fixed, symbolic)], (1, 2), runs=3)
    assert set(timings[0]) == {1, 2} and set(timings[1]) == {5} and timings[2] is None
    assert all(0 < t.min_ms <= t.median_ms for t in timings[0].values())


def test_decompose_file_with_nothing_to_gain_warns_and_keeps_the_graph(tmp_path):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(conv_model(np.random.default_rng(26).normal(size=(8, 6, 3, 3))), source)
    report = decompose_file(source, target, Selection(), RankSpec("rank", 8), latency_runs=0)
    assert not report["layers"][0]["decomposed"] and "no layer was decomposed" in report["warnings"][0]
    assert "latency_ms_before" not in report["model"]
    assert onnx.load(target).graph == onnx.load(source).graph


def test_decomposed_graph_runs_in_the_retraining_executor():
    torch = pytest.importorskip("torch")
    from weightless_cli.train.executor import OnnxModule

    model = conv_model(np.random.default_rng(27).normal(0, 0.2, size=(8, 6, 3, 3)), strides=[2, 2], pads=[1, 1, 1, 1])
    conv, _ = decompose_model(model, ["conv1.weight"], RankSpec("rank", 3))
    gemm, _ = decompose_model(gemm_model(np.random.default_rng(28).normal(size=(9, 12)), 0, 1, 0.5, 2.0, True, 12, 9),
                              ["fc.weight"], RankSpec("rank", 3))
    for decomposed, shape in ((conv, (2, 6, 11, 11)), (gemm, (4, 12))):
        x = np.random.default_rng(29).normal(size=shape).astype(np.float32)
        trainable = [t.name for t in decomposed.graph.initializer]
        module = OnnxModule(decomposed, trainable)
        with torch.no_grad():
            torch_out = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(torch_out, _run(decomposed, x), atol=1e-4)
