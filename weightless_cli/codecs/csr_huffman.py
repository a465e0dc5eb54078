"""``csr-huffman``: Deep Compression's storage of a pruned, clustered tensor (Han et al., ICLR 2016), exactly.

The baseline the Weightless paper compares against, computed by the same tool on the same tensor:

* nonzeros in C order (the CSR order of a 2-D weight) with *relative indices*: each entry stores the
  number of zeros skipped since the previous entry in ``bits`` bits. When a gap does not fit, *filler
  zeros* are inserted: an entry skipping 2^bits − 1 zeros that itself holds the value zero (codebook
  index K), as in the paper's Figure 2. The width is chosen per tensor, trying 2..8 bits and keeping the
  smallest result, as the paper's tables do (4–5 bits for FC layers, 8 for convolutions);
* the relative indices and the codebook indices (filler zeros as index K) are each Huffman coded with a
  canonical code (limited to 16-bit codewords); the code lengths are stored, the codebook is stored raw.

Decoding is vectorised: every bit offset of a stream is decoded at once by a 16-bit table lookup, and
the chain of codeword starts from offset 0 is found by pointer doubling (log2(entries) gathers), so no
Python loop runs per symbol. Byte-exact format: ``docs/codecs/exact.md``.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from weightless_cli.codecs.clustered import SparseCode
from weightless_cli.codecs.entropy import ByteReader, ids_dtype, varint
from weightless_cli.errors import BadInputError

__all__ = ["MAX_CODE_LENGTH", "PARAM_NAMES", "SECTIONS", "WIDTHS", "canonical_codes", "code_lengths",
           "decode", "encode", "estimate_bits", "relative_entries"]

WIDTHS = range(2, 9)  # relative-index widths tried, in bits
MAX_CODE_LENGTH = 16
MAX_IDS = 2**16 - 1
PARAM_NAMES = ("bits", "entries")
SECTIONS = ("codebook", "gaps", "ids", "lengths")
_WHAT = "csr-huffman stream"


# --- relative indices with filler zeros ----------------------------------------------------------------------


def relative_entries(code: SparseCode, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(relative index, codebook index) of every entry, filler zeros (index K) included."""
    positions = np.asarray(code.positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1) - 1
    span = 1 << bits  # positions one filler advances: 2^bits - 1 skipped zeros plus itself
    fillers = gaps >> bits
    index_of_nonzero = np.arange(positions.size) + np.cumsum(fillers)
    total = positions.size + int(fillers.sum())
    relative = np.full(total, span - 1, dtype=np.int64)
    ids = np.full(total, code.k, dtype=np.int64)
    relative[index_of_nonzero] = gaps & (span - 1)
    ids[index_of_nonzero] = code.ids
    return relative, ids


# --- canonical Huffman codes ---------------------------------------------------------------------------------


def _tree_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths (0 for unused symbols); ties broken by node number, so deterministic."""
    lengths = np.zeros(counts.size, dtype=np.int64)
    used = np.flatnonzero(counts)
    if used.size == 1:
        lengths[used] = 1
    if used.size <= 1:
        return lengths
    heap = [(int(counts[symbol]), node) for node, symbol in enumerate(used)]
    heapq.heapify(heap)
    parent = [0] * (2 * used.size - 1)
    for node in range(used.size, 2 * used.size - 1):  # one loop per internal node: alphabet-sized
        first_count, first = heapq.heappop(heap)
        second_count, second = heapq.heappop(heap)
        parent[first] = parent[second] = node
        heapq.heappush(heap, (first_count + second_count, node))
    depth = [0] * (2 * used.size - 1)
    for node in range(2 * used.size - 3, -1, -1):  # parents have higher numbers than their children
        depth[node] = depth[parent[node]] + 1
    lengths[used] = depth[: used.size]
    return lengths


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths of at most ``max_length`` bits: counts are halved until the tree fits
    (at worst all counts become 1, a balanced tree, which fits any alphabet of up to 2^max_length)."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = _tree_lengths(counts)
    while lengths.max(initial=0) > max_length:
        counts = np.where(counts > 0, (counts + 1) >> 1, 0)
        lengths = _tree_lengths(counts)
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codewords (MSB first) for code lengths: shorter codes first, then by symbol."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[lengths[order] > 0]
    code = previous = 0
    for rank, symbol in enumerate(order):  # alphabet-sized
        length = int(lengths[symbol])
        code = 0 if rank == 0 else (code + 1) << (length - previous)
        codes[symbol], previous = code, length
    return codes


def _pack_codes(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate the canonical codewords of ``symbols`` MSB first; the last byte is zero-padded."""
    codes = canonical_codes(lengths)
    size, word = lengths[symbols], codes[symbols]
    starts = np.cumsum(size) - size
    stream = np.zeros(int(size.sum()), dtype=np.uint8)
    for bit in range(MAX_CODE_LENGTH):
        has = np.flatnonzero(size > bit)
        stream[starts[has] + bit] = (word[has] >> (size[has] - 1 - bit)) & 1
    return np.packbits(stream).tobytes()


