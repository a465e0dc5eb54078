"""The torch executor runs ONNX graphs like onnxruntime does, and exposes weights for training."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from weightless_cli.errors import BadInputError, UsageError

torch = pytest.importorskip("torch")
from weightless_cli.train.executor import OnnxModule, weight_arrays  # noqa: E402

pytestmark = pytest.mark.torch

SAMPLE_MODELS = sorted((Path(__file__).resolve().parent.parent / "sample_models").glob("*.onnx"))
TOLERANCE = 1e-4


# ---------------------------------------------------------------- helpers


def _ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _torch_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    module = OnnxModule(model)
    with torch.no_grad():
        return module(*(torch.from_numpy(v) for v in feeds.values())).numpy()


def assert_parity(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    expected = _ort_run(model, feeds)[0]
    actual = _torch_run(model, feeds)
    assert actual.shape == expected.shape
    if expected.dtype.kind == "f":
        assert np.abs(actual - expected).max(initial=0.0) <= TOLERANCE
    else:
        np.testing.assert_array_equal(actual, expected)


def single_op(
    op: str,
    x_shape: tuple[int, ...],
    *,
    opset: int = 17,
    weights: dict[str, np.ndarray] | None = None,
    extra_inputs: list[str] = (),
    n_outputs: int = 1,
    x_dtype: int = TensorProto.FLOAT,
    **attrs,
) -> onnx.ModelProto:
    """A one-node graph: input x, then the named initializers, in that order."""
    weights = weights or {}
    node = helper.make_node(
        op, ["x", *weights, *extra_inputs], [f"y{i}" for i in range(n_outputs)], **attrs
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", x_dtype, list(x_shape))],
        [helper.make_empty_tensor_value_info(f"y{i}") for i in range(n_outputs)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rand(*shape: int, seed: int = 0, low: float | None = None) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.abs(values) + low if low is not None else values


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# ---------------------------------------------------------------- one op at a time

X4 = (2, 4, 7, 6)
CASES = {
    "gemm_trans_alpha_beta": (single_op("Gemm", (5, 3), weights={"b": rand(4, 5), "c": rand(4)}, alpha=0.5, beta=2.0, transA=1, transB=1), (5, 3)),
    "gemm_no_bias": (single_op("Gemm", (3, 5), weights={"b": rand(5, 4)}), (3, 5)),
    "gemm_matrix_bias": (single_op("Gemm", (3, 5), weights={"b": rand(5, 4), "c": rand(3, 4)}, beta=0.25), (3, 5)),
    "matmul_batched": (single_op("MatMul", (2, 3, 5), weights={"b": rand(5, 4)}), (2, 3, 5)),
    "add_broadcast": (single_op("Add", X4, weights={"b": rand(4, 1, 1)}), X4),
    "sub": (single_op("Sub", X4, weights={"b": rand(6)}), X4),
    "mul": (single_op("Mul", X4, weights={"b": rand(1, 4, 7, 1)}), X4),
    "div": (single_op("Div", X4, weights={"b": rand(6, low=0.5)}), X4),
    "pow": (single_op("Pow", X4, weights={"b": np.array(2.0, np.float32)}), X4),
    "conv_group_asym_pads": (single_op("Conv", X4, weights={"w": rand(6, 2, 3, 2)}, group=2, pads=[0, 1, 1, 2], strides=[2, 1], dilations=[2, 1]), X4),
    "conv_same_upper": (single_op("Conv", X4, weights={"w": rand(3, 4, 4, 3), "b": rand(3)}, auto_pad="SAME_UPPER", strides=[2, 2]), X4),
    "conv_same_lower": (single_op("Conv", X4, weights={"w": rand(3, 4, 4, 3)}, auto_pad="SAME_LOWER", strides=[2, 3]), X4),
    "conv_valid": (single_op("Conv", X4, weights={"w": rand(3, 4, 3, 3)}, auto_pad="VALID", pads=None), X4),
    "conv_depthwise": (single_op("Conv", X4, weights={"w": rand(4, 1, 3, 3), "b": rand(4)}, group=4, pads=[1, 1, 1, 1]), X4),
    "conv_1d": (single_op("Conv", (2, 3, 9), weights={"w": rand(5, 3, 3)}, pads=[2, 1], strides=[2]), (2, 3, 9)),
    "conv_3d": (single_op("Conv", (1, 2, 4, 5, 6), weights={"w": rand(3, 2, 2, 3, 2)}, pads=[1, 0, 1, 1, 0, 1]), (1, 2, 4, 5, 6)),
    "conv_transpose": (single_op("ConvTranspose", X4, weights={"w": rand(4, 3, 3, 3), "b": rand(3)}, strides=[2, 2], pads=[1, 0, 1, 2], output_padding=[1, 1]), X4),
    "conv_transpose_group_dilation": (single_op("ConvTranspose", X4, weights={"w": rand(4, 2, 2, 3)}, group=2, dilations=[2, 1], strides=[1, 2]), X4),
    "conv_transpose_output_shape": (single_op("ConvTranspose", X4, weights={"w": rand(4, 2, 3, 3)}, strides=[2, 2], output_shape=[14, 13]), X4),
    "conv_transpose_same_upper": (single_op("ConvTranspose", X4, weights={"w": rand(4, 2, 3, 3)}, strides=[2, 2], auto_pad="SAME_UPPER"), X4),
    "relu": (single_op("Relu", X4), X4),
    "leaky_relu_default": (single_op("LeakyRelu", X4), X4),
    "leaky_relu_alpha": (single_op("LeakyRelu", X4, alpha=0.3), X4),
    "sigmoid": (single_op("Sigmoid", X4), X4),
    "tanh": (single_op("Tanh", X4), X4),
    "neg": (single_op("Neg", X4), X4),
    "abs": (single_op("Abs", X4), X4),
    "exp": (single_op("Exp", X4), X4),
    "erf": (single_op("Erf", X4), X4),
    "softmax_opset11_flattens": (single_op("Softmax", X4, opset=11, axis=1), X4),
    "softmax_opset11_default": (single_op("Softmax", X4, opset=11), X4),
    "softmax_opset13_axis": (single_op("Softmax", X4, opset=13, axis=1), X4),
    "softmax_opset13_default": (single_op("Softmax", X4, opset=13), X4),
    "log_softmax_opset11": (single_op("LogSoftmax", X4, opset=11, axis=2), X4),
    "log_softmax_opset13": (single_op("LogSoftmax", X4, opset=13, axis=-2), X4),
    "max_pool_ceil_pads": (single_op("MaxPool", X4, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1), X4),
    "max_pool_asym_pads": (single_op("MaxPool", X4, kernel_shape=[2, 3], pads=[0, 1, 1, 2]), X4),
    "max_pool_dilated": (single_op("MaxPool", X4, kernel_shape=[2, 2], dilations=[2, 2]), X4),
    "max_pool_same_upper": (single_op("MaxPool", X4, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"), X4),
    "max_pool_1d": (single_op("MaxPool", (2, 3, 9), kernel_shape=[2], strides=[2]), (2, 3, 9)),
    "avg_pool_exclude_pad": (single_op("AveragePool", X4, kernel_shape=[3, 3], pads=[1, 1, 1, 1]), X4),
    "avg_pool_include_pad": (single_op("AveragePool", X4, kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), X4),
    "avg_pool_asym_pads": (single_op("AveragePool", X4, kernel_shape=[2, 3], pads=[1, 0, 0, 2], strides=[2, 1]), X4),
    "avg_pool_asym_pads_include": (single_op("AveragePool", X4, kernel_shape=[2, 3], pads=[1, 0, 0, 2], count_include_pad=1), X4),
    "avg_pool_ceil_pads": (single_op("AveragePool", X4, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1), X4),
    "avg_pool_asym_ceil": (single_op("AveragePool", X4, kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1), X4),
    "avg_pool_same_lower_include": (single_op("AveragePool", X4, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER", count_include_pad=1), X4),
    "max_pool_asym_ceil": (single_op("MaxPool", X4, kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1), X4),
    "max_pool_same_lower": (single_op("MaxPool", X4, kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER"), X4),
    "conv_transpose_same_lower": (single_op("ConvTranspose", X4, weights={"w": rand(4, 2, 3, 3)}, strides=[2, 2], auto_pad="SAME_LOWER"), X4),
    "softmax_opset1": (single_op("Softmax", X4, opset=7), X4),
    "avg_pool_ceil": (single_op("AveragePool", X4, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), X4),
    "global_average_pool": (single_op("GlobalAveragePool", X4), X4),
    "global_max_pool": (single_op("GlobalMaxPool", X4), X4),
    "reduce_mean_attr": (single_op("ReduceMean", X4, opset=13, axes=[2, 3], keepdims=0), X4),
    "reduce_mean_input": (single_op("ReduceMean", X4, opset=18, weights={"axes": i64(-1, 1)}), X4),
    "flatten_default": (single_op("Flatten", X4), X4),
    "flatten_axis0": (single_op("Flatten", X4, axis=0), X4),
    "flatten_negative": (single_op("Flatten", X4, axis=-1), X4),
    "reshape_zero_copies": (single_op("Reshape", X4, weights={"s": i64(0, -1, 3)}), X4),
    "reshape_allowzero": (single_op("Reshape", X4, opset=14, weights={"s": i64(8, 42)}, allowzero=1), X4),
    "transpose_default": (single_op("Transpose", X4), X4),
    "transpose_perm": (single_op("Transpose", X4, perm=[0, 2, 3, 1]), X4),
    "concat": (single_op("Concat", X4, weights={"b": rand(2, 4, 7, 2)}, axis=-1), X4),
    "batch_norm": (single_op("BatchNormalization", X4, weights={"s": rand(4), "b": rand(4), "m": rand(4), "v": rand(4, low=0.1)}, epsilon=1e-3), X4),
    "batch_norm_2d": (single_op("BatchNormalization", (3, 4), weights={"s": rand(4), "b": rand(4), "m": rand(4), "v": rand(4, low=0.1)}), (3, 4)),
    "dropout": (single_op("Dropout", X4, opset=13), X4),
    "dropout_mask": (single_op("Dropout", X4, opset=13, n_outputs=2), X4),
    "identity": (single_op("Identity", X4), X4),
    "shape": (single_op("Shape", X4), X4),
    "shape_slice": (single_op("Shape", X4, opset=15, start=1, end=-1), X4),
    "gather_axis_negative_indices": (single_op("Gather", X4, weights={"i": i64(-1, 0, 2)}, axis=1), X4),
    "gather_scalar_index": (single_op("Gather", X4, weights={"i": np.array(-2, np.int64)}, axis=2), X4),
    "unsqueeze_attr": (single_op("Unsqueeze", X4, opset=11, axes=[0, -1]), X4),
    "unsqueeze_input": (single_op("Unsqueeze", X4, opset=13, weights={"a": i64(1, 4)}), X4),
    "squeeze_attr": (single_op("Squeeze", (2, 1, 3, 1), opset=11, axes=[-1]), (2, 1, 3, 1)),
    "squeeze_input": (single_op("Squeeze", (2, 1, 3, 1), opset=13, weights={"a": i64(1)}), (2, 1, 3, 1)),
    "squeeze_all": (single_op("Squeeze", (2, 1, 3, 1), opset=13), (2, 1, 3, 1)),
    "cast_to_int": (single_op("Cast", X4, to=TensorProto.INT32), X4),
    "cast_to_double": (single_op("Cast", X4, to=TensorProto.DOUBLE), X4),
    "clip_inputs": (single_op("Clip", X4, weights={"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}), X4),
    "clip_max_only": (single_op("Clip", X4, weights={"hi": np.array(0.7, np.float32)}, extra_inputs=[]), X4),
    "clip_attrs": (single_op("Clip", X4, opset=6, min=-0.2, max=0.3), X4),
    "clip_none": (single_op("Clip", X4), X4),
    "pad_constant": (single_op("Pad", X4, weights={"p": i64(0, 0, 1, 2, 0, 1, 0, 3), "v": np.array(1.5, np.float32)}), X4),
    "pad_reflect": (single_op("Pad", X4, weights={"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}, mode="reflect"), X4),
    "pad_edge": (single_op("Pad", X4, weights={"p": i64(0, 0, 0, 2, 0, 0, 1, 0)}, mode="edge"), X4),
    "pad_attrs": (single_op("Pad", X4, opset=2, pads=[0, 1, 0, 0, 0, 0, 2, 1], value=-1.0), X4),
    "pad_axes": (single_op("Pad", X4, opset=18, weights={"p": i64(1, 2, 3, 0), "v": np.array(0.5, np.float32), "axes": i64(-1, 1)}), X4),
    "pad_negative_crops": (single_op("Pad", X4, weights={"p": i64(0, 0, -1, 1, 0, 0, 1, -2)}), X4),
}


def _clip_max_only_fix(model: onnx.ModelProto) -> onnx.ModelProto:
    # Clip's min is the second input: leave it empty so only max applies.
    node = model.graph.node[0]
    node.input[:] = ["x", "", "hi"]
    return model


CASES["clip_max_only"] = (_clip_max_only_fix(CASES["clip_max_only"][0]), X4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_single_op_matches_onnxruntime(name: str) -> None:
    model, shape = CASES[name]
    assert_parity(model, {"x": rand(*shape, seed=1)})


def test_log_and_sqrt_match_onnxruntime() -> None:
    for op in ("Log", "Sqrt"):
        assert_parity(single_op(op, X4), {"x": rand(*X4, low=0.01)})


def test_embedding_gather_with_integer_input() -> None:
    table = rand(10, 4)
    model = single_op("Gather", (2, 3), x_dtype=TensorProto.INT64)
    node = model.graph.node[0]
    node.input[:] = ["table", "x"]
    model.graph.initializer.append(numpy_helper.from_array(table, "table"))
    assert_parity(model, {"x": np.array([[0, 9, -1], [3, 3, 5]], dtype=np.int64)})


def test_constant_nodes_and_shape_arithmetic() -> None:
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, as PyTorch exports x.view(x.size(0), -1)."""
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Constant", [], ["minus_one"], value_ints=[-1]),
        helper.make_node("Constant", [], ["scale"], value_float=2.5),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"]),
        helper.make_node("Unsqueeze", ["batch"], ["batch1"], axes=[0]),
        helper.make_node("Concat", ["batch1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Mul", ["flat", "scale"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4])],
        [helper.make_empty_tensor_value_info("y")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    assert_parity(model, {"x": rand(5, 3, 4)})
    assert set(weight_arrays(model)) == {"zero", "minus_one", "scale"}


# ---------------------------------------------------------------- whole models


def _export(module, example: np.ndarray, opset: int = 13) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (torch.from_numpy(example),), buffer, dynamo=False, opset_version=opset,
            input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}},
        )
    return onnx.load_from_string(buffer.getvalue())


