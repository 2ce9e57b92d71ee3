"""Per-group pruning sensitivity and sensitivity-guided per-group ratios for a MACs target.

**Measurement.** Every prunable group is pruned *alone* at each ratio ``r`` (the units
:func:`~onnxprune.prune.select.make_plan` would remove, with the same criterion and
``round_to`` as ``onnxprune prune``) and the model's outputs on calibration data are compared
with the unpruned outputs. The removed units are *zeroed* in place
(:func:`~onnxprune.prune.apply.zero_units`) and restored afterwards instead of being cut:
by the exactness oracle (``tests/test_prune_exact.py``) a model whose removed channels are
zero computes the same outputs as the physically pruned one, and one analysis serves every
(group, ratio) pair. Prune's data-free bias compensation (``PruneOptions.compensate``) is
applied first when enabled (it may add bias inputs, so that point runs on a copy). Per output
it records cosine, SQNR and top-1 agreement
(:func:`onnxprune.metrics.output_metrics`) and, as the scalar error, the noise-to-signal
ratio over all samples, worst output::

    nsr = sum (c - r)^2 / sum r^2      (= 10^(-SQNR/10); 0 when nothing changes)

Each group also gets its MAC share ``(MACs - MACs with every unit of the group removed) /
MACs`` from the exact :class:`~onnxprune.prune.cost.CostModel`: the MACs that scale with the
group's channel count.

**Allocation.** :func:`allocate_ratios` turns a result into per-group ratios for a global
MACs target (the fraction kept), for ``PruneOptions(layer_ratios=...)``. Group ``g`` can
keep ``m`` units for every multiple ``m`` of ``round_to`` below its size (removed fraction
``f = (n - m) / n``, up to the largest fraction measured: no extrapolation). Its error at
``f`` is the measured curve, made non-decreasing and linearly interpolated through
``(0, 0)``; its saving is approximated as ``share_g * f``. Greedy: repeatedly advance the
group with the smallest ``Δnsr / Δsaving`` by one step (perturbations of independent
layers add up in noise power to first order, so summed ``nsr`` is the objective). The
savings of two groups are not additive (a Conv between them scales with the product of
their kept fractions), so the stopping point is found exactly: the shortest prefix of the
greedy sequence whose plan meets the target by the cost model (bisection, since MACs only
fall along the sequence).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.calib import load_calibration
from onnxprune.errors import UsageError
from onnxprune.io import load
from onnxprune.metrics import output_metrics
from onnxprune.passes.pipeline import canonicalize
from onnxprune.prune.activations import activation_stats
from onnxprune.prune.analysis import Analysis, Group, analyze
from onnxprune.prune.apply import kept_indices, zero_units
from onnxprune.prune.compensate import compensate_removed_inputs, expected_input
from onnxprune.prune.cost import CostModel
from onnxprune.prune.importance import CRITERIA, group_scores
from onnxprune.prune.select import keep_count
from onnxprune.runtime import make_session

__all__ = [
    "SCHEMA",
    "Allocation",
    "SensitivityResult",
    "allocate_ratios",
    "load_canonical",
    "measure_sensitivity",
    "sensitivity_file",
]

logger = logging.getLogger(__name__)

SCHEMA = "onnxprune.sensitivity/1"
RATIOS_SCHEMA = "onnxprune.layer_ratios/1"
_KEPT_METRICS = ("cosine", "sqnr_db", "top1_agreement")


@dataclasses.dataclass
class SensitivityResult:
    """Measured error-versus-ratio curves per prunable group (JSON: ``to_dict``)."""

    criterion: str
    round_to: int
    ratios: list[float]
    samples: int
    macs_before: int
    groups: list[dict[str, Any]]
    blocked: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "error": "nsr = sum (c - r)^2 / sum r^2 over calibration outputs, worst output",
            **dataclasses.asdict(self),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityResult:
        if data.get("schema") != SCHEMA:
            raise UsageError(f"not a sensitivity result (schema {data.get('schema')!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SensitivityResult:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise UsageError(f"sensitivity file {path}: {exc}") from None


def _flat(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array.reshape(1, -1)


def _run(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], threads: int) -> dict:
    session = make_session(model, intra_op_threads=threads)
    names = [o.name for o in session.get_outputs()]
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, dict(feed)), strict=True):
            outs[name].append(_flat(value))
    return {n: np.concatenate(v) for n, v in outs.items()}


def _compare(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> tuple[float, dict]:
    """(worst nsr, {output: cosine/sqnr_db/top1_agreement}); infinite SQNR is stored as None."""
    worst, per_output = 0.0, {}
    for name, r in ref.items():
        c = got[name]
        if not np.issubdtype(r.dtype, np.floating):
            continue
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
        signal = float(np.sum(r64**2))
        noise = float(np.sum((c64 - r64) ** 2))
        worst = max(worst, noise / signal if signal > 0 else (math.inf if noise else 0.0))
        metrics = output_metrics(r, c)
        per_output[name] = {
            k: (None if isinstance(metrics[k], float) and math.isinf(metrics[k]) else metrics[k])
            for k in _KEPT_METRICS
        }
    return worst, per_output


def _lowest_first(group: Group, scores: np.ndarray) -> list[int]:
    """Unit roots from least to most important (ties: higher position goes first)."""
    positions = np.array([u.position(group.anchor) for u in group.units])
    order = np.lexsort((-positions, scores))
    return [group.units[i].root for i in order]


@dataclasses.dataclass
class _Probe:
    """Zeroes units of ``model`` in place, runs it on ``feeds``, restores the weights."""

    model: ir.Model
    analysis: Analysis
    cost: CostModel
    feeds: Sequence[Mapping[str, np.ndarray]]
    threads: int
    compensate: bool = True
    reference: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def error(self, removed: list[int]) -> tuple[float, dict]:
        if not removed:
            return _compare(self.reference, self.reference)
        if self.compensate:  # adds bias inputs: work on a copy
            model = ir.serde.deserialize_model(ir.serde.serialize_model(self.model))
            expected = {}
            for node in model.graph:
                value = node.inputs[0] if node.inputs else None
                if value is not None and value.name not in expected:
                    mean = expected_input(value)
                    if mean is not None:
                        expected[value.name] = mean
            compensate_removed_inputs(model, kept_indices(self.analysis, removed), expected)
            zero_units(model, self.analysis, removed)
            return _compare(self.reference, _run(model, self.feeds, self.threads))
        graph = self.model.graph
        originals = {n: v.const_value for n, v in graph.initializers.items()}
        try:
            zero_units(self.model, self.analysis, removed)
            return _compare(self.reference, _run(self.model, self.feeds, self.threads))
        finally:
            for name, tensor in originals.items():
                graph.initializers[name].const_value = tensor

    def row(self, group: Group, order: list[int], ratios: Sequence[float], round_to: int) -> dict:
        """The group's MAC share and one point per ratio (equal kept counts measured once)."""
        before = max(self.cost.macs_before, 1)
        emptied = self.cost.evaluate([u.root for u in group.units])[0]
        points: list[dict[str, Any]] = []
        measured: dict[int, tuple[float, dict]] = {}
        for ratio in sorted(ratios):
            kept = keep_count(group.size, ratio, round_to)
            removed = order[: group.size - kept]
            if kept not in measured:
                measured[kept] = self.error(removed)
            nsr, outputs = measured[kept]
            points.append(
                {
                    "ratio": ratio,
                    "kept": kept,
                    "removed_fraction": (group.size - kept) / group.size,
                    "macs_saved_fraction": 1 - self.cost.evaluate(removed)[0] / before,
                    "nsr": nsr,
                    "outputs": outputs,
                }
            )
        logger.info("group %s: nsr %s", group.id, [f"{p['nsr']:.3g}" for p in points])
        share = (self.cost.macs_before - emptied) / before
        return {
            "id": group.id,
            "size": group.size,
            "nodes": group.nodes,
            "mac_share": share,
            "points": points,
        }


