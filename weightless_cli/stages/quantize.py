"""Weight sharing by 1-D k-means over the nonzero weights (Deep Compression, Han et al.).

Zeros stay exactly zero and are not a cluster. Centroids start evenly spaced between the
smallest and largest weight (linear initialisation, which Deep Compression found best for
keeping the rare large weights). One dimension makes k-means cheap: sort the values once,
then each Lloyd step only moves k-1 boundaries, and cluster sums come from a cumulative sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weightless_cli.errors import UsageError
from weightless_cli.model import PerTensor, Selection, WeightTensor, bounded_int, rewrite_file

MAX_ITERATIONS = 300


def kmeans_1d(values: np.ndarray, k: int, max_iterations: int = MAX_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """Cluster 1-D ``values`` into at most ``k`` groups.

    Returns ``(centroids, labels)``: the sorted centroids that own at least one value,
    and for every value the index of its centroid. A cluster left empty (linear
    initialisation puts centroids where no weights are) is re-seeded inside the cluster
    with the largest squared error, so that all ``k`` values are put to use.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        return np.empty(0), np.empty(0, dtype=np.int64)
    ordered = np.sort(flat)
    prefix = np.concatenate(([0.0], np.cumsum(ordered)))
    prefix_sq = np.concatenate(([0.0], np.cumsum(ordered**2)))
    k = min(k, np.unique(ordered).size)
    centroids = np.linspace(ordered[0], ordered[-1], k) if k > 1 else np.array([ordered.mean()])
    starts = None
    for _ in range(max_iterations):
        starts_new, ends = _segments(ordered, centroids)
        counts = ends - starts_new
        if not counts.all():
            centroids = _reseed_empty(ordered, prefix, prefix_sq, starts_new, ends, centroids)
            continue
        if starts is not None and np.array_equal(starts_new, starts):
            break
        starts = starts_new
        centroids = (prefix[ends] - prefix[starts]) / counts
    starts, ends = _segments(ordered, centroids)
    used = ends > starts
    # Same rule as _segments: a value equal to a midpoint belongs to the lower cluster.
    labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat, side="left")
    return centroids[used], (np.cumsum(used) - 1)[labels]


def _segments(ordered: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each value belongs to its nearest centroid: cut the sorted values at the midpoints."""
    cuts = np.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2, side="right")
    return np.concatenate(([0], cuts)), np.concatenate((cuts, [ordered.size]))


def _reseed_empty(ordered, prefix, prefix_sq, starts, ends, centroids) -> np.ndarray:
    counts = ends - starts
    safe = np.maximum(counts, 1)
    sse = (prefix_sq[ends] - prefix_sq[starts]) - (prefix[ends] - prefix[starts]) ** 2 / safe
    worst = int(np.argmax(np.where(counts > 1, sse, -1.0)))
    empty = int(np.flatnonzero(counts == 0)[0])
    # Split the worst cluster: the new centroid sits in its upper half.
    candidate = ordered[starts[worst] + (3 * counts[worst]) // 4]
    centroids = centroids.copy()
    centroids[empty] = candidate if candidate not in centroids else ordered[ends[worst] - 1]
    return np.sort(centroids)


def quantize_array(values: np.ndarray, k: int) -> np.ndarray:
    """``values`` with every nonzero replaced by its k-means centroid (zeros untouched)."""
    work = np.asarray(values, dtype=np.float64)
    nonzero = np.flatnonzero(work)
    centroids, labels = kmeans_1d(work.ravel()[nonzero], k)
    out = np.zeros(work.size, dtype=np.float64)
    out[nonzero] = centroids[labels]
    return out.reshape(work.shape)


def distinct_nonzero(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values).ravel()
    return np.unique(flat[flat != 0])


@dataclass
class QuantizedTensor:
    name: str
    params: int
    nonzeros: int
    clusters_asked: int
    clusters: int  # distinct nonzero values after storing in the tensor's dtype
    mse: float
    max_abs_error: float

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def quantize_tensors(tensors: list[WeightTensor], clusters_for: dict[str, int]) -> list[QuantizedTensor]:
    """Cluster each tensor in place to ``clusters_for[name]`` shared values."""
    report = []
    for tensor in tensors:
        k = clusters_for[tensor.name]
        original = tensor.float_array()
        available = distinct_nonzero(original).size
        if k > available:
            raise UsageError(f"{tensor.name}: {k} clusters asked but the tensor has only {available} distinct nonzero "
                             "values; ask for fewer (or skip it with --exclude)")
        tensor.set_array(quantize_array(original, k))
        stored = tensor.float_array()
        error = stored.astype(np.float64) - original
        report.append(QuantizedTensor(
            name=tensor.name, params=tensor.params, nonzeros=int(np.count_nonzero(stored)), clusters_asked=k,
            clusters=distinct_nonzero(stored).size, mse=float(np.mean(error**2)) if error.size else 0.0,
            max_abs_error=float(np.max(np.abs(error))) if error.size else 0.0))
    return report


parse_clusters = bounded_int("clusters", 1, 65535)
parse_bit_width = bounded_int("bits", 1, 16)


def parse_bits(text: str) -> int:
    """``--bits R`` for k-means: 2^R clusters."""
    return 2 ** parse_bit_width(text)


def quantize_file(source: Path, target: Path, selection: Selection, clusters: PerTensor) -> dict:
    """Load ``source``, cluster the selected tensors, write ``target``; return the report."""

    def change(tensors: list[WeightTensor]) -> list[dict]:
        try:
            report = quantize_tensors(tensors, {t.name: clusters.for_name(t.name) for t in tensors})
        except UsageError as exc:  # name the file too: the tensor alone may be ambiguous in a pipeline
            raise UsageError(str(exc), source) from None
        return [r.to_dict() for r in report]

    return rewrite_file(source, target, selection, change)