class _Cnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 6, 5, padding=2)
        self.bn = torch.nn.BatchNorm2d(6)
        self.conv2 = torch.nn.Conv2d(6, 8, 3, stride=2, groups=2)
        self.fc = torch.nn.Linear(8 * 2 * 2, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        x = torch.nn.functional.avg_pool2d(torch.nn.functional.leaky_relu(self.conv2(x)), 2, ceil_mode=True)
        return self.fc(torch.flatten(x, 1))


def test_exported_mlp_matches_onnxruntime() -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.Sigmoid(),
        torch.nn.Dropout(0.3), torch.nn.Linear(32, 10), torch.nn.LogSoftmax(dim=1),
    )
    x = rand(7, 1, 8, 8)
    assert_parity(_export(mlp, x), {"x": x})


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_exported_cnn_matches_onnxruntime(opset: int) -> None:
    torch.manual_seed(0)
    cnn = _Cnn()
    with torch.no_grad():  # non-trivial batch-norm statistics
        cnn.bn.running_mean.uniform_(-1, 1)
        cnn.bn.running_var.uniform_(0.5, 2)
    x = rand(4, 1, 16, 16)
    model = _export(cnn, x, opset)
    assert_parity(model, {"x": x})
    np.testing.assert_allclose(_torch_run(model, {"x": x}), cnn(torch.from_numpy(x)).detach().numpy(), atol=TOLERANCE)


