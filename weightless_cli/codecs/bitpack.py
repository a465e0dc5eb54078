"""Pack small unsigned integers at 1..16 bits each into bytes, and back (pure numpy).

Bit order is little-endian throughout: value ``i`` occupies stream bits
``[i*bits, (i+1)*bits)``, its least significant bit first, and stream bit ``j`` is bit
``j % 8`` (LSB = 0) of byte ``j // 8``. The stream is ``ceil(count*bits/8)`` bytes and the
unused high bits of the last byte are zero. For ``bits`` 8 and 16 this is simply the
values as ``uint8`` / little-endian ``uint16``.

Work is done in chunks of :data:`CHUNK_VALUES` values so temporaries stay near 16 MiB
whatever the input size.
"""

from __future__ import annotations

import numpy as np

from weightless_cli.errors import BadInputError

MIN_BITS = 1
MAX_BITS = 16
CHUNK_VALUES = 1 << 20  # a multiple of 8, so every chunk starts on a byte boundary


def packed_size(count: int, bits: int) -> int:
    """Bytes needed to hold ``count`` values of ``bits`` bits."""
    _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (count * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack the non-negative integers ``values`` (each < 2**bits) at ``bits`` bits each."""
    _check_bits(bits)
    values = np.asarray(values).ravel()
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"pack_bits needs integers, got {values.dtype}")
    if values.size and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, 2**{bits})")
    if bits == 8:
        return values.astype(np.uint8).tobytes()
    if bits == 16:
        return values.astype("<u2").tobytes()
    chunks = [_pack_chunk(values[i : i + CHUNK_VALUES], bits) for i in range(0, values.size, CHUNK_VALUES)]
    return b"".join(chunks)


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values as ``np.uint16``.

    ``data`` must be exactly :func:`packed_size` bytes with zero padding bits, else
    :class:`BadInputError` (corrupt input must not be silently accepted).
    """
    expected = packed_size(count, bits)
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != expected:
        raise BadInputError(f"packed cells are {raw.size} bytes, expected {expected} for {count} x {bits} bits")
    used_bits = count * bits
    if used_bits % 8 and raw[-1] >> (used_bits % 8):
        raise BadInputError("packed cells have nonzero padding bits")
    if bits == 8:
        return raw.astype(np.uint16)
    if bits == 16:
        return raw.view("<u2").astype(np.uint16)
    out = np.empty(count, dtype=np.uint16)
    chunk_bytes = CHUNK_VALUES * bits // 8
    for first in range(0, count, CHUNK_VALUES):
        n = min(CHUNK_VALUES, count - first)
        start = first // CHUNK_VALUES * chunk_bytes
        out[first : first + n] = _unpack_chunk(raw[start : start + packed_size(n, bits)], bits, n)
    return out


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def _group_layout(bits: int) -> list[tuple[int, int]]:
    """(word, shift) of each of the 8 values in a group of 8, packed into two uint64 words."""
    return [(j * bits // 64, j * bits % 64) for j in range(8)]


def _pack_chunk(values: np.ndarray, bits: int) -> bytes:
    # 8 values make exactly `bits` bytes; build each group as two little-endian uint64
    # words (8 x 16 bits = 128 at most), then keep the first `bits` bytes of each group.
    groups = -(-values.size // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[: values.size] = values
    column = padded.reshape(groups, 8)
    words = np.zeros((groups, 2), dtype="<u8")
    for j, (word, shift) in enumerate(_group_layout(bits)):
        v = column[:, j]
        words[:, word] |= v << np.uint64(shift)
        if word == 0 and shift + bits > 64:  # straddles the two words
            words[:, 1] |= v >> np.uint64(64 - shift)
    group_bytes = words.view(np.uint8)[:, :bits]
    return group_bytes.tobytes()[: packed_size(values.size, bits)]


def _unpack_chunk(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    groups = -(-count // 8)
    flat = np.zeros(groups * bits, dtype=np.uint8)
    flat[: raw.size] = raw
    padded = np.zeros((groups, 16), dtype=np.uint8)  # each group's bytes, then zeros
    padded[:, :bits] = flat.reshape(groups, bits)
    words = padded.view("<u8")
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((groups, 8), dtype=np.uint16)
    for j, (word, shift) in enumerate(_group_layout(bits)):
        v = words[:, word] >> np.uint64(shift)
        if word == 0 and shift + bits > 64:
            v |= words[:, 1] << np.uint64(64 - shift)
        out[:, j] = v & mask
    return out.reshape(-1)[:count]
