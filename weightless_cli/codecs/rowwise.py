"""``rowwise``: b-bit integers with a float16 scale and bias per row, as embedding tables are stored.

Production recommendation models keep their embedding tables row-wise quantized (e.g. FBGEMM's fused
8-bit and 4-bit rows): every row r has its own float16 scale s_r and bias b_r, and each value is an
unsigned b-bit integer q with ``value = b_r + q · s_r``. Rows are the slices along axis 0 (one row for a
tensor of fewer than two dimensions).

The arithmetic is exact, then rounded once: ``value = round_to_dtype(b + q·s)``, the real number
``b + q·s`` rounded to nearest (ties to even) in the tensor's dtype. ``q·s`` and the sum are exact in
float64 (a float16 has 11 significant bits and ulps of at least 2^-24), so float64 arithmetic and one
final cast give the same bits everywhere.

The grid rule (:func:`row_grid`), used both to quantize and, by the encoder, to recover the grid from
quantized values: ``b`` is the row minimum rounded *down* to float16 and ``s`` the smallest float16 for
which the top level ``round_to_dtype(b + (2^bits - 1)·s)`` reaches the row maximum. Every value then lies
inside the levels, so ``|w - q| <= s/2`` (plus the final rounding to the dtype). Applied to an already
quantized row whose bottom and top levels are in use, the rule gives back the same ``b`` and ``s``; a row
where it does not (the rare row whose range is tiny next to its magnitude) is still stored exactly, its
mismatching values kept as *exceptions* (positions Rice-coded as in ``outlier``, values in the dtype).
The byte-level format is ``docs/codecs/rowwise.md``.
"""

from __future__ import annotations

import numpy as np

from weightless_cli.codecs.bitpack import pack_bits, packed_size, unpack_bits
from weightless_cli.codecs.container import array_to_bytes, bytes_to_array, dtype_of
from weightless_cli.codecs.dpred import as_rows, bit_patterns, numpy_dtype, round_to
from weightless_cli.codecs.outlier import decode_positions, encode_positions
from weightless_cli.errors import BadInputError, UsageError

__all__ = [
    "MAX_BITS",
    "PARAM_NAMES",
    "SECTIONS",
    "decode",
    "dequantize",
    "encode",
    "encode_bits",
    "quantize_rows",
    "row_grid",
    "rows_of",
]

MAX_BITS = 8
FLOAT16_MAX = 65504.0
_FLOAT16_MAX_PATTERN = 0x7BFF  # the largest finite float16
SMALLEST_SCALE = 2.0**-14  # the smallest normal float16
PARAM_NAMES = ("bits", "exceptions", "rice_k")
SECTIONS = ("biases", "exc_high", "exc_low", "exc_values", "ints", "scales")
# The encoder refuses a tensor when more than this share of its values would be exceptions: it is then not
# row-wise quantized at all, and raw storage would be smaller.
MAX_EXCEPTION_SHARE = 1 / 64


def rows_of(shape: tuple[int, ...]) -> int:
    """Rows of a tensor: its first dimension, one row for a scalar or vector, none for an empty tensor."""
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return 0
    return int(shape[0]) if len(shape) >= 2 else 1


def _levels(bits: int) -> int:
    if not 1 <= bits <= MAX_BITS:
        raise UsageError(f"row-wise quantization needs 1..{MAX_BITS} bits, got {bits}")
    return 2**bits - 1


def _half(patterns: np.ndarray) -> np.ndarray:
    """Non-negative float16 bit patterns → their values as float64."""
    return patterns.astype(np.uint16).view(np.float16).astype(np.float64)


def dequantize(ints: np.ndarray, scales: np.ndarray, biases: np.ndarray, dtype: str) -> np.ndarray:
    """round_to_dtype(b + q·s) per row; ``ints`` (rows, n), ``scales``/``biases`` float64 holding float16."""
    return round_to(biases[:, None] + ints.astype(np.float64) * scales[:, None], dtype)


def _round_down_half(values: np.ndarray) -> np.ndarray:
    """The largest float16 at or below each value, as float64."""
    nearest = values.astype(np.float16)
    below = np.where(nearest.astype(np.float64) > values, np.nextafter(nearest, np.float16(-np.inf)), nearest)
    return below.astype(np.float64)


