"""``QuantizeConfig``: the options of ``onnxprune quantize``, declared once.

The CLI flags and the recipe step keys are generated from these fields
(:mod:`onnxprune.registry.options`); :func:`quantize_config_file` runs
:func:`onnxprune.quant.api.quantize_file` with them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Literal

from onnxprune.errors import UsageError
from onnxprune.registry.options import option

__all__ = ["QuantizeConfig", "quantize_config_file"]

Method = Literal["auto", "minmax", "percentile", "entropy", "mse", "mean-minmax"]
Mode = Literal["static", "dynamic"]
Target = Literal["cpu", "tensorrt"]
Dtype = Literal["int8", "fp16"]
Remedy = Literal["auto", "none", "coarsen", "reduce-range"]
Switch = Literal["auto", "on", "off"]
Refine = Literal["off", "auto", "adaround"]
Rounding = Literal["auto", "nearest", "gptq"]


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize: range method, granularity, placement target, what stays float,
    and the corrections tried (each kept only where the measured output error improves)."""

    method: Method = option(
        "auto",
        help="range method; auto: each one measured against fp32 on the calibration data, "
        "the best kept (on the zoo's MobileNetV2 it raised held-out top-1 agreement from "
        "0.71 with minmax to 0.83)",
    )
    per_channel: bool = option(
        True,
        help="one scale per output channel of each weight",
        aliases=(
            (
                "--per-tensor",
                {"action": "store_false", "help": "one scale per weight tensor"},
            ),
        ),
    )
    mode: Mode = option("static", help="static QDQ (calibrated) or dynamic int8")
    target: Target = option(
        "cpu", help="cpu (uint8 activations) or tensorrt (int8 symmetric activations)"
    )
    dtype: Dtype = option("int8", help="int8, or fp16 (see also `onnxprune fp16`)")
    exclude: tuple[str, ...] = option((), help="nodes kept in float", metavar="NODE")
    budget: str | None = option(
        None, help="e.g. cosine>=0.999: layers kept float, most harmful first", metavar="EXPR"
    )
    u8s8: Remedy = option("auto", help="AVX2 (no VNNI) u8s8 saturation remedy")
    smoothquant: str = option(
        "auto",
        help="SmoothQuant before static quantization: auto (on MatMul-heavy models, alpha "
        "0.5, 0.75 or 0.95, the best measured on the calibration data), off, or alpha in "
        "[0, 1]",
        metavar="ALPHA",
    )
    bias_correction: Switch = option(
        "auto",
        help="subtract each layer's mean int8 error per channel from its bias (static); auto "
        "fits it on 3/4 of the calibration samples, keeps it if the other 1/4 improves",
    )
    equalize: Switch = option(
        "auto",
        help="cross-layer equalization of Conv -> activation -> Conv pairs (static); auto "
        "tries it on depthwise/grouped pairs, keeps it if the output SQNR improves",
    )
    rounding: Rounding = option(
        "auto",
        help="int8 weight rounding (static): nearest, or gptq (each layer's rounding error "
        "compensated on its calibration inputs, closed form); auto fits gptq on 3/4 of the "
        "calibration samples, keeps it if the other 1/4 improves",
    )
    refine: Refine = option(
        "off",
        help="learned rounding of the int8 weights, scales fixed (AdaRound, static, needs "
        "torch); auto keeps it only if held-out output SQNR improves",
    )
    refine_iterations: int | None = option(
        None, help="refinement steps per layer (200)", metavar="N"
    )
    refine_budget: float | None = option(
        None, help="seconds for the refinement (600); later layers keep plain rounding", metavar="S"
    )
    max_samples: int | None = option(None, help="use at most N calibration samples", metavar="N")
    calib_cache: bool = option(
        True,
        help="reuse calibration statistics of the same model and data (from "
        "$ONNXPRUNE_CACHE_DIR or ~/.cache/onnxprune/calibration)",
    )
    speed_check: float = option(
        1.0,
        help="seconds the written int8 model is timed against the input on this machine "
        "(onnxruntime CPU, interleaved; the report warns when it is slower); 0: off",
        metavar="S",
    )


def _refine_options(config: QuantizeConfig) -> object:
    """RefineOptions from the config, None for the defaults (imports torch only when set)."""
    changes: dict[str, Any] = {}
    if config.refine_iterations is not None:
        if config.refine_iterations < 1:
            raise UsageError("--refine-iterations must be positive")
        changes["iterations"] = config.refine_iterations
    if config.refine_budget is not None:
        if not config.refine_budget > 0:
            raise UsageError("--refine-budget must be positive")
        changes["time_budget"] = config.refine_budget
    if not changes or config.refine == "off" or importlib.util.find_spec("torch") is None:
        return None
    from onnxprune.quant.refine import RefineOptions

    return RefineOptions(**changes)


def quantize_config_file(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    config: QuantizeConfig,
    *,
    calib: str | os.PathLike[str] | None,
    eval_data: str | os.PathLike[str] | None = None,
) -> Any:
    """:func:`~onnxprune.quant.api.quantize_file` with the options of ``config``."""
    from onnxprune.quant.api import quantize_file

    if calib is None:
        raise UsageError("quantize needs --calib (calibration samples)")
    return quantize_file(
        model_path,
        output_path,
        calib=calib,
        eval_data=eval_data,
        method=config.method,
        per_channel=config.per_channel,
        mode=config.mode,
        target=config.target,
        dtype=config.dtype,
        exclude=config.exclude,
        budget=config.budget,
        u8s8=config.u8s8,
        max_samples=config.max_samples,
        smooth=config.smoothquant,
        bias_correction=config.bias_correction,
        equalize=config.equalize,
        calib_cache=config.calib_cache,
        refine=config.refine,
        refine_options=_refine_options(config),
        rounding=config.rounding,
        speed_check=config.speed_check,
    )
