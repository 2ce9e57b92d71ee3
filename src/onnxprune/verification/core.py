"""``onnxprune.verify``: compare a candidate model's outputs with a reference's.

Both models run in onnxruntime (CPU by default, graph optimizations on, as deployed) on
every sample, and are compared by the one comparator every command uses
(:mod:`onnxprune.fidelity`): per output, metrics pooled over all samples (rows of the last
axis, so ``top1_agreement`` is the share of agreeing rows over all rows of all samples;
integer outputs compared exactly) and each metric's worst sample.

The tolerance (:mod:`onnxprune.tolerance`, default ``cosine>=0.99,top1_agreement>=0.98``;
top-1 applies only to class-score and label outputs) must hold for every output's pooled
metrics; with ``layers=True`` the first diverging intermediate tensor is located too
(:mod:`onnxprune.verification.layers`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import onnx_ir as ir

from onnxprune.calib import load_calibration
from onnxprune.errors import UsageError
from onnxprune.fidelity import compare
from onnxprune.io import load
from onnxprune.tolerance import DEFAULT_TOLERANCE, Tolerance, Violation, parse_tolerance
from onnxprune.verification.layers import LayerReport, compare_layers

__all__ = ["AGGREGATION", "VERIFY_SCHEMA", "VerifyResult", "verify"]

VERIFY_SCHEMA = "onnxprune.verify/1"
AGGREGATION = (
    "per output: metrics over the concatenation of all samples (outputs as rows of the last "
    "axis; top-1 agreement over all rows of all samples; integer outputs compared exactly); "
    "worst_feed: each metric's worst single sample"
)


@dataclasses.dataclass
class VerifyResult:
    """Outcome of :func:`verify`; ``passed`` is False when a tolerance clause is violated."""

    reference: str
    candidate: str
    calibration: str
    samples: int
    tolerance: Tolerance
    outputs: dict[str, dict[str, float | None]]
    worst_feed: dict[str, dict[str, float | None]]
    violations: list[Violation]
    not_applicable: list[tuple[str, str]]
    layers: LayerReport | None = None

    @property
    def passed(self) -> bool:
        return not self.violations

    def failure_message(self) -> str:
        """One line naming every violated output and metric (and the first bad layer)."""
        text = "; ".join(v.message() for v in self.violations)
        first = self.layers.first_diverging if self.layers else None
        if first is not None:
            text += f"; first diverging layer: {first.describe()}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": VERIFY_SCHEMA,
            "reference": self.reference,
            "candidate": self.candidate,
            "calibration": self.calibration,
            "samples": self.samples,
            "aggregation": AGGREGATION,
            "tolerance": str(self.tolerance),
            "passed": self.passed,
            "violations": [v.to_dict() for v in self.violations],
            "not_applicable": [{"output": o, "metric": m} for o, m in self.not_applicable],
            "outputs": self.outputs,
            "worst_feed": self.worst_feed,
            "graph_optimizations": True,
            "layers": None if self.layers is None else self.layers.to_dict(),
        }


def _names_differ(what: str, ref: Iterable[str], cand: Iterable[str]) -> str | None:
    ref_set, cand_set = set(ref), set(cand)
    if ref_set == cand_set:
        return None
    only_ref = sorted(ref_set - cand_set)
    only_cand = sorted(cand_set - ref_set)
    return (
        f"reference and candidate {what} differ: only in reference: "
        f"{', '.join(only_ref) or 'none'}; only in candidate: {', '.join(only_cand) or 'none'}"
    )


def _check_interfaces(reference: ir.Model, candidate: ir.Model) -> None:
    ref_inputs = [
        v.name for v in reference.graph.inputs if v.name not in reference.graph.initializers
    ]
    cand_inputs = [
        v.name for v in candidate.graph.inputs if v.name not in candidate.graph.initializers
    ]
    for what, ref, cand in (
        ("inputs", ref_inputs, cand_inputs),
        (
            "outputs",
            [v.name for v in reference.graph.outputs],
            [v.name for v in candidate.graph.outputs],
        ),
    ):
        message = _names_differ(what, [str(n) for n in ref], [str(n) for n in cand])
        if message:
            raise UsageError(message)


def verify(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    calib: str | os.PathLike[str],
    *,
    tolerance: str | Tolerance = DEFAULT_TOLERANCE,
    layers: bool = False,
    layer_samples: int | None = 16,
    chunk_size: int = 64,
    sqnr_threshold: float = 40.0,
    cosine_threshold: float = 0.999,
    provider: str = "cpu",
    show_progress: bool | None = None,
) -> VerifyResult:
    """Compare ``candidate`` with ``reference`` on calibration data.

    Args:
        reference: The reference model path.
        candidate: The model to check (same input and output names).
        calib: Calibration data (see :mod:`onnxprune.calib`).
        tolerance: Expression that must hold for every output (default
            ``cosine>=0.99,top1_agreement>=0.98``).
        layers: Also compare intermediate tensors and locate the first diverging one.
        layer_samples: Samples used for the layer comparison (first N; None = all).
        chunk_size: At most this many intermediate tensors are exposed per run.
        sqnr_threshold: A layer with SQNR below this (dB) has diverged.
        cosine_threshold: A layer with cosine below this has diverged.
        provider: Execution provider for both models.
        show_progress: Force the progress bar on/off (default: when stderr is a terminal).

    Returns:
        The result; it does not raise on a violated tolerance (see ``passed``).

    Raises:
        UsageError: bad tolerance, mismatched inputs/outputs or output shapes.
        ModelLoadError, CalibrationError: unreadable models or data.
    """
    parsed = parse_tolerance(tolerance)
    if chunk_size < 1:
        raise UsageError(f"--layer-chunk {chunk_size}: must be at least 1")
    if layer_samples is not None and layer_samples < 1:
        raise UsageError(f"--layer-samples {layer_samples}: must be at least 1")
    ref_model, cand_model = load(reference), load(candidate)
    _check_interfaces(ref_model, cand_model)
    data = load_calibration(calib, ref_model, ignore=("label",))
    load_calibration(calib, cand_model, ignore=("label",))  # the candidate accepts it too
    measured = compare(reference, candidate, list(data.feeds()), data=str(calib), provider=provider)
    outputs = measured.outputs
    report = None
    if layers:
        count = len(data) if layer_samples is None else min(layer_samples, len(data))
        report = compare_layers(
            ref_model,
            cand_model,
            list(data.feeds(range(count))),
            chunk_size=chunk_size,
            sqnr_threshold=sqnr_threshold,
            cosine_threshold=cosine_threshold,
            show_progress=show_progress,
        )
    return VerifyResult(
        reference=str(reference),
        candidate=str(candidate),
        calibration=str(calib),
        samples=len(data),
        tolerance=parsed,
        outputs=outputs,
        worst_feed=measured.worst_feed,
        violations=parsed.violations(outputs),
        not_applicable=parsed.not_applicable(outputs),
        layers=report,
    )
