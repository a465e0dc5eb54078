"""inspect --profile: per-op and per-node time from onnxruntime's profiler beside weight bytes."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.onnx_factory import mlp
from weightless_cli.data.datasets import Dataset
from weightless_cli.errors import BadInputError, UsageError
from weightless_cli.stages.profile import (
    breakdown,
    kernel_times,
    label_nodes,
    node_weight_bytes,
    profile_model,
)


def small_cnn() -> onnx.ModelProto:
    """Conv → Relu → Flatten → Gemm, plus one unnamed node and a weight read twice."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "conv.weight"),
             numpy_helper.from_array(np.zeros(4, np.float32), "conv.bias"),
             numpy_helper.from_array(rng.normal(size=(10, 4 * 8 * 8)).astype(np.float32), "fc.weight"),
             numpy_helper.from_array(np.ones(10, np.float32), "shift")]
    nodes = [helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], "conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),  # unnamed: labelled by its output
             helper.make_node("Flatten", ["r"], ["f"], "flatten"),
             helper.make_node("Gemm", ["f", "fc.weight"], ["g"], "fc", transB=1),
             helper.make_node("Add", ["g", "shift"], ["a"], "add1"),
             helper.make_node("Add", ["a", "shift"], ["logits"], "add2")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture()
def cnn_path(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return path


def _data(count: int = 50) -> Dataset:
    return Dataset("random", np.random.default_rng(1).random((count, 1, 8, 8), dtype=np.float32))


def test_rows_cover_every_node_and_shares_sum_to_one(cnn_path):
    report = profile_model(cnn_path, _data(), runs=2, batch_size=16)
    nodes = {row["node"]: row for row in report["nodes"]}
    assert set(nodes) == {"conv", "r", "flatten", "fc", "add1", "add2"}
    for rows in (report["nodes"], report["by_op"]):
        assert sum(r["share_time"] for r in rows) == pytest.approx(1.0)
        assert sum(r["share_bytes"] for r in rows) == pytest.approx(1.0)
        assert sum(r["total_us"] for r in rows) == report["total_us"] > 0
    # 50 samples in batches of 16 = 4 batches per pass, 2 timed passes; the warm-up is left out.
    assert all(row["calls"] == 8 for row in report["nodes"])
    assert report["samples"] == 50 and report["runs"] == 2


def test_weight_bytes_are_the_tensors_each_node_reads_counted_once(cnn_path):
    report = profile_model(cnn_path, _data(10), runs=1)
    nodes = {row["node"]: row for row in report["nodes"]}
    assert nodes["conv"]["weight_bytes"] == (36 + 4) * 4
    assert nodes["fc"]["weight_bytes"] == 10 * 256 * 4
    assert nodes["add1"]["weight_bytes"] == 40 and nodes["add2"]["weight_bytes"] == 0  # "shift" counts once
    assert report["weight_bytes"] == (36 + 4 + 2560 + 10) * 4
    by_op = {row["op"]: row for row in report["by_op"]}
    assert by_op["Add"]["nodes"] == 2 and by_op["Add"]["calls"] == nodes["add1"]["calls"] * 2
    assert by_op["Gemm"]["share_bytes"] == pytest.approx(2560 / 2610)


def test_rows_are_sorted_by_time(cnn_path):
    rows = profile_model(cnn_path, _data(10), runs=1)["nodes"]
    assert [r["total_us"] for r in rows] == sorted((r["total_us"] for r in rows), reverse=True)


def test_the_trace_file_is_removed(cnn_path, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    profile_model(cnn_path, _data(10), runs=1)
    assert list(scratch.iterdir()) == []
    assert [p.name for p in cnn_path.parent.iterdir() if p.suffix == ".json"] == []


def test_a_data_spec_and_the_optimized_graph(cnn_path, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(2).random((12, 64), dtype=np.float32))  # flat samples get reshaped
    report = profile_model(cnn_path, str(data), runs=1, optimized=True, limit=5)
    assert report["samples"] == 5 and report["optimized"]
    assert sum(r["share_time"] for r in report["nodes"]) == pytest.approx(1.0)
    assert sum(r["share_bytes"] for r in report["nodes"]) == pytest.approx(1.0)


def test_fixed_batch_models_get_full_batches(tmp_path):
    model = mlp((16, 8, 4), batch=4)
    path = tmp_path / "fixed.onnx"
    onnx.save(model, path)
    report = profile_model(path, Dataset("x", np.zeros((6, 16), np.float32)), runs=1, batch_size=100)
    assert {row["node"]: row["calls"] for row in report["nodes"]}["fc1"] == 2  # 6 samples → 2 padded batches of 4


def test_bad_arguments_and_models(cnn_path, tmp_path):
    with pytest.raises(UsageError):
        profile_model(cnn_path, _data(), runs=0)
    model = small_cnn()
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    with pytest.raises(BadInputError, match="2 data inputs"):
        profile_model(path, _data(), runs=1)


def test_kernel_times_and_breakdown_from_a_synthetic_trace():
    events = [
        {"cat": "Session", "name": "model_run", "ts": 100, "dur": 50},
        {"cat": "Node", "name": "conv_kernel_time", "ts": 110, "dur": 30, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "conv_fence_before", "ts": 109, "dur": 0, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "conv_kernel_time", "ts": 210, "dur": 10, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "fused_thing_kernel_time", "ts": 230, "dur": 30, "args": {"op_name": "FusedGemm"}},
    ]
    times = kernel_times(events)
    assert times == {"conv": {"op": "Conv", "calls": 2, "total_us": 40},
                     "fused_thing": {"op": "FusedGemm", "calls": 1, "total_us": 30}}
    labelled = label_nodes(small_cnn())
    result = breakdown(labelled, times)
    nodes = {row["node"]: row for row in result["nodes"]}
    assert nodes["fused_thing"]["weight_bytes"] == 0 and nodes["fused_thing"]["share_time"] == pytest.approx(3 / 7)
    assert nodes["fc"]["calls"] == 0 and nodes["fc"]["share_bytes"] > 0.9
    assert sum(node_weight_bytes(labelled).values()) == result["weight_bytes"]


def test_labels_are_unique_even_for_duplicate_names():
    model = small_cnn()
    model.graph.node[4].name = "add"
    model.graph.node[5].name = "add"
    names = [n.name for n in label_nodes(model).graph.node]
    assert len(set(names)) == len(names) and "a" in names and "logits" in names
