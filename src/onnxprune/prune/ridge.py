"""Ridge refit toward the un-refit weights, its strength chosen by leave-feeds-out CV.

A consumer's rows ``D`` (inputs, plus a column of ones for a bias) and teacher outputs ``T``
come from calibration feeds split into ``F`` folds of whole, consecutive feeds. With ``S0``
the un-refit solution (the pruned, compensated weights) and ``E = T - D S0`` its error, the
refit is ``S = S0 + Delta`` with

    Delta(lam) = argmin ||E - D Delta||^2 + lam * n * sum_k p_k ||Delta_k||^2
               = (G + lam * n * P)^-1 r,       G = D^T D,  r = D^T E,  P = diag(p)

``p_k = G[k, k] / n`` (the mean square of column ``k``, so ``lam`` is scale free and the
bias row is shrunk like any other) and ``n`` the number of rows. ``lam -> inf`` gives
``Delta = 0``: no refit. Everything needed per fold is ``G_f``, ``r_f`` and
``e_f = ||E_f||^2``, accumulated feed by feed; the error of ``Delta`` on fold ``f`` is
``e_f - 2 <Delta, r_f> + <Delta, G_f Delta>``. For each fold, the model fitted on the
other folds is solved for every ``lam`` of a grid through one eigendecomposition of
``P^-1/2 G P^-1/2``. The strength with the least held-out error over all folds wins,
``inf`` (no refit) included; a finite one must beat no refit by :data:`MIN_GAIN` overall
and consistently over the folds (:data:`MIN_T` standard errors), else no refit is kept.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "GRID",
    "MIN_GAIN",
    "CrossValidated",
    "Folds",
    "cross_validated_refit",
    "fold_of",
    "refit_with",
]

#: Candidate strengths ``lam`` (relative to the mean square of each column); inf = no refit.
GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 100.0, np.inf)
#: A refit is kept when its held-out squared error is below (1 - MIN_GAIN) of no refit's.
MIN_GAIN = 0.05
#: ... and its per-fold gains must average this many standard errors above zero.
MIN_T = 2.0
#: At most this many folds.
MAX_FOLDS = 5


def fold_of(feeds: int, folds: int = MAX_FOLDS) -> list[int]:
    """Fold of each feed: ``min(folds, feeds)`` blocks of consecutive feeds (whole feeds, so
    neighbouring crops of one photo stay together)."""
    count = max(1, min(folds, feeds))
    return [index * count // max(feeds, 1) for index in range(feeds)]


@dataclasses.dataclass
class Folds:
    """Normal equations per fold: ``gram[f] = D_f^T D_f``, ``cross[f] = D_f^T T_f``."""

    gram: np.ndarray  # [F, K, K]
    cross: np.ndarray  # [F, K, N]
    target_sq: np.ndarray  # [F]
    rows: np.ndarray  # [F]

    @classmethod
    def zeros(cls, folds: int, k: int, n: int) -> Folds:
        return cls(
            np.zeros((folds, k, k)), np.zeros((folds, k, n)), np.zeros(folds), np.zeros(folds)
        )

    def add(self, fold: int, design: np.ndarray, target: np.ndarray) -> None:
        self.gram[fold] += design.T @ design
        self.cross[fold] += design.T @ target
        self.target_sq[fold] += float(np.sum(target * target))
        self.rows[fold] += len(design)


@dataclasses.dataclass
class CrossValidated:
    """The chosen solution and the relative errors behind the choice."""

    solution: np.ndarray  # [K, N]; equals s0 when no refit was kept
    strength: float  # inf: no refit
    fit_before: float  # on all rows: no refit
    fit_after: float  # on all rows: the chosen solution
    heldout_before: float  # over held-out folds: no refit
    heldout_after: float  # over held-out folds: the chosen strength


def _error_terms(folds: Folds, s0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``r_f = D_f^T E_f`` and ``e_f = ||E_f||^2`` for the error ``E = T - D s0``."""
    g_s0 = np.einsum("fij,jn->fin", folds.gram, s0)
    r = folds.cross - g_s0
    e = folds.target_sq - 2 * np.einsum("fkn,kn->f", folds.cross, s0)
    e = e + np.einsum("kn,fkn->f", s0, g_s0)
    return r, np.maximum(e, 0.0)


def _scales(gram: np.ndarray, rows: float) -> np.ndarray:
    """``p_k``: mean square of each column, floored so an all-zero column stays finite."""
    p = np.diag(gram) / max(rows, 1.0)
    return np.maximum(p, 1e-12 * max(float(p.mean()), 1e-30))


