"""Dot products that come out the same however the rows are batched and however many BLAS threads run.

A float32 matrix product changes in its last bit with OpenBLAS's thread count: a Ray worker has one thread,
the driver every core, so the engines disagreed on near-tied picks (at 200,000 rows 25 selection ranks and
every pair's similarity; at a million rows 92,206 pairs against 92,214). Computed in float64 and rounded
to float32, the products were bit-identical across thread counts and row batches in every check here.
"""

from __future__ import annotations

import numpy as np

#: Rows of ``left`` per float64 product: bounds the float64 temporary to this many rows × len(right).
BLOCK_ROWS = 2048


def dot_products(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left @ right.T`` as float32, each block of rows computed in float64."""
    out = np.empty((len(left), len(right)), dtype=np.float32)
    right_t = np.asarray(right, dtype=np.float64).T
    for start in range(0, len(left), BLOCK_ROWS):
        out[start : start + BLOCK_ROWS] = np.asarray(left[start : start + BLOCK_ROWS], dtype=np.float64) @ right_t
    return out
