"""int8 static quantization of the zoo's real models: onnxprune vs its peers, on held-out data.

Every tool gets the same float model file and the zoo entry's calibration split; fidelity is
measured on the entry's evaluation split (never fitted on) with the scoreboard's own metric
code (``benchmarks/scoreboard.py``: top-1 agreement, nearest-neighbour agreement for
embeddings, decoded-sequence agreement for OCR, decision agreement for voice activity, plus
pooled cosine and SQNR). Rows:

* ``ours``: ``onnxprune quantize`` with its defaults (``--eval`` given, so the fit uses all
  of calib; calibration cache off), ``ours-nearest`` the same with ``--rounding nearest``
  (plain rounding of the weights, the default before GPTQ rounding), ``ours-minmax`` the
  same with ``--method minmax`` (the default before issue 16), ``ours-budget`` with the
  fidelity goal as ``--budget`` (``top1_agreement>=0.99`` / ``cosine>=0.995``; layers kept
  float in order of measured sensitivity; fitted on the first 3/4 of calib and checked on
  its last quarter, then judged on eval like the others);
* ``ort``: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, uint8
  activations / int8 weights, MinMax), and ``ort+pre`` the same after ``quant_pre_process``;
* ``nncf``: ``nncf.quantize`` with its defaults (``ModelType.TRANSFORMER`` for the sentence
  transformers);
* ``onnxsim``: ``onnxsim.quantize_static(method="auto")``, its per-tensor choice of range
  method (its best static int8 scheme that needs no labels).

Each tool runs in its own subprocess (wall seconds and peak RSS of that process). Latency:
one interleaved run (``onnxprune.bench``, 2 threads, rounds of ``--block`` consecutive runs
per model, medians; the first model is fp32 and ratios are fp32 / candidate, with bootstrap
CIs). Writes ``benchmarks/results/quantize_zoo.json`` and ``.md``. Usage::

    pip install -e ".[bench]"      # nncf, onnxsim (peers, benchmark only)
    python benchmarks/quantize_zoo.py [--only mobilenet_v2.dynamo ...] [--runs 20]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = Path(os.environ.get("ONNXPRUNE_ZOO", HERE / "zoo" / ".cache"))
ENTRIES = (
    "mobilenet_v2.dynamo",
    "mobilenet_v2.torchscript",
    "all_minilm_l6_v2",
    "keras_cnn",
    "ddddocr.beta",
    "silero_vad.op15",
)
TOOLS = (
    "ours",
    "ours-nearest",
    "ours-minmax",
    "ours-budget",
    "ort",
    "ort+pre",
    "nncf",
    "onnxsim",
)
#: Learned rounding (issue 13 item 3), not in the default run: ``ours-adaround`` is ``ours``
#: with ``--refine adaround`` (fitted on all of calib, kept), ``ours-refine-auto`` with
#: ``--refine auto`` (fitted on 3/4 of calib, kept only if its last quarter improves).
REFINE_TOOLS = ("ours-adaround", "ours-refine-auto")
#: ``ours-budget``: the issue's fidelity goal as ``--budget`` (layers kept float until it
#: holds on the calibration data; the held-out check then runs on the eval split).
BUDGETS = {"top1": "top1_agreement>=0.99", "embedding": "cosine>=0.995"}
CHILD_TIMEOUT_S = 1800


def _scoreboard() -> Any:
    spec = importlib.util.spec_from_file_location("scoreboard", HERE / "scoreboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entries() -> dict[str, dict[str, Any]]:
    manifest = json.loads((CACHE / "manifest.json").read_text())
    return {e["name"]: {**e, "_cache": str(CACHE)} for e in manifest["entries"]}


# ------------------------------------------------------------------------------- the tools


def _ort(model: str, out: str, feeds: list[dict], pre: bool) -> None:
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if pre:
        prepared = str(Path(out).with_suffix(".pre.onnx"))
        quant_pre_process(model, prepared)
        model = prepared

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    q.quantize_static(
        model,
        out,
        Reader(),
        quant_format=q.QuantFormat.QDQ,
        per_channel=True,
        activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8,
        calibrate_method=q.CalibrationMethod.MinMax,
    )


def _nncf(model: str, out: str, feeds: list[dict], metric: str) -> None:
    import nncf
    import onnx

    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if metric == "embedding" else {}
    quantized = nncf.quantize(
        onnx.load(model), nncf.Dataset(feeds), subset_size=len(feeds), **kwargs
    )
    onnx.save(quantized, out)


def _onnxsim(model: str, out: str, feeds: list[dict]) -> None:
    import onnx
    import onnxsim

    onnx.save(onnxsim.quantize_static(model, calibration_data=feeds, method="auto"), out)


def _child(args: argparse.Namespace) -> None:
    """Quantize one entry with one tool in this process; print seconds and peak RSS."""
    entry = _entries()[args.entry]
    model = str(CACHE / entry["model"])
    start = time.perf_counter_ns()
    if args.tool.startswith("ours"):
        from onnxprune.quant import quantize_file

        options: dict[str, Any] = {}
        if args.tool == "ours-minmax":
            options["method"] = "minmax"
        elif args.tool == "ours-nearest":
            options["rounding"] = "nearest"
        elif args.tool == "ours-budget":
            options["budget"] = BUDGETS[entry["metric"]]
        elif args.tool == "ours-adaround":
            options["refine"] = "adaround"
        elif args.tool == "ours-refine-auto":
            options["refine"] = "auto"
        # The budget run is fitted and checked on calib alone (its last quarter held out),
        # so the eval split judges it independently here instead of refusing to write.
        held_out = {} if args.tool == "ours-budget" else {"eval_data": CACHE / entry["eval"]}
        done = quantize_file(
            model, args.out, calib=CACHE / entry["calib"], calib_cache=False, **held_out, **options
        )
        details = done.details.to_dict()
        extra_kept = details.get("kept_float")
        extra: dict[str, Any] = {"phases": details.get("seconds", {})}
        rounding = details.get("rounding", {})
        extra["rounding"] = {k: v for k, v in rounding.items() if k != "skipped"}
        if "refine" in options:
            refine = details.get("refine", {})
            extra["refine"] = {k: v for k, v in refine.items() if k != "layers"}
            extra["refine"]["layers"] = len(refine.get("layers", []))
            extra["refine_layers"] = refine.get("layers", [])
        if extra_kept is not None:
            extra["kept_float"] = extra_kept
            extra["sensitivity"] = details.get("sensitivity", [])[:10]
        share = details.get("int8_mac_share") or {}
        extra["int8_mac_share"] = share.get("int8_mac_share")
        extra["islands"] = share.get("islands")
    else:
        feeds = _scoreboard()._feeds(CACHE / entry["calib"], Path(model))
        extra = {}
        if args.tool in ("ort", "ort+pre"):
            _ort(model, args.out, feeds, pre=args.tool == "ort+pre")
        elif args.tool == "nncf":
            _nncf(model, args.out, feeds, entry["metric"])
        else:
            _onnxsim(model, args.out, feeds)
    seconds = (time.perf_counter_ns() - start) / 1e9
    rss = _peak_rss_mb()
    extra["int8_ops"] = _int8_ops(args.out)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss, **extra}))


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, which exec resets (``ru_maxrss`` keeps the forking
    parent's peak, so it would count the benchmark's own sessions)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _int8_ops(path: str) -> int:
    """QuantizeLinear/DequantizeLinear/integer nodes in a written model (0: nothing quantized)."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    kinds = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger")
    return sum(1 for n in proto.graph.node if n.op_type in kinds or n.op_type.startswith("QLinear"))


