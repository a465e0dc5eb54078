"""``dpred``: fixed-point weights, each group of 16 stored at the precision its largest magnitude needs.

Dynamic Precision Reduction (Delmas et al., "DPRed", 2018) observes that the values of a fixed-point layer
cluster near zero: a group of 16 consecutive integers rarely needs all of the declared precision. Each group
gets a small header (3 bits for 8-bit data, 4 bits for 16-bit data) giving the magnitude width ``h`` of its
largest value, and each value is stored as ``h`` magnitude bits plus a sign bit (an all-zero group costs only
its header).

A tensor is fixed-point when every value is ``q · s`` rounded to the tensor's dtype, with ``q`` an integer
of magnitude at most 32767 and ``s`` one scale for the tensor or one per channel (axis 0). The encoder finds
``s`` and ``q`` from the values themselves (:func:`fit_grid`) and refuses a tensor that is not on such a grid,
so decoding is bit-exact. :func:`uniform_scales` is the scale rule of ``weightless quantize --method
uniform``; the search starts there. The byte-level format is ``docs/codecs/dpred.md``.

This module also holds the float helpers the fixed-point codecs share (:func:`round_to`, :func:`numpy_dtype`,
:func:`bit_patterns`): every decoded value is an exactly computed real number rounded *once* to the tensor's
dtype, so decoders on any platform agree to the bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from weightless_cli.codecs.bitpack import pack_bits, packed_size, unpack_bits
from weightless_cli.codecs.container import DTYPES, array_to_bytes, bytes_to_array, dtype_of
from weightless_cli.errors import BadInputError, UsageError

__all__ = [
    "GROUP",
    "MAX_BITS",
    "PARAM_NAMES",
    "SECTIONS",
    "FixedPoint",
    "bit_patterns",
    "decode",
    "dequantize",
    "encode",
    "fit_grid",
    "numpy_dtype",
    "quantize_rows",
    "round_to",
    "row_count",
    "significand_bits",
    "uniform_scales",
]

GROUP = 16  # values per group, as in the paper
MAX_BITS = 16  # widest fixed-point data: |q| <= 2^15 - 1
HEADER_BITS = {8: 3, 16: 4}  # header width for each data precision the codec stores
PARAM_NAMES = ("bits", "per_channel")
SECTIONS = ("headers", "scales", "values")
_CHUNK = 1 << 20  # values per pass (a multiple of GROUP), so temporaries stay near 100 MiB
_CANDIDATE_STEPS = (0, -1, 1, -2, 2)  # ulps around the rule's scale tried by the grid search
_PREFIX = 256  # values of a row a candidate scale must reproduce before the whole row is checked


# --- float helpers shared by the fixed-point codecs ----------------------------------------------------------


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a container dtype name (bfloat16 is ml_dtypes' type, as onnx hands it out)."""
    if dtype == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return np.dtype(DTYPES[dtype].numpy)


