"""Shared pieces of the exact clustered-tensor codecs (``sparse``, ``dense``, ``csr-huffman``).

* :func:`order0_bound_bits`: what an ideal order-0 coder needs for a clustered tensor, the yardstick
  every codec's size is reported against.
* Bucketed integers (:func:`bucket_split` / :func:`bucket_join`): a non-negative integer becomes a small
  *bucket symbol* (entropy coded) plus some raw low bits. Values below 16 are their own symbol; larger
  ones keep their leading 1 + 3 mantissa bits in the symbol, so a bucket never spans more than 1/8 of its
  value and a smooth distribution (geometric gaps) loses almost nothing to the raw bits.
* Frequency tables (:func:`make_table`): one byte per symbol, a tiny float (4-bit exponent, 4-bit
  mantissa) that keeps every count to within ~3 %, or for small tensors one nibble per symbol (steps of
  x1.5). Encoder and decoder build their model from the same *stored* bytes, so both see bit-identical
  probabilities; the float conversion inside constriction is then the same on both sides too.
* :class:`AnsWriter` / :class:`AnsReader`: batches of symbols through constriction's ANS coder (a stack:
  batches are pushed in reverse so they pop off in the order they were written). Every batch is one
  numpy call, never a Python loop per symbol.

The byte-exact definitions are in ``docs/codecs/exact.md``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import constriction
import numpy as np

from weightless_cli.codecs.clustered import SparseCode
from weightless_cli.errors import BadInputError

__all__ = [
    "MANTISSA_BITS",
    "MAX_BUCKET_SYMBOLS",
    "AnsReader",
    "AnsWriter",
    "ByteReader",
    "bucket_join",
    "bucket_split",
    "bucket_widths",
    "cross_entropy_bits",
    "entropy_bits",
    "ids_dtype",
    "order0_bound_bits",
    "Table",
    "bucket_table",
    "make_table",
    "make_tables",
    "varint",
]

# --- the yardstick --------------------------------------------------------------------------------------------


def entropy_bits(counts: np.ndarray) -> float:
    """Total empirical (order-0) information of a sequence with these symbol counts, in bits."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    total = counts.sum()
    return float(-(counts * np.log2(counts / total)).sum()) if total else 0.0


def log2_binomial(n: int, k: int) -> float:
    """log2 C(n, k), via lgamma so it works for tensors of billions of positions."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def order0_bound_bits(code: SparseCode) -> float:
    """log2 C(N, n) + n·H(ids): an ideal coder of *which* n of N positions are nonzero plus an order-0
    coder of their codebook indices. Exploiting structure (dead rows, per-row density) beats it."""
    n = int(code.positions.size)
    ids = np.bincount(np.asarray(code.ids, dtype=np.int64), minlength=max(code.k, 1))
    return log2_binomial(int(code.size), n) + entropy_bits(ids)


def ids_dtype(k: int) -> type:
    """The dtype of a decoded index array: uint16 holds K ≤ 65535 codebook entries plus 'zero' (= K)."""
    return np.uint16 if k < 2**16 else np.uint32


# --- bucketed integers ---------------------------------------------------------------------------------------

MANTISSA_BITS = 3
_DIRECT = 1 << (MANTISSA_BITS + 1)  # values below this are their own symbol
MAX_VALUE = 2**32 - 1  # largest value a bucket can carry (gaps and counts are below 2^32 elements)
# symbols 0..15 direct; then 8 symbols for each raw width 1..28 (a 32-bit value keeps 4 bits in its symbol)
MAX_BUCKET_SYMBOLS = _DIRECT + (32 - 1 - MANTISSA_BITS) * (1 << MANTISSA_BITS)


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Bit length of non-negative integers below 2^53 (frexp is exact there)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def bucket_split(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-negative integers → (bucket symbol, raw width, raw low bits), all int64."""
    values = np.asarray(values, dtype=np.int64)
    big = values >= _DIRECT
    width = np.where(big, _bit_length(values) - 1 - MANTISSA_BITS, 0)
    mantissa = (values >> width) - (1 << MANTISSA_BITS)
    symbols = np.where(big, _DIRECT + ((width - 1) << MANTISSA_BITS) + mantissa, values)
    return symbols, width, values & ((np.int64(1) << width) - 1)


def bucket_widths(symbols: np.ndarray) -> np.ndarray:
    """Raw low bits carried with each bucket symbol (0 for the direct symbols below 16)."""
    symbols = np.asarray(symbols, dtype=np.int64)
    return np.where(symbols >= _DIRECT, ((symbols - _DIRECT) >> MANTISSA_BITS) + 1, 0)


