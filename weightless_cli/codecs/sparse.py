"""``sparse``: an exact, entropy-coded code of a clustered tensor's nonzero positions and codebook indices.

A Bloomier filter pays for every *zero* (its false-positive rate); this codec pays only for what is there,
about log2(N/n) + 1.44 bits per nonzero for a random mask, and less when the mask has structure a filter
cannot see. The tensor is viewed as a grid of R = shape[0] rows by C = prod(shape[1:]) columns, and the
encoder picks, by estimated size, the cheapest of these descriptions:

* **dead rows / dead columns** (all-zero rows of a MatMul weight, all-zero columns of a Gemm weight: dead
  inputs) may be listed once as a bitmap, and the remaining *live* grid coded without them;
* the live grid is coded as one run (``flat``), or line by line (``rows`` or ``cols``): each line's
  nonzero count first, then the gaps inside it with a gap model chosen by the line's density *class*
  (lines of similar density share a model, so a tensor with dense centre pixels and sparse borders gets
  a model for each);
* gaps and counts are bucketed integers (:mod:`weightless_cli.codecs.entropy`); codebook indices use one
  order-0 model. Every model is a two-pass static one stored as one byte per symbol.

Everything is coded with constriction's ANS coder in whole-array calls, so decoding costs a handful of
numpy passes over the nonzeros plus filling the output. The byte-exact format is ``docs/codecs/exact.md``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from weightless_cli.codecs.clustered import SparseCode
from weightless_cli.codecs.entropy import (
    MAX_BUCKET_SYMBOLS,
    AnsReader,
    AnsWriter,
    ByteReader,
    Table,
    bucket_split,
    bucket_table,
    ids_dtype,
    make_table,
    make_tables,
    order0_bound_bits,
)
from weightless_cli.errors import BadInputError

__all__ = ["PARAM_NAMES", "SECTIONS", "decode", "encode", "estimate_bits", "order0_bound_bits"]

MODE_FLAT, MODE_ROWS, MODE_COLS = 0, 1, 2
MAX_CLASS_BITS = 3  # class resolution: 0 = one gap model; b >= 1 = a model per (b-1)-mantissa bucket of k-1
MAX_CLASSES = MAX_BUCKET_SYMBOLS
MAX_IDS = 2**16 - 1  # codebook entries (the container's limit)
PARAM_NAMES = ("n", "mode", "class_bits", "classes", "dead_rows", "dead_cols")
SECTIONS = ("codebook", "model", "stream")
_WHAT = "sparse stream"


# --- geometry ------------------------------------------------------------------------------------------------


def grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns): shape[0] rows of prod(shape[1:]) values; a scalar is one row of one."""
    if not shape:
        return 1, 1
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


def line_class(counts: np.ndarray, class_bits: int) -> np.ndarray:
    """Density class of lines with ``counts`` nonzeros (>= 1): the bucket of count-1 at class_bits-1
    mantissa bits, so class_bits 1 groups lines by octave of their count and each extra bit halves it."""
    counts = np.asarray(counts, dtype=np.int64)
    if class_bits == 0:
        return np.zeros(counts.size, dtype=np.int64)
    mantissa = class_bits - 1
    values = np.maximum(counts - 1, 0)
    direct = 1 << (mantissa + 1)
    width = np.where(values >= direct, np.frexp(values.astype(np.float64))[1] - 1 - mantissa, 0)
    symbol = direct + ((width - 1) << mantissa) + (values >> width) - (1 << mantissa)
    return np.where(values >= direct, symbol, values)


@dataclass(frozen=True)
class _Lines:
    """The nonzeros of the live grid, described line by line in coding order."""

    mode: int
    live_rows: np.ndarray | None  # None: rows are not dropped
    live_cols: np.ndarray | None
    length: int  # positions per line
    counts: np.ndarray  # nonzeros per line
    gaps: np.ndarray  # zeros before each nonzero, counted from the previous nonzero of its line
    order: np.ndarray | None  # coding order of the input nonzeros (None: their own order)