def _quantize(tool: str, entry: str, out: Path) -> dict[str, Any]:
    script = str(HERE / "quantize_zoo.py")
    cmd = [sys.executable, script, "--child", tool, "--entry", entry, "--out", str(out)]
    try:
        # Its own working folder: quant_pre_process writes temporary files into the cwd.
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            check=False,
            timeout=CHILD_TIMEOUT_S,
            cwd=out.parent,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    if proc.returncode != 0 or not out.exists():
        lines = (proc.stderr or "failed").strip().splitlines()
        return {"error": lines[-1][:300] if lines else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ measuring


def _latency(paths: dict[str, Path], feed: Path, runs: int, block: int) -> dict[str, Any]:
    from onnxprune.bench import benchmark

    res = benchmark(
        [str(p) for p in paths.values()],
        threads=2,
        calib=feed,
        runs=runs,
        warmup=5,
        block=block,
        show_progress=False,
    )
    out = {}
    for label, m in zip(paths, res.models, strict=True):
        ratio = m.ratio_to_first
        out[label] = {
            "median_ms": m.latency_ms.median,
            # ratio_to_first is candidate / fp32 latency: its inverse is the speed-up.
            "speedup_vs_fp32": None if ratio is None else 1 / ratio.ratio,
            "speedup_ci": None if ratio is None else [1 / ratio.high, 1 / ratio.low],
        }
    return out


def _entry_row(name: str, entry: dict[str, Any], folder: Path, args: argparse.Namespace) -> dict:
    board = _scoreboard()
    fp32 = CACHE / entry["model"]
    row: dict[str, Any] = {"entry": name, "metric": entry["metric"], "tools": {}}
    written = {"fp32": fp32}
    for tool in args.tools:
        if tool == "ours-budget" and entry["metric"] not in BUDGETS:
            continue
        out = folder / f"{name}.{tool}.onnx"
        print(f"{name}: {tool} ...", flush=True)
        result = _quantize(tool, name, out)
        if "error" not in result:
            try:
                result["fidelity"] = board.independent(entry, fp32, out)
                written[tool] = out
            except Exception as exc:  # a peer's model onnxruntime cannot run
                result["error"] = f"runs not: {str(exc).splitlines()[0][:200]}"
        row["tools"][tool] = result
        print(f"  {json.dumps(result.get('fidelity', result.get('error')))}", flush=True)
    feed = CACHE / entry["eval"]
    try:
        row["latency"] = _latency(written, feed, args.runs, args.block)
    except Exception as exc:
        row["latency_error"] = str(exc).splitlines()[0][:300]
    return row


# ------------------------------------------------------------------------------- reporting


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# int8 on the zoo: onnxprune vs onnxruntime quantize_static, NNCF, onnxsim",
        "",
        f"Generated by `benchmarks/quantize_zoo.py` at commit {payload['commit']}; "
        f"{payload['machine']}. Fidelity on each entry's **evaluation split** (never fitted "
        "on); agreement = the entry's metric (top-1 / nearest-neighbour / decoded sequence / "
        "speech decision). Speed-up = fp32 median / candidate median from one interleaved "
        f"run (2 threads, {payload['runs']} rounds of {payload['block']} runs), CI from the "
        "bootstrap. Wall time and peak RSS of the quantizing process.",
        "",
        "| entry | tool | agreement | cosine | SQNR dB | speed-up (CI) | median ms | wall s "
        "| peak RSS MB | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        lat = row.get("latency", {})
        fp32 = lat.get("fp32", {})
        lines.append(
            f"| {row['entry']} | fp32 | 1 | 1 | inf | 1 | {_fmt(fp32.get('median_ms'), 2)} | | | |"
        )
        for tool, result in row["tools"].items():
            fid = result.get("fidelity", {})
            t = lat.get(tool, {})
            ci = t.get("speedup_ci")
            speed = (
                f"{_fmt(t.get('speedup_vs_fp32'), 2)} ({_fmt(ci[0], 2)}-{_fmt(ci[1], 2)})"
                if ci
                else "-"
            )
            note = result.get("error", "")
            if result.get("int8_ops") == 0:
                note = "nothing quantized (no Q/DQ or integer op in the output)"
            elif result.get("kept_float") is not None:
                note = f"{len(result['kept_float'])} layer(s) kept float for the budget"
            elif result.get("refine"):
                refine = result["refine"]
                seconds = _fmt(result["phases"].get("refine"), 0)
                note = (
                    f"refine {'applied' if refine.get('applied') else 'not applied'} "
                    f"({refine.get('reason')}; {refine.get('refined', 0)}/"
                    f"{refine.get('layers', 0)} layers), {seconds} s"
                )
            elif tool == "ours" and result.get("islands"):
                kinds = sorted({i["op_type"] for i in result["islands"]})
                note = f"{len(result['islands'])} float island(s): {', '.join(kinds)}"
            elif tool == "ours" and result.get("rounding", {}).get("reason"):
                rounding = result["rounding"]
                done = "applied" if rounding.get("applied") else "not applied"
                note = f"GPTQ rounding {done} ({rounding['reason']})"
            lines.append(
                f"| {row['entry']} | {tool} | {_fmt(fid.get('agreement'))} "
                f"| {_fmt(fid.get('cosine'), 4)} | {_fmt(fid.get('sqnr_db'), 1)} | {speed} "
                f"| {_fmt(t.get('median_ms'), 2)} | {_fmt(result.get('seconds'), 1)} "
                f"| {_fmt(result.get('peak_rss_mb'), 0)} | {note} |"
            )
    return "\n".join(lines + _refine_notes(payload)) + "\n"


def _refine_notes(payload: dict[str, Any]) -> list[str]:
    """Per refined model: how much of each layer's error its own weight rounding is, and
    what the learned rounding did to it (the layer's held-out calibration samples)."""
    lines = []
    for row in payload["rows"]:
        for tool, result in row["tools"].items():
            layers = result.get("refine_layers") or []
            if not layers:
                continue
            before = sum(x["held_out_before"] for x in layers)
            after = sum(
                x["held_out_after"] if x["applied"] else x["held_out_before"] for x in layers
            )
            floor = sum(min(x["error_float_weight"], x["held_out_before"]) for x in layers)
            kept = sum(x["applied"] for x in layers)
            lines.append(
                f"- {row['entry']} {tool}: {kept} of {len(layers)} layers kept the learned "
                f"rounding; summed over layers, the output error (noise / signal, on each "
                f"layer's held-out calibration samples) went {before:.4f} -> {after:.4f}; with "
                f"the float weights on the same int8 inputs it would be {floor:.4f}: the "
                f"layers' own weight rounding is {100 * (before - floor) / max(before, 1e-30):.0f}"
                " % of their error, the rest comes in with their int8 inputs."
            )
    if lines:
        lines = [
            "",
            "Learned rounding, per layer (from the reports). The refined models' graphs are "
            "the unrefined ones' (only int8 values change), so their latency differences above "
            "are the machine's load.",
            "",
            *lines,
        ]
    return lines


def _machine() -> str:
    import onnxruntime

    load = os.getloadavg()
    return (
        f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f} at the start (other jobs were running: latencies are indicative)"
    )


