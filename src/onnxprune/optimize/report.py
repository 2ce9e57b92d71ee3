"""The optimize report: per-step records, before/after statistics, and the table."""

from __future__ import annotations

import dataclasses
from typing import Any

from onnxprune.analysis.inspect import format_bytes, format_count

__all__ = ["ModelStats", "OptimizeReport", "StepRecord"]


@dataclasses.dataclass
class StepRecord:
    """What happened to one recipe step."""

    name: str
    options: dict[str, Any]
    status: str  # "applied", "skipped"
    strength: float
    tries: int
    reason: str = ""
    fidelity: dict[str, dict[str, float | None]] | None = None
    #: Wall-clock seconds of all tries of the step, its budget checks included.
    seconds: float = 0.0


@dataclasses.dataclass
class ModelStats:
    macs: int
    params: int
    file_bytes: int


@dataclasses.dataclass
class OptimizeReport:
    """Everything ``onnxprune optimize`` measured; ``written`` says whether OUT exists."""

    input: str
    output: str | None
    recipe: dict[str, Any]
    budget: str | None
    provider: str
    steps: list[StepRecord]
    before: ModelStats
    after: ModelStats
    latency_ms: tuple[float, float] | None = None
    latency_ratio: tuple[float, float, float] | None = None  # ratio, low, high
    accuracy: tuple[float, float] | None = None
    fidelity: dict[str, dict[str, float | None]] | None = None
    fidelity_data: str | None = None  # which samples ``fidelity`` was measured on
    overfit: str | None = None  # fit samples much better than held-out ones (one line)
    written: bool = False
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["schema"] = "onnxprune.optimize/1"
        return data

    def to_table(self) -> str:
        rows = [
            ("MACs", format_count(self.before.macs), format_count(self.after.macs)),
            ("parameters", format_count(self.before.params), format_count(self.after.params)),
            (
                "file size",
                format_bytes(self.before.file_bytes),
                format_bytes(self.after.file_bytes),
            ),
        ]
        if self.latency_ms is not None and self.latency_ratio is not None:
            ratio, low, high = self.latency_ratio
            rows.append(
                (
                    f"latency ({self.provider}, median)",
                    f"{self.latency_ms[0]:.3f} ms",
                    f"{self.latency_ms[1]:.3f} ms ({1 / ratio:.2f}x faster, "
                    f"95% CI {1 / high:.2f}-{1 / low:.2f})",
                )
            )
        if self.accuracy is not None:
            rows.append(
                (
                    "accuracy (held-out)",
                    f"{100 * self.accuracy[0]:.2f}%",
                    f"{100 * self.accuracy[1]:.2f}%",
                )
            )
        for name, metrics in (self.fidelity or {}).items():
            shown = [
                f"{k} {v:.4f}"
                for k, v in metrics.items()
                if k in ("cosine", "top1_agreement", "sqnr_db") and v is not None
            ]
            rows.append((f"fidelity {name}", "-", ", ".join(shown)))
        if self.fidelity_data:
            rows.append(("fidelity measured on", "-", self.fidelity_data))
        width = max(len(r[0]) for r in rows)
        left = max(len(r[1]) for r in rows)
        lines = [f"{'':<{width}}  {'before':>{left}}  after", "-" * (width + left + 30)]
        lines += [f"{a:<{width}}  {b:>{left}}  {c}" for a, b, c in rows]
        lines.append("")
        for step in self.steps:
            strength = f"strength {step.strength:.2f}, " if step.strength < 1 else ""
            detail = f" ({strength}{step.seconds:.1f} s)"
            reason = f": {step.reason}" if step.reason else ""
            lines.append(f"step {step.name:<12} {step.status}{detail}{reason}")
        lines.append("")
        if self.overfit:
            lines.append(f"warning: {self.overfit}")
        lines.append(self.message)
        return "\n".join(lines)