def round_to(exact: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded once, to nearest with ties to even, to ``dtype``.

    numpy rounds float64 to float32 and float16 correctly. ml_dtypes goes to bfloat16 through float32,
    which rounds twice; rounding to float32 *to odd* first makes the second rounding exact (24 >= 8 + 2
    bits), so the result is the correctly rounded bfloat16.
    """
    exact = np.asarray(exact, dtype=np.float64)
    if dtype != "bfloat16":
        # Out-of-range values (only from a forged scale) become inf, which the decoder then refuses.
        with np.errstate(over="ignore"):
            return exact.astype(numpy_dtype(dtype))
    nearest = exact.astype(np.float32)
    widened = nearest.astype(np.float64)
    inexact = widened != exact
    pattern = nearest.view(np.uint32).copy()
    pattern -= (inexact & (np.abs(widened) > np.abs(exact))).astype(np.uint32)  # truncate toward zero
    pattern |= inexact.astype(np.uint32)  # then mark "inexact" in the last bit
    return pattern.view(np.float32).astype(ml_dtypes.bfloat16)


def bit_patterns(values: np.ndarray) -> np.ndarray:
    """The raw bits of float ``values`` as unsigned integers (so -0.0 and 0.0 differ, NaNs compare)."""
    values = np.asarray(values)
    return values.view(f"u{values.dtype.itemsize}")


def _smallest_normal(dtype: str) -> float:
    return float(ml_dtypes.finfo(numpy_dtype(dtype)).smallest_normal)


def significand_bits(dtype: str) -> int:
    """Significant bits of ``dtype`` (11 for float16, 8 for bfloat16, 24 for float32, 53 for float64)."""
    return int(ml_dtypes.finfo(numpy_dtype(dtype)).nmant) + 1


def _step(values: np.ndarray, ulps: int, dtype: str) -> np.ndarray:
    """Positive ``values`` (float64 holding dtype values) moved by ``ulps`` units in the last place."""
    patterns = bit_patterns(round_to(values, dtype)).astype(np.int64) + ulps
    patterns = np.maximum(patterns, 1)  # stay positive: a zero scale is not a candidate
    return patterns.astype(f"u{numpy_dtype(dtype).itemsize}").view(numpy_dtype(dtype)).astype(np.float64)


def row_count(shape: tuple[int, ...], per_channel: bool) -> int:
    """How many scales a tensor has: one per slice along axis 0 (per channel), else one.

    Per channel needs two or more dimensions and at least one value: an empty tensor has one scale.
    """
    channels = per_channel and len(shape) >= 2 and int(np.prod(shape, dtype=np.int64)) > 0
    return int(shape[0]) if channels else 1


def as_rows(flat: np.ndarray, rows: int) -> np.ndarray:
    """``flat`` as ``rows`` equal rows (an empty tensor gives empty rows)."""
    return flat.reshape(rows, flat.size // rows if rows else 0)


def _rows(values: np.ndarray, per_channel: bool) -> np.ndarray:
    return as_rows(np.asarray(values).reshape(-1), row_count(np.shape(values), per_channel))


# --- the fixed-point model --------------------------------------------------------------------------------------


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def uniform_scales(magnitudes: np.ndarray, bits: int, dtype: str) -> np.ndarray:
    """The scale rule: largest magnitude / (2^(bits-1) - 1), rounded to the dtype (float64 holding it).

    A zero row gets scale 0. A scale below the dtype's smallest normal number is raised to it: a subnormal
    scale has too few significant bits for the largest value to land on the top level, which both the
    error bound and the encoder's search rely on.
    """
    magnitudes = np.asarray(magnitudes, dtype=np.float64)
    scales = round_to(magnitudes / _qmax(bits), dtype).astype(np.float64)
    return np.where(magnitudes > 0, np.maximum(scales, _smallest_normal(dtype)), 0.0)


def _integers(rows: np.ndarray, scales: np.ndarray, qmax: int) -> np.ndarray:
    """Nearest integers of rows / scale, clipped to ±qmax (0 where the scale is 0); int64, never -0."""
    safe = np.where(scales > 0, scales, 1.0)[:, None]
    with np.errstate(over="ignore"):  # a far too small candidate scale: clipped, then rejected
        q = np.clip(np.rint(rows / safe), -qmax, qmax)
    return np.where(scales[:, None] > 0, q, 0).astype(np.int64)


def dequantize(ints: np.ndarray, scales: np.ndarray, dtype: str) -> np.ndarray:
    """q · s rounded once to ``dtype``; ``ints`` is (rows, n) and ``scales`` float64 (rows,).

    |q| < 2^15 and s has at most 24 significant bits, so the float64 product is exact for every dtype
    but float64, where it is the one correctly rounded multiplication.
    """
    return round_to(ints.astype(np.float64) * scales[:, None], dtype)


def quantize_rows(rows: np.ndarray, bits: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(integers, scales) of symmetric uniform quantization of each row of ``rows`` (float64)."""
    if not 2 <= bits <= MAX_BITS:
        raise UsageError(f"uniform quantization needs 2..{MAX_BITS} bits, got {bits}")
    if bits > significand_bits(dtype):
        # Finer levels than the dtype resolves: the largest value could miss the top level.
        raise UsageError(f"{dtype} holds {significand_bits(dtype)} significant bits; use at most that many bits")
    rows = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(rows).all():
        raise UsageError("cannot quantize non-finite weights (inf or NaN)")
    scales = uniform_scales(np.abs(rows).max(axis=1, initial=0.0), bits, dtype)
    return _integers(rows, scales, _qmax(bits)), scales


@dataclass(frozen=True)
class FixedPoint:
    """A tensor as integers times per-row scales: ``values[r, i] == round_to(ints[r, i] * scales[r])``."""

    ints: np.ndarray  # int64, shape (rows, row length)
    scales: np.ndarray  # float64 holding dtype values, shape (rows,)
    per_channel: bool


def _distinct_magnitudes(rows: np.ndarray) -> np.ndarray:
    """Per row, the number of distinct nonzero magnitudes (a lower bound on the levels a grid needs)."""
    ordered = np.sort(np.abs(rows), axis=1)
    if ordered.shape[1] == 0:
        return np.zeros(ordered.shape[0], dtype=np.int64)
    distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(axis=1)
    return distinct - (ordered[:, 0] == 0)


def _fit_rows(rows: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Find, row by row, a scale that reproduces the row bit for bit; (ints, scales, found)."""
    wide = rows.astype(np.float64)
    want = bit_patterns(rows)
    n_rows = rows.shape[0]
    ints = np.zeros(wide.shape, dtype=np.int64)
    scales = np.zeros(n_rows)
    magnitudes = np.abs(wide).max(axis=1, initial=0.0)
    found = (magnitudes == 0) & (want == 0).all(axis=1)  # all +0.0: scale 0
    distinct = _distinct_magnitudes(wide)
    fewest_bits = _bit_length(distinct) + 1  # qmax = 2^(bits-1) - 1 must reach the distinct count
    for bits in range(max(2, int(fewest_bits.min(initial=2))), MAX_BITS + 1):
        todo = np.flatnonzero(~found & (fewest_bits <= bits) & (magnitudes > 0))
        if todo.size == 0:
            continue
        rule = uniform_scales(magnitudes[todo], bits, dtype)
        candidates = [_step(rule, ulps, dtype) for ulps in _CANDIDATE_STEPS]
        for scale in candidates:
            open_ = ~found[todo]
            # Most wrong candidates fail within the first values: check those before whole rows.
            open_[open_] = _reproduces(wide[todo[open_], :_PREFIX], want[todo[open_], :_PREFIX], scale[open_],
                                       bits, dtype)
            rows_idx = todo[open_]
            if not rows_idx.size:
                continue
            q = _integers(wide[rows_idx], scale[open_], _qmax(bits))
            same = (bit_patterns(dequantize(q, scale[open_], dtype)) == want[rows_idx]).all(axis=1)
            hit = rows_idx[same]
            ints[hit], scales[hit], found[hit] = q[same], scale[open_][same], True
    return ints, scales, found


def _reproduces(rows: np.ndarray, want: np.ndarray, scales: np.ndarray, bits: int, dtype: str) -> np.ndarray:
    """Which rows (float64, with their wanted bit patterns) the scales reproduce exactly."""
    q = _integers(rows, scales, _qmax(bits))
    return (bit_patterns(dequantize(q, scales, dtype)) == want).all(axis=1)


def fit_grid(values: np.ndarray, per_channel: bool | None = None) -> FixedPoint:
    """The integers and scales of a fixed-point tensor, found from its values (bit-exact).

    ``per_channel`` None tries one scale for the whole tensor and one per channel (axis 0, for tensors of
    two or more dimensions) and keeps the grid that stores smaller: a per-channel tensor in float16 can
    also sit on a fine per-tensor grid, at twice the bits. Raises UsageError when no grid of at most 16
    bits fits.
    """
    values = np.asarray(values)
    dtype = dtype_of(values)
    choices = [False, True] if per_channel is None else [bool(per_channel)]
    choices = [c for c in choices if not c or row_count(values.shape, True) > 1] or [False]
    fits = []
    for channel in choices:
        ints, scales, found = _fit_rows(_rows(values, channel), dtype)
        if found.all():
            fits.append(FixedPoint(ints, scales, channel))
            if not ints.size or int(np.abs(ints).max()) <= _qmax(8):
                break  # one scale already gives 8-bit data: a per-channel search would cost more than it saves
    if fits:
        return min(fits, key=lambda fit: _stored_bits(fit, numpy_dtype(dtype).itemsize))
    how = "per tensor or per channel" if per_channel is None else ("per channel" if per_channel else "per tensor")
    raise UsageError(f"not fixed-point: no uniform grid of at most {MAX_BITS} bits ({how}) reproduces the "
                     "values; run `weightless quantize --method uniform` first")


def _stored_bits(grid: FixedPoint, itemsize: int) -> int:
    """What a grid costs in the codec: scales, headers and value fields, in bits."""
    ints = grid.ints.reshape(-1)
    headers = _bit_length(_group_max(np.abs(ints)))
    header_bits = HEADER_BITS[8 if int(headers.max(initial=0)) < 8 else 16]
    return 8 * itemsize * grid.scales.size + header_bits * headers.size + _group_layout(headers, ints.size)[2]


# --- group packing -------------------------------------------------------------------------------------------


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Bit length of non-negative integers below 2^53 (frexp is exact there)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _group_layout(headers: np.ndarray, n_values: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(field width per group, first bit of each group, total bits) for these group headers."""
    widths = np.where(headers > 0, headers + 1, 0).astype(np.int64)
    counts = np.full(headers.size, GROUP, dtype=np.int64)
    if headers.size:
        counts[-1] = n_values - GROUP * (headers.size - 1)
    sizes = widths * counts
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])) if sizes.size else sizes
    return widths, starts, int(sizes.sum())


