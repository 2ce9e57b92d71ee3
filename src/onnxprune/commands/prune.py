"""``onnxprune prune``: structured pruning that physically removes channels and heads."""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxprune.commands.common import (
    add_calib_option,
    add_dims_option,
    add_eval_option,
    add_report_option,
    model_run_files,
    parse_dims,
    write_json,
)
from onnxprune.commands.recover import add_recover_option, run_pass
from onnxprune.io.outputs import RunFiles
from onnxprune.prune.api import PruneFileResult, prune_file
from onnxprune.prune.config import PruneConfig
from onnxprune.registry.options import add_config_arguments, config_from_namespace
from onnxprune.transforms import PRUNE

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("prune", help=PRUNE.help, description=PRUNE.description)
    parser.add_argument("model", help="input .onnx file (never modified)")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file")
    add_calib_option(parser)
    add_config_arguments(parser, PruneConfig)
    add_recover_option(parser)
    add_eval_option(parser)
    add_report_option(parser)
    parser.add_argument("--save-plan", metavar="P.json", help="write the plan of the last step")
    add_dims_option(parser)
    parser.set_defaults(run=run, files=run_files)


def run_files(args: argparse.Namespace) -> RunFiles:
    """Inputs (model, data, --plan, --layer-ratios) and outputs (-o, --report, --save-plan)."""
    files = model_run_files(args)
    files.read("the --plan file", getattr(args, "plan", None))
    files.read("the --layer-ratios file", getattr(args, "layer_ratios", None))
    return files.write("--save-plan", args.save_plan)


def run(args: argparse.Namespace) -> int:
    config = config_from_namespace(PruneConfig, args)
    dims = parse_dims(args.dim)

    def write(output: str | Path) -> PruneFileResult:
        return prune_file(
            args.model, output, config, calib=args.calib, dims=dims, eval_data=args.eval_data
        )

    result = run_pass(args, write)
    if args.save_plan:
        write_json(args.save_plan, result.steps[-1].plan.to_dict())
    return 0
