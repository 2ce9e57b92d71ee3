"""``onnxprune verify``: compare a candidate's outputs (and layers) with a reference's."""

from __future__ import annotations

import argparse

from onnxprune.errors import BudgetError
from onnxprune.io.atomic import write_text_atomic
from onnxprune.io.outputs import RunFiles
from onnxprune.reporting import write_json
from onnxprune.tolerance import DEFAULT_TOLERANCE
from onnxprune.verification import verify, verify_markdown

__all__ = ["register", "run", "run_files"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "verify",
        help="compare a candidate model with a reference on calibration data",
        description=(
            "Run REFERENCE and CANDIDATE on every calibration sample and compute per-output "
            "max/mean abs error, max rel error, cosine, SQNR and top-1 agreement over the "
            "concatenation of all samples. Exit 1 when the tolerance is violated (the "
            "message names the output and metric), 0 otherwise. --layers also compares "
            "intermediate tensors matched by name and names the first diverging one."
        ),
    )
    parser.add_argument("reference", help="the reference .onnx file")
    parser.add_argument("candidate", help="the .onnx file to check")
    parser.add_argument("--calib", required=True, help="calibration data (.npz or folder)")
    parser.add_argument(
        "--tolerance",
        default=DEFAULT_TOLERANCE,
        metavar="EXPR",
        help=f"METRIC>=V,METRIC<=V,... over every output (default {DEFAULT_TOLERANCE})",
    )
    parser.add_argument(
        "--layers", action="store_true", help="compare intermediate tensors layer by layer"
    )
    parser.add_argument(
        "--layer-samples",
        type=int,
        default=16,
        metavar="N",
        help="samples for --layers (first N, default 16)",
    )
    parser.add_argument(
        "--layer-chunk",
        type=int,
        default=64,
        metavar="N",
        help="at most N intermediate tensors exposed per run (memory bound, default 64)",
    )
    parser.add_argument(
        "--sqnr-threshold",
        type=float,
        default=40.0,
        help="a layer below this SQNR (dB) has diverged (default 40)",
    )
    parser.add_argument(
        "--cosine-threshold",
        type=float,
        default=0.999,
        help="a layer below this cosine has diverged (default 0.999)",
    )
    parser.add_argument("--provider", default="cpu", help="execution provider for the outputs")
    parser.add_argument("--json", metavar="OUT", help="write the onnxprune.verify/1 JSON report")
    parser.add_argument("--markdown", metavar="OUT", help="write the Markdown report")
    parser.set_defaults(run=run, files=run_files)


def run_files(args: argparse.Namespace) -> RunFiles:
    """Inputs (both models, --calib) and outputs (--json, --markdown)."""
    files = RunFiles().read("the reference model", args.reference, model=True)
    files.read("the candidate model", args.candidate, model=True)
    files.read("the --calib data", args.calib)
    return files.write("--json", args.json).write("--markdown", args.markdown)


def run(args: argparse.Namespace) -> int:
    result = verify(
        args.reference,
        args.candidate,
        args.calib,
        tolerance=args.tolerance,
        layers=args.layers,
        layer_samples=args.layer_samples,
        chunk_size=args.layer_chunk,
        sqnr_threshold=args.sqnr_threshold,
        cosine_threshold=args.cosine_threshold,
        provider=args.provider,
    )
    markdown = verify_markdown(result)
    if args.json:
        write_json(args.json, result.to_dict())
    if args.markdown:
        write_text_atomic(args.markdown, markdown)
    print(markdown, end="")
    if not result.passed:
        raise BudgetError(f"verification failed: {result.failure_message()}")
    return 0