def _live(indices: np.ndarray, extent: int, drop: bool) -> tuple[np.ndarray | None, np.ndarray, int]:
    """(live indices or None, each nonzero's index in the live list, live extent)."""
    if not drop:
        return None, indices, extent
    present = np.zeros(extent, dtype=bool)
    present[indices] = True
    live = np.flatnonzero(present)
    return live, np.searchsorted(live, indices), live.size


def _gaps(line: np.ndarray, within: np.ndarray) -> np.ndarray:
    """Zeros between consecutive nonzeros of a line (line-major order), from the line start for the first."""
    previous = np.empty_like(within)
    previous[:1] = -1
    previous[1:] = np.where(line[1:] == line[:-1], within[:-1], -1)
    return within - previous - 1


def _describe(rows: np.ndarray, cols: np.ndarray, r: int, c: int, mode: int, drop_rows: bool,
              drop_cols: bool) -> _Lines:
    live_rows, row, r_live = _live(rows, r, drop_rows)
    live_cols, col, c_live = _live(cols, c, drop_cols)
    order = None
    if mode == MODE_FLAT:
        line, within, n_lines, length = np.zeros_like(row), row * c_live + col, 1, r_live * c_live
    elif mode == MODE_ROWS:
        line, within, n_lines, length = row, col, r_live, c_live
    else:
        order = np.lexsort((row, col))
        line, within, n_lines, length = col[order], row[order], c_live, r_live
    counts = np.bincount(line, minlength=n_lines) if line.size else np.zeros(n_lines, dtype=np.int64)
    return _Lines(mode, live_rows, live_cols, length, counts, _gaps(line, within), order)


# --- encoder -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """One candidate description: its parameters, stored tables and estimated cost of the positions."""

    lines: _Lines
    class_bits: int
    count_table: Table | None
    gap_tables: list[Table]
    classes: np.ndarray  # class of each nonzero
    bits: float


def _bitmap_bits(total: int, ones: int) -> float:
    if ones in (0, total):
        return 0.0
    return -(ones * math.log2(ones / total) + (total - ones) * math.log2(1 - ones / total))


def _plans(lines: _Lines, r: int, c: int) -> list[_Plan]:
    """The candidates for one layout: each class resolution (only one for ``flat``)."""
    fixed = 0.0
    if lines.live_rows is not None:
        fixed += _bitmap_bits(r, r - lines.live_rows.size)
    if lines.live_cols is not None:
        fixed += _bitmap_bits(c, c - lines.live_cols.size)
    count_table = None
    if lines.mode != MODE_FLAT:
        count_table, count_bits = bucket_table(lines.counts)
        fixed += count_bits
    plans = []
    resolutions = [0] if lines.mode == MODE_FLAT else range(MAX_CLASS_BITS + 1)
    line_of = np.repeat(np.arange(lines.counts.size), lines.counts)
    symbols, widths, _ = bucket_split(lines.gaps)
    raw_bits = float(widths.sum())
    for class_bits in resolutions:
        classes = line_class(lines.counts, class_bits)[line_of]
        n_classes = int(classes.max(initial=0)) + 1
        table_counts = np.bincount(classes * MAX_BUCKET_SYMBOLS + symbols,
                                   minlength=n_classes * MAX_BUCKET_SYMBOLS).reshape(n_classes, -1)
        tables = make_tables(table_counts)
        bits = fixed + raw_bits + sum(t.bits(row) for t, row in zip(tables, table_counts, strict=True))
        plans.append(_Plan(lines, class_bits, count_table, tables, classes, bits))
    return plans


def _candidates(code: SparseCode, shape: tuple[int, ...]) -> list[_Plan]:
    """Every description the encoder considers, in a fixed order (ties go to the first)."""
    r, c = grid(shape)
    rows, cols = np.divmod(np.asarray(code.positions, dtype=np.int64), max(c, 1))
    if code.size == 0:  # an empty tensor has no lines worth describing
        return _plans(_describe(rows, cols, r, c, MODE_FLAT, False, False), r, c)
    any_dead_row, any_dead_col = np.unique(rows).size < r, np.unique(cols).size < c
    candidates: list[_Plan] = []
    for mode, drop_rows, drop_cols in itertools.product((MODE_FLAT, MODE_ROWS, MODE_COLS), (False, True),
                                                        (False, True)):
        if (drop_rows and not any_dead_row) or (drop_cols and not any_dead_col):
            continue  # nothing dead to drop
        candidates += _plans(_describe(rows, cols, r, c, mode, drop_rows, drop_cols), r, c)
    return candidates


