"""``onnxprune sensitivity``: per-group pruning sensitivity, plot, and guided layer ratios."""

from __future__ import annotations

import argparse
import io
import os

import numpy as np

from onnxprune.commands.common import INPUT_MODEL, add_dims_option, parse_dims, write_json
from onnxprune.errors import UsageError
from onnxprune.io.atomic import write_bytes_atomic
from onnxprune.io.outputs import RunFiles
from onnxprune.prune.allocate import allocate_ratios
from onnxprune.prune.importance import CRITERIA
from onnxprune.prune.sensitivity import SensitivityResult, load_canonical, sensitivity_file

__all__ = ["plot_sensitivity", "register", "run", "run_files"]


def _ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected e.g. 0.25,0.5,0.75") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one ratio")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sensitivity",
        help="measure how much each prunable group hurts the outputs when pruned alone",
        description="Prune every prunable group alone at each ratio (removed channels are "
        "zeroed, which computes exactly what removal would), compare the outputs with the "
        "unpruned model on calibration data (cosine, SQNR, top-1 agreement, noise/signal) "
        "and record each group's share of the MACs. With --allocate F, turn the curves into "
        "per-group ratios that keep a fraction F of the MACs, pruning tolerant groups more; "
        "--save-ratios writes them for `onnxprune prune --layer-ratios R.json`.",
    )
    parser.add_argument("model", help="input .onnx file (never modified)")
    parser.add_argument("--calib", help="calibration .npz or folder (required unless --from)")
    parser.add_argument("-o", "--output", metavar="S.json", help="write the sensitivity JSON")
    parser.add_argument("--from", dest="source", metavar="S.json", help="reuse a measured JSON")
    parser.add_argument("--plot", metavar="S.png", help="error vs ratio plot (needs matplotlib)")
    parser.add_argument("--ratios", type=_ratios, default=[0.25, 0.5, 0.75], metavar="R,R,..")
    parser.add_argument("--criterion", choices=CRITERIA, default="l2")
    parser.add_argument(
        "--round-to", type=int, default=8, metavar="N", help="as prune --round-to (8)"
    )
    parser.add_argument("--samples", type=int, default=64, help="calibration samples used (64)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--allocate", type=float, metavar="F", help="fraction of MACs to keep")
    parser.add_argument("--max-ratio", type=float, default=0.9, help="cap per group (0.9)")
    parser.add_argument("--save-ratios", metavar="R.json", help="write the allocated ratios")
    add_dims_option(parser)
    parser.set_defaults(run=run, files=run_files)


def run_files(args: argparse.Namespace) -> RunFiles:
    """Inputs (model, --calib, --from) and outputs (-o, --plot, --save-ratios)."""
    files = RunFiles().read(INPUT_MODEL, args.model, model=True)
    files.read("the --calib data", args.calib).read("the --from file", args.source)
    files.write("-o", args.output).write("--plot", args.plot)
    return files.write("--save-ratios", args.save_ratios)


def _measure_or_load(args: argparse.Namespace):
    dims = parse_dims(args.dim)
    if args.source:
        result = SensitivityResult.load(args.source)
        return load_canonical(args.model, result.criterion), result
    if not args.calib:
        raise UsageError("--calib is required (or --from S.json to reuse a measurement)")
    return sensitivity_file(
        args.model,
        args.calib,
        ratios=args.ratios,
        criterion=args.criterion,
        round_to=args.round_to,
        samples=args.samples,
        dims=dims,
        threads=args.threads,
    )


def run(args: argparse.Namespace) -> int:
    if args.save_ratios and args.allocate is None:
        raise UsageError("--save-ratios needs --allocate F")
    if not (args.output or args.plot or args.allocate is not None):
        raise UsageError("nothing to write: give -o S.json, --plot S.png or --allocate F")
    model, result = _measure_or_load(args)
    if args.output:
        write_json(args.output, result.to_dict())
    if args.plot:
        plot_sensitivity(result, args.plot)
    lines = [f"{len(result.groups)} prunable groups, {len(result.blocked)} blocked"]
    for row in sorted(result.groups, key=lambda r: r["points"][-1]["nsr"])[:10]:
        last = row["points"][-1]
        lines.append(
            f"  {row['id']}: MACs {row['mac_share']:.1%}, nsr {last['nsr']:.3g} "
            f"at ratio {last['ratio']:g}"
        )
    if args.allocate is not None:
        alloc = allocate_ratios(
            model, result, args.allocate, max_ratio=args.max_ratio, dims=parse_dims(args.dim)
        )
        before, after = alloc.macs
        lines.append(
            f"allocation: MACs {before:,} -> {after:,} ({after / max(before, 1):.3f}), "
            f"predicted nsr {alloc.predicted_nsr:.3g}"
        )
        lines += [f"  note: {n}" for n in alloc.notes]
        if args.save_ratios:
            write_json(args.save_ratios, alloc.to_dict())
            lines.append(f"wrote {args.save_ratios}")
    print("\n".join(lines))
    return 0


def plot_sensitivity(result: SensitivityResult, path: str | os.PathLike[str]) -> None:
    """Error versus ratio per group (lines up to 12 groups, a heatmap beyond)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed: pip install 'onnxprune[plot]'"
        ) from None
    floor = 1e-12
    if len(result.groups) <= 12:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in result.groups:
            xs = [p["ratio"] for p in row["points"]]
            ax.plot(xs, [max(p["nsr"], floor) for p in row["points"]], "o-", label=row["id"])
        ax.set_yscale("log")
        ax.set_xlabel("ratio of the group's channels removed")
        ax.set_ylabel("output noise / signal (log)")
        ax.legend(fontsize=7)
    else:
        grid = np.array([[max(p["nsr"], floor) for p in r["points"]] for r in result.groups])
        height = min(0.18 * len(result.groups) + 1.5, 40)
        fig, ax = plt.subplots(figsize=(6, height))
        image = ax.imshow(np.log10(grid), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(result.ratios)), [f"{r:g}" for r in result.ratios])
        ax.set_yticks(range(len(result.groups)), [r["id"] for r in result.groups], fontsize=6)
        ax.set_xlabel("ratio removed")
        fig.colorbar(image, ax=ax, label="log10 output noise / signal")
    ax.set_title(f"pruning sensitivity per group ({result.criterion}, round to {result.round_to})")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