def measure_sensitivity(
    model: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    criterion: str = "l2",
    round_to: int = 8,
    activation_stats: Mapping | None = None,
    dims: Mapping[str, int] | None = None,
    threads: int = 1,
    compensate: bool = True,
) -> SensitivityResult:
    """Prune each prunable group alone at each ratio and measure the output error.

    ``model`` should be canonicalized as ``onnxprune prune`` does (group ids must match);
    it is left unchanged. ``feeds`` are calibration samples. ``compensate`` mirrors
    ``PruneOptions.compensate``: the data-free bias compensation prune applies is applied
    before zeroing (on a copy of the model per point), so the error is prune's.
    """
    if not feeds:
        raise UsageError("sensitivity needs at least one calibration sample")
    if criterion not in CRITERIA:
        raise UsageError(f"--criterion {criterion!r}: choose from {', '.join(CRITERIA)}")
    if any(not 0 <= r < 1 for r in ratios):
        raise UsageError(f"--ratios {list(ratios)}: each must be in [0, 1)")
    analysis = analyze(model)
    cost = CostModel(model, analysis, dims)
    scores, notes = group_scores(model, analysis, criterion, activation_stats)
    for note in notes:
        logger.info("%s", note)
    probe = _Probe(model, analysis, cost, feeds, threads, compensate)
    probe.reference = _run(model, feeds, threads)
    rows = [
        probe.row(g, _lowest_first(g, scores[g.id]), ratios, round_to) for g in analysis.prunable
    ]
    blocked = [
        {"id": g.id, "node": g.blocked[0], "reason": g.blocked[1]}
        for g in analysis.reported
        if g.blocked is not None
    ]
    return SensitivityResult(
        criterion, round_to, sorted(ratios), len(feeds), cost.macs_before, rows, blocked
    )


