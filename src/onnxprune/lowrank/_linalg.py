"""Numerical core of low-rank factorization (numpy only, float64 throughout).

For a weight ``W`` of shape ``[m, n]`` applied as ``y = x W``, the truncated SVD
``W = U S V^T`` keeps the ``r`` largest singular values: ``W_r = (U_r S_r)(V_r^T) = A B`` with
``A = U_r S_r`` (``[m, r]``) and ``B = V_r^T`` (``[r, n]``). By Eckart-Young it is the best
rank-``r`` approximation in Frobenius norm and ``||W - W_r||_F^2 = sum_{i > r} s_i^2``.

The factored pair costs ``r (m + n)`` multiply-adds per row instead of ``m n``, so it saves
work only below the break-even rank ``m n / (m + n)``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "breakeven_rank",
    "energy_rank",
    "factor",
    "round_rank",
    "svd",
    "truncation_error",
]


def svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD in float64: ``matrix = U @ diag(s) @ Vt`` with ``s`` descending."""
    u, s, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)
    return u, s, vt


def factor(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` with ``A = U_r diag(s_r)`` and ``B = Vt_r``, so ``A @ B = W_r``."""
    return u[:, :rank] * s[:rank], vt[:rank]


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest ``r >= 1`` whose singular values keep ``energy`` of ``sum s^2``."""
    power = np.asarray(s, dtype=np.float64) ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    kept = np.cumsum(power) / total
    # A tiny tolerance so energy=1.0 is reached despite rounding in the cumulative sum.
    return int(min(len(s), np.searchsorted(kept, energy - 1e-12) + 1))


def round_rank(rank: int, multiple: int, full: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple`` (1 = no rounding), at most ``full``."""
    if multiple > 1:
        rank = math.ceil(rank / multiple) * multiple
    return max(1, min(rank, full))


def breakeven_rank(m: int, n: int) -> float:
    """The rank at which ``r (m + n) == m n``: factoring at or above it saves nothing."""
    return m * n / (m + n)


def truncation_error(s: np.ndarray, rank: int) -> float:
    """``sqrt(sum of discarded s^2)``: the Frobenius error of the rank-``rank`` truncation."""
    return float(np.sqrt(np.sum(np.asarray(s[rank:], dtype=np.float64) ** 2)))
