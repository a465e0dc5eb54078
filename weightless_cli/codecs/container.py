"""The ``.wl`` blob container: one self-checking file holding a stripped ONNX graph and its encoded tensors.

This module is the executable form of ``docs/FORMAT.md``; keep the two in step (a test compares the worked
example in the spec with :func:`describe_layout` of the same blob). It is pure: bytes in, bytes out. It knows
nothing of ONNX or click; codecs hand it their parameters as small named integers and their payloads as bytes.

File layout (format 2.0; fixed-width integers little-endian)::

    preamble | file record | graph payload | (tensor record | its payloads) * tensor_count | crc32 trailer

A *record* is ``varint body_length | body | u32 crc32(body)``. Every integer in a body is an unsigned LEB128
varint (signed codec parameters zigzagged), and nothing the codec table already fixes is stored: a tensor
names its codec by a one-byte tag, and the codec's parameter names, section names and their order come from
:data:`CODECS`, so a body holds only values. It ends with a *section table* giving each following payload's
encoding (stored or raw LZMA2), length and CRC32. The reader checks every length against the bytes really
there and every size against a documented cap *before* slicing, allocating or decompressing, so malformed
input can only ever raise :class:`~weightless_cli.errors.BadInputError`.

Format 1.x (fixed-width fields, named parameters and sections) is still read: one parser serves both, its
cursor reading each integer field as a varint or at its 1.x width by the file's major version.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from weightless_cli import __version__
from weightless_cli.errors import BadInputError
from weightless_cli.fileio import read_input_bytes, write_bytes_atomic

__all__ = [
    "CODECS",
    "DTYPES",
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "MAGIC",
    "OLDER_MAJORS",
    "Blob",
    "CodecSpec",
    "DtypeInfo",
    "TensorRecord",
    "array_to_bytes",
    "bytes_to_array",
    "describe_layout",
    "dtype_of",
    "load_blob",
    "raw_array",
    "raw_record",
    "read_blob",
    "save_blob",
    "write_blob",
]

# --- format constants (docs/FORMAT.md, "Preamble" and "Version policy") --------------------------------------

# PNG-style magic: the high-bit byte catches 7-bit transports, CR LF / LF catch newline translation and
# 0x1A stops `type` on Windows consoles.
MAGIC = b"\x89WLB\r\n\x1a\n"
FORMAT_MAJOR = 2  # what the writer writes
FORMAT_MINOR = 0
OLDER_MAJORS = (1,)  # also read: 1.0 and 1.1 files exist
WRITER_KEY = "writer"

_PREAMBLE = struct.Struct("<8sHHQ")  # magic, major, minor, file_length; a crc32 of these 20 bytes follows
PREAMBLE_SIZE = _PREAMBLE.size + 4
TRAILER_SIZE = 4

ENCODING_STORED = 0
ENCODING_LZMA2 = 1
_ENCODING_NAMES = {ENCODING_STORED: "stored", ENCODING_LZMA2: "lzma2"}

# Fixed so output is byte-identical run to run. Floats barely compress, so a higher preset buys nothing.
LZMA_PRESET = 6
_LZMA_MIN_DICT = 4096  # liblzma's minimum
_LZMA_MAX_DICT = 8 << 20  # preset 6's own dictionary; keeps the encoder near 100 MB

MAX_VARINT_BYTES = 10  # ceil(64 / 7): every value below 2^64

# --- limits (docs/FORMAT.md, "Limits"); checked on write and, before any allocation, on read ------------

MAX_TENSORS = 65536
MAX_NDIM = 8
MAX_ELEMENTS = 2**32  # per tensor; also the cap on each single dimension
MAX_NAME_BYTES = 4096  # tensor names, UTF-8
MAX_ID_BYTES = 32  # codec ids, parameter names, section names (ASCII)
MAX_PARAMS = 64  # 1.x files, which list parameters by name
MAX_SECTIONS = 16  # 1.x files, which list sections by name
MAX_METADATA_ENTRIES = 1024
MAX_METADATA_KEY_BYTES = 256
MAX_METADATA_VALUE_BYTES = 65535
MAX_GRAPH_BYTES = 2**31  # protobuf's own limit for one ONNX model
MAX_CODEBOOK_ENTRIES = 2**16 - 1  # Bloomier answers are t <= 16 bits and one value means "zero"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_CODEC_ID = re.compile(r"[a-z0-9][a-z0-9-]*")
_FIELD_ID = re.compile(r"[a-z_][a-z0-9_]*")


class _Invalid(Exception):
    """A problem found by a check shared by reader and writer; each side words the final message."""

    kind = "corrupt"


class _Unsupported(_Invalid):
    """Well-formed, but uses something (a codec, a dtype tag) that a newer weightless may know."""

    kind = "unsupported"


# --- element types -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DtypeInfo:
    """One tensor element type: its tag in the file (ONNX TensorProto numbering) and its numpy dtype."""

    tag: int
    numpy: str  # little-endian numpy dtype string; bfloat16 travels as its 16-bit pattern

    @property
    def itemsize(self) -> int:
        return np.dtype(self.numpy).itemsize


DTYPES: dict[str, DtypeInfo] = {
    "float32": DtypeInfo(1, "<f4"),
    "float16": DtypeInfo(10, "<f2"),
    "float64": DtypeInfo(11, "<f8"),
    "bfloat16": DtypeInfo(16, "<u2"),
}
_DTYPE_BY_TAG = {info.tag: name for name, info in DTYPES.items()}


def _dtype_info(dtype: str) -> DtypeInfo:
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise _Invalid(f"unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPES))})") from None


# --- codecs --------------------------------------------------------------------------------------------------

SizeCheck = Callable[[int, int, Mapping[str, int]], None]


@dataclass(frozen=True)
class CodecSpec:
    """What the container enforces for one codec id; the codec module validates the meaning of its params.

    ``tag`` is the codec's number in a 2.x file (None: not a tensor codec). ``sections`` are exactly the
    payload names a record carries and ``params`` exactly its parameter names, each in byte order, which is
    the order a 2.x file stores them in (values only). Only sections in ``compressible`` may be stored
    LZMA2-compressed (the writer does so when it saves bytes). ``check_sizes(n_elements, itemsize,
    decoded_sizes)`` rejects section sizes that cannot belong to the tensor; it runs before any payload is
    read, so it is what bounds decompression.
    """

    tag: int | None
    sections: tuple[str, ...]
    compressible: frozenset[str]
    params: tuple[str, ...]
    check_sizes: SizeCheck


def _raw_sizes(n_elements: int, itemsize: int, sizes: Mapping[str, int]) -> None:
    if sizes["data"] != n_elements * itemsize:
        raise _Invalid(f"raw data is {sizes['data']} bytes, expected {n_elements} x {itemsize}")


def _bloomier_sizes(n_elements: int, itemsize: int, sizes: Mapping[str, int]) -> None:
    entries, leftover = divmod(sizes["codebook"], itemsize)
    if leftover:
        raise _Invalid(f"codebook is {sizes['codebook']} bytes, not a multiple of {itemsize}")
    if entries > MAX_CODEBOOK_ENTRIES:
        raise _Invalid(f"codebook has {entries} entries (limit {MAX_CODEBOOK_ENTRIES})")


def _check_at_most(sizes: Mapping[str, int], name: str, limit: int) -> None:
    if sizes[name] > limit:
        raise _Invalid(f"{name} is {sizes[name]} bytes (limit {limit} for this tensor)")


# Caps of the exact codecs (docs/codecs/exact.md): tables are bounded by their alphabets, streams by
# the most a valid encoder can write per position (ANS: < 24 bits per coded symbol plus raw bits).
MAX_SPARSE_MODEL_BYTES = 2**17
MAX_DENSE_MODEL_BYTES = 2**16 + 4
MAX_HUFFMAN_LENGTHS_BYTES = 2**16 + 2**8 + 8


def _sparse_sizes(n_elements: int, itemsize: int, sizes: Mapping[str, int]) -> None:
    _bloomier_sizes(n_elements, itemsize, sizes)
    _check_at_most(sizes, "model", MAX_SPARSE_MODEL_BYTES)
    _check_at_most(sizes, "stream", 32 * n_elements + 64)


def _dense_sizes(n_elements: int, itemsize: int, sizes: Mapping[str, int]) -> None:
    _bloomier_sizes(n_elements, itemsize, sizes)
    _check_at_most(sizes, "model", MAX_DENSE_MODEL_BYTES)
    _check_at_most(sizes, "stream", 4 * n_elements + 64)


def _csr_huffman_sizes(n_elements: int, itemsize: int, sizes: Mapping[str, int]) -> None:
    _bloomier_sizes(n_elements, itemsize, sizes)
    _check_at_most(sizes, "lengths", MAX_HUFFMAN_LENGTHS_BYTES)
    for stream in ("gaps", "ids"):  # at most one entry per position, at most 16 bits each
        _check_at_most(sizes, stream, 2 * n_elements)


def _within(sizes: Mapping[str, int], limits: Mapping[str, int]) -> None:
    for name, limit in limits.items():
        if sizes[name] > limit:
            raise _Invalid(f"{name} is {sizes[name]} bytes (at most {limit} for this tensor)")


# dpred, outlier and rowwise (docs/codecs/{dpred,outlier,rowwise}.md): each section's most for n values.
# Rice-coded positions take at most n bits of unary part, and their low bits at most 16 bits each.
def _dpred_sizes(n_elements: int, itemsize: int, sizes: Mapping[str, int]) -> None:
    _within(sizes, {"headers": n_elements // 32 + 2, "scales": max(n_elements, 1) * itemsize,
                    "values": 2 * n_elements})


def _outlier_sizes(n_elements: int, itemsize: int, sizes: Mapping[str, int]) -> None:
    _within(sizes, {"codebook": min(n_elements, MAX_CODEBOOK_ENTRIES) * itemsize, "ids": 2 * n_elements,
                    "gaps_high": n_elements // 8 + 1, "gaps_low": 2 * n_elements,
                    "outliers": n_elements * itemsize})


def _rowwise_sizes(n_elements: int, itemsize: int, sizes: Mapping[str, int]) -> None:
    _within(sizes, {"biases": 2 * n_elements, "scales": 2 * n_elements, "ints": n_elements,
                    "exc_high": n_elements // 8 + 1, "exc_low": 2 * n_elements,
                    "exc_values": n_elements * itemsize})


def _graph_sizes(n_elements: int, itemsize: int, sizes: Mapping[str, int]) -> None:
    if sizes["graph"] > MAX_GRAPH_BYTES:
        raise _Invalid(f"graph is {sizes['graph']} bytes (limit {MAX_GRAPH_BYTES})")


# A new codec is a new row here (the next free tag) plus a row in docs/FORMAT.md's codec table and a minor
# version bump. A row's tag, params and sections are frozen once released: a 2.x file stores parameter values
# and section entries by position in these tuples. Bloomier's names repeat bloomier.PARAM_NAMES (a test
# checks they agree) rather than import them, so that editing the codec can never silently move the format.
CODECS: dict[str, CodecSpec] = {
    "raw": CodecSpec(0, ("data",), frozenset({"data"}), (), _raw_sizes),
    "bloomier": CodecSpec(
        1, ("cells", "codebook"), frozenset(),
        ("cells", "keys", "layout", "n_positions", "seed", "segment_count", "segment_length", "t"),
        _bloomier_sizes,
    ),
    "sparse": CodecSpec(
        2, ("codebook", "model", "stream"), frozenset({"model"}),
        ("class_bits", "classes", "dead_cols", "dead_rows", "mode", "n"), _sparse_sizes,
    ),
    "csr-huffman": CodecSpec(
        3, ("codebook", "gaps", "ids", "lengths"), frozenset({"lengths"}), ("bits", "entries"), _csr_huffman_sizes,
    ),
    "dense": CodecSpec(4, ("codebook", "model", "stream"), frozenset({"model"}), (), _dense_sizes),
    "dpred": CodecSpec(5, ("headers", "scales", "values"), frozenset({"headers", "values"}),
                       ("bits", "per_channel"), _dpred_sizes),
    "outlier": CodecSpec(6, ("codebook", "gaps_high", "gaps_low", "ids", "outliers"),
                         frozenset({"gaps_high", "gaps_low", "ids", "outliers"}),
                         ("k", "outliers", "rice_k", "wide"), _outlier_sizes),
    "rowwise": CodecSpec(7, ("biases", "exc_high", "exc_low", "exc_values", "ints", "scales"),
                         frozenset({"biases", "exc_high", "exc_low", "exc_values", "ints", "scales"}),
                         ("bits", "exceptions", "rice_k"), _rowwise_sizes),
}
_CODEC_BY_TAG = {spec.tag: codec for codec, spec in CODECS.items()}
_BLOB_SECTIONS = CodecSpec(None, ("graph",), frozenset({"graph"}), (), _graph_sizes)


def _codec_spec(codec: str) -> CodecSpec:
    spec = CODECS.get(codec)
    if spec is None:
        raise _Unsupported(
            f"unknown codec {codec!r} (this weightless knows {', '.join(sorted(CODECS))}); "
            "it may need a newer weightless"
        )
    return spec


# --- the in-memory model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRecord:
    """One encoded tensor. ``sections`` hold the codec's payloads *decoded* (the container compresses)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    codec: str
    params: dict[str, int] = field(default_factory=dict)
    sections: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def n_elements(self) -> int:
        return _product(self.shape)


