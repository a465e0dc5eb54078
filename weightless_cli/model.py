"""The ONNX weight model: find every floating-point weight tensor, read it, change it, save it.

Every stage goes through this module, so that all of them see the same tensors under
the same names wherever the weights live: graph initializers, ``Constant`` nodes, and
the bodies of ``If``/``Loop``/``Scan`` subgraphs, inline or in external-data files.

Stable names: a main-graph initializer keeps its own name and a ``Constant`` node is
named by its output. Tensors inside a subgraph are prefixed with the path of the nodes
and attributes that hold the subgraph (``if_node/then_branch/W``), because subgraphs may
reuse names that also exist outside them.
"""

from __future__ import annotations

import fnmatch
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import uses_external_data

from weightless_cli.errors import BadInputError, UsageError
from weightless_cli.fileio import atomic_output

FLOAT_DTYPES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64",
}

# Roles a tensor can play for the ops that consume it, by input index. A tensor used in
# several places takes the most important role (the order of ROLE_PRIORITY).
_INPUT_ROLES: dict[str, dict[int, str]] = {
    "Gemm": {0: "weight", 1: "weight", 2: "bias"},
    "MatMul": {0: "weight", 1: "weight"},
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "LSTM": {1: "weight", 2: "weight", 3: "bias", 7: "weight"},
    "GRU": {1: "weight", 2: "weight", 3: "bias"},
    "RNN": {1: "weight", 2: "weight", 3: "bias"},
    "Gather": {0: "embedding"},
    "BatchNormalization": {1: "norm", 2: "norm", 3: "norm", 4: "norm"},
    "LayerNormalization": {1: "norm", 2: "norm"},
    "InstanceNormalization": {1: "norm", 2: "norm"},
    "Add": {0: "bias", 1: "bias"},
}
ROLE_PRIORITY = ("weight", "embedding", "bias", "norm", "other")
COMPRESSIBLE_ROLES = frozenset({"weight", "embedding"})

# Ops whose inputs are already quantized (or are quantization parameters): leave them alone.
_QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits", "QGemm"})

# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**20

DEFAULT_MIN_PARAMS = 256


def is_quantized_op(op_type: str) -> bool:
    return op_type in _QUANTIZED_OPS or op_type.endswith("Integer") or op_type.startswith(("QLinear", "DynamicQuantize"))


