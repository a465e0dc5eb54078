"""Tests for the .wl blob container (weightless_cli/codecs/container.py) against docs/FORMAT.md.

Hostile inputs are built with small, independent encoders written from the spec (``_Spec`` for format 2.0,
``_Spec1`` for 1.x below), so a blob can declare anything (2^40 elements, unknown codecs, lying lengths) and
still carry valid checksums.
"""

from __future__ import annotations

import lzma
import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightless_cli import __version__
from weightless_cli.codecs import container as c
from weightless_cli.codecs.container import (
    Blob,
    TensorRecord,
    array_to_bytes,
    bytes_to_array,
    describe_layout,
    load_blob,
    raw_array,
    raw_record,
    read_blob,
    save_blob,
    write_blob,
)
from weightless_cli.errors import BadInputError

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"
FIXTURE_1X = Path(__file__).resolve().parent / "data" / "format-1.1.wl"
BLOOMIER_PARAMS = ("cells", "keys", "layout", "n_positions", "seed", "segment_count", "segment_length", "t")
SPARSE_PARAMS = ("class_bits", "classes", "dead_cols", "dead_rows", "mode", "n")


def example_blob() -> Blob:
    """The tiny blob of docs/FORMAT.md's worked example: a raw bias and a real Bloomier-coded weight
    (positions 1 and 4 of a 2×3 tensor hold codebook entries 0 and 1)."""
    from weightless_cli.codecs.bitpack import pack_bits
    from weightless_cli.codecs.bloomier import encode_positions

    table = encode_positions(np.array([1, 4]), np.array([0, 1]), 6, 2, seed=7)
    bloomier = TensorRecord(
        "fc.weight",
        (2, 3),
        "float16",
        "bloomier",
        table.to_params(),
        {"codebook": np.array([0.5, -0.25], "<f2").tobytes(), "cells": pack_bits(table.cells, 2)},
    )
    bias = raw_record("fc.bias", np.array([1.0, -2.0], np.float32))
    return Blob(b"onnx-graph", [bloomier, bias], {"writer": "weightless (example)"})


def fixture_1x_blob() -> Blob:
    """What tests/data/format-1.1.wl holds: it was written by the 1.1 writer from exactly this blob."""
    bloomier_params = {"t": 2, "seed": 7, "layout": 0, "segment_length": 2, "segment_count": 3, "cells": 6,
                       "n_positions": 6, "keys": 2}
    sparse_params = {"n": 5, "mode": 0, "class_bits": 0, "classes": 1, "dead_rows": 0, "dead_cols": -1}
    return Blob(
        b"onnx-graph " * 20,  # LZMA2 in the file, as are 'model' and 'zeros'
        [
            TensorRecord("fc.weight", (2, 3), "float16", "bloomier", bloomier_params,
                         {"cells": bytes.fromhex("0b00"), "codebook": np.array([0.5, -0.25], "<f2").tobytes()}),
            TensorRecord("conv.weight", (4, 1, 2, 2), "float32", "sparse", sparse_params,
                         {"codebook": np.array([0.5, -0.5], "<f4").tobytes(), "model": bytes(64),
                          "stream": b"\x01\x02\x03\x04"}),
            raw_record("fc.bias", np.array([1.0, -2.0], np.float32)),
            raw_record("zeros", np.zeros(256, np.float32)),
        ],
        {"writer": "weightless 0.1.0", "note": "caf\u00e9"},
    )


def assert_rejected(data: bytes) -> str:
    with pytest.raises(BadInputError) as info:
        read_blob(data)
    message = str(info.value)
    assert message and "\n" not in message and "\r" not in message
    return message


# --- independent encoders, written from docs/FORMAT.md --------------------------------------------------------


def _lzma2(data: bytes) -> bytes:
    dict_size = min(max(len(data), 4096), 8 << 20)
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": dict_size}]
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)


def _preamble(major: int, minor: int, length: int) -> bytes:
    head = struct.pack("<8sHHQ", c.MAGIC, major, minor, length)
    return head + struct.pack("<I", zlib.crc32(head))


def _stored(data: bytes) -> tuple[int, bytes, int]:
    return (0, data, len(data))


class _Spec:
    """Format 2.0, byte by byte, without any of the writer's validation.

    A section is (encoding, stored bytes, decoded length[, declared stored length]); the decoded length is
    written for every encoding but 0, as the spec says for 1 (LZMA2).
    """

    @staticmethod
    def varint(value: int) -> bytes:
        out = b""
        while True:
            low, value = value & 0x7F, value >> 7
            if not value:
                return out + bytes([low])
            out += bytes([low | 0x80])

    @classmethod
    def zigzag(cls, value: int) -> bytes:
        return cls.varint(2 * value if value >= 0 else -2 * value - 1)

    @classmethod
    def text(cls, raw: bytes) -> bytes:
        return cls.varint(len(raw)) + raw

    @classmethod
    def frame(cls, body: bytes) -> bytes:
        return cls.varint(len(body)) + body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def table(cls, sections: list[tuple]) -> tuple[bytes, bytes]:
        table = b""
        for encoding, stored, decoded_len, *declared in sections:
            table += cls.varint(encoding) + cls.varint(declared[0] if declared else len(stored))
            if encoding != 0:
                table += cls.varint(decoded_len)
            table += struct.pack("<I", zlib.crc32(stored))
        return table, b"".join(section[1] for section in sections)

    @classmethod
    def file_record(cls, tensor_count: int, metadata=(), graph: bytes = b"g", sections=None) -> bytes:
        body = cls.varint(tensor_count) + cls.varint(len(metadata))
        body += b"".join(cls.text(key) + cls.text(value) for key, value in metadata)
        table, payloads = cls.table(sections if sections is not None else [_stored(graph)])
        return cls.frame(body + table) + payloads

    @classmethod
    def tensor(cls, name: bytes = b"w", tag: int = 1, shape: tuple[int, ...] = (2,), codec: int = 0,
               params: tuple[int, ...] = (), sections=None, body_tail: bytes = b"") -> bytes:
        """``codec`` is a tag (0 raw, 1 bloomier, 2 sparse ...); ``params`` its values in name order."""
        if sections is None:
            sections = [_stored(bytes(8))]
        body = cls.text(name) + cls.varint(tag) + cls.varint(len(shape)) + b"".join(map(cls.varint, shape))
        body += cls.varint(codec) + b"".join(map(cls.zigzag, params))
        table, payloads = cls.table(sections)
        return cls.frame(body + table + body_tail) + payloads

    @staticmethod
    def assemble(records: bytes, major: int = 2, minor: int = 0) -> bytes:
        body = _preamble(major, minor, 24 + len(records) + 4) + records
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def blob(cls, *tensors: bytes, **file_record) -> bytes:
        return cls.assemble(cls.file_record(len(tensors), **file_record) + b"".join(tensors))


