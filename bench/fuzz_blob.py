"""Fuzz the .wl reader with mutated real blobs; print how every case ended.

Real blobs come from `weightless prune → quantize → encode` of small clustered MLPs (one per
codec and layout). Each case mutates one of them and then runs both readers a user has:

* ``decode_blob(load_blob(path))`` — what `decode` and `decode-and-eval` do, and
* ``weightless verify PATH --reference CLUSTERED.onnx`` — the CLI, in process.

Mutations are raw (bit flips, byte sets, truncations, insertions, deletions, splices: the
checksums must catch them) or *forged*: a field-level model of format 2.0 (docs/FORMAT.md,
written here from the spec, not from the reader; only the codec table is shared) changes one
field, payload or record and re-computes every length and CRC, so the change reaches the checks
behind the checksums, the codec decoders and the ONNX graph.

Every case must end as a clean one-line error naming the file with exit 3, or as a decode
(exit 0/1 from verify); a decode of a raw mutation, a traceback, a hang, a worker crash or
an allocation beyond the bound (tracemalloc peak) is a failure. Cases run in a worker
process so a crash in native code is counted, not fatal.

Run: .venv/bin/python bench/fuzz_blob.py [--cases 10000] [--seed 0] [--bases NAME,...] [--show N]
Exit status 1 when any case failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import lzma
import multiprocessing
import os
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import tracemalloc
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `tests` (the model factory) importable
    sys.path.insert(0, str(REPO))

from tests import onnx_factory  # noqa: E402
from weightless_cli.cli import main as cli_main  # noqa: E402
from weightless_cli.codecs.container import CODECS, load_blob  # noqa: E402
from weightless_cli.errors import BadInputError  # noqa: E402
from weightless_cli.stages.decode import decode_blob  # noqa: E402

CASE_SECONDS = 10  # a case still running after this is a hang
ALLOWED_EXTRA_BYTES = 32 << 20  # LZMA2's capped 8 MiB dictionary, protobuf, onnx checker, numpy scratch
PASSING = ("rejected", "decoded", "decoded-identical")
WORKER_ADDRESS_SPACE = 8 << 30


# --- running the CLI in process ----------------------------------------------------------------------------


def run_cli(*args: object) -> tuple[int, str, str]:
    """``weightless ARGS`` in this process: (exit code, stdout, stderr). Other exceptions propagate."""
    argv, sys.argv = sys.argv, ["weightless", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


# --- the real blobs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseSpec:
    name: str
    sizes: tuple[int, ...]
    dtype: type
    sparsity: str
    clusters: str
    encode_args: tuple[str, ...]


BASE_SPECS = (
    BaseSpec("bloomier", (64, 48, 10), np.float32, "0.8", "8", ()),
    BaseSpec("bloomier-f16-t8", (64, 48, 10), np.float16, "0.7", "6", ("--t", "8")),
    BaseSpec("bloomier-fuse", (512, 384, 10), np.float32, "0.5", "16", ("--t", "12", "--layers", "fc1.weight")),
    BaseSpec("sparse", (64, 48, 10), np.float32, "0.8", "8", ("--codec", "sparse")),
    BaseSpec("csr-huffman", (64, 48, 10), np.float32, "0.8", "8", ("--codec", "csr-huffman")),
    BaseSpec("dense", (64, 48, 10), np.float32, "0.4", "4", ("--codec", "dense")),
)


@dataclass
class Base:
    name: str
    data: bytes  # the blob
    reference: Path  # the clustered model it was encoded from
    decoded_bytes: int  # bytes of every float tensor it decodes to
    layout: BlobLayout


def make_base(spec: BaseSpec, folder: Path) -> Base:
    source = onnx_factory.save(onnx_factory.mlp(sizes=spec.sizes, dtype=spec.dtype, seed=len(spec.name)),
                               folder / f"{spec.name}.onnx")
    pruned, quantized, blob = (folder / f"{spec.name}.{suffix}" for suffix in ("p.onnx", "q.onnx", "wl"))
    for args in (("prune", source, "-o", pruned, "--sparsity", spec.sparsity),
                 ("quantize", pruned, "-o", quantized, "--clusters", spec.clusters),
                 ("encode", quantized, "-o", blob, *spec.encode_args)):
        code, _, err = run_cli(*args, "-q", "-f")
        if code:
            raise RuntimeError(f"making base blob {spec.name}: {' '.join(map(str, args))}: {err.strip()}")
    data = blob.read_bytes()
    decoded = sum(t.nbytes for t in decode_blob(load_blob(blob), blob).weights)
    return Base(spec.name, data, quantized, decoded, BlobLayout.parse(data))


def make_bases(folder: Path, names: list[str] | None = None) -> list[Base]:
    specs = [s for s in BASE_SPECS if names is None or s.name in names]
    if not specs:
        raise SystemExit(f"no base blob named {names}; known: {', '.join(s.name for s in BASE_SPECS)}")
    return [make_base(spec, folder) for spec in specs]


# --- a field-level model of the format (docs/FORMAT.md), for forging blobs with valid checksums --------------

# What the codec table fixes (tag -> id, parameter and section names in file order) is data, not parsing: it is
# taken from the container's table; everything else here is written from the spec.
_CODEC_BY_TAG = {spec.tag: name for name, spec in CODECS.items()}
_LIMITS = {"B": (0, 2**8 - 1), "I": (0, 2**32 - 1), "Q": (0, 2**64 - 1), "v": (0, 2**64 - 1),
           "z": (-(2**63), 2**63 - 1)}
_NUMBERS = ("v", "z")


def _varint(value: int, padding: int = 0) -> bytes:
    """LEB128; ``padding`` extra ``80 .. 00`` groups make a (forged) non-minimal encoding."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low | (0x80 if padding else 0))
            break
        out.append(low | 0x80)
    if padding:
        out += b"\x80" * (padding - 1) + b"\x00"
    return bytes(out)


