"""Measure value-aware, uniform (DPRed) and row-wise quantization; print a markdown section for docs/RESULTS.md.

1. Value-aware quantization against plain k-means and plain uniform at 2, 3 and 4 bits on every sample model
   (all Gemm/Conv weights), WITHOUT retraining: MNIST test accuracy (onnxruntime, 10,000 images) and the
   bytes of the weights as stored (``outlier`` codec, and the best exact clustered codec for comparison).
2. DPRed: the same weights on 8-bit (and 4-bit) uniform grids, per tensor and per channel, plus a pruned
   LeNet-300-100; bytes of ``dpred`` against ``raw``, ``bloomier``, the exact clustered codecs and ``outlier``.
3. Row-wise: a synthetic embedding table at 8, 4 and 2 bits: bytes, error against the s/2 bound.

Every number is measured by this run; the section goes to stdout, progress to stderr.

    .venv/bin/python scripts/results_quantization.py [--models lenet-300-100] [--fractions 0.01 0.03]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightless_cli.codecs.container import Blob, TensorRecord, raw_record, write_blob  # noqa: E402
from weightless_cli.data.datasets import load_dataset  # noqa: E402
from weightless_cli.errors import UsageError  # noqa: E402
from weightless_cli.model import OnnxModel, Selection, WeightTensor  # noqa: E402
from weightless_cli.stages.evaluate import evaluate, model_input_shape  # noqa: E402
from weightless_cli.stages.prune import prune_array  # noqa: E402
from weightless_cli.stages.uniform import encode_record, quantize_rowwise  # noqa: E402
from weightless_cli.stages.value_aware import quantize_values  # noqa: E402

WEIGHTS = Selection(min_params=1)  # every Gemm/Conv weight (role "weight"), however small
EMPTY_BLOB = len(write_blob(Blob(b"", [])))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stored_bytes(records: list[TensorRecord]) -> int:
    """What the records add to a blob: frames, tables and payloads, LZMA2 applied where it is smaller."""
    return len(write_blob(Blob(b"", records))) - EMPTY_BLOB


def section_bytes(records: list[TensorRecord]) -> int:
    """The codecs' own payload bytes, before the container's compression."""
    return sum(len(data) for record in records for data in record.sections.values())


def clustered_record(tensor: WeightTensor, codec: str) -> TensorRecord | None:
    """A record from the clustered-tensor codecs of the encode stage (None when the tensor has too many values)."""
    from weightless_cli.stages.encode import encode_tensor

    try:
        return encode_tensor(tensor, codec)[0]
    except UsageError:
        return None


def total(records: list[TensorRecord | None], measure: Callable[[list[TensorRecord]], int]) -> int | None:
    return None if any(record is None for record in records) else measure(records)


def fmt_bytes(value: int | None, params: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:,} ({8 * value / params:.2f} b/w)"


def quantized_model(source: Path, method: str, bits: int, fraction: float = 0.0,
                    per_channel: bool = False) -> tuple[OnnxModel, list[WeightTensor]]:
    model = OnnxModel.load(source)
    tensors = WEIGHTS.apply(model)
    for tensor in tensors:
        tensor.set_array(quantize_values(tensor.array(), method, bits, per_channel, fraction))
    return model, tensors


# --- 1. value-aware quantization ------------------------------------------------------------------------------


def value_aware_section(models: list[Path], bit_widths: list[int], fractions: list[float]) -> list[str]:
    lines = ["### Value-aware quantization (no retraining)", "",
             "All Gemm/Conv weights of each model; the largest-magnitude fraction F kept in float16, the rest on "
             "2^b k-means clusters (zeros stay zero) or a symmetric b-bit uniform grid (2^b − 1 levels) scaled to "
             "the largest remaining weight. Accuracy: MNIST test set, 10,000 images, onnxruntime. *outlier codec*: "
             "bytes of all these weights as stored in a blob (`encode --codec outlier`, LZMA2 by the container "
             "where it is smaller), with bits per weight; *best clustered codec*: the smallest of `sparse`, "
             "`dense`, `csr-huffman` (`encode --codec auto`) on the same tensors. Biases stay float32 and are "
             "not counted.", ""]
    for source in models:
        data = load_dataset("mnist", model_input_shape(source))
        baseline = evaluate(source, data).accuracy
        params = sum(t.params for t in WEIGHTS.apply(OnnxModel.load(source)))
        log(f"{source.stem}: fp32 {100 * baseline:.2f} %, {params:,} weights")
        lines += [f"#### {source.stem} ({params:,} weights; float32 accuracy {100 * baseline:.2f} %, "
                  f"{4 * params:,} bytes)", "",
                  "| bits | method | F | accuracy | Δ vs float32 | outlier codec bytes | best clustered codec bytes |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for bits in bit_widths:
            for method in ("kmeans", "uniform"):
                for fraction in [0.0, *fractions]:
                    model, tensors = quantized_model(source, method, bits, fraction)
                    accuracy = evaluate(model.proto.SerializeToString(), data).accuracy
                    outliers = stored_bytes([encode_record(t, "outlier")[0] for t in tensors])
                    clustered = total([clustered_record(t, "auto") for t in tensors], stored_bytes)
                    log(f"  {bits} bits {method} F={fraction:g}: {100 * accuracy:.2f} %, {outliers:,} B")
                    lines.append(f"| {bits} | {method} | {100 * fraction:g} % | {100 * accuracy:.2f} % | "
                                 f"{100 * (accuracy - baseline):+.2f} pp | {fmt_bytes(outliers, params)} | "
                                 f"{fmt_bytes(clustered, params)} |")
        lines.append("")
    return lines


# --- 2. DPRed ------------------------------------------------------------------------------------------------


def codec_row(label: str, tensors: list[WeightTensor], accuracy: float | None) -> str:
    params = sum(t.params for t in tensors)
    raw = [raw_record(t.name, t.array(), t.dtype) for t in tensors]
    dpred = [encode_record(t, "dpred")[0] for t in tensors]
    cells = [f"{section_bytes(raw):,}", fmt_bytes(stored_bytes(raw), params),
             fmt_bytes(section_bytes(dpred), params), fmt_bytes(stored_bytes(dpred), params),
             fmt_bytes(total([clustered_record(t, "bloomier") for t in tensors], stored_bytes), params),
             fmt_bytes(total([clustered_record(t, "auto") for t in tensors], stored_bytes), params),
             fmt_bytes(stored_bytes([encode_record(t, "outlier")[0] for t in tensors]), params)]
    shown = "—" if accuracy is None else f"{100 * accuracy:.2f} %"
    return f"| {label} | {shown} | " + " | ".join(cells) + " |"


def pruned_uniform(source: Path, sparsity: float, bits: int) -> tuple[OnnxModel, list[WeightTensor]]:
    model = OnnxModel.load(source)
    tensors = WEIGHTS.apply(model)
    for tensor in tensors:
        tensor.set_array(quantize_values(prune_array(tensor.array(), sparsity), "uniform", bits))
    return model, tensors


def dpred_section(models: list[Path]) -> list[str]:
    lines = ["### DPRed (`dpred`) against the other codecs", "",
             "The same weights (all Gemm/Conv weights of a model) on a uniform symmetric grid, then stored by each "
             "codec. *dpred*: the codec's own bytes (3- or 4-bit header per group of 16, then sign + magnitude at "
             "the group's width), then as stored in a blob (LZMA2 on `headers`/`values` where smaller). "
             "*bloomier*: `encode --codec bloomier` (fp-bits 6; lossy: zeros may read back as false positives; "
             "n/a when a tensor has more than 65,535 distinct values). *best clustered*: smallest exact clustered "
             "codec (`sparse`/`dense`/`csr-huffman`). *outlier*: the value-aware codec. Sizes as `bytes (bits per "
             "weight)`; accuracy on the MNIST test set without retraining.", "",
             "| weights | accuracy | raw float32 | raw in blob (LZMA2) | dpred | dpred in blob | bloomier | "
             "best clustered | outlier |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for source in models:
        data = load_dataset("mnist", model_input_shape(source))
        for bits, per_channel in ((8, False), (8, True), (4, False), (4, True)):
            model, tensors = quantized_model(source, "uniform", bits, per_channel=per_channel)
            accuracy = evaluate(model.proto.SerializeToString(), data).accuracy
            label = f"{source.stem}, {bits}-bit {'per channel' if per_channel else 'per tensor'}"
            log(f"  {label}")
            lines.append(codec_row(label, tensors, accuracy))
        if source.stem == "lenet-300-100":
            model, tensors = pruned_uniform(source, 0.9, 8)
            accuracy = evaluate(model.proto.SerializeToString(), data).accuracy
            lines.append(codec_row(f"{source.stem} pruned 90 % (no retraining), 8-bit per tensor", tensors,
                                   accuracy))
    lines.append("")
    return lines


# --- 3. row-wise embeddings ----------------------------------------------------------------------------------


def embedding_table(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Rows of different spreads around different centres, as trained embedding tables have."""
    rng = np.random.default_rng(seed)
    spread = 10.0 ** rng.uniform(-2.5, -0.5, (rows, 1))
    return (rng.normal(size=(rows, dim)) * spread + rng.normal(0, 0.05, (rows, 1))).astype(np.float32)