class _Spec1:
    """Format 1.x: fixed-width fields, named parameters and sections.

    A section is (name, encoding, stored bytes, decoded length[, declared stored length]).
    """

    @staticmethod
    def frame(body: bytes) -> bytes:
        return struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(body))

    @staticmethod
    def s8(text: bytes) -> bytes:
        return struct.pack("<B", len(text)) + text

    @classmethod
    def table(cls, sections: list[tuple]) -> tuple[bytes, bytes]:
        table = struct.pack("<B", len(sections))
        for name, encoding, stored, decoded_len, *declared in sections:
            stored_len = declared[0] if declared else len(stored)
            table += cls.s8(name) + struct.pack("<BQQI", encoding, stored_len, decoded_len, zlib.crc32(stored))
        return table, b"".join(section[2] for section in sections)

    @staticmethod
    def stored(name: bytes, data: bytes) -> tuple[bytes, int, bytes, int]:
        return (name, 0, data, len(data))

    @classmethod
    def file_record(cls, tensor_count: int, metadata=(), graph: bytes = b"g", sections=None) -> bytes:
        body = struct.pack("<IH", tensor_count, len(metadata))
        for key, value in metadata:
            body += struct.pack("<H", len(key)) + key + struct.pack("<H", len(value)) + value
        table, payloads = cls.table(sections if sections is not None else [cls.stored(b"graph", graph)])
        return cls.frame(body + table) + payloads

    @classmethod
    def tensor(cls, name: bytes = b"w", tag: int = 1, shape: tuple[int, ...] = (2,), codec: bytes = b"raw",
               params: list[tuple[bytes, int]] = (), sections=None) -> bytes:
        if sections is None:
            sections = [cls.stored(b"data", bytes(8))]
        body = struct.pack("<H", len(name)) + name + struct.pack("<BB", tag, len(shape))
        body += b"".join(struct.pack("<Q", dim) for dim in shape)
        body += cls.s8(codec) + struct.pack("<B", len(params))
        body += b"".join(cls.s8(key) + struct.pack("<q", value) for key, value in params)
        table, payloads = cls.table(sections)
        return cls.frame(body + table) + payloads

    @staticmethod
    def assemble(records: bytes, major: int = 1, minor: int = 1) -> bytes:
        body = _preamble(major, minor, 24 + len(records) + 4) + records
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def blob(cls, *tensors: bytes, **file_record) -> bytes:
        return cls.assemble(cls.file_record(len(tensors), **file_record) + b"".join(tensors))


def _bloomier_1x(params=None, sections=None) -> bytes:
    params = [(name.encode(), 1) for name in BLOOMIER_PARAMS] if params is None else params
    sections = sections or [_Spec1.stored(b"cells", b""), _Spec1.stored(b"codebook", b"")]
    return _Spec1.tensor(codec=b"bloomier", params=params, sections=sections)


# --- round trips ---------------------------------------------------------------------------------------------


def test_example_round_trips_and_adds_nothing_when_writer_is_set():
    blob = example_blob()
    assert read_blob(write_blob(blob)) == blob


def test_writer_metadata_is_added_unless_given():
    blob = Blob(b"g", [], {"model": "lenet"})
    assert read_blob(write_blob(blob)).metadata == {"writer": f"weightless {__version__}", "model": "lenet"}


def test_independent_encoder_reproduces_writer_bytes():
    """The spec, re-implemented in the test, gives the very same bytes as the writer (incl. LZMA2)."""
    zeros = np.zeros(256, np.float32)
    sparse = TensorRecord("s", (300,), "float32", "sparse", dict(zip(SPARSE_PARAMS, (0, -1, 64, 2**40, 3, -70),
                                                                     strict=True)),
                          {"codebook": bytes(8), "model": bytes(200), "stream": b"\x07" * 130})
    blob = Blob(b"graph" * 40, [raw_record("z", zeros), sparse], {"writer": "w", "a": "b\u00e9"})
    expected = _Spec.blob(
        _Spec.tensor(b"z", 1, (256,), 0, (), [(1, _lzma2(zeros.tobytes()), 1024)]),
        _Spec.tensor(b"s", 1, (300,), 2, (0, -1, 64, 2**40, 3, -70),
                     [_stored(bytes(8)), (1, _lzma2(bytes(200)), 200), _stored(b"\x07" * 130)]),
        metadata=[(b"a", "b\u00e9".encode()), (b"writer", b"w")],
        sections=[(1, _lzma2(b"graph" * 40), 200)],
    )
    assert write_blob(blob) == expected


