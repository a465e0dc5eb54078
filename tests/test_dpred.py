"""dpred: uniform fixed-point tensors stored at per-group precision, decoded bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.codec_fuzz import check_decode_survives
from weightless_cli.codecs import dpred
from weightless_cli.codecs.container import Blob, TensorRecord, read_blob, write_blob
from weightless_cli.errors import BadInputError, UsageError
from weightless_cli.stages.uniform import quantize_uniform

SPEC_MD = Path(__file__).resolve().parent.parent / "docs" / "codecs" / "dpred.md"
DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(dpred.bit_patterns(a), dpred.bit_patterns(b))


def round_trip(values: np.ndarray) -> tuple[np.ndarray, dict, dict]:
    params, sections = dpred.encode(values)
    return dpred.decode(params, sections, values.shape, dpred.dtype_of(values)), params, sections


def weights(shape: tuple[int, ...], seed: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, size=shape).astype(dtype)


# --- the quantizer -------------------------------------------------------------------------------------------


def most_bits(dtype) -> int:
    return min(16, dpred.significand_bits(dpred.dtype_of(np.zeros(1, dtype))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 8, 11, 16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_uniform_levels_and_error_bound(dtype, bits, per_channel):
    if bits > most_bits(dtype):
        with pytest.raises(UsageError, match="significant bits"):
            quantize_uniform(weights((3, 3), 0, dtype), bits)
        return
    # Magnitudes from 1e-7 up: float16 channels this small get the smallest normal scale.
    w = (weights((12, 5, 3), bits) * np.logspace(-6, 1, 12)[:, None, None]).astype(dtype)
    q = quantize_uniform(w, bits, per_channel)
    assert q.dtype == w.dtype and q.shape == w.shape
    rows = 12 if per_channel else 1
    ints, scales = dpred.quantize_rows(w.astype(np.float64).reshape(rows, -1), bits, dpred.dtype_of(w))
    assert same_bits(dpred.dequantize(ints, scales, dpred.dtype_of(w)).reshape(w.shape), q)
    # Each row's scale is its largest magnitude / qmax (in the dtype), so the largest value sits on +-qmax,
    # except where the scale was raised to the smallest normal number.
    qmax = 2 ** (bits - 1) - 1
    magnitudes = np.abs(w.astype(np.float64)).reshape(rows, -1).max(axis=1)
    np.testing.assert_array_equal(scales, dpred.uniform_scales(magnitudes, bits, dpred.dtype_of(w)))
    raised = scales == float(ml_dtypes.finfo(w.dtype).smallest_normal)
    np.testing.assert_array_equal(np.abs(ints).max(axis=1)[~raised], qmax)
    assert np.abs(ints).max() <= qmax
    error = np.abs(q.astype(np.float64) - w.astype(np.float64)).reshape(rows, -1)
    half_ulp = np.abs(q.astype(np.float64)).reshape(rows, -1) * float(ml_dtypes.finfo(q.dtype).eps)
    assert (error <= scales[:, None] / 2 + half_ulp).all()


def test_uniform_zero_channel_and_no_negative_zero():
    w = np.array([[0.0, -0.0, 0.0], [-1e-9, 0.5, -0.5]], dtype=np.float32)
    q = quantize_uniform(w, 4, per_channel=True)
    assert not (dpred.bit_patterns(q) == 0x80000000).any()  # -0.0 never comes out
    np.testing.assert_array_equal(q[0], [0, 0, 0])
    np.testing.assert_array_equal(q[1], [0, 0.5, -0.5])


def test_uniform_refuses_bad_bits_and_non_finite():
    with pytest.raises(UsageError, match="2..16 bits"):
        quantize_uniform(weights((4, 4), 0), 1)
    with pytest.raises(UsageError, match="non-finite"):
        quantize_uniform(np.array([1.0, np.inf], dtype=np.float32), 8)


def test_per_channel_scales_follow_each_channel():
    w = weights((4, 50), 1) * np.array([[1], [10], [100], [0.01]], dtype=np.float32)
    per_tensor = quantize_uniform(w, 4)
    per_channel = quantize_uniform(w, 4, per_channel=True)
    # Per tensor, the small channels collapse to zero; per channel each keeps its own 15 levels.
    assert not per_tensor[3].any() and np.unique(per_channel[3]).size > 5
    assert np.mean((per_channel - w) ** 2) < np.mean((per_tensor - w) ** 2)


# --- round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8, 11, 16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_round_trip_is_bit_exact(dtype, bits, per_channel):
    bits = min(bits, most_bits(dtype))
    q = quantize_uniform(weights((37, 5, 3), bits * 7 + per_channel, dtype), bits, per_channel)
    decoded, params, _ = round_trip(q)
    assert same_bits(decoded, q)
    assert params["bits"] == (8 if bits <= 8 else 16)


@given(st.integers(0, 300), st.integers(1, 6), st.integers(2, 16), st.booleans(), st.integers(0, 2**32 - 1),
       st.sampled_from(DTYPES), st.floats(0.0, 0.95))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_property(rows, cols, bits, per_channel, seed, dtype, zeros):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, size=(rows, cols)) * 10.0 ** rng.uniform(-6, 2)
    w[rng.random(w.shape) < zeros] = 0.0
    q = quantize_uniform(w.astype(dtype), min(bits, most_bits(dtype)), per_channel)
    decoded, _, _ = round_trip(q)
    assert same_bits(decoded, q)


def test_encoder_finds_the_quantizers_integers():
    w = weights((64, 9), 3)
    q = quantize_uniform(w, 6, per_channel=True)
    grid = dpred.fit_grid(q, per_channel=True)
    rows = w.astype(np.float64).reshape(64, -1)
    ints, scales = dpred.quantize_rows(rows, 6, "float32")
    np.testing.assert_array_equal(grid.ints, ints)
    np.testing.assert_array_equal(grid.scales, scales)


def test_per_channel_is_found_without_being_told():
    q = quantize_uniform(weights((20, 30), 4) * np.arange(1, 21, dtype=np.float32)[:, None], 5, per_channel=True)
    params, _ = dpred.encode(q)
    assert params == {"bits": 8, "per_channel": 1}
    assert dpred.encode(quantize_uniform(weights((20, 30), 4), 5))[0] == {"bits": 8, "per_channel": 0}


def test_edge_shapes():
    for values in (np.zeros((0,), np.float32), np.zeros((3, 0), np.float32), np.float32(0.5).reshape(()),
                   np.zeros((5, 4), np.float64), np.array([-3.0], np.float16)):
        decoded, params, sections = round_trip(values)
        assert same_bits(decoded, values)
    _, _, sections = round_trip(np.zeros((5, 4), np.float32))
    assert sections["values"] == b""  # all-zero groups cost only their headers


def test_group_widths_follow_the_largest_magnitude():
    q = np.zeros(48, dtype=np.int64)
    q[0], q[20], q[47] = 1, -127, 3  # groups need 1, 7 and 2 magnitude bits
    headers, stream = dpred.pack_groups(q)
    np.testing.assert_array_equal(headers, [1, 7, 2])
    assert len(stream) == (16 * 2 + 16 * 8 + 16 * 3) // 8
    np.testing.assert_array_equal(dpred.unpack_groups(headers, stream, 48, 8), q)


def test_values_not_on_a_grid_are_refused():
    with pytest.raises(UsageError, match="not fixed-point"):
        dpred.encode(weights((40, 40), 5))
    with pytest.raises(UsageError, match="not fixed-point"):
        dpred.encode(np.array([0.5, -0.0], dtype=np.float32))  # -0 cannot be stored


def test_spec_example_matches_the_code():
    text = SPEC_MD.read_text(encoding="utf-8")
    match = re.search(r"<!-- dpred-example:begin -->\n```text\n(.*?)```\n<!-- dpred-example:end -->", text, re.S)
    assert match, "docs/codecs/dpred.md lost its worked example markers"
    values = (np.array([5, -3, 0, 1] + [0] * 11 + [-7, 0, 0, 0, 0]) * 0.25).astype(np.float32).reshape(2, 10)
    params, sections = dpred.encode(values)
    lines = [f"dpred: params {', '.join(f'{k}={v}' for k, v in sorted(params.items()))}"]
    lines += [f"  {name:<10} {data.hex(' ') or '(empty)'}" for name, data in sorted(sections.items())]
    assert match.group(1) == "\n".join(lines) + "\n"
    assert same_bits(dpred.decode(params, sections, (2, 10), "float32"), values)


def test_round_to_bfloat16_rounds_once():
    # Halfway between two bfloat16 after a float32 rounding, but above it exactly: must round up.
    exact = np.array([1.0 + 2.0**-8 + 2.0**-40, -(1.0 + 2.0**-8 + 2.0**-40), 1.0 + 2.0**-8])
    got = dpred.round_to(exact, "bfloat16").astype(np.float64)
    np.testing.assert_array_equal(got, [1.0 + 2.0**-7, -(1.0 + 2.0**-7), 1.0])


# --- corruption ----------------------------------------------------------------------------------------------


def example() -> tuple[np.ndarray, dict, dict]:
    q = quantize_uniform(weights((6, 40), 11), 8, per_channel=True)
    params, sections = dpred.encode(q)
    return q, params, sections


@pytest.mark.parametrize("change, message", [
    (lambda p, s: p.update(bits=12), "bits"),
    (lambda p, s: p.update(per_channel=2), "per_channel"),
    (lambda p, s: p.pop("bits"), "params"),
    (lambda p, s: s.update(scales=s["scales"][:-4]), "scales"),
    (lambda p, s: s.update(scales=b"\x00\x00\xc0\x7f" + s["scales"][4:]), "scale"),  # NaN
    (lambda p, s: s.update(scales=b"\x00\x00\x00\x80" + s["scales"][4:]), "scale"),  # -0
    (lambda p, s: s.update(headers=s["headers"][:-1]), "headers"),
    (lambda p, s: s.update(values=s["values"] + b"\x00"), "values"),
    (lambda p, s: s.update(values=s["values"][:-1]), "values"),
    (lambda p, s: s.update(headers=b"\x00" + s["headers"][1:]), "the headers describe"),
])
def test_corrupt_records_are_rejected(change, message):
    q, params, sections = example()
    params, sections = dict(params), dict(sections)
    change(params, sections)
    with pytest.raises(BadInputError, match=message):
        dpred.decode(params, sections, q.shape, "float32")


def test_non_canonical_streams_are_rejected():
    headers, stream = dpred.pack_groups(np.array([1, 0, 0, 0]))  # header 1: fields of 2 bits
    with pytest.raises(BadInputError, match="negative zero"):
        dpred.unpack_groups(headers, bytes([stream[0] | 0b0100]), 4, 8)  # second value: sign 1, magnitude 0
    with pytest.raises(BadInputError, match="non-canonical"):
        dpred.unpack_groups(np.array([2]), bytes([0b001, 0]), 4, 8)  # header 2 for a largest magnitude of 0..1
    with pytest.raises(BadInputError, match="padding"):
        dpred.unpack_groups(headers, bytes([stream[0] | 0x80]), 3, 8)


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_fuzzed_sections_only_ever_raise_bad_input(data):
    q, params, sections = example()
    check_decode_survives(data, dpred.decode, params, sections, q.shape)


def test_blob_round_trip_and_any_flipped_byte_is_caught():
    q, params, sections = example()
    blob = write_blob(Blob(b"graph", [TensorRecord("w", q.shape, "float32", "dpred", params, sections)]))
    record = read_blob(blob).tensors[0]
    assert same_bits(dpred.decode(record.params, record.sections, record.shape, record.dtype), q)
    for offset in range(0, len(blob), 7):
        broken = bytearray(blob)
        broken[offset] ^= 0x10
        with pytest.raises(BadInputError):
            read_blob(bytes(broken))
