"""``dense``: every position's codebook index, entropy coded, for clustered tensors that are not pruned.

When most weights are nonzero, describing *where* the nonzeros are costs more than it saves; this codec
treats the index K ("zero") as just another symbol and codes all N indices with one order-0 model (a
two-pass static table stored as one byte or nibble per symbol) through constriction's ANS coder. It needs
about N·H(indices) bits, the order-0 bound of the tensor, plus the table. Byte-exact format:
``docs/codecs/exact.md``.
"""

from __future__ import annotations

import math

import numpy as np

from weightless_cli.codecs.clustered import SparseCode
from weightless_cli.codecs.entropy import AnsReader, AnsWriter, ByteReader, ids_dtype, make_table
from weightless_cli.errors import BadInputError

__all__ = ["PARAM_NAMES", "SECTIONS", "decode", "encode", "estimate_bits"]

PARAM_NAMES: tuple[str, ...] = ()
SECTIONS = ("codebook", "model", "stream")
MAX_IDS = 2**16 - 1
_CHUNK = 1 << 22  # positions per pass when filling the output: bounds the int32 temporaries


def encode(code: SparseCode, shape: tuple[int, ...]) -> tuple[dict[str, int], dict[str, bytes]]:
    """No params; the ``model`` (index table) and ``stream`` sections (the stage adds ``codebook``)."""
    if math.prod(shape) != code.size:
        raise ValueError(f"shape {shape} has {math.prod(shape)} elements, the code {code.size}")
    if code.k > MAX_IDS:
        raise ValueError(f"{code.k} codebook entries (limit {MAX_IDS})")
    ids = code.dense_ids()
    table = make_table(np.bincount(ids, minlength=code.k + 1))
    writer = AnsWriter()
    for start in range(0, ids.size, _CHUNK):
        writer.symbols(ids[start : start + _CHUNK], table.freqs)
    return {}, {"model": table.data, "stream": writer.finish()}


def estimate_bits(code: SparseCode, shape: tuple[int, ...]) -> int:
    """Exact size of the ``model`` and ``stream`` sections in bits (the codebook is the same for every codec)."""
    _, sections = encode(code, shape)
    return 8 * sum(len(data) for data in sections.values())


def decode(params: dict[str, int], sections: dict[str, bytes], shape: tuple[int, ...], k: int) -> np.ndarray:
    """One codebook index per position (length N, C order); K marks a zero. Corrupt input: BadInputError."""
    if params:
        raise BadInputError(f"corrupt dense stream: unexpected params {sorted(params)}")
    reader = ByteReader(sections["model"], "dense model")
    freqs = reader.table(k + 1, "index table")
    reader.done()
    n_positions = math.prod(shape)
    out = np.empty(n_positions, dtype=ids_dtype(k))
    stream = AnsReader(sections["stream"], "dense stream")
    for start in range(0, n_positions, _CHUNK):
        stop = min(start + _CHUNK, n_positions)
        out[start:stop] = stream.symbols(stop - start, freqs, "index")
    stream.finish()
    return out