def test_deterministic_and_canonical():
    blob = example_blob()
    first = write_blob(blob)
    assert write_blob(example_blob()) == first
    assert write_blob(read_blob(first)) == first
    # Order of params, sections and metadata in the input dicts does not matter: the file fixes the order.
    shuffled = [
        TensorRecord(r.name, r.shape, r.dtype, r.codec, dict(reversed(r.params.items())),
                     dict(reversed(r.sections.items())))
        for r in blob.tensors
    ]
    assert write_blob(Blob(blob.graph, shuffled, blob.metadata)) == first


def test_compressible_sections_are_lzma_only_when_smaller():
    noise = np.random.default_rng(0).integers(0, 2**16, 8, dtype=np.uint16).view(np.float16)
    zeros = np.zeros(4096, np.float32)
    layout = describe_layout(write_blob(Blob(b"", [raw_record("n", noise), raw_record("z", zeros)])))
    assert "'n' section 'data' = stored payload, 16 bytes" in layout
    assert re.search(r"'z' section 'data' = lzma2 payload, \d+ bytes", layout)


@pytest.mark.parametrize(
    "value", [0, 1, 127, 128, 255, 300, 16383, 16384, 2**32 - 1, 2**35, 2**56, 2**63 - 1, 2**63, 2**64 - 1]
)
def test_varints_match_the_spec_and_stay_minimal(value):
    encoded = c._varint(value)
    assert encoded == _Spec.varint(value) and len(encoded) == max(1, -(-value.bit_length() // 7))
    assert c._Cursor(memoryview(encoded), 0, len(encoded), None)._varint("v") == value


@given(st.integers(-(2**63), 2**63 - 1))
def test_zigzag_is_a_bijection_onto_uint64(value):
    assert c._zigzag(value) == (2 * value if value >= 0 else -2 * value - 1) < 2**64
    assert c._unzigzag(c._zigzag(value)) == value


_names = st.text(min_size=1, max_size=12).filter(lambda s: len(s.encode()) <= c.MAX_NAME_BYTES)
_dtypes = st.sampled_from(sorted(c.DTYPES))
_shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)
_int64 = st.one_of(st.integers(-300, 300), st.integers(-(2**63), 2**63 - 1))


@st.composite
def _records(draw, name: str) -> TensorRecord:
    dtype, shape = draw(_dtypes), draw(_shapes)
    itemsize = c.DTYPES[dtype].itemsize
    if draw(st.booleans()):
        count = int(np.prod(shape))
        data = draw(st.one_of(st.binary(min_size=count * itemsize, max_size=count * itemsize),
                              st.just(bytes(count * itemsize))))
        return TensorRecord(name, shape, dtype, "raw", {}, {"data": data})
    params = {key: draw(_int64) for key in BLOOMIER_PARAMS}
    entries = draw(st.integers(0, 5))
    codebook = draw(st.binary(min_size=entries * itemsize, max_size=entries * itemsize))
    return TensorRecord(
        name, shape, dtype, "bloomier", params, {"codebook": codebook, "cells": draw(st.binary(max_size=40))}
    )


@st.composite
def _blobs(draw) -> Blob:
    names = draw(st.lists(_names, max_size=4, unique=True))
    metadata = draw(st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=20), max_size=3))
    graph = draw(st.one_of(st.binary(max_size=200), st.just(b"\x08\x07" * 100)))
    return Blob(graph, [draw(_records(name)) for name in names], metadata)


@settings(max_examples=100, deadline=None)
@given(_blobs())
def test_round_trip_property(blob):
    data = write_blob(blob)
    back = read_blob(data)
    assert back.graph == blob.graph and back.tensors == blob.tensors
    assert back.metadata == {"writer": f"weightless {__version__}", **blob.metadata}
    assert write_blob(back) == data


# --- framing cost ---------------------------------------------------------------------------------------------


def _framing(record: TensorRecord) -> int:
    """Bytes a record adds to a blob beyond its name and its (incompressible, so stored) payloads."""
    with_it, without = write_blob(Blob(b"", [record])), write_blob(Blob(b"", []))
    return len(with_it) - len(without) - len(record.name.encode()) - sum(map(len, record.sections.values()))


def test_framing_of_a_small_sparse_record_is_a_few_dozen_bytes():
    """Issue #5: LeNet-5 must fit in 8,628 bytes; a 1.x `sparse` record header alone was ~230 bytes."""
    noise = np.random.default_rng(3).integers(0, 256, 400, dtype=np.uint8).tobytes()
    params = dict(zip(SPARSE_PARAMS, (0, 1, 52, 5, 0, 2500), strict=True))
    sparse = TensorRecord("conv2.weight", (50, 20, 5, 5), "float32", "sparse", params,
                          {"codebook": noise[:32], "model": noise[32:65], "stream": noise[65:]})
    # frame 6, dtype 1, shape 5, codec 1, params 7, 3 sections of encoding + length + crc32 (18-19)
    assert _framing(sparse) <= 40
    bias = raw_record("conv2.bias", np.random.default_rng(4).normal(size=50).astype(np.float32))
    assert _framing(bias) <= 17  # frame 6, dtype 1, shape 2, codec 1, one section 7
    # preamble 24, trailer 4, file record frame 5, counts 2, the graph section 6, metadata 'writer'
    writer = len("writer") + len(f"weightless {__version__}") + 2
    assert len(write_blob(Blob(b"", []))) == 41 + writer


# --- raw tensors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_raw_record_round_trips_each_float_dtype(dtype):
    array = np.random.default_rng(1).normal(size=(3, 4)).astype(dtype)
    record = read_blob(write_blob(Blob(b"", [raw_record("x", array)]))).tensors[0]
    assert record.dtype == dtype and record.shape == (3, 4)
    np.testing.assert_array_equal(raw_array(record), array)


