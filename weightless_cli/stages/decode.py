"""Turn a ``.wl`` blob back into an ONNX model, and check a blob against its source model."""

from __future__ import annotations

import math
import os
import resource
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from google.protobuf.message import DecodeError

from weightless_cli.codecs import bloomier
from weightless_cli.codecs.bitpack import unpack_bits
from weightless_cli.codecs.clustered import values_from_ids
from weightless_cli.codecs.container import DTYPES, Blob, TensorRecord, bytes_to_array, load_blob, raw_array
from weightless_cli.errors import BadInputError
from weightless_cli.model import OnnxModel
from weightless_cli.stages import uniform
from weightless_cli.stages.encode import EXACT_CODECS

# verify fails a tensor whose false positives exceed their expectation by this many
# standard deviations: for a correct filter that happens with probability < 1e-9.
FALSE_POSITIVE_SIGMAS = 6.0


def _as_numpy(values: np.ndarray, dtype: str) -> np.ndarray:
    """bfloat16 travels as uint16 bit patterns; give it back its real dtype."""
    return values.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else values


def _codebook(record: TensorRecord) -> np.ndarray:
    return _as_numpy(bytes_to_array(record.sections["codebook"], record.dtype), record.dtype)


def _cells(record: TensorRecord) -> np.ndarray:
    params = record.params
    count, t = params.get("cells"), params.get("t")
    if not isinstance(count, int) or not isinstance(t, int) or not 1 <= t <= 16:
        raise BadInputError(f"tensor {record.name!r}: bad bloomier parameters")
    if len(record.sections["cells"]) != math.ceil(count * t / 8):
        raise BadInputError(f"tensor {record.name!r}: cells section does not hold {count} cells of {t} bits")
    return unpack_bits(record.sections["cells"], t, count)


def decode_record(record: TensorRecord) -> np.ndarray:
    """The tensor a record stores, in its own dtype and shape."""
    if record.codec == "raw":
        return _as_numpy(raw_array(record), record.dtype)
    if record.codec == "bloomier":
        table = bloomier.BloomierTable.from_params(record.params, _cells(record))
        # Straight into the output, chunk by chunk: no index array the size of the tensor.
        return bloomier.decode_values(table, record.n_elements, _codebook(record)).reshape(record.shape)
    if record.codec in uniform.VALUE_CODECS:
        return uniform.decode_record(record)
    if record.codec in EXACT_CODECS:
        codebook = _codebook(record)
        ids = EXACT_CODECS[record.codec].decode(record.params, record.sections, record.shape, codebook.size)
        return values_from_ids(codebook, ids).reshape(record.shape)
    raise BadInputError(f"tensor {record.name!r}: codec {record.codec!r} cannot be decoded by this version")


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, or less under an address-space
    limit (ulimit -v); None when neither can be read."""
    limits = []
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
        with open("/proc/self/statm") as statm:
            in_use = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft - in_use)
    except (OSError, ValueError, IndexError):
        pass
    return min(limits) if limits else None


def check_decoded_size(blob: Blob, source: str | Path) -> None:
    """Refuse, before allocating, a blob whose tensors (capped by the format at 2^32 values
    each, but declared by a file of any size) will not fit in memory: decoding holds every
    tensor plus about two copies of the largest while it works."""
    sizes = [record.n_elements * DTYPES[record.dtype].itemsize for record in blob.tensors]
    needed = sum(sizes) + 2 * max(sizes, default=0)
    available = available_memory()
    if available is not None and needed > available:
        raise BadInputError(f"decoding needs about {needed / 2**30:.1f} GiB of memory for its {len(sizes)} "
                            f"tensors, but only {max(available, 0) / 2**30:.1f} GiB is available", source)


def _decode_named(record: TensorRecord, source: str | Path) -> np.ndarray:
    """decode_record, with a codec's complaint prefixed by the file and the tensor."""
    try:
        return decode_record(record)
    except BadInputError as exc:
        where = f"tensor {record.name!r}: "
        message = str(exc)
        raise BadInputError(message if message.startswith(where) else where + message, source) from None


