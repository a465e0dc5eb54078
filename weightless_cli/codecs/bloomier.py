"""Lossy Bloomier-filter retrieval table for sparse quantized weights (Weightless, Reagen et al. 2018).

A table of ``m`` cells of ``t`` bits maps each stored key (a flat weight position) to a
``t``-bit value: the key's 64-bit hash (:func:`~weightless_cli.codecs.hashing.position_hash`)
picks three cells and a mask, and the answer is ``cell[h0] ^ cell[h1] ^ cell[h2] ^ mask``
truncated to ``t`` bits. Positions that were never stored answer a uniformly random value.

Two layouts (the byte-exact definition is ``docs/codecs/bloomier.md``):

* ``LAYOUT_CLASSIC`` (0): three equal blocks, one cell per block (Botelho et al. /
  xor filters); ~1.23 n cells, wins for small n.
* ``LAYOUT_FUSE`` (1): ``segment_count`` segments of a power-of-two length; a key's cells lie
  in three consecutive segments (binary fuse filters, Graf & Lemire 2022); ~1.125 n cells for
  large n. The encoder builds whichever layout needs fewer cells.

Construction peels the 3-hypergraph in vectorised rounds: every cell holding exactly one
key frees that key; keys freed in the same round never share a free cell, so a whole round
is assigned at once, rounds in reverse order. A failed peel retries with ``seed + 1``.

Weightless semantics (:func:`encode_positions` / :func:`decode_ids`): a nonzero position
stores its codebook index ``0..K-1``; on decode any answer ``>= K`` means "zero weight", so a
zero position is decoded as nonzero (a false positive) with probability ``K / 2**t``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from weightless_cli.codecs import parallel
from weightless_cli.codecs.hashing import position_hash, position_hash_range
from weightless_cli.errors import BadInputError

LAYOUT_CLASSIC = 0
LAYOUT_FUSE = 1

MIN_T = 1
MAX_T = 16
MAX_SEED = (1 << 32) - 1
MAX_POSITIONS = 1 << 36  # format limit on a table's key domain (the decoded tensor's size)
MAX_KEYS = (1 << 32) - 1  # format limit; peeling packs a key index and a cell into 64 bits
MAX_FUSE_SEGMENT_LENGTH = 1 << 18  # the two in-segment offsets use hash bits [0,18) and [18,36)
MAX_SPAN = 1 << 32  # cells reachable by the first hash: hi32 * span must fit in 64 bits
MAX_ATTEMPTS = 64  # seeds tried before giving up; each attempt succeeds with p >~ 0.9
QUERY_CHUNK = 1 << 15  # positions per numpy call in a query: ~1 MiB of uint64 temporaries, cached

PARAM_NAMES = ("t", "seed", "layout", "segment_length", "segment_count", "cells", "n_positions", "keys")

_U64 = np.uint64
_LOW32 = _U64(0xFFFFFFFF)
_MAX_BUILD_CELLS = 1 << 32  # peeling packs each free cell into the low 32 bits of a u64
_BUILD_CHUNK = 1 << 16  # keys per piece in the build's streaming passes
_INDEX32_LIMIT = (1 << 31) - 1  # tables up to this many cells keep cell indices as int32


@dataclass(frozen=True)
class Layout:
    """Where a key's three cells may lie: ``cells = segment_count * segment_length``."""

    kind: int
    segment_length: int
    segment_count: int

    @property
    def cells(self) -> int:
        return self.segment_count * self.segment_length

    @property
    def span(self) -> int:
        """Number of possible first cells (``h0`` ranges over ``[0, span)``)."""
        if self.kind == LAYOUT_FUSE:
            return (self.segment_count - 2) * self.segment_length
        return self.segment_length


# ----------------------------------------------------------------------------- sizing


