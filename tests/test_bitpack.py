"""Bit packing: round trips, the documented little-endian layout, and corrupt input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightless_cli.codecs import bitpack
from weightless_cli.codecs.bitpack import pack_bits, packed_size, unpack_bits
from weightless_cli.errors import BadInputError


@st.composite
def bits_and_values(draw):
    bits = draw(st.integers(1, 16))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300))
    return bits, values


@settings(max_examples=200, deadline=None)
@given(case=bits_and_values())
def test_round_trip(case):
    bits, values = case
    data = pack_bits(np.array(values, dtype=np.int64), bits)
    assert len(data) == packed_size(len(values), bits) == (len(values) * bits + 7) // 8
    assert unpack_bits(data, bits, len(values)).tolist() == values


@settings(max_examples=100, deadline=None)
@given(case=bits_and_values())
def test_layout_is_the_little_endian_bit_stream(case):
    bits, values = case
    stream = "".join(format(v, f"0{bits}b")[::-1] for v in values)  # LSB first per value
    stream += "0" * (-len(stream) % 8)
    expected = bytes(int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8))
    assert pack_bits(np.array(values, dtype=np.uint16), bits) == expected


def test_known_layouts():
    assert pack_bits(np.array([1, 2]), 3) == bytes([0b010001])
    assert pack_bits(np.array([0x1FF]), 9) == bytes([0xFF, 0x01])
    assert pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1) == bytes([0x0D, 0x01])
    assert pack_bits(np.array([0xABCD, 0x0102]), 16) == bytes([0xCD, 0xAB, 0x02, 0x01])


@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_across_chunk_boundaries(monkeypatch, bits):
    monkeypatch.setattr(bitpack, "CHUNK_VALUES", 16)
    values = np.random.default_rng(bits).integers(0, 1 << bits, size=203)
    data = pack_bits(values, bits)
    assert unpack_bits(data, bits, values.size).tolist() == values.tolist()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pack_bits(np.array([8]), 3)
    with pytest.raises(ValueError):
        pack_bits(np.array([-1]), 3)
    with pytest.raises(ValueError):
        pack_bits(np.array([1.5]), 3)
    for bits in (0, 17, 2.0):
        with pytest.raises(ValueError):
            pack_bits(np.array([1]), bits)


def test_unpack_rejects_corrupt_data():
    data = pack_bits(np.array([5, 6, 7]), 3)  # 9 bits -> 2 bytes, 7 padding bits
    with pytest.raises(BadInputError):
        unpack_bits(data[:1], 3, 3)
    with pytest.raises(BadInputError):
        unpack_bits(data + b"\x00", 3, 3)
    with pytest.raises(BadInputError):
        unpack_bits(data[:1] + bytes([data[1] | 0x80]), 3, 3)  # a padding bit set
    assert unpack_bits(b"", 5, 0).size == 0
