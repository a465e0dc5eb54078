"""Benchmarks for the Bloomier codec (prints tables; not a unit test).

    .venv/bin/python bench/bench_bloomier.py                 # hash, build, decode, sizes
    .venv/bin/python bench/bench_bloomier.py build decode    # some of them
    .venv/bin/python bench/bench_bloomier.py phases          # where one 4e6-key build's time goes
    .venv/bin/python bench/bench_bloomier.py --sizing-study 15-24   # how the size tables were made
    .venv/bin/python bench/bench_bloomier.py --verify-sizing 1-24   # p(first seed peels) per bucket

CPU times are process times (this machine is shared, so wall clocks are noisy); the
decode rows report wall time because they may use helper processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from weightless_cli.codecs import bloomier, parallel
from weightless_cli.codecs.bitpack import pack_bits, unpack_bits
from weightless_cli.codecs.hashing import murmur3_32, position_hash

FC6_POSITIONS = 25088 * 4096  # VGG-16 fc6: 102,760,448 weights
FC6_DENSITY = 0.04
LENET_FC1_POSITIONS = 784 * 300  # LeNet-300-100's first layer: 235,200 weights
LENET_DENSITY = 0.08


def sparse_positions(n_positions: int, density: float, seed: int = 0) -> np.ndarray:
    """Sorted distinct positions, each kept with probability ``density`` (like a pruned layer)."""
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, n_positions, 1 << 24):
        stop = min(start + (1 << 24), n_positions)
        chunks.append(start + np.flatnonzero(rng.random(stop - start) < density))
    return np.concatenate(chunks)


def cpu_timed(fn, *args, **kwargs):
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.process_time() - start_cpu, time.perf_counter() - start_wall


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- host


def host_check(label: str) -> list[object]:
    """How fast this host is right now, on the two kinds of work the codec does.

    Arithmetic (fmix64 on cache-resident keys) is steady on a shared machine; random reads
    from a table the size of fc6's (4.6 MB: past L2, inside L3) are not, because the L3 is
    shared with the neighbours. The build and decode figures move with the second number.
    """
    keys = np.arange(bloomier.QUERY_CHUNK, dtype=np.uint64)
    out, scratch = np.empty_like(keys), np.empty_like(keys)
    rng = np.random.default_rng(0)
    table = rng.integers(0, 256, size=4_600_000).astype(np.uint8)
    where = rng.integers(0, table.size, size=1 << 20)
    picked = np.empty(where.size, dtype=np.uint8)
    hash_s = min(cpu_timed(lambda: [position_hash(keys, 7, out, scratch) for _ in range(100)])[1] for _ in range(5))
    gather_s = min(cpu_timed(lambda: [np.take(table, where, out=picked) for _ in range(10)])[1] for _ in range(5))
    return [label, f"{hash_s / (100 * keys.size) * 1e9:.2f}", f"{10 * where.size / gather_s / 1e6:.0f}"]


def print_host_checks(rows: list[list[object]]) -> None:
    print_table(
        "Host check (best of 5, one core): the build and decode figures fall when the second column does",
        ["when", "fmix64 ns/key", "random reads from a 4.6 MB table, M/s"],
        rows,
    )


# ----------------------------------------------------------------------------- hash


def bench_hash() -> None:
    # Chunk-sized arrays, as the queries use them: this measures arithmetic, not memory.
    keys = np.arange(bloomier.QUERY_CHUNK, dtype=np.uint64)
    keys32 = keys.astype(np.uint32)
    out = np.empty_like(keys)
    scratch = np.empty_like(keys)
    candidates = [
        ("fmix64(key + seed_word): 64 bits (used)", lambda: position_hash(keys, 7, out, scratch)),
        ("MurmurHash3 x86_32 (mmh3-exact): 32 bits", lambda: murmur3_32(keys32, 7)),
        ("2 x MurmurHash3 x86_32: 64 bits", lambda: (murmur3_32(keys32, 7), murmur3_32(keys32, 8))),
    ]
    rows = []
    for name, fn in candidates:
        fn()
        best = min(cpu_timed(lambda fn=fn: [fn() for _ in range(100)])[1] / 100 for _ in range(5))
        rows.append([name, f"{best / keys.size * 1e9:.2f}"])
    print_table(f"Hashing ({keys.size:,} consecutive keys at a time, one core)", ["hash", "ns/key"], rows)


# ----------------------------------------------------------------------------- build


def c_binary_fuse8_seconds(keys: np.ndarray) -> float | None:
    """CPU seconds of xor_singleheader's binary_fuse8 populate (via pyfusefilter's cffi lib)."""
    try:
        from pyfusefilter._xorfilter import ffi, lib
    except ImportError:
        return None
    data = np.ascontiguousarray(keys, dtype=np.uint64).copy()
    handle = ffi.new("binary_fuse8_t *")
    start = time.process_time()
    if not lib.binary_fuse8_allocate(data.size, handle):
        return None
    ok = lib.binary_fuse8_populate(ffi.from_buffer("uint64_t[]", data), data.size, handle)
    seconds = time.process_time() - start
    lib.binary_fuse8_free(handle)
    return seconds if ok else None


def bench_build(sizes: list[int], repeats: int = 5) -> None:
    """Ours and C on the same keys, alternately, ``repeats`` times each; the best CPU time of each.

    Alternating keeps both sides under the same load on a shared machine; the first of our
    runs (a fresh process's first build, page faults included) is shown too.
    """
    rows = []
    for n in sizes:
        positions = sparse_positions(n * 25, 1 / 25, seed=n)
        ids = np.random.default_rng(1).integers(0, 255, size=positions.size)
        ours, walls, c_runs = [], [], []
        for _ in range(repeats):
            table, cpu, wall = cpu_timed(bloomier.build_table, positions, ids, 8, 0)
            ours.append(cpu)
            walls.append(wall)
            c_runs.append(c_binary_fuse8_seconds(positions))
        cpu, first = min(ours), ours[0]
        c_seconds = min(filter(None, c_runs), default=None)
        ratio = f"{cpu / c_seconds:.1f}x" if c_seconds else "n/a"
        rows.append(
            [
                f"{positions.size:,}",
                f"{cpu:.3f}",
                f"{first:.3f}",
                f"{min(walls):.3f}",
                f"{positions.size / cpu / 1e6:.2f}",
                f"{c_seconds:.3f}" if c_seconds else "n/a",
                ratio,
                f"{table.layout.cells / positions.size:.4f}",
                table.seed,
            ]
        )
    print_table(
        f"Build (t = 8, keys = 4 % of a 25n range; best of {repeats} alternating runs; "
        "C = pyfusefilter binary_fuse8_populate, same keys)",
        ["keys", "cpu s", "first run cpu s", "wall s", "M keys/s (cpu)", "C cpu s", "ours / C", "m/n", "seed used"],
        rows,
    )


def bench_build_phases(n: int = 4 * 10**6, repeats: int = 5) -> None:
    """Where one build's time goes: each phase of ``build_table``'s first seed, best of ``repeats``.

    The phases' best runs rarely fall in the same build, so their sum is a floor for the
    whole build on this host rather than a build time.
    """
    positions = sparse_positions(n * 25, 1 / 25, seed=n)
    ids = np.random.default_rng(1).integers(0, 255, size=positions.size)
    layout = bloomier.choose_layout(positions.size)
    best: dict[str, float] = {}

    def timed(name: str, fn, *args):
        result, cpu, _ = cpu_timed(fn, *args)
        best[name] = min(best.get(name, math.inf), cpu)
        return result

    for _ in range(repeats):
        hashes = timed("hash", bloomier._hash_keys, positions, 0)
        stored = timed("stored words", bloomier._stored_words, hashes, ids, 8)
        order = timed("sweep order", bloomier._sweep_order, hashes, layout)
        triples = timed("cell triples", bloomier._triples_in_order, hashes, order, layout)
        del hashes
        timed("cell sums", bloomier._cell_sums, triples, layout.cells, bloomier._sum_packing(positions.size))
        rounds = timed("peel (cell sums included)", bloomier._peel, triples, layout.cells)
        del triples
        stored = timed("stored words in sweep order", stored.take, order)
        timed("assign", bloomier._assign, rounds, stored, layout.cells, 8)
        del rounds, stored, order
    best["peel rounds"] = best.pop("peel (cell sums included)") - best["cell sums"]
    rows = [[name, f"{seconds:.3f}", f"{seconds / positions.size * 1e9:.0f}"] for name, seconds in best.items()]
    total = sum(best.values())
    rows.append(["sum", f"{total:.3f}", f"{total / positions.size * 1e9:.0f} ({positions.size / total / 1e6:.2f} M keys/s)"])
    print_table(
        f"Build phases ({positions.size:,} keys, t = 8; cpu s, best of {repeats} per phase)",
        ["phase", "cpu s", "ns/key"],
        rows,
    )


def bench_paper_layers() -> None:
    rows = []
    for name, n_positions, density, paper in (
        ("LeNet-300-100 fc1 (784x300, 8 % kept)", LENET_FC1_POSITIONS, LENET_DENSITY, 0.52),
        ("VGG-16 fc6 (25088x4096, 4 % kept)", FC6_POSITIONS, FC6_DENSITY, 22.8),
    ):
        positions = sparse_positions(n_positions, density)
        ids = np.random.default_rng(2).integers(0, 15, size=positions.size)
        table, enc_cpu, _ = cpu_timed(bloomier.encode_positions, positions, ids, n_positions, 8)
        _, dec_cpu, _ = cpu_timed(bloomier.decode_ids, table, n_positions, 15, workers=1)
        rows.append([name, f"{positions.size:,}", f"{enc_cpu:.2f}", table.seed, f"{dec_cpu:.2f}", paper])
    print_table(
        "Paper layers (t = 8, cpu s; decode on 1 core); paper = Weightless's time for the layer, desktop i7",
        ["layer", "nonzeros", "encode s", "seed used", "decode s", "paper s"],
        rows,
    )


# ----------------------------------------------------------------------------- decode


DECODE_RUNS = 3


def _decode_child(table_path: str, mode: str, workers: int) -> None:
    """Run in a fresh process: decode the fc6 table :data:`DECODE_RUNS` times; report speed and peak memory.

    Each run makes a new output array, as a caller would; the peak is over all runs. The
    helper processes' whole peak memory counts as extra: they exist only for the decode.
    """
    with np.load(table_path) as saved:
        params = {k: int(v) for k, v in json.loads(str(saved["params"])).items()}
        cells = unpack_bits(saved["cells"].tobytes(), params["t"], params["cells"])
    table = bloomier.BloomierTable.from_params(params, cells)
    k = 15
    codebook = np.linspace(-1, 1, k, dtype=np.float32)
    rss_before = _current_rss_bytes()
    runs = []
    for _ in range(DECODE_RUNS):
        start, start_cpu = time.perf_counter(), time.process_time() + _helpers_cpu_seconds()
        if mode == "ids":
            out = bloomier.decode_ids(table, params["n_positions"], k, workers=workers)
        else:
            out = bloomier.decode_values(table, params["n_positions"], codebook, workers=workers)
        runs.append((time.perf_counter() - start, time.process_time() + _helpers_cpu_seconds() - start_cpu))
        out_bytes = out.nbytes
        del out
    helper_pids = [helper.process.pid for helper in parallel._POOL._helpers if helper.alive]
    peak = _status_kib("VmHWM") * 1024
    helpers_peak = sum(_status_kib("VmHWM", pid) * 1024 for pid in helper_pids)
    best = min(runs)
    result = {
        "seconds": best[0],
        "cpu": best[1],
        "first": runs[0][0],
        "extra": peak - rss_before - out_bytes + helpers_peak,
        "helpers": helpers_peak,
        "out": out_bytes,
    }
    print(json.dumps(result))


def _helpers_cpu_seconds() -> float:
    """CPU time the live helper processes have used so far (utime + stime from /proc/PID/stat)."""
    total = 0
    for helper in parallel._POOL._helpers:
        if helper.alive:
            with open(f"/proc/{helper.process.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), after pid and comm
    return total / os.sysconf("SC_CLK_TCK")


def _current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str, pid: int | str = "self") -> int:
    """A memory figure of a process from /proc/PID/status (VmHWM: its peak since exec).

    ru_maxrss is no good here: Linux carries the parent's peak over to a spawned child.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def bench_decode() -> None:
    positions = sparse_positions(FC6_POSITIONS, FC6_DENSITY)
    ids = np.random.default_rng(3).integers(0, 15, size=positions.size)
    table = bloomier.encode_positions(positions, ids, FC6_POSITIONS, 8)
    float_tensor = FC6_POSITIONS * 4
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fc6.npz"
        np.savez(path, params=json.dumps(table.to_params()), cells=np.frombuffer(pack_bits(table.cells, 8), np.uint8))
        for mode in ("ids", "values"):
            for workers in (1, 2):
                child = subprocess.run(
                    [sys.executable, __file__, "--decode-child", str(path), mode, str(workers)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                result = json.loads(child.stdout.strip().splitlines()[-1])
                rows.append(
                    [
                        "decode_ids (uint8)" if mode == "ids" else "decode_values (float32)",
                        workers,
                        f"{result['seconds']:.2f}",
                        f"{result['first']:.2f}",
                        f"{result['cpu']:.2f}",
                        f"{FC6_POSITIONS / result['seconds'] / 1e6:.1f}",
                        f"{FC6_POSITIONS / result['cpu'] / 1e6:.1f}",
                        f"{result['out'] / 2**20:.0f}",
                        f"{max(result['extra'], 0) / 2**20:.1f}",
                        f"{result['helpers'] / 2**20:.1f}",
                        f"{100 * max(result['extra'], 0) / float_tensor:.1f} %",
                    ]
                )
    print_table(
        f"Decode VGG-16 fc6 ({FC6_POSITIONS:,} positions, {positions.size:,} nonzero, t = 8; "
        f"best of {DECODE_RUNS} runs in a fresh process, wall time)",
        [
            "call",
            "cores",
            "wall s",
            "first run wall s",
            "cpu s (with helpers)",
            "M positions/s (wall)",
            "M positions/s per cpu-s",
            "output MiB",
            "peak extra MiB",
            "of which helpers MiB",
            "extra / float32 tensor",
        ],
        rows,
    )


# ----------------------------------------------------------------------------- sizes


def bench_sizes(build_up_to: int) -> None:
    rows = []
    for n in (10**3, 3 * 10**3, 10**4, 3 * 10**4, 10**5, 3 * 10**5, 10**6, 3 * 10**6, 10**7):
        layout = bloomier.choose_layout(n)
        kind = "fuse" if layout.kind == bloomier.LAYOUT_FUSE else "classic"
        built = ""
        if n <= build_up_to:
            keys = np.arange(n, dtype=np.uint64) * 7
            table = bloomier.build_table(keys, np.zeros(n, dtype=np.uint8), 8)
            built = f"yes (seed {table.seed})"
        rows.append([f"{n:,}", kind, layout.segment_length, layout.segment_count, f"{layout.cells / n:.4f}", built])
    print_table("Table size m/n (cells per stored key)", ["n", "layout", "segment length", "segments", "m/n", "built"], rows)


# ----------------------------------------------------------------------------- sizing study


def peel_rate(n: int, layout: bloomier.Layout, trials: int, need: int) -> tuple[float, bool]:
    """Fraction of seeds whose hypergraph peels; stops early once ``need`` is out of reach."""
    keys = np.arange(n, dtype=np.uint64)
    ok = 0
    for trial in range(trials):
        hashes = position_hash(keys, 1000 + trial)
        triples = bloomier._triples_in_order(hashes, bloomier._sweep_order(hashes, layout), layout)
        ok += bloomier._peel(triples, layout.cells) is not None
        if trial + 1 - ok > trials - need:
            return ok / (trial + 1), False
    return ok / trials, True


def trials_for(n: int) -> int:
    return 40 if n <= 1 << 14 else 20 if n <= 1 << 18 else 10 if n <= 1 << 20 else 5


def smallest_cells(n: int, kind: int, length: int, target: float = 0.9, limit: float = math.inf) -> float:
    """Fewest cells (whole segments / blocks) for which >= target of the seeds peel.

    Gives up (returns inf) past ``limit`` cells: a size another candidate already beats.
    """
    trials = trials_for(n)
    need = math.ceil(target * trials)
    if kind == bloomier.LAYOUT_FUSE:
        count = max(3, math.ceil(1.10 * n / length))
        while not peel_rate(n, bloomier.Layout(kind, length, count), trials, need)[1]:
            count += max(1, count // 200)
            if count * length > limit:
                return math.inf
        return count * length
    block = max(1, math.ceil(1.20 * n / 3))
    while not peel_rate(n, bloomier.Layout(kind, block, 3), trials, need)[1]:
        block += max(1, block // 400)
    return 3 * block


def sizing_study(buckets: list[int]) -> None:
    """For each bucket, the smallest reliable size at both ends, per layout and segment length."""
    for bucket in buckets:
        ends = [1 << (bucket - 1), (1 << bucket) - 1] if bucket > 1 else [1]
        result: dict[str, object] = {"bucket": bucket, "n": ends}
        if bucket <= 21:
            cells = [smallest_cells(n, bloomier.LAYOUT_CLASSIC, 0) for n in ends]
            result["classic_factor"] = max(math.ceil(c * 65536 / n) for c, n in zip(cells, ends, strict=True))
        # Around Graf & Lemire's segment length for this n; the winners were never far from it.
        suggested = math.floor(math.log(ends[0]) / math.log(3.33) + 2.25) if ends[0] > 1 else 1
        widest = suggested if bucket >= 20 else suggested + 2
        best = math.inf  # best factor so far, as cells per key
        for length_log2 in sorted(range(max(1, suggested - 2), min(18, widest) + 1), key=lambda b: abs(b - suggested + 1)):
            if 3 << length_log2 > 3 * ends[-1] + 64:
                continue
            cells = [
                smallest_cells(n, bloomier.LAYOUT_FUSE, 1 << length_log2, limit=best * n + (1 << length_log2)) for n in ends
            ]
            if math.inf in cells:
                result[f"fuse_L{length_log2}"] = None
                continue
            # Fuse sizes round the capacity down to whole segments, so floor here.
            factor = max(c * 65536 // n for c, n in zip(cells, ends, strict=True))
            result[f"fuse_L{length_log2}"] = factor
            best = min(best, factor / 65536)
        print(json.dumps(result), flush=True)


def verify_sizing(buckets: list[int], trials: int) -> None:
    rows = []
    for bucket in buckets:
        for n in sorted({1 << (bucket - 1), (1 << bucket) - 1}):
            layout = bloomier.choose_layout(n)
            rate, _ = peel_rate(n, layout, trials if n < 1 << 20 else max(5, trials // 4), 0)
            kind = "fuse" if layout.kind == bloomier.LAYOUT_FUSE else "classic"
            rows.append([bucket, f"{n:,}", kind, layout.segment_length, f"{layout.cells / n:.4f}", f"{rate:.2f}"])
    print_table("First-seed peel rate of the chosen sizes", ["bucket", "n", "layout", "L", "m/n", "p"], rows)


def parse_buckets(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["hash", "build", "paper", "decode", "sizes"])
    parser.add_argument("--quick", action="store_true", help="skip the 4e6-key build and the 1e7 size check")
    parser.add_argument("--sizing-study", metavar="B1-B2")
    parser.add_argument("--verify-sizing", metavar="B1-B2")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--decode-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decode_child:
        _decode_child(args.decode_child[0], args.decode_child[1], int(args.decode_child[2]))
        return
    if args.sizing_study:
        sizing_study(parse_buckets(args.sizing_study))
        return
    if args.verify_sizing:
        verify_sizing(parse_buckets(args.verify_sizing), args.trials)
        return
    unknown = set(args.parts) - {"hash", "build", "phases", "paper", "decode", "sizes"}
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    timed = {"build", "phases", "paper", "decode"} & set(args.parts)
    host_checks = [host_check("before")] if timed else []
    for part in args.parts:
        if part == "hash":
            bench_hash()
        elif part == "build":
            bench_build([10**4, 10**6] if args.quick else [10**4, 10**6, 4 * 10**6])
        elif part == "phases":
            bench_build_phases()
        elif part == "paper":
            bench_paper_layers()
        elif part == "decode":
            bench_decode()
        elif part == "sizes":
            bench_sizes(10**6 if args.quick else 10**7)
    if timed:
        print_host_checks(host_checks + [host_check("after")])


if __name__ == "__main__":
    main()
