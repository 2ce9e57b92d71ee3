"""Argument groups and helpers shared by CLI commands (declared once)."""

from __future__ import annotations

import argparse

from onnxprune.errors import UsageError
from onnxprune.io.outputs import RunFiles
from onnxprune.reporting import write_json

__all__ = [
    "INPUT_MODEL",
    "add_calib_option",
    "add_dims_option",
    "add_eval_option",
    "add_report_option",
    "model_run_files",
    "parse_dims",
    "write_json",
]

#: How messages name the model a command reads.
INPUT_MODEL = "the input model"


def add_dims_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="bind a symbolic dimension (e.g. --dim batch=1 --dim seq=128); repeatable",
    )


def add_calib_option(parser: argparse.ArgumentParser, *, exact: bool = False) -> None:
    why = "for the equivalence check" if exact else "the samples a data-driven step fits on"
    parser.add_argument("--calib", metavar="PATH", help=f"calibration .npz or folder: {why}")


def add_report_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", metavar="R.json", help="write the JSON report here")


def add_eval_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval",
        dest="eval_data",
        metavar="PATH",
        help="held-out data (.npz or folder, the --calib format; a 'label' array is ignored) "
        "that the report's fidelity is measured on; without it the last quarter of --calib "
        "is held out and not used for fitting",
    )


def parse_dims(items: list[str]) -> dict[str, int]:
    """Parse ``NAME=VALUE`` pairs into a dict; bad items are usage errors."""
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) <= 0:
            raise UsageError(f"--dim {item!r}: expected NAME=POSITIVE_INT, e.g. batch=1")
        dims[name] = int(value)
    return dims


def model_run_files(args: argparse.Namespace) -> RunFiles:
    """The files of a command that reads MODEL (with --calib/--eval when it has them) and
    writes ``-o`` (a model) and ``--report``; commands add their own options to it."""
    files = RunFiles().read(INPUT_MODEL, args.model, model=True)
    files.read("the --calib data", getattr(args, "calib", None))
    files.read("the --eval data", getattr(args, "eval_data", None))
    files.write("-o", getattr(args, "output", None), model=True)
    return files.write("--report", getattr(args, "report", None))
