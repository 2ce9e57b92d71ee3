"""The OBS update's dampening, chosen per layer by its error on held-out calibration feeds.

SparseGPT's dampening ``lambda = damp * mean(diag(H))`` is a ridge: it pulls the refit
target ``W*`` (:func:`~onnxprune.sparsity.sparsegpt.refit_target`) toward the layer's own
weight ``W``, and the OBS compensation toward none (``lambda -> inf`` is the plain mask).
Where a layer has few calibration rows per input (a classifier reads one row per image:
512 rows for 1280 inputs) or strongly correlated ones (the 49 positions of a 7x7 map), a
small ``lambda`` fits the calibration rows and not the next input. On the zoo's
MobileNetV2 at 50 % sparsity the sequential update with the fixed ``damp = 0.01`` scored
23.7 dB on its own calibration photos and 5.8 dB on unseen ones.

Every candidate of :data:`DAMP_GRID`, and no update at all, prunes the layer on the fit
feeds' sums only (:meth:`InputStats.fit_part`); its output error on the held-out feeds
(:class:`~onnxprune.sparsity.activations.HeldOut`)::

    e(W') = sum_n ||W x_ref,n - W' x_n||^2
          = tr(W R W^T) - 2 <W', W C^T> + tr(W' G W'^T)

(``G = X^T X``, ``C = X^T X_ref``, ``R = X_ref^T X_ref`` over the held-out rows; ``x_ref``
is the dense model's input, ``= x`` without one) decides. The winner is then applied
with all feeds' sums. (Applying it with the fit feeds only keeps the held-out feeds unseen
by every earlier layer's fit, so later choices are judged on inputs as fresh as a user's;
on MobileNetV2 at 50 % that scored 6.18 dB on the evaluation photos against 6.45 dB with
all feeds, the quarter of rows it gives up costing more than the bias it removes.) Errors
are reported relative to ``tr(W R W^T)``, the held-out output energy.

Limit: the held-out feeds are chosen by position (:func:`~onnxprune.sparsity.activations.is_held`),
so crops of one photo, or near-duplicate photos, can sit on both sides; on the zoo's
MobileNetV2 the held-out quarter scored like the fitted feeds (17.7 dB) while photos of
other sources scored 7.9 dB. The choice guards against fitting the rows, not against a
shift between the calibration data and the user's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from onnxprune.sparsity.activations import HeldOut, InputStats

__all__ = ["DAMP_GRID", "DEFAULT_DAMP", "Damping", "choose_damp", "heldout_error"]

#: Candidate dampenings (fractions of the mean Hessian diagonal).
DAMP_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: The dampening used when no feed was held out (SparseGPT's default).
DEFAULT_DAMP = 0.01

#: ``prune(damp, stats) -> (new weights, keep-mask)``; ``damp`` None: no update.
Pruner = Callable[[float | None, InputStats], tuple[np.ndarray, np.ndarray]]


def heldout_error(w: np.ndarray, new: np.ndarray, held: HeldOut) -> float:
    """``e(W') / tr(W R W^T)`` over the held-out rows (module docstring)."""
    w = w.astype(np.float64)
    new = new.astype(np.float64)
    energy = float(np.sum((w @ held.target) * w))  # BLAS products, not einsum's loops
    cross = float(np.sum(new * (w @ held.cross.T)))
    own = float(np.sum((new @ held.gram) * new))
    return max(energy - 2 * cross + own, 0.0) / energy if energy > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Damping:
    """The choice for one layer: the dampening (None: no update) and every candidate's
    relative held-out error (keys: the dampening, or ``"none"``)."""

    damp: float | None
    errors: dict[str, float]


def choose_damp(prune: Pruner, w: np.ndarray, stats: InputStats) -> Damping:
    """The candidate (a dampening of :data:`DAMP_GRID`, or no update) whose pruning on the
    fit feeds has the least held-out output error; :data:`DEFAULT_DAMP` without held-out
    rows. Ties keep the earlier candidate (the grid order, no update last)."""
    held = stats.held
    if held is None or held.rows == 0:
        return Damping(DEFAULT_DAMP, {})
    fit = stats.fit_part()
    errors: dict[str, float] = {}
    best: tuple[float, float | None] | None = None
    for damp in (*DAMP_GRID, None):
        new, _ = prune(damp, fit)
        error = heldout_error(w, new, held)
        errors["none" if damp is None else f"{damp:g}"] = error
        if best is None or error < best[0]:
            best = (error, damp)
    assert best is not None
    return Damping(best[1], errors)
