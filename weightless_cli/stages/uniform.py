"""Fixed-point quantization: uniform symmetric (per tensor or per channel) and row-wise.

* :func:`quantize_uniform`: ``bits``-bit symmetric linear levels ``q · s`` with ``|q| <= 2^(bits-1) - 1``
  and ``s`` = largest magnitude / (2^(bits-1) - 1), one scale per tensor or per channel (axis 0), the
  scale rounded to the tensor's dtype. This is what DPRed (``dpred`` codec) stores.
* :func:`quantize_rowwise`: ``bits``-bit unsigned levels ``b + q · s`` with a float16 scale and bias per
  row, as production recommendation models store embedding tables (``rowwise`` codec).

Both return values already rounded exactly as their codec decodes them, so the quantized model and the
decoded blob agree bit for bit. :func:`encode_record` and :func:`decode_record` connect the ``dpred``,
``outlier`` and ``rowwise`` codecs to the encode and decode stages.
"""

from __future__ import annotations

import numpy as np

from weightless_cli.codecs import dpred, outlier, rowwise
from weightless_cli.codecs.container import TensorRecord, dtype_of
from weightless_cli.errors import BadInputError, UsageError
from weightless_cli.model import WeightTensor

__all__ = ["VALUE_CODECS", "as_float_array", "decode_record", "encode_record", "quantize_rowwise", "quantize_uniform"]

VALUE_CODECS = {"dpred": dpred, "outlier": outlier, "rowwise": rowwise}


def as_float_array(values: np.ndarray) -> tuple[np.ndarray, str]:
    """``values`` as an array and its container dtype name; UsageError for anything but floats."""
    values = np.asarray(values)
    try:
        return values, dtype_of(values)
    except ValueError:
        raise UsageError(f"cannot quantize an array of {values.dtype}; expected a float tensor") from None


def quantize_uniform(values: np.ndarray, bits: int, per_channel: bool = False) -> np.ndarray:
    """``values`` on a symmetric ``bits``-bit uniform grid (2..16 bits), in their own dtype.

    ``per_channel`` gives every slice along axis 0 its own scale (tensors of two or more dimensions).
    """
    values, dtype = as_float_array(values)
    rows = dpred.row_count(values.shape, per_channel)
    grid = dpred.as_rows(values.reshape(-1).astype(np.float64), rows)
    ints, scales = dpred.quantize_rows(grid, bits, dtype)
    return dpred.dequantize(ints, scales, dtype).reshape(values.shape)


def quantize_rowwise(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` with every row (slice along axis 0) on ``2^bits`` levels ``b + q·s`` (1..8 bits).

    ``b`` and ``s`` are float16; every value ends within ``s/2`` of where it was (plus the rounding to the
    dtype). A tensor of fewer than two dimensions is one row.
    """
    values, dtype = as_float_array(values)
    rows = dpred.as_rows(values.reshape(-1).astype(np.float64), rowwise.rows_of(values.shape))
    ints, scales, biases = rowwise.quantize_rows(rows, bits, dtype)
    return rowwise.dequantize(ints, scales, biases, dtype).reshape(values.shape)


# --- records for the encode / decode stages ------------------------------------------------------------------


def encode_record(tensor: WeightTensor, codec: str) -> tuple[TensorRecord, dict]:
    """The ``codec`` record of a quantized tensor (bit-exact) and its row of the encode report.

    UsageError when the tensor does not have the structure the codec stores (``dpred``: not fixed-point;
    ``rowwise``: not row-wise quantized).
    """
    if codec not in VALUE_CODECS:
        raise UsageError(f"unknown codec {codec!r} (choose from {', '.join(sorted(VALUE_CODECS))})")
    values = tensor.array()
    try:
        params, sections = VALUE_CODECS[codec].encode(values)
    except UsageError as exc:
        raise UsageError(str(exc), tensor.name) from None
    record = TensorRecord(tensor.name, tensor.shape, tensor.dtype, codec, params, sections)
    encoded = sum(len(section) for section in sections.values())
    row = {"name": tensor.name, "codec": codec, "params": tensor.params, "nonzeros": int(np.count_nonzero(values)),
           "k": int(np.unique(dpred.bit_patterns(values[values != 0])).size), "bits": 8 * encoded,
           "bits_per_value": 8 * encoded / max(tensor.params, 1), "codec_params": params,
           "original_bytes": tensor.nbytes, "encoded_bytes": encoded,
           "ratio": tensor.nbytes / encoded if encoded else None, "expected_false_positives": 0.0}
    return record, row


def decode_record(record: TensorRecord) -> np.ndarray:
    """The tensor of a ``dpred``, ``outlier`` or ``rowwise`` record, in its dtype and shape."""
    if record.codec not in VALUE_CODECS:
        raise BadInputError(f"tensor {record.name!r}: codec {record.codec!r} is not dpred, outlier or rowwise")
    try:
        return VALUE_CODECS[record.codec].decode(record.params, record.sections, record.shape, record.dtype)
    except BadInputError as exc:
        raise BadInputError(f"tensor {record.name!r}: {exc}") from None
