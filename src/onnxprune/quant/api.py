"""File-level quantization API: what ``onnxprune quantize`` calls.

Flow: load -> refuse already-quantized models -> canonicalize (fold BatchNorm/affine first,
so folded weights are quantized once) -> opset >= 13 -> calibrate -> choose the u8s8 remedy
-> build -> compare with the float model on the calibration feeds (onnxruntime optimizations
on, the kernels users get) -> bias correction (kept in ``auto`` only if the output SQNR
improves) -> learned rounding of the int8 weights (``--refine``, :mod:`onnxprune.quant.refine`,
same keep rule) -> keep layers float for ``--budget`` (the found model refined again) -> save
atomically.

A collapsed result (output SQNR < 0 dB or a constant output) raises BudgetError and nothing
is written; so does an unreachable budget.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import onnx_ir as ir

from onnxprune.analysis import count_costs
from onnxprune.errors import BudgetError, UsageError
from onnxprune.heldout import FidelityReport, measure, split_data
from onnxprune.io import load, save, source_files
from onnxprune.io.validate import refuse_unrewritable
from onnxprune.passes import pipeline
from onnxprune.quant import dynamic, fp16
from onnxprune.quant.analysis import (
    compare_outputs,
    converted_mac_share,
    int8_mac_share,
    is_collapsed,
    reference_outputs,
)
from onnxprune.quant.bias import (
    BIAS_MODES,
    BiasCorrection,
    correct_bias_variants,
    correct_biases,
)
from onnxprune.quant.calib_cache import CalibrationCache
from onnxprune.quant.calibrate import CALIBRATION_METHODS, METHODS
from onnxprune.quant.core import QuantOptions, StaticQuantizer, copy_model
from onnxprune.quant.equalize import equalize as cross_layer_equalize
from onnxprune.quant.gptq import collect_moments
from onnxprune.quant.mixed import BudgetSearch, rank_harm, search_budget
from onnxprune.quant.placement import PRIMARY_OPS
from onnxprune.quant.prepare import (
    ensure_opset,
    name_nodes,
    refuse_non_float32,
    refuse_quantized,
)
from onnxprune.quant.report import (
    BiasCorrectionReport,
    BudgetSearchReport,
    EqualizeReport,
    MethodChoice,
    OpsetChange,
    QuantizeDetails,
    QuantizeResult,
    RefineReport,
    RemedyChoice,
    RoundingReport,
    SmoothQuantReport,
    file_bytes,
    worst,
)
from onnxprune.quant.sensitivity import rank_sensitivity
from onnxprune.quant.smooth import smooth_matmuls
from onnxprune.quant.speed import speed_check as check_speed
from onnxprune.quant.vnni import REMEDIES, cpu_isa, needs_u8s8_remedy
from onnxprune.reports import Skip
from onnxprune.tolerance import Tolerance, parse_tolerance

__all__ = ["MODES", "TARGETS", "QuantizeResult", "quantize_file"]

logger = logging.getLogger(__name__)

MODES = ("static", "dynamic")
TARGETS = ("cpu", "tensorrt")
DTYPES = ("int8", "fp16")
EQUALIZE_MODES = ("auto", "on", "off")
REFINE_MODES = ("off", "auto", "adaround")
ROUNDING_MODES = ("auto", "nearest", "gptq")
NO_TORCH = "--refine adaround needs torch: pip install onnxprune[recover]"
_CHOICE_FEEDS = 16
_RANK_FEEDS = 4
_SENSITIVITY_FEEDS = 8
_EQUALIZE_MIN_GAIN_DB = 0.1
_MIN_HOLDOUT_FEEDS = 8
Reference = Mapping[str, list]


@dataclasses.dataclass(frozen=True)
class _Request:
    method: str
    per_channel: bool
    mode: str
    target: str
    dtype: str
    exclude: tuple[str, ...]
    budget: Tolerance | None
    u8s8: str
    smooth: float | str | None = None
    bias_correction: str = "auto"
    equalize: str = "auto"
    cache: CalibrationCache | None = None
    refine: str = "off"
    refine_options: Any = None  # onnxprune.quant.refine.RefineOptions (imports torch)
    rounding: str = "auto"


def _check_choice(flag: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(f"{flag} {value!r}: choose one of {', '.join(choices)}")


def _validate(request: _Request, model: ir.Model) -> None:
    _check_choice("--method", request.method, CALIBRATION_METHODS)
    _check_choice("--mode", request.mode, MODES)
    _check_choice("--target", request.target, TARGETS)
    _check_choice("--dtype", request.dtype, DTYPES)
    _check_choice("--u8s8", request.u8s8, REMEDIES)
    _check_choice("--bias-correction", request.bias_correction, BIAS_MODES)
    _check_choice("--equalize", request.equalize, EQUALIZE_MODES)
    _check_choice("--refine", request.refine, REFINE_MODES)
    _check_choice("--rounding", request.rounding, ROUNDING_MODES)
    if request.refine == "adaround":
        if request.mode != "static" or request.dtype != "int8":
            raise UsageError("--refine adaround needs static int8 (--mode static --dtype int8)")
        if importlib.util.find_spec("torch") is None:
            raise UsageError(NO_TORCH)
    names = {n.name for n in model.graph}
    if request.smooth not in (None, "auto", "off"):
        try:
            alpha = float(request.smooth)
        except ValueError:
            alpha = -1.0
        if not 0.0 <= alpha <= 1.0:
            raise UsageError(f"--smoothquant {request.smooth}: auto, off or alpha in [0, 1]")
    unknown = [n for n in request.exclude if n not in names]
    if unknown:
        raise UsageError(f"--exclude {unknown[0]!r}: no node of that name in the model")


@dataclasses.dataclass
class _Choice:
    """The chosen u8s8 remedy, why, and the candidates that were built and measured."""

    remedy: str
    reason: str
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    built: dict[str, tuple[ir.Model, dict[str, dict]]] = dataclasses.field(default_factory=dict)

    def record(self) -> RemedyChoice:
        return RemedyChoice(self.remedy, self.reason, dict(self.scores))


def _choose_remedy(
    request: _Request, build: Callable[[str], ir.Model], reference: Reference, feeds: list
) -> _Choice:
    """The u8s8 saturation remedy: fixed by the target or flag, else best measured SQNR."""
    if request.target == "tensorrt":
        return _Choice("none", "int8 symmetric activations (s8s8): no u8s8 pair saturation")
    if request.u8s8 != "auto":
        return _Choice(request.u8s8, "chosen with --u8s8")
    if not needs_u8s8_remedy():
        return _Choice("none", "CPU has VNNI/AMX (int32 accumulation): no saturation")
    choice = _Choice("none", "")
    for remedy in ("none", "coarsen", "reduce-range"):
        model = build(remedy)
        metrics = compare_outputs(reference, model, feeds[:_CHOICE_FEEDS])
        choice.built[remedy] = (model, metrics)
        choice.scores[remedy] = min(float(m["sqnr_db"] or 0.0) for m in metrics.values())
    choice.remedy = max(choice.scores, key=lambda r: (choice.scores[r], r == "none"))
    choice.reason = (
        "AVX2 without VNNI: u8*s8 pair sums can saturate int16; best measured output SQNR of "
        + ", ".join(f"{r} {s:.1f} dB" for r, s in choice.scores.items())
    )
    return choice


def _chosen_model(
    choice: _Choice, build: Callable[[str], ir.Model], reference: Reference, feeds: list
) -> tuple[ir.Model, dict[str, dict]]:
    """The model of the chosen remedy, measured on all feeds (reusing the choice's run)."""
    if choice.remedy in choice.built:
        model, metrics = choice.built[choice.remedy]
        if len(feeds) <= _CHOICE_FEEDS:
            return model, metrics
    else:
        model = build(choice.remedy)
    return model, compare_outputs(reference, model, feeds)


def _smooth_alpha(smooth: float | str | None, model: ir.Model) -> tuple[float | None, str]:
    """SmoothQuant strength: ``auto`` turns it on (alpha 0.5) when MatMuls with constant
    weights carry at least half of the Conv/Gemm/MatMul MACs (transformers)."""
    if smooth is None or smooth == "off":
        return None, "off"
    if smooth != "auto":
        return float(smooth), "chosen with --smoothquant"
    costs = [c for c in count_costs(model).nodes if c.op_type in PRIMARY_OPS]
    total = sum(c.macs or 0 for c in costs)
    matmul = sum(c.macs or 0 for c in costs if c.op_type == "MatMul" and c.params)
    if total and matmul >= 0.5 * total:
        return 0.5, f"auto: MatMuls with weights carry {100 * matmul / total:.0f} % of the MACs"
    return None, "auto: not a MatMul-heavy model"


def _min_sqnr(metrics: Mapping[str, Mapping[str, float | None]]) -> float:
    return min(float(m["sqnr_db"] or 0.0) for m in metrics.values())


def _holdout(feeds: list, reference: Reference, mode: str) -> tuple[list, list, Reference]:
    """``auto``: split the calibration feeds into a fitting part and a held-out quarter (none
    when fewer than 8 feeds: the fit is then judged on the data it was fitted on); any other
    mode fits and judges on all of them."""
    held = len(feeds) // 4 if mode == "auto" and len(feeds) >= _MIN_HOLDOUT_FEEDS else 0
    if not held:
        return feeds, feeds, reference
    cut = len(feeds) - held
    return feeds[:cut], feeds[cut:], {k: v[cut:] for k, v in reference.items()}


def _bias_correction(
    request: _Request,
    model: ir.Model,
    built: tuple[ir.Model, dict[str, dict]],
    *,
    nodes: Sequence[str],
    feeds: list,
    reference: Reference,
) -> tuple[ir.Model, dict[str, dict], BiasCorrectionReport]:
    """Bias correction (:mod:`onnxprune.quant.bias`): ``on`` fits it on all calibration
    feeds and keeps it; ``auto`` fits it on three quarters of them, once per shrinkage
    strength in :data:`_BIAS_EVIDENCE` (how many feeds count as independent evidence for an
    offset), takes the strength whose worst output SQNR on the held-out quarter is best and
    keeps it only when that beats no correction (it fits one offset per channel: judged on
    the fitting data it would always look better); ``off`` skips it.

    Shrinking as if from 4 feeds on the zoo's MobileNetV2 (512 calibration photos, eval
    split of other photo sources never fitted on): eval SQNR 16.5 dB with every feed
    counted, 16.7 with 128, 16.9 with 32, 18.3 with 4, 18.1 with 2; the held-out quarter
    ranked them the same way (16.2, 16.3, 16.6, 17.9, 17.6)."""
    quantized, metrics = built
    report = BiasCorrectionReport(request.bias_correction)
    if request.bias_correction == "off":
        report.reason = "off"
        return quantized, metrics, report
    fit, check, check_reference = _holdout(feeds, reference, request.bias_correction)
    report.fit_feeds, report.judged_on_feeds = len(fit), len(check)
    strengths = _BIAS_EVIDENCE if request.bias_correction == "auto" else (None,)
    # one pass for all strengths: the float model's layers run once for every copy
    copies = [copy_model(quantized) for _ in strengths]
    records = correct_bias_variants(model, copies, nodes, fit, strengths)
    tried: dict[int | None, tuple[ir.Model, BiasCorrection, float]] = {}
    for evidence, corrected, done in zip(strengths, copies, records, strict=True):
        score = _min_sqnr(compare_outputs(check_reference, corrected, check))
        tried[evidence] = (corrected, done, score)
        if not done.changes:
            break  # no layer to correct: no strength changes anything
    best = max(tried, key=lambda k: tried[k][2])
    corrected, report.correction, _ = tried[best]
    report.evidence = best
    if len(tried) > 1:
        report.candidates_sqnr_db = {"all" if k is None else str(k): v[2] for k, v in tried.items()}
    if not report.correction.changes:
        report.reason = "no layer to correct"
        return quantized, metrics, report
    kept = _keep_rule(
        report,
        "on",
        (quantized, metrics),
        corrected,
        check=(check, check_reference),
        feeds=feeds,
        reference=reference,
    )
    if report.applied and best is not None:
        report.reason = f"{report.reason}; offsets shrunk as if from {best} independent feeds"
    return kept


#: Shrinkage strengths ``auto`` bias correction compares (feeds counted as independent
#: evidence for an offset; None: every feed), strongest first.
_BIAS_EVIDENCE: tuple[int | None, ...] = (4, 16, None)

_Judged = TypeVar("_Judged", BiasCorrectionReport, RefineReport, RoundingReport)


def _keep_rule(
    report: _Judged,
    forced: str,
    built: tuple[ir.Model, dict[str, dict]],
    candidate: ir.Model,
    *,
    check: tuple[list, Reference],
    feeds: list,
    reference: Reference,
) -> tuple[ir.Model, dict[str, dict], _Judged]:
    """The keep rule of bias correction and learned rounding: ``candidate`` (a correction of
    the quantized model in ``built``) is kept in mode ``forced``, else only when its worst
    output SQNR on the judging feeds ``check`` beats the uncorrected one's (``built`` already
    holds that when they are all the feeds). Records both SQNRs and the reason."""
    quantized, metrics = built
    judged, judged_reference = check
    if judged is feeds:
        before = _min_sqnr(metrics)
    else:
        before = _min_sqnr(compare_outputs(judged_reference, quantized, judged))
    after = _min_sqnr(compare_outputs(judged_reference, candidate, judged))
    report.sqnr_db_without, report.sqnr_db_with = before, after
    if report.mode == forced or after > before:
        report.applied = True
        report.reason = forced if report.mode == forced else "auto: held-out SQNR improved"
        return candidate, compare_outputs(reference, candidate, feeds), report
    report.reason = "auto: no held-out SQNR gain"
    return quantized, metrics, report


def _rounding(
    request: _Request,
    quantizer: StaticQuantizer,
    source: ir.Model,
    remedy: str,
    built: tuple[ir.Model, dict[str, dict]],
    *,
    feeds: list,
    reference: Reference,
) -> tuple[ir.Model, dict[str, dict], RoundingReport]:
    """Error-compensated rounding (:mod:`onnxprune.quant.gptq`) with bias correction's keep
    rule. ``built`` has nearest rounding: the candidates (range methods, equalization) are
    compared with it, and the input moments of ``source`` (the chosen candidate's float
    model; on three quarters of the feeds in ``auto``) are collected here, once, for the
    winner only. ``auto`` keeps the compensated model only when the worst output SQNR on
    the held-out quarter improves; ``gptq`` keeps it; ``nearest`` collects nothing. When
    nearest rounding is kept, the quantizer forgets the moments, so later builds
    (``--budget``) round the same way. The ``rounding`` phase's seconds include the
    moments."""
    report = RoundingReport(request.rounding)
    if request.rounding == "nearest":
        report.reason = "nearest"
        return built[0], built[1], report
    fit, check, check_reference = _holdout(feeds, reference, request.rounding)
    moments = collect_moments(source, quantizer.full_plan.weights, fit)
    report.layers = len(moments.moments)
    report.skipped = [Skip(name, why) for name, why in sorted(moments.skipped.items())]
    if not moments.moments:  # every weight was rounded to nearest already
        report.reason = "no layer covered"
        return built[0], built[1], report
    report.fit_feeds, report.judged_on_feeds = len(fit), len(check)
    quantizer.moments = moments
    compensated = quantizer.build(request.exclude, remedy)[0]
    quantizer.moments = None
    kept, metrics, report = _keep_rule(
        report,
        "gptq",
        built,
        compensated,
        check=(check, check_reference),
        feeds=feeds,
        reference=reference,
    )
    if report.applied:
        quantizer.moments = moments
    return kept, metrics, report


def _refine(
    request: _Request,
    model: ir.Model,
    built: tuple[ir.Model, dict[str, dict]],
    *,
    nodes: Sequence[str],
    feeds: list,
    reference: Reference,
) -> tuple[ir.Model, dict[str, dict], RefineReport]:
    """Learned rounding (:mod:`onnxprune.quant.refine`) with bias correction's keep rule:
    ``adaround`` fits on all calibration feeds and keeps it; ``auto`` fits on three
    quarters and keeps it only when the worst output SQNR on the other quarter improves,
    and is skipped, with a note, without torch; ``off`` skips it."""
    quantized, metrics = built
    report = RefineReport(request.refine)
    if request.refine == "off":
        report.reason = "off"
        return quantized, metrics, report
    if importlib.util.find_spec("torch") is None:
        report.reason = "auto: skipped, torch not installed (pip install onnxprune[recover])"
        return quantized, metrics, report
    from onnxprune.quant.refine import RefineOptions, refine_weights

    fit, check, check_reference = _holdout(feeds, reference, request.refine)
    report.fit_feeds, report.judged_on_feeds = len(fit), len(check)
    refined = copy_model(quantized)
    options = request.refine_options or RefineOptions()
    report.layers, report.skipped = refine_weights(model, refined, nodes, fit, options)
    report.refined = sum(x.applied for x in report.layers)
    if not report.refined:
        report.reason = "no layer refined"
        return quantized, metrics, report
    return _keep_rule(
        report,
        "adaround",
        (quantized, metrics),
        refined,
        check=(check, check_reference),
        feeds=feeds,
        reference=reference,
    )


@dataclasses.dataclass
class _Candidate:
    """A calibrated quantizer of one float source and its chosen, measured quantized model."""

    source: ir.Model
    quantizer: StaticQuantizer
    choice: _Choice
    model: ir.Model
    metrics: dict[str, dict]
    summary: dict
    method: MethodChoice | None = None


def _candidate(
    request: _Request,
    source: ir.Model,
    data: tuple[list, Reference],
    details: QuantizeDetails,
    *,
    label: str = "",
    remedy: _Choice | None = None,
) -> _Candidate:
    """Calibrate ``source``, choose the u8s8 remedy (or take ``remedy``) and measure the
    chosen model."""
    feeds, reference = data
    options = QuantOptions(
        method=request.method,
        per_channel=request.per_channel,
        symmetric_activations=request.target == "tensorrt",
    )
    quantizer = StaticQuantizer(source, options)
    with details.seconds.timed(f"calibrate{label}"):
        hit = quantizer.calibrate(feeds, request.cache)
    if details.calibration_cache is None:
        details.calibration_cache = {}
    details.calibration_cache[f"calibrate{label}"] = (
        "off" if request.cache is None else ("hit" if hit else "miss")
    )
    summaries: dict[str, dict] = {}

    def build(remedy: str) -> ir.Model:
        built, summaries[remedy] = quantizer.build(request.exclude, remedy)
        return built

    with details.seconds.timed(f"build_and_choose_remedy{label}"):
        choice = remedy or _choose_remedy(request, build, reference, feeds)
        quantized, metrics = _chosen_model(choice, build, reference, feeds)
    method = None
    if request.method == "auto":
        with details.seconds.timed(f"choose_method{label}"):
            quantized, metrics, method = _choose_method(
                quantizer, lambda: build(choice.remedy), (quantized, metrics), data
            )
    return _Candidate(
        source, quantizer, choice, quantized, metrics, summaries[choice.remedy], method
    )


def _choose_method(
    quantizer: StaticQuantizer,
    build: Callable[[], ir.Model],
    start: tuple[ir.Model, dict[str, dict]],
    data: tuple[list, Reference],
) -> tuple[ir.Model, dict[str, dict], MethodChoice]:
    """``--method auto``: the range method whose model has the best worst-output SQNR.

    One calibration pass collected histograms, so every method's ranges come from the same
    statistics; each method's model is built (with the chosen u8s8 remedy) and run against
    fp32 on the calibration feeds. Clipping is model-specific (MSE can help a recognizer
    and break a detector), hence measured, not assumed. Ties go to the earlier method in
    ``minmax, percentile, entropy, mse, mean-minmax``.
    """
    feeds, reference = data
    results = {quantizer.method: start}
    for method in METHODS:
        if method not in results:
            quantizer.use_method(method)
            model = build()
            results[method] = (model, compare_outputs(reference, model, feeds))
    scores = {m: _min_sqnr(results[m][1]) for m in METHODS}
    best = max(METHODS, key=lambda m: (scores[m], -METHODS.index(m)))
    quantizer.use_method(best)
    model, metrics = results[best]
    return model, metrics, MethodChoice(best, scores)


def _has_depthwise_pair(report: Mapping[str, Any], model: ir.Model) -> bool:
    groups = {n.name: n.attributes.get_int("group", 1) for n in model.graph}
    return any(
        groups.get(p["producer"], 1) > 1 or groups.get(p["consumer"], 1) > 1
        for p in report["pairs"]
    )


def _equalized(
    request: _Request,
    source: ir.Model,
    plain: _Candidate | None,
    data: tuple[list, Reference],
    details: QuantizeDetails,
) -> _Candidate | None:
    """The cross-layer-equalized candidate (:mod:`onnxprune.quant.equalize`), or None.

    ``auto`` tries it on models with grouped/depthwise convolution pairs and keeps it only
    when the worst output SQNR improves by at least 0.1 dB (it changes the float function
    where a ReLU6 bound had to be relaxed, so a gain within noise is not worth it); ``on``
    keeps it whenever a pair was found.
    """
    entry = details.equalize = EqualizeReport(request.equalize)
    if request.equalize == "off":
        entry.reason = "off"
        return None
    copy = copy_model(source)
    report = cross_layer_equalize(copy)
    entry.pairs = len(report["pairs"])
    entry.sweeps = report["iterations"]
    entry.relaxed_clips = report["relaxed_clips"]
    entry.skipped = report["skipped"]
    if not report["pairs"]:
        entry.reason = "no Conv -> activation -> Conv pair to equalize"
        return None
    if request.equalize == "auto" and not _has_depthwise_pair(report, copy):
        entry.reason = "auto: no grouped or depthwise convolution pair"
        return None
    # The u8s8 remedy measured best on the plain model is reused (one build, not three).
    remedy = None if plain is None else _Choice(plain.choice.remedy, plain.choice.reason)
    candidate = _candidate(request, copy, data, details, label="_equalized", remedy=remedy)
    details.method_equalized = candidate.method
    with_eq = entry.sqnr_db_with = _min_sqnr(candidate.metrics)
    if plain is not None:
        without = entry.sqnr_db_without = _min_sqnr(plain.metrics)
        if with_eq < without + _EQUALIZE_MIN_GAIN_DB:
            entry.reason = f"auto: SQNR gain below {_EQUALIZE_MIN_GAIN_DB} dB"
            return None
    entry.applied = True
    entry.reason = "on" if plain is None else "auto: output SQNR improved"
    return candidate


def _smoothed(
    request: _Request, model: ir.Model, data: tuple[list, Reference], details: QuantizeDetails
) -> tuple[ir.Model, _Candidate | None]:
    """``model`` or a SmoothQuant-ed copy of it (:mod:`onnxprune.quant.smooth`), and, when
    several strengths were compared, the chosen one's candidate (else None: not built yet).

    ``auto`` on a MatMul-heavy model builds a candidate for each alpha in
    :data:`_SMOOTH_ALPHAS` and keeps the one with the best worst output SQNR on the
    calibration feeds: the strength that suits a model is not known in advance. On the zoo's
    all-MiniLM-L6-v2 (evaluation sentences never fitted on): alpha 0.5 18.1 dB / cosine
    0.9922, 0.75 23.7 dB / 0.9979, 0.95 19.2 dB / 0.9939, off 17.4 dB / 0.9910; the
    calibration feeds ranked them 18.1, 23.5, 23.3 (and 17.4 off)."""
    feeds = data[0]
    alpha, why = _smooth_alpha(request.smooth, model)
    report = details.smoothquant = SmoothQuantReport(alpha, why)
    if alpha is None:
        return model, None
    if request.smooth != "auto":
        source, done = _smooth_copy(model, feeds, alpha, details, "smoothquant")
        _record_smoothing(report, done)
        return source, None
    scores: dict[float, float] = {}
    # (alpha, source, smoothing report, candidate): only the best so far is kept (memory)
    best: tuple[float, ir.Model, dict, _Candidate] | None = None
    for each in _SMOOTH_ALPHAS:
        label = f"smoothquant_{each}"
        source, done = _smooth_copy(model, feeds, each, details, label)
        candidate = _candidate(request, source, data, details, label=f"_{label}")
        scores[each] = _min_sqnr(candidate.metrics)
        if best is None or scores[each] > scores[best[0]]:
            best = (each, source, done, candidate)
    assert best is not None
    chosen, source, done, candidate = best
    _record_smoothing(report, done)
    report.alpha = chosen
    report.reason = f"{why}; alpha {chosen} measured best of {len(scores)}"
    report.candidates_sqnr_db = {str(k): v for k, v in scores.items()}
    return source, candidate


def _smooth_copy(
    model: ir.Model, feeds: list, alpha: float, details: QuantizeDetails, phase: str
) -> tuple[ir.Model, dict]:
    """A copy of ``model`` smoothed with ``alpha`` (timed as ``phase``), and the report of
    :func:`~onnxprune.quant.smooth.smooth_matmuls`."""
    source = copy_model(model)
    with details.seconds.timed(phase):
        done = smooth_matmuls(source, feeds, alpha)
    return source, done


def _record_smoothing(report: SmoothQuantReport, done: dict) -> None:
    report.smoothed = _names(done.get("smoothed"))
    if "folded_into_layernorm" in done:
        report.folded_into_layernorm = _names(done["folded_into_layernorm"])


#: SmoothQuant strengths ``--smoothquant auto`` compares on MatMul-heavy models.
_SMOOTH_ALPHAS = (0.5, 0.75, 0.95)


def _names(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _static(
    request: _Request,
    model: ir.Model,
    feeds: list,
    reference: Reference,
    details: QuantizeDetails,
) -> tuple[ir.Model, dict[str, dict]]:
    data = (feeds, reference)
    source, plain = _smoothed(request, model, data, details)
    if request.equalize == "on":
        plain = None
    elif plain is None:
        plain = _candidate(request, source, data, details)
    details.method = None if plain is None else plain.method
    best = _equalized(request, source, plain, data, details) or plain
    if best is None:  # equalize "on" found nothing to equalize
        best = _candidate(request, source, data, details)
        details.method = best.method
    # The float model the quantized one was built from: per-layer references (bias
    # correction, harm ranking) come from it (equalization rescales channels).
    source, quantizer, choice = best.source, best.quantizer, best.choice
    quantized, metrics = best.model, best.metrics
    details.u8s8 = choice.record()
    details.range_method = quantizer.method
    details.plan = best.summary
    nodes = quantizer.plan(request.exclude).nodes
    seconds = details.seconds
    with seconds.timed("rounding"):
        quantized, metrics, details.rounding = _rounding(
            request,
            quantizer,
            source,
            choice.remedy,
            (quantized, metrics),
            feeds=feeds,
            reference=reference,
        )
    with seconds.timed("bias_correction"):
        quantized, metrics, details.bias_correction = _bias_correction(
            request, source, (quantized, metrics), nodes=nodes, feeds=feeds, reference=reference
        )
    correct = details.bias_correction.applied
    evidence = details.bias_correction.evidence
    with seconds.timed("refine"):
        quantized, metrics, refined = _refine(
            request, source, (quantized, metrics), nodes=nodes, feeds=feeds, reference=reference
        )
    details.refine = refined
    # Which layers cost the most SQNR (their own quantization, not inherited error).
    with seconds.timed("rank_layers"):
        ranking = rank_harm(source, quantized, nodes, feeds[:_RANK_FEEDS])
    details.worst_layers_harm_db = dict(ranking[:10])
    if request.budget is not None and request.budget.violations(metrics):
        # Keep float in the order of end-to-end sensitivity (each layer quantized alone).
        with seconds.timed("sensitivity"):
            sensitivity = rank_sensitivity(
                lambda kept: quantizer.build((*request.exclude, *kept), choice.remedy)[0],
                nodes,
                {k: v[:_SENSITIVITY_FEEDS] for k, v in reference.items()},
                feeds[:_SENSITIVITY_FEEDS],
            )
        details.sensitivity = sensitivity
        order = [str(r["node"]) for r in sensitivity]

        def build_kept(kept: Sequence[str]) -> tuple[ir.Model, dict, dict]:
            skip = (*request.exclude, *kept)
            candidate, plan_summary = quantizer.build(skip, choice.remedy)
            if correct:
                nodes = quantizer.plan(skip).nodes
                correct_biases(source, candidate, nodes, feeds, evidence=evidence)
            return candidate, plan_summary, compare_outputs(reference, candidate, feeds)

        budget = request.budget
        with seconds.timed("budget_search"):
            found = _search_methods(
                request, quantizer, lambda: search_budget(build_kept, order, budget)
            )
        quantized, metrics = found.model, found.metrics
        details.plan = found.summary
        details.range_method = quantizer.method
        details.budget = BudgetSearchReport(found.kept_float, found.trials, quantizer.method)
        if refined.applied:
            # The search rebuilt the model with plain rounding: refine the found one.
            with seconds.timed("refine_after_budget"):
                quantized, metrics, details.refine = _refine(
                    request,
                    source,
                    (quantized, metrics),
                    nodes=quantizer.plan((*request.exclude, *found.kept_float)).nodes,
                    feeds=feeds,
                    reference=reference,
                )
    return quantized, metrics


def _search_methods(
    request: _Request, quantizer: StaticQuantizer, search: Callable[[], BudgetSearch]
) -> BudgetSearch:
    """``search`` with the quantizer's range method; under ``--method auto``, when the budget
    cannot be met with it, with each other method in turn (the choice was made with every
    layer quantized: a method that clips a tensor the kept-float layers do not fix can win
    there and still make the budget unreachable). Raises the first method's error, naming
    the methods tried, when none meets it."""
    methods = [quantizer.method]
    if request.method == "auto":
        methods += [m for m in METHODS if m != quantizer.method]
    first: BudgetError | None = None
    for method in methods:
        quantizer.use_method(method)
        try:
            return search()
        except BudgetError as exc:
            first = first or exc
            logger.info("budget: not met with range method %s", method)
    assert first is not None
    if len(methods) == 1:
        raise first
    raise BudgetError(f"{first} (range methods tried: {', '.join(methods)})") from first


def _dynamic(
    request: _Request,
    model: ir.Model,
    feeds: list,
    reference: Reference,
    details: QuantizeDetails,
) -> tuple[ir.Model, dict[str, dict]]:
    summaries: dict[str, dict] = {}

    def build(remedy: str) -> ir.Model:
        built, summaries[remedy] = dynamic.build(model, request.per_channel, remedy)
        return built

    choice = _choose_remedy(request, build, reference, feeds)
    details.u8s8 = choice.record()
    quantized, metrics = _chosen_model(choice, build, reference, feeds)
    summary = summaries[choice.remedy]
    details.dynamic = summary
    details.int8_mac_share = converted_mac_share(model, summary["quantized_nodes"])
    return quantized, metrics


def _convert(
    request: _Request, model: ir.Model, feeds: list, details: QuantizeDetails
) -> tuple[ir.Model, dict[str, dict]]:
    """The quantized (or fp16) model and its output metrics against ``model``."""
    with details.seconds.timed("reference_run"):
        reference = reference_outputs(model, feeds)
    if request.dtype == "fp16":
        converted, details.fp16 = fp16.convert(model, feeds)
        return converted, compare_outputs(reference, converted, feeds)
    if request.mode == "dynamic":
        return _dynamic(request, model, feeds, reference, details)
    return _static(request, model, feeds, reference, details)


def _check_result(request: _Request, metrics: dict[str, dict]) -> None:
    """Raise BudgetError for a collapsed output or a violated budget."""
    collapsed = is_collapsed(metrics)
    if collapsed:
        raise BudgetError(
            "quantized model collapsed: " + "; ".join(collapsed) + "; nothing written"
        )
    violations = request.budget.violations(metrics) if request.budget is not None else []
    if violations:
        raise BudgetError(
            "budget not met: " + "; ".join(v.message() for v in violations) + "; nothing written"
        )


def _check_held_out(request: _Request, report: FidelityReport) -> None:
    """The budget must hold on held-out data too, not only on the data it was fitted on."""
    if request.budget is None:
        return
    violations = request.budget.violations(report.held_out.outputs)
    if violations:
        raise BudgetError(
            f"budget met on the calibration samples but not on {report.held_out.data}: "
            + "; ".join(v.message() for v in violations)
            + "; nothing written"
        )


def _cache(setting: bool | str | os.PathLike[str]) -> CalibrationCache | None:
    if setting is False:
        return None
    return CalibrationCache(None if setting is True else setting)


def quantize_file(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    calib: str | os.PathLike[str],
    method: str = "auto",
    per_channel: bool = True,
    mode: str = "static",
    target: str = "cpu",
    dtype: str = "int8",
    exclude: Sequence[str] = (),
    budget: str | None = None,
    u8s8: str = "auto",
    max_samples: int | None = None,
    smooth: float | str | None = "auto",
    bias_correction: str = "auto",
    equalize: str = "auto",
    eval_data: str | os.PathLike[str] | None = None,
    calib_cache: bool | str | os.PathLike[str] = True,
    refine: str = "off",
    refine_options: Any = None,
    rounding: str = "auto",
    speed_check: float = 0.0,
) -> QuantizeResult:
    """Quantize ``model_path`` into ``output_path`` (the input file is never modified).

    Args:
        model_path: Float ONNX model.
        output_path: Where the quantized model is written (atomically).
        calib: Calibration ``.npz`` file or folder of ``.npz`` files (shapes may vary).
        method: Range method: minmax, percentile, entropy, mse, mean-minmax, or auto (the
            default: each one's model measured against fp32 on the calibration data, the
            best kept).
        per_channel: Per-output-channel weight scales.
        mode: ``static`` (QDQ, calibrated activations) or ``dynamic`` (MatMul/Gemm weights
            int8, activations quantized at run time).
        target: ``cpu`` (uint8 asymmetric activations) or ``tensorrt`` (int8 symmetric).
        dtype: ``int8`` or ``fp16``.
        exclude: Node names to keep in float.
        budget: Tolerance expression the outputs must meet (e.g. ``"cosine>=0.999"``);
            layers are kept in float, most harmful first, until it holds.
        u8s8: Saturation remedy on AVX2 without VNNI: auto, none, coarsen, reduce-range.
        max_samples: Fit on at most this many calibration samples.
        eval_data: Held-out data the report's fidelity (and the budget) is measured on;
            default: the last quarter of ``calib``, which is then not fitted on.
        smooth: SmoothQuant for static mode: alpha in [0, 1], ``"auto"`` (0.5 for
            MatMul-heavy models) or None/``"off"``.
        bias_correction: Static mode: subtract each layer's mean quantization error per
            output channel from its bias: ``on``, ``off`` or ``auto`` (fitted on three
            quarters of the calibration feeds, kept only when the worst output SQNR on the
            other quarter improves).
        equalize: Static mode: cross-layer equalization of Conv -> activation -> Conv
            pairs before calibration: ``on``, ``off`` or ``auto`` (tried on models with
            grouped/depthwise convolution pairs, kept only when the worst output SQNR on the
            calibration data improves).
        calib_cache: Reuse calibration statistics of the same model and data
            (:mod:`onnxprune.quant.calib_cache`): True for the user cache folder, a folder
            path, or False to calibrate every time.
        refine: Static int8: learned rounding of the int8 weights with the scales fixed
            (AdaRound, :mod:`onnxprune.quant.refine`; needs torch): ``adaround`` (fitted on
            all calibration feeds, kept), ``auto`` (fitted on three quarters, kept only
            when the worst output SQNR on the other quarter improves; skipped with a note
            without torch) or ``off`` (the default: it takes minutes on a mobile CNN).
        refine_options: :class:`onnxprune.quant.refine.RefineOptions` (iterations, time
            budget, seed, ...); None for the defaults.
        rounding: Static int8 weight rounding: ``nearest``, ``gptq`` (each layer's
            rounding error compensated on its calibration inputs, :mod:`onnxprune.quant.gptq`)
            or ``auto`` (gptq fitted on three quarters of the calibration feeds, kept only
            when the worst output SQNR on the other quarter improves).
        speed_check: Static or dynamic int8 for the CPU: seconds the written model is timed
            against the input on this machine (:mod:`onnxprune.quant.speed`); 0 for none.
            The written model does not depend on it, only the report.

    Raises:
        UsageError: bad options, an already quantized model (exit 2).
        CalibrationError: unusable calibration data, an all-NaN tensor (exit 2).
        BudgetError: collapsed output or unreachable budget; nothing written (exit 1).
    """
    request = _Request(
        method,
        per_channel,
        mode,
        target,
        dtype,
        tuple(exclude),
        parse_tolerance(budget) if budget else None,
        u8s8,
        smooth,
        bias_correction,
        equalize,
        _cache(calib_cache),
        refine,
        refine_options,
        rounding,
    )
    if not (speed_check >= 0 and math.isfinite(speed_check)):
        raise UsageError(f"--speed-check {speed_check}: seconds must be finite and >= 0")
    model = load(model_path)
    inputs = source_files(model)  # the rebuilt model no longer records them
    refuse_unrewritable(model, str(model_path))
    refuse_quantized(model)
    refuse_non_float32(model)
    input_bytes = file_bytes(Path(model_path))
    passes = pipeline.canonicalize(model)
    name_nodes(model)
    _validate(request, model)
    split = split_data(model, calib, eval_data)
    data = split.fit
    assert data is not None
    count = len(data) if max_samples is None else min(max_samples, len(data))
    feeds = list(data.feeds(range(count)))
    model, opset = ensure_opset(model, feeds[:2])
    if not opset["per_channel"] and request.per_channel:
        request = dataclasses.replace(request, per_channel=False)
    details = QuantizeDetails(passes.summary(), cpu_isa(), OpsetChange.from_record(opset))
    quantized, metrics = _convert(request, model, feeds, details)
    _check_result(request, metrics)
    if dtype == "int8" and mode == "static":
        details.int8_mac_share = int8_mac_share(quantized)
    fidelity: list[FidelityReport] = []

    def check_held_out(path: Path) -> None:
        with details.seconds.timed("held-out check"):
            fidelity.append(measure(model_path, path, split))
        _check_held_out(request, fidelity[0])

    with details.seconds.timed("save"):
        dest = save(quantized, output_path, before_commit=check_held_out, protect=inputs)
    speed = None
    if speed_check > 0 and dtype == "int8" and target == "cpu":
        with details.seconds.timed("speed check"):
            try:
                speed = check_speed(model_path, dest, calib=calib, seconds=speed_check)
            except Exception as error:
                logger.warning("speed check failed, the model is written: %s", error)
    return QuantizeResult(
        input=str(model_path),
        output=str(dest),
        mode="fp16" if dtype == "fp16" else mode,
        method=(details.range_method or method) if dtype == "int8" and mode == "static" else None,
        target=target,
        samples=count,
        metrics=metrics,
        fidelity=fidelity[0],
        worst=worst(fidelity[0].held_out.outputs),
        details=details,
        input_bytes=input_bytes,
        output_bytes=file_bytes(dest),
        speed=speed,
    )
