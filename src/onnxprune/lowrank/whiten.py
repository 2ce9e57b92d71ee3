"""Activation-aware decompositions and the calibration statistics they need.

Plain SVD minimizes the weight error ``||W - W_r||_F``; what matters is the layer output
error ``||X W - X W_r||_F`` on real inputs ``X`` (rows = tokens or samples). With the input
Gram matrix ``G = X^T X / rows``, that error is ``||L^T (W - W_r)||_F`` where ``G = L L^T``
(Cholesky). Every decomposition here has the form ``W = P M`` with an invertible ``P``, the
SVD ``M = U S V^T`` and factors ``A = (P U)_r S_r``, ``B = V_r^T``:

* ``svd``:      ``P = I``, ``M = W`` (weight-space optimal, Eckart-Young).
* ``svd-llm``:  ``P = L^{-T}``, ``M = L^T W`` (SVD-LLM whitening): truncating ``M`` is
  optimal for the output error, and that error is exactly ``sqrt(rows * sum_{i>r} s_i^2)``.
* ``asvd``:     ``P = diag(d)^{-1}``, ``M = diag(d) W`` with ``d_k = mean|x_k|^alpha`` (ASVD
  per-channel scaling, alpha = 0.5): cheaper statistics, no optimality guarantee.

For any of them the output error of the rank-``r`` truncation is exactly (the ``V`` columns
are orthonormal, so cross terms vanish)::

    ||X (W - W_r)||_F^2 / rows = sum_{i > r} s_i^2 q_i^T G q_i,    q_i = P u_i

Statistics are collected streaming: the layer inputs become extra outputs of a copy of the
model, each calibration feed is run once and ``X^T X`` (``K x K`` per distinct input) and
``sum |x|`` are accumulated in float64, so memory is bounded by the Gram matrices plus one
feed's activations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxprune.errors import CalibrationError
from onnxprune.intermediates import iter_intermediates
from onnxprune.lowrank._linalg import svd

__all__ = ["ASVD_ALPHA", "Decomposition", "InputStats", "collect_input_stats", "decompose"]

logger = logging.getLogger(__name__)

#: Exponent of the ASVD channel scale ``d_k = mean|x_k|^alpha``.
ASVD_ALPHA = 0.5


@dataclasses.dataclass
class InputStats:
    """Streaming statistics of one layer input ``x`` reshaped to ``[rows, K]``."""

    gram: np.ndarray
    abs_sum: np.ndarray
    rows: int = 0

    @classmethod
    def empty(cls, k: int) -> InputStats:
        """Zero statistics for ``K`` channels."""
        return cls(np.zeros((k, k)), np.zeros(k))

    def update(self, x: np.ndarray) -> None:
        """Accumulate a batch of inputs (last axis = channels)."""
        array = np.asarray(x, dtype=np.float64)
        rows = array.reshape(math.prod(array.shape[:-1]), self.gram.shape[0])
        self.gram += rows.T @ rows
        self.abs_sum += np.abs(rows).sum(axis=0)
        self.rows += rows.shape[0]

    @property
    def covariance(self) -> np.ndarray:
        """``G = X^T X / rows`` (uncentred second moment)."""
        return self.gram / max(self.rows, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        """``mean |x_k|`` per channel."""
        return self.abs_sum / max(self.rows, 1)


@dataclasses.dataclass
class Decomposition:
    """``W ~= (Q_r S_r) V_r^T``; ``errors[i]`` is component i's output-error share, if known."""

    q: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    errors: np.ndarray | None = None
    total: float | None = None

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(A, B)`` of shapes ``[m, rank]`` and ``[rank, n]``."""
        return self.q[:, :rank] * self.s[:rank], self.vt[:rank]

    def output_error(self, rank: int) -> float | None:
        """Relative output error ``||X (W - W_r)||_F / ||X W||_F`` (None without statistics)."""
        if self.errors is None or not self.total:
            return None
        return float(np.sqrt(max(self.errors[rank:].sum(), 0.0) / self.total))


def _cholesky(g: np.ndarray) -> np.ndarray:
    """Lower ``L`` with ``L L^T = G + lambda I``; ``lambda`` grows until ``G`` is definite."""
    scale = float(np.mean(np.diag(g))) or 1.0
    damp = 1e-8 * scale
    for _ in range(12):
        try:
            return np.linalg.cholesky(g + damp * np.eye(len(g)))
        except np.linalg.LinAlgError:
            damp *= 10.0
    raise np.linalg.LinAlgError("input Gram matrix is not positive definite even with damping")


def decompose(w: np.ndarray, method: str = "svd", stats: InputStats | None = None) -> Decomposition:
    """Decompose ``w`` (``[m, n]``, applied as ``x @ w``) by ``method``; see the module doc."""
    w = np.asarray(w, dtype=np.float64)
    if method == "svd":
        u, s, vt = svd(w)
        q = u
    elif stats is None:
        raise ValueError(f"method {method!r} needs input statistics")
    elif method == "svd-llm":
        lower = _cholesky(stats.covariance)
        u, s, vt = svd(lower.T @ w)
        q = np.linalg.solve(lower.T, u)  # P U = L^{-T} U
    elif method == "asvd":
        d = np.maximum(stats.mean_abs, 1e-8 * max(float(stats.mean_abs.max()), 1e-30))
        d = d**ASVD_ALPHA
        u, s, vt = svd(d[:, None] * w)
        q = u / d[:, None]
    else:
        raise ValueError(f"unknown method {method!r}")
    if stats is None:
        return Decomposition(q, s, vt)
    g = stats.covariance
    errors = s**2 * np.sum(q * (g @ q), axis=0)  # s_i^2 q_i^T G q_i
    total = float(np.sum(w * (g @ w)))  # tr(W^T G W)
    return Decomposition(q, s, vt, errors, total)


def _refuse_nonfinite(name: str, x: np.ndarray, sample: int) -> None:
    bad = np.size(x) - int(np.count_nonzero(np.isfinite(x)))
    if bad:
        raise CalibrationError(
            f"layer input {name!r} has {bad} non-finite values (NaN or Inf) on calibration "
            f"sample {sample}; activation-aware factorization needs finite activations"
        )


def collect_input_stats(
    model: ir.Model,
    inputs: Mapping[str, int],
    feeds: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, InputStats]:
    """Accumulate :class:`InputStats` for the values ``inputs`` (name -> channels K).

    The model is not modified: a temporary copy with the extra outputs is run in
    onnxruntime (graph optimizations off, one thread), one feed at a time.
    """
    names = sorted(inputs)
    stats = {name: InputStats.empty(inputs[name]) for name in names}
    if not names:
        return stats
    count = 0
    for values in iter_intermediates(model, names, feeds, threads=1):
        for name in names:
            _refuse_nonfinite(name, values[name], count)
            stats[name].update(values[name])
        count += 1
    logger.info("collected input statistics of %d values over %d feeds", len(names), count)
    return stats
