"""Magnitude pruning (Han et al.): zero the smallest-magnitude weights.

Counts are exact: pruning ``s`` of ``n`` weights zeroes ``round(s * n)`` of them, ties
broken by position (earlier positions go first), so results are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weightless_cli.errors import UsageError
from weightless_cli.model import PerTensor, Selection, WeightTensor, rewrite_file


def check_sparsity(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise UsageError(f"sparsity {value} is outside [0, 1)")
    return value


def prune_count(size: int, sparsity: float) -> int:
    return int(np.floor(sparsity * size + 0.5))


def smallest_positions(magnitudes: np.ndarray, count: int) -> np.ndarray:
    """Flat positions of the ``count`` smallest magnitudes, ties by position.

    The same set as the first ``count`` of a stable argsort, found in linear time: every
    value below the count-th smallest, then the earliest positions equal to it.
    """
    flat = magnitudes.ravel()
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    if count >= flat.size:
        return np.arange(flat.size)
    threshold = np.partition(flat, count - 1)[count - 1]
    below = np.flatnonzero(flat < threshold)
    ties = np.flatnonzero(flat == threshold)[: count - below.size]
    return np.concatenate((below, ties))


def prune_array(values: np.ndarray, sparsity: float) -> np.ndarray:
    """``values`` with ``round(sparsity * size)`` smallest-magnitude entries set to zero
    (entries that are already zero count among them)."""
    pruned = values.copy()
    pruned.ravel()[smallest_positions(np.abs(values), prune_count(values.size, sparsity))] = 0
    return pruned


def prune_arrays_globally(arrays: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """One magnitude threshold across all ``arrays``: the smallest weights overall go."""
    magnitudes = np.concatenate([np.abs(a).ravel().astype(np.float64) for a in arrays])
    drop = np.zeros(magnitudes.size, dtype=bool)
    drop[smallest_positions(magnitudes, prune_count(magnitudes.size, sparsity))] = True
    pruned, start = [], 0
    for array in arrays:
        out = array.copy()
        out.ravel()[drop[start : start + array.size]] = 0
        pruned.append(out)
        start += array.size
    return pruned


@dataclass
class PrunedTensor:
    name: str
    params: int
    target: float
    sparsity_before: float
    sparsity_after: float

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def sparsity_of(values: np.ndarray) -> float:
    return float(1.0 - np.count_nonzero(values) / values.size) if values.size else 0.0


def prune_tensors(
    tensors: list[WeightTensor],
    sparsity_for: dict[str, float],
    global_sparsity: float | None = None,
) -> list[PrunedTensor]:
    """Prune ``tensors`` in place, each to ``sparsity_for[name]``, or all together to
    ``global_sparsity`` with one threshold."""
    if global_sparsity is not None:
        before = [t.array() for t in tensors]
        pruned = dict(zip((t.name for t in tensors), prune_arrays_globally(before, global_sparsity), strict=True))
    report = []
    for tensor in tensors:
        # One tensor at a time: only the current pruned copy is held (big models stay bounded).
        old = tensor.array()
        target = global_sparsity if global_sparsity is not None else sparsity_for[tensor.name]
        new = pruned.pop(tensor.name) if global_sparsity is not None else prune_array(old, target)
        report.append(PrunedTensor(tensor.name, tensor.params, target, sparsity_of(old), sparsity_of(new)))
        tensor.set_array(new)
    return report


def prune_file(source: Path, target: Path, selection: Selection, sparsity: PerTensor,
               global_sparsity: float | None = None) -> dict:
    """Load ``source``, prune the selected tensors, write ``target``; return the report."""

    def change(tensors: list[WeightTensor]) -> list[dict]:
        if global_sparsity is None:
            missing = [t.name for t in tensors if sparsity.for_name(t.name) is None]
            if missing:
                raise UsageError(f"no --sparsity given for {', '.join(missing[:3])}"
                                 f"{' ...' if len(missing) > 3 else ''}")
        report = prune_tensors(tensors, {t.name: sparsity.for_name(t.name) for t in tensors}, global_sparsity)
        return [r.to_dict() for r in report]

    return rewrite_file(source, target, selection, change)