def classic_layout(n_keys: int) -> Layout:
    """Three blocks of about ``factor(n) * n / 3`` cells; ``factor`` from the measured table."""
    factor = _CLASSIC_FACTOR[_bucket(n_keys, len(_CLASSIC_FACTOR))]
    capacity = -(-n_keys * factor // _FACTOR_ONE)  # round up: blocks are fine-grained
    return Layout(LAYOUT_CLASSIC, max(1, -(-capacity // 3)), 3)


def fuse_layout(n_keys: int) -> Layout:
    """Binary fuse layout: measured segment length and factor for ``n_keys``'s size bucket."""
    bucket = _bucket(n_keys, len(_FUSE_SIZING))
    length_log2, factor = _FUSE_SIZING[bucket]
    length = 1 << length_log2
    # Round the capacity down: the measured size is a whole number of segments, and
    # rounding up here would add a segment at the bucket's first n.
    capacity = n_keys * factor // _FACTOR_ONE
    return Layout(LAYOUT_FUSE, length, max(3, -(-capacity // length)))


def _bucket(n_keys: int, table_size: int) -> int:
    """Size bucket ``b`` holds n in [2**(b-1), 2**b); sizes were measured at its smallest n."""
    return min(max(n_keys, 1).bit_length(), table_size - 1)


# Sizes measured by ``bench/bench_bloomier.py --sizing-study``: at both ends of each bucket,
# the fewest cells (per layout and segment length) with which at least 90% of seeds peel;
# the larger of the two. Factors are cells per key in units of 1/65536; index = n.bit_length().
_FACTOR_ONE = 1 << 16
# fmt: off
_CLASSIC_FACTOR = [
    196608, 196608, 196608, 196608, 172032, 135168, 116736, 95232, 89088, 86016,  # b = 0..9
    83328, 82944, 81600, 81168, 80760, 80607, 80610, 80427, 80426, 80229,  # b = 10..19
    80230, 80230,  # b = 20, 21; classic is never the smaller layout beyond
]
_FUSE_SIZING = [  # (log2 segment length, factor)
    (1, 393216), (1, 393216), (1, 262144), (2, 196608), (3, 196608),  # b = 0..4
    (3, 186037), (4, 131072), (5, 131072), (6, 98689), (6, 98304),  # b = 5..9
    (6, 94300), (8, 98304), (8, 90112), (8, 86016), (9, 81920),  # b = 10..14
    (9, 79872), (10, 79872), (10, 76800), (11, 75776), (11, 75264),  # b = 15..19
    (13, 74752), (13, 74240), (13, 73472), (14, 72960), (15, 72704),  # b = 20..24
    (16, 72704), (17, 72704), (18, 72704),  # b = 25..27: extrapolated, same segment count
]
# fmt: on


def choose_layout(n_keys: int) -> Layout:
    """The layout with fewer cells for ``n_keys`` keys (classic on ties)."""
    classic = classic_layout(n_keys)
    fuse = fuse_layout(n_keys)
    return fuse if fuse.cells < classic.cells else classic


# ----------------------------------------------------------------------------- hashing to cells


def cell_triples(hashes: np.ndarray, layout: Layout, out: np.ndarray | None = None) -> np.ndarray:
    """The three cell indices of each 64-bit hash, as a ``(3, n)`` int64 array (one row per slot).

    ``out``, if given, is a ``(3, n)`` int64 array (rows may be views into a larger one).
    """
    if out is None:
        out = np.empty((3, hashes.size), dtype=np.int64)
    view = out.view(_U64)
    first, second, third = view[0], view[1], view[2]
    np.right_shift(hashes, _U64(32), out=third)  # the high word, parked in the last row
    if layout.kind == LAYOUT_FUSE:
        length = _U64(layout.segment_length)
        offset_mask = length - _U64(1)
        np.multiply(third, _U64(layout.span), out=first)
        np.right_shift(first, _U64(32), out=first)
        # (h0 + k*L) ^ x == k*L + (h0 ^ x) for x < L: the XOR only changes the offset in a segment.
        np.right_shift(hashes, _U64(18), out=second)
        np.bitwise_and(second, offset_mask, out=second)
        np.bitwise_xor(second, first, out=second)
        np.add(second, length, out=second)
        np.bitwise_and(hashes, offset_mask, out=third)
        np.bitwise_xor(third, first, out=third)
        np.add(third, _U64(2) * length, out=third)
    else:
        block = _U64(layout.segment_length)
        np.multiply(third, block, out=first)
        np.right_shift(first, _U64(32), out=first)
        for row, shift, base in ((second, 16, block), (third, 0, _U64(2) * block)):
            np.right_shift(hashes, _U64(shift), out=row)
            np.bitwise_and(row, _LOW32, out=row)
            np.multiply(row, block, out=row)
            np.right_shift(row, _U64(32), out=row)
            np.add(row, base, out=row)
    return out


def hash_masks(hashes: np.ndarray, t: int) -> np.ndarray:
    """Each key's ``t``-bit mask: the low bits of ``hash ^ (hash >> 32)``."""
    return ((hashes ^ (hashes >> _U64(32))) & _U64((1 << t) - 1)).astype(_cell_dtype(t))


def _cell_dtype(t: int) -> type:
    return np.uint8 if t <= 8 else np.uint16


# ----------------------------------------------------------------------------- the table


class BloomierTable:
    """An immutable retrieval table; build with :func:`build_table` or :meth:`from_params`."""

    def __init__(self, t: int, seed: int, layout: Layout, n_positions: int, keys: int, cells: np.ndarray):
        self.t = t
        self.seed = seed
        self.layout = layout
        self.n_positions = n_positions
        self.keys = keys
        self._cells = np.ascontiguousarray(cells, dtype=_cell_dtype(t))
        self._cells.setflags(write=False)

    def __repr__(self) -> str:
        kind = "fuse" if self.layout.kind == LAYOUT_FUSE else "classic"
        return (
            f"BloomierTable(t={self.t}, seed={self.seed}, {kind}, cells={self.layout.cells}, "
            f"keys={self.keys}, n_positions={self.n_positions})"
        )

    @property
    def cells(self) -> np.ndarray:
        """The cell values as ``np.uint16`` (pack them with ``bitpack.pack_bits(cells, t)``)."""
        return self._cells.astype(np.uint16)

    @property
    def nbytes(self) -> int:
        """Size of the packed cells in bytes."""
        return (self.layout.cells * self.t + 7) // 8

    def to_params(self) -> dict[str, int]:
        """The table's parameters as small named integers (the cells travel separately)."""
        return {
            "t": self.t,
            "seed": self.seed,
            "layout": self.layout.kind,
            "segment_length": self.layout.segment_length,
            "segment_count": self.layout.segment_count,
            "cells": self.layout.cells,
            "n_positions": self.n_positions,
            "keys": self.keys,
        }

    @classmethod
    def from_params(cls, params: dict[str, int], cells: np.ndarray) -> BloomierTable:
        """Rebuild a table from :meth:`to_params` output and its cells; validates everything.

        Raises :class:`BadInputError` on any missing, extra, out-of-range or inconsistent field.
        """
        layout, values = _validate_params(params)
        cells = np.asarray(cells)
        if cells.ndim != 1 or cells.size != layout.cells:
            raise BadInputError(f"Bloomier table has {cells.size} cells, its header says {layout.cells}")
        if cells.size and not np.issubdtype(cells.dtype, np.integer):
            raise BadInputError(f"Bloomier cells must be integers, got {cells.dtype}")
        if cells.size and (int(cells.min()) < 0 or int(cells.max()) >= 1 << values["t"]):
            raise BadInputError(f"Bloomier cells exceed {values['t']} bits")
        return cls(values["t"], values["seed"], layout, values["n_positions"], values["keys"], cells)

    # ------------------------------------------------------------------------- queries

    def query(self, keys: np.ndarray) -> np.ndarray:
        """The ``t``-bit answer for each key (uint8 for t <= 8, else uint16)."""
        keys = np.asarray(keys)
        if keys.size and (not np.issubdtype(keys.dtype, np.integer) or int(keys.min()) < 0):
            raise ValueError("keys must be non-negative integers")
        flat = keys.ravel()
        out = np.empty(flat.size, dtype=self._cells.dtype)
        buffers = _QueryBuffers(min(QUERY_CHUNK, max(flat.size, 1)), self._cells.dtype)
        for start in range(0, flat.size, QUERY_CHUNK):
            stop = min(start + QUERY_CHUNK, flat.size)
            hashes = position_hash(flat[start:stop], self.seed, buffers.hashes[: stop - start], buffers.scratch)
            self._answer(hashes, out[start:stop], buffers)
        return out.reshape(keys.shape)

    def query_all(
        self, n_positions: int | None = None, workers: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Answers for every position ``0 .. n_positions-1`` (default: the table's ``n_positions``).

        Works in pieces of :data:`QUERY_CHUNK` positions, so beyond ``out`` it needs ~1 MiB
        of scratch. Long queries are shared with helper processes, up to ``workers`` cores in
        all (default: the usable CPUs, at most 8); see :mod:`weightless_cli.codecs.parallel`.
        """
        count = self.n_positions if n_positions is None else n_positions
        if not 0 <= count <= MAX_POSITIONS:
            raise ValueError(f"n_positions must be in [0, {MAX_POSITIONS}], got {count}")
        out = _output_array(out, count, self._cells.dtype)
        _fill_range(self, count, out, workers)
        return out

    def _answer_range(self, start: int, stop: int, out: np.ndarray, buffers: _QueryBuffers) -> None:
        """Answers for the consecutive positions ``start .. stop-1``, written to ``out``."""
        hashes = position_hash_range(start, stop - start, self.seed, buffers.hashes, buffers.scratch, buffers.ramp)
        self._answer(hashes, out, buffers)

    def _answer(self, hashes: np.ndarray, out: np.ndarray, buffers: _QueryBuffers) -> None:
        """XOR of the three cells and the mask for each hash, written to ``out``."""
        n = hashes.size
        first, index, fetched = buffers.first[:n], buffers.index[:n], buffers.fetched[:n]
        cells = self._cells
        hi = buffers.scratch[:n]
        np.right_shift(hashes, _U64(32), out=hi)
        # The mask first, while the whole hash is still at hand; XOR straight into the narrow output.
        np.bitwise_xor(hashes, hi, out=out, casting="unsafe")
        if self.t not in (8, 16):
            np.bitwise_and(out, out.dtype.type((1 << self.t) - 1), out=out)
        layout = self.layout
        span = _U64(layout.span)
        np.multiply(hi, span, out=first)
        np.right_shift(first, _U64(32), out=first)
        # mode="wrap" skips numpy's buffered bounds check; every index is in range by construction.
        np.take(cells, first.view(np.int64), out=fetched, mode="wrap")
        np.bitwise_xor(out, fetched, out=out)
        if layout.kind == LAYOUT_FUSE:
            # (first + k*L) ^ x == k*L + (first ^ x) for x < L, so gather from shifted views.
            length = layout.segment_length
            offset_mask = _U64(length - 1)
            np.right_shift(hashes, _U64(18), out=index)
            np.bitwise_and(index, offset_mask, out=index)
            np.bitwise_xor(index, first, out=index)
            np.take(cells[length:], index.view(np.int64), out=fetched, mode="wrap")
            np.bitwise_xor(out, fetched, out=out)
            np.bitwise_and(hashes, offset_mask, out=index)
            np.bitwise_xor(index, first, out=index)
            np.take(cells[2 * length :], index.view(np.int64), out=fetched, mode="wrap")
            np.bitwise_xor(out, fetched, out=out)
        else:
            block = layout.segment_length
            for shift, base in ((16, block), (0, 2 * block)):
                np.right_shift(hashes, _U64(shift), out=index)
                np.bitwise_and(index, _LOW32, out=index)
                np.multiply(index, _U64(block), out=index)
                np.right_shift(index, _U64(32), out=index)
                np.take(cells[base:], index.view(np.int64), out=fetched, mode="wrap")
                np.bitwise_xor(out, fetched, out=out)


class _QueryBuffers:
    """Scratch for one chunk of queries (each worker has its own)."""

    def __init__(self, size: int, dtype: np.dtype) -> None:
        self.hashes = np.empty(size, dtype=_U64)
        self.scratch = np.empty(size, dtype=_U64)
        self.first = np.empty(size, dtype=_U64)
        self.index = np.empty(size, dtype=_U64)
        self.fetched = np.empty(size, dtype=dtype)
        self.answers = np.empty(size, dtype=dtype)
        self.ramp = np.arange(size, dtype=_U64)


def _output_array(out: np.ndarray | None, count: int, dtype: np.dtype) -> np.ndarray:
    """A new ``(count,)`` array of ``dtype``, or ``out`` once checked to be one (and contiguous)."""
    if out is None:
        return np.empty(count, dtype=dtype)
    if out.shape != (count,) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous ({count},) {np.dtype(dtype)} array")
    return out


def _fill_range(
    table: BloomierTable,
    count: int,
    out: np.ndarray,
    workers: int | None,
    zero: int | None = None,
    lookup: np.ndarray | None = None,
) -> None:
    """``out[:count]`` = the answers for positions ``0 .. count-1``, finished as :func:`_range_filler` says."""
    job = parallel.RangeJob(_range_filler, (table, min(QUERY_CHUNK, max(count, 1)), zero, lookup), out.dtype)
    parallel.run_range(count, job, out, workers)


def _range_filler(table: BloomierTable, chunk: int, zero: int | None, lookup: np.ndarray | None) -> parallel.Fill:
    """``fill(start, stop, out)``: the answers for positions ``start .. stop-1``, capped at ``zero``
    if given (codebook ids), or looked up in ``lookup`` if given (weights).

    Helper processes unpickle and call this too, so it is a module-level function.
    """
    buffers = _QueryBuffers(chunk, table._cells.dtype)

    def fill(start: int, stop: int, out: np.ndarray) -> None:
        for piece_start in range(start, stop, chunk):
            piece_stop = min(piece_start + chunk, stop)
            piece = out[piece_start - start : piece_stop - start]
            answers = piece if lookup is None else buffers.answers[: piece_stop - piece_start]
            table._answer_range(piece_start, piece_stop, answers, buffers)
            if zero is not None:
                np.minimum(piece, piece.dtype.type(zero), out=piece)  # while the piece is still in cache
            if lookup is not None:
                np.take(lookup, answers, out=piece, mode="wrap")

    return fill


# ----------------------------------------------------------------------------- parameters


def _validate_params(params: dict[str, int]) -> tuple[Layout, dict[str, int]]:
    if not isinstance(params, dict):
        raise BadInputError("Bloomier parameters must be a mapping")
    missing = [name for name in PARAM_NAMES if name not in params]
    extra = sorted(set(params) - set(PARAM_NAMES))
    if missing or extra:
        raise BadInputError(f"Bloomier parameters: missing {missing}, unexpected {extra}")
    values: dict[str, int] = {}
    for name in PARAM_NAMES:
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise BadInputError(f"Bloomier parameter {name} must be an integer, got {value!r}")
        values[name] = int(value)

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise BadInputError(f"Bloomier parameters: {message}")

    t, kind, length, count = values["t"], values["layout"], values["segment_length"], values["segment_count"]
    require(MIN_T <= t <= MAX_T, f"t={t} not in [{MIN_T}, {MAX_T}]")
    require(0 <= values["seed"] <= MAX_SEED, f"seed={values['seed']} not in [0, {MAX_SEED}]")
    require(kind in (LAYOUT_CLASSIC, LAYOUT_FUSE), f"unknown layout {kind}")
    require(0 <= values["n_positions"] <= MAX_POSITIONS, f"n_positions={values['n_positions']} out of range")
    require(0 <= values["keys"] <= min(values["n_positions"], MAX_KEYS), f"keys={values['keys']} out of range")
    if kind == LAYOUT_FUSE:
        require(
            1 <= length <= MAX_FUSE_SEGMENT_LENGTH and length & (length - 1) == 0,
            f"segment_length={length} is not a power of two <= {MAX_FUSE_SEGMENT_LENGTH}",
        )
        require(count >= 3 and (count - 2) * length <= MAX_SPAN, f"segment_count={count} out of range")
    else:
        require(1 <= length <= MAX_SPAN, f"segment_length={length} out of range")
        require(count == 3, f"classic layout needs segment_count=3, got {count}")
    layout = Layout(kind, length, count)
    require(values["cells"] == layout.cells, f"cells={values['cells']} but the layout has {layout.cells}")
    require(layout.cells <= max_cells(values["keys"]), f"{layout.cells} cells is too many for {values['keys']} keys")
    return layout, values


def max_cells(n_keys: int) -> int:
    """Largest table a reader accepts for ``n_keys`` keys (the encoder stays far below)."""
    return 2 * n_keys + 1024


# ----------------------------------------------------------------------------- construction


class BuildError(RuntimeError):
    """The hypergraph did not peel for any of the :data:`MAX_ATTEMPTS` seeds."""


def build_table(
    keys: np.ndarray, values: np.ndarray, t: int, seed: int = 0, n_positions: int | None = None
) -> BloomierTable:
    """A table answering ``values[i]`` (< 2**t) for ``keys[i]`` (distinct, non-negative).

    ``n_positions`` (default ``max(keys) + 1``) is the key domain recorded in the table. The
    first seed that peels, of ``seed, seed+1, ...``, is used and recorded.
    """
    keys, values = _check_build_inputs(keys, values, t, seed)
    highest_key = int(keys.max()) if keys.size else -1
    if n_positions is None:
        n_positions = highest_key + 1
    if not 0 <= n_positions <= MAX_POSITIONS or highest_key >= n_positions:
        raise ValueError(f"keys must lie in [0, n_positions) with n_positions <= {MAX_POSITIONS}")
    layout = choose_layout(keys.size)
    if layout.cells > _MAX_BUILD_CELLS:
        raise ValueError(f"{keys.size:,} keys need {layout.cells:,} cells; this encoder builds at most 2**32")
    for attempt in range(MAX_ATTEMPTS):
        attempt_seed = seed + attempt
        if attempt_seed > MAX_SEED:
            break
        cells = _build_cells(_hash_keys(keys, attempt_seed), values, t, layout)
        if cells is not None:
            return BloomierTable(t, attempt_seed, layout, n_positions, keys.size, cells)
        if attempt == 0 and _has_duplicates(keys):
            raise ValueError("keys must be distinct")
    raise BuildError(f"no seed in [{seed}, {seed + MAX_ATTEMPTS}) built a table for {keys.size} keys")


def _has_duplicates(keys: np.ndarray) -> bool:
    # Not np.unique: on millions of distinct integers (numpy 2.4's hash path) it is ~100x slower than a sort.
    ordered = np.sort(keys)
    return bool(np.any(ordered[1:] == ordered[:-1]))


def _check_build_inputs(keys: np.ndarray, values: np.ndarray, t: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(t, (int, np.integer)) or not MIN_T <= t <= MAX_T:
        raise ValueError(f"t must be an integer in [{MIN_T}, {MAX_T}], got {t!r}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    keys = np.asarray(keys)
    values = np.asarray(values)
    if keys.ndim != 1 or values.shape != keys.shape:
        raise ValueError("keys and values must be 1-D arrays of the same length")
    if keys.size > MAX_KEYS:
        raise ValueError(f"at most {MAX_KEYS} keys")
    for name, array, limit in (("keys", keys, None), ("values", values, 1 << t)):
        if array.size == 0:
            continue
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must be integers, got {array.dtype}")
        if int(array.min()) < 0 or (limit is not None and int(array.max()) >= limit):
            raise ValueError(f"{name} out of range")
    return keys, values


def _chunks(count: int) -> Iterator[slice]:
    """Consecutive slices of at most :data:`_BUILD_CHUNK` covering ``[0, count)``."""
    for start in range(0, count, _BUILD_CHUNK):
        yield slice(start, min(start + _BUILD_CHUNK, count))


def _hash_keys(keys: np.ndarray, seed: int) -> np.ndarray:
    """:func:`position_hash` of every key, a chunk at a time so the mixing passes stay in cache."""
    hashes = np.empty(keys.size, dtype=_U64)
    scratch = np.empty(min(keys.size, _BUILD_CHUNK), dtype=_U64)
    for part in _chunks(keys.size):
        position_hash(keys[part], seed, hashes[part], scratch)
    return hashes


def _build_cells(hashes: np.ndarray, values: np.ndarray, t: int, layout: Layout) -> np.ndarray | None:
    """Peel and assign; ``None`` when this seed's hypergraph does not peel."""
    stored = _stored_words(hashes, values, t)
    order = _sweep_order(hashes, layout)
    triples = _triples_in_order(hashes, order, layout)
    del hashes
    rounds = _peel(triples, layout.cells)
    if rounds is None:
        return None
    del triples  # each round kept its keys' cells
    if order is not None:
        stored = stored.take(order)
    return _assign(rounds, stored, layout.cells, t)


def _stored_words(hashes: np.ndarray, values: np.ndarray, t: int) -> np.ndarray:
    """What each key's three cells must XOR to: its value XOR its mask."""
    stored = np.empty(hashes.size, dtype=_cell_dtype(t))
    for part in _chunks(hashes.size):
        np.copyto(stored[part], values[part], casting="unsafe")  # values < 2**t was checked
        stored[part] ^= hash_masks(hashes[part], t)
    return stored


def _sweep_order(hashes: np.ndarray, layout: Layout) -> np.ndarray | None:
    """An order of the keys by their first cell, coarsely (``None``: keep the given order).

    Peeling sweeps the fuse layout from both ends inwards; with keys grouped by the top byte
    of their hash (which orders ``h0``: 256 groups of about two segments each), a round
    touches a narrow band of the per-key arrays and of the cells instead of random rows.
    A stable sort of one byte is a single radix pass; small classic tables fit in cache.
    """
    if layout.kind != LAYOUT_FUSE:
        return None
    top_byte = np.empty(hashes.size, dtype=np.uint8)
    for part in _chunks(hashes.size):
        np.right_shift(hashes[part], _U64(56), out=top_byte[part], casting="unsafe")
    return np.argsort(top_byte, kind="stable")


def _triples_in_order(hashes: np.ndarray, order: np.ndarray | None, layout: Layout) -> np.ndarray:
    """:func:`cell_triples` of ``hashes[order]`` as :func:`_index_dtype` integers, a chunk at a time."""
    n = hashes.size
    triples = np.empty((3, n), dtype=_index_dtype(layout.cells))
    wide = triples.dtype == np.int64
    buffer = None if wide else np.empty((3, min(n, _BUILD_CHUNK)), dtype=np.int64)
    for part in _chunks(n):
        chunk = hashes[part] if order is None else hashes.take(order[part])
        if wide:
            cell_triples(chunk, layout, out=triples[:, part])
        else:
            np.copyto(triples[:, part], cell_triples(chunk, layout, out=buffer[:, : chunk.size]), casting="unsafe")
    return triples


def _index_dtype(n_cells: int) -> type:
    """Cell indices are kept as int32 when they fit: half the memory traffic of int64."""
    return np.int32 if n_cells <= _INDEX32_LIMIT else np.int64


@dataclass(frozen=True)
class _SumPacking:
    """How peeling keeps a cell in one unsigned integer (see :func:`_peel`).

    A cell holds ``(its number of keys - 1) << shift`` plus the sum of its keys' indices,
    modulo ``2**bits``. Key indices are below ``2**(shift - log2(max_degree))``, so with
    fewer than ``max_degree`` keys the sum stays below ``2**shift`` and the count reads back
    exactly; a seed that crowds a cell more fails (see :func:`_counts_fit`).
    """

    dtype: type
    shift: int
    max_degree: int
    max_keys: int

    @property
    def one(self) -> np.unsignedinteger:
        """A cell of one key reads below this; an empty or crowded cell reads this or more."""
        return self.dtype(1 << self.shift)

    @property
    def empty(self) -> np.unsignedinteger:
        """A cell of no keys: ``-1 << shift`` modulo ``2**bits``."""
        return self.dtype((1 << (8 * np.dtype(self.dtype).itemsize)) - (1 << self.shift))


# Half the memory traffic for up to 4 M keys: 31 indices below 2**22 sum below 2**27, and
# the five count bits above hold 0..31 (32 keys in a cell wrap, which the total catches).
_NARROW_SUMS = _SumPacking(np.uint32, 27, 32, 1 << 22)
_WIDE_SUMS = _SumPacking(_U64, 48, 1 << 14, MAX_KEYS)


def _sum_packing(n_keys: int) -> _SumPacking:
    return _NARROW_SUMS if n_keys <= _NARROW_SUMS.max_keys else _WIDE_SUMS


def _peel(triples: np.ndarray, n_cells: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Peel in rounds; return each round's ``(pairs, cells)``, or ``None`` if it gets stuck.

    A round's ``pairs`` are ``key_index << 32 | free_cell``, one per key peeled in it, in
    increasing order, and its ``cells`` are those keys' three cells (``triples[:, keys]``).

    ``acc`` (see :class:`_SumPacking`) makes a cell holding exactly one key read that key's
    index, an empty cell wrap around to a huge value and a crowded one read ``one`` or more,
    so one comparison finds the cells that free a key, and which key.
    """
    n = triples.shape[1]
    packing = _sum_packing(n)
    acc = _cell_sums(triples, n_cells, packing)
    if acc is None:
        return None
    one = packing.one
    # What a key added to each of its three cells, less its index.
    removal = np.full((3, 1), one, dtype=packing.dtype)
    take_cells, take_acc = triples.take, acc.take
    # The rounds' cells, in one array: thousands of small ones would each take fresh pages.
    # They keep the triples' dtype (int32 for most tables): half the fresh memory of intp,
    # whose page faults cost more than converting each round's indices.
    cell_store = np.empty(3 * n, dtype=triples.dtype)
    free = np.flatnonzero(acc < one)
    keys = acc.take(free)
    rounds: list[tuple[np.ndarray, np.ndarray]] = []
    peeled = 0
    while free.size:
        pairs = _key_cell_pairs(keys, free)
        if peeled + pairs.size > n:
            return None  # a key peeled twice: impossible once the counts are checked
        key_index = (pairs >> _U64(32)).view(np.int64)
        touched = cell_store[3 * peeled : 3 * (peeled + pairs.size)].reshape(3, pairs.size)
        take_cells(key_index, axis=1, mode="wrap", out=touched)
        rounds.append((pairs, touched))
        peeled += pairs.size
        touched = touched.reshape(-1)
        np.subtract.at(acc, touched, np.add(key_index.astype(packing.dtype), removal).reshape(-1))
        reached = take_acc(touched, mode="wrap")
        at = np.flatnonzero(reached < one)
        free, keys = touched.take(at), reached.take(at)
    return rounds if peeled == n else None


def _key_cell_pairs(keys: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``key << 32 | cell``, sorted, one per distinct key: the one with its lowest cell.

    A key alone in two cells (or a cell reached twice) shows up more than once. A key's
    cells increase with the slot in both layouts, so its lowest cell is its lowest slot.
    """
    pairs = keys.astype(_U64)
    pairs <<= _U64(32)
    pairs |= cells.astype(_U64)
    pairs.sort()
    key_of = pairs >> _U64(32)
    first = np.empty(pairs.size, dtype=bool)
    first[:1] = True
    np.not_equal(key_of[1:], key_of[:-1], out=first[1:])
    return pairs[first]


def _cell_sums(triples: np.ndarray, n_cells: int, packing: _SumPacking) -> np.ndarray | None:
    """The peeling accumulator (see :func:`_peel`), or ``None`` if some cell is too crowded.

    Added a chunk of keys at a time: keys come in cell order, so each chunk's updates hit
    a cached band of ``acc``.
    """
    n = triples.shape[1]
    acc = np.full(n_cells, packing.empty, dtype=packing.dtype)
    ramp = np.arange(min(n, _BUILD_CHUNK), dtype=packing.dtype)
    ramp += packing.one
    added = np.empty_like(ramp)
    for part in _chunks(n):
        chunk = added[: part.stop - part.start]
        np.add(ramp[: chunk.size], packing.dtype(part.start), out=chunk)
        for slot in range(3):
            np.add.at(acc, triples[slot, part], chunk)
    return acc if _counts_fit(acc, n, packing) else None


def _counts_fit(acc: np.ndarray, n_keys: int, packing: _SumPacking) -> bool:
    """Whether every cell holds fewer than ``packing.max_degree`` keys (else: next seed).

    Below that each count reads back exactly, so the counts must also add up to
    ``3 * n_keys``; that second test catches a count field that wrapped around (a cell of
    2**16 keys in the wide packing, or 32 in the narrow one: never seen with hashed keys,
    but not impossible). A wrapped cell reads fewer keys than it holds, and every other
    cell reads exactly, so the total falls short.
    """
    largest, total = 0, 0
    for part in _chunks(acc.size):
        counts = acc[part] + packing.one
        counts >>= packing.dtype(packing.shift)
        largest = max(largest, int(counts.max()))
        total += int(counts.sum(dtype=np.uint64))
    return largest < packing.max_degree and total == 3 * n_keys


def _assign(rounds: list[tuple[np.ndarray, np.ndarray]], stored: np.ndarray, n_cells: int, t: int) -> np.ndarray:
    """Fill cells so every key answers its value; later-peeled keys go first.

    Keys peeled in one round never share a free cell, and a key's free cell is still zero
    when it is assigned, so a whole round is ``cells[free] = stored ^ cell0 ^ cell1 ^ cell2``.
    """
    cells = np.zeros(n_cells, dtype=_cell_dtype(t))
    take_cells, take_stored = cells.take, stored.take
    for pairs, touched in reversed(rounds):
        value = take_stored((pairs >> _U64(32)).view(np.int64), mode="wrap")
        got = take_cells(touched, mode="wrap")
        value ^= got[0]
        value ^= got[1]
        value ^= got[2]
        cells[(pairs & _LOW32).view(np.int64)] = value
    return cells


# ----------------------------------------------------------------------------- Weightless semantics


def encode_positions(
    positions: np.ndarray, ids: np.ndarray, n_positions: int, t: int, seed: int = 0
) -> BloomierTable:
    """Store codebook index ``ids[i]`` for nonzero weight ``positions[i]`` of an ``n_positions`` tensor.

    ``ids`` must be < K for the codebook size K <= 2**t - 1 the decoder will use; answers
    ``>= K`` then mean zero.
    """
    positions = np.asarray(positions)
    ids = np.asarray(ids)
    if ids.size and int(ids.max()) >= (1 << t) - 1:
        raise ValueError(f"codebook indices must be < 2**t - 1 = {(1 << t) - 1} so one value is left for zero")
    # build_table checks the rest (distinct, in range) and reports duplicates by name.
    return build_table(positions, ids, t, seed, n_positions=n_positions)


def decode_ids(table: BloomierTable, n_positions: int, k: int, workers: int | None = None) -> np.ndarray:
    """Codebook index per position, with ``k`` (the codebook size) standing for zero.

    Returns uint8 (t <= 8) or uint16; look weights up as ``np.append(codebook, 0)[ids]``,
    or use :func:`decode_values` to skip the index array. ``workers`` as in
    :meth:`BloomierTable.query_all`.
    """
    _check_decode(table, n_positions, k)
    ids = np.empty(n_positions, dtype=table._cells.dtype)
    _fill_range(table, n_positions, ids, workers, zero=k)
    return ids


def decode_values(
    table: BloomierTable,
    n_positions: int,
    codebook: np.ndarray,
    workers: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The dense weights: ``codebook[id]`` per position, 0 where the answer is ``>= len(codebook)``.

    Streams chunk by chunk into ``out`` (default: a new array of ``codebook.dtype``), so no
    index array of the tensor's size is ever made. ``workers`` as in :meth:`BloomierTable.query_all`.
    """
    codebook = np.asarray(codebook).ravel()
    k = codebook.size
    _check_decode(table, n_positions, k)
    lookup = np.zeros(1 << table.t, dtype=codebook.dtype)  # every answer >= k reads 0
    lookup[:k] = codebook
    out = _output_array(out, n_positions, codebook.dtype)
    _fill_range(table, n_positions, out, workers, lookup=lookup)
    return out


def _check_decode(table: BloomierTable, n_positions: int, k: int) -> None:
    if n_positions != table.n_positions:
        raise BadInputError(f"Bloomier table covers {table.n_positions} positions, the tensor has {n_positions}")
    if not 0 <= k <= (1 << table.t) - 1:
        raise BadInputError(f"codebook of {k} entries does not fit a {table.t}-bit table (max {(1 << table.t) - 1})")


def expected_false_positives(n_zero: int, k: int, t: int) -> float:
    """Expected zero positions decoded as nonzero: each answers one of the ``k`` ids w.p. ``k / 2**t``."""
    return n_zero * k / float(1 << t)