@dataclass
class WeightTensor:
    """One floating-point tensor stored in the model, and where it lives."""

    name: str
    proto: TensorProto = field(repr=False)
    location: str  # "initializer" or "constant"
    consumers: tuple[tuple[str, int], ...]  # (op_type, input index) of every node that reads it
    in_subgraph: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.proto.dims)

    @property
    def dtype(self) -> str:
        return FLOAT_DTYPES[self.proto.data_type]

    @property
    def params(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.params * (8 if self.dtype == "float64" else 4 if self.dtype == "float32" else 2)

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(sorted({op for op, _ in self.consumers}))

    @property
    def quantized(self) -> bool:
        return any(is_quantized_op(op) for op, _ in self.consumers)

    @property
    def role(self) -> str:
        roles = {_role_of_input(op, index, len(self.shape)) for op, index in self.consumers}
        return next((r for r in ROLE_PRIORITY if r in roles), "other")

    def array(self) -> np.ndarray:
        """The values in their stored dtype (bfloat16 as ``ml_dtypes.bfloat16``)."""
        return numpy_helper.to_array(self.proto)

    def float_array(self) -> np.ndarray:
        """The values as float64 (fp64) or float32 (every narrower type), for computing."""
        values = self.array()
        return values.astype(np.float64 if self.dtype == "float64" else np.float32)

    def set_array(self, values: np.ndarray) -> None:
        """Store ``values`` (any float dtype) in this tensor's own dtype, shape and name."""
        values = np.asarray(values)
        if tuple(values.shape) != self.shape:
            raise ValueError(f"{self.name}: shape {values.shape} does not match {self.shape}")
        numpy_dtype = onnx.helper.tensor_dtype_to_np_dtype(self.proto.data_type)
        stored = numpy_helper.from_array(values.astype(numpy_dtype), self.proto.name)
        self.proto.CopyFrom(stored)

    def strip(self) -> None:
        """Drop the values but keep name, dtype and shape (the graph of an encoded blob)."""
        stripped = TensorProto(name=self.proto.name, data_type=self.proto.data_type, dims=self.proto.dims)
        self.proto.CopyFrom(stripped)


def _role_of_input(op_type: str, index: int, rank: int) -> str:
    role = _INPUT_ROLES.get(op_type, {}).get(index, "other")
    # A 2-D operand of Add is a weight-like constant, not a bias.
    if op_type == "Add" and rank > 1:
        return "other"
    return role


@dataclass
class OnnxModel:
    """A loaded ONNX model and its float weight tensors."""

    path: Path
    proto: onnx.ModelProto
    used_external_data: bool
    weights: list[WeightTensor]

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, path: str | os.PathLike) -> OnnxModel:
        """Wrap an in-memory model (e.g. the graph of a blob); ``path`` names it in messages."""
        return cls(path=Path(path), proto=proto, used_external_data=False, weights=list(_find_weights(proto.graph)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> OnnxModel:
        path = Path(path)
        proto = _parse_model(path)
        external = any(uses_external_data(t) for t in _all_tensors(proto.graph))
        if external:
            _load_external(proto, path)
        _check(proto, path)
        return cls(path=path, proto=proto, used_external_data=external, weights=list(_find_weights(proto.graph)))

    @property
    def quantized_ops(self) -> list[str]:
        return sorted({n.op_type for n in _all_nodes(self.proto.graph) if is_quantized_op(n.op_type)})

    def weight(self, name: str) -> WeightTensor:
        for tensor in self.weights:
            if tensor.name == name:
                return tensor
        raise KeyError(name)

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> None:
        """Write atomically. External data is used when the input had it, when asked, or when
        the model would not fit in one protobuf message."""
        path = Path(path)
        if external_data is None:
            external_data = self.used_external_data or _tensor_bytes(self.proto) > PROTOBUF_LIMIT
        if not external_data:
            with atomic_output(path) as tmp:
                onnx.save_model(self.proto, tmp)
            return
        _save_with_external_data(self.proto, path)


def _parse_model(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load_model(path, load_external_data=False)
    except FileNotFoundError:
        raise BadInputError("no such file", path) from None
    except IsADirectoryError:
        raise BadInputError("is a directory, expected an ONNX file", path) from None
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError):
        raise BadInputError("not an ONNX model (protobuf parse failed; truncated or another format?)", path) from None
    except OSError as exc:
        raise BadInputError(f"cannot read: {exc.strerror}", path) from None


def _load_external(proto: onnx.ModelProto, path: Path) -> None:
    base = path.parent
    for tensor in _all_tensors(proto.graph):
        if not uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = base / info.get("location", "")
        if not location.is_file():
            raise BadInputError(f"missing external-data file {info.get('location')!r} for tensor {tensor.name!r}", path)
    try:
        onnx.load_external_data_for_model(proto, str(base))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot read external data: {exc}", path) from None


def _check(proto: onnx.ModelProto, path: Path) -> None:
    if not proto.HasField("graph") or not proto.opset_import:
        raise BadInputError("not an ONNX model (no graph or opset)", path)
    if _tensor_bytes(proto) > PROTOBUF_LIMIT:
        return  # the checker cannot serialise it; the ops were checked when the file was written
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise BadInputError(f"fails the ONNX checker: {first_line}", path) from None


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, graph in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", graph


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for _, sub in _subgraphs(node):
            yield from _all_nodes(sub)


def _all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
        for _, sub in _subgraphs(node):
            yield from _all_tensors(sub)


def _tensor_bytes(proto: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in _all_tensors(proto.graph))


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[str, int]]]:
    """Readers of each name in this graph, including nodes of nested subgraphs that use it
    from the outer scope."""
    readers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for node in _all_nodes(graph):
        for index, name in enumerate(node.input):
            if name:
                readers[name].append((node.op_type, index))
    return readers


