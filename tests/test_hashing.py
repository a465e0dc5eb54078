"""Vectorised MurmurHash3 pieces against the mmh3 reference and scalar definitions."""

import mmh3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightless_cli.codecs.hashing import (
    MASK64,
    fmix64,
    fmix64_int,
    murmur3_32,
    position_hash,
    position_hash_range,
    seed_word,
)

uint32s = st.integers(0, (1 << 32) - 1)
uint64s = st.integers(0, MASK64)


@pytest.mark.parametrize("width, dtype, values", [(4, np.uint32, uint32s), (8, np.uint64, uint64s)])
def test_murmur3_32_matches_mmh3(width, dtype, values):
    @settings(max_examples=60, deadline=None)
    @given(keys=st.lists(values, min_size=1, max_size=200), seed=uint32s)
    def check(keys, seed):
        ours = murmur3_32(np.array(keys, dtype=dtype), seed)
        reference = [mmh3.hash(k.to_bytes(width, "little"), seed, signed=False) for k in keys]
        assert ours.tolist() == reference

    check()


def test_murmur3_32_rejects_other_dtypes_and_seeds():
    with pytest.raises(TypeError):
        murmur3_32(np.arange(4, dtype=np.int64), 0)
    with pytest.raises(ValueError):
        murmur3_32(np.arange(4, dtype=np.uint32), 1 << 32)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(uint64s, min_size=1, max_size=200))
def test_fmix64_matches_scalar_definition(values):
    array = np.array(values, dtype=np.uint64)
    assert fmix64(array).tolist() == [fmix64_int(v) for v in values]
    # In place with caller scratch gives the same words.
    scratch = np.empty(len(values) + 5, dtype=np.uint64)
    assert fmix64(array, out=array, scratch=scratch).tolist() == [fmix64_int(v) for v in values]


@pytest.mark.parametrize("seed", [0, 1, 7, 12345, (1 << 31) - 1])
def test_fmix64_is_mmh3s_finalizer(seed):
    # MurmurHash3_x64_128 of an empty key is h1 = fmix64(2s) + fmix64(3s), h2 = h1 + fmix64(3s),
    # so mmh3 pins down fmix64 at 2s and 3s.
    digest = mmh3.hash128(b"", seed, True, False)
    low, high = digest & MASK64, digest >> 64
    assert fmix64_int(3 * seed) == (high - low) & MASK64
    assert fmix64_int(2 * seed) == (2 * low - high) & MASK64
    assert fmix64(np.array([2 * seed, 3 * seed], dtype=np.uint64)).tolist() == [
        fmix64_int(2 * seed),
        fmix64_int(3 * seed),
    ]


@settings(max_examples=40, deadline=None)
@given(keys=st.lists(st.integers(0, (1 << 62) - 1), min_size=1, max_size=100), seed=uint32s)
def test_position_hash_is_fmix64_of_key_plus_seed_word(keys, seed):
    expected = [fmix64_int(k + seed_word(seed)) for k in keys]
    # Signed and unsigned key arrays hash alike (int64 + uint64 must not go through float64).
    assert position_hash(np.array(keys, dtype=np.int64), seed).tolist() == expected
    assert position_hash(np.array(keys, dtype=np.uint64), seed).tolist() == expected


@pytest.mark.parametrize("word_start", [
    (1 << 33) - 100,  # hashed words cross a multiple of 2**33: fmix64's first shift changes mid-range
    5 << 33,  # they start on one
    (5 << 33) + 77,  # one 2**33 block: the shortcut
    (1 << 64) - 10,  # they wrap past 2**64
])
@pytest.mark.parametrize("seed", [0, 42])
def test_position_hash_range_equals_position_hash_of_the_range(word_start, seed):
    start = (word_start - seed_word(seed)) % (1 << 64)  # the first key whose hashed word is word_start
    count = 1000
    out = np.empty(2048, dtype=np.uint64)
    scratch = np.empty(2048, dtype=np.uint64)
    ramp = np.arange(2048, dtype=np.uint64)
    got = position_hash_range(start, count, seed, out, scratch, ramp)
    keys = np.arange(count, dtype=np.uint64) + np.uint64(start)  # wraps like the words do
    assert got.tolist() == position_hash(keys, seed).tolist()
    assert got[:3].tolist() == [fmix64_int(start + i + seed_word(seed)) for i in range(3)]


def test_seed_words_differ_and_seed_is_checked():
    words = {seed_word(s) for s in range(1000)}
    assert len(words) == 1000
    with pytest.raises(ValueError):
        seed_word(-1)


def test_consecutive_keys_hash_to_balanced_bits():
    # Positions are consecutive integers; every output bit should be ~fair.
    hashes = position_hash(np.arange(1 << 16, dtype=np.uint64), 3)
    bits = (hashes[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    ones = bits.sum(axis=0)
    # 2**16 fair coins: sd = 128, allow 6 sd.
    assert np.all(np.abs(ones.astype(np.int64) - (1 << 15)) < 6 * 128)
