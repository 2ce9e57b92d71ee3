"""Per-group pruning sensitivity: error-versus-ratio curves and MAC shares, saved as JSON.

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

Turning a result into per-group ratios for a MACs target is :mod:`onnxprune.prune.allocate`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.calib import load_calibration
from onnxprune.errors import UsageError
from onnxprune.io import load
from onnxprune.io.pinned import copy_model
from onnxprune.metrics import output_metrics, worst_nsr
from onnxprune.passes._match import name_of
from onnxprune.passes.pipeline import canonicalize
from onnxprune.progress import Progress
from onnxprune.prune.activations import (
    activation_stats,
    reconstruction_stats,
    removed_input_means,
)
from onnxprune.prune.analysis import Analysis, Group, analyze
from onnxprune.prune.apply import kept_indices, zero_units
from onnxprune.prune.channels import SpaceKey
from onnxprune.prune.closed_form import refit_in_closed_form
from onnxprune.prune.compensate import (
    InputMean,
    add_border_corrections,
    border_corrections,
    compensate_removed_inputs,
    compensation_requests,
    expected_input,
)
from onnxprune.prune.cost import CostModel
from onnxprune.prune.importance import CENTERED_CRITERIA, CRITERIA, GRAM_CRITERIA, group_scores
from onnxprune.prune.select import keep_count
from onnxprune.reports import FLATTEN, Record, Skip, report_dict
from onnxprune.runtime import make_session

__all__ = [
    "SCHEMA",
    "BlockedGroup",
    "SensitivityResult",
    "load_canonical",
    "measure_sensitivity",
    "measured_means",
    "removal_order",
    "sensitivity_file",
]

logger = logging.getLogger(__name__)

SCHEMA = "onnxprune.sensitivity/1"
_KEPT_METRICS = ("cosine", "sqnr_db", "top1_agreement")


@dataclasses.dataclass(frozen=True)
class BlockedGroup(Record):
    """A group that is not measured because it cannot be pruned (JSON: id, node, reason)."""

    id: str
    skip: Skip = dataclasses.field(metadata=FLATTEN)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockedGroup:
        return cls(data["id"], Skip(data["node"], data["reason"]))


@dataclasses.dataclass
class SensitivityResult:
    """Measured error-versus-ratio curves per prunable group (JSON: ``to_dict``)."""

    criterion: str
    round_to: int
    ratios: list[float]
    samples: int
    macs_before: int
    groups: list[dict[str, Any]]
    blocked: list[BlockedGroup] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "error": "nsr = sum (c - r)^2 / sum r^2 over calibration outputs, worst output",
            **report_dict(self),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityResult:
        if data.get("schema") != SCHEMA:
            raise UsageError(f"not a sensitivity result (schema {data.get('schema')!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        try:
            values["blocked"] = [BlockedGroup.from_dict(b) for b in values.get("blocked", [])]
        except (KeyError, TypeError):
            raise UsageError("'blocked' must list {id, node, reason} entries") from None
        return cls(**values)

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


def _finite_or_none(metric: float | None) -> float | None:
    """An infinite metric (SQNR of an exact match) is stored as None."""
    return None if isinstance(metric, float) and math.isinf(metric) else metric


def _compare(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> tuple[float, dict]:
    """(worst nsr, {output: cosine/sqnr_db/top1_agreement}); infinite SQNR is stored as None."""
    per_output = {}
    for name, r in ref.items():
        if np.issubdtype(r.dtype, np.floating):
            metrics = output_metrics(r, got[name])
            per_output[name] = {k: _finite_or_none(metrics[k]) for k in _KEPT_METRICS}
    return worst_nsr(ref, got), per_output


def removal_order(group: Group, scores: np.ndarray) -> list[int]:
    """Unit roots of ``group`` from least to most important (ties: higher position first).

    A ratio's removed units are a prefix of this order, as in ``onnxprune prune``.
    """
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
    #: Measured ``E[x]`` of every consumer input (:func:`measured_means`): compensation as
    #: ``prune --calib`` applies it (means and exact border terms), not the data-free guess.
    measured: Mapping[str, InputMean] | None = None
    #: Input covariances of the consumers: with ``measured``, each cut is followed by the
    #: closed-form refit of its consumers (:mod:`onnxprune.prune.closed_form`), so the error
    #: is the one left after the refit prune applies with ``--calib``.
    covariances: Mapping[SpaceKey, np.ndarray] | None = None
    #: ... and the im2col patch statistics of its ``k x k`` Conv consumers.
    patches: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None

    def error(self, removed: list[int], group: Group | None = None) -> tuple[float, dict]:
        if not removed:
            return _compare(self.reference, self.reference)
        if self.compensate and self.measured is not None:
            model = copy_model(self.model)
            kept = kept_indices(self.analysis, removed)
            compensate_removed_inputs(model, kept, self.measured, zeroed=True)
            if self.covariances is not None and group is not None:
                refit_in_closed_form(
                    model,
                    self.analysis,
                    group,
                    removed,
                    covariances=self.covariances,
                    means=self.measured,
                    patches=self.patches,
                )
            # zeroed (not sliced) outputs keep every channel: residuals over all of them
            inputs_only = {k: v for k, v in kept.items() if k[0] in model.graph.initializers}
            corrections = border_corrections(model, inputs_only, self.measured)
            zero_units(model, self.analysis, removed)
            add_border_corrections(model, corrections)
            return _compare(self.reference, _run(model, self.feeds, self.threads))
        if self.compensate:  # adds bias inputs: work on a copy
            model = copy_model(self.model)
            expected: dict[str, np.ndarray] = {}
            for node in model.graph:
                value = node.inputs[0] if node.inputs else None
                if value is not None and name_of(value) not in expected:
                    mean = expected_input(value)
                    if mean is not None:
                        expected[name_of(value)] = mean
            compensate_removed_inputs(
                model, kept_indices(self.analysis, removed), expected, zeroed=True
            )
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
                measured[kept] = self.error(removed, group)
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
    measured: Mapping[str, InputMean] | None = None,
    skip: Collection[str] = (),
    covariances: Mapping[SpaceKey, np.ndarray] | None = None,
    patches: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> SensitivityResult:
    """Prune each prunable group alone at each ratio and measure the output error.

    ``model`` should be canonicalized as ``onnxprune prune`` does (group ids must match);
    it is left unchanged. ``feeds`` are calibration samples. ``compensate`` mirrors
    ``PruneOptions.compensate``: the data-free bias compensation prune applies is applied
    before zeroing (on a copy of the model per point), so the error is prune's; with
    ``measured`` (:func:`measured_means` on calibration data) the measured compensation of
    ``prune --calib`` is applied instead, and with ``covariances`` as well (consumer input
    covariances; ``patches`` for ``k x k`` Conv consumers) each cut is followed by the
    closed-form refit of its consumers. Groups in
    ``skip`` are not measured.
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
    probe = _Probe(
        model,
        analysis,
        cost,
        feeds,
        threads,
        compensate,
        measured=measured,
        covariances=covariances,
        patches=patches,
    )
    probe.reference = _run(model, feeds, threads)
    measured_groups = [g for g in analysis.prunable if g.id not in skip]
    rows = []
    with Progress(len(measured_groups), "measuring groups") as bar:
        for g in measured_groups:
            rows.append(probe.row(g, removal_order(g, scores[g.id]), ratios, round_to))
            bar.update()
    blocked = [BlockedGroup(g.id, g.blocked) for g in analysis.reported if g.blocked is not None]
    return SensitivityResult(
        criterion, round_to, sorted(ratios), len(feeds), cost.macs_before, rows, blocked
    )


def measured_means(
    model: ir.Model, analysis: Analysis, feeds: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, InputMean]:
    """``E[x_c]`` (and constant maps) of every channel of every consumer input, measured once.

    What :func:`~onnxprune.prune.activations.removed_input_means` measures for one plan,
    for all plans at once: every channel of every weighted layer's input is requested.
    """
    everything = {key: np.zeros(0, dtype=np.int64) for key in analysis.graph.spaces}
    return removed_input_means(model, compensation_requests(model, everything), feeds)


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

    Returns the canonicalized model too, for
    :func:`onnxprune.prune.allocate.allocate_ratios`.
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
    elif criterion in GRAM_CRITERIA:
        centered = criterion in CENTERED_CRITERIA
        stats = reconstruction_stats(model, analyze(model), feeds, centered=centered)
    result = measure_sensitivity(
        model,
        feeds,
        ratios=ratios,
        criterion=criterion,
        round_to=round_to,
        activation_stats=stats,
        dims=dims,
        threads=threads,
        measured=measured_means(model, analyze(model), feeds),  # as prune --calib compensates
    )
    return model, result