def test_raw_record_bfloat16_from_bit_patterns_and_ml_dtypes():
    bits = np.array([[0x3F80, 0xC000], [0x7FC0, 0x0001]], np.uint16)
    record = read_blob(write_blob(Blob(b"", [raw_record("b", bits, dtype="bfloat16")]))).tensors[0]
    assert record.dtype == "bfloat16"
    np.testing.assert_array_equal(raw_array(record), bits)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.array([1.0, -2.0, 0.5], dtype=ml_dtypes.bfloat16)
    assert raw_record("b", values).dtype == "bfloat16"
    np.testing.assert_array_equal(raw_array(raw_record("b", values)), values.view(np.uint16))


def test_raw_bytes_are_little_endian_c_order_whatever_the_input_layout():
    array = np.arange(6, dtype=">f4").reshape(2, 3).T  # big-endian, Fortran-ordered view
    data = raw_record("x", array).sections["data"]
    assert data == np.ascontiguousarray(array, dtype="<f4").tobytes()
    np.testing.assert_array_equal(bytes_to_array(data, "float32", (3, 2)), array)


def test_array_helpers_refuse_mismatched_dtypes():
    with pytest.raises(ValueError, match="float16"):
        array_to_bytes(np.zeros(2, np.float32), "float16")
    with pytest.raises(ValueError, match="uint16"):
        raw_record("x", np.zeros(2, np.uint16))  # ambiguous: must say dtype="bfloat16"
    with pytest.raises(ValueError, match="int8"):
        array_to_bytes(np.zeros(2, np.float32), "int8")
    with pytest.raises(ValueError, match="not 'raw'"):
        raw_array(example_blob().tensors[0])


# --- corruption: every byte value, every bit, every truncation ------------------------------------------------


def _small_blob() -> bytes:
    """Every kind of field, an LZMA2 section and multi-byte varints included, in few bytes so that
    exhaustive tests stay quick."""
    params = dict(zip(BLOOMIER_PARAMS, (1, 200, 0, -1, 2**40, 1, 0, -300), strict=True))
    blob = Blob(
        b"\x00" * 150,
        [
            TensorRecord("w", (2,), "float16", "bloomier", params, {"codebook": b"\x00\x38", "cells": b"\x01"}),
            raw_record("b", np.zeros(1, np.float32)),
        ],
        {"writer": "x"},
    )
    data = write_blob(blob)
    layout = describe_layout(data)
    assert "lzma2 payload" in layout and "file record section 'graph' decoded length = 150" in layout
    return data


def test_every_single_byte_corruption_is_rejected():
    data = _small_blob()
    for position in range(len(data)):
        corrupted = bytearray(data)
        for value in range(256):
            if value == data[position]:
                continue
            corrupted[position] = value
            assert_rejected(bytes(corrupted))


@pytest.mark.parametrize("data", [write_blob(example_blob()), FIXTURE_1X.read_bytes()], ids=["2.0", "1.1"])
def test_every_single_bit_flip_is_rejected(data):
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert_rejected(bytes(flipped))


@pytest.mark.parametrize("data", [_small_blob(), FIXTURE_1X.read_bytes()], ids=["2.0", "1.1"])
def test_every_truncation_and_any_extension_is_rejected(data):
    for length in range(len(data)):
        assert_rejected(data[:length])
    assert "trailing bytes" in assert_rejected(data + b"\x00")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_damage_only_ever_raises_bad_input(draw):
    data = bytearray(_small_blob())
    for _ in range(draw.draw(st.integers(1, 8))):
        position = draw.draw(st.integers(0, len(data) - 1))
        data[position] = draw.draw(st.integers(0, 255))
    cut = draw.draw(st.integers(0, len(data)))
    damaged = bytes(data[:cut])
    if damaged != _small_blob():
        assert_rejected(damaged)


_u64 = st.one_of(st.integers(0, 4), st.integers(0, 4), st.integers(0, 2**64 - 1))
_payloads = st.one_of(st.binary(max_size=24), st.just(bytes(8)), st.just(_lzma2(bytes(8))),
                      st.just(_lzma2(bytes(64))))
_sizes = st.one_of(st.sampled_from([0, 1, 4, 8, 16, 64]), st.integers(0, 2**64 - 1))


@st.composite
def _forged_tensors(draw) -> bytes:
    """CRC-valid 2.0 tensor records with arbitrary field values: they reach every check behind the checksums."""
    if draw(st.integers(0, 4)) == 0:
        return _Spec.frame(draw(st.binary(max_size=80))) + draw(st.binary(max_size=16))
    codec = draw(st.sampled_from([0, 0, 0, 1, 2, 8, 2**63]))
    param_count = len(c.CODECS[c._CODEC_BY_TAG[codec]].params) if codec in c._CODEC_BY_TAG else 0
    return _Spec.tensor(
        name=draw(st.one_of(st.sampled_from([b"w", b"v", b"u"]), st.binary(max_size=6))),
        tag=draw(st.sampled_from([1, 1, 10, 11, 16, 0, 255])),
        shape=tuple(draw(st.lists(_u64, max_size=draw(st.sampled_from([2, 2, 10]))))),
        codec=codec,
        params=draw(st.lists(_int64, min_size=param_count, max_size=param_count + draw(st.sampled_from([0, 0, 1])))),
        sections=draw(st.lists(st.tuples(st.sampled_from([0, 0, 1, 2]), _payloads, _sizes), max_size=4)),
        body_tail=draw(st.sampled_from([b"", b"", b"", b"\x00", b"\x80"])),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(_forged_tensors(), max_size=3), st.sampled_from([0, 0, 0, 1, -1]))
