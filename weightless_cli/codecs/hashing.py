"""Vectorised MurmurHash3 pieces for hashing weight positions (pure numpy).

Two functions matter:

* :func:`position_hash` is what the Bloomier table uses: MurmurHash3's 64-bit finalizer
  ``fmix64`` applied to ``key + seed_word(seed)`` (mod 2**64), the construction of Graf &
  Lemire's binary fuse filters. It costs 9 uint64 numpy passes per key and yields 64
  well-mixed bits, enough for the three cells and the mask of one key.
* :func:`murmur3_32` is the full MurmurHash3 x86_32 of each key's little-endian bytes,
  bit-for-bit equal to ``mmh3.hash(key_bytes, seed, signed=False)``. It is kept as the
  measured alternative (and reference): it needs ~22 uint32 passes for 32 bits, so two of
  them (for 64 bits) cost more than one ``fmix64`` — see ``bench/bench_bloomier.py``.

All arithmetic is modular (numpy unsigned integers wrap silently), so results are identical
on every platform. No function here loops over elements in Python.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, the usual odd additive constant

# MurmurHash3 constants (Austin Appleby, public domain; see smhasher).
FMIX64_C1 = 0xFF51AFD7ED558CCD
FMIX64_C2 = 0xC4CEB9FE1A85EC53
FMIX32_C1 = 0x85EBCA6B
FMIX32_C2 = 0xC2B2AE35
MURMUR32_C1 = 0xCC9E2D51
MURMUR32_C2 = 0x1B873593
MURMUR32_N = 0xE6546B64

_U64 = np.uint64
_U32 = np.uint32


def fmix64_int(value: int) -> int:
    """MurmurHash3's 64-bit finalizer on one Python int (the scalar reference)."""
    value &= MASK64
    value ^= value >> 33
    value = (value * FMIX64_C1) & MASK64
    value ^= value >> 33
    value = (value * FMIX64_C2) & MASK64
    value ^= value >> 33
    return value


def fmix64(values: np.ndarray, out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """MurmurHash3's fmix64 of every uint64 in ``values``, written to ``out`` (may be ``values``).

    ``scratch`` is an optional 1-D uint64 buffer at least as long, so hot loops allocate nothing.
    """
    if out is None:
        out = np.array(values, dtype=_U64, copy=True)
    elif out is not values:
        np.copyto(out, values, casting="unsafe")
    scratch = np.empty_like(out) if scratch is None else scratch[: out.size]
    np.right_shift(out, _U64(33), out=scratch)
    np.bitwise_xor(out, scratch, out=out)
    return _fmix64_rest(out, scratch)


def _fmix64_rest(out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """fmix64 after its first ``x ^= x >> 33``, in place."""
    shift = _U64(33)
    np.multiply(out, _U64(FMIX64_C1), out=out)
    np.right_shift(out, shift, out=scratch)
    np.bitwise_xor(out, scratch, out=out)
    np.multiply(out, _U64(FMIX64_C2), out=out)
    np.right_shift(out, shift, out=scratch)
    np.bitwise_xor(out, scratch, out=out)
    return out


def seed_word(seed: int) -> int:
    """The 64-bit word added to every key before mixing; distinct seeds give distinct words."""
    if not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return fmix64_int((seed + GOLDEN64) & MASK64)


def position_hash(
    keys: np.ndarray, seed: int, out: np.ndarray | None = None, scratch: np.ndarray | None = None
) -> np.ndarray:
    """64-bit hash of each key: ``fmix64((key + seed_word(seed)) mod 2**64)``.

    ``keys`` are non-negative integers (any integer dtype); the result is uint64.
    """
    # Convert first: numpy promotes int64 + uint64 to float64, which would lose bits.
    keys = np.asarray(keys).astype(_U64, copy=False)
    if out is None:
        out = np.empty(keys.shape, dtype=_U64)
    np.add(keys, _U64(seed_word(seed)), out=out)
    return fmix64(out, out=out, scratch=scratch)


def position_hash_range(
    start: int, count: int, seed: int, out: np.ndarray, scratch: np.ndarray, ramp: np.ndarray
) -> np.ndarray:
    """:func:`position_hash` of the consecutive keys ``start .. start+count-1`` into ``out[:count]``.

    ``ramp`` must hold ``0, 1, 2, ...`` (uint64, at least ``count`` long); reusing it avoids
    materialising the keys.
    """
    dest = out[:count]
    offset = (start + seed_word(seed)) & MASK64
    np.add(ramp[:count], _U64(offset), out=dest)
    last = offset + max(count, 1) - 1
    if last <= MASK64 and offset >> 33 == last >> 33:
        # Consecutive words that neither wrap nor cross a multiple of 2**33 share ``x >> 33``,
        # so fmix64's first step is one XOR with a constant (a pass less).
        np.bitwise_xor(dest, _U64(offset >> 33), out=dest)
        return _fmix64_rest(dest, scratch[:count])
    return fmix64(dest, out=dest, scratch=scratch[:count])


def _rotl32(values: np.ndarray, amount: int, scratch: np.ndarray) -> None:
    np.right_shift(values, _U32(32 - amount), out=scratch)
    np.left_shift(values, _U32(amount), out=values)
    np.bitwise_or(values, scratch, out=values)


def _fmix32(h: np.ndarray, scratch: np.ndarray) -> None:
    for shift, multiplier in ((16, FMIX32_C1), (13, FMIX32_C2)):
        np.right_shift(h, _U32(shift), out=scratch)
        np.bitwise_xor(h, scratch, out=h)
        np.multiply(h, _U32(multiplier), out=h)
    np.right_shift(h, _U32(16), out=scratch)
    np.bitwise_xor(h, scratch, out=h)


def murmur3_32(keys: np.ndarray, seed: int) -> np.ndarray:
    """MurmurHash3 x86_32 of each key's little-endian bytes, equal to ``mmh3.hash(b, seed, signed=False)``.

    ``keys`` must be uint32 (4-byte keys) or uint64 (8-byte keys); ``seed`` is in [0, 2**32).
    """
    keys = np.asarray(keys)
    if keys.dtype == np.uint32:
        blocks = [keys]
    elif keys.dtype == np.uint64:
        blocks = [(keys & _U64(0xFFFFFFFF)).astype(_U32), (keys >> _U64(32)).astype(_U32)]
    else:
        raise TypeError(f"murmur3_32 hashes uint32 or uint64 keys, got {keys.dtype}")
    if not 0 <= seed < 1 << 32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    h = np.full(keys.shape, seed, dtype=_U32)
    k = np.empty_like(h)
    scratch = np.empty_like(h)
    for block in blocks:
        np.multiply(block, _U32(MURMUR32_C1), out=k)
        _rotl32(k, 15, scratch)
        np.multiply(k, _U32(MURMUR32_C2), out=k)
        np.bitwise_xor(h, k, out=h)
        _rotl32(h, 13, scratch)
        np.multiply(h, _U32(5), out=h)
        np.add(h, _U32(MURMUR32_N), out=h)
    np.bitwise_xor(h, _U32(4 * len(blocks)), out=h)  # the length in bytes
    _fmix32(h, scratch)
    return h