def rowwise_section(rows: int, dim: int) -> list[str]:
    from weightless_cli.codecs import rowwise

    table = embedding_table(rows, dim)
    raw = stored_bytes([raw_record("table", table)])
    lines = ["### Row-wise embedding tables (`rowwise`)", "",
             f"A synthetic float32 table of {rows:,} × {dim} (row spreads from 0.003 to 0.3 around random centres), "
             "quantized with `quantize --method rowwise --bits B` and stored with `encode --codec rowwise` "
             "(B-bit integers + float16 scale and bias per row). *error / s*: the largest |w − q| divided by its "
             "row's scale (the bound is 0.5, plus the final rounding to float32). Encode/decode times on this "
             "machine (2 cores shared with other jobs).", "",
             "| bits | bytes in blob | bits per value | vs float32 | max error / s | RMS error | exceptions | "
             "encode s | decode s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| float32 | {raw:,} | {8 * raw / table.size:.2f} | 1.0× | — | — | — | — | — |"]
    for bits in (8, 4, 2):
        quantized = quantize_rowwise(table, bits)
        scales, _ = rowwise.row_grid(table.astype(np.float64), bits, "float32")
        error = np.abs(quantized.astype(np.float64) - table)
        started = time.perf_counter()
        params, sections = rowwise.encode(quantized)
        encoded = time.perf_counter() - started
        record = TensorRecord("table", table.shape, "float32", "rowwise", params, sections)
        started = time.perf_counter()
        decoded = rowwise.decode(params, sections, table.shape, "float32")
        seconds = time.perf_counter() - started
        assert np.array_equal(decoded.view(np.uint32), quantized.view(np.uint32))
        size = stored_bytes([record])
        log(f"  rowwise {bits} bits: {size:,} B")
        lines.append(f"| {bits} | {size:,} | {8 * size / table.size:.2f} | {raw / size:.1f}× | "
                     f"{float((error / scales[:, None]).max()):.3f} | {float(np.sqrt(np.mean(error**2))):.2e} | "
                     f"{params['exceptions']} | {encoded:.2f} | {seconds:.2f} |")
    lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="sample model names (default: every sample_models/*.onnx)")
    parser.add_argument("--bits", nargs="*", type=int, default=[2, 3, 4])
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.005, 0.01, 0.03])
    parser.add_argument("--table", nargs=2, type=int, default=[100_000, 64], metavar=("ROWS", "DIM"))
    args = parser.parse_args()
    names = args.models or sorted(path.stem for path in (ROOT / "sample_models").glob("*.onnx"))
    models = [ROOT / "sample_models" / f"{name}.onnx" for name in names]
    sections = value_aware_section(models, args.bits, args.fractions)
    sections += dpred_section(models)
    sections += rowwise_section(*args.table)
    print("## Quantization methods: value-aware, uniform (DPRed), row-wise\n")
    print("Reproduce with `.venv/bin/python scripts/results_quantization.py`. Every method decodes bit-exactly "
          "to the quantized model (`dpred`, `outlier` and `rowwise` are exact codecs); only the quantization "
          "itself is lossy.\n")
    print("\n".join(sections))


if __name__ == "__main__":
    main()
