"""Post-rewrite numerical check: run the original and the rewritten file side by side.

Every command that rewrites a model calls :func:`check_equivalent` on the written temporary
file before publishing it, so a rewrite that changed the outputs is never silently saved.
Feeds come from calibration data when given, else are generated (symbolic dims bound to
``dims`` or 1).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.calib import CalibrationData, InputSpec
from onnxprune.errors import BudgetError, UsageError
from onnxprune.failures import RUNTIME_ERRORS, runtime_reason
from onnxprune.feeds import synthetic_feeds
from onnxprune.metrics import output_metrics
from onnxprune.runtime import make_session, run_model

ModelLike = str | os.PathLike[str] | ir.Model

#: The exactness bound is at least this many machine epsilons of the output's dtype.
DTYPE_ULPS = 8

__all__ = [
    "EquivalenceResult",
    "check_equivalent",
    "check_feeds",
    "default_dims",
    "probe_default_dims",
]


@dataclasses.dataclass
class EquivalenceResult:
    """Worst-case metrics per output over all feeds."""

    samples: int
    outputs: dict[str, dict[str, float | None]]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_dims(
    specs: Sequence[InputSpec], dims: Mapping[str, int] | None = None
) -> tuple[dict[str, int], list[str]]:
    """Every symbolic dim bound: from ``dims``, else 1.

    Also returns the dims bound to 1 by default on an axis other than the first: a batch
    axis of 1 is harmless, a channel or feature axis of 1 usually is not.
    """
    given = dict(dims or {})
    bound: dict[str, int] = {}
    guessed: list[str] = []
    for spec in specs:
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                continue
            bound[dim] = given.get(dim, 1)
            if dim not in given and axis > 0 and dim not in guessed:
                guessed.append(dim)
    return bound, guessed


def probe_default_dims(
    model: ModelLike, feed: Mapping[str, np.ndarray], guessed: Sequence[str]
) -> None:
    """Run ``model`` once on a generated ``feed`` when ``guessed`` dims were bound to 1.

    Raises:
        UsageError: the model does not run with them (e.g. a symbolic channel axis), naming
            the dims and onnxruntime's reason.
    """
    if not guessed:
        return
    try:
        run_model(model, feed)
    except RUNTIME_ERRORS as exc:
        names = ", ".join(f"{d}=1" for d in guessed)
        raise UsageError(
            f"the model does not run on generated inputs with symbolic dims bound to 1 by "
            f"default ({names}): onnxruntime says {runtime_reason(exc)}; give their sizes "
            "with --dim NAME=SIZE or give --calib data"
        ) from None


def check_feeds(
    specs: Sequence[InputSpec],
    calib: CalibrationData | None,
    dims: Mapping[str, int] | None = None,
    count: int = 4,
    *,
    model: ModelLike | None = None,
) -> list[dict[str, np.ndarray]]:
    """Up to ``count`` feeds: calibration samples when available, else synthetic ones.

    With ``model``, synthetic feeds are first tried on it (:func:`probe_default_dims`).
    """
    if calib is not None:
        return list(calib.feeds(range(min(count, len(calib)))))
    bound, guessed = default_dims(specs, dims)
    feeds = synthetic_feeds(specs, bound, count=count, seed=0)
    if model is not None and feeds:
        probe_default_dims(model, feeds[0], guessed)
    return feeds


def _max_abs_error(metrics: dict[str, float | None]) -> float:
    """``max_abs_error`` of :func:`output_metrics` (always a number, unlike SQNR)."""
    value = metrics["max_abs_error"]
    assert value is not None
    return value


def check_equivalent(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    rtol: float = 1e-4,
) -> EquivalenceResult:
    """Raise BudgetError unless every output agrees within ``rtol`` of its magnitude.

    The bound per output is ``max|c - r| <= tol * max(1, max|r|)`` with
    ``tol = max(rtol, DTYPE_ULPS * eps(output dtype))``: float rewrites such as BatchNorm
    folding reassociate sums and round the folded weights to the model's dtype, so bit
    equality is not expected, but anything larger is a bug. The ``eps`` term only matters
    below float32 (float16: ``8 * 2**-10``, about 0.8 %, where one rounding of a folded
    weight is already 0.05 %).
    """
    ref_sess = make_session(reference)
    cand_sess = make_session(candidate)
    names = [o.name for o in ref_sess.get_outputs()]
    cand_names = [o.name for o in cand_sess.get_outputs()]
    if names != cand_names:
        raise BudgetError(f"rewritten model has outputs {cand_names}, expected {names}")
    worst: dict[str, dict[str, float | None]] = {}
    for feed in feeds:
        refs = ref_sess.run(names, dict(feed))
        cands = cand_sess.run(names, dict(feed))
        for name, r, c in zip(names, refs, cands, strict=True):
            if r.shape != c.shape:
                raise BudgetError(f"output {name!r}: shape {c.shape}, expected {r.shape}")
            if not np.issubdtype(r.dtype, np.floating):
                if not np.array_equal(r, c):
                    raise BudgetError(f"output {name!r}: non-float values differ")
                continue
            metrics = output_metrics(r, c)
            # NaN compares False with everything, so compare the finite part by value and
            # the non-finite part of the original (NaN, inf) by identity.
            finite = np.isfinite(r)
            same_nonfinite = np.array_equal(r[~finite], c[~finite], equal_nan=True)
            error = float(np.max(np.abs(c[finite] - r[finite]), initial=0.0))
            tol = max(rtol, DTYPE_ULPS * float(np.finfo(r.dtype).eps))
            bound = tol * max(1.0, float(np.max(np.abs(r[finite]), initial=0.0)))
            if not same_nonfinite or not error <= bound:
                raise BudgetError(
                    f"output {name!r} changed: max abs error {error:.3g} "
                    f"> {bound:.3g}; the rewrite is not exact, nothing written"
                )
            prev = worst.get(name)
            if prev is None or _max_abs_error(metrics) > _max_abs_error(prev):
                worst[name] = metrics
    return EquivalenceResult(samples=len(feeds), outputs=worst)
