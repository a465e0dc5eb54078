"""Execute an ONNX graph node by node in PyTorch, so its weights can be trained.

Retraining must change weights *in place*: the trained tensors are written back into
the very same ONNX graph under the same names, and the graph is never re-exported. So
instead of converting the model to a torch architecture we interpret the graph: each
node becomes a small torch function, chosen and configured once at construction, and
``forward`` runs them in graph order on float32 tensors.

Weight names follow the project's stable naming (see ``weightless_cli.model``): a graph
initializer is named by itself and a ``Constant`` node by its output, with the subgraph's
path in front inside an ``If`` branch or a ``Loop`` body (``gate/then_branch/W``). Tensors
named as trainable become ``nn.Parameter``s; every other initializer or constant is a buffer.
``If``, ``Loop`` and ``Scan`` (opset 9 on) run eagerly: the condition, trip count and sequence
length are read on every call, so gradients reach the weights of the branch taken and of every
iteration.

torch is an optional extra: importing this module without it raises
:class:`~weightless_cli.errors.MissingExtraError`, so import it lazily.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from weightless_cli.errors import BadInputError, MissingExtraError, UsageError
from weightless_cli.model import all_nodes, subgraph_prefix, subgraphs

MISSING_TORCH_MESSAGE = (
    "retraining needs PyTorch, which is not installed: run pip install 'weightless-cli[train]' (make venv installs it)"
)

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:
    raise MissingExtraError(MISSING_TORCH_MESSAGE) from exc

_DEFAULT_DOMAINS = ("", "ai.onnx")

# Every float type is computed in float32; integer and bool tensors keep their own type.
_ONNX_TO_TORCH_DTYPE = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float32,
    TensorProto.FLOAT16: torch.float32,
    TensorProto.BFLOAT16: torch.float32,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT16: torch.int64,
    TensorProto.UINT32: torch.int64,
    TensorProto.UINT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}

Tensor = torch.Tensor
NodeFn = Callable[..., Any]


# ---------------------------------------------------------------- weights of a model


def weight_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer and ``Constant`` value of the model, subgraphs included, by stable name, as stored."""
    return dict(_graph_weights(model.graph, ""))


def _graph_weights(graph: onnx.GraphProto, prefix: str) -> Iterable[tuple[str, np.ndarray]]:
    for init in graph.initializer:
        yield prefix + init.name, numpy_helper.to_array(init)
    for node in graph.node:
        if _is_constant(node):
            value = _constant_value(node)
            if value is not None:
                yield prefix + node.output[0], value
        for attribute, sub in subgraphs(node):
            yield from _graph_weights(sub, subgraph_prefix(node, attribute, prefix))


def _own_weight_names(graph: onnx.GraphProto) -> list[str]:
    """The names ``graph`` itself gives its initializers and executable constants (not its subgraphs')."""
    names = [init.name for init in graph.initializer]
    return names + [node.output[0] for node in graph.node if _is_constant(node) and _constant_value(node) is not None]


def _is_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and bool(node.output)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value a ``Constant`` node produces, or None for kinds we cannot execute."""
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            return numpy_helper.to_array(value)
        if attr.name == "value_float":
            return np.array(value, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(value), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(value, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(value), dtype=np.int64)
    return None


def _is_float(array: np.ndarray) -> bool:
    # bfloat16 (ml_dtypes) is not a numpy floating subtype; recognise it by name.
    return np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"


def _to_torch(array: np.ndarray) -> Tensor:
    if _is_float(array):
        array = array.astype(np.float32)
    elif array.dtype.kind in "iu" and array.dtype not in (np.int8, np.uint8, np.int16, np.int32, np.int64):
        array = array.astype(np.int64)  # torch lacks most unsigned types; int64 holds shapes and indices
    elif array.dtype.kind not in "iub":
        raise BadInputError(f"cannot execute tensors of type {array.dtype}")
    # np.ascontiguousarray would turn a 0-d array into 1-d; copy keeps the shape.
    return torch.from_numpy(np.array(array, copy=True, order="C"))


# ---------------------------------------------------------------- helpers shared by ops


def _ints(tensor: Tensor | None) -> list[int] | None:
    return None if tensor is None else [int(v) for v in tensor.reshape(-1).tolist()]


def _torch_pad_list(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-dimension (begin, end) pads to F.pad's order: last dimension first."""
    pads: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        pads += [b, e]
    return pads