@dataclass(frozen=True)
class Blob:
    """A whole ``.wl`` file: the stripped ONNX graph, the encoded tensors (in order) and provenance."""

    graph: bytes
    tensors: list[TensorRecord] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def _product(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


# --- array helpers -------------------------------------------------------------------------------------------


def _as_storable(array: np.ndarray) -> np.ndarray:
    """ml_dtypes' bfloat16 (what onnx hands out) becomes its 16-bit pattern; everything else is unchanged."""
    array = np.asarray(array)
    return array.view(np.uint16) if array.dtype.name == "bfloat16" else array


def dtype_of(array: np.ndarray) -> str:
    """The container dtype tag for a numpy array (uint16 is ambiguous: pass ``dtype="bfloat16"`` instead)."""
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        return "bfloat16"
    floats = {2: "float16", 4: "float32", 8: "float64"}
    if array.dtype.kind == "f" and array.dtype.itemsize in floats:
        return floats[array.dtype.itemsize]
    raise ValueError(f"cannot store numpy dtype {array.dtype} (known: {', '.join(sorted(DTYPES))})")


def array_to_bytes(array: np.ndarray, dtype: str) -> bytes:
    """Little-endian, C-order bytes of ``array`` as element type ``dtype`` (bfloat16: its uint16 patterns)."""
    try:
        want = np.dtype(_dtype_info(dtype).numpy)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None
    values = _as_storable(array)
    if values.dtype.kind != want.kind or values.dtype.itemsize != want.itemsize:
        raise ValueError(f"array of {values.dtype} cannot be stored as {dtype}")
    return np.ascontiguousarray(values, dtype=want).tobytes()


def bytes_to_array(data: bytes, dtype: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read-only view of ``data`` as ``dtype`` (bfloat16 comes back as uint16 bit patterns)."""
    try:
        array = np.frombuffer(data, dtype=_dtype_info(dtype).numpy)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None
    return array if shape is None else array.reshape(shape)


def raw_record(name: str, array: np.ndarray, dtype: str | None = None) -> TensorRecord:
    """A lossless ``raw`` record for ``array``; ``dtype`` defaults to the array's own (see :func:`dtype_of`)."""
    dtype = dtype or dtype_of(array)
    shape = tuple(np.shape(array))
    return TensorRecord(name, shape, dtype, "raw", {}, {"data": array_to_bytes(array, dtype)})


def raw_array(record: TensorRecord) -> np.ndarray:
    """The tensor of a ``raw`` record, read-only, in its dtype (bfloat16 as uint16 bit patterns)."""
    if record.codec != "raw":
        raise ValueError(f"tensor {record.name!r} uses codec {record.codec!r}, not 'raw'")
    return bytes_to_array(record.sections["data"], record.dtype, record.shape)


# --- checks shared by writer and reader ----------------------------------------------------------------------


def _show(name: str) -> str:
    """A name for a one-line message: quoted, escaped, and short."""
    text = repr(name)
    return text if len(text) <= 60 else text[:56] + "...'"


def _check_count(what: str, count: int, limit: int) -> None:
    if count > limit:
        raise _Invalid(f"{count} {what} (limit {limit})")


def _check_identifier(kind: str, text: str, pattern: re.Pattern[str]) -> None:
    if not isinstance(text, str) or len(text) > MAX_ID_BYTES or not pattern.fullmatch(text):
        raise _Invalid(
            f"invalid {kind} {_show(str(text))} (expected {pattern.pattern}, <= {MAX_ID_BYTES} bytes)"
        )


def _check_shape(shape: tuple[int, ...]) -> int:
    """Validate dims one by one so a hostile shape is refused before its product is ever used."""
    _check_count("dimensions", len(shape), MAX_NDIM)
    total = 1
    for dim in shape:
        if dim < 0 or dim > MAX_ELEMENTS:
            raise _Invalid(f"dimension {dim} out of range 0..{MAX_ELEMENTS}")
        total *= dim
    if total > MAX_ELEMENTS:
        raise _Invalid(f"shape {shape} has {total} elements (limit {MAX_ELEMENTS})")
    return total


def _check_params(spec: CodecSpec, params: Mapping[str, int]) -> None:
    _check_count("params", len(params), MAX_PARAMS)
    for key, value in params.items():
        _check_identifier("param name", key, _FIELD_ID)
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise _Invalid(f"param {key!r} is {type(value).__name__}, expected int")
        if not _INT64_MIN <= int(value) <= _INT64_MAX:
            raise _Invalid(f"param {key!r} = {value} does not fit in int64")
    if sorted(params) != list(spec.params):
        raise _Invalid(f"params {sorted(params)} do not match the codec's {list(spec.params)}")


def _check_section_names(spec: CodecSpec, names: list[str]) -> None:
    if sorted(names) != list(spec.sections):
        raise _Invalid(f"sections {sorted(names)} do not match the expected {list(spec.sections)}")


def _check_metadata_entry(key: bytes, value: bytes) -> None:
    if not 1 <= len(key) <= MAX_METADATA_KEY_BYTES:
        raise _Invalid(f"metadata key of {len(key)} bytes (allowed 1..{MAX_METADATA_KEY_BYTES})")
    if len(value) > MAX_METADATA_VALUE_BYTES:
        raise _Invalid(f"metadata value of {len(value)} bytes (limit {MAX_METADATA_VALUE_BYTES})")


def _check_name_bytes(encoded: bytes) -> None:
    if not 1 <= len(encoded) <= MAX_NAME_BYTES:
        raise _Invalid(f"tensor name of {len(encoded)} bytes (allowed 1..{MAX_NAME_BYTES})")


def _check_encoding(spec: CodecSpec, name: str, encoding: int, stored_len: int, decoded_len: int,
                    major: int) -> None:
    where = f"section {name!r}"
    if encoding == ENCODING_STORED:
        if stored_len != decoded_len:
            raise _Invalid(f"stored {where} declares {decoded_len} decoded bytes but holds {stored_len}")
    elif encoding == ENCODING_LZMA2:
        if name not in spec.compressible:
            raise _Invalid(f"{where} may not be compressed")
        if stored_len == 0:
            raise _Invalid(f"compressed {where} is empty")
        # 2.x: compressed only when that saves bytes, as the writer does (1.x did not say so)
        if major >= 2 and stored_len >= decoded_len:
            raise _Invalid(f"compressed {where} of {stored_len} bytes is not smaller than its {decoded_len}")
    else:
        raise _Invalid(f"{where} has unknown encoding {encoding}")


# --- varints (format 2.x) ------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    """Unsigned LEB128, minimal: 7 bits per byte, low groups first, high bit set on all but the last byte."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _zigzag(value: int) -> int:
    """int64 -> uint64 with small magnitudes small: 0, -1, 1, -2 ... become 0, 1, 2, 3 ..."""
    return (value << 1) ^ (value >> 63)


def _unzigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def _text(encoded: bytes) -> bytes:
    return _varint(len(encoded)) + encoded


# --- writer --------------------------------------------------------------------------------------------------


def _lzma_dict_size(decoded_len: int) -> int:
    """Derived from the decoded length on both sides, so a file can never ask the reader for a big dictionary."""
    return min(max(decoded_len, _LZMA_MIN_DICT), _LZMA_MAX_DICT)


def _encode_payload(data: bytes, compressible: bool) -> tuple[int, bytes]:
    if compressible and data:
        filters = [{"id": lzma.FILTER_LZMA2, "preset": LZMA_PRESET, "dict_size": _lzma_dict_size(len(data))}]
        packed = lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)
        if len(packed) < len(data):
            return ENCODING_LZMA2, packed
    return ENCODING_STORED, data


def _section_table(spec: CodecSpec, sections: Mapping[str, bytes]) -> tuple[bytes, list[bytes]]:
    """The table for the record body and the payloads that follow the record, in the codec's section order."""
    table = []
    payloads = []
    for name in spec.sections:
        decoded = sections[name]
        encoding, stored = _encode_payload(decoded, name in spec.compressible)
        table += [_varint(encoding), _varint(len(stored))]
        if encoding == ENCODING_LZMA2:  # a stored section's decoded length is its stored length
            table.append(_varint(len(decoded)))
        table.append(struct.pack("<I", zlib.crc32(stored)))
        payloads.append(stored)
    return b"".join(table), payloads


def _frame(body: bytes) -> bytes:
    return _varint(len(body)) + body + struct.pack("<I", zlib.crc32(body))


def _tensor_parts(record: TensorRecord) -> list[bytes]:
    """The framed tensor record, then its payloads."""
    name = record.name.encode("utf-8") if isinstance(record.name, str) else b""
    _check_name_bytes(name)
    info = _dtype_info(record.dtype)
    n_elements = _check_shape(record.shape)
    _check_identifier("codec id", record.codec, _CODEC_ID)
    spec = _codec_spec(record.codec)
    _check_params(spec, record.params)
    sections = {name: bytes(data) for name, data in record.sections.items()}  # no copy for bytes
    _check_section_names(spec, list(sections))
    spec.check_sizes(n_elements, info.itemsize, {name: len(data) for name, data in sections.items()})
    body = [_text(name), _varint(info.tag), _varint(len(record.shape)), *map(_varint, record.shape)]
    body.append(_varint(spec.tag))
    body += [_varint(_zigzag(int(record.params[key]))) for key in spec.params]
    table, payloads = _section_table(spec, sections)
    return [_frame(b"".join(body) + table), *payloads]


def _file_parts(blob: Blob, metadata: Mapping[str, str]) -> list[bytes]:
    """The framed file record, then the graph payload."""
    _check_count("tensors", len(blob.tensors), MAX_TENSORS)
    _check_count("metadata entries", len(metadata), MAX_METADATA_ENTRIES)
    entries = sorted((key.encode("utf-8"), value.encode("utf-8")) for key, value in metadata.items())
    body = [_varint(len(blob.tensors)), _varint(len(entries))]
    for key, value in entries:
        _check_metadata_entry(key, value)
        body += [_text(key), _text(value)]
    graph = bytes(blob.graph)
    _BLOB_SECTIONS.check_sizes(0, 1, {"graph": len(graph)})
    table, payloads = _section_table(_BLOB_SECTIONS, {"graph": graph})
    return [_frame(b"".join(body) + table), *payloads]


def write_blob(blob: Blob) -> bytes:
    """Serialise ``blob`` in format 2.0; byte-identical for equal input. Adds ``writer`` metadata unless set.

    Raises BadInputError (one line, naming the tensor) when something exceeds a documented limit.
    """
    metadata = {WRITER_KEY: f"weightless {__version__}", **blob.metadata}
    parts: list[bytes] = []
    seen: set[str] = set()
    try:
        parts += _file_parts(blob, metadata)
        for index, record in enumerate(blob.tensors):
            where = f"tensor {index} {_show(str(record.name))}"
            if record.name in seen:
                raise _Invalid(f"{where}: duplicate tensor name")
            seen.add(record.name)
            try:
                parts += _tensor_parts(record)
            except _Invalid as exc:
                raise _Invalid(f"{where}: {exc}") from None
    except (_Invalid, UnicodeEncodeError) as exc:
        raise BadInputError(f"cannot write .wl blob: {exc}") from None
    file_length = PREAMBLE_SIZE + sum(map(len, parts)) + TRAILER_SIZE
    head = _PREAMBLE.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, file_length)
    body = b"".join([head, struct.pack("<I", zlib.crc32(head)), *parts])
    return body + struct.pack("<I", zlib.crc32(body))


