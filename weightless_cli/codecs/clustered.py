"""A clustered tensor as every clustered-tensor codec sees it.

Weight sharing leaves a tensor whose nonzeros take K distinct values (its codebook).
Codecs store *where* the nonzeros are and *which* codebook entry each one holds; the
codebook itself travels beside them as raw values. Decoding gives one index per position,
with the index K standing for zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SparseCode:
    """Nonzero positions (ascending) and their codebook indices, for a tensor of ``size`` values."""

    codebook: np.ndarray  # the K distinct nonzero values, sorted, in the tensor's own dtype
    positions: np.ndarray  # flat positions of the nonzeros, ascending (int64)
    ids: np.ndarray  # codebook index of each nonzero (uint16)
    size: int  # number of positions in the tensor

    @property
    def k(self) -> int:
        return int(self.codebook.size)

    def dense_ids(self) -> np.ndarray:
        """One codebook index per position; K marks a zero."""
        out = np.full(self.size, self.k, dtype=np.uint16 if self.k < 2**16 else np.uint32)
        out[self.positions] = self.ids
        return out


def sparse_code(values: np.ndarray) -> SparseCode:
    flat = np.asarray(values).ravel()
    positions = np.flatnonzero(flat)
    nonzero = flat[positions]
    codebook = np.unique(nonzero)
    return SparseCode(codebook, positions, np.searchsorted(codebook, nonzero).astype(np.uint16), flat.size)


def values_from_ids(codebook: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Decode per-position indices (K or more means zero) to values in the codebook's dtype."""
    lookup = np.concatenate((codebook, np.zeros(1, dtype=codebook.dtype)))
    return lookup[np.minimum(ids, codebook.size)]
