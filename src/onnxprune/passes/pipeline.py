"""The canonicalization pipeline: exact rewrites run in a fixed order to a fixed point.

Order (:data:`PASS_NAMES`): fold constants, eliminate no-ops, fold zero Pads into
Conv/AveragePool padding, spatial ReduceMean to GlobalAveragePool, fold BatchNorm, fuse
activations, fold affine ops, remove dead nodes, remove unused initializers, deduplicate
initializers, topological sort. One round runs every pass once; rounds repeat until a round
changes nothing (converged) or ``max_iterations`` rounds have run. Each pass is exact: the
rewritten model computes the same outputs.

Shapes inferred along the way are dropped at the end: intermediate values keep the
annotations the input had (see :mod:`onnxprune.passes._annotations` for why).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Sequence
from typing import Any

import onnx_ir as ir

from onnxprune.errors import UsageError
from onnxprune.passes import _annotations
from onnxprune.passes.base import Pass, PassReport, graph_stats
from onnxprune.passes.cleanup import (
    DeduplicateInitializersPass,
    RemoveDeadNodesPass,
    RemoveUnusedInitializersPass,
    TopologicalSortPass,
)
from onnxprune.passes.constant_folding import FoldConstantsPass
from onnxprune.passes.eliminate import EliminateNoOpsPass
from onnxprune.passes.fold_affine import FoldAffinePass
from onnxprune.passes.fold_batchnorm import FoldBatchNormPass
from onnxprune.passes.fold_pad import FoldPadPass
from onnxprune.passes.fuse_activations import FuseActivationsPass
from onnxprune.passes.reduce_mean_pool import ReduceMeanToPoolPass
from onnxprune.registry.options import option
from onnxprune.reports import Skip, to_json_value

__all__ = [
    "DEFAULT_MAX_ITERATIONS",
    "PASS_NAMES",
    "CanonicalizeConfig",
    "CanonicalizeReport",
    "canonicalize",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_ITERATIONS = 10

# Pass name (its ``name`` attribute) -> pass class, in the order the passes run.
_PASSES: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        FoldConstantsPass,
        EliminateNoOpsPass,
        # A zero Pad before a Conv/AveragePool becomes their own padding (no float island
        # between int8 kernels after quantization).
        FoldPadPass,
        # A spatial ReduceMean is GlobalAveragePool (int8 kernel in onnxruntime).
        ReduceMeanToPoolPass,
        FoldBatchNormPass,
        # Activations are fused before affine folding: folding GELU's 0.5 or 1/sqrt(2)
        # into a neighbouring MatMul would hide the pattern from us and from onnxruntime.
        FuseActivationsPass,
        FoldAffinePass,
        RemoveDeadNodesPass,
        RemoveUnusedInitializersPass,
        DeduplicateInitializersPass,
        TopologicalSortPass,
    )
}

#: Canonicalization passes in the order they run; the names ``--skip PASS`` accepts.
PASS_NAMES: tuple[str, ...] = tuple(_PASSES)


@dataclasses.dataclass
class CanonicalizeReport:
    """What :func:`canonicalize` did.

    Attributes:
        passes: Names of the passes that ran, in order.
        rounds: Pass reports per round (round ``i`` is ``rounds[i]``).
        converged: True when the last round changed nothing.
        skipped: Passes left out on request.
        before: Graph statistics before the first round.
        after: Graph statistics after the last round.
        annotations_restored: Intermediate values whose inferred shape/type annotation was
            dropped (or put back to the input's) at the end.
    """

    passes: list[str] = dataclasses.field(default_factory=list)
    rounds: list[list[PassReport]] = dataclasses.field(default_factory=list)
    converged: bool = False
    skipped: list[str] = dataclasses.field(default_factory=list)
    before: dict[str, int] = dataclasses.field(default_factory=dict)
    after: dict[str, int] = dataclasses.field(default_factory=dict)
    annotations_restored: int = 0

    @property
    def modified(self) -> bool:
        return any(r.modified for round_ in self.rounds for r in round_)

    def changes_by_pass(self) -> dict[str, list[dict[str, Any]]]:
        """Every change of every round, grouped by pass name."""
        out: dict[str, list[dict[str, Any]]] = {name: [] for name in self.passes}
        for i, round_ in enumerate(self.rounds):
            for name, report in zip(self.passes, round_, strict=True):
                out[name].extend({"round": i, **c.to_dict()} for c in report.changes)
        return out

    def final_skips(self) -> dict[str, list[Skip]]:
        """Skips of the last round (earlier rounds repeat them), grouped by pass name."""
        last = self.rounds[-1] if self.rounds else []
        return {name: list(r.skips) for name, r in zip(self.passes, last, strict=True)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, including the :meth:`summary` text."""
        return {
            "passes": list(self.passes),
            "iterations": len(self.rounds),
            "converged": self.converged,
            "skipped": list(self.skipped),
            "before": dict(self.before),
            "after": dict(self.after),
            "annotations_restored": self.annotations_restored,
            "changes": self.changes_by_pass(),
            "skips": to_json_value(self.final_skips()),
            "summary": self.summary(),
        }

    def summary(self) -> str:
        """A few lines for humans: counts per pass and before/after statistics."""
        state = "converged" if self.converged else "did NOT converge"
        lines = [f"canonicalize: {len(self.rounds)} round(s), {state}"]
        skips = self.final_skips()
        for name, changes in self.changes_by_pass().items():
            lines.append(f"  {name}: {len(changes)} change(s), {len(skips.get(name, []))} skip(s)")
        for name in self.skipped:
            lines.append(f"  {name}: skipped on request")
        lines.append(
            "  nodes {} -> {}, initializers {} -> {}, initializer bytes {} -> {}".format(
                self.before.get("nodes"),
                self.after.get("nodes"),
                self.before.get("initializers"),
                self.after.get("initializers"),
                self.before.get("initializer_bytes"),
                self.after.get("initializer_bytes"),
            )
        )
        lines.append(f"  inferred shape annotations dropped: {self.annotations_restored}")
        return "\n".join(lines)


def _select(passes: Sequence[str] | None, skip: Collection[str]) -> list[str]:
    chosen = list(PASS_NAMES if passes is None else passes)
    unknown = [name for name in [*chosen, *skip] if name not in PASS_NAMES]
    if unknown:
        raise UsageError(f"unknown pass {unknown[0]!r}; passes: {', '.join(PASS_NAMES)}")
    return [name for name in chosen if name not in skip]


def canonicalize(
    model: ir.Model,
    *,
    passes: Sequence[str] | None = None,
    skip: Collection[str] = (),
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> CanonicalizeReport:
    """Run the canonicalization passes on ``model`` in place until nothing changes.

    Args:
        model: The model to rewrite in place.
        passes: Pass names to run, in the given order (default: :data:`PASS_NAMES`).
        skip: Pass names to leave out.
        max_iterations: Upper bound on rounds; hitting it leaves ``converged`` False.

    Returns:
        The aggregated report.

    Raises:
        UsageError: A pass name is unknown or ``max_iterations`` is below 1.
    """
    if max_iterations < 1:
        raise UsageError(f"max_iterations must be >= 1, got {max_iterations}")
    names = _select(passes, skip)
    report = CanonicalizeReport(before=graph_stats(model), passes=names)
    report.skipped = [n for n in (PASS_NAMES if passes is None else passes) if n in skip]
    instances = [_PASSES[name]() for name in names]
    annotations = _annotations.snapshot(model)
    for i in range(max_iterations):
        round_ = [instance(model) for instance in instances]
        report.rounds.append(round_)
        logger.debug("round %d: %d change(s)", i, sum(len(r.changes) for r in round_))
        if not any(r.modified for r in round_):
            report.converged = True
            break
    if not report.converged:
        logger.warning("canonicalize did not converge in %d rounds", max_iterations)
    # Inferred shapes would reach onnxruntime as value_info and change which fusions it applies.
    report.annotations_restored = _annotations.restore(model, annotations)
    report.after = graph_stats(model)
    return report


@dataclasses.dataclass(frozen=True)
class CanonicalizeConfig:
    """Options of ``onnxprune canonicalize``."""

    skip: tuple[str, ...] = option((), help="leave out these passes", metavar="PASS")
    max_iterations: int = option(
        DEFAULT_MAX_ITERATIONS, help="at most this many rounds of all passes", metavar="N"
    )


def canonicalize_apply(model: ir.Model, config: CanonicalizeConfig, data: object) -> Any:
    """Transform ``canonicalize``: the exact passes of :func:`canonicalize`, in place."""
    return canonicalize(model, skip=config.skip, max_iterations=config.max_iterations)


def check_config(model: ir.Model, config: CanonicalizeConfig, has_calib: bool) -> None:
    """Refuse unknown pass names and a round count below 1."""
    _select(None, config.skip)
    if config.max_iterations < 1:
        raise UsageError(f"--max-iterations {config.max_iterations}: must be >= 1")
