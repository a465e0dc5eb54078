"""Reproduce docs/RESULTS.md: run every recipe in recipes/, the t sweep, and the other result sections.

Run through `make results` (which fetches MNIST first). Writes results/<model>.wl (kilobytes;
committed, so anyone can `weightless decode-and-eval` them), results/<model>.json (the full
compress report) and docs/RESULTS.md. Every number in the document is measured by this run.

    .venv/bin/python scripts/make_results.py [--only lenet-300-100] [--skip-sweep] [--skip-sections]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightless_cli.stages.compress import compress_file, load_recipe, sweep_t  # noqa: E402

RESULTS = ROOT / "results"
DOC = ROOT / "docs" / "RESULTS.md"

# Published figures, all from the papers (test error, compression of the weights' storage).
PUBLISHED = {
    "lenet-300-100": [("Deep Compression (Han et al. 2016)", "40×", "1.58 %")],
    "lenet5": [("Deep Compression (Han et al. 2016)", "39×", "0.74 %"),
               ("Weightless (Reagen et al. 2018)", "382×", "1.0 %")],
}
# First-milestone targets (issue #5): at least this ratio at most this test error, whole blob vs fp32 file.
TARGETS = {"lenet-300-100": (100.0, 0.019), "lenet5": (200.0, 0.010)}
SWEEP_MODEL, SWEEP_LAYER, SWEEP_TS = "lenet-300-100", "fc1.weight", [6, 7, 8, 9, 10, 11, 12]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def step_logger(name: str):
    def show(row: dict) -> None:
        where = f"{row['layer']}: " if row["layer"] else ""
        log(f"  [{name} {row['seconds']:>6.1f}s] {where}{row['step']:<44} error {100 * row['error']:.2f}%")
    return show


def model_of(name: str) -> str:
    """recipes/lenet5.toml and recipes/lenet5.bloomier.toml both compress sample_models/lenet5.onnx."""
    return name.split(".")[0]


def run_recipe(recipe_path: Path) -> dict:
    name = recipe_path.stem
    recipe = load_recipe(recipe_path)
    log(f"compress {model_of(name)} with {recipe_path.relative_to(ROOT)}")
    report = compress_file(ROOT / "sample_models" / f"{model_of(name)}.onnx", RESULTS / f"{name}.wl",
                           "mnist:train", "mnist:test", recipe, step_logger(name))
    report["recipe_text"] = recipe_path.read_text()
    report["recipe_description"] = recipe.description
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def model_section(name: str, report: dict) -> list[str]:
    file = report["file"]
    lines = [f"### {name}", "", f"> {report['recipe_description']}", "",
             f"`weightless compress sample_models/{model_of(name)}.onnx --data mnist --recipe recipes/{name}.toml "
             f"-o results/{name}.wl` — {report['seconds']:.0f} s on this machine.", "",
             f"- **Blob: {file['blob_bytes']:,} bytes, {file['ratio']:.1f}× smaller than the fp32 ONNX file "
             f"({file['input_bytes']:,} bytes).** Encoded weights alone: "
             f"{file['encoded_weight_bytes_before']:,} → {file['encoded_weight_bytes_after']:,} bytes "
             f"({file['weights_ratio']:.1f}×).",
             f"- **Test error (10,000 MNIST test images, onnxruntime, decoded from the blob): "
             f"{pct(report['error_before'])} → {pct(report['error_after'])}.**", "",
             "| tensor | codec | params | nonzeros | K | t | bits | bits/nonzero | expected FP | bytes | ratio |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["tensors"]:
        if row["codec"] == "raw":
            lines.append(f"| {row['name']} | raw (lzma) | {row['params']:,} | | | | | | | {row['encoded_bytes']:,} | "
                         f"{row['original_bytes'] / row['encoded_bytes']:.1f}× |")
            continue
        lines.append(
            f"| {row['name']} | {row['codec']} | {row['params']:,} | {row['nonzeros']:,} | {row['k']} | {row.get('t', '')} | "
            f"{row['bits']:,} | {row['bits_per_nonzero']:.2f} | {row['expected_false_positives']:.1f} | "
            f"{row['encoded_bytes']:,} | {row['ratio']:.1f}× |")
    lines += ["", "Accuracy and size after every step:", "",
              "| layer | step | test error | weights bytes |", "| --- | --- | ---: | ---: |"]
    for row in report["steps"]:
        lines.append(f"| {row['layer'] or ''} | {row['step']} | {pct(row['error'])} | {row['weights_bytes']:,} |")
    return lines + [""]


def comparison_table(reports: dict[str, dict]) -> list[str]:
    lines = ["| model | method | compression | test error |", "| --- | --- | ---: | ---: |"]
    shown = set()
    for name, report in reports.items():
        model = model_of(name)
        if model not in shown:
            shown.add(model)
            lines.append(f"| {model} | original (fp32 ONNX) | 1× | {pct(report['error_before'])} |")
            for method, ratio, error in PUBLISHED.get(model, []):
                lines.append(f"| {model} | {method}, published | {ratio} | {error} |")
        codecs = sorted({row["codec"] for row in report["tensors"] if row["codec"] != "raw"})
        lines.append(f"| {model} | **this tool: `compress --recipe recipes/{name}.toml`** ({', '.join(codecs)}) | "
                     f"**{report['file']['ratio']:.1f}×** | **{pct(report['error_after'])}** |")
    lines += ["", "Published ratios count the weights' storage; ours are the whole blob (graph, biases, "
              "headers and checksums included) against the whole fp32 ONNX file.", "", "Targets:", ""]
    for name, report in reports.items():
        if name not in TARGETS:
            continue
        ratio, error = TARGETS[name]
        got_ratio, got_error = report["file"]["ratio"], report["error_after"]
        verdict = "met" if got_ratio >= ratio and got_error <= error else "**not met**"
        lines.append(f"- {name}: ≥ {ratio:.0f}× at ≤ {pct(error)} — measured {got_ratio:.1f}× at {pct(got_error)}: "
                     f"{verdict}.")
    return lines + [""]


def sweep_section(rows: list[dict]) -> list[str]:
    lines = [f"## t sweep: {SWEEP_MODEL} {SWEEP_LAYER}", "",
             f"The layers before it compressed as in the recipe, {SWEEP_LAYER} pruned and clustered once; then for "
             "each t it is encoded, replaced by its decoded weights and frozen, and the later layers retrained "
             "as the recipe says.", "",
             "| t | bytes | bits/nonzero | expected false positives | test error before encoding | "
             "test error after retraining |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['t']} | {row['bytes']:,} | {row['bits_per_nonzero']:.2f} | "
                     f"{row['expected_false_positives']:.0f} | {pct(row['error_before_encoding'])} | "
                     f"{pct(row['error_after_retraining'])} |")
    lines.append("")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        axis.plot([r["bytes"] for r in rows], [100 * r["error_after_retraining"] for r in rows], "o-")
        for row in rows:
            axis.annotate(f"t={row['t']}", (row["bytes"], 100 * row["error_after_retraining"]))
        axis.set_xlabel(f"{SWEEP_LAYER} bytes")
        axis.set_ylabel("test error after retraining (%)")
        figure.tight_layout()
        figure.savefig(ROOT / "docs" / "t_sweep.png", dpi=100)
        lines += ["![t sweep](t_sweep.png)", ""]
    except ImportError:
        lines += ["(Install matplotlib to also get a plot.)", ""]
    return lines


def other_sections(reuse: bool) -> list[str]:
    """Sections printed by scripts/results_*.py (codec comparisons, quantization methods, decomposition),
    saved to results/sections/<script>.md; with ``reuse`` a saved section is taken as it is."""
    sections = RESULTS / "sections"
    sections.mkdir(exist_ok=True)
    lines = []
    for script in sorted((ROOT / "scripts").glob("results_*.py")):
        saved = sections / f"{script.stem}.md"
        if not (reuse and saved.exists()):
            log(f"running {script.name}")
            done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{script.name} failed:\n{done.stderr}")
            saved.write_text(done.stdout.rstrip() + "\n")
        lines += [saved.read_text().rstrip(), ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run just this model's recipe")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-sections", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="use results/<recipe>.json from an earlier run instead of compressing again")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    started = time.perf_counter()
    recipes = sorted((ROOT / "recipes").glob("*.toml"))
    reports = {}
    for path in recipes:
        saved = RESULTS / f"{path.stem}.json"
        if args.reuse and saved.exists():
            reports[path.stem] = json.loads(saved.read_text())
        elif args.only in (None, path.stem):
            reports[path.stem] = run_recipe(path)
    sweep = []
    sweep_file = RESULTS / "t_sweep.json"
    if args.reuse and sweep_file.exists():
        sweep = json.loads(sweep_file.read_text())
    elif not args.skip_sweep:
        recipe = load_recipe(ROOT / "recipes" / f"{SWEEP_MODEL}.toml")
        log(f"t sweep on {SWEEP_MODEL} {SWEEP_LAYER}")
        sweep = sweep_t(ROOT / "sample_models" / f"{SWEEP_MODEL}.onnx", "mnist:train", "mnist:test", recipe,
                        SWEEP_LAYER, SWEEP_TS, step_logger("sweep"))
        sweep_file.write_text(json.dumps(sweep, indent=1) + "\n")
    lines = ["# Results", "",
             "Everything here is measured by `make results` (scripts/make_results.py) on real MNIST (60,000 train / "
             "10,000 test images) with onnxruntime; the blobs are committed in `results/`, so "
             "`weightless decode-and-eval results/lenet5.wl --data mnist` reproduces each error figure. "
             f"Machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
             "2 cores.", "",
             "## Compression at equal accuracy, against the published numbers", ""]
    lines += comparison_table(reports)
    lines += ["## The Weightless loop per model", ""]
    for name, report in reports.items():
        lines += model_section(name, report)
    if sweep:
        lines += sweep_section(sweep)
    if not args.skip_sections:
        lines += other_sections(args.reuse)
    lines.append(f"_Generated in {time.perf_counter() - started:.0f} s._")
    DOC.write_text("\n".join(lines) + "\n")
    log(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