def _lookup_table(lengths: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(symbol, length) for every 16-bit window; length 0 where no codeword starts the window."""
    lengths = np.asarray(lengths, dtype=np.int64)
    used = lengths > 0
    kraft = int((np.int64(1) << (MAX_CODE_LENGTH - lengths[used])).sum())
    if kraft > 1 << MAX_CODE_LENGTH or (kraft < 1 << MAX_CODE_LENGTH and used.sum() > 1):
        raise BadInputError(f"corrupt {_WHAT}: the {what} code lengths do not form a complete prefix code")
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[used[order]]
    spans = np.int64(1) << (MAX_CODE_LENGTH - lengths[order])
    window_symbols = np.zeros(1 << MAX_CODE_LENGTH, dtype=np.int64)
    window_lengths = np.zeros(1 << MAX_CODE_LENGTH, dtype=np.int64)
    window_symbols[:kraft] = np.repeat(order, spans)  # canonical codes fill the windows in this order
    window_lengths[:kraft] = np.repeat(lengths[order], spans)
    return window_symbols, window_lengths


def _decode_stream(data: bytes, lengths: np.ndarray, count: int, what: str) -> np.ndarray:
    """``count`` symbols from a canonical Huffman stream, checking it ends in the last byte with zero padding."""
    if count == 0:
        if data:
            raise BadInputError(f"corrupt {_WHAT}: the {what} stream holds {len(data)} bytes but no entries")
        return np.zeros(0, dtype=np.int64)
    window_symbols, window_lengths = _lookup_table(lengths, what)
    raw = np.frombuffer(data + b"\0\0\0", dtype=np.uint8).astype(np.int64)
    total_bits = 8 * len(data)
    offsets = np.arange(total_bits)
    byte = offsets >> 3
    windows = ((raw[byte] << 16 | raw[byte + 1] << 8 | raw[byte + 2]) >> (8 - (offsets & 7))) & 0xFFFF
    size = window_lengths[windows]
    # jump[i]: where the codeword after the one starting at bit i starts; total_bits absorbs invalid codes
    jump = np.append(np.where(size > 0, offsets + size, total_bits), total_bits)
    jump = np.minimum(jump, total_bits)
    starts = np.zeros(count, dtype=np.int64)
    ranks = np.arange(count)
    for level in range(max(count - 1, 1).bit_length()):  # starts[m] = jump^m(0), m taken bit by bit
        has = np.flatnonzero((ranks >> level) & 1)
        starts[has] = jump[starts[has]]
        if level + 1 < max(count - 1, 1).bit_length():
            jump = jump[jump]
    if int(starts[-1]) >= total_bits or not size[starts].all():
        raise BadInputError(f"corrupt {_WHAT}: the {what} stream ends before its {count} entries")
    end = int(starts[-1] + size[starts[-1]])
    if end > total_bits or total_bits - end >= 8 or (raw[len(data) - 1] & ((1 << (total_bits - end)) - 1)):
        raise BadInputError(f"corrupt {_WHAT}: the {what} stream does not end with its last entry")
    return window_symbols[windows[starts]]


# --- the codec -----------------------------------------------------------------------------------------------


def _plan(code: SparseCode, bits: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Entries and Huffman code lengths at relative-index width ``bits``, with the bytes they take."""
    relative, ids = relative_entries(code, bits)
    gap_lengths = code_lengths(np.bincount(relative, minlength=1 << bits))
    id_lengths = code_lengths(np.bincount(ids, minlength=code.k + 1))
    stream_bytes = sum((int(lengths[symbols].sum()) + 7) // 8 for symbols, lengths in
                       ((relative, gap_lengths), (ids, id_lengths)))
    return bits, relative, ids, gap_lengths, id_lengths, stream_bytes + len(_lengths_section(gap_lengths, id_lengths))


def _trim(lengths: np.ndarray) -> np.ndarray:
    used = np.flatnonzero(lengths)
    return lengths[: used[-1] + 1] if used.size else lengths[:0]


def _lengths_section(gap_lengths: np.ndarray, id_lengths: np.ndarray) -> bytes:
    parts = []
    for lengths in (_trim(gap_lengths), _trim(id_lengths)):
        parts += [varint(lengths.size), lengths.astype(np.uint8).tobytes()]
    return b"".join(parts)


def encode(code: SparseCode, shape: tuple[int, ...], bits: int | None = None) -> tuple[dict[str, int], dict[str, bytes]]:
    """Params ``bits`` and ``entries``; sections ``gaps``, ``ids``, ``lengths`` (the stage adds ``codebook``).

    ``bits`` fixes the relative-index width (the paper used 5 for FC and 8 for conv layers); by default
    every width in :data:`WIDTHS` is tried and the smallest encoding kept (the narrowest on a tie).
    """
    if math.prod(shape) != code.size:
        raise ValueError(f"shape {shape} has {math.prod(shape)} elements, the code {code.size}")
    if code.k > MAX_IDS:
        raise ValueError(f"{code.k} codebook entries (limit {MAX_IDS})")
    if bits is not None and bits not in WIDTHS:
        raise ValueError(f"relative-index width {bits} outside {WIDTHS.start}..{WIDTHS.stop - 1}")
    widths = WIDTHS if bits is None else [bits]
    bits, relative, ids, gap_lengths, id_lengths, _ = min(
        (_plan(code, width) for width in widths), key=lambda plan: plan[-1])  # first minimum: narrowest
    sections = {
        "gaps": _pack_codes(relative, gap_lengths),
        "ids": _pack_codes(ids, id_lengths),
        "lengths": _lengths_section(gap_lengths, id_lengths),
    }
    return {"bits": bits, "entries": int(relative.size)}, sections


def estimate_bits(code: SparseCode, shape: tuple[int, ...]) -> int:
    """Exact size of the ``gaps``, ``ids`` and ``lengths`` sections in bits (the codebook is extra)."""
    _, sections = encode(code, shape)
    return 8 * sum(len(data) for data in sections.values())


def _read_lengths(data: bytes, bits: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    reader = ByteReader(data, "csr-huffman lengths")
    tables = []
    for label, alphabet in (("relative-index", 1 << bits), ("codebook-index", k + 1)):
        size = reader.varint(alphabet, f"{label} alphabet size")
        lengths = np.frombuffer(reader.take(size, f"{label} code lengths"), dtype=np.uint8).astype(np.int64)
        if lengths.size and int(lengths.max()) > MAX_CODE_LENGTH:
            raise reader.fail(f"a {label} code is longer than {MAX_CODE_LENGTH} bits")
        tables.append(lengths)
    reader.done()
    return tables[0], tables[1]


def decode(params: dict[str, int], sections: dict[str, bytes], shape: tuple[int, ...], k: int) -> np.ndarray:
    """One codebook index per position (length N, C order); K marks a zero. Corrupt input: BadInputError."""
    if sorted(params) != sorted(PARAM_NAMES):
        raise BadInputError(f"corrupt {_WHAT}: params {sorted(params)} do not match {sorted(PARAM_NAMES)}")
    n_positions = math.prod(shape)
    bits, entries = params["bits"], params["entries"]
    if bits not in WIDTHS:
        raise BadInputError(f"corrupt {_WHAT}: param bits = {bits} outside {WIDTHS.start}..{WIDTHS.stop - 1}")
    if not 0 <= entries <= n_positions:  # every entry, filler or not, takes a position of its own
        raise BadInputError(f"corrupt {_WHAT}: param entries = {entries} outside 0..{n_positions}")
    for name in ("gaps", "ids"):  # a codeword is 1..16 bits: bound the streams before decoding them
        if not entries // 8 <= len(sections[name]) <= 2 * entries:
            raise BadInputError(f"corrupt {_WHAT}: the {name} stream is {len(sections[name])} bytes "
                                f"for {entries} entries")
    gap_lengths, id_lengths = _read_lengths(sections["lengths"], bits, k)
    relative = _decode_stream(sections["gaps"], gap_lengths, entries, "relative-index")
    ids = _decode_stream(sections["ids"], id_lengths, entries, "codebook-index")
    positions = np.cumsum(relative + 1) - 1
    if entries and int(positions[-1]) >= n_positions:
        raise BadInputError(f"corrupt {_WHAT}: entries run past the tensor's {n_positions} positions")
    out = np.full(n_positions, k, dtype=ids_dtype(k))
    nonzero = ids < k
    out[positions[nonzero]] = ids[nonzero]
    return out