# --- reader --------------------------------------------------------------------------------------------------

_U8, _U16, _U32, _U64, _I64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<Q", "<q"))


class _Located(_Invalid):
    """An :class:`_Invalid` whose message already says where (so enclosing contexts leave it alone)."""


def _named(value: int, names: Mapping[int, str] | None) -> str:
    return f"{value} ({names[value]})" if names and value in names else str(value)


class _Cursor:
    """Bounds-checked reads from ``buf[pos:end]`` of a file of format ``major``.

    The field readers take each integer's 1.x width (``legacy``); in 2.x every such field is a varint, so one
    parser reads both. With a ``trace`` list it also records (offset, bytes, label, value) for every field,
    labels prefixed by ``context`` (e.g. ``tensor 0 'fc.weight'``), which is what :func:`describe_layout` prints.
    """

    def __init__(self, buf: memoryview, pos: int, end: int, trace: list | None, context: str = "",
                 major: int = FORMAT_MAJOR) -> None:
        self.buf, self.pos, self.end, self.trace, self.context, self.major = buf, pos, end, trace, context, major

    def remaining(self) -> int:
        return self.end - self.pos

    def sub(self, start: int, end: int) -> _Cursor:
        """A cursor over ``buf[start:end]`` with this one's trace, context and version."""
        return _Cursor(self.buf, start, end, self.trace, self.context, self.major)

    def _record(self, offset: int, label: str, shown: str) -> None:
        if self.trace is not None:
            raw = bytes(self.buf[offset : self.pos])
            self.trace.append((offset, raw, f"{self.context} {label}" if self.context else label, shown))

    def take(self, size: int, label: str, shown: str | None = None) -> memoryview:
        if size > self.remaining():
            raise _Invalid(f"{label} needs {size} bytes at offset {self.pos}, only {self.remaining()} remain")
        view = self.buf[self.pos : self.pos + size]
        self.pos += size
        if shown is not None:
            self._record(self.pos - size, label, shown)
        return view

    def number(self, form: struct.Struct, label: str, as_hex: bool = False,
               names: Mapping[int, str] | None = None) -> int:
        """A fixed-width little-endian integer (CRCs in every version; most fields in 1.x)."""
        offset = self.pos
        (value,) = form.unpack(self.take(form.size, label))
        self._record(offset, label, f"0x{value:08x}" if as_hex else _named(value, names))
        return value

    def _varint(self, label: str) -> int:
        """Unsigned LEB128; refuses a non-minimal encoding (so the bytes stay canonical) and values >= 2^64."""
        value = 0
        for index in range(MAX_VARINT_BYTES):
            if self.pos >= self.end:
                raise _Invalid(f"{label} runs past the end of the record at offset {self.pos}")
            byte = self.buf[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << (7 * index)
            if byte < 0x80:
                if byte == 0 and index:
                    raise _Invalid(f"{label} is not minimally encoded (offset {self.pos - 1})")
                if value >> 64:
                    raise _Invalid(f"{label} does not fit in 64 bits")
                return value
        raise _Invalid(f"{label} is longer than {MAX_VARINT_BYTES} bytes")

    def varint(self, label: str, names: Mapping[int, str] | None = None) -> int:
        offset = self.pos
        value = self._varint(label)
        self._record(offset, label, _named(value, names))
        return value

    def uint(self, label: str, legacy: struct.Struct, names: Mapping[int, str] | None = None) -> int:
        """A non-negative integer field: a varint in 2.x, ``legacy`` (fixed width) in 1.x."""
        return self.number(legacy, label, names=names) if self.major == 1 else self.varint(label, names)

    def sint(self, label: str) -> int:
        """A signed 64-bit field: a zigzag varint in 2.x, an i64 in 1.x."""
        if self.major == 1:
            return self.number(_I64, label)
        offset = self.pos
        value = _unzigzag(self._varint(label))
        self._record(offset, label, str(value))
        return value

    def text(self, label: str, legacy: struct.Struct, ascii_only: bool, limit: int) -> str:
        """A length-prefixed string; its length is checked against ``limit`` before anything is sliced."""
        size = self.uint(f"{label} length", legacy)
        if size > limit:
            raise _Invalid(f"{label} of {size} bytes (limit {limit})")
        raw = bytes(self.take(size, label))
        try:
            text = raw.decode("ascii" if ascii_only else "utf-8")
        except UnicodeDecodeError:
            raise _Invalid(f"{label} is not valid {'ASCII' if ascii_only else 'UTF-8'}") from None
        self._record(self.pos - size, label, _show(text))
        return text

    def done(self) -> None:
        if self.pos != self.end:
            raise _Invalid(f"{self.end - self.pos} unexpected bytes at the end of the record")


@contextlib.contextmanager
def _located(where: str, *cursors: _Cursor) -> Iterator[None]:
    """Prefix problems found inside with ``where`` (once), and label traced fields with it."""
    saved = [cursor.context for cursor in cursors]
    for cursor in cursors:
        cursor.context = where
    try:
        yield
    except _Located:
        raise
    except _Invalid as exc:
        located = _Located(f"{where}: {exc}")
        located.kind = exc.kind
        raise located from None
    finally:
        for cursor, context in zip(cursors, saved, strict=True):
            cursor.context = context


@dataclass(frozen=True)
class _SectionEntry:
    name: str
    encoding: int
    stored_len: int
    decoded_len: int
    crc: int


def _read_record(cur: _Cursor) -> _Cursor:
    """Check a record's frame and CRC; return a cursor over its body (whose fields are then parsed)."""
    body_len = cur.uint("body length", _U32)
    start = cur.pos
    body = cur.take(body_len, "body")
    stored_crc = cur.number(_U32, "crc32", as_hex=True)
    if zlib.crc32(body) != stored_crc:
        raise _Invalid("checksum mismatch")
    return cur.sub(start, start + body_len)


def _read_section_entry(body: _Cursor, spec: CodecSpec, name: str) -> _SectionEntry:
    """One entry after its name: 1.x always stores the decoded length, 2.x only for LZMA2."""
    where = f"section {name!r}"
    encoding = body.uint(f"{where} encoding", _U8, names=_ENCODING_NAMES)
    if encoding not in _ENCODING_NAMES:
        raise _Invalid(f"{where} has unknown encoding {encoding}")
    stored_len = body.uint(f"{where} stored length", _U64)
    if body.major == 1 or encoding == ENCODING_LZMA2:
        decoded_len = body.uint(f"{where} decoded length", _U64)
    else:
        decoded_len = stored_len
    crc = body.number(_U32, f"{where} crc32", as_hex=True)
    _check_encoding(spec, name, encoding, stored_len, decoded_len, body.major)
    return _SectionEntry(name, encoding, stored_len, decoded_len, crc)


def _read_section_table(body: _Cursor, spec: CodecSpec) -> list[_SectionEntry]:
    if body.major >= 2:  # no count and no names: exactly the codec's sections, in its order
        return [_read_section_entry(body, spec, name) for name in spec.sections]
    count = body.number(_U8, "section count")
    _check_count("sections", count, MAX_SECTIONS)
    entries: list[_SectionEntry] = []
    for index in range(count):
        name = body.text(f"section {index} name", _U8, ascii_only=True, limit=MAX_ID_BYTES)
        _check_identifier("section name", name, _FIELD_ID)
        if entries and name <= entries[-1].name:
            raise _Invalid("sections not in strictly increasing name order")
        entries.append(_read_section_entry(body, spec, name))
    _check_section_names(spec, [entry.name for entry in entries])
    return entries


def _decode_lzma(stored: memoryview, decoded_len: int, where: str) -> bytes:
    # One byte of headroom lets the decoder reach the end marker and shows an over-long stream as such;
    # CPython grows its output buffer as data arrives, so nothing near decoded_len is allocated up front.
    filters = [{"id": lzma.FILTER_LZMA2, "dict_size": _lzma_dict_size(decoded_len)}]
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=filters)
    try:
        data = decoder.decompress(stored, max_length=decoded_len + 1)
    except lzma.LZMAError as exc:
        raise _Invalid(f"{where} does not decompress ({exc})") from None
    if len(data) != decoded_len or not decoder.eof or decoder.unused_data:
        raise _Invalid(f"{where} does not decompress to exactly its declared {decoded_len} bytes")
    return data


