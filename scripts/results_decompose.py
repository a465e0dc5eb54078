"""Measure low-rank decomposition on the sample models; print a markdown section for docs/RESULTS.md.

For each sample model present (lenet5, digit-recognizer, lenet-300-100) and each rank rule,
`decompose` runs as `weightless decompose` would, then: parameters, multiply-adds and
onnxruntime latency before/after (median of --runs runs, batch 1 and 256, one thread),
MNIST test error of the original, of the decomposed model as is, and after a short retrain
of all its weights (`retrain_model`, --epochs on mnist:train). Every number is measured
by this run; the section goes to stdout, progress to stderr.

    .venv/bin/python scripts/results_decompose.py [--models digit-recognizer] [--epochs 1] [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightless_cli.data.datasets import load_dataset  # noqa: E402
from weightless_cli.model import OnnxModel, Selection  # noqa: E402
from weightless_cli.stages.decompose import RankSpec, decompose_file  # noqa: E402
from weightless_cli.stages.evaluate import evaluate  # noqa: E402
from weightless_cli.stages.retrain import TrainSettings, retrain_model  # noqa: E402

MODELS = ("lenet5", "digit-recognizer", "lenet-300-100")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def variants(source: Path) -> list[tuple[str, RankSpec, tuple[str, ...]]]:
    """(label, rank rule, --exclude globs) for each configuration measured on ``source``."""
    first_conv, classifier = edge_layers(source)
    # Leaving the 10-way classifier whole: EVBMF keeps one component of it, and a rank-1
    # classifier can only ever tell two classes apart. The first conv sees one input
    # channel, so EVBMF's output rank is all that is left to cut there.
    keep = (classifier,) if classifier else ()
    found = [("EVBMF, all layers", RankSpec("vbmf"), ()),
             ("EVBMF, classifier kept", RankSpec("vbmf"), keep)]
    if first_conv:
        found.append(("EVBMF, first conv and classifier kept", RankSpec("vbmf"), (first_conv, *keep)))
    return [*found, ("energy 0.95, classifier kept", RankSpec("energy", 0.95), keep)]


def edge_layers(source: Path) -> tuple[str | None, str | None]:
    """The weights of the first Conv and of the last Gemm/MatMul (the logits) in graph order."""
    graph = OnnxModel.load(source).proto.graph
    stored = {t.name for t in graph.initializer}
    convs = [node.input[1] for node in graph.node if node.op_type == "Conv" and node.input[1] in stored]
    dense = [name for node in graph.node if node.op_type in ("Gemm", "MatMul") for name in node.input[:2]
             if name in stored]
    return (convs[0] if convs else None), (dense[-1] if dense else None)


def retrained_error(path: Path, train, test, settings: TrainSettings) -> tuple[float, float]:
    """(test error after retraining every weight of ``path``, seconds the retraining took)."""
    model = OnnxModel.load(path)
    started = time.perf_counter()
    retrain_model(model, train.x, train.y, (), settings)
    seconds = time.perf_counter() - started
    return evaluate(model.proto.SerializeToString(), test).error, seconds


def measure(source: Path, label: str, spec: RankSpec, exclude: tuple[str, ...], train, test,
            settings: TrainSettings, runs: int, folder: Path) -> dict:
    target = folder / f"{source.stem}.{''.join(c if c.isalnum() else '_' for c in label)}.onnx"
    # Latency of the original and the decomposed model, timed turn by turn (see measure_latencies).
    report = decompose_file(source, target, Selection(exclude=exclude), spec, latency_runs=runs)
    error_decomposed = evaluate(target, test).error
    error_retrained, seconds = retrained_error(target, train, test, settings)
    log(f"  {label}: error {100 * error_decomposed:.2f} % as is, {100 * error_retrained:.2f} % retrained ({seconds:.0f} s)")
    return {"label": label, "report": report, "error_decomposed": error_decomposed,
            "error_retrained": error_retrained, "spec": spec, "exclude": exclude}


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def latency_cell(summary: dict, batch: str) -> str:
    """'before → after' median milliseconds, with the fastest runs in brackets."""
    median_before, median_after = summary.get("latency_ms_before"), summary.get("latency_ms_after")
    if not median_before or batch not in median_before:
        return "—"
    fast_before, fast_after = summary["latency_min_ms_before"][batch], summary["latency_min_ms_after"][batch]
    return (f"{median_before[batch]:.3g} → {median_after[batch]:.3g} "
            f"({fast_before:.3g} → {fast_after:.3g})")


def command(model: str, spec: RankSpec, exclude: tuple[str, ...]) -> str:
    option = "--vbmf" if spec.method == "vbmf" else f"--{spec.method} {spec.value:g}"
    excluded = "".join(f" --exclude {glob}" for glob in exclude)
    return f"weightless decompose sample_models/{model}.onnx -o {model}.lowrank.onnx {option}{excluded}"


def model_section(model: str, original: dict, rows: list[dict], settings: TrainSettings) -> list[str]:
    first = rows[0]["report"]["model"]
    lines = [f"### {model}", "",
             f"Original: {first['params_before']:,} params, {first['macs_before']:,} MACs per image; test error "
             f"{pct(original['error'])}, and {pct(original['error_retrained'])} after the same retraining "
             "(the control: what retraining alone does).", "",
             "| ranks | params | MACs / image | latency batch 1, ms | latency batch 256, ms | error as is | "
             f"error after {settings.epochs} epoch retrain |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| original | {first['params_before']:,} | {first['macs_before']:,} | | | {pct(original['error'])} | "
             f"{pct(original['error_retrained'])} |"]
    for row in rows:
        m = row["report"]["model"]
        lines.append(
            f"| {row['label']} | {m['params_after']:,} ({m['params_before'] / m['params_after']:.1f}× fewer) | "
            f"{m['macs_after']:,} ({m['macs_before'] / m['macs_after']:.1f}× fewer) | {latency_cell(m, '1')} | "
            f"{latency_cell(m, '256')} | {pct(row['error_decomposed'])} | {pct(row['error_retrained'])} |")
    lines += ["", "Ranks per layer (Tucker-2: R_in, R_out; SVD: r) and what each layer kept:", "",
              "| layer | shape | " + " | ".join(row["label"] for row in rows) + " |",
              "| --- | --- | " + " | ".join("---" for _ in rows) + " |"]
    tensors = [layer["tensor"] for layer in rows[0]["report"]["layers"]]
    for tensor in tensors:
        cells = []
        for row in rows:
            layer = next((x for x in row["report"]["layers"] if x["tensor"] == tensor), None)
            if layer is None:
                cells.append("kept (excluded)")
            elif layer["decomposed"]:
                cells.append(f"{layer['kind']} {layer['ranks']}: {layer['params_before']:,} → "
                             f"{layer['params_after']:,}")
            else:
                cells.append(f"kept ({layer['reason'].split(' (')[0]})")
        shape = next(x["shape"] for x in rows[0]["report"]["layers"] if x["tensor"] == tensor)
        lines.append(f"| {tensor} | {'×'.join(map(str, shape))} | " + " | ".join(cells) + " |")
    lines += ["", "Commands:", ""] + [f"    {command(model, row['spec'], row['exclude'])}" for row in rows] + [""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4, help="retraining learning rate (Adam)")
    parser.add_argument("--runs", type=int, default=20, help="latency runs per batch size (median)")
    args = parser.parse_args()
    train, test = load_dataset("mnist:train"), load_dataset("mnist:test")
    settings = TrainSettings(epochs=args.epochs, lr=args.lr)
    sections = []
    with tempfile.TemporaryDirectory(prefix="weightless-decompose-") as scratch:
        for model in args.models:
            source = ROOT / "sample_models" / f"{model}.onnx"
            if not source.exists():
                log(f"{source} is not there; skipped")
                continue
            log(f"{model}:")
            original = {"error": evaluate(source, test).error,
                        "error_retrained": retrained_error(source, train, test, settings)[0]}
            log(f"  original: error {100 * original['error']:.2f} %, {100 * original['error_retrained']:.2f} % retrained")
            rows = [measure(source, label, spec, exclude, train, test, settings, args.runs, Path(scratch))
                    for label, spec, exclude in variants(source)]
            sections += model_section(model, original, rows, settings)
    print("## Low-rank decomposition (`weightless decompose`)\n")
    print("Tucker-2 for convolutions and truncated SVD for fully connected layers (Kim et al. 2016), ranks "
          "by empirical VBMF on each kernel's mode unfoldings or by the share of singular-value energy kept; "
          "a layer is replaced only when that saves parameters. Test error on the 10,000 MNIST test images "
          f"(onnxruntime); retraining trains every weight of the graph for {args.epochs} epoch(s) "
          f"on mnist:train (Adam, lr {args.lr:g}, batch 128, seed 0). Latency: onnxruntime CPU, one thread, "
          f"original and decomposed model timed turn by turn, {args.runs} runs each after two warm-up runs; the "
          "median, and in brackets the fastest run, before → after. Measured on "
          f"{platform.machine()} ({platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores) while other "
          "jobs shared it: runs that a time slice cut short make the median jump between modes, so the "
          "fastest run is the steadier comparison. MACs count Conv/Gemm/MatMul multiply-adds for one image. Reproduce with "
          "`.venv/bin/python scripts/results_decompose.py`.\n")
    print("\n".join(sections))


if __name__ == "__main__":
    main()
