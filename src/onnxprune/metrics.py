"""Fidelity metrics between a reference output and a candidate output.

All metrics are computed in float64 over the flattened tensors:

* ``max_abs_error`` = max |c - r|, ``mean_abs_error`` = mean |c - r|;
* ``max_rel_error`` = max |c - r| / (|r| + eps) with eps = 1e-6 * max|r| (so zeros in the
  reference do not blow it up);
* ``cosine`` = <r, c> / (|r| |c|) (1.0 when both are all zero);
* ``sqnr_db`` = 10 log10(sum r^2 / sum (c - r)^2) (inf when identical);
* ``top1_agreement``: share of rows (last axis = classes) whose argmax agrees, for
  classifier-like outputs (rank >= 2, float, last axis > 1); None otherwise. A candidate
  row with NaN or infinity never agrees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["HIGHER_IS_BETTER", "METRIC_NAMES", "output_metrics", "rows", "worst_nsr"]

METRIC_NAMES = (
    "top1_agreement",
    "cosine",
    "sqnr_db",
    "max_abs_error",
    "mean_abs_error",
    "max_rel_error",
    "nn_agreement",
)
HIGHER_IS_BETTER = frozenset({"top1_agreement", "cosine", "sqnr_db", "nn_agreement"})


def rows(array: np.ndarray) -> np.ndarray:
    """``array`` as a matrix of its last axis (``[prod(leading dims), last]``), zero-size too."""
    return array.reshape(math.prod(array.shape[:-1]), array.shape[-1])


def _is_classifier_like(array: np.ndarray) -> bool:
    return (
        array.ndim >= 2
        and np.issubdtype(array.dtype, np.floating)
        and array.shape[-1] > 1
        and array.size > 0
    )


def worst_nsr(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> float:
    """The largest noise-to-signal ratio ``sum (c - r)^2 / sum r^2`` over the float outputs
    of ``reference`` (0 when nothing changes, inf for noise on an all-zero reference); the
    scalar error of sensitivity measurements. Integer outputs (labels) are skipped."""
    worst = 0.0
    for name, r in reference.items():
        if not np.issubdtype(r.dtype, np.floating):
            continue
        r64, c64 = r.astype(np.float64), candidate[name].astype(np.float64)
        signal = float(np.sum(r64**2))
        noise = float(np.sum((c64 - r64) ** 2))
        worst = max(worst, noise / signal if signal > 0 else (math.inf if noise else 0.0))
    return worst


def output_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float | None]:
    """Metrics of ``candidate`` against ``reference`` (same shape)."""
    if reference.shape != candidate.shape:
        raise ValueError(
            f"shape mismatch: reference {reference.shape}, candidate {candidate.shape}"
        )
    r = reference.astype(np.float64).ravel()
    c = candidate.astype(np.float64).ravel()
    diff = np.abs(c - r)
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    eps = 1e-6 * scale if scale > 0 else 1e-12
    nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
    if nr == 0 and nc == 0:
        cosine = 1.0
    elif nr == 0 or nc == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(r, c) / (nr * nc))
    noise = float(np.sum(diff**2))
    signal = float(np.sum(r**2))
    if noise == 0:
        sqnr = math.inf
    elif signal == 0:
        sqnr = -math.inf
    else:
        sqnr = 10 * math.log10(signal / noise)
    top1 = None
    if _is_classifier_like(reference):
        ref_rows, cand_rows = rows(reference), rows(candidate)
        agree = ref_rows.argmax(-1) == cand_rows.argmax(-1)
        # argmax of a row with NaN picks the NaN: a non-finite candidate row never agrees
        # (unless the reference row is non-finite too).
        agree &= np.all(np.isfinite(cand_rows), -1) | ~np.all(np.isfinite(ref_rows), -1)
        top1 = float(np.mean(agree))
    return {
        "top1_agreement": top1,
        "cosine": cosine,
        "sqnr_db": sqnr,
        "max_abs_error": float(diff.max()) if diff.size else 0.0,
        "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
        "max_rel_error": float(np.max(diff / (np.abs(r) + eps))) if diff.size else 0.0,
    }
