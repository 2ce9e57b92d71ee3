"""Structured pruning on the real-model zoo, side by side with onnxsim 0.8 (issue 17).

For every chosen zoo entry (``benchmarks/zoo/.cache/manifest.json``) and MACs target F:

* **onnxprune**: the command users run, ``onnxprune prune MODEL -o OUT --target-macs F
  --calib CALIB`` (measured allocation and the reconstruction criterion are its defaults with
  data), and with ``--variants`` also ``--reconstruct`` (ridge refit), ``--allocation
  measured-refit`` (refit-probes: each probe refit in closed form) or ``--allocation
  uniform`` (the previous default, one ratio for every group), fitted on the calibration
  split only.
* **onnxsim 0.8**: ``onnxsim.pruning.apply_structured_pruning`` (uniform sparsity per
  chain, L2 importance) with its sparsity bisected so that its MACs match onnxprune's
  default at F, then ``onnxsim.finetune.apply_pruning_finetune`` (its ridge refit of
  MatMul/Gemm layers) on the same calibration feeds.

Every candidate is scored on the **evaluation split** by ``scoreboard.independent`` (the
scoreboard's own metric code: top-1 agreement, nearest-neighbour agreement, cosine, SQNR),
its MACs counted by one counter (``onnxprune.analysis.count_costs``, symbolic dims bound from
the first evaluation feed), and all candidates of an entry are timed in one interleaved
``onnxprune.benchmark`` run (median latency and the paired speed-up over the original);
the wall time of each command is recorded. Writes ``benchmarks/results/prune_zoo.json``
and ``prune_zoo.md``.

    python benchmarks/prune_zoo.py [--only keras_cnn ...] [--targets 0.75,0.5]
        [--variants default,reconstruct] [--bench-seconds 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scoreboard
from onnxprune import benchmark
from onnxprune.io.atomic import write_text_atomic
from onnxprune.reporting import json_safe

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("ONNXPRUNE_ZOO", Path(__file__).resolve().parent / "zoo" / ".cache"))
DEFAULT_ENTRIES = (
    "keras_cnn",
    "mobilenet_v2.dynamo",
    "mobilenet_v2.torchscript",
    "all_minilm_l6_v2",
)
VARIANTS = {
    "default": [],
    "reconstruct": ["--reconstruct"],
    "uniform": ["--allocation", "uniform"],
    "refit-probes": ["--allocation", "measured-refit"],
}


def _entries(names: list[str]) -> list[dict[str, Any]]:
    manifest = json.loads((CACHE / "manifest.json").read_text())
    entries = manifest["entries"] if isinstance(manifest, dict) else manifest
    by_name = {e["name"]: {**e, "_cache": str(CACHE)} for e in entries}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"not in the zoo manifest: {', '.join(missing)}")
    return [by_name[n] for n in names]


def _ours(entry: dict, original: Path, out: Path, target: float, extra: list[str]) -> dict:
    report = out.with_suffix(".json")
    args = [sys.executable, "-m", "onnxprune.cli", "prune", str(original), "-o", str(out),
            "--target-macs", str(target), "--calib", str(CACHE / entry["calib"]),
            "--eval", str(CACHE / entry["eval"]), "--report", str(report), *extra]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    row: dict[str, Any] = {"seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0 or not out.exists():
        row["error"] = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        return row
    data = json.loads(report.read_text())
    allocation = data["steps"][0].get("allocation")
    if allocation:
        row["allocation"] = {
            gid: round(r, 3) for gid, r in allocation["layer_ratios"].items() if r > 0
        }
        row["spared"] = sorted(g for g, r in allocation["layer_ratios"].items() if r == 0)
    return row


def _save_without_value_info(model: onnx.ModelProto, out: Path) -> None:
    """onnxsim keeps the input's value_info (1536 where 256 channels are left), which makes
    shape inference fail and a counter fall back to those stale shapes: drop it, so its
    MACs are counted from the real shapes."""
    del model.graph.value_info[:]
    onnx.save(model, str(out))


def _onnxsim_prune(original: Path, sparsity: float, out: Path) -> None:
    from onnxsim.pruning import apply_structured_pruning

    _save_without_value_info(apply_structured_pruning(str(original), sparsity=sparsity), out)


def _onnxsim(original: Path, out: Path, *, goal_macs: int, dims: dict, calib: list) -> dict:
    """onnxsim at the sparsity whose MACs are closest to ``goal_macs`` (bisection), refit."""
    from onnxsim.finetune import apply_pruning_finetune

    start = time.perf_counter()
    lo, hi, best = 0.0, 0.95, None
    trial = out.with_name(out.stem + "_trial.onnx")
    for _ in range(9):
        mid = (lo + hi) / 2
        _onnxsim_prune(original, mid, trial)
        macs = scoreboard._macs(trial, dims)
        if macs is None:
            return {"error": "onnxsim output cannot be counted"}
        if best is None or abs(macs - goal_macs) < abs(best[1] - goal_macs):
            best = (mid, macs)
        if macs > goal_macs:
            lo = mid
        else:
            hi = mid
    _onnxsim_prune(original, hi if best is None else best[0], out)
    pruned_seconds = time.perf_counter() - start
    try:
        tuned = apply_pruning_finetune(str(original), str(out), calibration_data=calib)
        _save_without_value_info(tuned, out)
        refit = True
    except Exception as exc:  # recorded: the un-refit cut is scored
        refit = f"failed: {str(exc)[:200]}"
    trial.unlink(missing_ok=True)
    return {
        "sparsity": round(best[0], 4) if best else None,
        "refit": refit,
        "seconds": round(time.perf_counter() - start, 1),
        "search_seconds": round(pruned_seconds, 1),
    }


def score(entry: dict, targets: list[float], variants: list[str], args) -> dict:
    original = CACHE / entry["model"]
    eval_feeds = scoreboard._feeds(CACHE / entry["eval"], original)
    calib = scoreboard._feeds(CACHE / entry["calib"], original)
    dims = scoreboard._dims(original, eval_feeds[0])
    base_macs = scoreboard._macs(original, dims)
    result: dict[str, Any] = {"model": entry["name"], "metric": entry["metric"], "dims": dims}
    result["macs"] = base_macs
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prune-zoo-") as tmp:
        work = Path(tmp)
        written: list[tuple[dict, Path]] = []
        for target in targets:
            goal = None
            for variant in variants:
                out = work / f"{variant}_{target}.onnx"
                print(f"  {entry['name']} {target} onnxprune {variant} ...", flush=True)
                row = {"tool": f"onnxprune {variant}", "target": target}
                row.update(_ours(entry, original, out, target, VARIANTS[variant]))
                if out.exists():
                    macs = scoreboard._macs(out, dims)
                    row["macs_ratio"] = macs / base_macs if macs and base_macs else None
                    goal = macs if variant == "default" or goal is None else goal
                    row["fidelity"] = scoreboard.independent(entry, original, out)
                    written.append((row, out))
                print(f"    {_brief(row)}", flush=True)
                rows.append(row)
            if goal is None or args.skip_onnxsim:
                continue
            out = work / f"onnxsim_{target}.onnx"
            print(f"  {entry['name']} {target} onnxsim ...", flush=True)
            row = {"tool": "onnxsim 0.8", "target": target}
            row.update(_onnxsim(original, out, goal_macs=goal, dims=dims, calib=calib[:64]))
            if out.exists():
                macs = scoreboard._macs(out, dims)
                row["macs_ratio"] = macs / base_macs if macs and base_macs else None
                row["fidelity"] = scoreboard.independent(entry, original, out)
                written.append((row, out))
            print(f"    {_brief(row)}", flush=True)
            rows.append(row)
        if written and args.bench_seconds > 0:
            bench = benchmark(
                [original, *(p for _, p in written)],
                threads=args.threads,
                seconds=args.bench_seconds * (1 + len(written)),
                calib=CACHE / entry["calib"],
                show_progress=False,
            )
            first, *rest = bench.models
            result["latency_ms"] = first.latency_ms.median
            for (row, _), model in zip(written, rest, strict=True):
                row["latency_ms"] = model.latency_ms.median
                ratio = model.paired_ratio_to_first
                if ratio is not None:
                    row["speedup"] = 1 / ratio.ratio
    result["rows"] = rows
    return result


def _brief(row: dict) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    fid = row.get("fidelity", {})
    parts = [f"MACs {row.get('macs_ratio') or 0:.3f}"]
    for key in ("agreement", "cosine", "sqnr_db"):
        if key in fid:
            parts.append(f"{key} {fid[key]:.3f}")
    parts.append(f"{row.get('seconds', 0)} s")
    return ", ".join(parts)


def _number(value: Any) -> float:
    """A metric read back from JSON, where infinity is stored as a string."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _cell(row: dict) -> str:
    if "error" in row:
        return f"error: {row['error'][:80]}"
    fid = row.get("fidelity", {})
    text = []
    if "agreement" in fid:
        text.append(f"**{fid['agreement']:.2f}**")
    text.append(f"cos {_number(fid.get('cosine')):.3f}")
    text.append(f"{_number(fid.get('sqnr_db')):.1f} dB")
    return ", ".join(text)


