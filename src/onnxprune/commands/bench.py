"""``onnxprune bench``: interleaved latency benchmark; later models get a ratio to the first."""

from __future__ import annotations

import argparse
import sys

from onnxprune.bench import bench_markdown, benchmark, plot_bench
from onnxprune.bench.inputs import parse_shape
from onnxprune.commands.common import add_dims_option, parse_dims
from onnxprune.errors import UsageError
from onnxprune.io.atomic import write_text_atomic
from onnxprune.io.outputs import RunFiles
from onnxprune.reporting import write_json

__all__ = ["register", "run", "run_files"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmark latency of one or more models (interleaved, with ratio CIs)",
        description=(
            "Benchmark MODELs in onnxruntime (ORT_ENABLE_ALL). All sessions are created and "
            "warmed up, then timed in interleaved rounds (A B A B ..., order shuffled per "
            "round with a fixed seed). Every model after the first gets its median latency "
            "ratio to the first with a paired bootstrap 95%% interval, and its output "
            "fidelity to the first on the same feed. See benchmarks/README.md for the method."
        ),
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="the .onnx files")
    parser.add_argument(
        "--provider", default="cpu", help="cpu, cuda, tensorrt or a full provider name"
    )
    parser.add_argument(
        "--provider-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="execution provider option (e.g. device_id=0); repeatable",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: usable CPUs)"
    )
    parser.add_argument("--batch", type=int, default=None, help="bind the first (batch) axis")
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME:DIMS",
        help="shape of a generated input, e.g. input:1x3x224x224; repeatable",
    )
    add_dims_option(parser)
    parser.add_argument("--calib", help="calibration data; its first sample(s) are the feed")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs per model (10)")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--runs", type=int, help="measured rounds (default 100)")
    count.add_argument("--seconds", type=float, help="measure for about S seconds instead")
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs, order, bootstrap")
    parser.add_argument(
        "--no-shuffle", action="store_true", help="keep the model order fixed in each round"
    )
    parser.add_argument(
        "--block",
        type=int,
        default=1,
        metavar="N",
        help="N consecutive runs per model per round, median recorded (default 1); use 5-10 "
        "for models whose weights exceed the CPU cache, to time them warm",
    )
    parser.add_argument("--json", metavar="OUT", help="write the onnxprune.bench/1 JSON report")
    parser.add_argument("--markdown", metavar="OUT", help="write the Markdown report")
    parser.add_argument("--plot", metavar="OUT.png", help="write a PNG plot (needs matplotlib)")
    parser.set_defaults(run=run, files=run_files)


def run_files(args: argparse.Namespace) -> RunFiles:
    """Inputs (the models, --calib) and outputs (--json, --markdown, --plot)."""
    files = RunFiles()
    for model in args.models:
        files.read("a benchmarked model", model, model=True)
    files.read("the --calib data", args.calib)
    files.write("--json", args.json).write("--markdown", args.markdown)
    return files.write("--plot", args.plot)


def _provider_options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--provider-option {item!r}: expected KEY=VALUE")
        options[key] = value
    return options


def run(args: argparse.Namespace) -> int:
    if args.plot:
        # Fail before minutes of measuring, not after.
        from onnxprune.bench.report import import_pyplot

        import_pyplot()
    shapes = dict(parse_shape(item) for item in args.shape)
    result = benchmark(
        args.models,
        provider=args.provider,
        provider_options=_provider_options(args.provider_option),
        threads=args.threads,
        batch=args.batch,
        shapes=shapes,
        dims=parse_dims(args.dim),
        calib=args.calib,
        warmup=args.warmup,
        runs=args.runs,
        seconds=args.seconds,
        seed=args.seed,
        shuffle=not args.no_shuffle,
        block=args.block,
    )
    notice = result.settings.dims_notice()
    if notice:
        print(f"onnxprune bench: note: {notice}", file=sys.stderr)
    markdown = bench_markdown(result)
    if args.json:
        write_json(args.json, result.to_dict())
    if args.markdown:
        write_text_atomic(args.markdown, markdown)
    if args.plot:
        plot_bench(result, args.plot)
    print(markdown, end="")
    return 0