def _zigzag(value: int) -> int:
    return 2 * value if value >= 0 else -2 * value - 1


@dataclass
class Field:
    """One field of a record body: a varint (kind v), a zigzag varint (z) or a str (s, varint length)."""

    label: str
    kind: str
    value: int | bytes
    length: int | None = None  # a string's declared length, when forged
    padding: int = 0  # non-minimal varint groups, when forged

    def encode(self) -> bytes:
        if self.kind == "v":
            return _varint(self.value, self.padding)
        if self.kind == "z":
            return _varint(_zigzag(self.value), self.padding)
        return _varint(len(self.value) if self.length is None else self.length, self.padding) + self.value


@dataclass
class Section:
    name: bytes
    encoding: int
    payload: bytes  # as stored in the file
    decoded_len: int
    stored_len: int | None = None  # forged values; None = the true one
    crc: int | None = None

    def entry(self) -> bytes:
        stored = len(self.payload) if self.stored_len is None else self.stored_len
        crc = zlib.crc32(self.payload) if self.crc is None else self.crc
        decoded = _varint(self.decoded_len) if self.encoding != 0 else b""  # 2.0: only for LZMA2
        return _varint(self.encoding) + _varint(stored) + decoded + struct.pack("<I", crc)


@dataclass
class Record:
    fields: list[Field]
    sections: list[Section]
    body_len: int | None = None
    crc: int | None = None

    def encode(self) -> bytes:
        body = b"".join(f.encode() for f in self.fields) + b"".join(s.entry() for s in self.sections)
        length = len(body) if self.body_len is None else self.body_len
        crc = zlib.crc32(body) if self.crc is None else self.crc
        return _varint(length) + body + struct.pack("<I", crc) + b"".join(s.payload for s in self.sections)

    def field(self, label: str) -> Field | None:
        return next((f for f in self.fields if f.label == label), None)

    def codec(self) -> str:
        return _CODEC_BY_TAG.get(self.field("codec").value, "?")


