"""File-level pruning: load, canonicalize, prune (optionally in steps), recover, check, save."""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxprune.analysis.dims import feed_dims
from onnxprune.errors import UsageError
from onnxprune.heldout import FidelityReport, measure, split_data
from onnxprune.io import load, save
from onnxprune.io.pinned import copy_model
from onnxprune.io.validate import refuse_unrewritable
from onnxprune.passes.pipeline import canonicalize
from onnxprune.prune.activations import (
    activation_stats,
    reconstruction_stats,
    removed_input_means,
)
from onnxprune.prune.analysis import analyze
from onnxprune.prune.config import LatencyTarget, PruneConfig, resolve
from onnxprune.prune.core import PruneOptions, PruneReport, prune_model
from onnxprune.prune.importance import CENTERED_CRITERIA, GRAM_CRITERIA
from onnxprune.prune.latency import LatencySearch, search_macs_for_latency
from onnxprune.prune.measured import measured_allocation
from onnxprune.prune.recover import RefitResult, refit_consumers
from onnxprune.reports import to_json_value

__all__ = ["PruneFileResult", "prune_file"]

#: At most this many fit samples feed statistics and refits (the measured allocation runs on
#: its own smaller subset, :data:`onnxprune.prune.measured.SAMPLES`; refit rows are capped by
#: :data:`onnxprune.prune.recover.MAX_ROWS` whatever the count). It was 128: all-MiniLM-L6
#: pruned to 0.75 of its MACs from 448 calibration sentences scored cosine 0.9375 / 9.0 dB
#: on the evaluation sentences with the first 128 of them, 0.9511 / 10.1 dB with all 448
#: (prune 112 -> 219 s); MobileNetV2 from 384 fit photos 7.31 -> 7.59 dB (top-1 0.679 /
#: 0.677, 113 -> 204 s). Time grows with the count; memory does not.
FIT_SAMPLES = 512

#: Criteria scored from calibration statistics.
_DATA_CRITERIA = ("activation", "apoz", *GRAM_CRITERIA)


@dataclasses.dataclass
class PruneFileResult:
    """Report of :func:`prune_file`."""

    output: str
    steps: list[PruneReport]
    #: The refit layers of each step (when refitting).
    refits: list[list[RefitResult]]
    fidelity: FidelityReport
    macs: tuple[int, int]
    params: tuple[int, int]
    #: Set when a --target-macs/--target-params was not met exactly (:func:`target_note`).
    target_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "onnxprune.prune_file/1",
            "output": self.output,
            "macs": {"before": self.macs[0], "after": self.macs[1]},
            "params": {"before": self.params[0], "after": self.params[1]},
            "target_note": self.target_note,
            "fidelity": self.fidelity.to_dict(),
            "steps": [s.to_dict() for s in self.steps],
            "refits": to_json_value(self.refits),
        }

    def summary(self) -> str:
        macs_ratio = self.macs[0] / max(self.macs[1], 1)
        missed = f"; {self.target_note}" if self.target_note else ""
        lines = [
            f"MACs   {self.macs[0]:,} -> {self.macs[1]:,} ({macs_ratio:.2f}x fewer{missed})",
            f"params {self.params[0]:,} -> {self.params[1]:,}",
        ]
        lines += [n for n in self.steps[0].notes if n.startswith("--target-latency")]
        lines += self.fidelity.summary()
        blocked = [g for g in self.steps[0].groups if g.blocked is not None]
        lines.append(
            f"groups: {len(self.steps[0].groups) - len(blocked)} prunable, {len(blocked)} blocked"
        )
        lines.append(f"wrote {self.output}")
        return "\n".join(lines)


#: A target counts as met when the result is within this fraction of the input's amount.
TARGET_SLACK = 0.02


def target_note(
    options: PruneOptions, macs: tuple[int, int], params: tuple[int, int]
) -> str | None:
    """One clause when a --target-macs/--target-params was not met, else ``None``.

    Channels go in steps of ``round_to`` and coupled layers (residual adds, concats) go
    together, so on small or concat-heavy nets the plans closest to a target can both lie
    far from it: the nearest one at or below it is taken (or, when nothing reaches it within
    --max-ratio, the smallest there is).
    """
    if options.target_macs is not None:
        what, target, (before, after) = "macs", options.target_macs, macs
    elif options.target_params is not None:
        what, target, (before, after) = "params", options.target_params, params
    else:
        return None
    reached = after / max(before, 1)
    if abs(reached - target) <= TARGET_SLACK:
        return None
    why = (
        f"nothing smaller within --max-ratio {options.max_ratio}"
        if reached > target
        else f"the nearest plan at or below it, as channels go in steps of --round-to "
        f"{options.round_to} and coupled layers together"
    )
    return f"--target-{what} {target:.2f} not reachable, kept {reached:.2f}: {why}"


