"""95 % confidence intervals of held-out fidelity: how far a number from n samples goes.

A report measured on 16 held-out samples that says "top-1 agreement 0.75" claims more than
it knows: 12 of 16 agreeing is consistent with anything from about 0.5 to 0.9 (the zoo's
MobileNetV2 pruned to 0.75 of its MACs shows 0.75 on 16 held-out calibration crops and 0.51
on 190 unseen photos). Each held-out metric therefore carries its interval:

* ``top1_agreement``: with one row per sample, the Wilson score interval for ``k`` agreeing
  rows of ``n`` (``z = 1.96``), which stays inside [0, 1] and is not degenerate at 0 or n
  agreeing; with several rows per sample (tokens, a batch) the rows of one sample are not
  independent, so the bootstrap below is used instead;
* ``cosine`` and ``sqnr_db``: percentile bootstrap over samples (feeds), the sampling unit:
  ``B`` resamples of the feeds with replacement, each metric recomputed from the resampled
  feeds' sums (``<r, c>``, ``|r|^2``, ``|c|^2``, ``|c - r|^2``), the 2.5 and 97.5
  percentiles kept. Seeded, so the same outputs give the same interval.

An interval covers sampling noise only: held-out samples drawn from other data than the
calibration set (other photos, other sentences) can differ by more, so it is a floor on the
uncertainty, not a guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["RESAMPLES", "Z", "fidelity_intervals", "wilson"]

#: Standard normal quantile of a two-sided 95 % interval.
Z = 1.959963984540054
#: Bootstrap resamples of the feeds.
RESAMPLES = 1000


def wilson(agree: int, total: int, z: float = Z) -> tuple[float, float]:
    """Wilson score interval of a proportion ``agree / total``."""
    if total <= 0:
        return (0.0, 1.0)
    p = agree / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def _agreeing(reference: np.ndarray, candidate: np.ndarray) -> int:
    """Rows of one sample whose argmax agrees (a non-finite candidate row never does)."""
    ref = reference.reshape(-1, reference.shape[-1])
    cand = candidate.reshape(-1, candidate.shape[-1])
    agree = (ref.argmax(-1) == cand.argmax(-1)) & np.all(np.isfinite(cand), -1)
    return int(agree.sum())


def _sqnr(signal: np.ndarray, noise: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10 * np.log10(signal / noise)


def fidelity_intervals(
    references: Sequence[np.ndarray],
    candidates: Sequence[np.ndarray],
    *,
    top1_agreement: float | None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, list[float]]:
    """``{metric: [low, high]}`` for one output over its per-feed arrays (float outputs);
    ``top1_agreement`` is the pooled value (None where it does not apply)."""
    out: dict[str, list[float]] = {}
    if not references or not np.issubdtype(references[0].dtype, np.floating):
        return out
    r = [np.asarray(a, np.float64) for a in references]
    c = [np.asarray(a, np.float64) for a in candidates]
    per_feed_rows = [int(np.prod(a.shape[:-1])) for a in r]
    top1 = top1_agreement is not None and not math.isnan(top1_agreement)
    if top1 and all(n == 1 for n in per_feed_rows):
        total = len(per_feed_rows)
        out["top1_agreement"] = list(wilson(round(float(top1_agreement or 0.0) * total), total))
    if len(r) < 2:
        return out  # one sample: nothing to resample
    picks = np.random.default_rng(seed).integers(0, len(r), size=(resamples, len(r)))
    if top1 and "top1_agreement" not in out:
        agree = np.array(
            [
                np.sum(
                    a.reshape(-1, a.shape[-1]).argmax(-1) == b.reshape(-1, b.shape[-1]).argmax(-1)
                )
                for a, b in zip(r, c, strict=True)
            ],
            dtype=np.float64,
        )
        share = agree[picks].sum(axis=1) / np.asarray(per_feed_rows, np.float64)[picks].sum(axis=1)
        out["top1_agreement"] = [float(v) for v in np.percentile(share, [2.5, 97.5])]
    sums = np.array(
        [
            [np.sum(a * b), np.sum(a * a), np.sum(b * b), np.sum((b - a) ** 2)]
            for a, b in zip(r, c, strict=True)
        ]
    )
    if not np.all(np.isfinite(sums)):
        return out
    dot, rr, cc, noise = (sums[picks, k].sum(axis=1) for k in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        # as the metric: 1 when both are all zero, 0 when only one is
        cosine = np.where(
            (rr > 0) & (cc > 0), dot / np.sqrt(rr * cc), np.where((rr == 0) & (cc == 0), 1.0, 0.0)
        )
    sqnr = _sqnr(rr, noise)
    out["cosine"] = [float(v) for v in np.percentile(cosine, [2.5, 97.5])]
    finite = sqnr[np.isfinite(sqnr)]
    if finite.size == sqnr.size:  # an exact resample (infinite SQNR) leaves no interval
        out["sqnr_db"] = [float(v) for v in np.percentile(sqnr, [2.5, 97.5])]
    return out