def markdown(data: dict) -> str:
    lines = [
        "# Structured pruning on the zoo: onnxprune vs onnxsim 0.8 (issue 17)",
        "",
        f"Generated by `python benchmarks/prune_zoo.py` on {data['date']} ({data['machine']}). "
        "Every number is measured on the zoo's **evaluation split** (never used for fitting; "
        "both tools fit on the calibration split) by the scoreboard's own metric code: "
        "agreement (top-1 for classifiers, nearest-neighbour for embeddings), cosine and "
        "SQNR of the output against the unpruned model. MACs by onnxprune's counter with the "
        "first evaluation feed's dims; onnxsim's sparsity is bisected to match onnxprune's "
        "default at each target, then refit by `apply_pruning_finetune`. Speed-up: median "
        "paired latency ratio of one interleaved run per model (onnxruntime CPU, "
        f"{data['threads']} threads); the machine was shared with other jobs "
        f"(load average at start {data['load']}).",
        "",
        "| model | target | tool | MACs kept | fidelity (eval) | speed-up | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in data["models"]:
        ours = {r["target"]: r.get("macs_ratio") for r in model["rows"] if "default" in r["tool"]}
        for row in model["rows"]:
            speed = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
            cell = _cell(row)
            goal, got = ours.get(row["target"]), row.get("macs_ratio")
            if goal is not None and got is not None and got > goal + 0.02:
                cell = f"not comparable: could not reach our MACs ({cell})"
            lines.append(
                f"| {model['model']} | {row['target']} | {row['tool']} | "
                f"{row.get('macs_ratio') or 0:.3f} | {cell} | {speed} | "
                f"{row.get('seconds', '-')} |"
            )
    lines += ["", "## Measured allocation (groups cut, ratio removed; spared groups)", ""]
    for model in data["models"]:
        for row in model["rows"]:
            if row.get("allocation") is not None and row["tool"] == "onnxprune default":
                cut = ", ".join(
                    f"{g.split('.weight')[0]} {r}" for g, r in row["allocation"].items()
                )
                lines.append(f"- {model['model']} @ {row['target']}: {cut}")
                spared = ", ".join(g.split(".weight")[0] for g in row["spared"])
                lines.append(f"  - spared: {spared or 'none'}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=list(DEFAULT_ENTRIES))
    parser.add_argument("--targets", default="0.75,0.5")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--bench-seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-onnxsim", action="store_true")
    parser.add_argument("--output", default=str(RESULTS / "prune_zoo"))
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    start = time.perf_counter()
    data: dict[str, Any] = {
        "schema": "onnxprune.prune_zoo/1",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs",
        "load": round(os.getloadavg()[0], 1),
        "threads": args.threads,
        "models": [],
    }
    output = Path(args.output)
    for entry in _entries(args.only):
        print(entry["name"], flush=True)
        data["models"].append(score(entry, targets, variants, args))
        data["wall_seconds"] = round(time.perf_counter() - start, 1)
        text = json.dumps(json_safe(data), indent=2, allow_nan=False)
        write_text_atomic(output.with_suffix(".json"), text + "\n")
        write_text_atomic(output.with_suffix(".md"), markdown(data))
    print(f"wrote {output}.json and .md in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
