"""``onnxprune quantize``: static int8 QDQ (or dynamic int8, or fp16) quantization."""

from __future__ import annotations

import argparse
import importlib.util
import logging

from onnxprune.commands.common import (
    add_eval_option,
    add_report_option,
    model_run_files,
    write_json,
)
from onnxprune.errors import UsageError
from onnxprune.quant import MODES, TARGETS, quantize_file
from onnxprune.quant.api import EQUALIZE_MODES, REFINE_MODES
from onnxprune.quant.bias import BIAS_MODES
from onnxprune.quant.calibrate import CALIBRATION_METHODS
from onnxprune.quant.vnni import REMEDIES

__all__ = ["register", "run"]

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "quantize",
        help="int8 QDQ quantization (static or dynamic) or float16 conversion",
        description="Quantize a float model with calibration data, check it against the float "
        "model on that data (output SQNR/cosine), and write it atomically. Exit 1, nothing "
        "written, when the output collapses or --budget cannot be met; exit 2 on bad input "
        "(already quantized model, all-NaN tensor, bad option).",
    )
    parser.add_argument("model", help="input float .onnx file (never modified)")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file")
    parser.add_argument("--calib", required=True, help="calibration .npz or folder of .npz")
    # Choices are validated by the API (one list, one message), not by argparse.
    parser.add_argument(
        "--method",
        default="auto",
        help=f"range method: {', '.join(CALIBRATION_METHODS)} (default auto: each measured "
        "against fp32 on the calibration data, the best kept; on the zoo's MobileNetV2 it "
        "raised held-out top-1 agreement from 0.71 with minmax to 0.83)",
    )
    parser.add_argument("--per-tensor", action="store_true", help="one scale per weight tensor")
    parser.add_argument("--mode", default="static", help=f"{' or '.join(MODES)}")
    parser.add_argument("--target", default="cpu", help=f"{' or '.join(TARGETS)}")
    parser.add_argument("--dtype", default="int8", help="int8 or fp16")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE", help="keep float")
    parser.add_argument("--budget", metavar="EXPR", help="e.g. cosine>=0.999 (layers kept float)")
    parser.add_argument(
        "--u8s8", default="auto", help=f"AVX2 saturation remedy: {', '.join(REMEDIES)}"
    )
    parser.add_argument(
        "--smoothquant",
        default="auto",
        metavar="ALPHA",
        help="SmoothQuant before static quantization: auto (0.5 for MatMul-heavy models), "
        "off, or alpha in [0, 1]",
    )
    parser.add_argument(
        "--bias-correction",
        default="auto",
        help="subtract each layer's mean int8 error per channel from its bias (static mode): "
        f"{', '.join(BIAS_MODES)}; auto fits it on 3/4 of the calibration samples and keeps it "
        "only if the output SQNR on the other 1/4 improves",
    )
    parser.add_argument(
        "--equalize",
        default="auto",
        help="cross-layer equalization of Conv -> activation -> Conv pairs (static mode): "
        f"{', '.join(EQUALIZE_MODES)}; auto tries it on depthwise/grouped pairs and keeps it "
        "only if the output SQNR improves",
    )
    parser.add_argument(
        "--refine",
        default="off",
        help="learned rounding of the int8 weights, scales fixed (AdaRound, static mode, needs "
        f"torch: pip install onnxprune[recover]): {', '.join(REFINE_MODES)}; auto fits it on 3/4 "
        "of the calibration samples and keeps it only if the output SQNR on the other 1/4 "
        "improves (skipped without torch); adaround fits on all and keeps it",
    )
    parser.add_argument(
        "--refine-iterations", type=int, default=None, metavar="N", help="steps per layer (200)"
    )
    parser.add_argument(
        "--refine-budget",
        type=float,
        default=None,
        metavar="S",
        help="seconds for the refinement (600); layers after it keep the plain rounding",
    )
    parser.add_argument("--max-samples", type=int, help="use at most N calibration samples")
    parser.add_argument(
        "--no-calib-cache",
        action="store_true",
        help="calibrate every time (default: reuse statistics of the same model and data "
        "from $ONNXPRUNE_CACHE_DIR or ~/.cache/onnxprune/calibration)",
    )
    add_eval_option(parser)
    add_report_option(parser)
    parser.set_defaults(run=run, files=model_run_files)


def _refine_options(args: argparse.Namespace) -> object:
    """RefineOptions from the flags, None for the defaults (imports torch only when set)."""
    changes = {}
    if args.refine_iterations is not None:
        if args.refine_iterations < 1:
            raise UsageError("--refine-iterations must be positive")
        changes["iterations"] = args.refine_iterations
    if args.refine_budget is not None:
        if args.refine_budget <= 0:
            raise UsageError("--refine-budget must be positive")
        changes["time_budget"] = args.refine_budget
    if not changes or args.refine == "off" or importlib.util.find_spec("torch") is None:
        return None
    from onnxprune.quant.refine import RefineOptions

    return RefineOptions(**changes)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    result = quantize_file(
        args.model,
        args.output,
        calib=args.calib,
        eval_data=args.eval_data,
        method=args.method,
        per_channel=not args.per_tensor,
        mode=args.mode,
        target=args.target,
        dtype=args.dtype,
        exclude=args.exclude,
        budget=args.budget,
        u8s8=args.u8s8,
        max_samples=args.max_samples,
        smooth=args.smoothquant,
        bias_correction=args.bias_correction,
        equalize=args.equalize,
        calib_cache=not args.no_calib_cache,
        refine=args.refine,
        refine_options=_refine_options(args),
    )
    print(result.summary())
    if args.report:
        write_json(args.report, result.to_dict())
    return 0