def _dead_count(live: np.ndarray | None, extent: int) -> int:
    return 0 if live is None else extent - live.size


def encode(code: SparseCode, shape: tuple[int, ...]) -> tuple[dict[str, int], dict[str, bytes]]:
    """Params and the ``model`` and ``stream`` sections (the stage adds ``codebook``) for ``code``."""
    _check_code(code, shape)
    plan = min(_candidates(code, shape), key=lambda plan: plan.bits)  # first minimum: deterministic
    return _encode_plan(code, shape, plan)


def _encode_plan(code: SparseCode, shape: tuple[int, ...], plan: _Plan) -> tuple[dict[str, int], dict[str, bytes]]:
    r, c = grid(shape)
    lines = plan.lines
    ids = np.asarray(code.ids, dtype=np.int64)
    if lines.order is not None:
        ids = ids[lines.order]
    id_table = make_table(np.bincount(ids, minlength=1))
    writer = AnsWriter()
    for live, extent in ((lines.live_rows, r), (lines.live_cols, c)):
        if _dead_count(live, extent):
            present = np.zeros(extent, dtype=np.int64)
            present[live] = 1
            writer.binary(1 - present)
    if plan.count_table is not None:
        writer.bucketed(lines.counts, plan.count_table.freqs)
    for cls, table in enumerate(plan.gap_tables):
        writer.bucketed(lines.gaps[plan.classes == cls], table.freqs)
    writer.symbols(ids, id_table.freqs)
    tables = ([] if plan.count_table is None else [plan.count_table]) + [*plan.gap_tables, id_table]
    model = b"".join(table.data for table in tables)
    params = {
        "n": int(code.positions.size),
        "mode": lines.mode,
        "class_bits": plan.class_bits,
        "classes": len(plan.gap_tables),
        "dead_rows": _dead_count(lines.live_rows, r),
        "dead_cols": _dead_count(lines.live_cols, c),
    }
    return params, {"model": model, "stream": writer.finish()}


def estimate_bits(code: SparseCode, shape: tuple[int, ...]) -> int:
    """Exact size of the ``model`` and ``stream`` sections in bits (the codebook is the same for every codec)."""
    _, sections = encode(code, shape)
    return 8 * sum(len(data) for data in sections.values())


def _check_code(code: SparseCode, shape: tuple[int, ...]) -> None:
    if math.prod(shape) != code.size:
        raise ValueError(f"shape {shape} has {math.prod(shape)} elements, the code {code.size}")
    if code.k > MAX_IDS:
        raise ValueError(f"{code.k} codebook entries (limit {MAX_IDS})")


# --- decoder -------------------------------------------------------------------------------------------------


def _fail(problem: str) -> BadInputError:
    return BadInputError(f"corrupt {_WHAT}: {problem}")


def _check_params(params: dict[str, int], r: int, c: int, n_positions: int) -> None:
    missing = sorted(set(PARAM_NAMES) - set(params))
    extra = sorted(set(params) - set(PARAM_NAMES))
    if missing or extra:
        raise _fail(f"params {sorted(params)} do not match {sorted(PARAM_NAMES)}")
    limits = {
        "n": n_positions,
        "mode": MODE_COLS,
        "class_bits": MAX_CLASS_BITS,
        "classes": MAX_CLASSES,
        "dead_rows": r,
        "dead_cols": c,
    }
    for name, limit in limits.items():
        if not 0 <= params[name] <= limit:
            raise _fail(f"param {name} = {params[name]} outside 0..{limit}")
    if params["classes"] < 1:
        raise _fail("param classes = 0, at least one gap model is needed")
    if params["mode"] == MODE_FLAT and (params["class_bits"] or params["classes"] != 1):
        raise _fail("flat mode has exactly one gap model")
    if n_positions == 0 and (params["mode"] != MODE_FLAT or params["dead_rows"] or params["dead_cols"]):
        raise _fail("an empty tensor is coded flat, with no dead rows or columns")  # R or C may be huge


