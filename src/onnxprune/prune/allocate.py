"""Sensitivity-guided per-group pruning ratios for a global MACs target.

:func:`allocate_ratios` turns a :class:`~onnxprune.prune.sensitivity.SensitivityResult` into
per-group ratios for a global MACs target (the fraction kept), for
``PruneOptions(layer_ratios=...)``. Group ``g`` can keep ``m`` units for every multiple
``m`` of ``round_to`` below its size (removed fraction ``f = (n - m) / n``, up to the
largest fraction measured: no extrapolation). Its error at ``f`` is the measured curve, made
non-decreasing and linearly interpolated through ``(0, 0)``; its saving is approximated as
``share_g * f``. Greedy: repeatedly advance the group with the smallest ``Δnsr / Δsaving``
by one step (perturbations of independent layers add up in noise power to first order, so
summed ``nsr`` is the objective). The savings of two groups are not additive (a Conv between
them scales with the product of their kept fractions), so the stopping point is found
exactly: the shortest prefix of the greedy sequence whose plan meets the target by the cost
model (bisection, since MACs only fall along the sequence).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.errors import UsageError
from onnxprune.prune.analysis import analyze
from onnxprune.prune.cost import CostModel
from onnxprune.prune.importance import group_scores
from onnxprune.prune.sensitivity import SensitivityResult, removal_order

__all__ = ["RATIOS_SCHEMA", "Allocation", "allocate_ratios"]

RATIOS_SCHEMA = "onnxprune.layer_ratios/1"


@dataclasses.dataclass
class Allocation:
    """Per-group ratios for ``PruneOptions(layer_ratios=ratios, round_to=round_to)``."""

    target_macs: float
    round_to: int
    ratios: dict[str, float]
    macs: tuple[int, int]
    predicted_nsr: float
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": RATIOS_SCHEMA,
            "target_macs": self.target_macs,
            "round_to": self.round_to,
            "macs": {"before": self.macs[0], "after": self.macs[1]},
            "predicted_nsr": self.predicted_nsr,
            "layer_ratios": self.ratios,
            "notes": self.notes,
        }


def _curve(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Removed fraction -> nsr through (0, 0), non-decreasing (a deeper cut is never better)."""
    pts = sorted((p["removed_fraction"], p["nsr"]) for p in row["points"])
    xs = np.array([0.0] + [x for x, _ in pts])
    ys = np.maximum.accumulate(np.array([0.0] + [y for _, y in pts]))
    return xs, ys


def _levels(size: int, round_to: int, max_fraction: float) -> list[int]:
    """Kept counts below ``size`` reachable with ``round_to``, largest first."""
    step = max(round_to, 1)
    top = (size - 1) // step * step
    return [m for m in range(top, 0, -step) if (size - m) / size <= max_fraction + 1e-9]


def _greedy_sequence(result: SensitivityResult, max_ratio: float) -> list[tuple[str, int]]:
    """(group id, new kept count) steps in order of smallest error increase per MAC saved."""
    heap: list[tuple[float, int, int]] = []
    state = []
    for index, row in enumerate(result.groups):
        xs, ys = _curve(row)
        levels = _levels(row["size"], result.round_to, min(float(xs[-1]), max_ratio))
        state.append((row, xs, ys, levels))
        if levels and row["mac_share"] > 0:
            heapq.heappush(heap, (_priority(state[index], -1), index, 0))
    steps = []
    while heap:
        _, index, level = heapq.heappop(heap)
        row, _, _, levels = state[index]
        steps.append((row["id"], levels[level]))
        if level + 1 < len(levels):
            heapq.heappush(heap, (_priority(state[index], level), index, level + 1))
    return steps


def _priority(state: tuple, level: int) -> float:
    """Δnsr / Δsaving of moving from ``levels[level]`` (-1: unpruned) to the next level."""
    row, xs, ys, levels = state
    n = row["size"]
    before = 0.0 if level < 0 else (n - levels[level]) / n
    after = (n - levels[level + 1]) / n
    d_err = float(np.interp(after, xs, ys) - np.interp(before, xs, ys))
    return d_err / (row["mac_share"] * (after - before))


def _kept_after(result: SensitivityResult, steps: Sequence[tuple[str, int]]) -> dict[str, int]:
    kept = {row["id"]: row["size"] for row in result.groups}
    for gid, count in steps:
        kept[gid] = count
    return kept