def _find_weights(graph: onnx.GraphProto, prefix: str = "") -> Iterator[WeightTensor]:
    readers = _consumers(graph)
    in_sub = bool(prefix)
    for init in graph.initializer:
        if init.data_type in FLOAT_DTYPES:
            yield WeightTensor(prefix + init.name, init, "initializer", tuple(readers[init.name]), in_sub)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in FLOAT_DTYPES:
                    out = node.output[0]
                    yield WeightTensor(prefix + out, attr.t, "constant", tuple(readers[out]), in_sub)
        for attr_name, sub in _subgraphs(node):
            node_id = node.name or f"{node.op_type}:{node.output[0] if node.output else ''}"
            yield from _find_weights(sub, f"{prefix}{node_id}/{attr_name}/")


def _save_with_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Save tensors to ``<name>.data`` beside the model. The data file is renamed into place
    before the model, so the model on disk never points at a half-written data file."""
    data_name = f"{path.name}.data"
    # The inner context (the data file) is renamed first.
    with atomic_output(path) as model_tmp, atomic_output(path.parent / data_name) as data_tmp:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        onnx.save_model(copy, model_tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_tmp.name, size_threshold=1024)
        # The model must name the final data file, not the temporary one.
        for tensor in _all_tensors(copy.graph):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_name
        onnx.save_model(copy, model_tmp)


def match_any(name: str, globs: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


@dataclass(frozen=True)
class Selection:
    """Which tensors a stage works on (the --layers/--exclude/--min-params options).

    By default: weights of Gemm/MatMul/Conv/RNN ops and embedding tables with at least
    ``min_params`` values. ``layers`` narrows by glob; a tensor named exactly (no
    wildcard) is taken whatever its role and size, so a bias can be chosen deliberately.
    Quantized tensors are never selected.
    """

    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_params: int = DEFAULT_MIN_PARAMS

    def wants(self, tensor: WeightTensor) -> bool:
        if tensor.quantized or match_any(tensor.name, self.exclude):
            return False
        if tensor.name in self.layers:
            return True
        if tensor.params < self.min_params or (self.layers and not match_any(tensor.name, self.layers)):
            return False
        return tensor.role in COMPRESSIBLE_ROLES

    def apply(self, model: OnnxModel) -> list[WeightTensor]:
        """The selected tensors; an empty selection is an error unless the model is quantized
        (then there is legitimately nothing to do, and :func:`model_warnings` says so)."""
        chosen = [t for t in model.weights if self.wants(t)]
        if not chosen and not model.quantized_ops:
            what = f"--layers {' '.join(self.layers)}" if self.layers else "the default selection"
            raise UsageError(f"no weight tensor matches {what} (--min-params {self.min_params}); "
                             "`weightless inspect` lists the tensors", model.path)
        return chosen


def model_warnings(model: OnnxModel) -> list[str]:
    """What a stage should tell the user about this model before its own report."""
    if not model.quantized_ops:
        return []
    skipped = sum(t.quantized for t in model.weights)
    return [f"{model.path}: already quantized ({', '.join(model.quantized_ops)}); "
            f"{skipped} tensor(s) feeding those ops are left alone"]


@dataclass(frozen=True)
class PerTensor:
    """A stage setting given as ``VALUE`` (the default) and ``NAME=VALUE`` overrides (NAME may
    be a glob; the last matching override wins), e.g. ``--sparsity 0.9 --sparsity fc3*=0.7``."""

    default: object | None
    overrides: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, specs: tuple[str, ...], parse: Callable[[str], object], option: str,
              default: object | None = None) -> PerTensor:
        overrides = []
        for spec in specs:
            glob, sep, text = spec.rpartition("=")
            try:
                value = parse(text)
            except (ValueError, UsageError) as exc:
                raise UsageError(f"{option} {spec!r}: {exc}") from None
            if sep:
                overrides.append((glob, value))
            else:
                default = value
        return cls(default, tuple(overrides))

    def narrow(self, selection: Selection) -> Selection:
        """With only NAME=VALUE overrides and no --layers, work on just the tensors they name."""
        if self.default is not None or selection.layers:
            return selection
        return Selection(tuple(glob for glob, _ in self.overrides), selection.exclude, selection.min_params)

    def for_name(self, name: str) -> object | None:
        for glob, value in reversed(self.overrides):
            if fnmatch.fnmatchcase(name, glob):
                return value
        return self.default
