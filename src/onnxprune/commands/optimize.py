"""``onnxprune optimize``: from exported model to deployable model in one command."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune.bundled import default_model
from onnxprune.calib import load_calibration
from onnxprune.commands.common import (
    INPUT_MODEL,
    add_dims_option,
    add_report_option,
    parse_dims,
    write_json,
)
from onnxprune.commands.recover import add_recover_option, check_recover
from onnxprune.errors import CalibrationError, UsageError
from onnxprune.io import load
from onnxprune.io.outputs import RunFiles
from onnxprune.optimize import DEFAULT_PRESET, PRESETS, load_recipe, optimize, preset
from onnxprune.optimize.variants import manifest_path, optimize_variants, variant_path

__all__ = ["register", "run", "run_files"]


def register(sub: argparse._SubParsersAction) -> None:
    presets = "; ".join(f"{k}: {v['description']}" for k, v in PRESETS.items())
    parser = sub.add_parser(
        "optimize",
        help="run a recipe (canonicalize, prune, low-rank, sparsify, quantize) under a budget",
        description="Run the steps of a recipe or preset, verifying fidelity against the "
        "input on held-out calibration samples after each step and backing off when the "
        "budget is missed; then benchmark the result against the input and write it only "
        f"if it meets the budget and is not slower. Without MODEL: the bundled digits CNN "
        f"and its data. Presets: {presets}. Exit codes: 0 ok, 1 budget not met or result "
        "slower (nothing written), 2 usage error or bad input.",
    )
    parser.add_argument("model", nargs="?", help="input .onnx (default: bundled digits CNN)")
    parser.add_argument("-o", "--output", help="output .onnx (default: MODEL.optimized.onnx)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--recipe", metavar="R.yaml", help="recipe file (YAML or JSON)")
    source.add_argument("--preset", choices=sorted(PRESETS), help=f"default {DEFAULT_PRESET}")
    parser.add_argument("--calib", help="calibration .npz or folder")
    parser.add_argument("--budget", metavar="EXPR", help='e.g. "top1_agreement>=0.99"')
    parser.add_argument("--provider", help="cpu, cuda or tensorrt (default from the recipe)")
    parser.add_argument("--eval", dest="eval_set", help=".npz with inputs and 'label'")
    parser.add_argument("--threads", type=int, default=2, help="threads for the benchmark")
    parser.add_argument(
        "--bench-seconds",
        type=float,
        default=10.0,
        help="benchmark time (default 10); 0 skips the latency check (the report says so)",
    )
    add_report_option(parser)
    add_recover_option(parser, when="when a pruning/sparsity/low-rank step misses the budget, ")
    parser.add_argument(
        "--variants",
        metavar="F1,F2,...",
        help="write one model per MACs fraction plus OUT.variants.json (a manifest)",
    )
    add_dims_option(parser)
    parser.set_defaults(run=run, files=run_files)


def _fractions(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--variants {text!r}: expected fractions like 0.9,0.7,0.5") from None


def _model(args: argparse.Namespace) -> str:
    return args.model or str(default_model())


def _variants_output(args: argparse.Namespace) -> str:
    return args.output or f"{Path(_model(args)).stem}.onnx"


def run_files(args: argparse.Namespace) -> RunFiles:
    """Inputs (model, --calib, --eval, --recipe) and outputs (the model or the variants and
    their manifest, --report), with the defaults ``optimize`` writes to."""
    model = _model(args)
    files = RunFiles().read(INPUT_MODEL, model, model=True)
    files.read("the --calib data", args.calib).read("the --eval data", args.eval_set)
    files.read("the --recipe file", args.recipe)
    if args.variants:
        output = _variants_output(args)
        for fraction in _fractions(args.variants):
            files.write(f"variant {fraction:g}", variant_path(output, fraction), model=True)
        files.write("the variants manifest", manifest_path(output))
    else:
        files.write("-o", args.output or f"{Path(model).stem}.optimized.onnx", model=True)
    return files.write("--report", args.report)


def _check_options(args: argparse.Namespace) -> None:
    """Option values argparse lets through, and --calib/--eval through the shared
    calibration validator, before any work."""
    if not math.isfinite(args.bench_seconds) or args.bench_seconds < 0:
        raise UsageError(f"--bench-seconds {args.bench_seconds}: must be a number >= 0")
    if args.recover != "none":  # the bundled model (no MODEL) comes with its data
        check_recover(args, needs_calib=args.model is not None)
    if not (args.calib or args.eval_set):
        return
    model = load(_model(args))
    if args.calib:
        load_calibration(args.calib, model)
    if args.eval_set:
        _check_eval_set(args.eval_set, model)


def _check_eval_set(path: str, model: ir.Model) -> None:
    """``--eval``: the model's inputs and, optionally, a 'label' per sample (accuracy)."""
    data = load_calibration(path, model, ignore=("label",))
    if not Path(path).is_file():
        return
    with np.load(path, allow_pickle=False) as arrays:
        labels = arrays["label"] if "label" in arrays.files else None
    if labels is not None and (labels.ndim != 1 or len(labels) != len(data)):
        raise CalibrationError(
            f"--eval {path}: 'label' must hold one class index per sample ({len(data)} "
            f"samples, labels of shape {list(labels.shape)})"
        )


def _run_variants(args: argparse.Namespace, common: dict) -> int:
    recipe = load_recipe(args.recipe) if args.recipe else preset(args.preset or DEFAULT_PRESET)
    output = _variants_output(args)
    manifest = optimize_variants(
        _fractions(args.variants), output, recipe, model=args.model, **common
    )
    for entry in manifest["variants"]:
        if entry["written"]:
            ratio = entry["latency_ratio"]
            speed = f"{1 / ratio:.2f}x faster" if ratio else "latency n/a"
            print(f"{entry['macs_fraction']:.2f} of MACs: {entry['path']} ({speed})")
        else:
            print(f"{entry['macs_fraction']:.2f} of MACs: not written: {entry['reason']}")
    return 0 if any(e["written"] for e in manifest["variants"]) else 1


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    common = {
        "calib": args.calib,
        "budget": args.budget,
        "provider": args.provider,
        "eval_set": args.eval_set,
        "dims": parse_dims(args.dim),
        "threads": args.threads,
        "bench_seconds": args.bench_seconds,
        "recover": args.recover,
        "recover_budget": args.recover_budget,
    }
    if args.variants:
        return _run_variants(args, common)
    report = optimize(
        args.model, args.output, recipe=args.recipe, preset_name=args.preset, **common
    )
    print(report.to_table())
    if args.report:
        write_json(args.report, report.to_dict())
    return 0