def _path(gram: np.ndarray, r: np.ndarray, p: np.ndarray, rows: float) -> list[np.ndarray]:
    """``Delta(lam)`` for every finite ``lam`` of :data:`GRID` (one eigendecomposition)."""
    root = 1.0 / np.sqrt(p)
    values, vectors = np.linalg.eigh(gram * root[:, None] * root[None, :])
    projected = vectors.T @ (r * root[:, None])
    deltas = []
    for lam in GRID:
        if np.isinf(lam):
            continue
        coef = projected / np.maximum(values + lam * rows, 1e-300)[:, None]
        deltas.append((vectors @ coef) * root[:, None])
    return deltas


def _heldout(gram: np.ndarray, r: np.ndarray, e: float, delta: np.ndarray) -> float:
    return float(e - 2 * np.sum(delta * r) + np.sum(delta * (gram @ delta)))


def _cv_errors(folds: Folds, r: np.ndarray, e: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Held-out squared error ``[strength of GRID, fold]``."""
    errors = np.zeros((len(GRID), len(folds.rows)))
    errors[-1] = e
    total_g, total_r, total_rows = folds.gram.sum(0), r.sum(0), float(folds.rows.sum())
    for f in range(len(folds.rows)):
        if folds.rows[f] == 0:
            continue
        train_rows = total_rows - folds.rows[f]
        deltas = _path(total_g - folds.gram[f], total_r - r[f], p, train_rows)
        for i, delta in enumerate(deltas):
            errors[i, f] = _heldout(folds.gram[f], r[f], float(e[f]), delta)
    return errors


def _significant(gains: np.ndarray, total: float) -> bool:
    """Whether per-fold gains over no refit are real: their sum is at least
    :data:`MIN_GAIN` of no refit's error and their mean is :data:`MIN_T` standard errors
    above zero (a chance dip on pure noise rarely is, a real improvement is on every fold)."""
    if gains.sum() < MIN_GAIN * total:
        return False
    spread = float(gains.std(ddof=1)) / np.sqrt(len(gains)) if len(gains) > 1 else 0.0
    return float(gains.mean()) > MIN_T * spread


def refit_with(folds: Folds, s0: np.ndarray, strength: float) -> np.ndarray:
    """The solution ``S0 + Delta(lam)`` on all folds for one strength ``lam`` (inf: ``S0``)."""
    if np.isinf(strength):
        return s0
    r, _ = _error_terms(folds, s0)
    gram, rows = folds.gram.sum(0), float(folds.rows.sum())
    p = _scales(gram, rows)
    return s0 + np.linalg.solve(gram + strength * rows * np.diag(p), r.sum(0))


def cross_validated_refit(folds: Folds, s0: np.ndarray) -> CrossValidated:
    """Refit toward ``s0`` with the strength that predicts held-out feeds best."""
    r, e = _error_terms(folds, s0)
    norm = float(folds.target_sq.sum()) or 1.0
    total_g, total_rows = folds.gram.sum(0), float(folds.rows.sum())
    p = _scales(total_g, total_rows)
    before = float(np.sqrt(e.sum() / norm))
    populated = int(np.count_nonzero(folds.rows))
    if populated < 2:  # nothing to validate on: no refit
        return CrossValidated(s0, np.inf, before, before, before, before)
    per_fold = _cv_errors(folds, r, e, p)[:, folds.rows > 0]
    errors = per_fold.sum(axis=1)
    best = int(np.argmin(errors[:-1]))
    if not _significant(per_fold[-1] - per_fold[best], float(errors[-1])):
        heldout = float(np.sqrt(max(errors[-1], 0.0) / norm))
        return CrossValidated(s0, np.inf, before, before, heldout, heldout)
    finite = [lam for lam in GRID if not np.isinf(lam)]
    # One solve at the chosen strength, not a whole path: an eigendecomposition costs as
    # much as ten solves, and per consumer it was one of six (DenseNet-121: 120 consumers).
    delta = np.linalg.solve(total_g + finite[best] * total_rows * np.diag(p), r.sum(0))
    after = _heldout(total_g, r.sum(0), float(e.sum()), delta)
    return CrossValidated(
        s0 + delta,
        float(finite[best]),
        before,
        float(np.sqrt(max(after, 0.0) / norm)),
        float(np.sqrt(max(errors[-1], 0.0) / norm)),
        float(np.sqrt(max(errors[best], 0.0) / norm)),
    )