# -- allocation ------------------------------------------------------------------------------


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

    def __init__(self, model: ir.Model, criterion: str, dims: Mapping[str, int] | None):
        analysis = analyze(model)
        self.groups = {g.id: g for g in analysis.prunable}
        self.cost = CostModel(model, analysis, dims)
        scores, _ = group_scores(model, analysis, criterion)
        self.order = {gid: _lowest_first(g, scores[gid]) for gid, g in self.groups.items()}

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
) -> Allocation:
    """Sensitivity-guided per-group ratios that keep at most ``target_macs`` of the MACs.

    ``model`` is the (canonicalized) model ``result`` was measured on.
    """
    if not 0 < target_macs <= 1:
        raise UsageError(f"--allocate {target_macs}: the fraction of MACs to keep is in (0, 1]")
    evaluator = _Evaluator(model, result.criterion, dims)
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


# -- files -----------------------------------------------------------------------------------


def load_canonical(path: str | os.PathLike[str], criterion: str = "l2") -> ir.Model:
    """Load and canonicalize ``path`` exactly as ``onnxprune prune`` does, so group ids match."""
    model = load(path)
    canonicalize(model, skip=("fold-batchnorm",) if criterion == "bn" else ())
    return model


def sensitivity_file(
    model_path: str | os.PathLike[str],
    calib: str | os.PathLike[str],
    *,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    criterion: str = "l2",
    round_to: int = 8,
    samples: int = 64,
    dims: Mapping[str, int] | None = None,
    threads: int = 1,
) -> tuple[ir.Model, SensitivityResult]:
    """Measure :func:`measure_sensitivity` on a file with its first ``samples`` calibration feeds.

    Returns the canonicalized model too, for :func:`allocate_ratios`.
    """
    if samples < 1:
        raise UsageError(f"--samples {samples}: must be >= 1")
    if round_to < 1:
        raise UsageError(f"--round-to {round_to}: must be >= 1")
    model = load_canonical(model_path, criterion)
    data = load_calibration(calib, model)
    feeds = list(data.feeds(range(min(samples, len(data)))))
    stats = None
    if criterion in ("activation", "apoz"):
        stats = activation_stats(model, analyze(model), feeds, criterion)
    result = measure_sensitivity(
        model,
        feeds,
        ratios=ratios,
        criterion=criterion,
        round_to=round_to,
        activation_stats=stats,
        dims=dims,
        threads=threads,
    )
    return model, result