def test_forged_records_with_valid_checksums_only_ever_raise_bad_input(tensors, miscount):
    metadata = [(b"writer", b"x")]
    data = _Spec.assemble(_Spec.file_record(max(0, len(tensors) + miscount), metadata) + b"".join(tensors))
    try:
        blob = read_blob(data)
    except BadInputError as exc:
        assert "\n" not in str(exc)
    else:  # whatever it accepted must be exactly what the writer produces for it
        assert write_blob(blob) == data


_section_1x = st.tuples(
    st.sampled_from([b"data", b"data", b"cells", b"codebook", b"x", b"Bad"]),
    st.sampled_from([0, 0, 1, 2]),
    st.one_of(st.binary(max_size=24), st.just(bytes(8)), st.just(_lzma2(bytes(8)))),
    st.one_of(st.sampled_from([0, 1, 4, 8, 16]), st.integers(0, 2**64 - 1)),
)


@st.composite
def _forged_tensors_1x(draw) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return _Spec1.frame(draw(st.binary(max_size=80))) + draw(st.binary(max_size=16))
    return _Spec1.tensor(
        name=draw(st.one_of(st.sampled_from([b"w", b"v", b"u"]), st.binary(max_size=6))),
        tag=draw(st.sampled_from([1, 1, 10, 11, 16, 0, 255])),
        shape=tuple(draw(st.lists(_u64, max_size=draw(st.sampled_from([2, 2, 10]))))),
        codec=draw(st.sampled_from([b"raw", b"raw", b"bloomier", b"future-codec", b"", b"RAW"])),
        params=draw(
            st.lists(st.tuples(st.sampled_from([b"t", b"seed", b"", b"9"]), st.integers(-9, 9)), max_size=2)
        ),
        sections=draw(st.lists(_section_1x, max_size=3)),
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(_forged_tensors_1x(), max_size=3), st.sampled_from([0, 0, 0, 1, -1]))
def test_forged_1x_records_with_valid_checksums_only_ever_raise_bad_input(tensors, miscount):
    data = _Spec1.assemble(_Spec1.file_record(max(0, len(tensors) + miscount), [(b"writer", b"x")])
                           + b"".join(tensors))
    try:
        blob = read_blob(data)
    except BadInputError as exc:
        assert "\n" not in str(exc)
    else:  # whatever a 1.x file holds, the 2.0 writer can write and the reader gets it back
        assert read_blob(write_blob(blob)) == blob


def test_messages_name_the_failure_and_the_source():
    data = bytearray(write_blob(example_blob()))
    data[-6] ^= 0xFF  # inside the raw bias payload, just before the 4-byte trailer
    message = assert_rejected(bytes(data))
    assert message == "corrupt .wl blob: tensor 1 'fc.bias': section 'data' checksum mismatch"
    with pytest.raises(BadInputError, match=r"^model\.wl: corrupt"):
        read_blob(bytes(data), source="model.wl")
    assert assert_rejected(b"PK\x03\x04") == "not a .wl blob (bad magic bytes)"


# --- versions ------------------------------------------------------------------------------------------------


def test_the_writer_writes_2_0():
    assert (c.FORMAT_MAJOR, c.FORMAT_MINOR, c.OLDER_MAJORS) == (2, 0, (1,))
    assert write_blob(example_blob())[8:12] == b"\x02\x00\x00\x00"


def test_a_committed_1_1_blob_is_read_and_rewritten_as_2_0():
    data = FIXTURE_1X.read_bytes()
    assert data[8:12] == b"\x01\x00\x01\x00"
    blob = read_blob(data)
    assert blob == fixture_1x_blob()
    rewritten = write_blob(blob)
    assert rewritten[8:12] == b"\x02\x00\x00\x00" and len(rewritten) < len(data) * 2 // 3
    assert read_blob(rewritten) == blob and write_blob(read_blob(rewritten)) == rewritten
    layout = describe_layout(data)
    assert "tensor 1 'conv.weight' param 'dead_cols' = -1" in layout
    assert "tensor 1 'conv.weight' section 'model' = lzma2 payload, 14 bytes" in layout


def test_1_0_is_read_too():
    blob = read_blob(_Spec1.assemble(_Spec1.file_record(1) + _Spec1.tensor(), minor=0))
    assert blob.tensors[0].name == "w" and blob.graph == b"g"


def test_newer_major_version_is_rejected_with_upgrade_hint():
    message = assert_rejected(_Spec.assemble(_Spec.file_record(0), major=3, minor=0))
    assert "3.0 is newer" in message and "(2.x, 1.x)" in message and message.endswith("upgrade weightless")
    assert "predates" in assert_rejected(_Spec.assemble(_Spec.file_record(0), major=0))


def test_the_major_version_picks_the_layout():
    """A 2.0 body under a 1.x preamble (or the reverse) is a clean error, never a misreading."""
    assert_rejected(_Spec.assemble(_Spec.file_record(1) + _Spec.tensor(), major=1))
    assert_rejected(_Spec1.assemble(_Spec1.file_record(1) + _Spec1.tensor(), major=2, minor=0))


@pytest.mark.parametrize("spec", [_Spec, _Spec1])
def test_newer_minor_version_is_read(spec):
    blob = read_blob(spec.assemble(spec.file_record(1) + spec.tensor(), minor=7))
    assert blob.tensors[0].name == "w" and blob.graph == b"g"


# --- codecs --------------------------------------------------------------------------------------------------


