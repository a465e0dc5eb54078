"""Time to cluster 10 M weights into 16 shared values (issue #2 target: under 10 s on one core).

Run: .venv/bin/python bench/bench_kmeans.py [--weights N] [--clusters K]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the target says

import numpy as np  # noqa: E402

from weightless_cli.stages.quantize import kmeans_1d, quantize_array  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=int, default=10_000_000)
    parser.add_argument("--clusters", type=int, default=16)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # Pruned-layer-like weights: Laplacian-ish values, 10 % of positions zero.
    weights = (rng.laplace(0, 0.05, args.weights) * (rng.random(args.weights) > 0.1)).astype(np.float32)
    start = time.perf_counter()
    centroids, _ = kmeans_1d(weights[weights != 0], args.clusters)
    core = time.perf_counter() - start
    start = time.perf_counter()
    quantized = quantize_array(weights, args.clusters)
    full = time.perf_counter() - start
    mse = float(np.mean((quantized - weights) ** 2))
    print(f"{'weights':>12} {'clusters':>8} {'kmeans_1d s':>12} {'quantize_array s':>17} {'M weights/s':>12} {'MSE':>10}")
    print(f"{args.weights:>12,} {centroids.size:>8} {core:>12.2f} {full:>17.2f} {args.weights / full / 1e6:>12.2f} "
          f"{mse:>10.3g}")
    print(f"target: quantize_array under 10 s on one core -> {'PASS' if full < 10 else 'FAIL'}")


if __name__ == "__main__":
    main()
