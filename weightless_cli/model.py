"""The ONNX weight model: find every floating-point weight tensor, read it, change it, save it.

Every stage goes through this module, so that all of them see the same tensors under
the same names wherever the weights live: graph initializers, ``Constant`` nodes, and
the bodies of ``If``/``Loop``/``Scan`` subgraphs, inline or in external-data files.

Stable names: a main-graph initializer keeps its own name and a ``Constant`` node is
named by its output. Tensors inside a subgraph are prefixed with the path of the nodes
and attributes that hold the subgraph (``if_node/then_branch/W``), because subgraphs may
reuse names that also exist outside them.

Models bigger than memory: external data is never loaded as a whole. Each tensor's bytes
are checked against its file when the model is loaded, and read (memory-mapped) only when
a stage asks for that tensor. A changed tensor keeps its new values as a numpy array until
the model is saved; saving streams every tensor into the new data file one at a time
(untouched ones are copied from the old file in chunks), so a stage holds about one tensor
plus what it changed. Asking for :attr:`OnnxModel.proto` (or a tensor's ``proto``) puts the
values into the protobuf, for code that needs a self-contained model.
"""

from __future__ import annotations

import fnmatch
import mmap
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError, Message
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

# Saving with external data: tensors of at least this many bytes go to the data file (as
# onnx's own writer does); big ones start on a page boundary so they map without a shift.
EXTERNAL_THRESHOLD = 1024
_PAGE_ALIGN_FROM = 1 << 20
_PAGE = 4096
_SMALL_ALIGN = 64
COPY_CHUNK = 64 << 20  # bytes per read when copying an untouched tensor to the new data file

# Bytes per element of the types whose external data can be checked against the shape.
_ITEMSIZE = {
    TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2,
    TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8,
    TensorProto.BOOL: 1, TensorProto.COMPLEX64: 8, TensorProto.COMPLEX128: 16,
    TensorProto.FLOAT8E4M3FN: 1, TensorProto.FLOAT8E4M3FNUZ: 1, TensorProto.FLOAT8E5M2: 1,
    TensorProto.FLOAT8E5M2FNUZ: 1,
}


def is_quantized_op(op_type: str) -> bool:
    return op_type in _QUANTIZED_OPS or op_type.endswith("Integer") or op_type.startswith(("QLinear", "DynamicQuantize"))


def _numpy_dtype(data_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))


# --- external data ---------------------------------------------------------------------