def _read_payloads(cur: _Cursor, entries: list[_SectionEntry]) -> dict[str, bytes]:
    if sum(entry.stored_len for entry in entries) > cur.remaining() - TRAILER_SIZE:
        raise _Invalid("sections run past the end of the file")
    sections: dict[str, bytes] = {}
    for entry in entries:
        where = f"section {entry.name!r}"
        plural = "" if entry.stored_len == 1 else "s"
        shown = f"{_ENCODING_NAMES[entry.encoding]} payload, {entry.stored_len} byte{plural}"
        stored = cur.take(entry.stored_len, where, shown=shown)
        if zlib.crc32(stored) != entry.crc:
            raise _Invalid(f"{where} checksum mismatch")
        if entry.encoding == ENCODING_LZMA2:
            sections[entry.name] = _decode_lzma(stored, entry.decoded_len, where)
        else:
            sections[entry.name] = bytes(stored)
    return sections


def _read_preamble(buf: memoryview, trace: list | None) -> tuple[int, int]:
    """Check magic, preamble CRC, version and length, in that order; return (major, file length)."""
    if len(buf) < len(MAGIC) or bytes(buf[: len(MAGIC)]) != MAGIC:
        raise BadInputError("not a .wl blob (bad magic bytes)")
    if len(buf) < PREAMBLE_SIZE:
        raise BadInputError(
            f"truncated .wl blob: {len(buf)} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble"
        )
    cur = _Cursor(buf, 0, PREAMBLE_SIZE, trace)
    cur.take(len(MAGIC), "magic", shown="")
    major = cur.number(_U16, "format major version")
    minor = cur.number(_U16, "format minor version")
    file_length = cur.number(_U64, "file length")
    stored_crc = cur.number(_U32, "preamble crc32", as_hex=True)
    if zlib.crc32(buf[: _PREAMBLE.size]) != stored_crc:
        raise BadInputError("corrupt .wl blob: preamble checksum mismatch")
    if major != FORMAT_MAJOR and major not in OLDER_MAJORS:
        readable = ", ".join(f"{known}.x" for known in (FORMAT_MAJOR, *OLDER_MAJORS))
        newer = "is newer than" if major > FORMAT_MAJOR else "predates"
        raise BadInputError(
            f".wl format version {major}.{minor} {newer} what this weightless reads ({readable})"
            + ("; upgrade weightless" if major > FORMAT_MAJOR else "")
        )
    if file_length != len(buf):
        problem = "truncated" if file_length > len(buf) else "trailing bytes after"
        raise BadInputError(f"{problem} .wl blob: header declares {file_length} bytes, got {len(buf)}")
    return major, file_length


