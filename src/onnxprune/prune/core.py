"""Structured pruning of an ONNX model: analyze, score, decide a plan, remove channels.

``prune_model`` rewrites an ``ir.Model`` in place. The decision is separate from the cut:
a :class:`~onnxprune.prune.plan.PruningPlan` (group -> kept positions) is made from scores
and ratios (or loaded), then applied. A global MACs or parameters target is met by a
bisection over a uniform ratio, evaluating each candidate plan with the exact cost model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxprune.errors import UsageError
from onnxprune.passes._match import name_of
from onnxprune.prune.analysis import Analysis, Group, _label, analyze
from onnxprune.prune.apply import apply_removal, kept_counts, kept_indices
from onnxprune.prune.compensate import (
    InputMean,
    add_border_corrections,
    border_corrections,
    compensate_removed_inputs,
    compensation_requests,
    expected_input,
)
from onnxprune.prune.cost import CostModel
from onnxprune.prune.importance import CRITERIA, group_scores
from onnxprune.prune.latency import LatencySearch
from onnxprune.prune.plan import PruningPlan
from onnxprune.prune.select import make_plan
from onnxprune.reports import KEEP_NONE, Record, Skip

if TYPE_CHECKING:  # measured imports this module
    from onnxprune.prune.measured import MeasuredAllocation

__all__ = ["ALLOCATIONS", "GroupRow", "PruneOptions", "PruneReport", "decide_plan", "prune_model"]

logger = logging.getLogger(__name__)

#: ``PruneOptions.allocation``: ``auto`` is ``measured-refit`` with calibration data and the
#: refit, ``measured`` with data only, else uniform.
ALLOCATIONS = ("auto", "measured", "measured-refit", "uniform")

#: Measures removed input channels ``{value: (axis, channels)}`` on calibration data.
Measure = Callable[[Mapping[str, tuple[int, np.ndarray]]], Mapping[str, InputMean]]


@dataclasses.dataclass
class PruneOptions:
    """What to prune and how much.

    Exactly one of ``ratio``, ``layer_ratios`` (alone), ``target_macs``, ``target_params``
    or ``plan`` decides the amount. Targets are the fraction of MACs/parameters to keep.
    """

    ratio: float | None = None
    layer_ratios: Mapping[str, float] = dataclasses.field(default_factory=dict)
    target_macs: float | None = None
    target_params: float | None = None
    plan: PruningPlan | None = None
    max_ratio: float = 0.9
    round_to: int = 8
    criterion: str = "l2"
    exclude: Sequence[str] = ()
    compensate: bool = True
    #: How a --target-macs is spread over groups: ``measured`` (per-group error measured on
    #: calibration data, :mod:`onnxprune.prune.measured`), ``uniform`` (one ratio), or
    #: ``auto`` (measured when calibration data is given).
    allocation: str = "auto"

    def validate(self) -> None:
        amounts = [
            self.ratio is not None,
            self.target_macs is not None,
            self.target_params is not None,
            self.plan is not None,
        ]
        if sum(amounts) > 1:
            raise UsageError("give only one of --ratio, --target-macs, --target-params, --plan")
        if sum(amounts) == 0 and not self.layer_ratios:
            raise UsageError(
                "nothing to do: give --ratio, --target-macs, --target-params or --plan"
            )
        for name, value in (("ratio", self.ratio), ("max-ratio", self.max_ratio)):
            if value is not None and not 0 <= value < 1:
                raise UsageError(f"--{name} {value}: must be in [0, 1)")
        for name, value in (
            ("target-macs", self.target_macs),
            ("target-params", self.target_params),
        ):
            if value is not None and not 0 < value <= 1:
                raise UsageError(f"--{name} {value}: the fraction to keep must be in (0, 1]")
        for key, value in self.layer_ratios.items():
            if not 0 <= value < 1:
                raise UsageError(f"layer ratio {key}={value}: must be in [0, 1)")
        if self.round_to < 1:
            raise UsageError(f"--round-to {self.round_to}: must be >= 1")
        if self.criterion not in (*CRITERIA, "auto"):
            raise UsageError(f"--criterion {self.criterion!r}: choose from {', '.join(CRITERIA)}")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(
                f"--allocation {self.allocation!r}: choose from {', '.join(ALLOCATIONS)}"
            )


@dataclasses.dataclass(frozen=True)
class GroupRow(Record):
    """One reported group: its channels, where it is blocked and how many channels it kept."""

    id: str
    size: int
    #: ``initializer:axis`` of each weight axis in the group.
    initializers: tuple[str, ...]
    nodes: tuple[str, ...]
    #: The block reported for the group (JSON ``null`` when it is prunable).
    blocked: Skip | None = dataclasses.field(metadata=KEEP_NONE)
    #: Every distinct block on the group's channels.
    all_blocking: tuple[Skip, ...]
    kept: int
    #: True when --exclude kept the group whole (the JSON has the key only then).
    excluded: bool | None = None

    @classmethod
    def of(cls, group: Group, kept: int, excluded: bool) -> GroupRow:
        return cls(
            id=group.id,
            size=group.size,
            initializers=tuple(f"{v}:{a}" for v, a in group.initializers),
            nodes=tuple(group.nodes),
            blocked=group.blocked,
            all_blocking=tuple(group.reasons),
            kept=kept,
            excluded=True if excluded else None,
        )


@dataclasses.dataclass
class PruneReport:
    """What was pruned, what was blocked and why, and the cost before and after."""

    groups: list[GroupRow]
    plan: PruningPlan
    macs: tuple[int, int]
    params: tuple[int, int]
    pruned_axes: dict[str, list[int]]
    notes: list[str]
    kept: dict = dataclasses.field(default_factory=dict, repr=False)
    ranks: dict[str, int] = dataclasses.field(default_factory=dict, repr=False)
    #: The measured allocation the ratios came from.
    allocation: MeasuredAllocation | None = None
    #: The latency search a --target-latency ran.
    latency: LatencySearch | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema": "onnxprune.prune/1",
            "macs": {"before": self.macs[0], "after": self.macs[1]},
            "params": {"before": self.params[0], "after": self.params[1]},
            "groups": [g.to_dict() for g in self.groups],
            "plan": self.plan.to_dict(),
            "pruned_axes": self.pruned_axes,
            "notes": self.notes,
        }
        if self.allocation is not None:
            data["allocation"] = self.allocation.to_dict()
        if self.latency is not None:
            data["latency"] = self.latency.to_dict()
        return data


def _output_weight_axis(node: ir.Node) -> tuple[str, int] | None:
    """The initializer axis that indexes a layer's output channels."""
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
        return None
    weight = name_of(node.inputs[1])
    if node.op_type == "Conv":
        return (weight, 0)
    if node.op_type == "ConvTranspose":
        return (weight, 1)
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return (weight, 0 if trans_b is not None and trans_b.value else 1)
    if node.op_type == "MatMul" and len(node.inputs[1].const_value.shape) == 2:
        return (weight, 1)
    return None


