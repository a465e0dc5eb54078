"""Value-aware (outlier-aware) quantization, and the quantize stage for every method.

Park, Yoo and Vajda ("Value-aware Quantization for Training and Inference of Neural Networks", ECCV 2018)
observe that the few largest-magnitude weights carry a large share of a layer's signal but stretch the
range a low-bit grid must cover. Keeping a small fraction F of them (the largest magnitudes) at high
precision and quantizing only the rest lets 3-4 bit layers keep their accuracy without retraining.

Here the outliers are kept in float16 (exactly representable once stored, and what the ``outlier`` codec
stores) and the rest goes to ``2^bits`` k-means clusters (:func:`weightless_cli.stages.quantize.quantize_array`,
zeros stay zero) or to a symmetric ``bits``-bit uniform grid (:func:`weightless_cli.stages.uniform.quantize_uniform`).

:func:`quantize_file` is the quantize stage for ``--method kmeans|uniform|rowwise`` with ``--outliers F``
and ``--per-channel``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from weightless_cli.codecs.dpred import bit_patterns, round_to
from weightless_cli.errors import UsageError
from weightless_cli.model import PerTensor, Selection, WeightTensor, rewrite_file
from weightless_cli.stages.quantize import quantize_array
from weightless_cli.stages.uniform import as_float_array, quantize_rowwise, quantize_uniform

__all__ = ["METHODS", "largest_positions", "outlier_count", "quantize_file",
           "quantize_values", "quantize_with_outliers"]

METHODS = ("kmeans", "uniform", "rowwise")


def outlier_count(size: int, fraction: float) -> int:
    """``round(fraction * size)``, halves up: the number of weights kept as outliers."""
    return int(np.floor(fraction * size + 0.5))


def largest_positions(values: np.ndarray, count: int) -> np.ndarray:
    """Flat positions of the ``count`` largest magnitudes, ties by position (earlier first), ascending."""
    magnitudes = np.abs(np.asarray(values).reshape(-1).astype(np.float64))
    return np.sort(np.argsort(-magnitudes, kind="stable")[:count])


def _kept_in_float16(values: np.ndarray, dtype: str) -> np.ndarray:
    """Outliers rounded to float16 (left alone when already 16-bit, or when float16 would overflow)."""
    if values.dtype.itemsize <= 2:
        return values
    with np.errstate(over="ignore"):
        half = values.astype(np.float64).astype(np.float16)
    return np.where(np.isfinite(half), round_to(half.astype(np.float64), dtype), values)


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"outlier fraction {fraction} is outside [0, 1)")


def quantize_with_outliers(values: np.ndarray, fraction: float, bits: int, method: str = "kmeans") -> np.ndarray:
    """``values`` with the largest-magnitude ``fraction`` kept in float16 and the rest on ``bits`` bits.

    ``method`` ``kmeans``: the rest shares ``2^bits`` k-means values (zeros stay zero, as in the k-means
    stage); ``uniform``: the rest sits on a symmetric ``bits``-bit grid scaled to *its* largest magnitude.
    Returns an array of the input's dtype and shape.
    """
    values, dtype = as_float_array(values)
    _check_fraction(fraction)
    if method not in ("kmeans", "uniform"):
        raise UsageError(f"outliers work with --method kmeans or uniform, not {method!r}")
    flat = values.reshape(-1)
    positions = largest_positions(flat, outlier_count(flat.size, fraction))
    dense = np.ones(flat.size, dtype=bool)
    dense[positions] = False
    out = np.empty_like(flat)
    out[dense] = _quantize_flat(flat[dense], bits, method, dtype)
    out[positions] = _kept_in_float16(flat[positions], dtype)
    return out.reshape(values.shape)


def _quantize_flat(values: np.ndarray, bits: int, method: str, dtype: str) -> np.ndarray:
    if method == "uniform":
        return quantize_uniform(values, bits)
    if not 1 <= bits <= 16:
        raise UsageError(f"k-means needs 1..16 bits, got {bits}")
    return round_to(quantize_array(values.astype(np.float64), 2**bits), dtype)


def quantize_values(values: np.ndarray, method: str, bits: int, per_channel: bool = False,
                    outliers: float = 0.0) -> np.ndarray:
    """One tensor through any method: the dispatch behind ``weightless quantize --method``."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if per_channel and method != "uniform":
        raise UsageError("--per-channel applies to --method uniform only")
    if outliers:
        if per_channel:
            raise UsageError("--outliers works with a per-tensor grid; drop --per-channel")
        return quantize_with_outliers(values, outliers, bits, method)
    if method == "uniform":
        return quantize_uniform(values, bits, per_channel)
    if method == "rowwise":
        return quantize_rowwise(values, bits)
    values, dtype = as_float_array(values)
    return _quantize_flat(values.reshape(-1), bits, "kmeans", dtype).reshape(values.shape)


def _report_row(tensor: WeightTensor, original: np.ndarray, method: str, bits: int, outliers: float) -> dict:
    stored = tensor.array()
    error = stored.astype(np.float64) - original.astype(np.float64)
    kept = outlier_count(tensor.params, outliers) if outliers else 0
    return {"name": tensor.name, "params": tensor.params, "method": method, "bits": bits, "outliers": kept,
            "levels": int(np.unique(bit_patterns(stored)).size),
            "mse": float(np.mean(error**2)) if error.size else 0.0,
            "max_abs_error": float(np.max(np.abs(error))) if error.size else 0.0}


def quantize_tensors(tensors: list[WeightTensor], method: str, bits_for: dict[str, int], per_channel: bool = False,
                     outliers: float = 0.0) -> list[dict]:
    """Quantize each tensor in place; one report row per tensor."""
    rows = []
    for tensor in tensors:
        original = tensor.array()
        try:
            quantized = quantize_values(original, method, bits_for[tensor.name], per_channel, outliers)
        except UsageError as exc:
            raise UsageError(str(exc), tensor.name) from None
        tensor.set_array(quantized)
        rows.append(_report_row(tensor, original, method, bits_for[tensor.name], outliers))
    return rows


def quantize_file(source: Path, target: Path, selection: Selection, bits: PerTensor, method: str = "kmeans",
                  per_channel: bool = False, outliers: float = 0.0) -> dict:
    """Load ``source``, quantize the selected tensors with ``method``, write ``target``; return the report."""

    def change(tensors: list[WeightTensor]) -> list[dict]:
        return quantize_tensors(tensors, method, {t.name: bits.for_name(t.name) for t in tensors}, per_channel,
                                outliers)

    return rewrite_file(source, target, selection, change, method=method, per_channel=per_channel,
                        outlier_fraction=outliers)