def _auto_pads(auto_pad: str, in_sizes, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    """Begin/end pads for SAME_UPPER / SAME_LOWER: output size = ceil(input / stride)."""
    begin, end = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin, end


class _Window:
    """The sliding-window attributes shared by Conv and the pooling ops."""

    def __init__(self, attrs: Mapping[str, Any], kernel_from_attrs: bool) -> None:
        self.auto_pad = attrs.get("auto_pad", "NOTSET")
        self.kernel = list(attrs["kernel_shape"]) if kernel_from_attrs else None
        self.strides = attrs.get("strides")
        self.dilations = attrs.get("dilations")
        self.pads = attrs.get("pads")

    def resolve(self, x: Tensor, kernel: list[int] | None = None):
        """(kernel, strides, dilations, pad begin, pad end) for this input's spatial size."""
        rank = x.dim() - 2
        kernel = self.kernel or kernel
        strides = list(self.strides or [1] * rank)
        dilations = list(self.dilations or [1] * rank)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = _auto_pads(self.auto_pad, x.shape[2:], kernel, strides, dilations)
        elif self.auto_pad == "VALID" or not self.pads:
            begin, end = [0] * rank, [0] * rank
        else:
            begin, end = list(self.pads[:rank]), list(self.pads[rank:])
        return kernel, strides, dilations, begin, end


# ---------------------------------------------------------------- op builders
# Each builder gets the node's attributes and the model's opset and returns the function
# that computes the node's outputs from its inputs (None for an omitted optional input).


def _gemm(attrs, opset):
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)

    def run(a, b, c=None):
        a = a.t() if trans_a else a
        b = b.t() if trans_b else b
        if c is None:
            return a @ b if alpha == 1.0 else alpha * (a @ b)
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)

    return run


def _div(a, b):
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates like C


_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL_FNS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL_FNS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _conv(attrs, opset):
    window, group = _Window(attrs, kernel_from_attrs=False), attrs.get("group", 1)

    def run(x, w, b=None):
        _, strides, dilations, begin, end = window.resolve(x, list(w.shape[2:]))
        if begin != end:  # torch pads symmetrically only
            x, begin = F.pad(x, _torch_pad_list(begin, end)), [0] * len(begin)
        return _CONV_FNS[x.dim() - 2](x, w, b, strides, begin, dilations, group)

    return run


def _conv_transpose(attrs, opset):
    group = attrs.get("group", 1)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    output_shape = attrs.get("output_shape")

    def run(x, w, b=None):
        rank = x.dim() - 2
        strides = list(attrs.get("strides") or [1] * rank)
        dilations = list(attrs.get("dilations") or [1] * rank)
        extra = list(attrs.get("output_padding") or [0] * rank)
        full = _CONV_T_FNS[rank](x, w, None, strides, 0, 0, group, dilations)
        begin, end = _conv_transpose_pads(attrs, auto_pad, output_shape, x.shape[2:], w.shape[2:], strides, dilations, extra)
        # Crop the begin pads; the end grows by output_padding (zeros beyond the full result).
        y = F.pad(full, _torch_pad_list([-p for p in begin], [e - p for e, p in zip(extra, end, strict=True)]))
        return y if b is None else y + b.reshape(1, -1, *([1] * rank))

    return run