def _excluded_groups(model: ir.Model, analysis: Analysis, exclude: Sequence[str]) -> set[str]:
    """Groups holding the output channels of the excluded layers (or named by id).

    Excluding a layer keeps its output channels; its input channels may still shrink when
    the layer before it is pruned.
    """
    labels = {}
    for node in model.graph:
        key = _output_weight_axis(node)
        if key is not None:
            labels[_label(node)] = key
    group_ids = {g.id for g in analysis.groups}
    keys = set()
    for name in exclude:
        if name in labels:
            keys.add(labels[name])
        elif name not in group_ids:
            raise UsageError(f"--exclude {name!r}: no layer with weights or group of that name")
    wanted = set(exclude)
    return {g.id for g in analysis.groups if g.id in wanted or keys & set(g.initializers)}


def _layer_ratio_map(analysis: Analysis, layer_ratios: Mapping[str, float]) -> dict[str, float]:
    result: dict[str, float] = {}
    for key, value in layer_ratios.items():
        hits = [g.id for g in analysis.prunable if g.id == key or key in g.nodes[:1]]
        if not hits:
            hits = [g.id for g in analysis.prunable if key in g.nodes]
        if not hits:
            raise UsageError(f"layer ratio {key!r}: no prunable group of that name")
        for gid in hits:
            result[gid] = value
    return result


def _search_uniform(
    *,
    analysis: Analysis,
    scores: Mapping[str, np.ndarray],
    base: Mapping[str, float],
    candidates: Sequence[str],
    options: PruneOptions,
    cost: CostModel,
) -> tuple[PruningPlan, float]:
    """Smallest uniform ratio whose plan meets the MACs/params target (bisection)."""
    target = options.target_macs if options.target_macs is not None else options.target_params
    assert target is not None  # decide_plan searches only for a MACs or params target
    use_macs = options.target_macs is not None
    before = cost.macs_before if use_macs else cost.params_before

    def plan_for(r: float) -> tuple[PruningPlan, float]:
        ratios = {**dict.fromkeys(candidates, r), **base}
        plan = make_plan(analysis, scores, ratios, options.round_to)
        macs, params = cost.evaluate(plan.removed_roots(analysis))
        return plan, (macs if use_macs else params) / max(before, 1)

    lo, hi = 0.0, options.max_ratio
    best = plan_for(hi)
    if best[1] > target:
        return best
    for _ in range(30):
        mid = (lo + hi) / 2
        plan, frac = plan_for(mid)
        if frac <= target:
            hi, best = mid, (plan, frac)
        else:
            lo = mid
        if hi - lo < 1e-3:
            break
    return best


