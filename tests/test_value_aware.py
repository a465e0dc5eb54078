"""Value-aware quantization (exact float16 outliers + b-bit rest) and the outlier codec that stores it exactly."""

from __future__ import annotations

import math
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import onnx_factory
from tests.codec_fuzz import check_decode_survives
from weightless_cli.codecs import dpred, outlier
from weightless_cli.codecs.container import Blob, TensorRecord, read_blob, write_blob
from weightless_cli.data.datasets import load_dataset
from weightless_cli.errors import BadInputError, UsageError
from weightless_cli.model import OnnxModel, PerTensor, Selection
from weightless_cli.stages.evaluate import evaluate, model_input_shape
from weightless_cli.stages.quantize import quantize_array
from weightless_cli.stages.uniform import decode_record, encode_record
from weightless_cli.stages.value_aware import (
    largest_positions,
    outlier_count,
    quantize_file,
    quantize_values,
    quantize_with_outliers,
)

REPO = Path(__file__).resolve().parent.parent
SPEC_MD = REPO / "docs" / "codecs" / "outlier.md"
LENET = REPO / "sample_models" / "lenet-300-100.onnx"
DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(dpred.bit_patterns(a), dpred.bit_patterns(b))


def round_trip(values: np.ndarray, k: int | None = None) -> np.ndarray:
    params, sections = outlier.encode(values, k)
    return outlier.decode(params, sections, values.shape, dpred.dtype_of(values))


def heavy_tailed(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(2, size=shape) * 0.05).astype(np.float32)


# --- the quantizer -------------------------------------------------------------------------------------------


def test_outlier_count_and_ties_go_to_earlier_positions():
    assert [outlier_count(1000, f) for f in (0, 0.0005, 0.0015, 0.01)] == [0, 1, 2, 10]
    values = np.array([0.5, -2.0, 2.0, 0.1, -2.0])
    np.testing.assert_array_equal(largest_positions(values, 2), [1, 2])
    np.testing.assert_array_equal(largest_positions(values, 0), [])


