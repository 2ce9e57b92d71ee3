"""``onnxprune prune``: structured pruning that physically removes channels and heads."""

from __future__ import annotations

import argparse
import json

from onnxprune.commands.common import (
    add_dims_option,
    add_eval_option,
    add_report_option,
    model_run_files,
    parse_dims,
    write_json,
)
from onnxprune.commands.recover import add_recover_option, recover_after
from onnxprune.errors import UsageError
from onnxprune.io.outputs import RunFiles
from onnxprune.prune.allocate import RATIOS_SCHEMA
from onnxprune.prune.api import PruneFileResult, prune_file
from onnxprune.prune.core import PruneOptions
from onnxprune.prune.importance import CRITERIA
from onnxprune.prune.plan import PruningPlan

__all__ = ["register", "run"]


def _layer_ratio(item: str) -> tuple[str, float]:
    name, _, value = item.rpartition("=")
    try:
        return name, float(value)
    except ValueError:
        raise UsageError(f"--layer-ratio {item!r}: expected NAME=RATIO") from None


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prune",
        help="remove channels, filters and attention heads",
        description="Find the channels that must go together (residual adds, concat/split, "
        "depthwise convs, BatchNorm, flatten into a classifier, attention heads, MLP hidden "
        "units), score them, remove them physically and optionally refit the next layers "
        "on calibration data. Groups that cannot be pruned are reported with the node "
        "and the reason.",
    )
    parser.add_argument("model", help="input .onnx file (never modified)")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, help="fraction of channels removed per group")
    amount.add_argument("--target-macs", type=float, metavar="F", help="fraction of MACs kept")
    amount.add_argument("--target-params", type=float, metavar="F", help="fraction of params kept")
    amount.add_argument("--plan", metavar="P.json", help="replay a pruning plan")
    parser.add_argument(
        "--layer-ratio",
        action="append",
        default=[],
        metavar="GROUP=R",
        type=_layer_ratio,
        help="ratio for one group (id from the report) or layer (node name); repeatable",
    )
    parser.add_argument(
        "--layer-ratios",
        metavar="R.json",
        help="per-group ratios from `onnxprune sensitivity --allocate F --save-ratios R.json`",
    )
    parser.add_argument("--max-ratio", type=float, default=0.9, help="cap per group (0.9)")
    parser.add_argument(
        "--criterion",
        choices=(*CRITERIA, "auto"),
        default="auto",
        help="unit importance; auto: reconstruction with --calib, else l2",
    )
    parser.add_argument(
        "--allocation",
        choices=("auto", "measured", "uniform"),
        default="auto",
        help="how --target-macs is spread over groups; auto: measured with --calib "
        "(each group cut alone on calibration feeds, fragile ones cut less), else uniform",
    )
    parser.add_argument("--calib", help="calibration .npz or folder (for activation/recovery)")
    parser.add_argument(
        "--reconstruct",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ridge refit of the layers after each cut, kept where it helps held-out feeds "
        "(default: on with --calib)",
    )
    parser.add_argument("--iterative", type=int, default=1, metavar="K", help="prune in K steps")
    parser.add_argument(
        "--round-to", type=int, default=None, metavar="N", help="kept channels multiple (8)"
    )
    parser.add_argument("--exclude", action="append", default=[], metavar="NODE")
    add_recover_option(parser)
    add_eval_option(parser)
    add_report_option(parser)
    parser.add_argument("--save-plan", metavar="P.json", help="write the plan of the last step")
    add_dims_option(parser)
    parser.set_defaults(run=run, files=run_files)


def run_files(args: argparse.Namespace) -> RunFiles:
    """Inputs (model, data, --plan, --layer-ratios) and outputs (-o, --report, --save-plan)."""
    files = model_run_files(args)
    files.read("the --plan file", args.plan).read("the --layer-ratios file", args.layer_ratios)
    return files.write("--save-plan", args.save_plan)


def _ratio_table(data: object, path: str) -> dict[str, float]:
    """The ``layer_ratios`` mapping of a saved allocation, each a finite ratio."""
    table = data.get("layer_ratios") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise UsageError(f"--layer-ratios {path}: no 'layer_ratios' mapping of group to ratio")
    ratios = {}
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise UsageError(
                f"--layer-ratios {path}: ratio of {key!r} is {value!r}, expected a number in [0, 1)"
            )
        ratios[str(key)] = float(value)
    return ratios


def _saved_ratios(path: str | None, round_to: int | None) -> tuple[dict[str, float], int]:
    """Layer ratios and rounding from a saved allocation (or none)."""
    if path is None:
        return {}, round_to if round_to is not None else 8
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read --layer-ratios {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != RATIOS_SCHEMA:
        raise UsageError(
            f"--layer-ratios {path}: not a saved allocation (onnxprune.layer_ratios/1)"
        )
    saved = data.get("round_to", 8)
    if isinstance(saved, bool) or not isinstance(saved, int) or saved < 1:
        raise UsageError(f"--layer-ratios {path}: round_to {saved!r} is not a positive integer")
    if round_to is not None and round_to != saved:
        raise UsageError(
            f"--round-to {round_to} differs from the allocation's round_to {saved} in {path}"
        )
    return _ratio_table(data, path), saved


def run(args: argparse.Namespace) -> int:
    saved, round_to = _saved_ratios(args.layer_ratios, args.round_to)
    options = PruneOptions(
        ratio=args.ratio,
        layer_ratios={**saved, **dict(args.layer_ratio)},
        target_macs=args.target_macs,
        target_params=args.target_params,
        plan=PruningPlan.load(args.plan) if args.plan else None,
        max_ratio=args.max_ratio,
        round_to=round_to,
        criterion=args.criterion,
        exclude=args.exclude,
        allocation=args.allocation,
    )

    def write(output: str) -> PruneFileResult:
        return prune_file(
            args.model,
            output,
            options,
            calib=args.calib,
            reconstruct=args.reconstruct,
            iterative=args.iterative,
            dims=parse_dims(args.dim),
            eval_data=args.eval_data,
        )

    recovered = None
    if args.recover == "distill":
        result, recovered = recover_after(args, write)
    else:
        result = write(args.output)
    print(result.summary())
    if recovered is not None:
        print(recovered.summary())
    if args.report:
        report = result.to_dict()
        if recovered is not None:
            report["recovery"] = recovered.to_dict()
        write_json(args.report, report)
    if args.save_plan:
        write_json(args.save_plan, result.steps[-1].plan.to_dict())
    return 0