def _sample_input(model: onnx.ModelProto, batch: int = 3) -> dict[str, np.ndarray]:
    weights = {init.name for init in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in weights:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rand(*dims, seed=3)
    return feeds


@pytest.mark.skipif(not SAMPLE_MODELS, reason="no sample_models/*.onnx yet")
@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=[p.name for p in SAMPLE_MODELS])
def test_sample_model_matches_onnxruntime(path: Path) -> None:
    model = onnx.load(path)
    assert_parity(model, _sample_input(model))


# ---------------------------------------------------------------- weights and errors


def _two_layer_model(dtype=np.float32) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(rand(3, 4, seed=5).astype(dtype))),
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2.weight"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_empty_tensor_value_info("y")],
        [numpy_helper.from_array(rand(4, seed=6).astype(dtype), "b1"), numpy_helper.from_array(rand(4, 2, seed=7), "w2.weight")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_trainable_tensors_are_parameters_and_others_buffers() -> None:
    module = OnnxModule(_two_layer_model(), trainable=["w1", "w2.weight"])
    params = dict(module.named_parameters())
    assert len(params) == 2
    assert all("." not in name for name in params)
    assert module.attribute_name("w2.weight") in params
    assert module.attribute_name("b1") in dict(module.named_buffers())
    states = module.state_arrays()
    assert set(states) == {"w1", "w2.weight"}
    np.testing.assert_array_equal(states["w2.weight"], rand(4, 2, seed=7))


def test_gradients_reach_constant_and_initializer_weights() -> None:
    module = OnnxModule(_two_layer_model(), trainable=["w1", "w2.weight"])
    module(torch.from_numpy(rand(5, 3, seed=8))).sum().backward()
    for param in module.parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_state_arrays_keep_original_dtype_and_shape() -> None:
    model = _two_layer_model(np.float16)
    module = OnnxModule(model, trainable=["w1", "b1"])
    with torch.no_grad():
        getattr(module, module.attribute_name("b1")).add_(1.0)
    states = module.state_arrays()
    assert states["w1"].dtype == np.float16 and states["w1"].shape == (3, 4)
    np.testing.assert_array_equal(states["w1"], weight_arrays(model)["w1"])
    np.testing.assert_allclose(states["b1"], weight_arrays(model)["b1"].astype(np.float32) + 1, atol=1e-2)


def test_unknown_or_integer_trainable_names_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="'nope'"):
        OnnxModule(_two_layer_model(), trainable=["nope"])
    model = CASES["reshape_zero_copies"][0]
    with pytest.raises(UsageError, match="non-float"):
        OnnxModule(model, trainable=["s"])


