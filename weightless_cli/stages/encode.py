"""Encode a clustered model into a ``.wl`` blob: selected tensors through a lossy Bloomier
filter (Weightless), every other float tensor losslessly.

A clustered tensor's nonzeros take K shared values (its codebook). The filter maps each
nonzero position to its codebook index in t-bit cells; a position that was never stored
answers a random t-bit value, and any answer ≥ K decodes to zero, so a zero position turns
into a false positive with probability K / 2^t.
"""

from __future__ import annotations

import math
from pathlib import Path

from weightless_cli import __version__
from weightless_cli.codecs import bloomier
from weightless_cli.codecs.bitpack import pack_bits
from weightless_cli.codecs.clustered import sparse_code
from weightless_cli.codecs.container import Blob, TensorRecord, array_to_bytes, raw_record, save_blob
from weightless_cli.errors import UsageError
from weightless_cli.model import OnnxModel, PerTensor, Selection, WeightTensor, model_warnings

MAX_T = 16
DEFAULT_FP_BITS = 6


def bits_for_ids(k: int) -> int:
    """Bits to name K codebook entries plus one 'zero' answer: ⌈log2(K+1)⌉."""
    return max(1, math.ceil(math.log2(k + 1)))


def cell_bits(k: int, t: int | None, fp_bits: int | None) -> int:
    """The filter's t for a tensor with K values: given directly, or ⌈log2(K+1)⌉ + fp_bits."""
    t = bits_for_ids(k) + fp_bits if t is None else t
    if 2**t <= k:
        raise UsageError(f"t={t} cannot hold {k} codebook values plus zero; use t ≥ {bits_for_ids(k)}")
    if t > MAX_T:
        raise UsageError(f"t={t} is above the limit of {MAX_T} bits (K={k}); quantize to fewer clusters")
    return t


def expected_false_positives(zeros: int, k: int, t: int) -> float:
    return zeros * k / 2**t


def encode_tensor(tensor: WeightTensor, t: int | None, fp_bits: int | None, seed: int) -> tuple[TensorRecord, dict]:
    """The bloomier record of one clustered tensor, and its row of the report."""
    code = sparse_code(tensor.array())
    if code.k > 2**MAX_T - 1:
        raise UsageError(f"{tensor.name} has {code.k:,} distinct nonzero values: it is not clustered; "
                         "run `weightless quantize` first", tensor.name)
    bits = cell_bits(code.k, t, fp_bits)
    table = bloomier.encode_positions(code.positions, code.ids, tensor.params, bits, seed)
    record = TensorRecord(tensor.name, tensor.shape, tensor.dtype, "bloomier", table.to_params(),
                          {"cells": pack_bits(table.cells, bits), "codebook": array_to_bytes(code.codebook, tensor.dtype)})
    nonzeros = code.positions.size
    stored_bits = table.cells.size * bits
    row = {
        "name": tensor.name, "codec": "bloomier", "params": tensor.params, "nonzeros": nonzeros, "k": code.k, "t": bits,
        "cells": int(table.cells.size), "cells_per_key": table.cells.size / max(nonzeros, 1), "bits": stored_bits,
        "bits_per_nonzero": stored_bits / max(nonzeros, 1),
        "expected_false_positives": expected_false_positives(tensor.params - nonzeros, code.k, bits),
        "original_bytes": tensor.nbytes, "encoded_bytes": _record_bytes(record),
    }
    row["ratio"] = tensor.nbytes / row["encoded_bytes"]
    return record, row


def _record_bytes(record: TensorRecord) -> int:
    return sum(len(section) for section in record.sections.values())


EncodedTensor = tuple[TensorRecord, dict]  # the record and its row of the report


def assemble_blob(model: OnnxModel, encoded: dict[str, EncodedTensor], seed: int = 0) -> tuple[Blob, list[dict]]:
    """A blob of ``model`` holding the ``encoded`` records and every other float weight losslessly.

    The model's graph is kept with the values of all those tensors removed (name, dtype
    and shape stay, so the decoder can put them back). ``model`` is changed in place.
    """
    records, rows = [], []
    for tensor in model.weights:
        if tensor.quantized:
            continue  # stays in the graph untouched
        if tensor.name in encoded:
            record, row = encoded[tensor.name]
        else:
            record = raw_record(tensor.name, tensor.array(), tensor.dtype)
            row = {"name": tensor.name, "codec": "raw", "params": tensor.params, "original_bytes": tensor.nbytes,
                   "encoded_bytes": _record_bytes(record)}
        records.append(record)
        rows.append(row)
        tensor.strip()
    metadata = {"writer": f"weightless {__version__}", "seed": str(seed)}
    return Blob(model.proto.SerializeToString(), records, metadata), rows


def encode_model(model: OnnxModel, tensors: list[WeightTensor], t: PerTensor, fp_bits: PerTensor,
                 seed: int = 0) -> tuple[Blob, list[dict]]:
    """Encode ``tensors`` with the filter and every other float weight losslessly (see assemble_blob)."""
    encoded = {tensor.name: encode_tensor(tensor, t.for_name(tensor.name), fp_bits.for_name(tensor.name), seed)
               for tensor in tensors}
    return assemble_blob(model, encoded, seed)


def file_summary(source_bytes: int, blob_bytes: int, rows: list[dict]) -> dict:
    """Whole-file sizes and ratios, and the ratio for the encoded weights alone."""
    encoded = [r for r in rows if r["codec"] != "raw"]
    before = sum(r["original_bytes"] for r in encoded)
    after = sum(r["encoded_bytes"] for r in encoded)
    return {"input_bytes": source_bytes, "blob_bytes": blob_bytes, "ratio": source_bytes / blob_bytes,
            "encoded_weight_bytes_before": before, "encoded_weight_bytes_after": after,
            "weights_ratio": before / after if after else None}


def encode_file(source: Path, target: Path, selection: Selection, t: PerTensor, fp_bits: PerTensor,
                seed: int = 0) -> dict:
    """Encode the ONNX file ``source`` into the blob ``target``; return the report."""
    model = OnnxModel.load(source)
    source_bytes = source.stat().st_size
    tensors = selection.apply(model)
    blob, rows = encode_model(model, tensors, t, fp_bits, seed)
    blob_bytes = save_blob(target, blob)
    return {"input": str(source), "output": str(target), "warnings": model_warnings(model), "tensors": rows,
            "file": file_summary(source_bytes, blob_bytes, rows)}