def decide_plan(
    model: ir.Model,
    analysis: Analysis,
    options: PruneOptions,
    activation_stats: Mapping | None = None,
    cost: CostModel | None = None,
) -> tuple[PruningPlan, list[str]]:
    """Turn options into a plan (kept positions per group) without touching the model."""
    if options.plan is not None:
        return options.plan, []
    excluded = _excluded_groups(model, analysis, options.exclude)
    scores, notes = group_scores(model, analysis, options.criterion, activation_stats)
    base = dict(_layer_ratio_map(analysis, options.layer_ratios).items())
    candidates = [g.id for g in analysis.prunable if g.id not in excluded and g.id not in base]
    for gid in excluded:
        base.pop(gid, None)
    if options.target_macs is not None or options.target_params is not None:
        cost = cost or CostModel(model, analysis)
        plan, reached = _search_uniform(
            analysis=analysis,
            scores=scores,
            base=base,
            candidates=candidates,
            options=options,
            cost=cost,
        )
        what = "MACs" if options.target_macs is not None else "parameters"
        target = options.target_macs if options.target_macs is not None else options.target_params
        assert target is not None  # one of the two is set (checked above)
        if reached > target + 1e-9:
            notes.append(
                f"target {what} {target:.3f} not reachable within --max-ratio "
                f"{options.max_ratio}: reached {reached:.3f}"
            )
        return plan, notes
    ratios = {**{gid: min(options.ratio or 0.0, options.max_ratio) for gid in candidates}, **base}
    return make_plan(analysis, scores, ratios, options.round_to), notes


def _group_rows(analysis: Analysis, plan: PruningPlan, excluded: set[str]) -> list[GroupRow]:
    return [
        GroupRow.of(
            group,
            kept=len(plan.keep[group.id]) if group.id in plan.keep else group.size,
            excluded=group.id in excluded,
        )
        for group in analysis.reported
    ]


def _data_free_means(model: ir.Model) -> dict[str, np.ndarray]:
    expected: dict[str, np.ndarray] = {}
    for node in model.graph:
        for value in node.inputs[:1]:
            if value is not None and name_of(value) not in expected:
                mean = expected_input(value)
                if mean is not None:
                    expected[name_of(value)] = mean
    return expected


def _compensate(
    model: ir.Model,
    kept: Mapping,
    measure: Measure | None,
    notes: list[str],
) -> dict[str, np.ndarray]:
    """Fold ``E[x_c]`` of removed inputs into biases; returns the border residuals to add."""
    if measure is None:
        adjusted = compensate_removed_inputs(model, kept, _data_free_means(model))
        if adjusted:
            notes.append(f"bias compensation (no data) in {len(adjusted)} layers")
        return {}
    expected = measure(compensation_requests(model, kept))
    adjusted = compensate_removed_inputs(model, kept, expected)
    corrections = border_corrections(model, kept, expected)
    if adjusted:
        notes.append(f"bias compensation (calibration means) in {len(adjusted)} layers")
    return corrections


def prune_model(
    model: ir.Model,
    options: PruneOptions,
    activation_stats: Mapping | None = None,
    dims: Mapping[str, int] | None = None,
    measure: Measure | None = None,
) -> PruneReport:
    """Prune ``model`` in place and report what changed.

    ``dims`` binds symbolic dims (e.g. ``{"seq": 128}``) for MAC counting, so a MACs target
    is met at the sizes the model is deployed with. ``measure`` (given calibration data)
    measures ``E[x_c]`` of the removed input channels of each consumer on the unpruned
    model (see :func:`onnxprune.prune.activations.removed_input_means`); without it the
    compensation estimates ``E[x_c]`` from the producers' biases.
    """
    options.validate()
    analysis = analyze(model)
    cost = CostModel(model, analysis, dims)
    plan, notes = decide_plan(model, analysis, options, activation_stats, cost)
    removed = plan.removed_roots(analysis)
    macs_after, params_after = cost.evaluate(removed)
    excluded = _excluded_groups(model, analysis, options.exclude) if options.plan is None else set()
    rows = _group_rows(analysis, plan, excluded)
    corrections: dict[str, np.ndarray] = {}
    if options.compensate:
        corrections = _compensate(model, kept_indices(analysis, removed), measure, notes)
    kept = apply_removal(model, analysis, removed)
    if corrections:
        add_border_corrections(model, corrections)
        notes.append(f"exact border compensation of constant channels in {len(corrections)} layers")
    pruned = kept_counts(analysis, kept)
    logger.info("pruned %d groups, MACs %d -> %d", len(plan.keep), cost.macs_before, macs_after)
    return PruneReport(
        groups=rows,
        plan=plan,
        macs=(cost.macs_before, macs_after),
        params=(cost.params_before, params_after),
        pruned_axes=pruned,
        notes=notes,
        kept=kept,
        ranks={name: len(shape) for name, shape in analysis.graph.shapes.items()},
    )