def _step_options(options: PruneOptions, step: int, steps: int, progress: float) -> PruneOptions:
    """Options for step ``step`` of ``steps``: the same final amount reached geometrically."""
    if steps == 1:
        return options
    if options.ratio is not None:
        keep = (1 - options.ratio) ** (1 / steps)
        return dataclasses.replace(options, ratio=1 - keep)
    for name in ("target_macs", "target_params"):
        target = getattr(options, name)
        if target is not None:
            # progress = fraction of the original already kept
            return dataclasses.replace(
                options, **{name: min(1.0, target ** (step / steps) / progress)}
            )
    raise UsageError("--iterative needs --ratio, --target-macs or --target-params")


#: The criterion ``auto`` resolves to: data-aware with calibration data (measured on the zoo,
#: ``benchmarks/results/prune_criteria.md``: 1.5-2.4x less error than l2 on every layer type;
#: best on MobileNetV2's convs; flap is 1-8% lower on MiniLM's FFN and 30% on keras' dense at
#: half its units, wanda 12% on keras' convs at half), weight norms without.
AUTO_CRITERION = {True: "reconstruction", False: "l2"}


def resolve_defaults(options: PruneOptions, has_data: bool) -> PruneOptions:
    """``options`` with ``criterion="auto"`` replaced by the default for the data at hand."""
    if options.criterion == "auto":
        return dataclasses.replace(options, criterion=AUTO_CRITERION[has_data])
    return options


def _measures_allocation(options: PruneOptions, feeds: list) -> bool:
    """Measured allocation applies to a MACs target with data, unless ratios were given."""
    if options.allocation == "uniform" or options.target_macs is None:
        return False
    if options.allocation.startswith("measured") and not feeds:
        raise UsageError(f"--allocation {options.allocation} needs --calib")
    return bool(feeds) and not options.layer_ratios and options.plan is None


def _criterion_stats(
    model: ir.Model, options: PruneOptions, feeds: list[dict[str, Any]]
) -> Mapping | None:
    """The statistics a data-driven criterion scores ``model``'s units with (else None)."""
    if options.criterion in ("activation", "apoz"):
        return activation_stats(model, analyze(model), feeds, options.criterion)
    if options.criterion in GRAM_CRITERIA:
        centered = options.criterion in CENTERED_CRITERIA
        return reconstruction_stats(model, analyze(model), feeds, centered=centered)
    return None


def _prune_step(
    model: ir.Model,
    options: PruneOptions,
    feeds: list[dict[str, Any]],
    dims: Mapping[str, int] | None,
    stats: Mapping | None,
    *,
    refit: bool = False,
) -> PruneReport:
    """One cut of ``model`` in place, its units scored with ``stats``
    (:func:`_criterion_stats` of this model): the measured allocation (with data and a MACs
    target; ``refit``: its probes refit in closed form, as the refit that follows will),
    the plan and the removal with compensation."""
    means = None
    if feeds:
        means = functools.partial(removed_input_means, model, feeds=feeds)
    allocation = None
    if _measures_allocation(options, feeds):
        refit = refit and options.allocation in ("auto", "measured-refit")
        allocation = measured_allocation(model, options, feeds, stats, dims, refit=refit)
        options = dataclasses.replace(options, target_macs=None, layer_ratios=allocation.ratios)
    report = prune_model(model, options, stats, dims, means)
    if allocation is not None:
        report.allocation = allocation
        report.notes.append(allocation.summary())
    return report


def _latency_search(
    model_path: str | os.PathLike[str],
    model: ir.Model,
    options: PruneOptions,
    target: LatencyTarget,
    *,
    feeds: list[dict[str, Any]],
    dims: Mapping[str, int] | None,
) -> LatencySearch:
    """The MACs fraction meeting ``target`` (:mod:`onnxprune.prune.latency`): candidates cut
    from copies of ``model`` (no refit: it does not change the latency) and timed against the
    input file in one interleaved run each."""
    stats = _criterion_stats(model, options, feeds)  # every candidate is a copy of model
    with tempfile.TemporaryDirectory(prefix="onnxprune-latency-") as folder:

        def latency_ratio(fraction: float) -> float:
            candidate = copy_model(model)
            cut = dataclasses.replace(options, target_macs=fraction)
            _prune_step(candidate, cut, feeds, dims, stats)
            path = Path(folder) / f"candidate_{fraction:.6f}.onnx"
            save(candidate, path)
            return target.measure(model_path, path, dims)

        return search_macs_for_latency(target.fraction, latency_ratio)


