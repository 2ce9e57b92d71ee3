"""The report of :func:`onnxprune.quant.quantize_file`."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from onnxprune.analysis.inspect import disk_bytes
from onnxprune.heldout import FidelityReport
from onnxprune.quant.speed import SpeedCheck
from onnxprune.reporting import json_safe
from onnxprune.reports import FLATTEN, KEEP_NONE, Record, Skip, key

if TYPE_CHECKING:
    from onnxprune.quant.bias import BiasCorrection
    from onnxprune.quant.refine import LayerOutcome

__all__ = [
    "BiasCorrectionReport",
    "BudgetSearchReport",
    "EqualizeReport",
    "MethodChoice",
    "OpsetChange",
    "PhaseSeconds",
    "QuantizeDetails",
    "QuantizeResult",
    "RefineReport",
    "RemedyChoice",
    "RoundingReport",
    "SmoothQuantReport",
    "file_bytes",
    "worst",
]

CacheState = Literal["off", "hit", "miss"]


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


@dataclasses.dataclass
class PhaseSeconds:
    """Wall seconds per phase, in the order the phases ended (``seconds`` in the JSON)."""

    phases: dict[str, float] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Record the wall seconds of ``phase``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = round(time.perf_counter() - start, 3)

    def __contains__(self, phase: object) -> bool:
        return phase in self.phases

    def to_dict(self) -> dict[str, float]:
        return dict(self.phases)


@dataclasses.dataclass(frozen=True)
class OpsetChange(Record):
    """The opset the model came with, the one quantized, whether per-channel weights are
    allowed, and why an upgrade was not taken (:func:`onnxprune.quant.prepare.ensure_opset`)."""

    from_: int = dataclasses.field(metadata=key("from"))
    to: int
    per_channel: bool
    reason: str | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> OpsetChange:
        reason = record.get("reason")
        return cls(int(record["from"]), int(record["to"]), bool(record["per_channel"]), reason)


@dataclasses.dataclass(frozen=True)
class RemedyChoice(Record):
    """The u8s8 saturation remedy, why, and each measured candidate's worst output SQNR."""

    remedy: str
    reason: str
    candidates_sqnr_db: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MethodChoice(Record):
    """``--method auto``: the range method kept and each method's worst output SQNR."""

    chosen: str
    candidates_sqnr_db: dict[str, float]


@dataclasses.dataclass
class SmoothQuantReport(Record):
    """SmoothQuant's strength (None: not applied), why, and the smoothed tensors."""

    alpha: float | None = dataclasses.field(metadata=KEEP_NONE)
    reason: str
    smoothed: list[str] | None = None
    folded_into_layernorm: list[str] | None = None
    #: auto: worst output SQNR (calibration feeds) of the candidate of each alpha tried
    candidates_sqnr_db: dict[str, float] | None = None


@dataclasses.dataclass
class EqualizeReport(Record):
    """Cross-layer equalization: tried or not, kept or not, and why."""

    mode: str
    applied: bool = False
    reason: str | None = None
    pairs: int | None = None
    sweeps: int | None = None
    relaxed_clips: Any = None
    skipped: list[dict[str, str | None]] | None = None
    sqnr_db_with: float | None = None
    sqnr_db_without: float | None = None


@dataclasses.dataclass
class BiasCorrectionReport(Record):
    """Bias correction: kept or not and why, the feeds it was fitted and judged on, the
    corrected and skipped layers, the worst output SQNR without and with it."""

    mode: str
    applied: bool = False
    reason: str | None = None
    fit_feeds: int | None = None
    judged_on_feeds: int | None = None
    correction: BiasCorrection | None = dataclasses.field(default=None, metadata=FLATTEN)
    sqnr_db_without: float | None = None
    sqnr_db_with: float | None = None
    #: Feeds counted as independent when offsets were shrunk (None: every feed).
    evidence: int | None = None
    #: ``auto``: held-out worst output SQNR per shrinkage strength tried.
    candidates_sqnr_db: dict[str, float] | None = None


@dataclasses.dataclass
class RefineReport(Record):
    """Learned rounding: kept or not and why, the feeds it was fitted and judged on, each
    layer's outcome, the skipped layers, the worst output SQNR without and with it."""

    mode: str
    applied: bool = False
    reason: str | None = None
    fit_feeds: int | None = None
    judged_on_feeds: int | None = None
    layers: list[LayerOutcome] | None = None
    skipped: list[Skip] | None = None
    refined: int | None = None
    sqnr_db_without: float | None = None
    sqnr_db_with: float | None = None


@dataclasses.dataclass
class RoundingReport(Record):
    """Error-compensated weight rounding (GPTQ, :mod:`onnxprune.quant.gptq`): kept or not
    and why, the layers rounded that way and the ones left to plain rounding (and why), the
    feeds the moments came from and the feeds it was judged on, the worst output SQNR with
    nearest rounding and with it."""

    mode: str
    applied: bool = False
    reason: str | None = None
    fit_feeds: int | None = None
    judged_on_feeds: int | None = None
    layers: int | None = None
    skipped: list[Skip] | None = None
    sqnr_db_without: float | None = None
    sqnr_db_with: float | None = None


@dataclasses.dataclass(frozen=True)
class BudgetSearchReport(Record):
    """Layers kept float for ``--budget`` and the trials of the search (flattened into the
    details as ``kept_float`` and ``budget_trials``)."""

    kept_float: list[str]
    budget_trials: list[dict[str, object]]
    #: The range method the budget was met with: ``--method auto`` chooses with every layer
    #: quantized, and when the budget cannot be met with that choice the others are tried.
    budget_range_method: str | None = None


