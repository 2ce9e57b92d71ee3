"""The report of :func:`onnxprune.quant.quantize_file`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnxprune.analysis.inspect import disk_bytes
from onnxprune.heldout import FidelityReport
from onnxprune.reporting import json_safe

__all__ = ["QuantizeResult", "file_bytes", "worst"]


def file_bytes(path: Path) -> int:
    """Size of a model on disk, as every command reports it (:func:`disk_bytes`)."""
    return disk_bytes(path)


def worst(metrics: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    """The worst value of each metric over all outputs."""

    def pick(key: str, lowest: bool) -> float | None:
        values = [float(v) for m in metrics.values() if (v := m.get(key)) is not None]
        if not values:
            return None
        return min(values) if lowest else max(values)

    return {
        "sqnr_db": pick("sqnr_db", True),
        "cosine": pick("cosine", True),
        "top1_agreement": pick("top1_agreement", True),
        "max_abs_error": pick("max_abs_error", False),
    }


def _islands_line(islands: list[dict[str, Any]]) -> str:
    """One line on the float work left between int8 kernels in onnxruntime's graph."""
    if not islands:
        return "float islands between int8 kernels in onnxruntime's graph: none"
    named = ", ".join(f"{i['kind']} {i['op_type']} {i['node']}" for i in islands[:5])
    more = f" and {len(islands) - 5} more" if len(islands) > 5 else ""
    return (
        f"float islands between int8 kernels in onnxruntime's graph ({len(islands)}): {named}{more}"
    )


@dataclasses.dataclass
class QuantizeResult:
    """What was quantized, how, and how close the result is to the float model.

    Attributes:
        input: Input model path.
        output: Written model path.
        mode: ``static``, ``dynamic`` or ``fp16``.
        method: Calibration method (static int8 only).
        target: ``cpu`` or ``tensorrt``.
        samples: Calibration samples fitted on (ranges, remedies, bias correction).
        metrics: Per output metrics against the float model on those fit samples
            (onnxruntime optimizations on); the decisions were made on these.
        fidelity: The report's fidelity: on ``--eval`` data, else on held-out calibration
            samples never used for fitting (:mod:`onnxprune.heldout`).
        worst: Worst value of each held-out metric over outputs.
        details: Plan, u8s8 remedy and reason, layers kept float, int8 MAC share, ...
        input_bytes: Size of the input model files.
        output_bytes: Size of the written model files.
    """

    input: str
    output: str
    mode: str
    method: str | None
    target: str
    samples: int
    metrics: dict[str, dict[str, float | None]]
    fidelity: FidelityReport
    worst: dict[str, float | None]
    details: dict[str, Any]
    input_bytes: int
    output_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite floats as strings)."""
        payload = {"schema": "onnxprune.quantize/1", **dataclasses.asdict(self)}
        payload["fidelity"] = self.fidelity.to_dict()
        return json_safe(payload)

    def summary(self) -> str:
        """A few human-readable lines."""
        fit = worst(self.metrics)
        lines = [
            f"mode {self.mode}"
            + (f", method {self.method}" if self.method else "")
            + f", target {self.target}, fitted on {self.samples} calibration samples "
            f"(worst output there: SQNR {fit['sqnr_db']:.1f} dB)",
            *self.fidelity.summary(),
        ]
        opset = self.details.get("opset")
        if opset and opset.get("reason"):
            lines.append(f"opset {opset['from']}: {opset['reason']}")
        elif opset and opset["from"] != opset["to"]:
            lines.append(f"opset {opset['from']} -> {opset['to']} (outputs checked unchanged)")
        u8s8 = self.details.get("u8s8")
        if u8s8:
            lines.append(f"u8s8 remedy: {u8s8['remedy']} ({u8s8['reason']})")
        method = self.details.get("method")
        if method:
            scores = ", ".join(f"{m} {v:.1f} dB" for m, v in method["candidates_sqnr_db"].items())
            lines.append(f"range method chosen by measurement ({scores})")
        for key, what in (
            ("equalize", "cross-layer equalization"),
            ("bias_correction", "bias correction"),
            ("refine", "learned rounding (AdaRound)"),
        ):
            step = self.details.get(key)
            if step and step.get("mode") != "off":
                done = "applied" if step.get("applied") else "not applied"
                lines.append(f"{what}: {done} ({step.get('reason')})")
        cache = self.details.get("calibration_cache")
        if cache and any(v != "off" for v in cache.values()):
            states = ", ".join(f"{k} {v}" for k, v in cache.items())
            lines.append(f"calibration cache: {states} (hit: statistics reused, no pass run)")
        share = self.details.get("int8_mac_share")
        if share:
            lines.append(f"int8 MAC share in onnxruntime: {100 * share['int8_mac_share']:.1f} %")
            lines.append(_islands_line(share.get("islands", [])))
        harm = self.details.get("worst_layers_harm_db")
        if harm:
            top = ", ".join(f"{name} {value:.1f} dB" for name, value in list(harm.items())[:3])
            lines.append(f"most harmful layers (added noise / signal): {top}")
        sensitivity = self.details.get("sensitivity")
        if sensitivity:
            top = ", ".join(f"{r['node']} {float(r['sqnr_db']):.1f} dB" for r in sensitivity[:5])
            lines.append(f"most sensitive layers (output SQNR when quantized alone): {top}")
        kept = self.details.get("kept_float")
        if kept:
            more = f" and {len(kept) - 5} more" if len(kept) > 5 else ""
            lines.append(f"kept in float for the budget ({len(kept)}): {', '.join(kept[:5])}{more}")
        lines.append(f"wrote {self.output} ({self.input_bytes} -> {self.output_bytes} bytes)")
        return "\n".join(lines)