@dataclass
class BlobLayout:
    magic: bytes
    major: int
    minor: int
    file_record: Record
    tensors: list[Record] = field(default_factory=list)
    file_length: int | None = None
    preamble_crc: int | None = None
    trailer: int | None = None

    def encode(self) -> bytes:
        """The blob with every length and checksum that was not forged computed afresh."""
        records = self.file_record.encode() + b"".join(t.encode() for t in self.tensors)
        length = 24 + len(records) + 4 if self.file_length is None else self.file_length
        head = struct.pack("<8sHHQ", self.magic, self.major, self.minor, length)
        crc = zlib.crc32(head) if self.preamble_crc is None else self.preamble_crc
        body = head + struct.pack("<I", crc) + records
        return body + struct.pack("<I", zlib.crc32(body) if self.trailer is None else self.trailer)

    def copy(self) -> BlobLayout:
        def copy_record(r: Record) -> Record:
            return replace(r, fields=[replace(f) for f in r.fields], sections=[replace(s) for s in r.sections])
        return replace(self, file_record=copy_record(self.file_record), tensors=[copy_record(t) for t in self.tensors])

    @classmethod
    def parse(cls, data: bytes) -> BlobLayout:
        """Split a *valid* 2.0 blob into fields (this is a test tool, not a reader: it trusts its input)."""
        reader = _Reader(data)
        magic, major, minor, _ = struct.unpack("<8sHHQ", reader.take(20))
        reader.take(4)  # preamble crc
        reader.varint()  # file record body length
        file_fields = [Field("tensor count", "v", reader.varint()), Field("metadata count", "v", reader.varint())]
        for index in range(file_fields[1].value):
            file_fields += [Field(f"metadata {index} key", "s", reader.string()),
                            Field(f"metadata {index} value", "s", reader.string())]
        file_record = reader.record(file_fields, ("graph",))
        tensors = [reader.tensor() for _ in range(file_fields[0].value)]
        return cls(magic, major, minor, file_record, tensors)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, size: int) -> bytes:
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    def string(self) -> bytes:
        return self.take(self.varint())

    def record(self, fields: list[Field], section_names: tuple[str, ...]) -> Record:
        """Section table and payloads after ``fields`` (already read from the body)."""
        sections = []
        for name in section_names:
            encoding, stored = self.varint(), self.varint()
            decoded = self.varint() if encoding else stored
            self.take(4)  # section crc
            sections.append(Section(name.encode(), encoding, b"", decoded, stored))  # payload comes later
        self.take(4)  # body crc
        for section in sections:
            section.payload, section.stored_len = self.take(section.stored_len), None
        return Record(fields, sections)

    def tensor(self) -> Record:
        self.varint()  # body length
        fields = [Field("name", "s", self.string()), Field("dtype tag", "v", self.varint())]
        fields.append(Field("ndim", "v", self.varint()))
        fields += [Field(f"dim {axis}", "v", self.varint()) for axis in range(fields[-1].value)]
        fields.append(Field("codec", "v", self.varint()))
        spec = CODECS[_CODEC_BY_TAG[fields[-1].value]]
        fields += [Field(f"param {name}", "z", _unzigzag(self.varint())) for name in spec.params]
        return self.record(fields, spec.sections)


def _unzigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


# --- mutations -----------------------------------------------------------------------------------------------


@dataclass
class Case:
    index: int
    base: str
    kind: str
    forged: bool  # checksums recomputed after the change
    data: bytes


def _random_bytes(rng: np.random.Generator, size: int) -> bytes:
    return rng.integers(0, 256, size, dtype=np.uint8).tobytes()


def _extreme(rng: np.random.Generator, kind: str, value: int) -> int:
    low, high = _LIMITS[kind]
    options = [low, low + 1, high, high - 1, value + 1, value - 1, value * 2, value // 2, 2**31, 2**31 - 1,
               2**32, 2**32 - 1, 2**36, 2**40, 2**63 - 1, -1, -(2**31), low + int.from_bytes(rng.bytes(8), "little") % (high - low + 1)]
    return int(min(max(options[rng.integers(len(options))], low), high))


def _records(layout: BlobLayout) -> list[Record]:
    return [layout.file_record, *layout.tensors]


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _raw_mutation(rng: np.random.Generator, data: bytes, bases: list[Base]) -> tuple[str, bytes]:
    buf = bytearray(data)
    kind = _pick(rng, ["bit-flip", "bit-flip", "byte-set", "truncate", "insert", "delete", "append", "splice"])
    if kind == "bit-flip":
        for bit in rng.integers(0, 8 * len(buf), int(rng.integers(1, 9))):
            buf[bit // 8] ^= 1 << int(bit % 8)
    elif kind == "byte-set":
        for position in rng.integers(0, len(buf), int(rng.integers(1, 5))):
            buf[position] = _pick(rng, [0, 0xFF, int(rng.integers(256))])
    elif kind == "truncate":
        del buf[int(rng.integers(len(buf))):]
    elif kind == "insert":
        position = int(rng.integers(len(buf) + 1))
        buf[position:position] = _random_bytes(rng, int(rng.integers(1, 65)))
    elif kind == "delete":
        position = int(rng.integers(len(buf)))
        del buf[position : position + int(rng.integers(1, 65))]
    elif kind == "append":
        buf += _random_bytes(rng, int(rng.integers(1, 65)))
    else:  # a chunk of some blob (maybe this one) pasted over a random place
        donor = _pick(rng, bases).data
        size = int(rng.integers(1, min(256, len(donor)) + 1))
        start, at = int(rng.integers(len(donor) - size + 1)), int(rng.integers(len(buf)))
        buf[at : at + size] = donor[start : start + size]
    return kind, bytes(buf)


def _decoded_payload(section: Section) -> bytes:
    if section.encoding != 1:
        return section.payload
    filters = [{"id": lzma.FILTER_LZMA2, "dict_size": min(max(section.decoded_len, 4096), 8 << 20)}]
    return lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=filters).decompress(section.payload)