@dataclass(frozen=True)
class ExternalSlice:
    """Where one tensor's bytes lie in an external-data file (checked against the file)."""

    file: Path
    offset: int
    length: int

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The bytes as a read-only array, memory-mapped: nothing is read until it is used."""
        if self.length == 0:
            empty = np.empty(shape, dtype)
            empty.setflags(write=False)
            return empty
        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
        with open(self.file, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), self.offset + self.length - start, offset=start,
                               access=mmap.ACCESS_READ)
        count = self.length // dtype.itemsize
        return np.frombuffer(mapped, dtype=dtype, count=count, offset=self.offset - start).reshape(shape)

    def read(self) -> bytes:
        with open(self.file, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.length)
        if len(data) != self.length:
            raise BadInputError(f"external-data file became shorter while reading ({len(data)} of {self.length} "
                                f"bytes at offset {self.offset})", self.file)
        return data

    def copy_into(self, out: BinaryIO) -> None:
        """Append the bytes to ``out`` through one reused buffer of :data:`COPY_CHUNK` bytes."""
        buffer = memoryview(bytearray(min(COPY_CHUNK, self.length)))
        with open(self.file, "rb") as handle:
            handle.seek(self.offset)
            remaining = self.length
            while remaining:
                got = handle.readinto(buffer[: min(remaining, len(buffer))])
                if not got:
                    raise BadInputError(f"external-data file ended {remaining} bytes early", self.file)
                out.write(buffer[:got])
                remaining -= got


def _expected_nbytes(tensor: TensorProto) -> int | None:
    itemsize = _ITEMSIZE.get(tensor.data_type)
    if itemsize is None:
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * itemsize


def external_slice(tensor: TensorProto, data_dir: Path, model_path: Path | None = None) -> ExternalSlice:
    """Where ``tensor``'s external data is, after checking it names a file in ``data_dir`` that
    holds exactly the bytes its shape and type need. Problems are one-line BadInputErrors."""
    where = model_path or data_dir
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    name = tensor.name
    if not location:
        raise BadInputError(f"tensor {name!r} is marked as external data but names no file", where)
    relative = Path(location)
    if relative.is_absolute() or ".." in relative.parts:
        raise BadInputError(f"tensor {name!r}: external-data location {location!r} is outside the model's folder",
                            where)
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise BadInputError(f"tensor {name!r}: external-data offset/length are not integers", where) from None
    if offset < 0 or (length is not None and length < 0):
        raise BadInputError(f"tensor {name!r}: negative external-data offset or length", where)
    file = data_dir / relative
    try:
        size = os.stat(file).st_size
    except FileNotFoundError:
        raise BadInputError(f"missing external-data file {location!r} for tensor {name!r}", where) from None
    except OSError as exc:
        raise BadInputError(f"cannot read external-data file {location!r}: {exc.strerror}", where) from None
    if not file.is_file():
        raise BadInputError(f"external-data file {location!r} for tensor {name!r} is not a regular file", where)
    length = max(size - offset, 0) if length is None else length
    if offset + length > size:
        raise BadInputError(f"external-data file {location!r} is {size} bytes, too short for tensor {name!r} "
                            f"(bytes {offset}..{offset + length}); truncated?", where)
    expected = _expected_nbytes(tensor)
    if expected is not None and expected != length:
        raise BadInputError(f"tensor {name!r} needs {expected} bytes but its external data is {length} bytes", where)
    return ExternalSlice(file, offset, length)


def _check_readable(files: set[Path], model_path: Path) -> None:
    for file in sorted(files):
        try:
            os.close(os.open(file, os.O_RDONLY))
        except OSError as exc:
            raise BadInputError(f"cannot read external-data file {file.name!r}: {exc.strerror}", model_path) from None


# --- tensors -----------------------------------------------------------------------------


class WeightTensor:
    """One floating-point tensor stored in the model, and where it lives.

    Its values are in one of three places: inside its TensorProto (inline), in an
    external-data file (read lazily), or, once changed, in a numpy array held here until
    the model is saved or :attr:`proto` is asked for.
    """

    def __init__(self, name: str, proto: TensorProto, location: str, consumers: tuple[tuple[str, int], ...],
                 in_subgraph: bool = False, data_dir: Path | None = None) -> None:
        self.name = name
        self._proto = proto
        self.location = location  # "initializer" or "constant"
        self.consumers = tuple(consumers)  # (op_type, input index) of every node that reads it
        self.in_subgraph = in_subgraph
        self._data_dir = data_dir  # where relative external-data locations start
        self._pending: np.ndarray | None = None  # values set but not yet in the protobuf

    def __repr__(self) -> str:
        return f"WeightTensor(name={self.name!r}, shape={self.shape}, dtype={self.dtype}, location={self.location!r})"

    @property
    def proto(self) -> TensorProto:
        """The TensorProto with the values in it (changed or external values are put in first)."""
        self._materialize()
        return self._proto

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self._proto.dims)

    @property
    def dtype(self) -> str:
        return FLOAT_DTYPES[self._proto.data_type]

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
        """The values in their stored dtype (bfloat16 as ``ml_dtypes.bfloat16``), read-only.
        External data is memory-mapped, so this costs no memory until the values are used."""
        if self._pending is not None:
            return self._pending
        if uses_external_data(self._proto):
            return self._external().view(_numpy_dtype(self._proto.data_type), self.shape)
        return numpy_helper.to_array(self._proto)

    def float_array(self) -> np.ndarray:
        """The values as float64 (fp64) or float32 (every narrower type), for computing."""
        values = self.array()
        return values.astype(np.float64 if self.dtype == "float64" else np.float32)

    def set_array(self, values: np.ndarray) -> None:
        """Store ``values`` (any float dtype) in this tensor's own dtype, shape and name.

        An array that already has that dtype and owns its C-ordered memory is kept without a
        copy and made read-only (so a later write by the caller fails loudly); any other is
        converted. The protobuf gets the values when the model is saved or ``proto`` is read.
        """
        values = np.asarray(values)
        if tuple(values.shape) != self.shape:
            raise ValueError(f"{self.name}: shape {values.shape} does not match {self.shape}")
        dtype = _numpy_dtype(self._proto.data_type)
        flags = values.flags
        if not (values.dtype == dtype and flags.c_contiguous and flags.owndata and flags.writeable):
            values = values.astype(dtype, order="C")
        values.setflags(write=False)
        self._pending = values
        self._proto.CopyFrom(self._skeleton())

    def strip(self) -> None:
        """Drop the values but keep name, dtype and shape (the graph of an encoded blob)."""
        self._pending = None
        self._proto.CopyFrom(self._skeleton())

    def _skeleton(self) -> TensorProto:
        return TensorProto(name=self._proto.name, data_type=self._proto.data_type, dims=self._proto.dims)

    def _external(self) -> ExternalSlice:
        if self._data_dir is None:
            raise BadInputError(f"tensor {self.name!r} refers to external data, but the model has no folder "
                                "to read it from")
        return external_slice(self._proto, self._data_dir)

    def _materialize(self) -> None:
        if self._pending is not None:
            self._proto.CopyFrom(numpy_helper.from_array(self._pending, self._proto.name))
            self._pending = None
        elif uses_external_data(self._proto):
            _load_inline(self._proto, self._external())


def _load_inline(tensor: TensorProto, where: ExternalSlice) -> None:
    tensor.raw_data = where.read()
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT


def _role_of_input(op_type: str, index: int, rank: int) -> str:
    role = _INPUT_ROLES.get(op_type, {}).get(index, "other")
    # A 2-D operand of Add is a weight-like constant, not a bias.
    if op_type == "Add" and rank > 1:
        return "other"
    return role


# --- the model ---------------------------------------------------------------------------


class OnnxModel:
    """A loaded ONNX model and its float weight tensors."""

    def __init__(self, path: str | os.PathLike, proto: onnx.ModelProto, used_external_data: bool,
                 weights: list[WeightTensor], data_dir: Path | None = None) -> None:
        self.path = Path(path)
        self._proto = proto
        self.used_external_data = used_external_data
        self.weights = weights
        self._data_dir = data_dir

    def __repr__(self) -> str:
        return f"OnnxModel(path={str(self.path)!r}, weights={len(self.weights)}, external={self.used_external_data})"

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, path: str | os.PathLike) -> OnnxModel:
        """Wrap an in-memory model (e.g. the graph of a blob); ``path`` names it in messages."""
        _check_text(proto, path)
        return cls(path, proto, False, list(_find_weights(proto.graph)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> OnnxModel:
        """Parse and check ``path``; external data is checked against its files but not read."""
        path = Path(path)
        proto = _parse_model(path)
        if not proto.HasField("graph") or not proto.opset_import:
            raise BadInputError("not an ONNX model (no graph or opset)", path)
        _check_text(proto, path)
        external = [t for t in _all_tensors(proto.graph) if uses_external_data(t)]
        _check_readable({external_slice(t, path.parent, path).file for t in external}, path)
        model = cls(path, proto, bool(external), list(_find_weights(proto.graph, data_dir=path.parent)), path.parent)
        model.check()
        return model

    @property
    def proto(self) -> onnx.ModelProto:
        """The whole model with every value inside it (external and changed values are put in
        first, which needs memory for all of them); stages that stream use ``weights``."""
        pending = self._pending_by_id()
        for tensor in _all_tensors(self._proto.graph):
            owner = pending.get(id(tensor))
            if owner is not None:
                owner._materialize()
            elif uses_external_data(tensor):
                _load_inline(tensor, self._external(tensor))
        return self._proto

    @property
    def opsets(self) -> dict[str, int]:
        """Operator set versions by domain ("ai.onnx" for the default one), without loading any data."""
        return {o.domain or "ai.onnx": o.version for o in self._proto.opset_import}

    @property
    def quantized_ops(self) -> list[str]:
        return sorted({n.op_type for n in all_nodes(self._proto.graph) if is_quantized_op(n.op_type)})

    def weight(self, name: str) -> WeightTensor:
        for tensor in self.weights:
            if tensor.name == name:
                return tensor
        raise KeyError(name)

    def check(self, problem: str = "fails the ONNX checker") -> None:
        """Run the ONNX checker on the graph; raise BadInputError ``"{problem}: {first line}"``.
        Tensors whose values are not inline are checked as empty stand-ins of the same rank."""
        proto = self._checkable()
        if proto is None:
            return  # too big for the checker to serialise; the ops were checked when it was written
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            text = str(exc).strip()
            raise BadInputError(f"{problem}: {text.splitlines()[0] if text else 'invalid model'}", self.path) from None

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> None:
        """Write atomically. External data is used when the input had it, when asked, or when
        the model would not fit in one protobuf message; it is written one tensor at a time."""
        path = Path(path)
        if external_data is None:
            external_data = self.used_external_data or not self.fits_one_protobuf()
        if not external_data:
            proto = self.proto
            with atomic_output(path) as tmp:
                onnx.save_model(proto, tmp)
            return
        self._save_with_external_data(path)

    def fits_one_protobuf(self) -> bool:
        """Whether the whole model, values included, can be one protobuf message (< 2 GiB)."""
        return self._data_bytes() <= PROTOBUF_LIMIT

    # -- internals --

    def _pending_by_id(self) -> dict[int, WeightTensor]:
        """Changed tensors by the id of their TensorProto. Protobuf hands out the same Python
        object for a message while one is alive, and each WeightTensor keeps its own."""
        return {id(t._proto): t for t in self.weights if t._pending is not None}

    def _external(self, tensor: TensorProto) -> ExternalSlice:
        if self._data_dir is None:
            raise BadInputError(f"tensor {tensor.name!r} refers to external data, which this model cannot have",
                                self.path)
        return external_slice(tensor, self._data_dir, self.path)

    def _data_bytes(self) -> int:
        """Bytes of tensor data wherever it is (for choosing external data)."""
        pending = self._pending_by_id()
        total = 0
        for tensor in _all_tensors(self._proto.graph):
            owner = pending.get(id(tensor))
            if owner is not None:
                total += owner._pending.nbytes
            elif uses_external_data(tensor):
                total += self._external(tensor).length
            else:
                total += tensor.ByteSize()
        return total

    def _checkable(self) -> onnx.ModelProto | None:
        """The proto the checker can take: the model itself, or a copy in which tensors whose
        values live elsewhere (external file, pending array) are empty stand-ins."""
        pending = self._pending_by_id()
        originals = list(_all_tensors(self._proto.graph))
        elsewhere = [id(t) in pending or uses_external_data(t) for t in originals]
        for tensor, is_elsewhere in zip(originals, elsewhere, strict=True):
            if is_elsewhere and id(tensor) not in pending:
                self._external(tensor)  # an in-memory model cannot point at files
        inline_bytes = sum(t.ByteSize() for t, e in zip(originals, elsewhere, strict=True) if not e)
        if inline_bytes > PROTOBUF_LIMIT:
            return None
        if not any(elsewhere):
            return self._proto
        view = onnx.ModelProto()
        view.CopyFrom(self._proto)
        for copy, is_elsewhere in zip(_all_tensors(view.graph), elsewhere, strict=True):
            if is_elsewhere:
                _make_stand_in(copy)
        return view

    def _save_with_external_data(self, path: Path) -> None:
        """Stream every tensor of at least EXTERNAL_THRESHOLD bytes into ``<name>.data`` beside
        the model, then write the (small) model. The data file is renamed into place before
        the model, so the model on disk never points at a half-written data file. The
        in-memory model is left as it was."""
        data_name = f"{path.name}.data"
        pending = self._pending_by_id()
        undo: list[Callable[[], None]] = []
        # The inner context (the data file) is renamed first.
        with atomic_output(path) as model_tmp, atomic_output(path.parent / data_name) as data_tmp:
            try:
                with open(data_tmp, "wb") as out:
                    for tensor in _all_tensors(self._proto.graph):
                        self._write_external(tensor, pending.get(id(tensor)), out, data_name, undo)
                model_tmp.write_bytes(self._proto.SerializeToString())
            finally:
                for restore in reversed(undo):
                    restore()

    def _write_external(self, tensor: TensorProto, owner: WeightTensor | None, out: BinaryIO, data_name: str,
                        undo: list[Callable[[], None]]) -> None:
        """Append ``tensor``'s bytes to ``out`` and point it there; ``undo`` gets how to put it back.
        Tensors under EXTERNAL_THRESHOLD bytes stay in (or move into) the model file."""
        small = (owner._pending.nbytes if owner is not None
                 else self._external(tensor).length if uses_external_data(tensor) else None)
        if small is not None and small < EXTERNAL_THRESHOLD:
            if owner is not None:
                owner._materialize()
            else:
                _load_inline(tensor, self._external(tensor))
            return
        if owner is not None:
            values = owner._pending
            length = values.nbytes
            write = lambda: out.write(memoryview(values.reshape(-1).view(np.uint8)))  # noqa: E731
            undo.append(lambda: _clear_external(tensor))
        elif uses_external_data(tensor):
            source = self._external(tensor)
            length = source.length
            write = lambda: source.copy_into(out)  # noqa: E731
            entries = [(entry.key, entry.value) for entry in tensor.external_data]
            undo.append(lambda: _set_external(tensor, entries))
        elif tensor.HasField("raw_data") and tensor.ByteSize() >= EXTERNAL_THRESHOLD:
            raw = tensor.raw_data
            length = len(raw)
            write = lambda: out.write(raw)  # noqa: E731
            undo.append(lambda: _restore_inline(tensor, raw))
            tensor.ClearField("raw_data")
        else:
            return
        align = _PAGE if length >= _PAGE_ALIGN_FROM else _SMALL_ALIGN
        out.write(bytes(-out.tell() % align))
        offset = out.tell()
        write()
        _set_external(tensor, [("location", data_name), ("offset", str(offset)), ("length", str(length))])


def _set_external(tensor: TensorProto, entries: list[tuple[str, str]]) -> None:
    del tensor.external_data[:]
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def _clear_external(tensor: TensorProto) -> None:
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT


def _restore_inline(tensor: TensorProto, raw: bytes) -> None:
    _clear_external(tensor)
    tensor.raw_data = raw


def _make_stand_in(tensor: TensorProto) -> None:
    """Same name, type and rank, no values: zero elements (a scalar gets one zero value)."""
    _clear_external(tensor)
    tensor.ClearField("raw_data")
    if tensor.dims:
        tensor.dims[0] = 0
    else:
        tensor.raw_data = bytes(_ITEMSIZE.get(tensor.data_type, 1))


def _check_text(message: Message, path: str | os.PathLike) -> None:
    """Every string field must be text. Protobuf parses invalid UTF-8 in them without a word and
    hands it out as bytes, which would break every name lookup (and the ONNX checker) later.
    Only string and message fields are read, so tensor data is never copied."""
    stack = [message]
    while stack:
        current = stack.pop()
        for field_info in current.DESCRIPTOR.fields:
            if field_info.type not in (field_info.TYPE_MESSAGE, field_info.TYPE_STRING):
                continue
            repeated = _is_repeated(field_info)
            if not repeated and not current.HasField(field_info.name):
                continue
            value = getattr(current, field_info.name)
            values = value if repeated else [value]
            if field_info.type == field_info.TYPE_MESSAGE:
                stack.extend(values)
            elif not all(isinstance(text, str) for text in values):
                raise BadInputError(f"not a valid ONNX model: a {current.DESCRIPTOR.name}.{field_info.name} "
                                    "is not UTF-8 text", path)


def _is_repeated(field_info) -> bool:
    repeated = getattr(field_info, "is_repeated", None)  # protobuf >= 5; `label` before (gone in 7)
    return field_info.label == field_info.LABEL_REPEATED if repeated is None else bool(repeated)


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


def subgraph_prefix(node: onnx.NodeProto, attribute: str, prefix: str = "") -> str:
    """The stable-name prefix of the tensors in ``node``'s subgraph ``attribute``, for a node in
    a graph whose own prefix is ``prefix`` (``""`` for the main graph)."""
    node_id = node.name or f"{node.op_type}:{node.output[0] if node.output else ''}"
    return f"{prefix}{node_id}/{attribute}/"


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """Each subgraph ``node`` holds, with the attribute it is in (``body``, ``branches[1]``, ...)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, graph in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", graph


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of the subgraphs nested in it, outer nodes first."""
    for node in graph.node:
        yield node
        for _, sub in subgraphs(node):
            yield from all_nodes(sub)


def _all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
        for _, sub in subgraphs(node):
            yield from _all_tensors(sub)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[str, int]]]:
    """Readers of each name in this graph, including nodes of nested subgraphs that use it
    from the outer scope."""
    readers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for node in all_nodes(graph):
        for index, name in enumerate(node.input):
            if name:
                readers[name].append((node.op_type, index))
    return readers


def _find_weights(graph: onnx.GraphProto, prefix: str = "", data_dir: Path | None = None) -> Iterator[WeightTensor]:
    readers = _consumers(graph)
    in_sub = bool(prefix)
    for init in graph.initializer:
        if init.data_type in FLOAT_DTYPES:
            yield WeightTensor(prefix + init.name, init, "initializer", tuple(readers[init.name]), in_sub, data_dir)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in FLOAT_DTYPES:
                    out = node.output[0]
                    yield WeightTensor(prefix + out, attr.t, "constant", tuple(readers[out]), in_sub, data_dir)
        for attr_name, sub in subgraphs(node):
            yield from _find_weights(sub, subgraph_prefix(node, attr_name, prefix), data_dir)


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


def rewrite_file(source: str | os.PathLike, target: str | os.PathLike, selection: Selection,
                 change: Callable[[list[WeightTensor]], list[dict]], **summary: object) -> dict:
    """The file wrapper every tensor-rewriting stage shares: load ``source``, let ``change``
    rewrite the selected tensors in place (returning one report row each), save ``target``."""
    model = OnnxModel.load(source)
    rows = change(selection.apply(model))
    model.save(target)
    return {"input": str(source), "output": str(target), "warnings": model_warnings(model), **summary,
            "tensors": rows}


def bounded_int(what: str, low: int, high: int) -> Callable[[str], int]:
    """A parser for PerTensor values: an integer in [low, high], else a UsageError naming ``what``."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise UsageError(f"{what} must be in {low}..{high}, got {value}")
        return value

    return parse


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
