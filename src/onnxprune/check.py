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

from onnxprune.calib import CalibrationData, InputSpec
from onnxprune.errors import BudgetError
from onnxprune.feeds import synthetic_feeds
from onnxprune.metrics import output_metrics
from onnxprune.runtime import make_session

__all__ = ["EquivalenceResult", "check_equivalent", "check_feeds"]


@dataclasses.dataclass
class EquivalenceResult:
    """Worst-case metrics per output over all feeds."""

    samples: int
    outputs: dict[str, dict[str, float | None]]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_feeds(
    specs: Sequence[InputSpec],
    calib: CalibrationData | None,
    dims: Mapping[str, int] | None = None,
    count: int = 4,
) -> list[dict[str, np.ndarray]]:
    """Up to ``count`` feeds: calibration samples when available, else synthetic ones."""
    if calib is not None:
        return list(calib.feeds(range(min(count, len(calib)))))
    bound = {str(d): 1 for s in specs for d in s.dims if not isinstance(d, int)}
    bound.update(dims or {})
    return synthetic_feeds(specs, bound, count=count, seed=0)


def check_equivalent(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    rtol: float = 1e-4,
) -> EquivalenceResult:
    """Raise BudgetError unless every output agrees within ``rtol`` of its magnitude.

    The bound per output is ``max|c - r| <= rtol * max(1, max|r|)``: float rewrites such as
    BatchNorm folding reassociate sums, so bit equality is not expected, but anything larger
    is a bug.
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
            bound = rtol * max(1.0, float(np.max(np.abs(r[finite]), initial=0.0)))
            if not same_nonfinite or not error <= bound:
                raise BudgetError(
                    f"output {name!r} changed: max abs error {error:.3g} "
                    f"> {bound:.3g}; the rewrite is not exact, nothing written"
                )
            prev = worst.get(name)
            if prev is None or metrics["max_abs_error"] > prev["max_abs_error"]:  # type: ignore[operator]
                worst[name] = metrics
    return EquivalenceResult(samples=len(feeds), outputs=worst)