def _read_metadata(body: _Cursor) -> dict[str, str]:
    count = body.uint("metadata entry count", _U16)
    _check_count("metadata entries", count, MAX_METADATA_ENTRIES)
    metadata: dict[str, str] = {}
    previous = b""
    for index in range(count):
        key = body.text(f"metadata {index} key", _U16, ascii_only=False, limit=MAX_METADATA_KEY_BYTES)
        value = body.text(f"metadata {index} value", _U16, ascii_only=False, limit=MAX_METADATA_VALUE_BYTES)
        encoded = key.encode("utf-8")
        _check_metadata_entry(encoded, value.encode("utf-8"))
        if index and encoded <= previous:
            raise _Invalid("metadata keys not in strictly increasing order")
        previous = encoded
        metadata[key] = value
    return metadata


def _read_file_record(cur: _Cursor) -> tuple[int, dict[str, str], bytes]:
    with _located("file record", cur):
        body = _read_record(cur)
        tensor_count = body.uint("tensor count", _U32)
        _check_count("tensors", tensor_count, MAX_TENSORS)
        metadata = _read_metadata(body)
        entries = _read_section_table(body, _BLOB_SECTIONS)
        body.done()
        _BLOB_SECTIONS.check_sizes(0, 1, {entry.name: entry.decoded_len for entry in entries})
        graph = _read_payloads(cur, entries)["graph"]
    return tensor_count, metadata, graph