def _read_model(data: bytes, mode: int, classes: int, k: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    reader = ByteReader(data, "sparse model")
    count_table = np.zeros(0) if mode == MODE_FLAT else reader.table(MAX_BUCKET_SYMBOLS, "count table")
    gap_tables = [reader.table(MAX_BUCKET_SYMBOLS, f"gap table {cls}") for cls in range(classes)]
    id_table = reader.table(k, "id table")
    reader.done()
    return count_table, gap_tables, id_table


def _read_live(reader: AnsReader, extent: int, dead: int) -> np.ndarray | None:
    if not dead:
        return None
    return np.flatnonzero(reader.binary(extent, dead) == 0)


def _positions_in_lines(counts: np.ndarray, gaps: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(line, offset in line) of every nonzero from per-line counts and in-line gaps."""
    steps = np.cumsum(gaps + 1)
    ends = np.cumsum(counts)
    before = np.concatenate(([0], steps))[ends - counts]  # steps taken before each line starts
    within = steps - np.repeat(before, counts) - 1
    if within.size and int(within.max()) >= length:
        raise _fail(f"a nonzero lies past the end of its {length}-position line")
    return np.repeat(np.arange(counts.size), counts), within


def _live_coordinates(mode: int, line: np.ndarray, within: np.ndarray, c_live: int) -> tuple[np.ndarray, np.ndarray]:
    """(live row, live column) of each nonzero from its line and its offset in the line."""
    if mode == MODE_FLAT:
        return np.divmod(within, max(c_live, 1))
    return (line, within) if mode == MODE_ROWS else (within, line)


def decode(params: dict[str, int], sections: dict[str, bytes], shape: tuple[int, ...], k: int) -> np.ndarray:
    """One codebook index per position (length N, C order); K marks a zero. Corrupt input: BadInputError."""
    r, c = grid(shape)
    n_positions = r * c
    _check_params(params, r, c, n_positions)
    n, mode = params["n"], params["mode"]
    count_table, gap_tables, id_table = _read_model(sections["model"], mode, params["classes"], k)
    reader = AnsReader(sections["stream"], _WHAT)
    live_rows = _read_live(reader, r, params["dead_rows"])
    live_cols = _read_live(reader, c, params["dead_cols"])
    r_live = r if live_rows is None else live_rows.size
    c_live = c if live_cols is None else live_cols.size
    n_lines, length = {MODE_FLAT: (1, r_live * c_live), MODE_ROWS: (r_live, c_live),
                       MODE_COLS: (c_live, r_live)}[mode]
    if n > n_lines * length:
        raise _fail(f"{n} nonzeros do not fit in {n_lines * length} live positions")
    if mode == MODE_FLAT:
        counts = np.array([n], dtype=np.int64)
    else:
        counts = reader.bucketed(n_lines, count_table, "count")
        if counts.size and (int(counts.max()) > length or int(counts.sum()) != n):
            raise _fail(f"line counts do not add up to {n} nonzeros of at most {length} per line")
    classes = line_class(counts, params["class_bits"])
    if counts.size and int(classes[counts > 0].max(initial=0)) >= params["classes"]:
        raise _fail(f"a line's density class is not among the {params['classes']} gap models")
    nonzero_class = np.repeat(classes, counts)
    gaps = np.zeros(n, dtype=np.int64)
    for cls, table in enumerate(gap_tables):
        which = np.flatnonzero(nonzero_class == cls)
        gaps[which] = reader.bucketed(which.size, table, f"gap {cls}")
    ids = reader.symbols(n, id_table, "id")
    reader.finish()
    row, col = _live_coordinates(mode, *_positions_in_lines(counts, gaps, length), c_live)
    row = row if live_rows is None else live_rows[row]
    col = col if live_cols is None else live_cols[col]
    out = np.full(n_positions, k, dtype=ids_dtype(k))
    out[row * c + col] = ids
    return out

