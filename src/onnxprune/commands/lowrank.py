"""``onnxprune lowrank``: low-rank factorization and folding (see onnxprune.lowrank)."""

from __future__ import annotations

import argparse
import logging

from onnxprune.commands.common import (
    add_dims_option,
    add_eval_option,
    add_report_option,
    model_run_files,
    parse_dims,
    write_json,
)
from onnxprune.lowrank import CONV_MODES, LowRankConfig, lowrank_file

__all__ = ["register", "run"]

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "lowrank",
        help="factorize MatMul/Gemm (and Conv) weights by truncated SVD; fold linear chains",
        description="Replace dense weights by low-rank factors (MatMul/Gemm: two MatMuls; "
        "Conv: spatial, Tucker-2 or depthwise-separable), optionally activation-aware, and/or "
        "fold chains of linear ops. The result is compared with the original (cosine, SQNR "
        "per output) and written atomically; the input is never modified.",
    )
    parser.add_argument("model", help="input .onnx file (never modified)")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--rank", type=int, help="the same rank for every layer")
    rule.add_argument("--energy", type=float, help="keep this share of sum(sigma^2), (0, 1]")
    rule.add_argument("--target-params", type=float, metavar="F", help="params fraction")
    rule.add_argument("--target-macs", type=float, metavar="F", help="MACs fraction")
    rule.add_argument(
        "--max-layer-error", type=float, metavar="B", help="relative per-layer error budget"
    )
    parser.add_argument(
        "--activation-aware", action="store_true", help="whiten by input statistics (--calib)"
    )
    parser.add_argument(
        "--aware-method", choices=("svd-llm", "asvd"), default="svd-llm", help="(svd-llm)"
    )
    parser.add_argument("--calib", help="calibration .npz or folder")
    parser.add_argument("--conv", choices=CONV_MODES, help="also factorize 2-D convolutions")
    parser.add_argument("--fold", action="store_true", help="merge linear chains afterwards")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE", help="keep dense")
    parser.add_argument("--round-to", type=int, default=8, help="rank multiple (8)")
    parser.add_argument("--margin", type=float, default=0.9, help="max factored/dense cost")
    parser.add_argument(
        "--latency-check",
        action="store_true",
        help="also time MatMul/Gemm factorizations; keep layers that are not measured faster",
    )
    parser.add_argument(
        "--no-conv-latency-check",
        action="store_true",
        help="do not time conv decompositions (on by default: a conv is kept unless its "
        "decomposed chain measures at least 5%% faster at the layer's input shape)",
    )
    add_eval_option(parser)
    add_report_option(parser)
    add_dims_option(parser)
    parser.set_defaults(run=run, files=model_run_files)


def config_from_args(args: argparse.Namespace) -> LowRankConfig:
    """The :class:`LowRankConfig` the options describe."""
    rules = (args.rank, args.energy, args.target_params, args.target_macs, args.max_layer_error)
    return LowRankConfig(
        rank=args.rank,
        energy=args.energy,
        target_params=args.target_params,
        target_macs=args.target_macs,
        max_layer_error=args.max_layer_error,
        method=args.aware_method if args.activation_aware else "svd",
        conv=args.conv,
        fold=args.fold,
        factorize=not (args.fold and all(r is None for r in rules)),
        exclude=tuple(args.exclude),
        round_to=args.round_to,
        margin=args.margin,
        latency_check=args.latency_check,
        conv_latency_check=not args.no_conv_latency_check,
        dims=parse_dims(args.dim),
    )


def run(args: argparse.Namespace) -> int:
    result = lowrank_file(
        args.model, args.output, config_from_args(args), calib=args.calib, eval_data=args.eval_data
    )
    print(result.summary())
    if args.report:
        write_json(args.report, result.to_dict())
    return 0
