"""Small ONNX models built with onnx.helper, covering the places weights can live."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _model(graph: onnx.GraphProto, opset=OPSET) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=opset, producer_name="weightless-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def rng_weights(shape: tuple[int, ...], seed: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, size=shape).astype(dtype)


def mlp(sizes=(64, 48, 10), seed: int = 0, dtype=np.float32, batch: str | int = "N") -> onnx.ModelProto:
    """input [N, sizes[0]] → Gemm/Relu layers → logits; weights and biases are initializers."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = [], []
    current = "input"
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = numpy_helper.from_array(rng_weights((fan_out, fan_in), seed + i, dtype), f"fc{i + 1}.weight")
        b = numpy_helper.from_array(rng_weights((fan_out,), seed + 100 + i, dtype), f"fc{i + 1}.bias")
        inits += [w, b]
        out = f"gemm{i + 1}"
        nodes.append(helper.make_node("Gemm", [current, w.name, b.name], [out], transB=1, name=f"fc{i + 1}"))
        current = out
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i + 1}"]))
            current = f"relu{i + 1}"
    nodes.append(helper.make_node("Identity", [current], ["logits"]))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("input", elem, [batch, sizes[0]])],
        [helper.make_tensor_value_info("logits", elem, [batch, sizes[-1]])], inits)
    return _model(graph)


def constant_node_model(seed: int = 1) -> onnx.ModelProto:
    """The weight of a MatMul comes from a Constant node, not an initializer."""
    w = numpy_helper.from_array(rng_weights((32, 16), seed), "w_const")
    nodes = [helper.make_node("Constant", [], ["W"], value=w), helper.make_node("MatMul", ["input", "W"], ["logits"])]
    graph = helper.make_graph(nodes, "const", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 16])])
    return _model(graph)


def if_model(seed: int = 2) -> onnx.ModelProto:
    """Weights inside both branches of an If (each branch has its own initializer named W)."""
    def branch(name: str, s: int) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng_weights((32, 16), s), "W")
        return helper.make_graph(
            [helper.make_node("MatMul", ["input", "W"], [f"{name}_out"])], name, [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["N", 16])], [w])

    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["logits"], name="gate",
                            then_branch=branch("then", seed), else_branch=branch("else", seed + 1))
    graph = helper.make_graph([node], "if", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 16])], [cond])
    return _model(graph)


def shared_initializer_model(seed: int = 3) -> onnx.ModelProto:
    """One weight read by two MatMul nodes."""
    w = numpy_helper.from_array(rng_weights((24, 24), seed), "shared.weight")
    nodes = [helper.make_node("MatMul", ["input", "shared.weight"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "shared.weight"], ["logits"])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 24])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 24])], [w])
    return _model(graph)


def quantized_model(seed: int = 4) -> onnx.ModelProto:
    """A MatMul on an int8 weight through DequantizeLinear (the QDQ form)."""
    q = numpy_helper.from_array(np.random.default_rng(seed).integers(-127, 127, (32, 16), dtype=np.int8), "w_q")
    scale = numpy_helper.from_array(np.array(0.01, dtype=np.float32), "w_scale")
    zero = numpy_helper.from_array(np.array(0, dtype=np.int8), "w_zero")
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["W"]),
             helper.make_node("MatMul", ["input", "W"], ["logits"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 16])], [q, scale, zero])
    return _model(graph)


def save(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    if external:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=0)
    else:
        onnx.save_model(model, path)
    return path


def rnn_model(op: str = "LSTM", seed: int = 5, hidden: int = 16, features: int = 12) -> onnx.ModelProto:
    """An LSTM or GRU over [seq, N, features] with W, R and B initializers."""
    gates = {"LSTM": 4, "GRU": 3}[op]
    w = numpy_helper.from_array(rng_weights((1, gates * hidden, features), seed), f"{op.lower()}.W")
    r = numpy_helper.from_array(rng_weights((1, gates * hidden, hidden), seed + 1), f"{op.lower()}.R")
    b = numpy_helper.from_array(rng_weights((1, 2 * gates * hidden), seed + 2), f"{op.lower()}.B")
    node = helper.make_node(op, ["input", w.name, r.name, b.name], ["Y", "Y_h"], hidden_size=hidden)
    graph = helper.make_graph(
        [node, helper.make_node("Identity", ["Y_h"], ["logits"])], op.lower(),
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [5, "N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "N", hidden])], [w, r, b])
    return _model(graph)