def _store(section: Section, payload: bytes) -> None:
    """Replace a section's payload, stored uncompressed, with true lengths."""
    section.payload, section.encoding, section.decoded_len = payload, 0, len(payload)
    section.stored_len = section.crc = None


def _flip_bits(rng: np.random.Generator, data: bytes, count: int) -> bytes:
    if not data:
        return data
    buf = bytearray(data)
    for bit in rng.integers(0, 8 * len(buf), count):
        buf[bit // 8] ^= 1 << int(bit % 8)
    return bytes(buf)


def _mutate_graph(rng: np.random.Generator, graph_bytes: bytes) -> bytes:
    """A structural change to the blob's ONNX graph (or damage to its bytes)."""
    model = onnx.ModelProto()
    model.ParseFromString(graph_bytes)
    g = model.graph
    floats = [t for t in g.initializer if t.data_type in (1, 10, 11, 16)]
    action = _pick(rng, ["dims", "dtype", "drop-node", "drop-init", "external", "opset", "rename-input",
                         "dup-init", "bytes", "truncate"])
    if action == "dims" and floats:
        tensor = _pick(rng, floats)
        if tensor.dims:
            tensor.dims[int(rng.integers(len(tensor.dims)))] = _pick(rng, [0, 1, 2**31, 2**40, -1, 7])
        else:
            tensor.dims.append(3)
    elif action == "dtype" and floats:
        _pick(rng, floats).data_type = _pick(rng, [0, 1, 6, 7, 10, 11, 16, 99])
    elif action == "drop-node" and len(g.node):
        del g.node[int(rng.integers(len(g.node)))]
    elif action == "drop-init" and len(g.initializer):
        del g.initializer[int(rng.integers(len(g.initializer)))]
    elif action == "external" and len(g.initializer):
        tensor = _pick(rng, list(g.initializer))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", _pick(rng, ["../../../etc/passwd", "/etc/passwd", "x.data", ""])
    elif action == "opset":
        model.opset_import[0].version = _pick(rng, [0, 1, 99999, -1])
    elif action == "rename-input" and len(g.node) and len(g.node[0].input):
        g.node[int(rng.integers(len(g.node)))].input[0] = _pick(rng, ["nothing", "", "fc1.weight"])
    elif action == "dup-init" and len(g.initializer):
        g.initializer.add().CopyFrom(g.initializer[0])
    elif action == "bytes":
        return _flip_bits(rng, graph_bytes, int(rng.integers(1, 9)))
    elif action == "truncate":
        return graph_bytes[: int(rng.integers(len(graph_bytes)))]
    return model.SerializeToString()


def _forged_mutation(rng: np.random.Generator, base: Base, bases: list[Base]) -> tuple[str, bytes]:
    layout = base.layout.copy()
    records = _records(layout)
    kind = _pick(rng, ["field", "field", "field", "payload-flip", "payload-flip", "payload-resize",
                       "payload-random", "lzma-flip", "param", "param", "bloomier-reforge", "records", "rename",
                       "graph", "graph", "version", "frame", "bomb"])
    if kind == "bomb":
        kind = _bomb(rng, layout)
    elif kind == "field":
        record = _pick(rng, records)
        numbers = [f for f in record.fields if f.kind in _NUMBERS]
        target = _pick(rng, numbers + record.sections)
        if isinstance(target, Section):
            which = _pick(rng, ["encoding", "stored_len", "decoded_len"])
            current = getattr(target, which) if getattr(target, which) is not None else len(target.payload)
            setattr(target, which, _extreme(rng, "B" if which == "encoding" else "Q", current))
            kind = f"field:section.{which}"
        else:
            target.value = _extreme(rng, target.kind, target.value)
            kind = f"field:{re.sub(r' [0-9]+', '', target.label)}"
    elif kind in ("payload-flip", "payload-resize", "payload-random"):
        section = _pick(rng, [s for r in records for s in r.sections])
        payload = _decoded_payload(section)
        if kind == "payload-flip":
            payload = _flip_bits(rng, payload, int(rng.integers(1, 9)))
        elif kind == "payload-resize":
            cut = int(rng.integers(len(payload) + 1))
            payload = payload[:cut] if rng.integers(2) else payload + _random_bytes(rng, int(rng.integers(1, 33)))
        else:
            payload = _random_bytes(rng, len(payload))
        _store(section, payload)
        kind = f"{kind}:{section.name.decode()}"
    elif kind == "lzma-flip":
        compressed = [s for r in records for s in r.sections if s.encoding == 1]
        if compressed:
            section = _pick(rng, compressed)
            section.payload = _flip_bits(rng, section.payload, int(rng.integers(1, 5)))
        else:
            kind = "lzma-flip:none"
    elif kind == "param":
        params = [f for t in layout.tensors for f in t.fields if f.kind == "z"]
        if params:
            target = _pick(rng, params)
            target.value = _extreme(rng, "z", target.value)
            kind = f"param:{target.label[6:]}"
    elif kind == "bloomier-reforge":
        kind = _reforge_bloomier(rng, layout)
    elif kind == "records":
        action = _pick(rng, ["drop", "dup", "swap", "miscount"])
        tensors = layout.tensors
        if action == "drop" and tensors:
            del tensors[int(rng.integers(len(tensors)))]
        elif action == "dup" and tensors:
            tensors.insert(int(rng.integers(len(tensors) + 1)), _pick(rng, tensors))
        elif action == "swap" and len(tensors) > 1:
            i, j = rng.choice(len(tensors), 2, replace=False)
            tensors[i], tensors[j] = tensors[j], tensors[i]
        count = layout.file_record.field("tensor count")
        count.value = len(tensors) if action != "miscount" else max(0, len(tensors) + _pick(rng, [-1, 1]))
        kind = f"records:{action}"
    elif kind == "rename":
        tensor = _pick(rng, layout.tensors)
        name = tensor.field("name")
        other = [t.field("name").value for t in layout.tensors]
        name.value = _pick(rng, [*other, b"", b"\xff\xfe", b"x" * 5000, b"fc9.weight", name.value + b"\x00"])
    elif kind == "graph":
        section = layout.file_record.sections[0]
        try:
            _store(section, _mutate_graph(rng, _decoded_payload(section)))
        except Exception:  # a graph this tool cannot parse: damage its bytes instead
            _store(section, _flip_bits(rng, _decoded_payload(section), 4))
    elif kind == "version":
        layout.major = _pick(rng, [0, 1, 2, 3, 255, 65535])
        layout.minor = _pick(rng, [0, 1, 2, 9, 65535])
        kind = f"version:{layout.major}.{layout.minor}"
    else:  # frame: lengths and checksums that lie, with everything else consistent
        which = _pick(rng, ["file_length", "preamble_crc", "trailer", "body_len", "crc", "non-minimal varint",
                            "section crc", "string length"])
        if which in ("file_length", "preamble_crc", "trailer"):
            setattr(layout, which, _extreme(rng, "Q" if which == "file_length" else "I", 0))
        elif which == "section crc":
            section = _pick(rng, [s for r in records for s in r.sections])
            section.crc = _extreme(rng, "I", zlib.crc32(section.payload))
        elif which == "string length":
            strings = [f for r in records for f in r.fields if f.kind == "s"]
            target = _pick(rng, strings)
            target.length = _extreme(rng, "v", len(target.value))
        elif which == "non-minimal varint":  # the same value, with redundant 80 .. 00 groups: not canonical
            _pick(rng, [f for r in records for f in r.fields]).padding = int(rng.integers(1, 4))
        else:
            record = _pick(rng, records)
            setattr(record, which, _extreme(rng, "v" if which == "body_len" else "I", 0))
        kind = f"frame:{which}"
    return kind, layout.encode()


def _bomb(rng: np.random.Generator, layout: BlobLayout) -> str:
    """A tiny blob declaring a huge tensor, consistently: record dims, graph dims and (Bloomier)
    n_positions all say 2^32 values (the format's cap). Reading must refuse it before allocating."""
    record = _pick(rng, [t for t in layout.tensors if t.codec() != "raw"])
    name = record.field("name").value.decode()
    dims = [2**16, 2**16]
    record.fields = [f for f in record.fields if not f.label.startswith("dim ")]
    at = next(i for i, f in enumerate(record.fields) if f.label == "ndim") + 1
    record.field("ndim").value = len(dims)
    record.fields[at:at] = [Field(f"dim {axis}", "v", dim) for axis, dim in enumerate(dims)]
    for label in ("param n_positions", "param n"):
        if record.field(label) is not None:
            record.field(label).value = int(np.prod(dims))
    section = layout.file_record.sections[0]
    model = onnx.ModelProto()
    model.ParseFromString(_decoded_payload(section))
    for tensor in model.graph.initializer:
        if tensor.name == name:
            del tensor.dims[:]
            tensor.dims.extend(dims)
    _store(section, model.SerializeToString())
    return f"bomb:{record.codec()}"


def _reforge_bloomier(rng: np.random.Generator, layout: BlobLayout) -> str:
    """Change a Bloomier table's t or size *consistently* (cells section resized, padding zero), so the
    table validation and the query code see a well-formed but different table."""
    tables = [t for t in layout.tensors if t.codec() == "bloomier"]
    if not tables:
        return "bloomier-reforge:none"
    record = _pick(rng, tables)
    params = {f.label[6:]: f for f in record.fields if f.kind == "z"}
    t = params["t"].value
    action = _pick(rng, ["t", "seed", "layout", "segments", "keys", "positions"])
    if action == "t":
        t = params["t"].value = int(rng.integers(1, 17))
    elif action == "seed":
        params["seed"].value = _pick(rng, [0, 1, 2**32 - 1, 2**32, int(rng.integers(2**32))])
    elif action == "layout":
        params["layout"].value = 1 - params["layout"].value
    elif action == "segments":
        params["segment_length"].value = _pick(rng, [1, 2, 64, 2**18, 2**19, 3])
        params["segment_count"].value = _pick(rng, [3, 4, params["segment_count"].value + 1])
        params["cells"].value = params["segment_length"].value * params["segment_count"].value
    elif action == "keys":
        params["keys"].value = _pick(rng, [0, 1, params["keys"].value // 4, params["n_positions"].value])
    else:
        params["n_positions"].value = _pick(rng, [0, 1, params["n_positions"].value - 1, 2**36])
    cells = max(0, params["cells"].value)
    size = (cells * t + 7) // 8 if cells < 2**24 else 1
    packed = bytearray(_random_bytes(rng, size))
    if packed and (cells * t) % 8:
        packed[-1] &= (1 << ((cells * t) % 8)) - 1  # padding bits must be zero
    cells_section = next(s for s in record.sections if s.name == b"cells")
    _store(cells_section, bytes(packed))
    return f"bloomier-reforge:{action}"


def make_case(index: int, seed: int, bases: list[Base]) -> Case:
    """Case ``index`` of run ``seed``: the same every time."""
    rng = np.random.default_rng([seed, index])
    base = _pick(rng, bases)
    for _ in range(8):  # a mutation that changed nothing (e.g. no Bloomier table to reforge): draw again
        if rng.random() < 0.4:
            kind, data = _raw_mutation(rng, base.data, bases)
            case = Case(index, base.name, f"raw:{kind}", False, data)
        else:
            kind, data = _forged_mutation(rng, base, bases)
            case = Case(index, base.name, f"forged:{kind}", True, data)
        if data != base.data:
            break
    return case


# --- running one case ----------------------------------------------------------------------------------------


class _Hang(BaseException):
    """Raised by the case timer; a BaseException so that no `except Exception` in the code under test eats it."""


def _on_alarm(signum, frame):
    raise _Hang()


@dataclass
class Result:
    index: int
    base: str
    kind: str
    outcome: str  # one of PASSING, or a failure name
    detail: str = ""
    peak_bytes: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.outcome not in PASSING


def _one_line_naming(message: str, path: Path) -> bool:
    return "\n" not in message.strip() and str(path) in message


def _check_cases(case: Case, base: Base, path: Path) -> tuple[str, str]:
    """(outcome, detail) of reading ``path`` both ways."""
    try:
        decode_blob(load_blob(path), path)
        direct = "decoded"
    except BadInputError as exc:
        if not _one_line_naming(str(exc), path):
            return "bad-message", str(exc)[:300]
        direct = "rejected"
    except MemoryError:
        return "memory-error", "decode_blob raised MemoryError"
    code, _, err = run_cli("verify", path, "--reference", base.reference, "--json")
    if "Traceback" in err:
        return "traceback", err.strip().splitlines()[-1][:300]
    if direct == "rejected":
        if code != 3:
            return "wrong-exit", f"verify exited {code} on a blob decode_blob rejected: {err.strip()[:200]}"
        if err.count("\n") != 1 or not _one_line_naming(err, path):
            return "bad-message", err[:300]
        return "rejected", err.strip().removeprefix(f"weightless: error: {path}: ")[:200]
    if code not in (0, 1):
        return "wrong-exit", f"verify exited {code} on a blob decode_blob accepted: {err.strip()[:200]}"
    if case.data == base.data:
        return "decoded-identical", ""
    if not case.forged:
        return "undetected", f"a raw {case.kind} decoded (verify exit {code})"
    return "decoded", f"verify exit {code}"


def run_case(case: Case, base: Base, path: Path, bound: int) -> Result:
    """Write the case to ``path``, read it both ways under a timer and tracemalloc, classify it."""
    path.write_bytes(case.data)
    tracemalloc.reset_peak()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    start = time.perf_counter()
    try:
        outcome, detail = _check_cases(case, base, path)
    except _Hang:
        outcome, detail = "hang", f"still running after {CASE_SECONDS} s"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - anything else escaping is exactly what we look for
        outcome, detail = "traceback", f"{type(exc).__name__}: {str(exc).strip()[:250]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    if outcome in PASSING and peak > bound:
        outcome, detail = "over-allocation", f"peak {peak:,} bytes > bound {bound:,}"
    return Result(case.index, case.base, case.kind, outcome, detail, peak, seconds)


def allocation_bound(base: Base, data: bytes) -> int:
    """What reading a case may allocate: a few copies of the blob and of the tensors it decodes to,
    plus fixed overheads. A forged blob can only decode to the sizes its (base's) graph declares."""
    return 4 * len(data) + 8 * base.decoded_bytes + ALLOWED_EXTRA_BYTES


def run_cases(indices: range, seed: int, bases: list[Base], folder: Path, report=None) -> list[Result]:
    """Run cases in this process (the test does this; the bench uses a worker)."""
    by_name = {b.name: b for b in bases}
    path = folder / "case.wl"
    results = []
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        for index in indices:
            case = make_case(index, seed, bases)
            base = by_name[case.base]
            result = run_case(case, base, path, allocation_bound(base, case.data))
            results.append(result)
            if report is not None:
                report(result)
    finally:
        if started:
            tracemalloc.stop()
    return results


# --- the bench: a worker process, so a native crash is one failed case ----------------------------------------


def _worker(connection, indices: range, seed: int, bases: list[Base], folder: str) -> None:
    # A safety net for the machine: should a forged size ever get past the reader's checks, the
    # worker gets a MemoryError (counted as a failure) instead of the kernel's OOM killer.
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_ADDRESS_SPACE, resource.getrlimit(resource.RLIMIT_AS)[1]))

    def report(result: Result) -> None:
        connection.send(result)

    for index in indices:
        connection.send(("start", index))
        run_cases(range(index, index + 1), seed, bases, Path(folder), report)
    connection.send(("rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    connection.close()


def run_isolated(total: int, seed: int, bases: list[Base], folder: Path, progress: bool) -> tuple[list[Result], int]:
    """All cases, in worker processes; a worker that dies or stops answering costs one case."""
    context = multiprocessing.get_context("fork")
    results: list[Result] = []
    max_rss_kib = 0
    next_index = 0
    started = time.perf_counter()
    while next_index < total:
        receiver, sender = context.Pipe(duplex=False)
        worker = context.Process(target=_worker, args=(sender, range(next_index, total), seed, bases, str(folder)))
        worker.start()
        sender.close()
        current = None
        while True:
            if not receiver.poll(CASE_SECONDS * 3):
                worker.kill()
                worker.join()
                results.append(_lost(current, seed, bases, "hang", "worker stopped answering"))
                next_index = current + 1
                break
            try:
                message = receiver.recv()
            except EOFError:
                worker.join()
                if current is None or (results and results[-1].index == current):
                    next_index = total
                else:
                    results.append(_lost(current, seed, bases, "worker-crash", f"exit code {worker.exitcode}"))
                    next_index = current + 1
                break
            if isinstance(message, Result):
                results.append(message)
                if progress and len(results) % 500 == 0:
                    rate = len(results) / (time.perf_counter() - started)
                    print(f"  {len(results):,}/{total:,} cases ({rate:.0f}/s)", file=sys.stderr)
            elif message[0] == "start":
                current = message[1]
            elif message[0] == "rss":
                max_rss_kib = max(max_rss_kib, message[1])
        receiver.close()
    return results, max_rss_kib


def _lost(index: int | None, seed: int, bases: list[Base], outcome: str, detail: str) -> Result:
    try:
        case = make_case(index or 0, seed, bases)
    except Exception as exc:  # the fuzzer's own bug: still report it as a failed case
        return Result(index or 0, "?", "?", "fuzzer-error", f"{type(exc).__name__}: {exc}")
    return Result(case.index, case.base, case.kind, outcome, detail)


def _outcomes_by(results: list[Result], key, width: int) -> list[str]:
    """One line per value of ``key(result)``: how many cases ended in each outcome."""
    groups = collections.defaultdict(collections.Counter)
    for r in results:
        groups[key(r)][r.outcome] += 1
    return [f"  {name:<{width}} " + "  ".join(f"{o} {n}" for o, n in groups[name].most_common())
            for name in sorted(groups)]


def summarise(results: list[Result], show: int) -> str:
    lines = []
    outcomes = collections.Counter(r.outcome for r in results)
    lines.append(f"{len(results):,} cases: " + ", ".join(f"{name} {count:,}" for name, count in outcomes.most_common()))
    lines.append("\nby mutation:")
    lines += _outcomes_by(results, lambda r: r.kind, 34)
    lines.append("\nby base blob:")
    lines += _outcomes_by(results, lambda r: r.base, 18)
    peaks = [r.peak_bytes for r in results if r.peak_bytes]
    slowest = max(results, key=lambda r: r.seconds)
    if peaks:
        lines.append(f"\ntracemalloc peak per case: median {int(np.median(peaks)):,} B, max {max(peaks):,} B; "
                     f"slowest case {slowest.seconds * 1000:.0f} ms (#{slowest.index}, {slowest.kind})")
    reasons = collections.Counter(re.sub(r"[0-9]+", "#", r.detail)[:100] for r in results if r.outcome == "rejected")
    lines.append("\nmost common rejections:")
    lines += [f"  {count:6,}  {reason}" for reason, count in reasons.most_common(25)]
    failures = [r for r in results if r.failed]
    if failures:
        lines.append(f"\nFAILURES ({len(failures)}):")
        for r in failures[:show]:
            lines.append(f"  #{r.index} {r.base} {r.kind}: {r.outcome}: {r.detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bases", help="comma-separated base blobs (default: all): "
                        + ", ".join(s.name for s in BASE_SPECS))
    parser.add_argument("--show", type=int, default=20, help="failures to list")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="wl-fuzz-") as tmp:
        folder = Path(tmp)
        bases = make_bases(folder, args.bases.split(",") if args.bases else None)
        for base in bases:
            print(f"base {base.name}: {len(base.data):,} bytes, {len(base.layout.tensors)} tensor records, "
                  f"decodes to {base.decoded_bytes:,} bytes", file=sys.stderr)
        start = time.perf_counter()
        results, worker_rss = run_isolated(args.cases, args.seed, bases, folder, progress=True)
        elapsed = time.perf_counter() - start
    print(summarise(results, args.show))
    print(f"\n{elapsed:.0f} s ({len(results) / elapsed:.0f} cases/s); worker peak RSS {worker_rss / 1024:.0f} MiB "
          f"(ru_maxrss; includes Python, numpy, onnx and the tracemalloc tables)")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