class _Evaluator:
    """Exact MACs of "keep ``kept[g]`` units of group ``g``" (lowest scores removed first)."""

    def __init__(
        self,
        model: ir.Model,
        criterion: str,
        dims: Mapping[str, int] | None,
        scores: Mapping[str, np.ndarray] | None = None,
    ):
        analysis = analyze(model)
        self.groups = {g.id: g for g in analysis.prunable}
        self.cost = CostModel(model, analysis, dims)
        if scores is None:
            scores, _ = group_scores(model, analysis, criterion)
        self.order = {gid: removal_order(g, scores[gid]) for gid, g in self.groups.items()}

    def macs(self, kept: Mapping[str, int]) -> int:
        removed = []
        for gid, count in kept.items():
            removed += self.order[gid][: self.groups[gid].size - count]
        return self.cost.evaluate(removed)[0]


def _shortest_prefix(steps: Sequence, macs_of_prefix, goal: float) -> int:
    """Fewest greedy steps whose MACs meet ``goal`` (MACs never rise along the sequence)."""
    lo, hi = 0, len(steps)
    while lo < hi:
        mid = (lo + hi) // 2
        if macs_of_prefix(mid) <= goal:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _trim(kept: dict[str, int], result: SensitivityResult, evaluator: _Evaluator, goal: float):
    """Undo single steps (largest error reduction first) while the target still holds.

    The last greedy step can overshoot the target by a coarse ``round_to`` step; earlier
    cheap steps may then be unnecessary.
    """
    rows = {row["id"]: row for row in result.groups}
    curves = {gid: _curve(row) for gid, row in rows.items()}

    def error(gid: str, count: int) -> float:
        n = rows[gid]["size"]
        return float(np.interp((n - count) / n, *curves[gid]))

    def back(gid: str) -> int:
        up = kept[gid] + result.round_to
        return up if up < rows[gid]["size"] else rows[gid]["size"]

    while True:
        pruned = [g for g in kept if kept[g] < rows[g]["size"]]
        pruned.sort(key=lambda g: error(g, back(g)) - error(g, kept[g]))
        for gid in pruned:
            trial = {**kept, gid: back(gid)}
            if evaluator.macs(trial) <= goal:
                kept = trial
                break
        else:
            return kept


def allocate_ratios(
    model: ir.Model,
    result: SensitivityResult,
    target_macs: float,
    *,
    max_ratio: float = 0.9,
    dims: Mapping[str, int] | None = None,
    scores: Mapping[str, np.ndarray] | None = None,
) -> Allocation:
    """Sensitivity-guided per-group ratios that keep at most ``target_macs`` of the MACs.

    ``model`` is the (canonicalized) model ``result`` was measured on; ``scores`` are the
    unit scores it was measured with (default: ``result.criterion`` from the weights alone).
    """
    if not 0 < target_macs <= 1:
        raise UsageError(f"--allocate {target_macs}: the fraction of MACs to keep is in (0, 1]")
    evaluator = _Evaluator(model, result.criterion, dims, scores)
    for row in result.groups:
        group = evaluator.groups.get(row["id"])
        if group is None or group.size != row["size"]:
            raise UsageError(f"sensitivity group {row['id']!r} does not match this model")
    steps = _greedy_sequence(result, max_ratio)
    goal = target_macs * evaluator.cost.macs_before
    notes = []
    if evaluator.macs(_kept_after(result, steps)) > goal:
        notes.append(f"target {target_macs} not reachable within the measured ratios")
        kept = _kept_after(result, steps)
    else:
        count = _shortest_prefix(
            steps, lambda k: evaluator.macs(_kept_after(result, steps[:k])), goal
        )
        kept = _trim(_kept_after(result, steps[:count]), result, evaluator, goal)
    sizes = {row["id"]: row["size"] for row in result.groups}
    ratios = {gid: (sizes[gid] - m) / sizes[gid] for gid, m in kept.items()}
    curves = {row["id"]: _curve(row) for row in result.groups}
    predicted = sum(float(np.interp(r, *curves[g])) for g, r in ratios.items())
    macs = (evaluator.cost.macs_before, evaluator.macs(kept))
    return Allocation(target_macs, result.round_to, ratios, macs, predicted, notes)