def _conv_transpose_pads(attrs, auto_pad, output_shape, in_sizes, kernel, strides, dilations, extra):
    rank = len(in_sizes)
    if output_shape is None and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        pads = attrs.get("pads") if auto_pad == "NOTSET" else None
        return (list(pads[:rank]), list(pads[rank:])) if pads else ([0] * rank, [0] * rank)
    wanted = list(output_shape)[-rank:] if output_shape is not None else [n * s for n, s in zip(in_sizes, strides, strict=True)]
    begin, end = [], []
    for n, k, s, d, o, want in zip(in_sizes, kernel, strides, dilations, extra, wanted, strict=True):
        total = s * (n - 1) + o + (k - 1) * d + 1 - want
        if auto_pad == "SAME_UPPER":
            begin.append(total // 2)
            end.append(total - total // 2)
        else:
            begin.append(total - total // 2)
            end.append(total // 2)
    return begin, end


def _max_pool(attrs, opset):
    window, ceil_mode = _Window(attrs, kernel_from_attrs=True), bool(attrs.get("ceil_mode", 0))

    def run(x):
        kernel, strides, dilations, begin, end = window.resolve(x)
        if begin != end or any(p > k // 2 for p, k in zip(begin, kernel, strict=True)):
            x, begin = F.pad(x, _torch_pad_list(begin, end), value=-math.inf), [0] * len(begin)
        return _MAX_POOL_FNS[x.dim() - 2](x, kernel, strides, begin, dilations, ceil_mode)

    return run


def _average_pool(attrs, opset):
    window, ceil_mode = _Window(attrs, kernel_from_attrs=True), bool(attrs.get("ceil_mode", 0))
    include_pad = bool(attrs.get("count_include_pad", 0))

    def run(x):
        kernel, strides, _, begin, end = window.resolve(x)
        pool = _AVG_POOL_FNS[x.dim() - 2]
        if begin == end and all(p <= k // 2 for p, k in zip(begin, kernel, strict=True)):
            return pool(x, kernel, strides, begin, ceil_mode, include_pad)
        pads = _torch_pad_list(begin, end)
        total = pool(F.pad(x, pads), kernel, strides, 0, ceil_mode, True)
        if include_pad:
            return total
        # Divide by the number of real (unpadded) elements in each window instead.
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
        return total / pool(F.pad(ones, pads), kernel, strides, 0, ceil_mode, True)

    return run


def _softmax_like(fn):
    def build(attrs, opset):
        # Before opset 13 (Log)Softmax flattened the input to 2-D at `axis` (default 1).
        axis = attrs.get("axis", -1 if opset >= 13 else 1)

        def run(x):
            if opset >= 13 or x.dim() == 0:
                return fn(x, dim=axis)
            ax = axis % x.dim()
            return fn(x.reshape(math.prod(x.shape[:ax]), -1), dim=1).reshape(x.shape)

        return run

    return build


def _flatten(attrs, opset):
    axis = attrs.get("axis", 1)

    def run(x):
        ax = axis % x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:ax]), math.prod(x.shape[ax:]))

    return run


def _reshape(attrs, opset):
    allow_zero = attrs.get("allowzero", 0)
    legacy_shape = attrs.get("shape")  # opset < 5 kept the shape in an attribute

    def run(x, shape=None):
        dims = _ints(shape) if shape is not None else list(legacy_shape)
        if not allow_zero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)

    return run


def _transpose(attrs, opset):
    perm = attrs.get("perm")
    return lambda x: x.permute(list(perm) if perm is not None else list(range(x.dim() - 1, -1, -1)))


def _concat(attrs, opset):
    axis = attrs["axis"]
    return lambda *xs: torch.cat([x for x in xs if x is not None], dim=axis)


def _batch_norm(attrs, opset):
    epsilon = attrs.get("epsilon", 1e-5)
    return lambda x, scale, bias, mean, var: F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)


def _dropout(attrs, opset):
    # Inference semantics always: retraining fine-tunes a deployed graph as it runs.
    return lambda x, *_: (x, torch.ones_like(x, dtype=torch.bool))


def _shape(attrs, opset):
    start, end = attrs.get("start", 0), attrs.get("end")
    return lambda x: torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


def _gather(attrs, opset):
    axis = attrs.get("axis", 0)

    def run(data, indices):
        ax = axis % data.dim()
        indices = indices.long()
        indices = torch.where(indices < 0, indices + data.shape[ax], indices)
        picked = data.index_select(ax, indices.reshape(-1))
        return picked.reshape((*data.shape[:ax], *indices.shape, *data.shape[ax + 1 :]))

    return run


def _unsqueeze(attrs, opset):
    def run(x, axes=None):
        axes_list = _ints(axes) if axes is not None else list(attrs["axes"])
        rank = x.dim() + len(axes_list)
        for ax in sorted(a % rank for a in axes_list):
            x = x.unsqueeze(ax)
        return x

    return run


def _squeeze(attrs, opset):
    def run(x, axes=None):
        axes_list = _ints(axes) if axes is not None else attrs.get("axes")
        if axes_list is None:
            return x.squeeze()
        return x.squeeze(tuple(a % x.dim() for a in axes_list)) if axes_list else x

    return run


def _cast(attrs, opset):
    dtype = _ONNX_TO_TORCH_DTYPE[attrs["to"]]
    return lambda x: x.to(dtype)


def _clip(attrs, opset):
    if opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
        return lambda x: torch.clamp(x, low, high) if low is not None or high is not None else x

    def run(x, low=None, high=None):
        return x if low is None and high is None else torch.clamp(x, low, high)

    return run


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad(attrs, opset):
    mode = _PAD_MODES[attrs.get("mode", "constant")]

    def run(x, pads=None, value=None, axes=None):
        pad_list = _ints(pads) if pads is not None else list(attrs["pads"])
        fill = float(value.item()) if value is not None else attrs.get("value", 0.0)
        axes_list = [a % x.dim() for a in _ints(axes)] if axes is not None else list(range(x.dim()))
        begin, end = [0] * x.dim(), [0] * x.dim()
        for i, ax in enumerate(axes_list):
            begin[ax], end[ax] = pad_list[i], pad_list[i + len(axes_list)]
        torch_pads = _torch_pad_list(begin, end)
        while torch_pads[-2:] == [0, 0] and len(torch_pads) > 2:  # reflect/edge want the short form
            torch_pads = torch_pads[:-2]
        return F.pad(x, torch_pads, mode=mode, value=fill) if mode == "constant" else F.pad(x, torch_pads, mode=mode)

    return run


def _reduce_mean(attrs, opset):
    keepdims = bool(attrs.get("keepdims", 1))
    noop_empty = attrs.get("noop_with_empty_axes", 0)

    def run(x, axes=None):
        axes_list = _ints(axes) if axes is not None else attrs.get("axes")
        if not axes_list:
            return x if noop_empty else x.mean(dim=tuple(range(x.dim())), keepdim=keepdims)
        return x.mean(dim=tuple(axes_list), keepdim=keepdims)

    return run


def _simple(fn):
    return lambda attrs, opset: fn


_OPS: dict[str, Callable[[Mapping[str, Any], int], NodeFn]] = {
    "Gemm": _gemm,
    "MatMul": _simple(torch.matmul),
    "Add": _simple(torch.add),
    "Sub": _simple(torch.sub),
    "Mul": _simple(torch.mul),
    "Div": _simple(_div),
    "Pow": _simple(torch.pow),
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Relu": _simple(torch.relu),
    "LeakyRelu": lambda attrs, opset: lambda x: F.leaky_relu(x, attrs.get("alpha", 0.01)),
    "Sigmoid": _simple(torch.sigmoid),
    "Tanh": _simple(torch.tanh),
    "Neg": _simple(torch.neg),
    "Abs": _simple(torch.abs),
    "Exp": _simple(torch.exp),
    "Log": _simple(torch.log),
    "Sqrt": _simple(torch.sqrt),
    "Erf": _simple(torch.erf),
    "Softmax": _softmax_like(torch.softmax),
    "LogSoftmax": _softmax_like(torch.log_softmax),
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _simple(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _simple(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "ReduceMean": _reduce_mean,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": _concat,
    "BatchNormalization": _batch_norm,
    "Dropout": _dropout,
    "Identity": _simple(lambda x: x),
    "Shape": _shape,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Cast": _cast,
    "Clip": _clip,
    "Pad": _pad,
}

_CONTROL_FLOW = ("If", "Loop", "Scan")
SUPPORTED_OPS = frozenset(_OPS) | {"Constant", *_CONTROL_FLOW}


def _unsupported_variant(node: onnx.NodeProto, attrs: Mapping[str, Any]) -> str | None:
    """Why a supported op type is used in a way we cannot execute, or None."""
    op = node.op_type
    if op == "AveragePool" and any(d != 1 for d in attrs.get("dilations", [])):
        return "AveragePool with dilations"
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return "MaxPool with Indices output"
    if op == "BatchNormalization" and (
        attrs.get("training_mode", 0) or attrs.get("spatial", 1) == 0 or any(node.output[1:])
    ):
        return "BatchNormalization in training mode"
    if op == "Cast" and attrs.get("to") not in _ONNX_TO_TORCH_DTYPE:
        return f"Cast to {TensorProto.DataType.Name(attrs.get('to', 0))}"
    if op == "Pad" and attrs.get("mode", "constant") not in _PAD_MODES:
        return f"Pad mode {attrs['mode']}"
    if op == "Constant" and _constant_value(node) is None:
        return "Constant of a string or sparse value"
    return None


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    attrs = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        attrs[attr.name] = value.decode() if isinstance(value, bytes) else value
    return attrs


def _opset(model: onnx.ModelProto) -> int:
    versions = [imp.version for imp in model.opset_import if imp.domain in _DEFAULT_DOMAINS]
    return versions[0] if versions else 1


def check_supported(model: onnx.ModelProto) -> None:
    """Raise one error listing every node kind of the model (subgraphs included) that we cannot execute."""
    problems: set[str] = set()
    for node in all_nodes(model.graph):
        if node.op_type == "Scan" and node.domain in _DEFAULT_DOMAINS and _opset(model) < 9:
            problems.add("Scan before opset 9 (batched, with sequence_lens)")
        elif node.domain not in _DEFAULT_DOMAINS:
            problems.add(f"{node.domain}:{node.op_type}")
        elif node.op_type not in SUPPORTED_OPS:
            problems.add(node.op_type)
        else:
            variant = _unsupported_variant(node, _attributes(node))
            if variant:
                problems.add(variant)
    if problems:
        raise BadInputError(
            f"cannot execute the graph in torch, unsupported ops: {', '.join(sorted(problems))} "
            f"(supported: {', '.join(sorted(SUPPORTED_OPS))})"
        )


# ---------------------------------------------------------------- the module


class _Step:
    """One executable node: its function, input and output names, and what to free after it.

    ``reads`` adds to the inputs the outer names its subgraphs use (for freeing), and a
    control-flow step's function also gets the scope it runs in.
    """

    __slots__ = ("fn", "inputs", "outputs", "label", "release", "reads", "takes_scope")

    def __init__(self, fn: Callable[..., Any], node: onnx.NodeProto, captured: Iterable[str] = ()) -> None:
        self.fn = fn
        self.inputs = list(node.input)
        self.outputs = list(node.output)
        self.label = f"node {node.name or node.output[0]!r} ({node.op_type})"
        self.release: list[str] = []
        self.reads = [*self.inputs, *captured]
        self.takes_scope = node.op_type in _CONTROL_FLOW


class _Plan:
    """A graph ready to run: the main graph, an ``If`` branch, or a ``Loop`` or ``Scan`` body.

    ``weights`` maps the graph's own initializer and constant names to module attributes;
    ``captured`` are the names it reads from enclosing graphs.
    """

    __slots__ = ("steps", "inputs", "outputs", "weights", "captured")

    def __init__(self, steps: list[_Step], inputs: list[str], outputs: list[str], weights: dict[str, str],
                 captured: set[str]) -> None:
        self.steps, self.inputs, self.outputs = steps, inputs, outputs
        self.weights, self.captured = weights, captured


class OnnxModule(nn.Module):
    """Runs an ONNX graph in torch; the tensors named in ``trainable`` are Parameters.

    ``output`` picks the graph tensor that ``forward`` returns (default: the first graph
    output), e.g. the logits feeding a final Softmax.
    """

    def __init__(self, model: onnx.ModelProto, trainable: Iterable[str] = (), *, output: str | None = None) -> None:
        super().__init__()
        check_supported(model)
        graph, opset = model.graph, _opset(model)
        weights = weight_arrays(model)
        trainable = list(dict.fromkeys(trainable))
        _check_trainable(trainable, weights)

        self._attr_of: dict[str, str] = {}  # ONNX name -> attribute name on this module
        self._dtypes: dict[str, np.dtype] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for index, (name, array) in enumerate(weights.items()):
            attr = f"w{index}_{re.sub(r'[^0-9A-Za-z_]', '_', name)[-48:]}"
            tensor = _to_torch(array)
            if name in trainable:
                self.register_parameter(attr, nn.Parameter(tensor.clone()))
            else:
                self.register_buffer(attr, tensor, persistent=False)
            self._attr_of[name] = attr
            self._dtypes[name], self._shapes[name] = array.dtype, tuple(array.shape)
        self.trainable_names: tuple[str, ...] = tuple(trainable)

        if not graph.output:
            raise BadInputError("the graph has no outputs")
        self.output_name = output or graph.output[0].name
        self._main = self._plan(graph, opset, "", frozenset(), [self.output_name])
        self.input_names = self._main.inputs
        if self.output_name not in self._defined(self._main):
            raise UsageError(f"the graph computes no tensor named {self.output_name!r}")
        self._plan_release(self._main)

    def _plan(self, graph: onnx.GraphProto, opset: int, prefix: str, outer: frozenset[str],
              outputs: list[str] | None = None) -> _Plan:
        """Steps for ``graph``, whose weights' stable names start with ``prefix``; ``outer``
        are the names enclosing graphs define, which its nodes may read."""
        own = {name: self._attr_of[prefix + name] for name in _own_weight_names(graph)}
        inputs = [i.name for i in graph.input if i.name not in own]
        defined = set(outer) | set(own) | set(inputs) | {""}
        local = set(own) | set(inputs) | {""}
        steps: list[_Step] = []
        captured: set[str] = set()
        for node in graph.node:
            if node.op_type == "Constant":
                continue  # its value is already a buffer or a parameter
            missing = [name for name in node.input if name not in defined]
            if missing:
                raise BadInputError(
                    f"node {node.name or node.op_type!r} reads {missing[0]!r} before it is computed "
                    "(graph not topologically sorted)"
                )
            step = self._control_step(node, opset, prefix, frozenset(defined)) if node.op_type in _CONTROL_FLOW \
                else _Step(_OPS[node.op_type](_attributes(node), opset), node)
            captured.update(name for name in step.reads if name not in local)
            steps.append(step)
            defined.update(node.output)
            local.update(node.output)
        outputs = outputs if outputs is not None else [o.name for o in graph.output]
        captured.update(name for name in outputs if name not in local)
        return _Plan(steps, inputs, outputs, own, captured)

    def _control_step(self, node: onnx.NodeProto, opset: int, prefix: str, defined: frozenset[str]) -> _Step:
        plans = {attribute: self._plan(sub, opset, subgraph_prefix(node, attribute, prefix), defined)
                 for attribute, sub in subgraphs(node)}
        captured = set().union(*(plan.captured for plan in plans.values()))
        if node.op_type == "If":
            fn = self._if_fn(plans["then_branch"], plans["else_branch"])
        elif node.op_type == "Loop":
            fn = self._loop_fn(plans["body"], len(node.input) - 2)
        else:
            fn = self._scan_fn(plans["body"], len(node.input), _attributes(node))
        return _Step(fn, node, sorted(captured))

    def _if_fn(self, then_plan: _Plan, else_plan: _Plan) -> Callable[..., tuple[Tensor, ...]]:
        def run_if(scope: dict[str, Tensor | None], cond: Tensor) -> tuple[Tensor, ...]:
            return tuple(self._run(then_plan if bool(cond.reshape(-1)[0]) else else_plan, dict(scope)))

        return run_if

    def _loop_fn(self, body: _Plan, carried_count: int) -> Callable[..., tuple[Tensor, ...]]:
        def run_loop(scope: dict[str, Tensor | None], trips: Tensor | None = None, cond: Tensor | None = None,
                     *initial: Tensor) -> tuple[Tensor, ...]:
            limit = math.inf if trips is None else int(trips.reshape(-1)[0])
            going = True if cond is None else bool(cond.reshape(-1)[0])
            carried, scans, done = list(initial), [], 0
            while done < limit and going:
                state = [torch.tensor(done, dtype=torch.int64), torch.tensor(going), *carried]
                results = self._run(body, dict(scope), state)
                going = bool(results[0].reshape(-1)[0])
                carried = list(results[1 : 1 + carried_count])
                scans.append(results[1 + carried_count :])
                done += 1
            if not scans and len(body.outputs) > 1 + carried_count:
                raise BadInputError("a Loop with scan outputs ran no iteration")
            stacked = [torch.stack(list(values)) for values in zip(*scans, strict=True)]
            return (*carried, *stacked)

        return run_loop

    def _scan_fn(self, body: _Plan, input_count: int, attrs: Mapping[str, Any]) -> Callable[..., tuple[Tensor, ...]]:
        scanned = int(attrs["num_scan_inputs"])
        states = input_count - scanned
        in_axes = list(attrs.get("scan_input_axes", [0] * scanned))
        in_reversed = [bool(d) for d in attrs.get("scan_input_directions", [0] * scanned)]
        out_count = len(body.outputs) - states
        out_axes = list(attrs.get("scan_output_axes", [0] * out_count))
        out_reversed = [bool(d) for d in attrs.get("scan_output_directions", [0] * out_count)]

        def run_scan(scope: dict[str, Tensor | None], *values: Tensor) -> tuple[Tensor, ...]:
            carried, sequences = list(values[:states]), values[states:]
            axes = [axis % sequence.dim() for axis, sequence in zip(in_axes, sequences, strict=True)]
            lengths = {sequence.shape[axis] for sequence, axis in zip(sequences, axes, strict=True)}
            if len(lengths) != 1:
                raise BadInputError(f"Scan inputs have different sequence lengths {sorted(lengths)}")
            (length,) = lengths
            if length == 0 and out_count:
                raise BadInputError("a Scan with scan outputs got empty sequences")
            produced: list[list[Tensor]] = [[] for _ in range(out_count)]
            for step in range(length):
                slices = [sequence.select(axis, length - 1 - step if backwards else step)
                          for sequence, axis, backwards in zip(sequences, axes, in_reversed, strict=True)]
                results = self._run(body, dict(scope), [*carried, *slices])
                carried = list(results[:states])
                for collected, value in zip(produced, results[states:], strict=True):
                    collected.append(value)
            stacked = [torch.stack(values[::-1] if backwards else values, dim=axis % (values[0].dim() + 1))
                       for values, axis, backwards in zip(produced, out_axes, out_reversed, strict=True)]
            return (*carried, *stacked)

        return run_scan

    @staticmethod
    def _defined(plan: _Plan) -> set[str]:
        return set(plan.weights) | set(plan.inputs) | {name for step in plan.steps for name in step.outputs}

    def _plan_release(self, plan: _Plan) -> None:
        """Free each main-graph intermediate right after its last reader (matters for inference memory)."""
        last_reader = {name: i for i, step in enumerate(plan.steps) for name in step.reads}
        for name, i in last_reader.items():
            if name not in plan.outputs and name not in plan.weights and name not in plan.inputs and name:
                plan.steps[i].release.append(name)

    def attribute_name(self, onnx_name: str) -> str:
        """The attribute (parameter or buffer) of this module holding ONNX tensor ``onnx_name``."""
        return self._attr_of[onnx_name]

    def forward(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != len(self.input_names):
            raise UsageError(f"the graph takes {len(self.input_names)} input(s), got {len(inputs)}")
        values = [value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
                  for value in inputs]
        return self._run(self._main, {}, values)[0]

    def _run(self, plan: _Plan, scope: dict[str, Tensor | None], inputs: Iterable[Tensor] = ()) -> list[Tensor]:
        """Run ``plan`` in ``scope`` (the enclosing graphs' values, changed in place) and return its outputs."""
        scope[""] = None
        for name, attr in plan.weights.items():
            scope[name] = getattr(self, attr)
        for name, value in zip(plan.inputs, inputs, strict=True):
            scope[name] = value
        for step in plan.steps:
            args = [scope[name] for name in step.inputs]
            while args and args[-1] is None:
                args.pop()
            try:
                result = step.fn(scope, *args) if step.takes_scope else step.fn(*args)
            except BadInputError:
                raise
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BadInputError(f"cannot execute {step.label}: {reason}") from exc
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(step.outputs, results, strict=False):
                if name:
                    scope[name] = value
            for name in step.release:
                del scope[name]
        return [scope[name] for name in plan.outputs]

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Current values of the trainable tensors, in their original dtype and shape."""
        arrays = {}
        for name in self.trainable_names:
            value = getattr(self, self._attr_of[name]).detach().cpu().numpy()
            arrays[name] = value.astype(self._dtypes[name]).reshape(self._shapes[name])
        return arrays


def _check_trainable(trainable: list[str], weights: Mapping[str, np.ndarray]) -> None:
    unknown = [name for name in trainable if name not in weights]
    if unknown:
        raise UsageError(f"no initializer or Constant named {', '.join(map(repr, unknown))} in the model")
    not_float = [name for name in trainable if not _is_float(weights[name])]
    if not_float:
        raise UsageError(f"cannot train non-float tensors: {', '.join(map(repr, not_float))}")
