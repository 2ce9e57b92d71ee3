"""``onnxprune inspect``: MACs, parameters, op histogram and file size of a model."""

from __future__ import annotations

import argparse
import sys

from onnxprune.analysis.inspect import inspect_model
from onnxprune.bundled import default_model
from onnxprune.commands.common import add_dims_option, parse_dims
from onnxprune.errors import UsageError
from onnxprune.io import load
from onnxprune.reporting import json_text

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "inspect",
        help="show MACs, parameters, ops and size of a model",
        description="Show inputs, outputs, MACs, parameters, op histogram, file size and the "
        "top layers by MACs. Without MODEL, inspects the bundled digits CNN.",
    )
    parser.add_argument("model", nargs="?", help="the .onnx file (default: bundled digits CNN)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--top", type=int, default=10, help="layers to list (default 10)")
    add_dims_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise UsageError(f"--top {args.top}: must be >= 0")
    path = args.model or str(default_model())
    model = load(path)
    report = inspect_model(model, path=path, dims=parse_dims(args.dim), top=args.top)
    notice = report.dims_notice()
    if notice:
        print(f"onnxprune inspect: note: {notice}", file=sys.stderr)
    if args.json:
        print(json_text(report.to_dict()), end="")
    else:
        print(report.to_text())
    return 0