def prune_file(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    options: PruneConfig | PruneOptions,
    *,
    calib: str | os.PathLike[str] | None = None,
    reconstruct: bool | None = None,
    iterative: int = 1,
    dims: Mapping[str, int] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
) -> PruneFileResult:
    """Prune ``model_path`` into ``output_path``; the input file is never modified.

    Statistics and refits use the fit part of ``calib``; fidelity is reported on
    ``eval_data``, else on the held-out part of ``calib`` (:mod:`onnxprune.heldout`).
    With ``calib`` the data-driven choices are the defaults: ``criterion="auto"`` is
    ``reconstruction``, ``allocation="auto"`` is measured (a MACs target; with the refit,
    ``measured-refit``), and ``reconstruct=None`` refits (``False`` turns it off).

    ``options`` is a :class:`PruneConfig` (what the CLI and recipes build; it carries
    ``reconstruct``, ``iterative`` and ``dims`` itself, and the keywords are then ignored
    but for ``dims``, which override its own) or the algorithm's :class:`PruneOptions`.
    """
    latency: LatencyTarget | None = None
    if isinstance(options, PruneConfig):
        resolved = resolve(options, calib)
        options, reconstruct, iterative = (
            resolved.options,
            resolved.reconstruct,
            resolved.iterative,
        )
        dims = {**resolved.dims, **(dims or {})}
        latency = resolved.latency
    if latency is not None:
        if iterative > 1:
            raise UsageError("--target-latency cannot be combined with --iterative")
        options = dataclasses.replace(options, target_macs=latency.fraction)  # until measured
    options.validate()
    options = resolve_defaults(options, calib is not None)
    if reconstruct is None:  # with data, the refit is the default (kept only where it helps)
        reconstruct = calib is not None
    if iterative < 1:
        raise UsageError(f"--iterative {iterative}: must be >= 1")
    if iterative > 1 and options.plan is not None:
        raise UsageError("--iterative cannot replay a --plan")
    needs_data = reconstruct or options.criterion in _DATA_CRITERIA
    if needs_data and calib is None:
        wanted = "--reconstruct" if reconstruct else f"--criterion {options.criterion}"
        raise UsageError(f"--calib is required for {wanted}")
    teacher = load(model_path)
    model = load(model_path)
    refuse_unrewritable(model, str(model_path))
    split = split_data(model, calib, eval_data, dims=dims)
    feeds = split.fit_feeds(FIT_SAMPLES)
    # costs at the sizes of the data (then --dim), never the exporter's shape annotations
    dims = {**feed_dims(model, feeds), **(dims or {})} or None
    skip = ("fold-batchnorm",) if options.criterion == "bn" else ()
    canonicalize(model, skip=skip)
    search = None
    if latency is not None:
        search = _latency_search(model_path, model, options, latency, feeds=feeds, dims=dims)
        options = dataclasses.replace(options, target_macs=search.macs_fraction)
    steps, refits = [], []
    progress = 1.0
    for step in range(1, iterative + 1):
        step_options = _step_options(options, step, iterative, progress)
        stats = _criterion_stats(model, options, feeds)
        report = _prune_step(model, step_options, feeds, dims, stats, refit=bool(reconstruct))
        if search is not None:
            report.notes.append(search.summary())
            report.latency = search
        if split.fit is not None and len(split.fit) > len(feeds):
            report.notes.append(
                f"statistics and refits used the first {len(feeds)} of the "
                f"{len(split.fit)} fit samples"
            )
        steps.append(report)
        progress *= (
            report.macs[1] / max(report.macs[0], 1)
            if options.target_params is None
            else report.params[1] / max(report.params[0], 1)
        )
        if reconstruct:
            results = refit_consumers(teacher, model, report.kept, feeds, report.ranks)
            refits.append(results)
    canonicalize(model)
    fidelity: list[FidelityReport] = []

    def check(tmp: Path) -> None:
        fidelity.append(measure(str(model_path), tmp, split))

    dest = save(model, output_path, before_commit=check)
    return PruneFileResult(
        output=str(dest),
        steps=steps,
        refits=refits,
        fidelity=fidelity[0],
        macs=(steps[0].macs[0], steps[-1].macs[1]),
        params=(steps[0].params[0], steps[-1].params[1]),
        target_note=target_note(
            options,
            (steps[0].macs[0], steps[-1].macs[1]),
            (steps[0].params[0], steps[-1].params[1]),
        ),
    )
