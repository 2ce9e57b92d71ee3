"""``prune --target-latency F``: the MACs fraction whose pruned model runs at ``F`` of the
input's measured latency.

MACs are a proxy; time is what users buy, and the two part ways (memory-bound layers, kernels
that only speed up at some widths). The search prunes at a MACs fraction ``t`` (the same plan
``--target-macs t`` would make, without the refit, which does not change the latency), measures
the candidate against the input in one interleaved onnxruntime run on the chosen threads, and
moves ``t`` by bisection on the measured ratio ``r(t)`` (assumed to grow with ``t``, up to noise):

* start at ``t = F``;
* keep a bracket ``[lo, hi]``: the largest ``t`` measured at or below ``F`` and the smallest
  measured above it; the next ``t`` is the midpoint;
* stop when the bracket is narrower than :data:`TOLERANCE` or after :data:`MAX_PROBES`
  measurements.

The answer is the largest ``t`` measured at or below ``F`` (the least pruning that meets it),
else the smallest ``t`` tried, with a note. The choice depends on the machine's timing, so
unlike the other amounts it is not byte-reproducible; the report carries every probe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_PROBES", "TOLERANCE", "LatencySearch", "search_macs_for_latency"]

#: Measurements at most (each a prune and a short interleaved benchmark).
MAX_PROBES = 6
#: Bracket width in MACs fraction at which the search stops.
TOLERANCE = 0.02
#: The smallest MACs fraction the search tries.
_FLOOR = 0.05


@dataclasses.dataclass
class LatencySearch:
    """The MACs fraction chosen for a latency target, and the probes it was chosen from."""

    target: float
    macs_fraction: float
    reached: bool
    probes: list[tuple[float, float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_latency": self.target,
            "macs_fraction": self.macs_fraction,
            "reached": self.reached,
            "probes": [{"macs_fraction": t, "latency_ratio": r} for t, r in self.probes],
            "note": "measured latency ratios: the choice depends on the machine",
        }

    def summary(self) -> str:
        measured = dict(self.probes)[self.macs_fraction]
        head = (
            f"--target-latency {self.target:.2f}: pruned to {self.macs_fraction:.3f} of the MACs, "
            f"measured {measured:.2f} of the input's latency"
        )
        if not self.reached:
            head += " (not reached: the smallest fraction tried)"
        return f"{head} ({len(self.probes)} probes)"


def search_macs_for_latency(
    target: float,
    latency_ratio: Callable[[float], float],
    *,
    max_probes: int = MAX_PROBES,
    tolerance: float = TOLERANCE,
) -> LatencySearch:
    """The largest MACs fraction whose measured ``latency_ratio(t) <= target`` (bisection).

    Args:
        target: The latency fraction wanted, in (0, 1).
        latency_ratio: Prunes at MACs fraction ``t`` and returns the candidate's measured
            latency over the input's.
    """
    if not 0 < target < 1:
        raise ValueError(f"latency target {target} must be in (0, 1)")
    lo: float | None = None  # largest t measured at or below the target
    hi: float | None = None  # smallest t measured above it
    probes: list[tuple[float, float]] = []
    t = target
    for _ in range(max_probes):
        ratio = latency_ratio(t)
        probes.append((t, ratio))
        if ratio <= target:
            lo = t if lo is None else max(lo, t)
        else:
            hi = t if hi is None else min(hi, t)
        if lo is not None and hi is not None:
            if hi - lo <= tolerance:
                break
            t = (lo + hi) / 2
        elif lo is not None:  # everything tried is fast enough: prune less
            if lo >= 1 - tolerance:
                break
            t = (lo + 1) / 2
        else:  # everything tried is too slow: prune more
            assert hi is not None
            if hi <= _FLOOR + tolerance:
                break
            t = max(_FLOOR, hi / 2)
    if lo is not None:
        return LatencySearch(target, lo, True, probes)
    smallest = min(t for t, _ in probes)
    return LatencySearch(target, smallest, False, probes)