def _commit() -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return proc.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=list(ENTRIES), metavar="ENTRY")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS + REFINE_TOOLS)
    parser.add_argument(
        "--results",
        default="quantize_zoo",
        help="results file stem under benchmarks/results (quantize_refine for the refine rows)",
    )
    parser.add_argument("--runs", type=int, default=20, help="interleaved rounds")
    parser.add_argument("--block", type=int, default=5, help="consecutive runs per round")
    parser.add_argument("--child", choices=TOOLS + REFINE_TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--entry", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.tool = args.child
        _child(args)
        return
    entries = _entries()
    unknown = [n for n in args.only if n not in entries]
    if unknown:
        parser.error(f"no zoo entry {unknown[0]!r}; built: {', '.join(sorted(entries))}")
    payload: dict[str, Any] = {
        "commit": _commit(),
        "machine": _machine(),
        "runs": args.runs,
        "block": args.block,
        "rows": [],
    }
    RESULTS.mkdir(exist_ok=True)
    json_path, md_path = RESULTS / f"{args.results}.json", RESULTS / f"{args.results}.md"
    if json_path.exists():  # keep other entries' rows from an earlier (partial) run
        old = json.loads(json_path.read_text())
        payload["rows"] = [r for r in old.get("rows", []) if r["entry"] not in args.only]
    with tempfile.TemporaryDirectory(prefix="quantize-zoo-") as tmp:
        for name in args.only:
            payload["rows"].append(_entry_row(name, entries[name], Path(tmp), args))
            order = {n: i for i, n in enumerate((*ENTRIES, *args.only))}
            payload["rows"].sort(key=lambda r: order.get(r["entry"], len(order)))
            json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
            md_path.write_text(_markdown(payload))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