def test_codec_table_is_frozen_in_name_order_with_unique_tags():
    from weightless_cli.codecs import bloomier

    assert [spec.tag for spec in c.CODECS.values()] == list(range(len(c.CODECS)))
    for spec in c.CODECS.values():
        assert list(spec.params) == sorted(spec.params) and list(spec.sections) == sorted(spec.sections)
        assert spec.compressible <= set(spec.sections) and len(spec.sections) <= c.MAX_SECTIONS
    assert c.CODECS["bloomier"].params == BLOOMIER_PARAMS == tuple(sorted(bloomier.PARAM_NAMES))
    assert c.CODECS["sparse"].params == SPARSE_PARAMS


def test_unknown_codec_is_rejected_by_tag():
    message = assert_rejected(_Spec.blob(_Spec.tensor(codec=8, sections=[_stored(b"\x01")])))
    assert message.startswith("unsupported .wl blob: tensor 0 'w': unknown codec tag 8")
    assert "newer weightless" in message


def test_unknown_1x_codec_is_rejected_by_name():
    data = _Spec1.blob(_Spec1.tensor(codec=b"future-codec", sections=[_Spec1.stored(b"deltas", b"\x01")]))
    message = assert_rejected(data)
    assert message.startswith("unsupported .wl blob: tensor 0 'w': unknown codec 'future-codec'")


_BLOOMIER_EMPTY = [_stored(b""), _stored(b"")]


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (_Spec.tensor(tag=3), "unknown dtype tag 3"),
        (_Spec.tensor(sections=[]), "section 'data' encoding runs past the end of the record"),
        (_Spec.tensor(params=(0,)), "1 unexpected bytes at the end of the record"),
        (_Spec.tensor(codec=1, params=(1,) * 7, sections=_BLOOMIER_EMPTY), "section 'codebook' crc32 needs 4 bytes"),
        (_Spec.tensor(body_tail=b"\x00"), "1 unexpected bytes at the end of the record"),
        (_Spec.tensor(sections=[_stored(bytes(7))]), "raw data is 7 bytes, expected 2 x 4"),
        (_Spec.tensor(sections=[(2, bytes(8), 8)]), "section 'data' has unknown encoding 2"),
        (_Spec.tensor(sections=[(1, _lzma2(bytes(8)), 8)]), "not smaller than its 8"),
        (_Spec.tensor(sections=[(1, b"", 8)]), "compressed section 'data' is empty"),
        (_Spec.tensor(name=b"\xff"), "not valid UTF-8"),
        (_Spec.tensor(name=b""), "name of 0 bytes"),
        (_Spec.tensor(codec=1, params=(1,) * 8, sections=[_stored(b""), _stored(b"\x00" * 3)]),
         "codebook is 3 bytes, not a multiple of 4"),
        (_Spec.tensor(codec=1, params=(1,) * 8, sections=[(1, _lzma2(bytes(99)), 99), _stored(b"")]),
         "section 'cells' may not be compressed"),
    ],
)
def test_malformed_records_are_rejected(tensor, expected):
    assert expected in assert_rejected(_Spec.blob(tensor))


def _varint_field(raw: bytes) -> bytes:
    """A tensor record whose ndim field is the given raw varint bytes (value 1 when read as intended)."""
    body = _Spec.text(b"w") + b"\x01" + raw + b"\x02\x00" + _Spec.table([_stored(bytes(8))])[0]
    return _Spec.frame(body) + bytes(8)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x81\x00", "ndim is not minimally encoded"),
        (b"\x81\x80\x00", "ndim is not minimally encoded"),
        (b"\xff" * 9 + b"\x02", "ndim does not fit in 64 bits"),
        (b"\x81" + b"\x80" * 9 + b"\x00", "ndim is longer than 10 bytes"),
        (b"\xff" * 9 + b"\x01", "18446744073709551615 dimensions (limit 8)"),  # 2^64 - 1 is fine as a varint
    ],
)
def test_varints_must_be_minimal_and_below_2_64(raw, expected):
    assert expected in assert_rejected(_Spec.blob(_varint_field(raw)))
    assert read_blob(_Spec.blob(_varint_field(b"\x01"))).tensors[0].shape == (2,)


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (_Spec1.tensor(tag=3), "unknown dtype tag 3"),
        (_Spec1.tensor(codec=b"Raw"), "invalid codec id"),
        (_Spec1.tensor(sections=[]), "sections [] do not match"),
        (_Spec1.tensor(params=[(b"t", 1)]), "do not match the codec's"),
        (_Spec1.tensor(sections=[_Spec1.stored(b"data", bytes(7))]), "raw data is 7 bytes, expected 2 x 4"),
        (_Spec1.tensor(sections=[(b"data", 2, bytes(8), 8)]), "unknown encoding 2"),
        (_Spec1.tensor(sections=[(b"data", 0, bytes(8), 9)]), "declares 9 decoded bytes but holds 8"),
        (_Spec1.tensor(name=b"\xff"), "not valid UTF-8"),
        (_Spec1.tensor(name=b""), "name of 0 bytes"),
        (_bloomier_1x(params=[(b"t", 1), (b"seed", 0)]), "params not in strictly increasing"),
        (_bloomier_1x(params=[(b"t", 1)]), "params ['t'] do not match the codec's"),
        (_bloomier_1x(sections=[_Spec1.stored(b"codebook", b""), _Spec1.stored(b"cells", b"")]),
         "sections not in strictly increasing"),
        (_bloomier_1x(sections=[_Spec1.stored(b"cells", b""), _Spec1.stored(b"codebook", b"\x00" * 3)]),
         "codebook is 3 bytes, not a multiple of 4"),
        (_bloomier_1x(sections=[(b"cells", 1, _lzma2(b"\x00" * 99), 99), _Spec1.stored(b"codebook", b"")]),
         "section 'cells' may not be compressed"),
    ],
)
def test_malformed_1x_records_are_rejected(tensor, expected):
    assert expected in assert_rejected(_Spec1.blob(tensor))


