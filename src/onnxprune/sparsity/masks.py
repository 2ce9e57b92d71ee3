"""Turn importance scores into keep-masks: unstructured (global or per layer) and N:M.

Every layer's scores are a matrix ``S[rows, K]`` aligned with its weight view ``W[rows, K]``
(see :mod:`onnxprune.sparsity.layers`); a mask ``M`` keeps ``W[r, k]`` where ``M[r, k]``.

* **layer** scope: in a layer of ``n`` weights, the ``round(s * n)`` lowest scores are
  pruned (exact count; ties broken by position, so the result is deterministic);
* **global** scope: the scores of all layers in the scope are ranked together and the
  ``round(s * sum(n))`` lowest are pruned, i.e. one threshold ``t`` for every layer and
  ``W[r, k]`` is pruned iff ``S[r, k] < t`` (up to ties at ``t``);
* **row** scope (``compare="row"``, the Wanda paper's choice): ``round(s * K)`` per row;
* **N:M** (e.g. 2:4): along ``K``, every group of ``M`` consecutive columns keeps the ``N``
  highest scores. Groups must not straddle kernel positions, so ``M`` must divide the
  layer's run of consecutive input channels.

Entries of ``forced`` (already pruned in an earlier iterative step) are pruned first and
stay pruned, so masks only ever shrink.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = [
    "nm_mask",
    "nm_violation",
    "prune_count",
    "select_global",
    "select_layer",
    "select_rows",
]


def prune_count(size: int, sparsity: float) -> int:
    """Number of weights to prune: ``round(sparsity * size)``, halves rounded up."""
    return min(size, math.floor(sparsity * size + 0.5))


def _ranked(scores: np.ndarray, forced: np.ndarray | None) -> np.ndarray:
    flat = np.asarray(scores, dtype=np.float64).ravel()
    if forced is not None:
        flat = np.where(forced.ravel(), -np.inf, flat)
    return flat


def select_layer(
    scores: np.ndarray, sparsity: float, forced: np.ndarray | None = None
) -> np.ndarray:
    """Keep-mask pruning the ``round(sparsity * n)`` lowest scores of one layer."""
    flat = _ranked(scores, forced)
    count = prune_count(flat.size, sparsity)
    if forced is not None:
        count = max(count, int(forced.sum()))
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:count]] = False
    return keep.reshape(scores.shape)


def select_rows(
    scores: np.ndarray, sparsity: float, forced: np.ndarray | None = None
) -> np.ndarray:
    """Keep-mask pruning the ``round(sparsity * K)`` lowest scores of every row."""
    ranked = _ranked(scores, forced).reshape(scores.shape)
    count = prune_count(scores.shape[1], sparsity)
    order = np.argsort(ranked, axis=1, kind="stable")
    keep = np.ones(scores.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :count], False, axis=1)
    if forced is not None:
        keep &= ~forced
    return keep


def select_global(
    scores: Mapping[str, np.ndarray],
    sparsity: float,
    forced: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """Keep-masks for all layers from one threshold; returns the masks and the threshold."""
    names = list(scores)
    flats = [_ranked(scores[n], (forced or {}).get(n)) for n in names]
    sizes = [f.size for f in flats]
    everything = np.concatenate(flats) if flats else np.zeros(0)
    count = prune_count(everything.size, sparsity)
    if forced:
        count = max(count, sum(int(f.sum()) for f in forced.values()))
    order = np.argsort(everything, kind="stable")
    keep = np.ones(everything.size, dtype=bool)
    keep[order[:count]] = False
    threshold = float(everything[order[count - 1]]) if count else -math.inf
    masks = {}
    start = 0
    for name, size in zip(names, sizes, strict=True):
        masks[name] = keep[start : start + size].reshape(scores[name].shape)
        start += size
    return masks, threshold


def nm_mask(scores: np.ndarray, n: int, m: int, forced: np.ndarray | None = None) -> np.ndarray:
    """Keep-mask with at most ``n`` kept of every ``m`` consecutive columns of each row."""
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"reduction size {k} is not a multiple of {m}")
    groups = _ranked(scores, forced).reshape(rows, k // m, m)
    order = np.argsort(groups, axis=2, kind="stable")
    keep: np.ndarray = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :, : m - n], False, axis=2)
    keep = keep.reshape(rows, k)
    if forced is not None:
        keep &= ~forced
    return keep


def nm_violation(matrix: np.ndarray, n: int, m: int) -> int | None:
    """Index of the first group of ``matrix[rows, K]`` with more than ``n`` nonzeros, or None."""
    rows, k = matrix.shape
    counts = (matrix.reshape(rows, k // m, m) != 0).sum(axis=2).ravel()
    bad = np.flatnonzero(counts > n)
    return int(bad[0]) if bad.size else None