def _row_ranges(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(minimum, maximum) of each row; an empty row counts as all zero."""
    if not np.isfinite(rows).all() or (rows.size and float(np.abs(rows).max()) > FLOAT16_MAX):
        raise UsageError(f"row-wise quantization needs finite values within ±{FLOAT16_MAX:g} (float16 range)")
    if rows.shape[1] == 0:
        return np.zeros(rows.shape[0]), np.zeros(rows.shape[0])
    return rows.min(axis=1), rows.max(axis=1)


def _top_level(biases: np.ndarray, scales: np.ndarray, top: int, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # a far too large candidate scale overflows to inf: it reaches
        return round_to(biases + top * scales, dtype).astype(np.float64)


def _scales_for(biases: np.ndarray, highest: np.ndarray, top: int, dtype: str) -> np.ndarray:
    """The smallest float16 scale whose top level reaches ``highest`` (0, or at least the smallest normal)."""
    # Binary search over float16 patterns: for non-negative float16 their order is the numeric order.
    lo = np.zeros(biases.size, dtype=np.int64)
    hi = np.full(biases.size, _FLOAT16_MAX_PATTERN, dtype=np.int64)
    if not (_top_level(biases, _half(hi), top, dtype) >= highest).all():
        raise UsageError(f"a row's range does not fit {top + 1} levels with a float16 scale; use more bits")
    while (lo < hi).any():
        mid = (lo + hi) // 2
        reaches = _top_level(biases, _half(mid), top, dtype) >= highest
        hi, lo = np.where(reaches, mid, hi), np.where(reaches, lo, mid + 1)
    scales = _half(hi)
    # A subnormal scale has too few significant bits for the top level to be used reliably, and the
    # encoder finds the scale from the top level; the smallest normal float16 is as fine as rows need.
    return np.where(scales > 0, np.maximum(scales, SMALLEST_SCALE), 0.0)


def row_grid(rows: np.ndarray, bits: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(scales, biases) of each row by the grid rule (see the module docstring), as float64."""
    top = _levels(bits)
    lowest, highest = _row_ranges(np.asarray(rows, dtype=np.float64))
    biases = _round_down_half(lowest)
    return _scales_for(biases, highest, top, dtype), biases


def _nearest_levels(rows: np.ndarray, scales: np.ndarray, biases: np.ndarray, top: int) -> np.ndarray:
    safe = np.where(scales > 0, scales, 1.0)[:, None]
    ints = np.clip(np.rint((rows - biases[:, None]) / safe), 0, top)
    return np.where(scales[:, None] > 0, ints, 0).astype(np.int64)


def quantize_rows(rows: np.ndarray, bits: int, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ints, scales, biases): each value's nearest level on its row's grid."""
    rows = np.asarray(rows, dtype=np.float64)
    scales, biases = row_grid(rows, bits, dtype)
    return _nearest_levels(rows, scales, biases, _levels(bits)), scales, biases


# --- the codec -----------------------------------------------------------------------------------------------


def _fail(problem: str) -> BadInputError:
    return BadInputError(f"corrupt rowwise data: {problem}")


def _layout(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ints, scales, biases, exception positions) of ``values`` on the row grids found at ``bits``.

    The rule applied to a quantized row gives back its grid when the bottom level is in use. When it is
    not (the row minimum sat more than s/2 above its float16 bias), the row's smallest value rounds down
    to the float16 above or below the true bias, so for rows the rule does not reproduce those two are
    tried next.
    """
    dtype, top = dtype_of(values), _levels(bits)
    rows = as_rows(values.reshape(-1), rows_of(values.shape))
    wide, want = rows.astype(np.float64), bit_patterns(rows)
    lowest, highest = _row_ranges(wide)
    biases = _round_down_half(lowest)
    scales = _scales_for(biases, highest, top, dtype)
    ints = _nearest_levels(wide, scales, biases, top)
    off = bit_patterns(dequantize(ints, scales, biases, dtype)) != want
    redo = off.any(axis=1)
    half = biases.astype(np.float16)
    for neighbour in (np.nextafter(half, np.float16(-np.inf)), np.nextafter(half, np.float16(np.inf))):
        bias = neighbour.astype(np.float64)
        todo = np.flatnonzero(redo & np.isfinite(bias) & (bias <= lowest))
        if not todo.size:
            continue
        bias = bias[todo]
        scale = _scales_for(bias, highest[todo], top, dtype)
        q = _nearest_levels(wide[todo], scale, bias, top)
        exact = (bit_patterns(dequantize(q, scale, bias, dtype)) == want[todo]).all(axis=1)
        fixed = todo[exact]
        ints[fixed], scales[fixed], biases[fixed] = q[exact], scale[exact], bias[exact]
        off[fixed], redo[fixed] = False, False
    return ints, scales, biases, np.flatnonzero(off.reshape(-1))


def _estimated_bits(n_values: int, bits: int, exceptions: int, itemsize: int) -> float:
    gap_bits = np.log2(n_values / exceptions) + 2 if exceptions else 0.0
    return n_values * bits + exceptions * (8 * itemsize + gap_bits)


def _sizes_by_width(values: np.ndarray, widths: range) -> dict[int, float]:
    """Estimated size at each width, stopping at the first without exceptions (wider ones only cost more)."""
    sizes = {}
    for bits in widths:
        try:
            exceptions = _layout(values, bits)[3].size
        except UsageError:
            continue
        sizes[bits] = _estimated_bits(values.size, bits, exceptions, values.dtype.itemsize)
        if not exceptions:
            break
    return sizes


Layout = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # ints, scales, biases, exception positions


def _choose_width(values: np.ndarray) -> tuple[int, Layout]:
    rows = as_rows(values.reshape(-1), rows_of(values.shape))
    ordered = np.sort(rows.astype(np.float64), axis=1)
    distinct = int((1 + (ordered[:, 1:] != ordered[:, :-1]).sum(axis=1)).max(initial=1)) if rows.size else 1
    widths = range(min(max(1, (distinct - 1).bit_length()), MAX_BITS), MAX_BITS + 1)
    sample = _sizes_by_width(rows[:: max(1, rows.shape[0] // 1024)], widths)
    if sample:
        layout = _layout(values, max(sample))
        if not layout[3].size:  # the sample stopped at its first width without exceptions, and so does the table
            return max(sample), layout
    sizes = _sizes_by_width(values, widths)
    if not sizes:
        raise UsageError(f"values beyond ±{FLOAT16_MAX:g} cannot be stored row-wise (float16 scale and bias)")
    bits = min(sizes, key=lambda width: (sizes[width], width))
    return bits, _layout(values, bits)


def encode_bits(values: np.ndarray) -> int:
    """The integer width (1..8) at which ``values`` store smallest: normally the one without exceptions.

    A row of D distinct values needs at least ceil(log2 D) bits, so the search starts there, on a sample of
    about 1024 rows first; the whole table is searched only when the sample's width leaves exceptions.
    """
    return _choose_width(np.asarray(values))[0]


def encode(values: np.ndarray, bits: int | None = None) -> tuple[dict[str, int], dict[str, bytes]]:
    """Params and sections storing ``values`` exactly; ``bits`` None finds the width (:func:`encode_bits`).

    UsageError when more than 1/64 of the values are off the grid: the tensor is not row-wise quantized
    (run ``weightless quantize --method rowwise`` first).
    """
    values = np.asarray(values)
    dtype = dtype_of(values)
    bits, (ints, scales, biases, positions) = _choose_width(values) if bits is None else (bits, _layout(values, bits))
    if positions.size > max(1, values.size * MAX_EXCEPTION_SHARE):
        raise UsageError(f"not row-wise quantized: {positions.size} of {values.size} values are off the "
                         f"{bits}-bit row grids; run `weightless quantize --method rowwise` first")
    rice_k, high, low = encode_positions(positions)
    params = {"bits": bits, "exceptions": int(positions.size), "rice_k": rice_k}
    sections = {
        "biases": biases.astype(np.float16).tobytes(),
        "exc_high": high,
        "exc_low": low,
        "exc_values": array_to_bytes(values.reshape(-1)[positions], dtype),
        "ints": pack_bits(ints.reshape(-1), bits),
        "scales": scales.astype(np.float16).tobytes(),
    }
    return params, sections


def _read_half(data: bytes, count: int, what: str) -> np.ndarray:
    if len(data) != 2 * count:
        raise _fail(f"{what} section is {len(data)} bytes, expected {count} float16")
    values = np.frombuffer(data, dtype="<f2")
    if not np.isfinite(values).all():
        raise _fail(f"a row {what[:-1]} is not finite")
    return values.astype(np.float64)


def _check_params(params: dict[str, int], n_values: int) -> int:
    if set(params) != set(PARAM_NAMES):
        raise _fail(f"params {sorted(params)} are not {sorted(PARAM_NAMES)}")
    bits = params["bits"]
    if not 1 <= bits <= MAX_BITS:
        raise _fail(f"bits = {bits} is outside 1..{MAX_BITS}")
    if not 0 <= params["exceptions"] <= n_values:
        raise _fail(f"{params['exceptions']} exceptions in a tensor of {n_values} values")
    return bits


def decode(params: dict[str, int], sections: dict[str, bytes], shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The tensor, bit-exact, in ``dtype`` (bfloat16 as ml_dtypes.bfloat16). Corrupt input: BadInputError."""
    n_values = int(np.prod(shape, dtype=np.int64))
    bits = _check_params(params, n_values)
    rows = rows_of(shape)
    scales = _read_half(sections["scales"], rows, "scales")
    if (bit_patterns(np.frombuffer(sections["scales"], dtype="<f2")) >> 15).any():
        raise _fail("a row scale is negative or -0")
    biases = _read_half(sections["biases"], rows, "biases")
    if len(sections["ints"]) != packed_size(n_values, bits):
        raise _fail(f"ints section is {len(sections['ints'])} bytes, expected {n_values} x {bits} bits")
    ints = unpack_bits(sections["ints"], bits, n_values) if n_values else np.zeros(0, dtype=np.uint16)
    count = params["exceptions"]
    positions = decode_positions(count, params["rice_k"], sections["exc_high"], sections["exc_low"], n_values,
                                 "rowwise data")
    itemsize = numpy_dtype(dtype).itemsize
    if len(sections["exc_values"]) != count * itemsize:
        raise _fail(f"exc_values section is {len(sections['exc_values'])} bytes, expected {count} x {itemsize}")
    out = dequantize(as_rows(ints, rows), scales, biases, dtype).reshape(-1)
    out[positions] = bytes_to_array(sections["exc_values"], dtype).view(numpy_dtype(dtype))
    return out.reshape(shape)
