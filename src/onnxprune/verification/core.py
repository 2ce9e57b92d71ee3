"""``onnxprune.verify``: compare a candidate model's outputs with a reference's.

Both models run in onnxruntime (CPU by default, graph optimizations off so the numbers are
the models' own) on every calibration sample. Aggregation: per output, the metrics of
:mod:`onnxprune.metrics` are computed once over the concatenation of that output across all
samples; outputs of rank >= 2 are first reshaped to rows of their last axis, so
``top1_agreement`` is the share of agreeing rows over all rows of all samples, and
``max_*`` are maxima over every sample. When the last axis varies between samples (token
lengths), the samples are flattened and concatenated instead (no top-1).

The tolerance (:mod:`onnxprune.tolerance`, default ``cosine>=0.99``) must hold for every
output; with ``layers=True`` the first diverging intermediate tensor is located too
(:mod:`onnxprune.verification.layers`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.calib import CalibrationData, load_calibration
from onnxprune.errors import UsageError
from onnxprune.io import load
from onnxprune.metrics import output_metrics
from onnxprune.runtime import make_session
from onnxprune.tolerance import DEFAULT_TOLERANCE, Tolerance, Violation, parse_tolerance
from onnxprune.verification.layers import LayerReport, compare_layers

__all__ = ["AGGREGATION", "VERIFY_SCHEMA", "VerifyResult", "verify"]

VERIFY_SCHEMA = "onnxprune.verify/1"
AGGREGATION = (
    "per output: metrics over the concatenation of all calibration samples (rank>=2 outputs "
    "as rows of the last axis; top-1 agreement over all rows of all samples)"
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


def _rows(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1, array.shape[-1]) if array.ndim >= 2 else array.reshape(-1)


def _output_metrics(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    data: CalibrationData,
    provider: str,
) -> dict[str, dict[str, float | None]]:
    ref_session = make_session(reference, provider=provider)
    cand_session = make_session(candidate, provider=provider)
    names = [o.name for o in ref_session.get_outputs()]
    ref_parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    cand_parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for index, feed in enumerate(data.feeds()):
        ref_out = ref_session.run(names, feed)
        cand_out = cand_session.run(names, feed)
        for name, r, c in zip(names, ref_out, cand_out, strict=True):
            if r.shape != c.shape:
                raise UsageError(
                    f"output {name!r} has shape {list(r.shape)} in the reference but "
                    f"{list(c.shape)} in the candidate (sample {index})"
                )
            ref_parts[name].append(r)
            cand_parts[name].append(c)
    return {name: _concat_metrics(ref_parts[name], cand_parts[name]) for name in names}


def _concat_metrics(
    reference: list[np.ndarray], candidate: list[np.ndarray]
) -> dict[str, float | None]:
    # Rows of the last axis keep top-1 meaningful; when that axis varies between samples
    # (e.g. a [1, seq] output over token lengths) the samples are flattened instead.
    if len({a.shape[-1] if a.ndim else 0 for a in reference}) == 1:
        return output_metrics(
            np.concatenate([_rows(a) for a in reference]),
            np.concatenate([_rows(a) for a in candidate]),
        )
    return output_metrics(
        np.concatenate([a.ravel() for a in reference]),
        np.concatenate([a.ravel() for a in candidate]),
    )


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
        tolerance: Expression that must hold for every output (default ``cosine>=0.99``).
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
    data = load_calibration(calib, ref_model)
    load_calibration(calib, cand_model)  # the candidate must accept the same data
    outputs = _output_metrics(reference, candidate, data, provider)
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
        violations=parsed.violations(outputs),
        not_applicable=parsed.not_applicable(outputs),
        layers=report,
    )