def _group_max(magnitudes: np.ndarray) -> np.ndarray:
    padded = np.zeros(-(-magnitudes.size // GROUP) * GROUP, dtype=np.int64)
    padded[: magnitudes.size] = magnitudes
    return padded.reshape(-1, GROUP).max(axis=1) if padded.size else padded


def _field_positions(first: int, last: int, widths: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bit offset, width) of the fields of values first..last-1."""
    index = np.arange(first, last, dtype=np.int64)
    group = index // GROUP
    width = widths[group]
    return starts[group] + (index % GROUP) * width, width


def pack_groups(ints: np.ndarray) -> tuple[np.ndarray, bytes]:
    """(group headers, value bit stream) of the flat integers ``ints`` (|q| < 2^15)."""
    magnitudes = np.abs(ints).astype(np.int64)
    headers = _bit_length(_group_max(magnitudes))
    widths, starts, total = _group_layout(headers, ints.size)
    out = np.zeros(packed_size(total, 1) + 3, dtype=np.uint8)
    for first in range(0, ints.size, _CHUNK):
        last = min(first + _CHUNK, ints.size)
        offset, width = _field_positions(first, last, widths, starts)
        keep = width > 0
        fields = (magnitudes[first:last][keep] << 1) | (ints[first:last][keep] < 0)
        offset = offset[keep]
        if not offset.size:
            continue
        shifted = fields << (offset % 8)
        byte = offset // 8
        base = int(byte[0])
        # Fields never share a bit, so adding each byte lane is the same as OR-ing it in.
        lanes = sum(np.bincount(byte - base + lane, weights=(shifted >> (8 * lane)) & 255,
                                minlength=int(byte[-1]) - base + 3) for lane in range(3))
        out[base : base + lanes.size] |= lanes.astype(np.uint8)
    return headers, out[: packed_size(total, 1)].tobytes()


def _fail(problem: str) -> BadInputError:
    return BadInputError(f"corrupt dpred data: {problem}")


def unpack_groups(headers: np.ndarray, stream: bytes, n_values: int, bits: int) -> np.ndarray:
    """The flat integers of a value stream (validated: size, padding, canonical headers, no -0)."""
    if headers.size and int(headers.max()) > bits - 1:
        raise _fail(f"a group header says {int(headers.max())} magnitude bits, more than {bits}-bit data has")
    widths, starts, total = _group_layout(headers, n_values)
    if len(stream) != packed_size(total, 1):
        raise _fail(f"values section is {len(stream)} bytes, the headers describe {packed_size(total, 1)}")
    raw = np.frombuffer(stream, dtype=np.uint8)
    if total % 8 and raw[-1] >> (total % 8):
        raise _fail("nonzero padding bits after the last value")
    padded = np.concatenate((raw, np.zeros(3, dtype=np.uint8))).astype(np.int64)
    out = np.zeros(n_values, dtype=np.int64)
    for first in range(0, n_values, _CHUNK):
        last = min(first + _CHUNK, n_values)
        offset, width = _field_positions(first, last, widths, starts)
        byte, shift = offset // 8, offset % 8
        window = padded[byte] | (padded[byte + 1] << 8) | (padded[byte + 2] << 16)
        fields = (window >> shift) & ((np.int64(1) << width) - 1)
        magnitude, negative = fields >> 1, (fields & 1).astype(bool)
        if (negative & (magnitude == 0)).any():
            raise _fail("a negative zero (non-canonical value)")
        out[first:last] = np.where(negative, -magnitude, magnitude)
    if not np.array_equal(_bit_length(_group_max(np.abs(out))), headers):
        raise _fail("a group header is wider than its largest value needs (non-canonical)")
    return out


# --- the codec -----------------------------------------------------------------------------------------------


def encode(values: np.ndarray, per_channel: bool | None = None) -> tuple[dict[str, int], dict[str, bytes]]:
    """Params and sections of a fixed-point tensor (see :func:`fit_grid`; UsageError if it is not one)."""
    values = np.asarray(values)
    dtype = dtype_of(values)
    grid = fit_grid(values, per_channel)
    ints = grid.ints.reshape(-1)
    bits = 8 if not ints.size or int(np.abs(ints).max()) <= _qmax(8) else 16
    headers, stream = pack_groups(ints)
    scales = round_to(grid.scales, dtype)
    params = {"bits": bits, "per_channel": int(grid.per_channel)}
    sections = {"headers": pack_bits(headers, HEADER_BITS[bits]) if headers.size else b"",
                "scales": array_to_bytes(scales, dtype), "values": stream}
    return params, sections


def _check_params(params: dict[str, int], shape: tuple[int, ...]) -> tuple[int, bool]:
    if set(params) != set(PARAM_NAMES):
        raise _fail(f"params {sorted(params)} are not {sorted(PARAM_NAMES)}")
    bits, per_channel = params["bits"], params["per_channel"]
    if bits not in HEADER_BITS:
        raise _fail(f"bits = {bits}, expected 8 or 16")
    if per_channel not in (0, 1) or (per_channel and row_count(shape, True) < 2):  # canonical: see fit_grid
        raise _fail(f"per_channel = {per_channel} for a tensor of shape {shape}")
    return bits, bool(per_channel)


def _read_scales(data: bytes, count: int, dtype: str) -> np.ndarray:
    itemsize = numpy_dtype(dtype).itemsize
    if len(data) != count * itemsize:
        raise _fail(f"scales section is {len(data)} bytes, expected {count} x {itemsize}")
    scales = bytes_to_array(data, dtype).view(numpy_dtype(dtype))
    if (bit_patterns(scales) >> (8 * itemsize - 1)).any() or not np.isfinite(scales.astype(np.float64)).all():
        raise _fail("a scale is negative, -0 or not finite")
    return scales.astype(np.float64)


def decode(params: dict[str, int], sections: dict[str, bytes], shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The tensor, bit-exact, in ``dtype`` (bfloat16 as ml_dtypes.bfloat16). Corrupt input: BadInputError."""
    bits, per_channel = _check_params(params, shape)
    n_values = int(np.prod(shape, dtype=np.int64))
    rows = row_count(shape, per_channel)
    scales = _read_scales(sections["scales"], rows, dtype)
    groups = -(-n_values // GROUP)
    header_bytes = packed_size(groups, HEADER_BITS[bits])
    if len(sections["headers"]) != header_bytes:
        raise _fail(f"headers section is {len(sections['headers'])} bytes, expected {header_bytes}")
    headers = (unpack_bits(sections["headers"], HEADER_BITS[bits], groups).astype(np.int64) if groups
               else np.zeros(0, dtype=np.int64))
    ints = unpack_groups(headers, sections["values"], n_values, bits)
    values = dequantize(as_rows(ints, rows), scales, dtype)
    if not np.isfinite(values).all():  # the encoder never writes inf or NaN
        raise _fail("values overflow the tensor's dtype (forged scales?)")
    return values.reshape(shape)
