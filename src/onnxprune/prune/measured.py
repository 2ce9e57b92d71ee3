"""Measured allocation: a global MACs target spread over groups by their error on data.

With calibration data, ``prune --target-macs F`` does not cut every group by the same ratio.
Each prunable group ``g`` is cut *alone* at a few removed fractions ``f`` (the units the
criterion ranks lowest, compensated with the measured means exactly as the final cut is:
:func:`onnxprune.prune.sensitivity.measured_means`), the model is run on a few calibration
feeds and its outputs are compared with the unpruned ones: the error is the noise-to-signal
ratio ``nsr_g(f) = sum (y' - y)^2 / sum y^2`` (worst output). The per-group curves are then
allocated by :func:`onnxprune.prune.allocate.allocate_ratios`: perturbations of different
layers add up in noise power to first order, so the greedy minimizes ``sum_g nsr_g(f_g)``
by advancing the group with the smallest ``Δnsr / ΔMACs`` one ``round_to`` step at a time,
and stops at the shortest prefix that meets the target by the exact cost model. Fragile
groups (a narrow projection feeding a residual stream) are cut little or not at all,
tolerant ones more.

The choice is returned with the measured curves for the report. Nothing is fitted on the
evaluation data: the feeds are the first calibration (fit) feeds.

The cost is about ``groups x ratios`` model runs on ``SAMPLES`` feeds (89 groups x 5 ratios
x 16 feeds of 2.8 GMACs on DenseNet-121: 15 minutes on 2 cores). The measurement is sized to
a work budget counted in MACs (:data:`WORK_BUDGET`, about three minutes on 2 cores), so the
same model and data always get the same measurement (a timed budget would not): fewer feeds
first (down to :data:`MIN_SAMPLES`), then the coarser ratios :data:`COARSE_RATIOS`; the
report says which. The curves are kept for the last few models in the process, so
``optimize``'s milder retries of a prune step reuse them instead of measuring again.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.digest import model_feeds_digest
from onnxprune.prune.activations import reconstruction_stats
from onnxprune.prune.allocate import allocate_ratios
from onnxprune.prune.analysis import analyze
from onnxprune.prune.closed_form import patch_statistics
from onnxprune.prune.core import PruneOptions, _excluded_groups
from onnxprune.prune.cost import CostModel
from onnxprune.prune.importance import group_scores
from onnxprune.prune.sensitivity import SensitivityResult, measure_sensitivity, measured_means

__all__ = [
    "COARSE_RATIOS",
    "MIN_SAMPLES",
    "RATIOS",
    "SAMPLES",
    "WORK_BUDGET",
    "MeasuredAllocation",
    "measured_allocation",
    "measurement_size",
]

#: Removed fractions each group is measured at (the allocation never extrapolates beyond).
RATIOS = (0.0625, 0.125, 0.25, 0.5, 0.75)

#: Calibration feeds each measurement runs on (at most).
SAMPLES = 16

#: Fewest feeds a measurement runs on, and the ratios used when even that is too slow.
MIN_SAMPLES = 4
COARSE_RATIOS = (0.125, 0.25, 0.5)

#: MACs of model runs the measurements aim to stay within (about 3 minutes of onnxruntime
#: on 2 cores at ~25 GMAC/s).
WORK_BUDGET = 4e12

#: A probe also copies the model, rewrites it and builds a session: counted as this many
#: extra runs.
_PROBE_OVERHEAD_RUNS = 2


#: Curves of the last few (model, data, settings) measured in this process.
_CURVES: collections.OrderedDict[str, SensitivityResult] = collections.OrderedDict()
_CACHED = 2


def _curves_key(
    model: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    settings: tuple[Any, ...],
) -> str:
    """A digest of the model (structure and tensors), the feeds and the settings."""
    digest = model_feeds_digest("onnxprune-measured-curves\n", model, feeds)
    digest.update(repr(settings).encode())
    return digest.hexdigest()


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def measurement_size(
    groups: int,
    ratios: Sequence[float],
    macs: int,
    *,
    available: int,
    budget: float = WORK_BUDGET,
) -> tuple[int, tuple[float, ...]]:
    """``(feeds, ratios)`` that keep ``groups`` probes at each ratio within ``budget`` MACs.

    A probe of a model of ``macs`` MACs costs ``(feeds + 2) * macs`` (two runs' worth for
    copying, rewriting and building the session). Feeds shrink first (from
    ``min(SAMPLES, available)`` down to :data:`MIN_SAMPLES`), then the ratios become the
    coarse ones (those of ``ratios``' range); below that the budget is exceeded, not the
    measurement dropped.
    """
    most = max(1, min(SAMPLES, available))
    coarse = tuple(r for r in COARSE_RATIOS if r <= max(ratios) + 1e-9) or tuple(ratios)
    for candidate in (tuple(ratios), coarse):
        probes = max(1, groups * len(candidate))
        feeds = math.floor(budget / (probes * max(macs, 1))) - _PROBE_OVERHEAD_RUNS
        if feeds >= min(MIN_SAMPLES, most):
            return min(most, feeds), candidate
    return min(MIN_SAMPLES, most), coarse


@dataclasses.dataclass
class MeasuredAllocation:
    """Per-group ratios chosen from measured curves, and what they were chosen from."""

    ratios: dict[str, float]
    predicted_nsr: float
    samples: int
    macs: tuple[int, int]
    curves: list[dict[str, Any]]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "measured: each group cut alone on calibration feeds, greedy on "
            "output nsr per MAC saved",
            "samples": self.samples,
            "predicted_nsr": self.predicted_nsr,
            "macs": {"before": self.macs[0], "after": self.macs[1]},
            "layer_ratios": self.ratios,
            "curves": self.curves,
            "notes": self.notes,
        }

    def summary(self) -> str:
        cut = sorted(self.ratios.items(), key=lambda kv: kv[1])
        spared = sum(1 for _, r in cut if r == 0)
        return (
            f"measured allocation on {self.samples} calibration feeds: {len(cut)} groups, "
            f"{spared} left whole, ratios {cut[0][1]:.2f}-{cut[-1][1]:.2f} "
            f"(predicted output nsr {self.predicted_nsr:.3g})"
        )


def measured_allocation(
    model: ir.Model,
    options: PruneOptions,
    feeds: Sequence[Mapping[str, np.ndarray]],
    activation_stats: Mapping | None = None,
    dims: Mapping[str, int] | None = None,
    *,
    ratios: Sequence[float] = RATIOS,
    threads: int | None = None,
    budget: float = WORK_BUDGET,
    refit: bool = False,
) -> MeasuredAllocation:
    """Per-group ratios meeting ``options.target_macs`` with the least measured output error.

    ``model`` is canonicalized (as prune leaves it before cutting) and left unchanged;
    ``feeds`` are calibration feeds (the first :data:`SAMPLES` are used);
    ``activation_stats`` are the criterion's statistics, so the units measured are the ones
    the cut removes. Groups named by ``options.exclude`` are not cut. ``threads``: intra-op
    threads of the probe sessions (default: up to 4); ``budget``: MACs the measurement is
    sized to (:func:`measurement_size`). ``refit``: each probe refits the cut group's
    consumers in closed form (:mod:`onnxprune.prune.closed_form`) before measuring, with
    input covariances from the feeds after the measured ones where there are enough of them
    (so the probe is scored on feeds its refit did not see), else from all feeds.
    """
    if options.target_macs is None:
        raise ValueError("measured allocation needs a MACs target")
    threads = _default_threads() if threads is None else threads
    refit = refit and options.compensate  # the refit corrects the compensated cut
    analysis = analyze(model)
    scores, _ = group_scores(model, analysis, options.criterion, activation_stats)
    excluded = _excluded_groups(model, analysis, options.exclude)
    wanted = [r for r in ratios if r <= options.max_ratio + 1e-9]
    groups = sum(1 for g in analysis.prunable if g.id not in excluded)
    macs = CostModel(model, analysis, dims).macs_before
    samples, wanted_sized = measurement_size(
        groups, wanted, macs, available=len(feeds), budget=budget
    )
    sizing = []
    if samples < min(SAMPLES, len(feeds)) or len(wanted_sized) < len(wanted):
        sizing.append(
            f"measured on {samples} feeds at removed fractions "
            f"{', '.join(f'{r:g}' for r in wanted_sized)} to stay near {budget:.3g} MACs of "
            f"probe runs ({groups} groups of a {macs / 1e9:.3g} GMAC model)"
        )
    key = _curves_key(  # all feeds: the criterion's statistics come from all of them
        model,
        feeds,
        (
            options.criterion,
            options.round_to,
            options.compensate,
            sorted(excluded),
            wanted,
            sorted((dims or {}).items()),
            activation_stats is not None,
            samples,
            wanted_sized,
            refit,
        ),
    )
    covariances = patches = None
    if refit:
        rest = list(feeds[samples:])
        fit = rest if len(rest) >= max(samples // 2, 1) else list(feeds)
        sizing.append(
            "probes refit in closed form with covariances of "
            + (f"the {len(fit)} feeds after the measured ones" if fit is rest else "all feeds")
        )
    feeds, wanted = list(feeds[:samples]), list(wanted_sized)
    result = _CURVES.get(key)
    if result is None:
        if refit:
            covariances = reconstruction_stats(model, analysis, fit, centered=True)
            patches = patch_statistics(model, analysis, fit)
        result = measure_sensitivity(
            model,
            feeds,
            ratios=wanted,
            criterion=options.criterion,
            round_to=options.round_to,
            activation_stats=activation_stats,
            dims=dims,
            threads=threads,
            measured=measured_means(model, analysis, feeds) if options.compensate else None,
            skip=excluded,
            covariances=covariances,
            patches=patches,
        )
        _CURVES[key] = result
        while len(_CURVES) > _CACHED:
            _CURVES.popitem(last=False)
    else:
        _CURVES.move_to_end(key)
        sizing.append("curves reused from an earlier measurement of this model and data")
    allocation = allocate_ratios(
        model,
        result,
        options.target_macs,
        max_ratio=options.max_ratio,
        dims=dims,
        scores=scores,
    )
    curves = [
        {
            "id": row["id"],
            "size": row["size"],
            "mac_share": row["mac_share"],
            "nsr": {f"{p['removed_fraction']:.4g}": p["nsr"] for p in row["points"]},
            "ratio": allocation.ratios.get(row["id"], 0.0),
        }
        for row in result.groups
    ]
    return MeasuredAllocation(
        ratios=allocation.ratios,
        predicted_nsr=allocation.predicted_nsr,
        samples=len(feeds),
        macs=allocation.macs,
        curves=curves,
        notes=[*sizing, *allocation.notes],
    )
