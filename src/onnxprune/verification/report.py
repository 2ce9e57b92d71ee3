"""Markdown report of a :class:`~onnxprune.verification.core.VerifyResult`."""

from __future__ import annotations

import math

from onnxprune.metrics import METRIC_NAMES
from onnxprune.verification.core import VerifyResult

__all__ = ["verify_markdown"]

_TOP_LAYERS = 10


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return f"{value:.6g}"


def _layers_section(result: VerifyResult) -> list[str]:
    report = result.layers
    if report is None:
        return []
    first, worst = report.first_diverging, report.worst
    lines = [
        "",
        f"## Layers ({len(report.layers)} tensors compared on {report.samples} samples, "
        f"{len(report.skipped)} skipped; diverged = SQNR < {report.sqnr_threshold:g} dB or "
        f"cosine < {report.cosine_threshold:g})",
        "",
        f"- first diverging: {first.describe() if first else 'none'}",
        f"- worst: {worst.describe() if worst else 'none'}",
        "",
        "| # | tensor | op | SQNR dB | cosine | max abs error | diverged |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in report.ranked()[:_TOP_LAYERS]:
        lines.append(
            f"| {m.index} | {m.name} | {m.op_type} | {_fmt(m.sqnr_db)} | {_fmt(m.cosine)} "
            f"| {_fmt(m.max_abs_error)} | {'yes' if m.diverged else 'no'} |"
        )
    return lines


def verify_markdown(result: VerifyResult) -> str:
    """Summary, one row per output, and the worst layers when they were compared."""
    status = "PASSED" if result.passed else "FAILED"
    lines = [
        f"# onnxprune verify: {status}",
        "",
        f"- reference: {result.reference}",
        f"- candidate: {result.candidate}",
        f"- calibration: {result.calibration} ({result.samples} samples, metrics over the "
        "concatenation of all samples per output)",
        f"- tolerance: {result.tolerance}",
    ]
    lines += [f"- violated: {v.message()}" for v in result.violations]
    lines += [
        "",
        "| output | " + " | ".join(METRIC_NAMES) + " |",
        "|---|" + "---|" * len(METRIC_NAMES),
    ]
    for name, metrics in result.outputs.items():
        cells = " | ".join(_fmt(metrics.get(m)) for m in METRIC_NAMES)
        lines.append(f"| {name} | {cells} |")
    lines += _layers_section(result)
    return "\n".join(lines) + "\n"