def _read_codec(body: _Cursor) -> str:
    """A 2.x tag, or a 1.x codec id (a string)."""
    if body.major >= 2:
        tag = body.varint("codec", names=_CODEC_BY_TAG)
        if tag not in _CODEC_BY_TAG:
            raise _Unsupported(
                f"unknown codec tag {tag} (this weightless knows 0..{max(_CODEC_BY_TAG)}); "
                "it may need a newer weightless"
            )
        return _CODEC_BY_TAG[tag]
    codec = body.text("codec id", _U8, ascii_only=True, limit=MAX_ID_BYTES)
    _check_identifier("codec id", codec, _CODEC_ID)
    _codec_spec(codec)
    return codec


def _read_params(body: _Cursor, spec: CodecSpec) -> dict[str, int]:
    if body.major >= 2:  # values only, in the codec's parameter order
        return {key: body.sint(f"param {key!r}") for key in spec.params}
    count = body.number(_U8, "param count")
    _check_count("params", count, MAX_PARAMS)
    params: dict[str, int] = {}
    for index in range(count):
        key = body.text(f"param {index} name", _U8, ascii_only=True, limit=MAX_ID_BYTES)
        _check_identifier("param name", key, _FIELD_ID)
        if params and key <= list(params)[-1]:
            raise _Invalid("params not in strictly increasing name order")
        params[key] = body.number(_I64, f"param {key!r}")
    _check_params(spec, params)
    return params


