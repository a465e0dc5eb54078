"""Per-tensor statistics of a model's weights: where the parameters and bytes are."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from weightless_cli.model import OnnxModel, WeightTensor


@dataclass
class TensorStats:
    name: str
    role: str
    ops: list[str]
    location: str
    dtype: str
    shape: list[int]
    params: int
    bytes: int
    sparsity: float
    distinct: int
    min: float
    max: float
    std: float
    quantized: bool

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def tensor_stats(tensor: WeightTensor) -> TensorStats:
    values = tensor.float_array().ravel()
    empty = values.size == 0
    return TensorStats(
        name=tensor.name, role=tensor.role, ops=list(tensor.ops), location=tensor.location, dtype=tensor.dtype,
        shape=list(tensor.shape), params=tensor.params, bytes=tensor.nbytes,
        sparsity=0.0 if empty else float(1 - np.count_nonzero(values) / values.size),
        distinct=int(np.unique(values).size),
        min=0.0 if empty else float(values.min()), max=0.0 if empty else float(values.max()),
        std=0.0 if empty else float(values.std()), quantized=tensor.quantized)


def model_summary(model: OnnxModel) -> dict:
    """Everything `weightless inspect` shows, as plain data (the --json object)."""
    tensors = [tensor_stats(t) for t in model.weights]
    total_params = sum(t.params for t in tensors)
    total_bytes = sum(t.bytes for t in tensors)
    by_op: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "bytes": 0, "tensors": 0})
    for t in tensors:
        # A tensor read by several op types is counted under its first (alphabetical) one.
        entry = by_op[t.ops[0] if t.ops else "(unused)"]
        entry["params"] += t.params
        entry["bytes"] += t.bytes
        entry["tensors"] += 1
    breakdown = [
        {"op": op, **v, "params_share": v["params"] / total_params if total_params else 0.0,
         "bytes_share": v["bytes"] / total_bytes if total_bytes else 0.0}
        for op, v in sorted(by_op.items(), key=lambda item: -item[1]["params"])
    ]
    return {
        "model": str(model.path),
        "file_bytes": model.path.stat().st_size,
        "opset": model.opsets,
        "quantized_ops": model.quantized_ops,
        "tensors": [t.to_dict() for t in tensors],
        "totals": {"tensors": len(tensors), "params": total_params, "bytes": total_bytes,
                   "nonzeros": int(sum(round(t.params * (1 - t.sparsity)) for t in tensors))},
        "by_op": breakdown,
    }