def test_unsupported_ops_are_all_listed_at_construction() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("TopK", ["a", "k"], ["b", "i"]),
        helper.make_node("Einsum", ["b"], ["c"], equation="ij->ji"),
        helper.make_node("FusedThing", ["c"], ["d"], domain="com.example"),
        helper.make_node("AveragePool", ["d"], ["y"], kernel_shape=[2], dilations=[2]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_empty_tensor_value_info("y")],
        [numpy_helper.from_array(i64(1), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    with pytest.raises(BadInputError) as info:
        OnnxModule(model)
    message = str(info.value)
    assert "\n" not in message
    for expected in ("TopK", "Einsum", "com.example:FusedThing", "AveragePool with dilations"):
        assert expected in message
    assert "Relu," not in message.split("(supported")[0]


# ---------------------------------------------------------------- control flow


def _if_model(cond: bool) -> onnx.ModelProto:
    """y = relu(x @ W1) followed by an If whose branches hold their own weight named W (and read W1's output)."""
    def branch(name: str, seed: int) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["h", "W"], [f"{name}_out"])], name, [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["N", 2])],
            [numpy_helper.from_array(rand(4, 2, seed=seed), "W")],
        )

    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"]),
        helper.make_node("Relu", ["a"], ["h"]),
        helper.make_node("If", ["cond"], ["y"], name="gate",
                         then_branch=branch("then", 11), else_branch=branch("else", 12)),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(rand(3, 4, seed=10), "W1"), numpy_helper.from_array(np.array(cond), "cond")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _loop_model(trips: int) -> onnx.ModelProto:
    """A Loop that applies h = tanh(h @ W + b) ``trips`` times (W in the body, b outside) and scans each h."""
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "W"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["s"]),
            helper.make_node("Tanh", ["s"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["h_out"], ["scan"]),
        ],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("scan", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rand(4, 4, seed=21) * 0.5, "W")],
    )
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["h", "steps"], name="repeat", body=body)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("steps", TensorProto.FLOAT, [trips, "N", 4])],
        [numpy_helper.from_array(i64(trips), "trips"), numpy_helper.from_array(rand(4, seed=22), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("cond", [True, False])
def test_if_runs_the_branch_onnxruntime_runs(cond: bool) -> None:
    assert_parity(_if_model(cond), {"x": rand(5, 3, seed=13)})


def test_if_branch_weights_have_stable_names_and_train_only_when_taken() -> None:
    model = _if_model(True)
    assert {"gate/then_branch/W", "gate/else_branch/W"} <= set(weight_arrays(model))
    module = OnnxModule(model, trainable=["W1", "gate/then_branch/W", "gate/else_branch/W"])
    module(torch.from_numpy(rand(5, 3, seed=14))).sum().backward()
    grad = {name: getattr(module, module.attribute_name(name)).grad for name in module.trainable_names}
    assert grad["W1"].abs().sum() > 0 and grad["gate/then_branch/W"].abs().sum() > 0
    assert grad["gate/else_branch/W"] is None  # the branch not taken is not in the graph of this call


@pytest.mark.parametrize("trips", [1, 3])
def test_loop_matches_onnxruntime_outputs_and_scans(trips: int) -> None:
    model = _loop_model(trips)
    x = rand(5, 4, seed=23)
    expected = _ort_run(model, {"x": x})
    module = OnnxModule(model)
    with torch.no_grad():
        final = module(torch.from_numpy(x)).numpy()
    assert np.abs(final - expected[0]).max() <= TOLERANCE
    scans = OnnxModule(model, output="steps")
    with torch.no_grad():
        stacked = scans(torch.from_numpy(x)).numpy()
    assert stacked.shape == (trips, 5, 4) and np.abs(stacked - expected[1]).max() <= TOLERANCE


def test_gradients_reach_a_loop_body_weight_through_every_iteration() -> None:
    module = OnnxModule(_loop_model(3), trainable=["repeat/body/W", "b"])
    module(torch.from_numpy(rand(5, 4, seed=24))).sum().backward()
    for name in ("repeat/body/W", "b"):
        assert getattr(module, module.attribute_name(name)).grad.abs().sum() > 0


def _scan_model(backwards: bool, output_axis: int) -> onnx.ModelProto:
    """An RNN as a Scan: h_t = tanh(x_t @ Wx + h_{t-1} @ Wh), both weights in the body; every h_t scanned out."""
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "Wx"], ["a"]),
            helper.make_node("MatMul", ["h_in", "Wh"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["s"]),
            helper.make_node("Tanh", ["s"], ["h_out"]),
            helper.make_node("Identity", ["h_out"], ["y_t"]),
        ],
        "body",
        [helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(rand(3, 4, seed=31), "Wx"), numpy_helper.from_array(rand(4, 4, seed=32) * 0.5, "Wh")],
    )
    node = helper.make_node("Scan", ["h0", "x"], ["h", "ys"], name="rnn", body=body, num_scan_inputs=1,
                            scan_input_directions=[int(backwards)], scan_output_axes=[output_axis])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 3])],
        [helper.make_tensor_value_info("ys", TensorProto.FLOAT, None), helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(rand(2, 4, seed=33), "h0")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("backwards,output_axis", [(False, 0), (True, 1), (False, -1)])
def test_scan_matches_onnxruntime(backwards: bool, output_axis: int) -> None:
    model = _scan_model(backwards, output_axis)
    x = rand(5, 2, 3, seed=34)
    expected = _ort_run(model, {"x": x})
    for index, name in enumerate(("ys", "h")):
        with torch.no_grad():
            got = OnnxModule(model, output=name)(torch.from_numpy(x)).numpy()
        assert got.shape == expected[index].shape and np.abs(got - expected[index]).max() <= TOLERANCE


def test_gradients_reach_scan_body_weights() -> None:
    module = OnnxModule(_scan_model(False, 0), trainable=["rnn/body/Wx", "rnn/body/Wh"])
    module(torch.from_numpy(rand(5, 2, 3, seed=35))).sum().backward()
    for param in module.parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_opset_8_scan_is_refused() -> None:
    model = _scan_model(False, 0)
    model.opset_import[0].version = 8
    with pytest.raises(BadInputError, match="Scan before opset 9"):
        OnnxModule(model)


def test_unsupported_ops_inside_a_branch_are_listed() -> None:
    model = _if_model(True)
    model.graph.node[2].attribute[0].g.node[0].op_type = "Einsum"
    with pytest.raises(BadInputError, match="Einsum"):
        OnnxModule(model)


def test_runtime_failure_names_the_node() -> None:
    model = single_op("MatMul", (2, 3), weights={"b": rand(5, 4)})
    with pytest.raises(BadInputError, match="MatMul"):
        OnnxModule(model)(torch.zeros(2, 3))


def test_missing_torch_is_a_one_line_missing_extra_error() -> None:
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from weightless_cli.errors import MissingExtraError\n"
        "try:\n    import weightless_cli.train.executor\n"
        "except MissingExtraError as exc:\n    print('EXIT', exc.exit_code, exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("EXIT 2 ")
    assert "pip install 'weightless-cli[train]'" in result.stdout
