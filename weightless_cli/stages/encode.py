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
from weightless_cli.codecs import bloomier, csr_huffman, dense, sparse
from weightless_cli.codecs.bitpack import pack_bits
from weightless_cli.codecs.clustered import SparseCode, sparse_code
from weightless_cli.codecs.container import Blob, TensorRecord, array_to_bytes, raw_record, save_blob
from weightless_cli.errors import UsageError
from weightless_cli.model import OnnxModel, PerTensor, Selection, WeightTensor, model_warnings
from weightless_cli.stages import uniform

MAX_T = 16
DEFAULT_FP_BITS = 6
# Exact codecs for clustered tensors (issue #6): no false positives, sizes near the entropy bound.
EXACT_CODECS = {"sparse": sparse, "csr-huffman": csr_huffman, "dense": dense}
# Codecs for tensors on a value grid rather than a codebook (issue #8): dpred, outlier, rowwise.
CODEC_CHOICES = ("bloomier", *EXACT_CODECS, *uniform.VALUE_CODECS, "auto")


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


def encode_tensor(tensor: WeightTensor, codec: str = "bloomier", t: int | None = None,
                  fp_bits: int | None = DEFAULT_FP_BITS, seed: int = 0,
                  max_fp_ratio: float | None = None) -> tuple[TensorRecord, dict]:
    """The record of one clustered tensor, and its row of the report.

    ``auto`` takes the smallest exact codec, or the Bloomier filter when it is smaller
    still and its expected false positives are at most ``max_fp_ratio`` × nonzeros.
    """
    if codec in uniform.VALUE_CODECS:
        return uniform.encode_record(tensor, codec)
    code = sparse_code(tensor.array())
    if code.k > 2**MAX_T - 1:
        raise UsageError(f"{tensor.name} has {code.k:,} distinct nonzero values: it is not clustered; "
                         "run `weightless quantize` first")
    if codec == "auto":
        candidates = [_encode_exact(tensor, code, name) for name in EXACT_CODECS]
        if max_fp_ratio is not None:
            filtered = _encode_bloomier(tensor, code, t, fp_bits, seed)
            if filtered[1]["expected_false_positives"] <= max_fp_ratio * code.positions.size:
                candidates.append(filtered)
        return min(candidates, key=lambda candidate: candidate[1]["encoded_bytes"])
    if codec == "bloomier":
        return _encode_bloomier(tensor, code, t, fp_bits, seed)
    if codec in EXACT_CODECS:
        return _encode_exact(tensor, code, codec)
    raise UsageError(f"unknown codec {codec!r}; choose from {', '.join(CODEC_CHOICES)}")


def _row(tensor: WeightTensor, code: SparseCode, record: TensorRecord, bits: int, **extra: object) -> dict:
    nonzeros = code.positions.size
    encoded_bytes = _record_bytes(record)
    return {"name": tensor.name, "codec": record.codec, "params": tensor.params, "nonzeros": nonzeros, "k": code.k,
            "bits": bits, "bits_per_nonzero": bits / max(nonzeros, 1), "original_bytes": tensor.nbytes,
            "encoded_bytes": encoded_bytes, "ratio": tensor.nbytes / encoded_bytes, **extra}


def _encode_bloomier(tensor: WeightTensor, code: SparseCode, t: int | None, fp_bits: int | None,
                     seed: int) -> tuple[TensorRecord, dict]:
    bits = cell_bits(code.k, t, fp_bits)
    table = bloomier.encode_positions(code.positions, code.ids, tensor.params, bits, seed)
    record = TensorRecord(tensor.name, tensor.shape, tensor.dtype, "bloomier", table.to_params(),
                          {"cells": pack_bits(table.cells, bits), "codebook": array_to_bytes(code.codebook, tensor.dtype)})
    cells = int(table.cells.size)
    return record, _row(tensor, code, record, cells * bits, t=bits, cells=cells,
                        cells_per_key=cells / max(code.positions.size, 1),
                        expected_false_positives=expected_false_positives(tensor.params - code.positions.size,
                                                                          code.k, bits))


def _encode_exact(tensor: WeightTensor, code: SparseCode, codec: str) -> tuple[TensorRecord, dict]:
    params, sections = EXACT_CODECS[codec].encode(code, tensor.shape)
    sections = {**sections, "codebook": array_to_bytes(code.codebook, tensor.dtype)}
    record = TensorRecord(tensor.name, tensor.shape, tensor.dtype, codec, params, sections)
    bits = 8 * sum(len(data) for name, data in sections.items() if name != "codebook")
    return record, _row(tensor, code, record, bits, expected_false_positives=0.0)


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


def encode_model(model: OnnxModel, tensors: list[WeightTensor], codec: PerTensor, t: PerTensor,
                 fp_bits: PerTensor, seed: int = 0, max_fp_ratio: float | None = None) -> tuple[Blob, list[dict]]:
    """Encode ``tensors`` with their codec and every other float weight losslessly (see assemble_blob)."""
    encoded = {tensor.name: encode_tensor(tensor, codec.for_name(tensor.name), t.for_name(tensor.name),
                                          fp_bits.for_name(tensor.name), seed, max_fp_ratio)
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


def encode_file(source: Path, target: Path, selection: Selection, codec: PerTensor, t: PerTensor,
                fp_bits: PerTensor, seed: int = 0, max_fp_ratio: float | None = None) -> dict:
    """Encode the ONNX file ``source`` into the blob ``target``; return the report."""
    model = OnnxModel.load(source)
    source_bytes = source.stat().st_size
    tensors = selection.apply(model)
    blob, rows = encode_model(model, tensors, codec, t, fp_bits, seed, max_fp_ratio)
    blob_bytes = save_blob(target, blob)
    return {"input": str(source), "output": str(target), "warnings": model_warnings(model), "tensors": rows,
            "file": file_summary(source_bytes, blob_bytes, rows)}