def test_duplicate_names_and_unsorted_metadata_are_rejected():
    for spec in (_Spec, _Spec1):
        assert "tensor 1 'w': duplicate tensor name" in assert_rejected(spec.blob(spec.tensor(), spec.tensor()))
        unsorted = spec.blob(metadata=[(b"b", b""), (b"a", b"")])
        assert "metadata keys not in strictly increasing order" in assert_rejected(unsorted)


# --- limits: refused before any allocation ------------------------------------------------------------------


def _peak_bytes_while_rejecting(data: bytes) -> tuple[int, str]:
    tracemalloc.start()
    try:
        message = assert_rejected(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, message


@pytest.mark.parametrize(
    ("blob", "expected"),
    [
        (_Spec.blob(_Spec.tensor(shape=(2**20, 2**20))), "has 1099511627776 elements"),  # 2^40
        (_Spec.blob(_Spec.tensor(shape=(0, 2**40))), "dimension 1099511627776 out of range"),
        (_Spec.blob(_Spec.tensor(shape=(2**64 - 1,))), "out of range"),
        (_Spec.blob(_Spec.tensor(shape=(1,) * 9)), "9 dimensions (limit 8)"),
        (_Spec.blob(_Spec.tensor(name=b"n" * 4097)), "name of 4097 bytes"),
        (_Spec.blob(_Spec.frame(_Spec.varint(2**63))), "name of 9223372036854775808 bytes (limit 4096)"),
        (_Spec.blob(_Spec.tensor(sections=[(0, b"", 0, 2**63)])), "raw data is 9223372036854775808 bytes"),
        (_Spec1.blob(_Spec1.tensor(shape=(2**20, 2**20))), "has 1099511627776 elements"),
        (_Spec1.blob(_Spec1.tensor(shape=(2**64 - 1,))), "out of range"),
        (_Spec1.blob(_Spec1.tensor(name=b"n" * 4097)), "name of 4097 bytes"),
        (_Spec1.blob(_Spec1.tensor(sections=[(b"data", 0, b"", 2**63)])),
         "declares 9223372036854775808 decoded bytes"),
    ],
)
def test_hostile_headers_are_refused_without_allocating(blob, expected):
    peak, message = _peak_bytes_while_rejecting(blob)
    assert expected in message
    assert peak < 1 << 20, f"peak {peak} bytes while rejecting"


def test_lzma_claiming_a_huge_tensor_costs_only_its_capped_dictionary():
    """Decompression is bounded by the declared size; the LZMA2 dictionary is capped at 8 MiB whatever it says."""
    bomb_claim = _Spec.tensor(shape=(2**32,), sections=[(1, _lzma2(bytes(64)), 2**34)])
    peak, message = _peak_bytes_while_rejecting(_Spec.blob(bomb_claim))
    assert "does not decompress to exactly its declared 17179869184 bytes" in message
    assert peak < (8 << 20) + (1 << 20), f"peak {peak} bytes while rejecting"


def test_section_lengths_must_fit_in_the_file():
    lying = _Spec.tensor(sections=[(0, bytes(8), 8, 2**62)])
    assert "raw data is 4611686018427387904 bytes" in assert_rejected(_Spec.blob(lying))
    past_end = _Spec.tensor(codec=1, params=(1,) * 8, sections=[(0, b"", 0, 2**62), _stored(b"")])
    peak, message = _peak_bytes_while_rejecting(_Spec.blob(past_end))
    assert "tensor 0 'w': sections run past the end of the file" in message and peak < 1 << 20


def test_counts_are_capped():
    too_many = _Spec.assemble(_Spec.file_record(c.MAX_TENSORS + 1))
    assert "65537 tensors (limit 65536)" in assert_rejected(too_many)
    huge_record = _Spec.assemble(_Spec.varint(2**64 - 1) + bytes(12))
    assert "needs 18446744073709551615 bytes" in assert_rejected(huge_record)
    too_many_1x = _Spec1.assemble(_Spec1.file_record(c.MAX_TENSORS + 1))
    assert "65537 tensors (limit 65536)" in assert_rejected(too_many_1x)
    huge_record_1x = _Spec1.assemble(struct.pack("<I", 2**32 - 1) + bytes(12))
    assert "needs 4294967295 bytes" in assert_rejected(huge_record_1x)
    metadata = _Spec.assemble(_Spec.frame(b"\x00" + _Spec.varint(1025)))
    assert "1025 metadata entries (limit 1024)" in assert_rejected(metadata)
    long_key = _Spec.assemble(_Spec.frame(b"\x00\x01" + _Spec.varint(2**40)))
    assert "metadata 0 key of 1099511627776 bytes (limit 256)" in assert_rejected(long_key)


def test_lzma_stream_must_match_its_declared_size_exactly():
    payload = bytes(64)
    packed = _lzma2(payload)
    too_short = _Spec.tensor(shape=(16,), sections=[(1, _lzma2(payload[:32]), 64)])
    too_long = _Spec.tensor(shape=(16,), sections=[(1, _lzma2(payload + b"x"), 64)])
    trailing = _Spec.tensor(shape=(16,), sections=[(1, packed + b"\x00", 64)])
    garbage = _Spec.tensor(shape=(16,), sections=[(1, b"\xff" * 12, 64)])
    for tensor in (too_short, too_long, trailing, garbage):
        assert "tensor 0 'w': section 'data' does not decompress" in assert_rejected(_Spec.blob(tensor))
    accepted = read_blob(_Spec.blob(_Spec.tensor(shape=(16,), sections=[(1, packed, 64)])))
    assert raw_array(accepted.tensors[0]).tobytes() == payload


# --- writer-side limits --------------------------------------------------------------------------------------


def _bloomier(params=None, codebook: bytes = b"") -> TensorRecord:
    params = dict.fromkeys(BLOOMIER_PARAMS, 1) if params is None else params
    return TensorRecord("x", (1,), "float32", "bloomier", params, {"cells": b"", "codebook": codebook})


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (TensorRecord("n" * 4097, (1,), "float32", "raw", {}, {"data": bytes(4)}), "name of 4097 bytes"),
        (TensorRecord("x", (1,) * 9, "float32", "raw", {}, {"data": bytes(4)}), "9 dimensions"),
        (TensorRecord("x", (2**33,), "float32", "raw", {}, {"data": b""}), "out of range"),
        (TensorRecord("x", (1,), "int8", "raw", {}, {"data": bytes(1)}), "unknown dtype 'int8'"),
        (TensorRecord("x", (1,), "float32", "no-such-codec", {}, {}), "unknown codec 'no-such-codec'"),
        (TensorRecord("x", (1,), "float32", "raw", {}, {"data": bytes(3)}), "raw data is 3 bytes"),
        (TensorRecord("x", (1,), "float32", "raw", {}, {}), "sections [] do not match"),
        (_bloomier({**dict.fromkeys(BLOOMIER_PARAMS, 1), "t": 2**63}), "does not fit in int64"),
        (_bloomier({"t": 1.5}), "expected int"),
        (_bloomier({"T": 1}), "invalid param name 'T'"),
        (_bloomier({"t": 1}), "params ['t'] do not match the codec's"),
        (_bloomier(codebook=bytes(4 * 65536)), "65536 entries"),
    ],
)
def test_writer_refuses_what_the_reader_would(record, expected):
    with pytest.raises(BadInputError, match=re.escape(expected)) as info:
        write_blob(Blob(b"", [record]))
    assert str(info.value).startswith("cannot write .wl blob: tensor 0 ") and "\n" not in str(info.value)


