"""OBS-style layer-wise weight update compensating pruned weights (SparseGPT, numpy).

For one layer ``y = W x`` (``W[rows, K]``) with calibration inputs ``X[n, K]``, pruning
minimizes the layer output error ``||(W - W') X^T||_F^2 = tr((W - W') H (W - W')^T)`` with
``H = X^T X / n + lambda I``, ``lambda = damp * mean(diag(X^T X / n))`` (rows are
independent). Optimal Brain Surgeon: removing weight ``w_j`` of a row and re-fitting the
remaining ones changes that row by

    delta = -(w_j / [H^-1]_jj) * H^-1[j, :]

SparseGPT (Frantar & Alistarh, 2023) applies this column by column, left to right, using
the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``): after column ``j`` is fixed,
row ``j`` of ``U`` is exactly the needed (already-eliminated) inverse-Hessian row, so for
column ``j`` with keep-mask ``m``::

    err_j = (w_j - m_j * w_j) / U[j, j]
    W[:, j:] -= err_j U[j, j:]

Columns are processed in blocks of ``block``; updates to later blocks are applied lazily
as ``W[:, end:] -= Err U[block, end:]``. Inputs that are always zero (``diag(H) = 0``)
get ``H[j, j] = 1``.

Which weights to prune: the given keep-mask (from magnitude or Wanda scores, global or
per layer, N:M) fixes *how many* weights every row prunes in every group of ``group``
columns (``group = block``, or ``M`` for N:M); *which* ones is re-chosen, as in
SparseGPT, when the group is reached, by the OBS saliency of the already-updated
weights ``w_j^2 / U[j, j]^2`` (the error that removing ``w_j`` adds). Entries in
``forced`` are always pruned. So sparsity counts, global thresholds' per-layer budgets and
N:M patterns are preserved exactly; pruned entries end exactly 0.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["layer_output_error", "obs_update", "refit_target"]

logger = logging.getLogger(__name__)


def _hessian(gram: np.ndarray, rows: int) -> tuple[np.ndarray, float]:
    """``gram / rows`` with dead inputs' diagonal set to 1, and the mean of its diagonal."""
    h = gram / max(rows, 1)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    return h, float(np.mean(np.diag(h)))


def refit_target(
    matrix: np.ndarray, gram: np.ndarray, cross: np.ndarray, rows: int, *, damp: float = 0.01
) -> np.ndarray:
    """Dense weights ``W*`` that best map this model's inputs to the reference outputs.

    ``W* = (W C^T / n + lambda W) (H)^-1`` minimizes ``||W X_ref^T - W* X^T||^2 / n +
    lambda ||W* - W||^2`` (``C = X^T X_ref``, ``H = X^T X / n + lambda I``, the same
    ``lambda`` as :func:`obs_update`); that objective equals ``tr((W' - W*) H (W' - W*)^T)``
    plus a constant, so pruning ``W*`` with :func:`obs_update` minimizes it. Directions the
    calibration rows never excite keep ``W`` (the ridge pulls towards it, not towards 0).
    With ``X == X_ref`` (nothing pruned upstream), ``W* = W``.
    """
    w = matrix.astype(np.float64)
    h, mean = _hessian(gram, rows)
    lam = damp * mean
    rhs = w @ cross.T / max(rows, 1) + lam * w
    return np.linalg.solve(h + lam * np.eye(h.shape[0]), rhs.T).T


def _inverse_cholesky(gram: np.ndarray, rows: int, damp: float) -> np.ndarray:
    """Upper Cholesky factor of ``(gram / rows + lambda I)^-1``; raises damping if needed."""
    h, mean = _hessian(gram, rows)
    for attempt in range(6):
        lam = damp * (10.0**attempt) * mean
        try:
            lower = np.linalg.cholesky(h + lam * np.eye(h.shape[0]))
            inv_lower = np.linalg.solve(lower, np.eye(h.shape[0]))
            return np.linalg.cholesky(inv_lower.T @ inv_lower).T
        except np.linalg.LinAlgError:
            logger.debug("Hessian not positive definite at damping %g; raising it", lam)
    raise np.linalg.LinAlgError("Hessian is not positive definite even with strong damping")


def _reselect(
    w: np.ndarray, keep: np.ndarray, diag: np.ndarray, forced: np.ndarray | None
) -> np.ndarray:
    """Per row, prune as many entries as ``keep`` does, choosing the lowest ``w^2 / d^2``."""
    saliency = w**2 / diag[None, :] ** 2
    if forced is not None:
        saliency = np.where(forced, -np.inf, saliency)
    counts = (~keep).sum(axis=1)
    order = np.argsort(saliency, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(w.shape[1])[None, :], axis=1)
    return ranks >= counts[:, None]


def obs_update(
    matrix: np.ndarray,
    keep: np.ndarray,
    gram: np.ndarray,
    rows: int,
    *,
    damp: float = 0.01,
    block: int = 128,
    group: int | None = None,
    forced: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Prune ``matrix[rows, K]`` to ``keep`` and compensate (see the module docstring).

    Args:
        matrix: The weight view ``W[rows, K]``.
        keep: Boolean keep-mask, same shape.
        gram: ``X^T X`` over the calibration rows, ``[K, K]``.
        rows: Number of calibration rows summed into ``gram``.
        damp: Relative dampening ``lambda / mean(diag(H))``.
        block: Columns per block.
        group: Columns per re-selection group (a divisor of ``block``); default ``block``.
        forced: Entries that must be pruned (already pruned in an earlier step).

    Returns:
        The updated weights in float64 and the final keep-mask (exactly zero where False).
    """
    w = matrix.astype(np.float64).copy()
    upper = _inverse_cholesky(gram, rows, damp)
    k = w.shape[1]
    group = group or block
    final = keep.copy()
    for start in range(0, k, block):
        end = min(start + block, k)
        u = upper[start:end, start:end]
        err = np.zeros((w.shape[0], end - start))
        for i in range(end - start):
            j = start + i
            if i % group == 0:
                stop = min(j + group, end)
                sub = None if forced is None else forced[:, j:stop]
                final[:, j:stop] = _reselect(
                    w[:, j:stop], keep[:, j:stop], np.diag(u)[i : i + stop - j], sub
                )
            col = w[:, j]
            q = np.where(final[:, j], col, 0.0)
            e = (col - q) / u[i, i]
            w[:, start + i : end] -= np.outer(e, u[i, i:])
            w[:, start + i] = q
            err[:, i] = e
        w[:, end:] -= err @ upper[start:end, end:]
    return np.where(final, w, 0.0), final


def layer_output_error(original: np.ndarray, pruned: np.ndarray, gram: np.ndarray) -> float:
    """``||(W - W') X^T||_F^2 = tr((W - W') (X^T X) (W - W')^T)``."""
    diff = original.astype(np.float64) - pruned.astype(np.float64)
    return float(np.einsum("rk,kl,rl->", diff, gram, diff))