def bucket_join(symbols: np.ndarray, low_bits: np.ndarray) -> np.ndarray:
    """Inverse of :func:`bucket_split` (``low_bits`` must be below 2^width; the raw coder guarantees it)."""
    symbols = np.asarray(symbols, dtype=np.int64)
    width = bucket_widths(symbols)
    top = (1 << MANTISSA_BITS) + ((symbols - _DIRECT) & ((1 << MANTISSA_BITS) - 1))
    return np.where(symbols >= _DIRECT, (top << width) | low_bits, symbols)


# --- stored frequency tables ---------------------------------------------------------------------------------

TABLE_BYTE, TABLE_NIBBLE = 0, 1


def _byte_values() -> np.ndarray:
    """Frequency of each byte of a byte table: 0..31 exactly, then (16 + m)·2^e for byte 16·(e+1) + m."""
    codes = np.arange(256, dtype=np.int64)
    exponent = np.maximum((codes >> 4) - 1, 0)
    return np.where(codes < 32, codes, (16 + (codes & 15)) << exponent)


# Frequency of each nibble of a nibble table: steps of x1.5 and x1.33 from 2 to 256 (0 = unused symbol).
_NIBBLE_VALUES = np.array([0, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256], dtype=np.int64)
_VALUES = {TABLE_BYTE: _byte_values(), TABLE_NIBBLE: _NIBBLE_VALUES}
MAX_TABLE_SYMBOLS = 2**16  # a dense codebook index table: 65535 entries plus zero


@dataclass(frozen=True)
class Table:
    """A stored model: ``data`` is its self-delimiting bytes, ``freqs`` the frequencies both sides code with."""

    data: bytes
    freqs: np.ndarray

    def bits(self, counts: np.ndarray) -> float:
        """What the table plus symbols with these counts cost, in bits (ANS comes within ~0.1 % of it)."""
        return 8 * len(self.data) + cross_entropy_bits(counts, self.freqs)


def _quantize(counts: np.ndarray, kind: int) -> np.ndarray:
    """Nearest stored code in log scale (x is nearer to a than to b when x² < a·b) for each count, after
    scaling each row's largest to the top code. Only IEEE basic operations: the same codes on every machine."""
    values = _VALUES[kind].astype(np.float64)
    peak = np.maximum(counts.max(axis=-1, keepdims=True), 1.0)
    scaled = np.maximum(counts * np.minimum(1.0, values[-1] / peak), 1.0)
    upper = np.clip(np.searchsorted(values[1:], scaled) + 1, 1, values.size - 1)  # first code >= scaled
    lower = np.maximum(upper - 1, 1)
    codes = np.where(scaled * scaled < values[lower] * values[upper], lower, upper)
    return np.where(counts > 0, codes, 0)


def _table(codes: np.ndarray, kind: int) -> Table:
    if kind == TABLE_BYTE:
        payload = codes.astype(np.uint8).tobytes()
    else:
        padded = np.concatenate((codes, np.zeros(codes.size % 2, dtype=codes.dtype)))
        payload = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8).tobytes()
    return Table(varint(codes.size << 1 | kind) + payload, _VALUES[kind][codes].astype(np.float64))


