"""The low-rank report: what was factorized or folded and what was skipped and why (the
driver's envelope adds parameters, MACs and fidelity)."""

from __future__ import annotations

import dataclasses
from typing import Any

from onnxprune.lowrank.factorize import LayerRecord
from onnxprune.passes.base import PassReport
from onnxprune.reporting import json_safe

__all__ = ["LowRankOutcome"]


@dataclasses.dataclass
class LowRankOutcome:
    """What :func:`~onnxprune.lowrank.api.lowrank_model` did to the model (the ``lowrank``
    key of the driver's report)."""

    factorize: PassReport | None
    fold: PassReport | None
    layers: list[LayerRecord]
    shared_energy: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (inf/nan as strings)."""
        return {
            "shared_energy": json_safe(self.shared_energy),
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "factorize": self.factorize.to_dict() if self.factorize else None,
            "fold": self.fold.to_dict() if self.fold else None,
        }

    def summary(self) -> str:
        """A line per pass for the terminal."""
        lines = []
        for name, report in (("factorized", self.factorize), ("folded", self.fold)):
            if report is not None:
                lines.append(f"{name} {len(report.changes)} layers, skipped {len(report.skips)}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """Per-layer table plus the summary, for humans."""
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
