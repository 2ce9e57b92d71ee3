"""Latency statistics and the bootstrap confidence interval of a median ratio.

Ratio method (paired percentile bootstrap): models run interleaved, so run ``k`` of every
model belongs to the same *round* ``k`` and saw the same machine state. One bootstrap
replicate draws ``n`` round indices with replacement (``n`` = number of rounds) and computes
``median(candidate[idx]) / median(reference[idx])``; the 95% interval is the 2.5th and
97.5th percentile of ``resamples`` replicates. Resampling whole rounds keeps the pairing, so
slow phases of the machine (thermal throttling, a background job) widen both medians alike
instead of the interval. The generator is seeded, so the interval is reproducible.

A second estimate, :func:`paired_ratio_ci`, is the median of the per-round ratios
``candidate_k / reference_k`` with the same bootstrap. It cancels drift between rounds
completely and is the tighter one on a busy machine; both are reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "BOOTSTRAP_METHOD",
    "PAIRED_METHOD",
    "LatencyStats",
    "RatioCI",
    "latency_stats",
    "median_ratio_ci",
    "paired_ratio_ci",
]

PAIRED_METHOD = (
    "paired percentile bootstrap over interleaved rounds of the median of per-round ratios "
    "candidate_k / reference_k, 2.5/97.5 percentiles"
)
BOOTSTRAP_METHOD = (
    "paired percentile bootstrap over interleaved rounds: resample round indices with "
    "replacement, ratio of medians per replicate, 2.5/97.5 percentiles"
)


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Summary of one model's latencies, in milliseconds."""

    runs: int
    median: float
    mean: float
    std: float
    min: float
    max: float
    p10: float
    p25: float
    p75: float
    p90: float
    p99: float

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RatioCI:
    """``median(candidate) / median(reference)`` with its bootstrap confidence interval."""

    ratio: float
    low: float
    high: float
    confidence: float
    resamples: int
    seed: int
    method: str = BOOTSTRAP_METHOD

    def to_dict(self) -> dict[str, float | int | str]:
        return dataclasses.asdict(self)


def latency_stats(latencies_ms: Sequence[float]) -> LatencyStats:
    """Median, mean, std (sample, ddof=1), extremes and percentiles of ``latencies_ms``."""
    data = np.asarray(latencies_ms, dtype=np.float64)
    if data.size == 0:
        raise ValueError("no latencies")
    p10, p25, p50, p75, p90, p99 = np.percentile(data, [10, 25, 50, 75, 90, 99])
    return LatencyStats(
        runs=int(data.size),
        median=float(p50),
        mean=float(data.mean()),
        std=float(data.std(ddof=1)) if data.size > 1 else 0.0,
        min=float(data.min()),
        max=float(data.max()),
        p10=float(p10),
        p25=float(p25),
        p75=float(p75),
        p90=float(p90),
        p99=float(p99),
    )


def _paired(reference: Sequence[float], candidate: Sequence[float]) -> tuple[np.ndarray, ...]:
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape or ref.ndim != 1 or ref.size == 0:
        raise ValueError(f"paired latencies needed: reference {ref.shape}, candidate {cand.shape}")
    return ref, cand


def _bootstrap(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    resamples: int,
    seed: int,
    max_batch_elements: int,
) -> np.ndarray:
    """``statistic(idx)`` for ``resamples`` draws of ``n`` round indices (rows of ``idx``)."""
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    batch = max(1, max_batch_elements // n)
    for start in range(0, resamples, batch):
        stop = min(resamples, start + batch)
        values[start:stop] = statistic(rng.integers(0, n, size=(stop - start, n)))
    return values


def median_ratio_ci(
    reference: Sequence[float],
    candidate: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    max_batch_elements: int = 4_000_000,
) -> RatioCI:
    """Bootstrap CI of ``median(candidate) / median(reference)`` over paired rounds.

    Args:
        reference: Latencies of the reference model, one per round.
        candidate: Latencies of the candidate model, same rounds, same order.
        confidence: Two-sided coverage of the interval.
        resamples: Bootstrap replicates.
        seed: Seed of the resampling generator.
        max_batch_elements: Replicates are computed in batches of at most this many drawn
            indices, bounding memory for long runs.

    Returns:
        The point ratio (of the full-sample medians) and the percentile interval.
    """
    ref, cand = _paired(reference, candidate)
    ratios = _bootstrap(
        lambda idx: np.median(cand[idx], axis=1) / np.median(ref[idx], axis=1),
        ref.size,
        resamples=resamples,
        seed=seed,
        max_batch_elements=max_batch_elements,
    )
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    return RatioCI(
        ratio=float(np.median(cand) / np.median(ref)),
        low=float(low),
        high=float(high),
        confidence=confidence,
        resamples=resamples,
        seed=seed,
    )


def paired_ratio_ci(
    reference: Sequence[float],
    candidate: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    max_batch_elements: int = 4_000_000,
) -> RatioCI:
    """Bootstrap CI of the median of per-round ratios ``candidate_k / reference_k``.

    Robust to machine drift *between* rounds (a slow phase scales both runs of a round), so
    on a busy machine its interval is tighter than :func:`median_ratio_ci`'s. Same
    arguments and resampling as :func:`median_ratio_ci`.
    """
    ref, cand = _paired(reference, candidate)
    per_round = cand / ref
    ratios = _bootstrap(
        lambda idx: np.median(per_round[idx], axis=1),
        ref.size,
        resamples=resamples,
        seed=seed,
        max_batch_elements=max_batch_elements,
    )
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    return RatioCI(
        ratio=float(np.median(per_round)),
        low=float(low),
        high=float(high),
        confidence=confidence,
        resamples=resamples,
        seed=seed,
        method=PAIRED_METHOD,
    )
