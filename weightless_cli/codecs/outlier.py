"""``outlier``: a tensor of few shared values plus a few exact outliers (value-aware quantization).

Value-aware (outlier-aware) quantization (Park, Yoo and Vajda, ECCV 2018) keeps the largest-magnitude few
weights at high precision and quantizes the rest to a handful of levels. This codec stores such a tensor
exactly:

* the *dense* part as indices into a codebook of K values, bit-packed at ``ceil(log2 K)`` bits each;
* the *outliers* (every value not in the codebook) sparsely: their positions gap-coded with a Rice code,
  and their values as float16 when that is exact (``wide`` = 0), else in the tensor's own dtype.

The encoder needs no side information: the codebook is the K most frequent values, with K chosen to
minimise the estimated size, so any tensor round-trips bit for bit (a tensor with few distinct values and
few stragglers is what it is good at). The byte-level format is ``docs/codecs/outlier.md``.

The Rice-coded positions (:func:`encode_positions` / :func:`decode_positions`) are shared with the
``rowwise`` codec's exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weightless_cli.codecs.bitpack import pack_bits, packed_size, unpack_bits
from weightless_cli.codecs.container import array_to_bytes, bytes_to_array, dtype_of
from weightless_cli.codecs.dpred import bit_patterns, numpy_dtype, round_to
from weightless_cli.errors import BadInputError

__all__ = [
    "MAX_K",
    "PARAM_NAMES",
    "SECTIONS",
    "Split",
    "decode",
    "decode_positions",
    "encode",
    "encode_positions",
    "float16_exact",
    "split",
]

MAX_K = 2**16 - 1  # codebook entries; indices are at most 16 bits
MAX_RICE_K = 16  # low bits per gap (bitpack's limit); the unary part carries the rest
PARAM_NAMES = ("k", "outliers", "rice_k", "wide")
SECTIONS = ("codebook", "gaps_high", "gaps_low", "ids", "outliers")


# --- Rice-coded positions ---------------------------------------------------------------------------------------


def _gaps(positions: np.ndarray) -> np.ndarray:
    """Strictly increasing positions → the zeros skipped before each one."""
    positions = np.asarray(positions, dtype=np.int64)
    return np.diff(positions, prepend=-1) - 1


def _rice_bits(gaps: np.ndarray, k: int) -> int:
    return int((gaps >> k).sum()) + gaps.size * (k + 1)


def encode_positions(positions: np.ndarray) -> tuple[int, bytes, bytes]:
    """(rice_k, high, low) for strictly increasing ``positions``.

    Each gap g (zeros skipped) is split into ``g >> k``, written in unary as that many 0 bits and a 1 bit
    (``high``, LSB-first), and its low ``k`` bits (``low``, bit-packed). ``k`` minimises the total.
    """
    gaps = _gaps(positions)
    if gaps.size == 0:
        return 0, b"", b""
    k = min(range(MAX_RICE_K + 1), key=lambda bits: (_rice_bits(gaps, bits), bits))
    ends = np.cumsum((gaps >> k) + 1) - 1  # the 1 bit closing each gap's unary part
    unary = np.zeros(int(ends[-1]) + 1, dtype=np.uint8)
    unary[ends] = 1
    low = pack_bits(gaps & ((1 << k) - 1), k) if k else b""
    return k, np.packbits(unary, bitorder="little").tobytes(), low


def decode_positions(count: int, rice_k: int, high: bytes, low: bytes, size: int, what: str) -> np.ndarray:
    """Inverse of :func:`encode_positions`: ``count`` strictly increasing positions below ``size``."""
    if not 0 <= rice_k <= MAX_RICE_K:
        raise BadInputError(f"corrupt {what}: rice_k = {rice_k} is outside 0..{MAX_RICE_K}")
    if not 0 <= count <= size:
        raise BadInputError(f"corrupt {what}: {count} positions in a tensor of {size}")
    ones = np.flatnonzero(np.unpackbits(np.frombuffer(high, dtype=np.uint8), bitorder="little"))
    if ones.size != count or (count and len(high) != packed_size(int(ones[-1]) + 1, 1)):
        raise BadInputError(f"corrupt {what}: the unary gap stream does not hold exactly {count} gaps")
    if rice_k:
        remainders = unpack_bits(low, rice_k, count).astype(np.int64)
    elif low:
        raise BadInputError(f"corrupt {what}: low gap bits present with rice_k = 0")
    else:
        remainders = np.zeros(count, dtype=np.int64)
    gaps = ((np.diff(ones, prepend=-1) - 1) << rice_k) | remainders
    positions = np.cumsum(gaps + 1) - 1
    if count and int(positions[-1]) >= size:
        raise BadInputError(f"corrupt {what}: a position is beyond the tensor's {size} values")
    return positions


# --- splitting a tensor into codebook and outliers ----------------------------------------------------------


def float16_exact(values: np.ndarray) -> np.ndarray:
    """Which ``values`` survive a trip through float16 bit for bit."""
    values = np.asarray(values)
    with np.errstate(over="ignore", invalid="ignore"):
        half = values.astype(np.float64).astype(np.float16)
    return bit_patterns(round_to(half.astype(np.float64), dtype_of(values))) == bit_patterns(values)


def _id_bits(k: np.ndarray | int) -> np.ndarray:
    """Index width for a codebook of k entries: ceil(log2 k), 0 for k <= 1."""
    return np.frexp(np.maximum(np.asarray(k, dtype=np.float64) - 1, 0))[1].astype(np.int64)


@dataclass(frozen=True)
class Split:
    """A tensor as codebook indices plus outliers (flat positions ascending)."""

    codebook: np.ndarray  # the K shared values, ascending by bit pattern, in the tensor's dtype
    ids: np.ndarray  # codebook index of every non-outlier position, in position order (int64)
    positions: np.ndarray  # flat positions of the outliers, ascending (int64)
    outliers: np.ndarray  # their values, in the tensor's dtype


def _estimated_bits(counts: np.ndarray, exact16: np.ndarray, itemsize: int) -> np.ndarray:
    """Estimated size of keeping the K most frequent values in the codebook, for K = 1..min(D, MAX_K).

    ``counts`` and ``exact16`` describe the D distinct values, most frequent first.
    """
    n_values = int(counts.sum())
    k = np.arange(1, min(counts.size, MAX_K) + 1)
    n_out = n_values - np.cumsum(counts)[: k.size]
    # The outliers are stored wide as soon as one of them (ranks K and later) is not float16-exact.
    inexact_from = np.append(np.flip(np.cumsum(np.flip(~exact16))) > 0, False)
    value_bits = np.where(inexact_from[k], 8 * itemsize, 16)
    position_bits = np.log2(n_values / np.maximum(n_out, 1)) + 2  # Rice code, about
    return 8 * itemsize * k + (n_values - n_out) * _id_bits(k) + n_out * (value_bits + position_bits)


def split(values: np.ndarray, k: int | None = None) -> Split:
    """Codebook = the ``k`` most frequent values (ties: lower bit pattern first); the rest are outliers.

    ``k`` None picks the codebook size that minimises the estimated encoded size.
    """
    values = np.asarray(values)
    flat = values.reshape(-1)
    patterns = bit_patterns(flat)
    distinct, first, inverse, counts = np.unique(patterns, return_index=True, return_inverse=True,
                                                 return_counts=True)
    by_frequency = np.lexsort((distinct, -counts))
    if k is None:
        exact16 = float16_exact(flat[first[by_frequency]])
        estimate = _estimated_bits(counts[by_frequency], exact16, flat.dtype.itemsize)
        k = int(np.argmin(estimate)) + 1 if estimate.size else 0
    if not 0 <= k <= MAX_K:
        raise ValueError(f"codebook size must be in 0..{MAX_K}, got {k}")
    chosen = np.sort(by_frequency[:k])  # ascending bit pattern
    slot = np.full(distinct.size, -1, dtype=np.int64)
    slot[chosen] = np.arange(chosen.size)
    index = slot[inverse]
    outlier = index < 0
    return Split(flat[first[chosen]], index[~outlier], np.flatnonzero(outlier), flat[outlier])


# --- the codec -----------------------------------------------------------------------------------------------


def encode(values: np.ndarray, k: int | None = None) -> tuple[dict[str, int], dict[str, bytes]]:
    """Params and sections storing ``values`` exactly (see :func:`split` for ``k``)."""
    values = np.asarray(values)
    dtype = dtype_of(values)
    parts = split(values, k)
    wide = not float16_exact(parts.outliers).all()
    stored = parts.outliers if wide else parts.outliers.astype(np.float64).astype(np.float16)
    rice_k, high, low = encode_positions(parts.positions)
    bits = int(_id_bits(parts.codebook.size))
    params = {"k": int(parts.codebook.size), "outliers": int(parts.positions.size), "rice_k": rice_k,
              "wide": int(wide)}
    sections = {
        "codebook": array_to_bytes(parts.codebook, dtype),
        "gaps_high": high,
        "gaps_low": low,
        "ids": pack_bits(parts.ids, bits) if bits else b"",
        "outliers": array_to_bytes(stored, dtype if wide else "float16"),
    }
    return params, sections


def _fail(problem: str) -> BadInputError:
    return BadInputError(f"corrupt outlier data: {problem}")


def _check_params(params: dict[str, int], n_values: int) -> None:
    if set(params) != set(PARAM_NAMES):
        raise _fail(f"params {sorted(params)} are not {sorted(PARAM_NAMES)}")
    k, count = params["k"], params["outliers"]
    if not 0 <= k <= MAX_K:
        raise _fail(f"k = {k} is outside 0..{MAX_K}")
    if not 0 <= count <= n_values:
        raise _fail(f"{count} outliers in a tensor of {n_values} values")
    if k == 0 and count < n_values:
        raise _fail("no codebook but some values are not outliers")
    if params["wide"] not in (0, 1):
        raise _fail(f"wide = {params['wide']}, expected 0 or 1")


def _read_array(data: bytes, count: int, dtype: str, what: str) -> np.ndarray:
    itemsize = numpy_dtype(dtype).itemsize
    if len(data) != count * itemsize:
        raise _fail(f"{what} section is {len(data)} bytes, expected {count} x {itemsize}")
    return bytes_to_array(data, dtype).view(numpy_dtype(dtype))


def decode(params: dict[str, int], sections: dict[str, bytes], shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The tensor, bit-exact, in ``dtype`` (bfloat16 as ml_dtypes.bfloat16). Corrupt input: BadInputError."""
    n_values = int(np.prod(shape, dtype=np.int64))
    _check_params(params, n_values)
    k, count = params["k"], params["outliers"]
    codebook = _read_array(sections["codebook"], k, dtype, "codebook")
    patterns = bit_patterns(codebook)  # unsigned: a cast to int64 would wrap float64's sign bit
    if k > 1 and not (patterns[1:] > patterns[:-1]).all():
        raise _fail("codebook entries are not in strictly increasing bit-pattern order")
    stored = _read_array(sections["outliers"], count, dtype if params["wide"] else "float16", "outliers")
    positions = decode_positions(count, params["rice_k"], sections["gaps_high"], sections["gaps_low"], n_values,
                                 "outlier data")
    bits, dense = int(_id_bits(k)), n_values - count
    if bits:
        ids = unpack_bits(sections["ids"], bits, dense).astype(np.int64)
        if dense and int(ids.max()) >= k:
            raise _fail(f"a codebook index is {int(ids.max())}, the codebook has {k} entries")
    elif sections["ids"]:
        raise _fail("ids present for a codebook of at most one entry")
    else:
        ids = np.zeros(dense, dtype=np.int64)
    out = np.empty(n_values, dtype=numpy_dtype(dtype))
    is_dense = np.ones(n_values, dtype=bool)
    is_dense[positions] = False
    out[is_dense] = codebook[ids] if dense else codebook[:0]
    out[positions] = stored if params["wide"] else round_to(stored.astype(np.float64), dtype)
    return out.reshape(shape)