@pytest.mark.parametrize("method", ["kmeans", "uniform"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_outliers_are_the_largest_weights_in_float16(method, bits):
    w = heavy_tailed((64, 50), bits)
    q = quantize_with_outliers(w, 0.02, bits, method)
    assert q.dtype == np.float32 and q.shape == w.shape
    kept = largest_positions(w, 64)
    np.testing.assert_array_equal(q.reshape(-1)[kept], w.reshape(-1)[kept].astype(np.float16).astype(np.float32))
    assert outlier.float16_exact(q.reshape(-1)[kept]).all()
    dense = np.delete(q.reshape(-1), kept)
    if method == "kmeans":
        assert np.unique(dense[dense != 0]).size <= 2**bits
    else:  # a symmetric grid scaled to the largest *remaining* weight
        grid = dpred.fit_grid(dense)
        limit = np.abs(np.delete(w.reshape(-1), kept)).max()
        assert np.abs(grid.ints).max() <= 2 ** (bits - 1) - 1
        assert grid.scales[0] == pytest.approx(limit / (2 ** (bits - 1) - 1), rel=1e-6)


def test_no_outliers_is_plain_kmeans():
    w = heavy_tailed((30, 30), 1)
    np.testing.assert_array_equal(quantize_with_outliers(w, 0.0, 3), quantize_array(w, 8).astype(np.float32))


@pytest.mark.parametrize("method", ["kmeans", "uniform"])
def test_outliers_cut_the_error_of_heavy_tailed_weights(method):
    w = heavy_tailed((100, 100), 7)
    plain = quantize_values(w, method, 3)
    aware = quantize_with_outliers(w, 0.01, 3, method)
    assert np.mean((aware - w) ** 2) < 0.6 * np.mean((plain - w) ** 2)


def test_sixteen_bit_dtypes_keep_their_outliers_unchanged():
    for dtype in (np.float16, ml_dtypes.bfloat16):
        w = heavy_tailed((20, 20), 2).astype(dtype)
        q = quantize_with_outliers(w, 0.05, 2)
        kept = largest_positions(w, 20)
        assert q.dtype == w.dtype and same_bits(q.reshape(-1)[kept], w.reshape(-1)[kept])


def test_float16_overflow_keeps_the_value():
    w = np.array([1e6, 0.1, -0.2, 0.3], dtype=np.float32)
    assert quantize_with_outliers(w, 0.25, 1)[0] == np.float32(1e6)


def test_bad_arguments():
    w = heavy_tailed((4, 4), 0)
    for call, message in [
        (lambda: quantize_with_outliers(w, 1.0, 3), "outside"),
        (lambda: quantize_with_outliers(w, 0.1, 3, "rowwise"), "kmeans or uniform"),
        (lambda: quantize_with_outliers(w, 0.1, 17), "1..16"),
        (lambda: quantize_values(w, "log", 3), "unknown method"),
        (lambda: quantize_values(w, "kmeans", 3, per_channel=True), "uniform only"),
        (lambda: quantize_values(w, "uniform", 3, per_channel=True, outliers=0.1), "per-tensor"),
        (lambda: quantize_with_outliers(np.arange(4), 0.1, 3), "float tensor"),
    ]:
        with pytest.raises(UsageError, match=message):
            call()


# --- the codec -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["kmeans", "uniform"])
def test_codec_stores_value_aware_tensors_exactly(dtype, method):
    w = heavy_tailed((40, 30), 3).astype(dtype)
    q = quantize_with_outliers(w, 0.02, 3, method)
    params, sections = outlier.encode(q)
    assert same_bits(outlier.decode(params, sections, q.shape, dpred.dtype_of(q)), q)
    assert params["outliers"] >= outlier_count(q.size, 0.02) and params["k"] <= 9
    assert params["wide"] == 0  # every outlier is float16-exact


@given(st.integers(0, 400), st.integers(1, 300), st.integers(0, 20), st.sampled_from(DTYPES),
       st.integers(0, 2**32 - 1), st.one_of(st.none(), st.integers(0, 20)))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_codec_round_trips_any_tensor(size, levels, stragglers, dtype, seed, k):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=levels)[rng.integers(0, levels, size)]
    spots = rng.integers(0, max(size, 1), stragglers)[: size]
    values[spots] = rng.standard_t(1, spots.size) * 100  # some not float16-exact, some beyond its range
    values = values.astype(dtype)
    if size:
        values[0] = -0.0 if seed % 2 else np.nan
    if k is not None and k > 0 and size == 0:
        k = 0
    assert same_bits(round_trip(values, k), values)


def test_wide_outliers_when_float16_cannot_hold_them():
    values = np.full(200, 0.5, dtype=np.float32)
    values[[3, 77, 150]] = [0.1, 70000.0, -1e-9]
    params, sections = outlier.encode(values)
    assert params == {"k": 1, "outliers": 3, "rice_k": params["rice_k"], "wide": 1}
    assert len(sections["outliers"]) == 12 and sections["ids"] == b""
    assert same_bits(outlier.decode(params, sections, values.shape, "float32"), values)


@given(st.integers(1, 5000), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None)
def test_rice_positions_round_trip_near_the_entropy(size, density, seed):
    rng = np.random.default_rng(seed)
    positions = np.flatnonzero(rng.random(size) < density)
    rice_k, high, low = outlier.encode_positions(positions)
    np.testing.assert_array_equal(outlier.decode_positions(positions.size, rice_k, high, low, size, "t"), positions)
    n = positions.size
    if 20 <= n <= size / 4:  # sparse: within ~1.5 bits per position of log2 C(N, n) / n
        ideal = (math.lgamma(size + 1) - math.lgamma(n + 1) - math.lgamma(size - n + 1)) / math.log(2)
        assert 8 * (len(high) + len(low)) <= ideal + 1.5 * n + 16


def test_spec_example_matches_the_code():
    text = SPEC_MD.read_text(encoding="utf-8")
    match = re.search(r"<!-- outlier-example:begin -->\n```text\n(.*?)```\n<!-- outlier-example:end -->", text, re.S)
    assert match, "docs/codecs/outlier.md lost its worked example markers"
    values = np.array([0.5, 0, -0.25, 0.5, 0, 0.5, 3.140625, -0.25, 0.5, 0, 0.5, -0.25, 0, -0.25, 0.5, 0.5, -6.5, 0,
                       0.5, 0.5, 0, -0.25, 0.5, 0.5], dtype=np.float32).reshape(4, 6)
    params, sections = outlier.encode(values)
    lines = [f"outlier: params {', '.join(f'{k}={v}' for k, v in sorted(params.items()))}"]
    lines += [f"  {name:<10} {data.hex(' ') or '(empty)'}" for name, data in sorted(sections.items())]
    assert match.group(1) == "\n".join(lines) + "\n"
    assert same_bits(outlier.decode(params, sections, (4, 6), "float32"), values)


# --- corruption ----------------------------------------------------------------------------------------------


def example() -> tuple[np.ndarray, dict, dict]:
    q = quantize_with_outliers(heavy_tailed((30, 40), 5), 0.03, 3)
    params, sections = outlier.encode(q)
    return q, params, sections


@pytest.mark.parametrize("change, message", [
    (lambda p, s: p.update(k=70000), "k ="),
    (lambda p, s: p.update(k=0), "no codebook"),
    (lambda p, s: p.update(outliers=10**6), "outliers in a tensor"),
    (lambda p, s: p.update(rice_k=17), "rice_k"),
    (lambda p, s: p.update(wide=3), "wide"),
    (lambda p, s: p.pop("wide"), "params"),
    (lambda p, s: s.update(codebook=s["codebook"][:-4]), "codebook section"),
    (lambda p, s: s.update(codebook=s["codebook"][4:8] + s["codebook"][:4] + s["codebook"][8:]), "increasing"),
    (lambda p, s: s.update(outliers=s["outliers"][:-2]), "outliers section"),
    (lambda p, s: s.update(gaps_high=s["gaps_high"] + b"\x00"), "unary"),
    (lambda p, s: s.update(gaps_high=s["gaps_high"][:-1]), "unary"),
    (lambda p, s: s.update(gaps_low=s["gaps_low"][:-1]), "packed"),
    (lambda p, s: s.update(gaps_high=b"\x00" * 200 + s["gaps_high"]), "beyond the tensor"),
    (lambda p, s: s.update(ids=s["ids"][:-1]), "packed"),
    (lambda p, s: p.update(k=p["k"] - 1) or s.update(codebook=s["codebook"][:-4]), "codebook index"),
])
def test_corrupt_records_are_rejected(change, message):
    q, params, sections = example()
    params, sections = dict(params), dict(sections)
    change(params, sections)
    with pytest.raises(BadInputError, match=message):
        outlier.decode(params, sections, q.shape, "float32")


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_fuzzed_sections_only_ever_raise_bad_input(data):
    q, params, sections = example()
    check_decode_survives(data, outlier.decode, params, sections, q.shape)


def test_blob_round_trip_and_any_flipped_byte_is_caught():
    q, params, sections = example()
    blob = write_blob(Blob(b"graph", [TensorRecord("w", q.shape, "float32", "outlier", params, sections)]))
    record = read_blob(blob).tensors[0]
    assert same_bits(decode_record(record), q)
    for offset in range(0, len(blob), 5):
        broken = bytearray(blob)
        broken[offset] ^= 0x01
        with pytest.raises(BadInputError):
            read_blob(bytes(broken))


# --- the stage, and accuracy on real MNIST -------------------------------------------------------------------


@pytest.mark.parametrize("method, codec", [("kmeans", "outlier"), ("uniform", "outlier"), ("uniform", "dpred")])
def test_quantize_file_then_encode_and_decode(tmp_path, method, codec):
    source = onnx_factory.save(onnx_factory.mlp((64, 48, 10), seed=3), tmp_path / "mlp.onnx")
    target = tmp_path / "q.onnx"
    outliers = 0.02 if codec == "outlier" else 0.0
    report = quantize_file(source, target, Selection(min_params=1), PerTensor(3), method, outliers=outliers)
    assert [row["name"] for row in report["tensors"]] == ["fc1.weight", "fc2.weight"]
    assert report["tensors"][0]["outliers"] == outlier_count(64 * 48, outliers)
    model = OnnxModel.load(target)
    records = [encode_record(model.weight(name), codec) for name in ("fc1.weight", "fc2.weight")]
    blob = read_blob(write_blob(Blob(b"graph", [record for record, _ in records])))
    for record in blob.tensors:
        assert same_bits(decode_record(record), model.weight(record.name).array())
    assert all(row["encoded_bytes"] < row["original_bytes"] / 4 for _, row in records)


def test_lenet_keeps_its_accuracy_with_outliers_at_three_bits(mnist_cache):
    """Without retraining, 1 % float16 outliers rescue a 3-bit uniform LeNet-300-100 (measured 95.4 → 98.4 %)."""
    data = load_dataset("mnist", model_input_shape(LENET))
    accuracy = {}
    for fraction in (0.0, 0.01):
        model = OnnxModel.load(LENET)
        for tensor in Selection(min_params=1).apply(model):
            tensor.set_array(quantize_values(tensor.array(), "uniform", 3, outliers=fraction))
        accuracy[fraction] = evaluate(model.proto.SerializeToString(), data).accuracy
    baseline = evaluate(LENET, data).accuracy
    assert accuracy[0.01] > accuracy[0.0] + 0.02
    assert accuracy[0.01] > baseline - 0.005


def test_float64_codebook_with_negative_values_round_trips():
    """Regression: float64 bit patterns of negative values have the top bit set (must compare unsigned)."""
    values = np.array([-1.5, -1.5, 2.0, 2.0, -0.25], dtype=np.float64)
    params, sections = outlier.encode(values)
    assert same_bits(outlier.decode(params, sections, values.shape, "float64"), values)
