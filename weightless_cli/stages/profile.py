"""Where a model's time and weight bytes go, per op type and per node (`inspect --profile`).

A Fathom-style breakdown (Adolf et al. 2016): onnxruntime's own profiler times every
kernel while the model runs over real data, and each node's time is set beside the bytes
of the weights it reads. A layer that holds most of the bytes but little of the time (a
big fully connected layer) calls for a different compression than one that takes the
time (an early convolution).

The profiler writes a JSON trace (Chrome trace format); it goes to a temporary folder
that is removed afterwards. One warm-up pass over a batch comes first and is left out of
the numbers. By default onnxruntime's graph optimizations are off, so every row is one
node of the file as written (fusions would rename and merge nodes); ``optimized=True``
profiles the optimized graph instead, whose fused nodes carry no weights of their own
in this breakdown.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from weightless_cli.data.datasets import Dataset, fit_to_input_shape, load_dataset
from weightless_cli.errors import BadInputError, UsageError
from weightless_cli.model import OnnxModel

DEFAULT_RUNS = 5
DEFAULT_BATCH_SIZE = 100
DEFAULT_THREADS = 1
_KERNEL_SUFFIX = "_kernel_time"
_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def profile_model(path: str | os.PathLike, dataset: Dataset | str, runs: int = DEFAULT_RUNS, *,
                  batch_size: int = DEFAULT_BATCH_SIZE, threads: int = DEFAULT_THREADS, optimized: bool = False,
                  limit: int | None = None) -> dict:
    """Profile ``path`` over ``dataset`` (a Dataset or a data spec), ``runs`` passes.

    Returns ``by_op`` and ``nodes`` rows ``{op, node, calls, total_us, share_time,
    weight_bytes, share_bytes}`` (``by_op`` rows have ``nodes``, a count, instead of
    ``node``), sorted by time, and the totals they are shares of.
    """
    if runs < 1:
        raise UsageError(f"--runs must be at least 1, got {runs}")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    model = OnnxModel.load(path)
    labelled = label_nodes(model.proto)
    session_input = _single_float_input(labelled, path)
    if isinstance(dataset, str):
        dataset = load_dataset(dataset, _input_dims(session_input), limit)
    batches = _batches(dataset, session_input, batch_size)
    events = _run_profiled(labelled.SerializeToString(), session_input.name, batches, runs, threads, optimized)
    times = kernel_times(events)
    return {"model": str(path), "data": dataset.name, "samples": len(dataset), "runs": runs,
            "batch_size": batch_size, "threads": threads, "optimized": optimized,
            **breakdown(labelled, times)}


# ---------------------------------------------------------------- the model side


def label_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every node has a unique name (its own, or its first output's), so that
    the profiler's events map back to nodes."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    counts: dict[str, int] = defaultdict(int)
    for node in copy.graph.node:
        counts[node.name] += 1
    for node in copy.graph.node:
        if not node.name or counts[node.name] > 1:
            node.name = node.output[0] if node.output else f"{node.op_type}_unnamed"
    return copy


def node_weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the stored tensors each main-graph node reads, by node name. A tensor read by
    several nodes counts for the first one only, so the bytes add up to the model's; a node
    holding subgraphs (If, Loop, Scan) also counts the tensors stored inside them."""
    stored = {t.name: _tensor_bytes(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    stored[node.output[0]] = _tensor_bytes(attr.t)
    owned: dict[str, int] = {}
    claimed: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        names = [n for n in dict.fromkeys(node.input) if n in stored and n not in claimed]
        claimed.update(names)
        owned[node.name] = sum(stored[n] for n in names) + _subgraph_bytes(node)
    return owned


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    return math.prod(tensor.dims) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _subgraph_bytes(node: onnx.NodeProto) -> int:
    total = 0
    for attr in node.attribute:
        for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            total += sum(_tensor_bytes(t) for t in graph.initializer)
            for inner in graph.node:
                total += sum(_tensor_bytes(a.t) for a in inner.attribute if a.type == onnx.AttributeProto.TENSOR)
                total += _subgraph_bytes(inner)
    return total


# ---------------------------------------------------------------- running with the profiler


def _single_float_input(model: onnx.ModelProto, path: object) -> onnx.ValueInfoProto:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise BadInputError(f"model has {len(inputs)} data inputs; only single-input models can be profiled", path)
    elem = inputs[0].type.tensor_type.elem_type
    if helper.tensor_dtype_to_np_dtype(elem).kind != "f":
        raise BadInputError(f"model input {inputs[0].name!r} is not a float tensor", path)
    return inputs[0]


def _input_dims(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in value.type.tensor_type.shape.dim)


def _batches(dataset: Dataset, value: onnx.ValueInfoProto, batch_size: int) -> list[np.ndarray]:
    dims = _input_dims(value)
    dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    x = fit_to_input_shape(dataset.x, dims, dataset.name).astype(dtype, copy=False)
    fixed = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
    step = fixed or batch_size
    batches = [x[start : start + step] for start in range(0, len(x), step)]
    if fixed and len(batches[-1]) < fixed:  # a fixed-batch model needs full batches
        pad = np.zeros((fixed - len(batches[-1]), *x.shape[1:]), dtype=x.dtype)
        batches[-1] = np.concatenate([batches[-1], pad])
    return batches


def _run_profiled(payload: bytes, input_name: str, batches: list[np.ndarray], runs: int, threads: int,
                  optimized: bool) -> list[dict]:
    """Run one warm-up batch and then ``runs`` passes over ``batches`` under the profiler;
    return the trace events of the timed passes only."""
    with tempfile.TemporaryDirectory(prefix="weightless-profile-") as folder:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "trace")
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        if not optimized:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types
            raise BadInputError(f"onnxruntime cannot load the model: {_first_line(exc)}") from None
        try:
            session.run(None, {input_name: batches[0]})
            for _ in range(runs):
                for batch in batches:
                    session.run(None, {input_name: batch})
        except Exception as exc:
            raise BadInputError(f"onnxruntime failed to run the model: {_first_line(exc)}") from None
        finally:
            trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
    return _after_warm_up(events)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _after_warm_up(events: list[dict]) -> list[dict]:
    """Drop the events of the first ``model_run`` (the warm-up: first-touch allocations)."""
    run_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if not run_ends:
        return events
    return [e for e in events if e.get("ts", 0) >= run_ends[0]]


# ---------------------------------------------------------------- the breakdown


def kernel_times(events: list[dict]) -> dict[str, dict]:
    """``{node: {op, calls, total_us}}`` from a trace's per-kernel events."""
    times: dict[str, dict] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith(_KERNEL_SUFFIX):
            continue
        node = name[: -len(_KERNEL_SUFFIX)]
        entry = times.setdefault(node, {"op": event.get("args", {}).get("op_name", "?"), "calls": 0, "total_us": 0})
        entry["calls"] += 1
        entry["total_us"] += int(event.get("dur", 0))
    return times


def breakdown(model: onnx.ModelProto, times: dict[str, dict]) -> dict:
    """Per-node and per-op-type rows: every node of the model (weights, maybe no time) and
    every node the trace timed (time, maybe not in the file when optimized)."""
    weights = node_weight_bytes(model)
    ops = {node.name: node.op_type for node in model.graph.node if node.op_type != "Constant"}
    names = list(ops) + [n for n in times if n not in ops]
    total_us = sum(t["total_us"] for t in times.values())
    total_bytes = sum(weights.values())
    nodes = []
    for name in names:
        timed = times.get(name, {"calls": 0, "total_us": 0})
        nodes.append({"op": ops.get(name) or timed.get("op", "?"), "node": name, "calls": timed["calls"],
                      "total_us": timed["total_us"], "weight_bytes": weights.get(name, 0)})
    by_op: dict[str, dict] = {}
    for row in nodes:
        entry = by_op.setdefault(row["op"], {"op": row["op"], "nodes": 0, "calls": 0, "total_us": 0, "weight_bytes": 0})
        entry["nodes"] += 1
        for key in ("calls", "total_us", "weight_bytes"):
            entry[key] += row[key]
    return {"total_us": total_us, "weight_bytes": total_bytes,
            "by_op": _with_shares(list(by_op.values()), total_us, total_bytes),
            "nodes": _with_shares(nodes, total_us, total_bytes)}


def _with_shares(rows: list[dict], total_us: int, total_bytes: int) -> list[dict]:
    for row in rows:
        row["share_time"] = row["total_us"] / total_us if total_us else 0.0
        row["share_bytes"] = row["weight_bytes"] / total_bytes if total_bytes else 0.0
    # Most time first; ties (untimed nodes) by bytes, then by name, so the order is stable.
    return sorted(rows, key=lambda r: (-r["total_us"], -r["weight_bytes"], r.get("node", r["op"])))