def decode_blob(blob: Blob, source: str | Path) -> OnnxModel:
    """Rebuild the ONNX model a blob holds (in memory)."""
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(blob.graph)
    except DecodeError:
        raise BadInputError("the graph section is not an ONNX model", source) from None
    model = OnnxModel.from_proto(proto, source)
    check_decoded_size(blob, source)
    by_name = {tensor.name: tensor for tensor in model.weights}
    for record in blob.tensors:
        tensor = by_name.get(record.name)
        if tensor is None:
            raise BadInputError(f"tensor {record.name!r} is not in the blob's graph", source)
        if tensor.shape != record.shape or tensor.dtype != record.dtype:
            raise BadInputError(f"tensor {record.name!r}: record {record.shape} {record.dtype} does not match the "
                                f"graph's {tensor.shape} {tensor.dtype}", source)
        tensor.set_array(_decode_named(record, source))
    # Checks the graph without serialising the decoded values (a model may exceed 2 GiB).
    model.check("decoded model fails the ONNX checker")
    return model


@contextmanager
def runnable_model(model: OnnxModel) -> Iterator[bytes | Path]:
    """The decoded model as onnxruntime can take it: its serialized bytes or, past protobuf's
    2 GiB, a temporary file with external data (in ``$TMPDIR``, removed afterwards)."""
    if model.fits_one_protobuf():
        yield model.proto.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="weightless-decoded-") as folder:
        path = Path(folder) / "decoded.onnx"
        model.save(path, external_data=True)
        yield path


def decode_file(source: Path, target: Path) -> dict:
    blob = load_blob(source)
    model = decode_blob(blob, source)
    model.save(target)
    return {"input": str(source), "output": str(target), "tensors": len(blob.tensors),
            "output_bytes": target.stat().st_size}


def false_positive_bound(zeros: int, k: int, t: int) -> float:
    """The count of false positives above which a filter is judged broken."""
    p = k / 2**t
    mean = zeros * p
    return mean + FALSE_POSITIVE_SIGMAS * math.sqrt(zeros * p * (1 - p)) + FALSE_POSITIVE_SIGMAS


def verify_record(record: TensorRecord, reference: np.ndarray) -> dict:
    """Compare one record with the tensor it was made from."""
    decoded = decode_record(record)
    row = {"name": record.name, "codec": record.codec, "params": record.n_elements}
    if record.codec == "raw":
        # Bit-exact: compare the bytes, so -0.0 and NaN payloads count too.
        got = np.ascontiguousarray(decoded).view(np.uint8)
        want = np.ascontiguousarray(np.asarray(reference, dtype=decoded.dtype)).view(np.uint8)
        row["mismatches"] = int(np.count_nonzero(got != want)) if got.size == want.size else int(got.size)
        row["ok"] = row["mismatches"] == 0 and got.size == want.size
        return row
    expected, got = np.asarray(reference).ravel(), decoded.ravel()
    stored = expected != 0
    wrong = int(np.count_nonzero(got[stored] != expected[stored]))
    false_positives = int(np.count_nonzero(got[~stored]))
    zeros, k = int((~stored).sum()), int(np.unique(expected[stored]).size)
    if record.codec == "bloomier":
        t = record.params["t"]
        expected_fp, bound = zeros * k / 2**t, false_positive_bound(zeros, k, t)
    else:
        expected_fp, bound = 0.0, 0.0  # exact codecs: not a single false positive
    row.update({"nonzeros": int(stored.sum()), "wrong_nonzeros": wrong, "false_positives": false_positives,
                "expected_false_positives": expected_fp, "false_positive_bound": bound,
                "ok": wrong == 0 and false_positives <= bound})
    return row


def verify_file(source: Path, reference: Path | None) -> dict:
    """Check every checksum of a blob and, with a reference model, every tensor in it."""
    blob = load_blob(source)  # checks every CRC, length and limit
    model = decode_blob(blob, source)
    rows = []
    if reference is not None:
        ref_model = OnnxModel.load(reference)
        ref_tensors = {t.name: t for t in ref_model.weights}
        for record in blob.tensors:
            if record.name not in ref_tensors:
                rows.append({"name": record.name, "codec": record.codec, "ok": False, "error": "not in reference"})
                continue
            rows.append(verify_record(record, ref_tensors[record.name].array()))
    return {"input": str(source), "reference": None if reference is None else str(reference),
            "checksums_ok": True, "tensors": rows, "decoded_weights": len(model.weights),
            "ok": all(row["ok"] for row in rows)}