def _model_bits(counts: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Row-wise cross entropy of counts under freqs (0 for rows whose model allows one symbol)."""
    totals = freqs.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = -np.where(counts > 0, counts * np.log2(freqs / totals), 0.0).sum(axis=-1)
    return np.where(np.count_nonzero(freqs, axis=-1) > 1, bits, 0.0)


def make_tables(counts: np.ndarray) -> list[Table]:
    """One stored model per row of ``counts``: byte or nibble precision, whichever costs less in total."""
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    used = np.where(counts.any(axis=-1), counts.shape[-1] - np.argmax(counts[:, ::-1] > 0, axis=-1), 0)
    codes = {kind: _quantize(counts, kind) for kind in (TABLE_BYTE, TABLE_NIBBLE)}
    bits = {kind: 8 * (used if kind == TABLE_BYTE else (used + 1) // 2) + _model_bits(counts, _VALUES[kind][c])
            for kind, c in codes.items()}
    kinds = np.where(bits[TABLE_NIBBLE] < bits[TABLE_BYTE], TABLE_NIBBLE, TABLE_BYTE)
    return [_table(codes[kind][row, :size], kind) for row, (kind, size) in enumerate(zip(kinds, used, strict=True))]


def make_table(counts: np.ndarray) -> Table:
    """The stored model for symbols with these counts (see :func:`make_tables`)."""
    return make_tables(np.asarray(counts)[np.newaxis])[0]


def cross_entropy_bits(counts: np.ndarray, freqs: np.ndarray) -> float:
    """Bits to code symbols with these counts with a model of these frequencies (0 for a one-symbol model)."""
    counts = np.asarray(counts, dtype=np.float64)
    used = np.flatnonzero(counts)
    if used.size == 0 or np.count_nonzero(freqs) == 1:
        return 0.0
    return float(-(counts[used] * np.log2(freqs[used] / freqs.sum())).sum())


# --- small byte-level helpers --------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """LEB128: 7 bits per byte, low groups first, high bit set on every byte but the last."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class ByteReader:
    """Bounds-checked parsing of a codec's small table section; every problem is a one-line BadInputError."""

    MAX_VARINT_BYTES = 10

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = memoryview(data).cast("B"), 0, what

    def fail(self, problem: str) -> BadInputError:
        return BadInputError(f"corrupt {self.what}: {problem}")

    def varint(self, limit: int, label: str) -> int:
        value = shift = 0
        for _ in range(self.MAX_VARINT_BYTES):
            if self.pos >= len(self.data):
                raise self.fail(f"{label} runs past the end")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if value > limit:
                    raise self.fail(f"{label} is {value} (limit {limit})")
                return value
        raise self.fail(f"{label} is not a valid varint")

    def take(self, size: int, label: str) -> bytes:
        if size > len(self.data) - self.pos:
            raise self.fail(f"{label} needs {size} bytes, only {len(self.data) - self.pos} remain")
        chunk = bytes(self.data[self.pos : self.pos + size])
        self.pos += size
        return chunk

    def table(self, max_symbols: int, label: str) -> np.ndarray:
        """A stored table (see :func:`make_table`); returns its frequencies."""
        header = self.varint(2 * max_symbols + 1, f"{label} header")
        symbols, kind = header >> 1, header & 1
        if symbols > max_symbols:
            raise self.fail(f"{label} has {symbols} symbols (limit {max_symbols})")
        raw = np.frombuffer(self.take(symbols if kind == TABLE_BYTE else (symbols + 1) // 2, label), np.uint8)
        if kind == TABLE_NIBBLE:
            codes = np.stack((raw & 15, raw >> 4), axis=1).ravel()
            if symbols % 2 and codes[-1]:
                raise self.fail(f"{label} has a nonzero padding nibble")
            raw = codes[:symbols]
        return _VALUES[kind][raw].astype(np.float64)

    def done(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} unexpected bytes at the end")


# --- the ANS stream ------------------------------------------------------------------------------------------

_CHUNK = 1 << 20  # symbols per constriction call: bounds the int32 temporaries whatever the tensor size
_RAW_CHUNK_BITS = 16  # raw bits go through Uniform(2^w) models, which constriction caps below 2^24


def _single_symbol(freqs: np.ndarray) -> int | None:
    """The only symbol a table allows, or None when it allows several (ANS cannot code a certainty)."""
    used = np.flatnonzero(freqs)
    return int(used[0]) if used.size == 1 else None


def _categorical(freqs: np.ndarray) -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(freqs, perfect=False)


def _raw_chunks(widths: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """(which values, shift, bits) per 16-bit slice: raw values are coded low slice first."""
    slices = []
    for shift in range(0, int(widths.max(initial=0)), _RAW_CHUNK_BITS):
        which = np.flatnonzero(widths > shift)
        slices.append((which, shift, _RAW_CHUNK_BITS))
    return slices


@dataclass
class _Batch:
    symbols: np.ndarray
    model: object
    sizes: np.ndarray | None = None  # per-symbol Uniform sizes, for raw bits


class AnsWriter:
    """Collects batches of symbols in decode order; :meth:`finish` pushes them on one ANS stack."""

    def __init__(self) -> None:
        self._batches: list[_Batch] = []

    def symbols(self, symbols: np.ndarray, freqs: np.ndarray) -> None:
        """Code ``symbols`` (each with a nonzero frequency) with the model ``freqs``."""
        symbols = np.asarray(symbols, dtype=np.int64)
        if symbols.size == 0:
            return
        if symbols.max() >= freqs.size or not freqs[symbols].all():
            raise ValueError("symbol outside its table")  # an encoder bug, never user input
        if _single_symbol(freqs) is None:
            self._batches.append(_Batch(symbols.astype(np.int32), _categorical(freqs)))

    def binary(self, flags: np.ndarray) -> None:
        """A 0/1 sequence, coded with its own exact counts (the reader is given the count of ones)."""
        flags = np.asarray(flags, dtype=np.int64)
        ones = int(flags.sum())
        if 0 < ones < flags.size:
            model = _categorical(np.array([flags.size - ones, ones], dtype=np.float64))
            self._batches.append(_Batch(flags.astype(np.int32), model))

    def raw(self, values: np.ndarray, widths: np.ndarray) -> None:
        """Values uniformly distributed below 2^width (width 0 codes nothing)."""
        values = np.asarray(values, dtype=np.int64)
        widths = np.asarray(widths, dtype=np.int64)
        for which, shift, bits in _raw_chunks(widths):
            width = np.minimum(widths[which] - shift, bits)
            chunk = (values[which] >> shift) & ((np.int64(1) << width) - 1)
            sizes = (np.int64(1) << width).astype(np.int32)
            self._batches.append(_Batch(chunk.astype(np.int32), constriction.stream.model.Uniform(), sizes))

    def bucketed(self, values: np.ndarray, freqs: np.ndarray) -> None:
        symbols, widths, low = bucket_split(values)
        self.symbols(symbols, freqs)
        self.raw(low, widths)

    def finish(self) -> bytes:
        coder = constriction.stream.stack.AnsCoder()
        for batch in reversed(self._batches):
            for stop in range(batch.symbols.size, 0, -_CHUNK):  # last chunk first: a stack pops it last
                start = max(stop - _CHUNK, 0)
                if batch.sizes is None:
                    coder.encode_reverse(batch.symbols[start:stop], batch.model)
                else:
                    coder.encode_reverse(batch.symbols[start:stop], batch.model, batch.sizes[start:stop])
        return _words_to_bytes(coder.get_compressed())


def _words_to_bytes(words: np.ndarray) -> bytes:
    return words.astype("<u4").tobytes()


class AnsReader:
    """Pops batches off an ANS stream in the order :class:`AnsWriter` wrote them."""

    def __init__(self, data: bytes, what: str) -> None:
        self.what = what
        if len(data) % 4:
            raise BadInputError(f"corrupt {what}: {len(data)} bytes is not a whole number of 32-bit words")
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        if words.size and words[-1] == 0:
            raise BadInputError(f"corrupt {what}: the stream ends in a zero word")
        if sys.byteorder != "little":  # pragma: no cover - constriction wants native words
            words = words.byteswap()
        self._coder = constriction.stream.stack.AnsCoder(words)

    def _decode(self, count: int, model: object, sizes: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(count, dtype=np.int32)
        for start in range(0, count, _CHUNK):
            stop = min(start + _CHUNK, count)
            if sizes is None:
                out[start:stop] = self._coder.decode(model, stop - start)
            else:
                out[start:stop] = self._coder.decode(model, sizes[start:stop])
        return out

    def symbols(self, count: int, freqs: np.ndarray, label: str) -> np.ndarray:
        """``count`` symbols (int32, each below ``freqs.size``) coded with the model ``freqs``."""
        if count == 0:
            return np.zeros(0, dtype=np.int32)
        if not freqs.any():
            raise BadInputError(f"corrupt {self.what}: the {label} table is empty but {count} symbols use it")
        only = _single_symbol(freqs)
        if only is not None:
            return np.full(count, only, dtype=np.int32)
        return self._decode(count, _categorical(freqs))

    def binary(self, count: int, ones: int) -> np.ndarray:
        """``count`` flags of which exactly ``ones`` must be 1 (checked)."""
        if ones in (0, count):
            return np.full(count, 1 if ones else 0, dtype=np.int32)
        flags = self._decode(count, _categorical(np.array([count - ones, ones], dtype=np.float64)))
        if int(flags.sum()) != ones:
            raise BadInputError(f"corrupt {self.what}: a bitmap holds {int(flags.sum())} ones, expected {ones}")
        return flags

    def raw(self, widths: np.ndarray) -> np.ndarray:
        widths = np.asarray(widths, dtype=np.int64)
        values = np.zeros(widths.size, dtype=np.int64)
        for which, shift, bits in _raw_chunks(widths):
            sizes = (np.int64(1) << np.minimum(widths[which] - shift, bits)).astype(np.int32)
            values[which] |= self._decode(which.size, constriction.stream.model.Uniform(), sizes).astype(
                np.int64
            ) << shift
        return values

    def bucketed(self, count: int, freqs: np.ndarray, label: str) -> np.ndarray:
        if freqs.size > MAX_BUCKET_SYMBOLS:
            raise BadInputError(f"corrupt {self.what}: the {label} table has {freqs.size} symbols")
        symbols = self.symbols(count, freqs, label)
        return bucket_join(symbols, self.raw(bucket_widths(symbols)))

    def finish(self) -> None:
        """The stream must be used up exactly (a valid stream returns to the coder's initial state)."""
        if not self._coder.is_empty():
            raise BadInputError(f"corrupt {self.what}: data left over after the last symbol")


def bucket_table(values: np.ndarray) -> tuple[Table, float]:
    """The stored table for bucketed ``values`` and the bits it costs: table + symbols + raw bits."""
    symbols, widths, _ = bucket_split(values)
    counts = np.bincount(symbols, minlength=1)
    table = make_table(counts)
    return table, table.bits(counts) + float(widths.sum())
