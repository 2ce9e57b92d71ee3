"""``onnxprune canonicalize``: exact clean-up and folding passes (see onnxprune.passes)."""

from __future__ import annotations

import argparse
import logging

from onnxprune.api import canonicalize_file
from onnxprune.commands.common import (
    add_dims_option,
    add_report_option,
    model_run_files,
    parse_dims,
    write_json,
)

__all__ = ["register", "run"]

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "canonicalize",
        help="fold BatchNorm/affine ops, fuse activations, fold constants, clean up",
        description="Apply the exact canonicalization passes, check the result against the "
        "original in onnxruntime, and write it atomically. Exit 1 (nothing written) if the "
        "outputs changed.",
    )
    parser.add_argument("model", help="input .onnx file (never modified)")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file")
    parser.add_argument("--calib", help="calibration .npz or folder, for the equivalence check")
    parser.add_argument("--skip", action="append", default=[], metavar="PASS", help="skip a pass")
    add_report_option(parser)
    add_dims_option(parser)
    parser.set_defaults(run=run, files=model_run_files)


def run(args: argparse.Namespace) -> int:
    result = canonicalize_file(
        args.model,
        args.output,
        calib=args.calib,
        dims=parse_dims(args.dim),
        skip=args.skip,
    )
    print(result.summary())
    if args.report:
        write_json(args.report, result.to_dict())
    return 0
