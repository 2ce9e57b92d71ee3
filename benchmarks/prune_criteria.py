"""Which importance criterion to use by default, measured on the zoo (issue 17 item 5).

For each zoo entry, each prunable group is cut *alone* at removed fractions 0.25 and 0.5 by
each criterion (the units it ranks lowest), compensated with the removed channels' means as
``prune --calib`` does, and the model's output is compared with the unpruned one on
**evaluation** feeds (statistics and means come from calibration feeds only): the error is
the noise-to-signal ratio ``nsr = sum (y' - y)^2 / sum y^2``. Criteria:

* ``l2``: weight norms (no data);
* ``activation``: mean ``|a|`` of the producer's output;
* ``wanda``: ``||x_u||^2 ||w_u||^2`` at the consumer (structured Wanda, squared);
* ``flap``: ``Var(x_u) ||w_u||^2`` (FLAP's fluctuation; its mean is compensated);
* ``reconstruction``: ThiNet greedy on the consumer's output change (interactions included).

Groups are typed by what produces their channels: ``conv`` (one Conv), ``shared`` (several
producers tied by a residual Add or Concat), ``matmul`` (a MatMul/Gemm: transformer FFN).
Writes ``benchmarks/results/prune_criteria.{json,md}``: per type and criterion the summed
nsr and the number of groups where the criterion is best.

    python benchmarks/prune_criteria.py [--only keras_cnn ...] [--samples 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scoreboard
from onnxprune.io.atomic import write_text_atomic
from onnxprune.prune.activations import activation_stats, reconstruction_stats
from onnxprune.prune.analysis import analyze
from onnxprune.prune.sensitivity import load_canonical, measure_sensitivity, measured_means

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("ONNXPRUNE_ZOO", Path(__file__).resolve().parent / "zoo" / ".cache"))
CRITERIA = ("l2", "activation", "wanda", "flap", "reconstruction")
RATIOS = (0.25, 0.5)
ENTRIES = ("keras_cnn", "mobilenet_v2.dynamo", "all_minilm_l6_v2")


def _kind(model, group) -> str:
    """conv / matmul / shared: what produces the group's channels (a depthwise conv passes
    channels through and does not count as a producer)."""
    weights = {}
    for n in model.graph:
        if len(n.inputs) > 1 and n.inputs[1] is not None:
            grouped = n.op_type == "Conv" and (g := n.attributes.get("group")) and g.value > 1
            weights[n.inputs[1].name] = "depthwise" if grouped else n.op_type
    producers = set()
    for name, axis in group.initializers:
        op = weights.get(name)
        if (op == "Conv" and axis == 0) or (op in ("MatMul", "Gemm") and axis == 1):
            producers.add(name)
    if len(producers) > 1:
        return "shared"
    ops = {weights.get(p) for p in producers}
    return "matmul" if ops & {"MatMul", "Gemm"} else "conv"


def _stats(model, criterion: str, feeds: list) -> Any:
    analysis = analyze(model)
    if criterion == "activation":
        return activation_stats(model, analysis, feeds, criterion)
    if criterion in ("wanda", "flap", "reconstruction"):
        return reconstruction_stats(model, analysis, feeds, centered=criterion == "flap")
    return None


def measure(entry: dict, samples: int) -> dict:
    original = CACHE / entry["model"]
    calib = scoreboard._feeds(CACHE / entry["calib"], original)[:samples]
    held = scoreboard._feeds(CACHE / entry["eval"], original)[:samples]
    model = load_canonical(original)
    analysis = analyze(model)
    kinds = {g.id: _kind(model, g) for g in analysis.prunable}
    means = measured_means(model, analysis, calib)
    curves: dict[str, dict[str, list[float]]] = {}
    for criterion in CRITERIA:
        start = time.perf_counter()
        result = measure_sensitivity(
            model,
            held,
            ratios=RATIOS,
            criterion=criterion,
            activation_stats=_stats(model, criterion, calib),
            measured=means,
            threads=2,
        )
        curves[criterion] = {r["id"]: [p["nsr"] for p in r["points"]] for r in result.groups}
        print(f"  {criterion}: {time.perf_counter() - start:.0f} s", flush=True)
    return {"model": entry["name"], "samples": len(held), "kinds": kinds,
            "summary": summarize(kinds, curves), "curves": curves}  # fmt: skip


def summarize(kinds: dict[str, str], curves: dict[str, dict[str, list[float]]]) -> dict:
    """Per group type and removed fraction: summed nsr per criterion and the wins."""
    summary: dict[str, dict[str, Any]] = {}
    for kind in sorted(set(kinds.values())):
        ids = [g for g, k in kinds.items() if k == kind]
        row: dict[str, Any] = {"groups": len(ids)}
        for i, ratio in enumerate(RATIOS):
            sums = {c: sum(curves[c][g][i] for g in ids) for c in CRITERIA}
            wins = dict.fromkeys(CRITERIA, 0)
            for g in ids:
                wins[min(CRITERIA, key=lambda c, g=g, i=i: curves[c][g][i])] += 1
            row[str(ratio)] = {"nsr_sum": sums, "best_in": wins}
        summary[kind] = row
    return summary


def markdown(data: dict) -> str:
    lines = [
        "# Importance criteria measured on the zoo (issue 17 item 5)",
        "",
        f"Generated by `python benchmarks/prune_criteria.py` on {data['date']}. Each group cut "
        "alone (removed fraction 0.25 / 0.5), means compensated from calibration feeds, "
        "error measured on **evaluation** feeds: summed output nsr over the groups of a type "
        "(lower is better) and in how many groups the criterion was best.",
        "",
        "| model | type (groups) | removed | " + " | ".join(CRITERIA) + " |",
        "|---|---|---|" + "---|" * len(CRITERIA),
    ]
    for model in data["models"]:
        for kind, row in model["summary"].items():
            for ratio in RATIOS:
                cell = row[str(ratio)]
                best = min(cell["nsr_sum"].values())
                values = []
                for c in CRITERIA:
                    text = f"{cell['nsr_sum'][c]:.3g} ({cell['best_in'][c]})"
                    values.append(f"**{text}**" if cell["nsr_sum"][c] == best else text)
                lines.append(
                    f"| {model['model']} | {kind} ({row['groups']}) | {ratio} | "
                    + " | ".join(values)
                    + " |"
                )
    return "\n".join(lines) + "\n"


def _retype(output: Path) -> int:
    data = json.loads(output.with_suffix(".json").read_text())
    manifest = json.loads((CACHE / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["entries"]}
    for model_data in data["models"]:
        model = load_canonical(CACHE / entries[model_data["model"]]["model"])
        kinds = {g.id: _kind(model, g) for g in analyze(model).prunable}
        model_data["kinds"] = kinds
        model_data["summary"] = summarize(kinds, model_data["curves"])
    write_text_atomic(output.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
    write_text_atomic(output.with_suffix(".md"), markdown(data))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=list(ENTRIES))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--output", default=str(RESULTS / "prune_criteria"))
    parser.add_argument(
        "--retype", action="store_true", help="recompute group types and summaries of --output"
    )
    args = parser.parse_args()
    if args.retype:
        return _retype(Path(args.output))
    manifest = json.loads((CACHE / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["entries"]}
    data: dict[str, Any] = {
        "schema": "onnxprune.prune_criteria/1",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "models": [],
    }
    output = Path(args.output)
    for name in args.only:
        print(name, flush=True)
        data["models"].append(measure(entries[name], args.samples))
        write_text_atomic(output.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
        write_text_atomic(output.with_suffix(".md"), markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
