"""Pruning and k-means weight sharing: exact counts, zeros kept, K respected, determinism."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightless_cli.stages.prune import prune_array, prune_arrays_globally, prune_count
from weightless_cli.stages.quantize import distinct_nonzero, kmeans_1d, quantize_array


@given(st.integers(1, 3000), st.floats(0, 0.999), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_prune_zeroes_exactly_round_s_n(size, sparsity, seed):
    values = np.random.default_rng(seed).normal(size=size).astype(np.float32)
    pruned = prune_array(values, sparsity)
    assert size - np.count_nonzero(pruned) == prune_count(size, sparsity)
    kept = pruned != 0
    np.testing.assert_array_equal(pruned[kept], values[kept])
    if kept.any() and (~kept).any():
        assert np.abs(values[~kept]).max() <= np.abs(values[kept]).min()


def test_prune_ties_go_to_earlier_positions():
    values = np.array([0.5, -0.5, 0.5, 1.0, 0.5], dtype=np.float32)
    np.testing.assert_array_equal(prune_array(values, 0.4), [0, 0, 0.5, 1.0, 0.5])


def test_prune_keeps_existing_zeros_and_counts_them():
    values = np.array([0, 0, 3, 4, 5, 6], dtype=np.float32)
    np.testing.assert_array_equal(prune_array(values, 0.5), [0, 0, 0, 4, 5, 6])


def test_global_prune_uses_one_threshold():
    small = np.full(10, 0.1, dtype=np.float32)
    large = np.linspace(1, 2, 10).astype(np.float32)
    a, b = prune_arrays_globally([small, large], 0.5)
    assert not a.any() and np.array_equal(b, large)


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([-1.0, -0.2, 0.3, 2.0])
    values = np.concatenate([c + rng.normal(0, 0.01, 500) for c in centers])
    centroids, labels = kmeans_1d(values, 4)
    np.testing.assert_allclose(centroids, centers, atol=0.01)
    assert np.array_equal(np.bincount(labels), [500] * 4)


@given(st.integers(2, 2000), st.integers(1, 64), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_quantize_respects_k_and_zeros(size, k, seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=size).astype(np.float32) * (rng.random(size) > 0.3)
    out = quantize_array(values, k)
    assert distinct_nonzero(out).size <= k
    np.testing.assert_array_equal(out == 0, values == 0)
    # Every weight goes to its nearest centroid (the defining property of a k-means fixpoint).
    centroids = distinct_nonzero(out)
    nz = values != 0
    if nz.any():
        nearest = centroids[np.abs(values[nz, None] - centroids[None, :]).argmin(axis=1)]
        np.testing.assert_allclose(np.abs(out[nz] - values[nz]), np.abs(nearest - values[nz]), atol=1e-6)


def test_quantize_is_deterministic():
    values = np.random.default_rng(1).normal(size=50_000)
    assert quantize_array(values, 16).tobytes() == quantize_array(values.copy(), 16).tobytes()


@pytest.mark.parametrize("k", [1, 2, 7])
def test_kmeans_small_k(k):
    centroids, labels = kmeans_1d(np.arange(1, 101, dtype=np.float64), k)
    assert centroids.size == k and labels.max() == k - 1