def _read_tensor_fields(cur: _Cursor, body: _Cursor, name: str) -> TensorRecord:
    tag = body.uint("dtype tag", _U8, names=_DTYPE_BY_TAG)
    if tag not in _DTYPE_BY_TAG:
        raise _Unsupported(f"unknown dtype tag {tag} (known: {sorted(_DTYPE_BY_TAG)})")
    dtype = _DTYPE_BY_TAG[tag]
    ndim = body.uint("ndim", _U8)
    _check_count("dimensions", ndim, MAX_NDIM)
    shape = tuple(body.uint(f"dim {axis}", _U64) for axis in range(ndim))
    n_elements = _check_shape(shape)
    codec = _read_codec(body)
    spec = CODECS[codec]
    params = _read_params(body, spec)
    entries = _read_section_table(body, spec)
    body.done()
    spec.check_sizes(n_elements, DTYPES[dtype].itemsize, {entry.name: entry.decoded_len for entry in entries})
    sections = _read_payloads(cur, entries)
    return TensorRecord(name, shape, dtype, codec, params, sections)


def _read_tensor(cur: _Cursor, index: int) -> TensorRecord:
    with _located(f"tensor {index}", cur):
        body = _read_record(cur)
        name = body.text("name", _U16, ascii_only=False, limit=MAX_NAME_BYTES)
        _check_name_bytes(name.encode("utf-8"))
    with _located(f"tensor {index} {_show(name)}", cur, body):
        return _read_tensor_fields(cur, body, name)


