"""The low-rank report: what was factorized or folded, what was skipped and why, and fidelity.

Fidelity is measured after the rewrite by running the original and the rewritten file on
the same feeds (calibration samples, else synthetic) in onnxruntime with graph
optimizations off; per output it keeps the worst value over the feeds of cosine, SQNR and
max abs error (:mod:`onnxprune.metrics`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from onnxprune.heldout import FidelityReport
from onnxprune.lowrank.factorize import LayerRecord
from onnxprune.passes.base import PassReport
from onnxprune.reporting import json_safe

__all__ = ["SCHEMA", "LowRankResult"]

SCHEMA = "onnxprune.lowrank/1"


@dataclasses.dataclass
class LowRankResult:
    """Report of :func:`onnxprune.lowrank.lowrank_file`."""

    input: str
    output: str
    config: dict[str, Any]
    factorize: PassReport | None
    fold: PassReport | None
    layers: list[LayerRecord]
    shared_energy: float
    params: tuple[int, int]
    macs: tuple[int, int]
    fidelity: FidelityReport

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (schema ``onnxprune.lowrank/1``; inf/nan as strings)."""
        return {
            "schema": SCHEMA,
            "input": self.input,
            "output": self.output,
            "config": self.config,
            "shared_energy": json_safe(self.shared_energy),
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "factorize": self.factorize.to_dict() if self.factorize else None,
            "fold": self.fold.to_dict() if self.fold else None,
            "params": {"before": self.params[0], "after": self.params[1]},
            "macs": {"before": self.macs[0], "after": self.macs[1]},
            "fidelity": json_safe(self.fidelity.to_dict()),
        }

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = []
        for name, report in (("factorized", self.factorize), ("folded", self.fold)):
            if report is not None:
                lines.append(f"{name} {len(report.changes)} layers, skipped {len(report.skips)}")
        p0, p1 = self.params
        m0, m1 = self.macs
        lines.append(f"params {p0} -> {p1} ({p1 / max(p0, 1):.1%}), MACs {m0} -> {m1}")
        lines += self.fidelity.summary()
        lines.append(f"wrote {self.output}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """Per-layer table plus totals, for humans."""
        rows = [
            "| node | kind | weight | ranks | params | energy kept | output error |",
            "|---|---|---|---|---|---|---|",
        ]
        for layer in self.layers:
            err = "-" if layer.output_error is None else f"{layer.output_error:.4f}"
            rows.append(
                f"| {layer.node} | {layer.kind} | {layer.weight_shape} | {layer.ranks} | "
                f"{layer.params_before} -> {layer.params_after} | {layer.energy_kept:.4f} | {err} |"
            )
        return "\n".join([*rows, "", self.summary()])
