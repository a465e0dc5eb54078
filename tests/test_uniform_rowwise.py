"""Row-wise quantization of embedding tables (float16 scale and bias per row) and the rowwise codec."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests import onnx_factory
from tests.codec_fuzz import check_decode_survives
from weightless_cli.codecs import dpred, rowwise
from weightless_cli.codecs.container import Blob, TensorRecord, read_blob, write_blob
from weightless_cli.errors import BadInputError, UsageError
from weightless_cli.model import OnnxModel, PerTensor, Selection
from weightless_cli.stages.uniform import decode_record, encode_record, quantize_rowwise
from weightless_cli.stages.value_aware import quantize_file, quantize_values

SPEC_MD = Path(__file__).resolve().parent.parent / "docs" / "codecs" / "rowwise.md"
DTYPES = [np.float32, np.float16, np.float64]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(dpred.bit_patterns(a), dpred.bit_patterns(b))


def embedding_model(vocabulary: int = 500, dim: int = 16, seed: int = 0, dtype=np.float32) -> onnx.ModelProto:
    """ids [N] int64 → Gather(table [V, D]) → vectors [N, D]: an embedding lookup."""
    table = numpy_helper.from_array(
        (np.random.default_rng(seed).normal(0, 0.05, (vocabulary, dim)) +
         np.random.default_rng(seed + 1).normal(0, 0.02, (vocabulary, 1))).astype(dtype), "embedding.weight")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embedding.weight", "ids"], ["vectors"], axis=0)], "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("vectors", elem, ["N", dim])], [table])
    model = helper.make_model(graph, opset_imports=onnx_factory.OPSET, producer_name="weightless-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def lookup(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids})[0]


def tables(seed: int, dtype, rows: int = 300, dim: int = 24) -> np.ndarray:
    """Rows of every kind a table has: zero-mean, offset, tiny-range, constant, all zero."""
    rng = np.random.default_rng(seed)
    spread = 10.0 ** rng.uniform(-6, 0, (rows, 1))
    offset = rng.normal(0, 1, (rows, 1)) * 10.0 ** rng.uniform(-6, 2, (rows, 1))
    values = rng.normal(size=(rows, dim)) * spread + offset
    values[::17] = offset[::17]  # constant rows
    values[::29] = 0.0
    return values.astype(dtype)


def check_bound(original: np.ndarray, quantized: np.ndarray, bits: int) -> None:
    """Every value within s/2 of where it was (s: its row's scale), plus half an ulp of the dtype."""
    rows = original.reshape(original.shape[0], -1).astype(np.float64)
    scales, _ = rowwise.row_grid(rows, bits, dpred.dtype_of(original))
    got = quantized.reshape(rows.shape).astype(np.float64)
    half_ulp = np.spacing(np.abs(quantized.reshape(rows.shape))).astype(np.float64) / 2
    assert (np.abs(got - rows) <= scales[:, None] / 2 + half_ulp).all()


# --- the quantizer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_rowwise_error_bound_and_levels(dtype, bits):
    w = tables(bits, dtype)
    q = quantize_rowwise(w, bits)
    assert q.dtype == w.dtype and q.shape == w.shape
    check_bound(w, q, bits)
    ints, scales, biases = rowwise.quantize_rows(w.astype(np.float64), bits, dpred.dtype_of(w))
    assert ints.min() >= 0 and ints.max() <= 2**bits - 1
    assert same_bits(rowwise.dequantize(ints, scales, biases, dpred.dtype_of(w)), q)
    # Scale and bias are float16 values; the bias never sits above the row minimum.
    np.testing.assert_array_equal(scales.astype(np.float16).astype(np.float64), scales)
    np.testing.assert_array_equal(biases.astype(np.float16).astype(np.float64), biases)
    assert (biases <= w.astype(np.float64).min(axis=1)).all()
    assert max(np.unique(row).size for row in q) <= 2**bits


@given(st.integers(1, 60), st.integers(1, 40), st.integers(1, 8), st.sampled_from(DTYPES), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_rowwise_bound_and_exact_codec_property(rows, dim, bits, dtype, seed):
    w = tables(seed, dtype, rows, dim)
    q = quantize_rowwise(w, bits)
    check_bound(w, q, bits)
    params, sections = rowwise.encode(q, bits)
    assert params["exceptions"] == 0  # the encoder finds every row's grid again
    assert same_bits(rowwise.decode(params, sections, q.shape, dpred.dtype_of(q)), q)


def test_rowwise_needs_float16_range_and_valid_bits():
    with pytest.raises(UsageError, match="float16 range"):
        quantize_rowwise(np.array([[1e5, 0.0]], dtype=np.float32), 8)
    with pytest.raises(UsageError, match="1..8 bits"):
        quantize_rowwise(np.zeros((2, 2), np.float32), 9)
    with pytest.raises(UsageError, match="float16 range"):
        quantize_rowwise(np.array([[np.nan, 0.0]], dtype=np.float32), 4)


# --- the codec -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_encoder_finds_the_width_and_stores_bits_per_value(bits):
    q = quantize_rowwise(tables(0, np.float32, 400, 32), bits)
    params, sections = rowwise.encode(q)
    assert params == {"bits": bits, "exceptions": 0, "rice_k": 0}
    assert len(sections["ints"]) == 400 * 32 * bits // 8
    assert len(sections["scales"]) == len(sections["biases"]) == 2 * 400


def test_values_off_the_grid_become_exceptions():
    q = quantize_rowwise(tables(1, np.float32), 4)
    changed = q.copy()
    changed[[3, 50, 299], [0, 7, 23]] = [1.25e-3, -7.0, 3.0]  # a new extreme moves its row's grid: all of it
    params, sections = rowwise.encode(changed, 4)
    row_changed = [not same_bits(quantize_rowwise(changed[r], 4), changed[r]) for r in (3, 50, 299)]
    assert 0 < params["exceptions"] <= 24 * sum(row_changed)
    assert same_bits(rowwise.decode(params, sections, q.shape, "float32"), changed)


def test_tables_that_are_not_rowwise_quantized_are_refused():
    with pytest.raises(UsageError, match="not row-wise quantized"):
        rowwise.encode(tables(2, np.float32))


@pytest.mark.parametrize("values", [
    np.zeros((0,), np.float32), np.zeros((4, 0), np.float32), np.float32(0.3).reshape(()),
    np.linspace(-1, 1, 7).astype(np.float32), np.full((3, 5), -2.5, np.float64), np.zeros((6, 2), np.float16)])
def test_edge_shapes(values):
    q = quantize_rowwise(values, 3)
    params, sections = rowwise.encode(q, 3)
    assert same_bits(rowwise.decode(params, sections, q.shape, dpred.dtype_of(q)), q)


def test_bfloat16_tables_are_stored_exactly():
    q = quantize_rowwise(tables(3, ml_dtypes.bfloat16, 100, 16), 4)
    params, sections = rowwise.encode(q, 4)
    assert same_bits(rowwise.decode(params, sections, q.shape, "bfloat16"), q)


def test_spec_example_matches_the_code():
    text = SPEC_MD.read_text(encoding="utf-8")
    match = re.search(r"<!-- rowwise-example:begin -->\n```text\n(.*?)```\n<!-- rowwise-example:end -->", text, re.S)
    assert match, "docs/codecs/rowwise.md lost its worked example markers"
    w = np.array([[0.1, -0.3, 0.25, 0.9], [-2.0, -1.9, -1.75, -1.8]], dtype=np.float32)
    q = quantize_rowwise(w, 2)
    params, sections = rowwise.encode(q)
    lines = [f"rowwise: params {', '.join(f'{k}={v}' for k, v in sorted(params.items()))}"]
    lines += [f"  {name:<10} {data.hex(' ') or '(empty)'}" for name, data in sorted(sections.items())]
    assert match.group(1) == "\n".join(lines) + "\n"
    np.testing.assert_allclose(q, [[0.10009766, -0.30004883, 0.10009766, 0.9003906],
                                   [-2.0, -1.916626, -1.7498779, -1.833252]], rtol=1e-6)


# --- corruption ----------------------------------------------------------------------------------------------


def example() -> tuple[np.ndarray, dict, dict]:
    q = quantize_rowwise(tables(4, np.float32, 40, 12), 4)
    changed = q.copy()
    # One value off its row's grid (inside the row's range, so the grid stays): every section has bytes.
    changed[5, 5] = np.float32((q[5].min() + q[5].max()) / 2 + 1e-4 * (q[5].max() - q[5].min()))
    params, sections = rowwise.encode(changed, 4)
    assert params["exceptions"] == 1
    return changed, params, sections


@pytest.mark.parametrize("change, message", [
    (lambda p, s: p.update(bits=9), "bits"),
    (lambda p, s: p.update(exceptions=10**6), "exceptions in a tensor"),
    (lambda p, s: p.pop("rice_k"), "params"),
    (lambda p, s: s.update(scales=s["scales"][:-2]), "scales section"),
    (lambda p, s: s.update(scales=b"\x00\x80" + s["scales"][2:]), "negative"),
    (lambda p, s: s.update(biases=b"\x00\x7c" + s["biases"][2:]), "not finite"),
    (lambda p, s: s.update(ints=s["ints"] + b"\x00"), "ints section"),
    (lambda p, s: s.update(exc_values=s["exc_values"][:-1]), "exc_values"),
    (lambda p, s: s.update(exc_high=b""), "unary"),
    (lambda p, s: p.update(rice_k=17), "rice_k"),
])
def test_corrupt_records_are_rejected(change, message):
    q, params, sections = example()
    params, sections = dict(params), dict(sections)
    change(params, sections)
    with pytest.raises(BadInputError, match=message):
        rowwise.decode(params, sections, q.shape, "float32")


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_fuzzed_sections_only_ever_raise_bad_input(data):
    q, params, sections = example()
    check_decode_survives(data, rowwise.decode, params, sections, q.shape)


def test_blob_round_trip_and_any_flipped_byte_is_caught():
    q, params, sections = example()
    blob = write_blob(Blob(b"graph", [TensorRecord("table", q.shape, "float32", "rowwise", params, sections)]))
    assert same_bits(decode_record(read_blob(blob).tensors[0]), q)
    for offset in range(0, len(blob), 5):
        broken = bytearray(blob)
        broken[offset] ^= 0x04
        with pytest.raises(BadInputError):
            read_blob(bytes(broken))


# --- the embedding model end to end --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_embedding_model_rowwise_end_to_end(tmp_path, bits):
    source = onnx_factory.save(embedding_model(seed=bits), tmp_path / "emb.onnx")
    target = tmp_path / "emb.q.onnx"
    report = quantize_file(source, target, Selection(), PerTensor(bits), "rowwise")
    assert [row["name"] for row in report["tensors"]] == ["embedding.weight"]  # the Gather table is selected
    original, quantized = OnnxModel.load(source), OnnxModel.load(target)
    table = quantized.weight("embedding.weight")
    check_bound(original.weight("embedding.weight").array(), table.array(), bits)
    record, row = encode_record(table, "rowwise")
    assert row["codec_params"]["exceptions"] == 0 and row["encoded_bytes"] < 500 * 16 * (bits + 1) / 8 + 2000
    decoded = decode_record(read_blob(write_blob(Blob(b"graph", [record]))).tensors[0])
    assert same_bits(decoded, table.array())
    # The quantized model looks up exactly the stored rows, each within its bound of the original.
    ids = np.array([0, 7, 499, 7, 250], dtype=np.int64)
    np.testing.assert_array_equal(lookup(quantized.proto, ids), decoded[ids])
    assert np.abs(lookup(quantized.proto, ids) - lookup(original.proto, ids)).max() < 0.5


def test_per_channel_uniform_stage_and_dpred(tmp_path):
    source = onnx_factory.save(onnx_factory.mlp((64, 48, 10), seed=5), tmp_path / "mlp.onnx")
    target = tmp_path / "q.onnx"
    report = quantize_file(source, target, Selection(min_params=1), PerTensor(8), "uniform", per_channel=True)
    assert {row["method"] for row in report["tensors"]} == {"uniform"} and report["per_channel"]
    tensor = OnnxModel.load(target).weight("fc1.weight")
    record, row = encode_record(tensor, "dpred")
    assert row["codec_params"] == {"bits": 8, "per_channel": 1}
    assert same_bits(decode_record(record), tensor.array())


def test_dispatch_refuses_methods_it_cannot_combine():
    w = tables(0, np.float32, 10, 10)
    with pytest.raises(UsageError, match="uniform only"):
        quantize_values(w, "rowwise", 4, per_channel=True)
    with pytest.raises(UsageError, match="kmeans or uniform"):
        quantize_values(w, "rowwise", 4, outliers=0.01)
    with pytest.raises(UsageError, match="not fixed-point"):
        encode_record(OnnxModel.from_proto(embedding_model(), "emb.onnx").weight("embedding.weight"), "dpred")
    with pytest.raises(UsageError, match="unknown codec"):
        encode_record(OnnxModel.from_proto(embedding_model(), "emb.onnx").weight("embedding.weight"), "zip")