def _parse(buf: memoryview, trace: list | None) -> Blob:
    major, file_length = _read_preamble(buf, trace)
    cur = _Cursor(buf, PREAMBLE_SIZE, file_length, trace, major=major)
    try:
        tensor_count, metadata, graph = _read_file_record(cur)
        tensors: list[TensorRecord] = []
        seen: set[str] = set()
        for index in range(tensor_count):
            tensors.append(_read_tensor(cur, index))
            if tensors[-1].name in seen:
                raise _Invalid(f"tensor {index} {_show(tensors[-1].name)}: duplicate tensor name")
            seen.add(tensors[-1].name)
        if cur.remaining() != TRAILER_SIZE:
            raise _Invalid(f"{cur.remaining() - TRAILER_SIZE} unexpected bytes before the trailer")
        stored_crc = cur.number(_U32, "file crc32", as_hex=True)
    except _Invalid as exc:
        raise BadInputError(f"{exc.kind} .wl blob: {exc}") from None
    if zlib.crc32(buf[: file_length - TRAILER_SIZE]) != stored_crc:
        raise BadInputError("corrupt .wl blob: file checksum mismatch")
    return Blob(graph, tensors, metadata)


def read_blob(data: bytes, source: str | os.PathLike | None = None) -> Blob:
    """Parse and fully validate a blob (format 2.x, or 1.x). Any problem raises BadInputError with one line
    (prefixed by ``source``)."""
    try:
        return _parse(memoryview(data).cast("B"), trace=None)
    except BadInputError as exc:
        if source is None:
            raise
        raise BadInputError(str(exc), source) from None


def describe_layout(data: bytes, max_bytes: int | None = None) -> str:
    """An annotated hex listing of a valid blob, field by field (docs/FORMAT.md's worked example is one).

    ``max_bytes`` shortens long fields (payloads) to that many bytes; None shows everything.
    """
    buf = memoryview(data).cast("B")
    trace: list[tuple[int, bytes, str, str]] = []
    _parse(buf, trace)
    lines = []
    for offset, raw, label, shown in sorted(trace, key=lambda span: span[0]):
        text = f"{label} = {shown}" if shown else label
        visible = raw if max_bytes is None else raw[:max_bytes]
        rows = [visible[i : i + 16] for i in range(0, len(visible), 16)] or [b""]
        for row_index, row in enumerate(rows):
            hex_part = row.hex(" ").ljust(47)
            lines.append(
                f"{offset + 16 * row_index:06x}  {hex_part}  {text if row_index == 0 else ''}".rstrip()
            )
        if len(visible) < len(raw):
            lines.append(f"{'':6}  ... {len(raw) - len(visible)} more bytes")
    return "\n".join(lines) + "\n"


# --- files ---------------------------------------------------------------------------------------------------


def load_blob(path: str | os.PathLike) -> Blob:
    """Read and validate the ``.wl`` file at ``path``; errors name the file."""
    return read_blob(read_input_bytes(path), source=Path(path))


def save_blob(path: str | os.PathLike, blob: Blob) -> int:
    """Write ``blob`` to ``path`` atomically; return the file size in bytes."""
    data = write_blob(blob)
    write_bytes_atomic(path, data)
    return len(data)