@dataclasses.dataclass
class QuantizeDetails(Record):
    """How :func:`onnxprune.quant.quantize_file` got there, one record per concern; the
    JSON (``details``) leaves out what did not happen. ``plan``, ``dynamic``, ``fp16``,
    ``int8_mac_share`` and ``sensitivity`` are their producers' summaries."""

    canonicalize: str
    cpu: dict[str, bool]
    opset: OpsetChange
    seconds: PhaseSeconds = dataclasses.field(default_factory=PhaseSeconds)
    calibration_cache: dict[str, CacheState] | None = None
    smoothquant: SmoothQuantReport | None = None
    u8s8: RemedyChoice | None = None
    range_method: str | None = None
    method: MethodChoice | None = None
    method_equalized: MethodChoice | None = None
    equalize: EqualizeReport | None = None
    plan: dict[str, Any] | None = None
    rounding: RoundingReport | None = None
    bias_correction: BiasCorrectionReport | None = None
    refine: RefineReport | None = None
    worst_layers_harm_db: dict[str, float] | None = None
    sensitivity: list[dict[str, float | str]] | None = None
    budget: BudgetSearchReport | None = dataclasses.field(default=None, metadata=FLATTEN)
    dynamic: dict[str, object] | None = None
    fp16: dict[str, object] | None = None
    int8_mac_share: dict[str, object] | None = None

    @property
    def kept_float(self) -> list[str] | None:
        """Layers kept float for ``--budget`` (None without a budget search)."""
        return None if self.budget is None else self.budget.kept_float


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
            (:class:`QuantizeDetails`)
        input_bytes: Size of the input model files.
        output_bytes: Size of the written model files.
        speed: The written model timed against the input on this machine (int8 for the
            CPU, ``--speed-check``), None when not measured.
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
    details: QuantizeDetails
    input_bytes: int
    output_bytes: int
    speed: SpeedCheck | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite floats as strings)."""
        payload = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        payload["fidelity"] = self.fidelity.to_dict()
        payload["details"] = self.details.to_dict()
        payload["speed"] = None if self.speed is None else self.speed.to_dict()
        return json_safe({"schema": "onnxprune.quantize/1", **payload})

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
        details = self.details
        opset = details.opset
        if opset.reason:
            lines.append(f"opset {opset.from_}: {opset.reason}")
        elif opset.from_ != opset.to:
            lines.append(f"opset {opset.from_} -> {opset.to} (outputs checked unchanged)")
        if details.u8s8:
            lines.append(f"u8s8 remedy: {details.u8s8.remedy} ({details.u8s8.reason})")
        smooth = details.smoothquant
        if smooth and smooth.candidates_sqnr_db:
            scores = ", ".join(f"{a} {v:.1f} dB" for a, v in smooth.candidates_sqnr_db.items())
            lines.append(f"SmoothQuant alpha {smooth.alpha} chosen by measurement ({scores})")
        if details.method:
            scores = ", ".join(
                f"{m} {v:.1f} dB" for m, v in details.method.candidates_sqnr_db.items()
            )
            lines.append(f"range method chosen by measurement ({scores})")
        Step = EqualizeReport | RoundingReport | BiasCorrectionReport | RefineReport
        steps: tuple[tuple[Step | None, str], ...] = (
            (details.equalize, "cross-layer equalization"),
            (details.rounding, "error-compensated rounding (GPTQ)"),
            (details.bias_correction, "bias correction"),
            (details.refine, "learned rounding (AdaRound)"),
        )
        for step, what in steps:
            if step and step.mode != "off":
                done = "applied" if step.applied else "not applied"
                lines.append(f"{what}: {done} ({step.reason})")
        cache = details.calibration_cache
        if cache and any(v != "off" for v in cache.values()):
            states = ", ".join(f"{k} {v}" for k, v in cache.items())
            lines.append(f"calibration cache: {states} (hit: statistics reused, no pass run)")
        share = details.int8_mac_share
        if share:
            value, islands = share["int8_mac_share"], share.get("islands")
            percent = 100 * float(value) if isinstance(value, int | float) else float("nan")
            lines.append(f"int8 MAC share in onnxruntime: {percent:.1f} %")
            lines.append(_islands_line(islands if isinstance(islands, list) else []))
        harm = details.worst_layers_harm_db
        if harm:
            top = ", ".join(f"{name} {value:.1f} dB" for name, value in list(harm.items())[:3])
            lines.append(f"most harmful layers (added noise / signal): {top}")
        sensitivity = details.sensitivity
        if sensitivity:
            top = ", ".join(f"{r['node']} {float(r['sqnr_db']):.1f} dB" for r in sensitivity[:5])
            lines.append(f"most sensitive layers (output SQNR when quantized alone): {top}")
        kept = details.kept_float
        if kept:
            more = f" and {len(kept) - 5} more" if len(kept) > 5 else ""
            lines.append(f"kept in float for the budget ({len(kept)}): {', '.join(kept[:5])}{more}")
        budget = details.budget
        if budget and details.method and budget.budget_range_method != details.method.chosen:
            lines.append(
                f"range method {budget.budget_range_method} used instead: the budget cannot be "
                f"met with {details.method.chosen}"
            )
        lines.append(f"wrote {self.output} ({self.input_bytes} -> {self.output_bytes} bytes)")
        if self.speed is not None:
            lines.append(self.speed.summary())
        return "\n".join(lines)