def test_writer_refuses_duplicates_and_oversized_metadata():
    record = raw_record("x", np.zeros(1, np.float32))
    with pytest.raises(BadInputError, match="duplicate tensor name"):
        write_blob(Blob(b"", [record, record]))
    with pytest.raises(BadInputError, match="metadata value of 65536 bytes"):
        write_blob(Blob(b"", [], {"k": "v" * 65536}))
    with pytest.raises(BadInputError, match="metadata key of 0 bytes"):
        write_blob(Blob(b"", [], {"": "v"}))


def test_numpy_integer_params_are_accepted_as_ints():
    record = _bloomier({**dict.fromkeys(BLOOMIER_PARAMS, np.int64(-5)), "t": np.uint8(3)})
    assert read_blob(write_blob(Blob(b"", [record]))).tensors[0].params == {**dict.fromkeys(BLOOMIER_PARAMS, -5),
                                                                             "t": 3}


# --- files and the spec ----------------------------------------------------------------------------------


def test_save_and_load_name_the_file(tmp_path):
    path = tmp_path / "m.wl"
    assert save_blob(path, example_blob()) == path.stat().st_size
    assert load_blob(path) == example_blob()
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(BadInputError, match=r"m\.wl: truncated \.wl blob"):
        load_blob(path)
    with pytest.raises(BadInputError, match="no such file"):
        load_blob(tmp_path / "missing.wl")


def test_format_md_worked_example_matches_the_code():
    text = FORMAT_MD.read_text(encoding="utf-8")
    match = re.search(
        r"<!-- layout-example:begin -->\n```text\n(.*?)```\n<!-- layout-example:end -->", text, re.S
    )
    assert match, "docs/FORMAT.md lost its worked example markers"
    assert match.group(1) == describe_layout(write_blob(example_blob()))


def test_format_md_documents_every_limit_codec_and_dtype():
    text = FORMAT_MD.read_text(encoding="utf-8")
    assert text.startswith(f"# The `.wl` blob format — version {c.FORMAT_MAJOR}.{c.FORMAT_MINOR}\n")
    limits = text.split("## Limits", 1)[1].split("\n## ", 1)[0]
    for value in (
        c.MAX_TENSORS,
        c.MAX_NDIM,
        c.MAX_NAME_BYTES,
        c.MAX_ID_BYTES,
        c.MAX_PARAMS,
        c.MAX_SECTIONS,
        c.MAX_METADATA_ENTRIES,
        c.MAX_METADATA_KEY_BYTES,
        c.MAX_METADATA_VALUE_BYTES,
        c.MAX_CODEBOOK_ENTRIES,
        c.MAX_VARINT_BYTES,
    ):
        assert re.search(rf"\|\s*(.* / )?{value}\b", limits), f"limit {value} missing from docs/FORMAT.md"
    assert "2^32 (4294967296)" in limits and "2^31 bytes" in limits and "8 MiB" in limits
    assert (c.MAX_ELEMENTS, c.MAX_GRAPH_BYTES) == (2**32, 2**31)
    for codec, spec in c.CODECS.items():
        params = ", ".join(f"`{name}`" for name in spec.params) or "none"
        sections = ", ".join(f"`{name}`" + (" ✱" if name in spec.compressible else "") for name in spec.sections)
        assert f"| {spec.tag} | `{codec}` | {params} | {sections} |" in text, f"codec row {codec!r}"
    for name, info in c.DTYPES.items():
        assert f"| {info.tag} | `{name}` | {info.itemsize} |" in text
    assert f"`{c.MAGIC.hex(' ').upper()}`" in text and f"preset {c.LZMA_PRESET}" in text
