"""``onnxprune sparsify``: weight sparsity with compact storage (see onnxprune.sparsity)."""

from __future__ import annotations

import argparse
import logging

from onnxprune.commands.common import (
    add_eval_option,
    add_report_option,
    model_run_files,
    write_json,
)
from onnxprune.errors import UsageError
from onnxprune.sparsity import SparsifyConfig, sparsify_file
from onnxprune.sparsity.prune import COMPARES, METHODS, PATTERNS, SCOPES

__all__ = ["register", "run"]

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sparsify",
        help="prune Conv/Gemm/MatMul weights to a sparsity (magnitude, Wanda, OBS update, 2:4)",
        description="Zero the least important weights of Conv/ConvTranspose/Gemm/MatMul layers, "
        "store them compactly (bitmask, reconstructed exactly at session load), report "
        "fidelity against the original, and write the model atomically. onnxruntime CPU does "
        "not run faster on zeros; 2:4 targets TensorRT sparse tensor cores.",
    )
    parser.add_argument("model", help="input .onnx file (never modified)")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file")
    parser.add_argument("--sparsity", type=float, help="target fraction of zeros in [0, 1)")
    parser.add_argument("--pattern", default="unstructured", choices=PATTERNS)
    parser.add_argument(
        "--scope",
        default="layer",
        choices=SCOPES,
        help="one threshold for all layers (global) or the target in every layer (layer)",
    )
    parser.add_argument(
        "--compare",
        default="layer",
        choices=COMPARES,
        help="with --scope layer: rank scores within the whole layer, or within each output "
        "row (the Wanda paper's choice; harsh on layers with few inputs per row)",
    )
    parser.add_argument("--calib", help="calibration .npz or folder (needed by wanda/--update)")
    parser.add_argument("--method", default="magnitude", choices=METHODS)
    parser.add_argument("--update", action="store_true", help="OBS/SparseGPT weight update")
    parser.add_argument(
        "--one-shot",
        action="store_true",
        help="collect every layer's input statistics in one pass over the original model "
        "instead of layer by layer on the partially sparsified one (faster, less accurate)",
    )
    parser.add_argument(
        "--iterative",
        type=int,
        default=1,
        metavar="K",
        help="reach the target in K steps (cubic schedule)",
    )
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE")
    parser.add_argument("--layer-sparsity", nargs="+", default=[], metavar="NODE=S")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Conv patch sampling")
    add_eval_option(parser)
    add_report_option(parser)
    parser.set_defaults(run=run, files=model_run_files)


def _overrides(items: list[str]) -> dict[str, float]:
    result = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            result[name] = float(value)
        except ValueError:
            name = ""
        if not sep or not name:
            raise UsageError(f"--layer-sparsity {item!r}: expected NODE=S, e.g. conv1=0.3")
    return result


def run(args: argparse.Namespace) -> int:
    sparsity = args.sparsity
    if sparsity is None:
        if args.pattern == "unstructured":
            raise UsageError("--sparsity is required for --pattern unstructured")
        n, m = (int(p) for p in args.pattern.split(":"))
        sparsity = 1 - n / m
    config = SparsifyConfig(
        sparsity=sparsity,
        pattern=args.pattern,
        scope=args.scope,
        compare=args.compare,
        sequential=not args.one_shot,
        method=args.method,
        update=args.update,
        iterative=args.iterative,
        exclude=tuple(args.exclude),
        layer_sparsity=_overrides(args.layer_sparsity),
        seed=args.seed,
    )
    result = sparsify_file(
        args.model, args.output, config, calib=args.calib, eval_data=args.eval_data
    )
    print(result.summary())
    if args.report:
        write_json(args.report, result.to_dict())
    return 0
