"""``onnxprune recover``: distil an optimized model from its original (weights only)."""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onnxprune.commands.common import (
    add_eval_option,
    add_report_option,
    model_run_files,
    write_json,
)
from onnxprune.errors import UsageError
from onnxprune.io.outputs import RunFiles

__all__ = ["add_recover_option", "check_recover", "recover_after", "register", "run", "run_pass"]

NO_TORCH = "recover needs torch: pip install onnxprune[recover]"


#: ``--lr auto``: the rates tried, and the steps each is tried for.
LR_CANDIDATES = (3e-5, 1e-4, 3e-4, 1e-3)
LR_TRIAL_STEPS = 20


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "recover",
        help="recover accuracy by distillation from the original model",
        description="Train the weights of an optimized model (pruned, sparsified, low-rank, "
        "int8 QDQ) so its outputs match the original model's on unlabeled calibration data. "
        "Only initializer values change: graph, dtypes, shapes, sparsity masks and "
        "quantization scales stay as they are. The trained weights are kept only when "
        "fidelity on held-out calibration samples improves. Needs torch "
        "(pip install onnxprune[recover]).",
    )
    parser.add_argument("model", metavar="STUDENT", help="optimized .onnx file (never modified)")
    parser.add_argument("--teacher", required=True, metavar="ORIGINAL", help="original .onnx")
    parser.add_argument("--calib", required=True, help="unlabeled .npz or folder of .npz")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file")
    parser.add_argument("--steps", type=int, default=200, metavar="N", help="optimizer steps")
    parser.add_argument(
        "--time-budget", type=float, default=None, metavar="S", help="stop after S seconds"
    )
    parser.add_argument(
        "--budget-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what --time-budget counts: wall seconds or this process's CPU seconds (wall)",
    )
    parser.add_argument(
        "--lr",
        default="1e-4",
        metavar="RATE",
        help="Adam learning rate (1e-4), or auto: the best of 3e-5, 1e-4, 3e-4 and 1e-3 after "
        f"{LR_TRIAL_STEPS} steps each on the held-out loss",
    )
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="samples a step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument(
        "--augment", action="store_true", help="random flips and small shifts of image inputs"
    )
    parser.add_argument(
        "--match",
        action="append",
        default=[],
        metavar="TENSOR",
        help="also match this intermediate tensor of both models ('auto': all of the same "
        "name and shape); repeatable",
    )
    parser.add_argument(
        "--blockwise",
        action="store_true",
        help="train segment by segment (between tensors every path passes through) to match "
        "the teacher's tensor at each segment's end, the student's own tensor as its input; "
        "--steps counts per segment",
    )
    parser.add_argument(
        "--block-layers",
        type=int,
        default=None,
        metavar="N",
        help="--blockwise: a segment ends at the first cut after N layers with weights (3)",
    )
    add_eval_option(parser)
    add_report_option(parser)
    parser.set_defaults(run=run, files=run_files)


def run_files(args: argparse.Namespace) -> RunFiles:
    return model_run_files(args).read("the --teacher model", args.teacher, model=True)


def _options(args: argparse.Namespace) -> object:
    from onnxprune.recover.distill import DistillOptions

    if args.block_layers is not None and not args.blockwise:
        raise UsageError("--block-layers sets the segment size of --blockwise; add --blockwise")
    block_layers = 3 if args.block_layers is None else args.block_layers
    if min(args.steps, args.batch_size, args.threads, block_layers) < 1:
        raise UsageError("--steps, --batch-size, --threads and --block-layers must be positive")
    search = args.lr == "auto"
    try:
        lr = 1e-4 if search else float(args.lr)
    except ValueError:
        raise UsageError(f"--lr {args.lr!r}: a positive number or auto") from None
    if not lr > 0 or (args.time_budget is not None and not args.time_budget > 0):
        raise UsageError("--lr and --time-budget must be positive")
    match = "auto" if args.match == ["auto"] else (args.match or None)
    if args.blockwise and (args.augment or match):
        raise UsageError("--augment and --match apply to end-to-end distillation, not --blockwise")
    return DistillOptions(
        steps=args.steps,
        time_budget=args.time_budget,
        budget_clock=args.budget_clock,
        lr=lr,
        lr_search=LR_CANDIDATES if search else (),
        lr_trial_steps=LR_TRIAL_STEPS,
        batch_size=args.batch_size,
        seed=args.seed,
        threads=args.threads,
        augment=args.augment,
        match=match,
        blockwise=args.blockwise,
        block_layers=block_layers,
    )


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("torch") is None:
        raise UsageError(NO_TORCH)
    from onnxprune.recover.api import recover_file

    result = recover_file(
        args.model,
        args.teacher,
        args.output,
        args.calib,
        eval_data=args.eval_data,
        options=_options(args),  # type: ignore[arg-type]
    )
    print(result.summary())
    if args.report:
        write_json(args.report, result.to_dict())
    return 0


def add_recover_option(parser: argparse.ArgumentParser, *, when: str = "after the pass, ") -> None:
    """``--recover distill`` for a lossy command (with the distillation defaults)."""
    parser.add_argument(
        "--recover",
        choices=("none", "distill", "blockwise"),
        default="none",
        help=f"{when}distil the result from the input model on --calib "
        "(weights only; kept only if held-out fidelity improves; needs torch); blockwise: "
        "segment by segment on the input model's intermediate tensors",
    )
    parser.add_argument(
        "--recover-budget", type=float, default=None, metavar="S", help="distillation seconds"
    )


def check_recover(args: argparse.Namespace, *, needs_calib: bool = True) -> None:
    """``--recover distill|blockwise`` needs torch and ``--calib`` (one line each, exit 2)."""
    option = f"--recover {getattr(args, 'recover', 'distill')}"
    if importlib.util.find_spec("torch") is None:
        raise UsageError(NO_TORCH.replace("recover needs", f"{option} needs"))
    if needs_calib and not args.calib:
        raise UsageError(f"{option} needs --calib (unlabeled samples to distil on)")


def run_pass(args: argparse.Namespace, write: Callable[[str | Path], Any]) -> Any:
    """The pass into ``args.output`` (distilled after it with ``--recover distill``): both
    summaries printed, the report (with ``recovery``) written; returns the pass's result."""
    recovered = None
    if getattr(args, "recover", "none") in ("distill", "blockwise"):
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
    return result


def recover_after(args: argparse.Namespace, write: Callable[[Path], Any]) -> tuple[Any, Any]:
    """Run ``write(tmp)`` (the pass, into a temporary file), then distil that model from
    ``args.model`` into ``args.output``. Returns (the pass's result, the RecoverResult)."""
    check_recover(args)
    from onnxprune.recover.api import recover_file
    from onnxprune.recover.distill import DistillOptions

    with tempfile.TemporaryDirectory(prefix="onnxprune-recover-") as folder:
        student = Path(folder) / Path(args.output).name
        result = write(student)
        options = DistillOptions(
            time_budget=args.recover_budget, blockwise=args.recover == "blockwise"
        )
        recovered = recover_file(
            student, args.model, args.output, args.calib, eval_data=args.eval_data, options=options
        )
    return result, recovered
