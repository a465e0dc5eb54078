"""Exact codecs: `sparse` speed on a 10 M-position tensor at 4 % density (issue #6 target: decode at
>= 10 M positions/s), and bits per nonzero of `sparse`, `csr-huffman` and `dense` against the order-0
bound log2 C(N, n) + n·H(ids) on random masks and on LeNet-300-100's fc1 pruned and clustered.

Run: .venv/bin/python bench/bench_sparse.py [--positions N] [--density D] [--repeats R]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from weightless_cli.codecs import csr_huffman, dense, sparse  # noqa: E402
from weightless_cli.codecs.clustered import SparseCode, sparse_code  # noqa: E402

CODECS = {"sparse": sparse, "csr-huffman": csr_huffman, "dense": dense}
LENET = Path(__file__).resolve().parents[1] / "sample_models" / "lenet-300-100.onnx"


def random_code(shape: tuple[int, ...], density: float, k: int, seed: int = 0) -> SparseCode:
    rng = np.random.default_rng(seed)
    n_positions = math.prod(shape)
    positions = np.flatnonzero(rng.random(n_positions) < density)
    ids = rng.integers(0, k, positions.size).astype(np.uint16)
    return SparseCode(np.arange(1, k + 1, dtype=np.float32), positions, ids, n_positions)


def best_of(repeats: int, action) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
    return min(times), result


def speed(positions: int, density: float, repeats: int) -> None:
    side = math.isqrt(positions)
    shape = (side, positions // side)
    code = random_code(shape, density, 16)
    encode_s, (params, sections) = best_of(repeats, lambda: sparse.encode(code, shape))
    decode_s, ids = best_of(repeats, lambda: sparse.decode(params, sections, shape, code.k))
    assert np.array_equal(ids, code.dense_ids())
    size = math.prod(shape)
    rate = size / decode_s / 1e6
    print(f"sparse on {shape[0]}x{shape[1]} = {size:,} positions, {code.positions.size:,} nonzeros "
          f"({density:.0%}), K=16, best of {repeats}:")
    print(f"  encode {encode_s:.3f} s ({size / encode_s / 1e6:.1f} M positions/s), "
          f"decode {decode_s:.3f} s ({rate:.1f} M positions/s)")
    print(f"  target: decode >= 10 M positions/s -> {'PASS' if rate >= 10 else 'FAIL'}")


def lenet_codes() -> list[tuple[str, tuple[int, ...], SparseCode]]:
    try:
        import onnx
        from onnx import numpy_helper

        from weightless_cli.stages.prune import prune_array
        from weightless_cli.stages.quantize import quantize_array
    except ImportError:
        return []
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(LENET)).graph.initializer}
    cases = []
    for name in ("fc1.weight", "fc2.weight"):
        for sparsity in (0.92, 0.97):
            values = quantize_array(prune_array(weights[name], sparsity), 32)
            cases.append((f"lenet {name} {1 - sparsity:.0%} K=32", values.shape, sparse_code(values)))
    return cases


def sizes() -> None:
    cases = [
        (f"random {shape} {density:.0%} K={k}", shape, random_code(shape, density, k, seed))
        for seed, (shape, density, k) in enumerate([
            ((300, 784), 0.03, 16), ((1000, 1000), 0.04, 16), ((100, 300), 0.10, 16),
            ((256, 128, 3, 3), 0.30, 32), ((300, 784), 0.90, 16),
        ])
    ] + lenet_codes()
    print("\nbits per nonzero (x = size / order-0 bound); sections only, the raw codebook is the same for all")
    print(f"{'tensor':<34} {'nonzeros':>9} {'bound':>7} " + " ".join(f"{name:>17}" for name in CODECS))
    for label, shape, code in cases:
        bound = sparse.order0_bound_bits(code)
        n = max(code.positions.size, 1)
        row = f"{label:<34} {code.positions.size:>9,} {bound / n:>7.3f} "
        for codec in CODECS.values():
            params, sections = codec.encode(code, shape)
            assert np.array_equal(codec.decode(params, sections, shape, code.k), code.dense_ids())
            bits = 8 * sum(len(data) for data in sections.values())
            row += f" {bits / n:>7.3f} (x{bits / bound:.3f})"
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=10_000_000)
    parser.add_argument("--density", type=float, default=0.04)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    speed(args.positions, args.density, args.repeats)
    sizes()


if __name__ == "__main__":
    main()
