"""Codec comparison for docs/RESULTS.md (issue #6): every codec on the identical clustered tensors.

The tensors are the pruned and clustered layers inside results/<model>.wl (made by the
recipes; decoded exactly, so each codec sees the same values). Prints a markdown section.

    .venv/bin/python scripts/results_codecs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightless_cli.codecs.clustered import sparse_code  # noqa: E402
from weightless_cli.codecs.container import load_blob  # noqa: E402
from weightless_cli.codecs.entropy import order0_bound_bits  # noqa: E402
from weightless_cli.stages.decode import decode_blob, decode_record  # noqa: E402
from weightless_cli.stages.encode import encode_tensor  # noqa: E402

CODECS = [("sparse", {}), ("csr-huffman", {}), ("dense", {}), ("bloomier", {"fp_bits": 4}),
          ("bloomier", {"fp_bits": 6}), ("bloomier", {"fp_bits": 8}), ("bloomier", {"fp_bits": 10})]


def compare(model_name: str) -> list[str]:
    path = ROOT / "results" / f"{model_name}.wl"
    blob = load_blob(path)
    model = decode_blob(blob, path)
    lines = [f"### {model_name} (tensors from `results/{model_name}.wl`)", "",
             "| tensor | params | nonzeros | K | order-0 bound bits/nz | codec | bits/nonzero | bytes | ratio | "
             "errors introduced |", "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for record in blob.tensors:
        if record.codec == "raw":
            continue
        tensor = model.weight(record.name)
        values = decode_record(record)
        code = sparse_code(values)
        if code.positions.size == 0:
            continue
        bound = order0_bound_bits(code) / code.positions.size
        rows = []
        for codec, options in CODECS:
            encoded, row = encode_tensor(tensor, codec, t=None, fp_bits=options.get("fp_bits"), seed=0)
            decoded = decode_record(encoded).ravel()
            errors = int(np.count_nonzero(decoded != values.ravel()))
            label = codec + (f" fp_bits={options['fp_bits']} (t={row['t']})" if codec == "bloomier" else "")
            rows.append((label, row, errors))
        best = min(row["encoded_bytes"] for _, row, errors in rows if errors == 0)
        for label, row, errors in rows:
            mark = "**" if row["encoded_bytes"] == best and errors == 0 else ""
            lines.append(f"| {record.name} | {row['params']:,} | {row['nonzeros']:,} | {row['k']} | {bound:.2f} | "
                         f"{mark}{label}{mark} | {row['bits_per_nonzero']:.2f} | {row['encoded_bytes']:,} | "
                         f"{row['ratio']:.1f}× | {errors:,} |")
    return lines + [""]


def main() -> None:
    lines = ["## Codecs on the same tensors", "",
             "Each pruned and clustered tensor of the result blobs, encoded by every codec. *bits/nonzero* counts "
             "the codec's own sections; *bytes* and *ratio* include the codebook (against the tensor's fp32 "
             "bytes). *Errors introduced* are positions that decode to a different value (for the Bloomier "
             "filter: its false positives). The order-0 bound is log2 C(N, n) + n·H(ids) per nonzero; "
             "`sparse` goes below it where whole rows or columns are empty (dead MNIST border pixels) or "
             "densities differ between rows. Bold: the smallest exact codec.", ""]
    for name in ("lenet-300-100", "lenet5"):
        if (ROOT / "results" / f"{name}.wl").exists():
            lines += compare(name)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
