"""Scoreboard: every lossy command on every zoo model, judged on data the fit never saw.

Usage::

    pip install -e ".[zoo]" && python benchmarks/zoo/build.py
    python benchmarks/scoreboard.py [--only NAME ...] [--commands prune75,quantize] \
        [--threads 2] [--bench-seconds 8] [--timeout 900]

For each zoo entry (``benchmarks/zoo/.cache/manifest.json``) and each command at the
standard settings below, the CLI runs as a user would run it (``--calib`` = the zoo's
calibration split, ``--eval`` = its evaluation split, ``--report``). Then:

* **independent measurement**: the original and the written model run in plain
  ``onnxruntime.InferenceSession`` (default options, as deployed) on the evaluation split,
  with this script's own metric code (not onnxprune's comparator): top-1 agreement for
  classifiers, cosine and nearest-neighbour agreement for embeddings, decoded-sequence
  agreement for OCR, exact agreement for labels, SQNR for every model;
* **the command's own report** is read back and its held-out numbers are compared with the
  independent ones (``agrees``: within 0.01 for cosine and agreement, 0.5 dB for SQNR);
* MACs (onnxprune's counter, symbolic dims bound from the evaluation feed), file size, and
  latency ratios from one interleaved ``onnxprune.benchmark`` run of the original and every
  written variant of that model (median, paired 95% interval; 2 threads).

A command that refuses a model (exit 1 or 2, one line on stderr, nothing written) is a
result, recorded with its message; a crash is recorded as a crash. Writes
``benchmarks/results/scoreboard.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxprune import benchmark
from onnxprune.analysis import count_costs
from onnxprune.io import load
from onnxprune.reporting import json_safe

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE / "zoo"))

#: name -> CLI arguments after ``onnxprune COMMAND MODEL -o OUT``.
COMMANDS: dict[str, list[str]] = {
    "prune75": ["prune", "--target-macs", "0.75", "--reconstruct"],
    "prune50": ["prune", "--target-macs", "0.5", "--reconstruct"],
    "sparsify50": ["sparsify", "--sparsity", "0.5", "--update"],
    "sparsify24": ["sparsify", "--pattern", "2:4", "--sparsity", "0.5"],
    "lowrank": ["lowrank", "--target-params", "0.7", "--activation-aware"],
    "quantize": ["quantize"],
    "optimize": ["optimize"],
}

#: Agreement of a command's own report with the independent measurement.
TOLERANCE = {"cosine": 0.01, "agreement": 0.01, "sqnr_db": 0.5}


# ---------------------------------------------------------------- independent measurement


def _feeds(path: Path, model_path: Path) -> list[dict[str, np.ndarray]]:
    """The data's feeds, read with numpy alone (independent of onnxprune's loader).

    An ``.npz`` array with one more axis than the model input gives feeds ``a[i]``, one of
    the input's rank gives ``a[i:i+1]``; a folder gives one feed per file. ``label`` is
    skipped.
    """
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    ranks = {i.name: len(i.shape) for i in session.get_inputs()}
    if path.is_dir():
        feeds = []
        for file in sorted(path.glob("*.npz")):
            with np.load(file) as data:
                feeds.append({k: data[k] for k in data.files if k in ranks})
        return feeds
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k in ranks}
    count = len(next(iter(arrays.values())))
    return [
        {k: np.asarray(a[i] if a.ndim == ranks[k] + 1 else a[i : i + 1]) for k, a in arrays.items()}
        for i in range(count)
    ]


def _run(path: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, list[Any]]:
    options = ort.SessionOptions()  # default optimizations; errors only (no shape warnings)
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out: dict[str, list[Any]] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            out[name].append(value)
    return out


def _matrix(values: list[Any]) -> np.ndarray:
    """Rows of the last axis over all feeds (ZipMap's list of dicts as rows in key order)."""
    rows = []
    for value in values:
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = [[d[k] for k in sorted(d)] for d in value]  # noqa: PLW2901
        a = np.asarray(value)
        rows.append(a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1))
    return np.concatenate(rows).astype(np.float64)


def _sqnr(r: np.ndarray, c: np.ndarray) -> float:
    noise = float(np.sum((r - c) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(r**2)) / noise)


def _cosine(r: np.ndarray, c: np.ndarray) -> float:
    return float(np.dot(r.ravel(), c.ravel()) / (np.linalg.norm(r) * np.linalg.norm(c)))


def _nearest(x: np.ndarray) -> np.ndarray:
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def _ctc(logits: np.ndarray, blank: int) -> tuple[int, ...]:
    """Greedy CTC over ``[T, C]``: best class per step, repeats merged, blanks dropped."""
    best = logits.argmax(-1)
    out, prev = [], -1
    for k in best.tolist():
        if k not in (prev, blank):
            out.append(k)
        prev = k
    return tuple(out)


def _sequences(values: list[np.ndarray], extra: dict[str, Any]) -> list[tuple[int, ...]]:
    time_axis = int(extra.get("time_axis", 0))
    blank = int(extra.get("blank", 0))
    seqs = []
    for v in values:
        a = np.asarray(v, dtype=np.float64)
        a = np.moveaxis(a, time_axis, 0).reshape(a.shape[time_axis], -1)
        seqs.append(_ctc(a, blank))
    return seqs


def independent(entry: dict[str, Any], original: Path, candidate: Path) -> dict[str, Any]:
    """Fidelity of ``candidate`` on the evaluation split, with this script's own code."""
    cache = Path(entry["_cache"])
    feeds = _feeds(cache / entry["eval"], original)
    ref, got = _run(original, feeds), _run(candidate, feeds)
    name = entry["output"]
    metric = entry["metric"]
    result: dict[str, Any] = {"samples": len(feeds), "output": name}
    if metric == "label":
        r = np.concatenate([np.ravel(v) for v in ref[name]])
        c = np.concatenate([np.ravel(v) for v in got[name]])
        result["agreement"] = float(np.mean(r == c))
        return result
    r, c = _matrix(ref[name]), _matrix(got[name])
    result["sqnr_db"] = _sqnr(r, c)
    result["cosine"] = _cosine(r, c)
    if metric == "top1":
        result["agreement"] = float(np.mean(r.argmax(1) == c.argmax(1)))
    elif metric == "embedding":
        result["agreement"] = float(np.mean(_nearest(r) == _nearest(c)))
    elif metric == "sqnr" and "decision_threshold" in entry.get("extra", {}):
        threshold = float(entry["extra"]["decision_threshold"])
        result["agreement"] = float(np.mean((r > threshold) == (c > threshold)))
    elif metric == "sequence":
        seq_r = _sequences(ref[name], entry.get("extra", {}))
        seq_c = _sequences(got[name], entry.get("extra", {}))
        result["agreement"] = float(np.mean([a == b for a, b in zip(seq_r, seq_c, strict=True)]))
    return result


# ------------------------------------------------------------------------ command reports


def _reported(command: str, report: dict[str, Any], output: str) -> dict[str, Any] | None:
    """The held-out numbers the command reported for ``output``."""
    if command == "optimize":
        metrics = (report.get("fidelity") or {}).get(output)
    else:
        metrics = (report.get("fidelity") or {}).get("outputs", {}).get(output)
    if not metrics:
        return None
    return {k: metrics.get(k) for k in ("cosine", "sqnr_db", "top1_agreement", "nn_agreement")}


def _num(value: Any) -> float | None:
    if value is None:
        return None
    return float(value)  # "inf" strings from the JSON too


def agreement_check(entry: dict[str, Any], mine: dict[str, Any], theirs: dict | None) -> dict:
    """Differences between the command's report and the independent measurement."""
    if theirs is None:
        return {"agrees": None, "why": "no fidelity in the report"}
    pairs = {"cosine": ("cosine", "cosine"), "sqnr_db": ("sqnr_db", "sqnr_db")}
    if entry["metric"] in ("top1", "label"):
        pairs["agreement"] = ("agreement", "top1_agreement")
    elif entry["metric"] == "embedding":
        pairs["agreement"] = ("agreement", "nn_agreement")
    diffs: dict[str, float] = {}
    for key, (mine_key, their_key) in pairs.items():
        a, b = _num(mine.get(mine_key)), _num(theirs.get(their_key))
        if a is None or b is None:
            continue
        if math.isinf(a) and math.isinf(b):
            diffs[key] = 0.0
        else:
            diffs[key] = abs(a - b)
    agrees = all(d <= TOLERANCE[k] for k, d in diffs.items()) if diffs else None
    return {"agrees": agrees, "differences": diffs}


# ----------------------------------------------------------------------------- running


def _size(path: Path) -> int:
    data = path.parent / (path.name + ".data")
    return os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)


def _dims(model_path: Path, feed: dict[str, np.ndarray]) -> dict[str, int]:
    dims: dict[str, int] = {}
    try:
        inputs = load(model_path).graph.inputs
    except Exception:  # a model onnxprune cannot load: no MACs, the commands still run
        return dims
    for value in inputs:
        if value.name not in feed or value.shape is None:
            continue
        for dim, size in zip(value.shape, feed[value.name].shape, strict=False):
            if not isinstance(dim, int) and dim.value is not None:
                dims[str(dim.value)] = int(size)
    return dims


def _macs(path: Path, dims: dict[str, int]) -> int | None:
    try:
        return int(count_costs(load(path), dims=dims).total_macs)
    except Exception:  # a model the counter cannot read: MACs unknown
        return None


def run_command(
    name: str, entry: dict[str, Any], original: Path, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    timeout, threads = args.timeout, args.threads
    cache = Path(entry["_cache"])
    out, report = work / f"{name}.onnx", work / f"{name}.json"
    args = [sys.executable, "-m", "onnxprune.cli", COMMANDS[name][0], str(original), "-o",
            str(out), *COMMANDS[name][1:], "--calib", str(cache / entry["calib"]),
            "--eval", str(cache / entry["eval"]), "--report", str(report)]  # fmt: skip
    if name == "optimize":
        args += ["--threads", str(threads)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": timeout}
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"seconds": round(seconds, 1), "exit": proc.returncode}
    if proc.returncode != 0 or not out.exists():
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        crashed = "Traceback" in proc.stderr
        row["status"] = "crash" if crashed else "refused"
        row["message"] = (lines[-1] if lines else "")[:300]
        if out.exists():
            row["status"] = "wrote despite failure"
        return row
    row["status"] = "ok"
    row["path"] = str(out)
    data = json.loads(report.read_text()) if report.exists() else {}
    row["independent"] = independent(entry, original, out)
    row["reported"] = _reported(name, data, entry["output"])
    row["check"] = agreement_check(entry, row["independent"], row["reported"])
    overfit = (data.get("fidelity") or {}).get("overfit") if name != "optimize" else None
    if overfit:
        row["overfit_warning"] = overfit
    return row


def _commit() -> str | None:
    """The onnxprune commit the model was scored with (rows may come from different runs)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _header(entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "metric", "source", "split")
    return {"model" if k == "name" else k: entry[k] for k in keys}


def score_entry(
    entry: dict[str, Any], commands: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    cache = Path(entry["_cache"])
    original = cache / entry["model"]
    feeds = _feeds(cache / entry["eval"], original)
    dims = _dims(original, feeds[0])
    result: dict[str, Any] = {
        **_header(entry),
        "commit": _commit(),
        "dims": dims,
        "macs": _macs(original, dims),
        "bytes": _size(original),
        "commands": {},
    }
    with tempfile.TemporaryDirectory(prefix="scoreboard-") as tmp:
        work = Path(tmp)
        for name in commands:
            print(f"  {entry['name']}: {name} ...", flush=True)
            row = run_command(name, entry, original, work, args)
            if row["status"] == "ok":
                written = Path(row.pop("path"))
                row["macs_ratio"] = _ratio(_macs(written, dims), result["macs"])
                row["size_ratio"] = _size(written) / result["bytes"]
                row["_path"] = str(written)
            print(f"    {_brief(row)}", flush=True)
            result["commands"][name] = row
        written = [(n, r["_path"]) for n, r in result["commands"].items() if "_path" in r]
        if written and args.bench_seconds > 0:
            _latency(result, original, written, cache / entry["calib"], args)
        for row in result["commands"].values():
            row.pop("_path", None)
    return result


def _ratio(a: int | None, b: int | None) -> float | None:
    return None if a is None or not b else a / b


def _latency(result: dict, original: Path, written: list, feed: Path, args) -> None:
    try:
        bench = benchmark(
            [original, *(Path(p) for _, p in written)],
            threads=args.threads,
            seconds=args.bench_seconds * (1 + len(written)),
            calib=feed,
            show_progress=False,
        )
    except Exception as exc:  # recorded; the scores stand without latency
        result["latency_error"] = str(exc)[:300]
        return
    first, *rest = bench.models
    result["latency_ms"] = first.latency_ms.median
    for (name, _), model in zip(written, rest, strict=True):
        ratio = model.paired_ratio_to_first
        row = result["commands"][name]
        row["latency_ms"] = model.latency_ms.median
        if ratio is not None:
            row["speedup"] = 1 / ratio.ratio
            row["speedup_ci"] = [1 / ratio.high, 1 / ratio.low]


def _brief(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('message', '')}"
    ind = row["independent"]
    parts = [f"{k} {v:.4f}" for k, v in ind.items() if isinstance(v, float)]
    return f"ok ({row['seconds']} s): " + ", ".join(parts) + f"; report agrees: {row['check']}"


# ----------------------------------------------------------------------------- output


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _cell(row: dict[str, Any], metric: str) -> str:
    if row["status"] != "ok":
        return f"{row['status']}"
    ind = row["independent"]
    main = ind.get("agreement")
    parts = []
    if main is not None:
        parts.append(f"**{main:.2f}**")
    if ind.get("cosine") is not None and metric in ("embedding",):
        parts.append(f"cos {ind['cosine']:.3f}")
    if ind.get("sqnr_db") is not None:
        parts.append(f"{_fmt(ind['sqnr_db'], 1)} dB")
    speed = row.get("speedup")
    parts.append(f"{speed:.2f}x" if speed else "-")
    if row.get("macs_ratio") is not None:
        parts.append(f"MACs {row['macs_ratio']:.2f}")
    flag = "" if row["check"].get("agrees") in (True, None) else " ⚠report"
    return ", ".join(parts) + flag


def markdown(payload: dict[str, Any]) -> str:
    commands = payload["commands"]
    lines = [
        "# Scoreboard: lossy commands on real models, judged on held-out data",
        "",
        f"Generated by `python benchmarks/scoreboard.py` on {payload['date']} "
        f"({payload['machine']}; onnxruntime {payload['onnxruntime']}, {payload['threads']} "
        "threads). Each cell: the metric on the **evaluation split** (never used for fitting), "
        "measured independently in plain onnxruntime: top-1 agreement with fp32 "
        "(classifiers), nearest-neighbour agreement (embeddings), decoded-sequence agreement "
        "(OCR), exact label agreement (labels), speech/non-speech decision agreement at 0.5 "
        "(voice activity); then SQNR, speed-up over the original (median "
        "of one interleaved run), and the MACs ratio. `refused` = the command declined with "
        "a one-line error and wrote nothing; `⚠report` = the command's own report differs from "
        "the independent measurement by more than 0.01 / 0.5 dB.",
        "",
        "| model | metric | " + " | ".join(commands) + " |",
        "|---|---|" + "---|" * len(commands),
    ]
    for result in payload["models"]:
        cells = [
            _cell(result["commands"][c], result["metric"]) if c in result["commands"] else "-"
            for c in commands
        ]
        lines.append(f"| {result['model']} | {result['metric']} | " + " | ".join(cells) + " |")
    lines += ["", "## Refusals, crashes and warnings", ""]
    for result in payload["models"]:
        for name, row in result["commands"].items():
            if row["status"] != "ok":
                lines.append(f"- {result['model']} / {name}: {row['status']}: {row['message']}")
            elif row.get("overfit_warning"):
                lines.append(f"- {result['model']} / {name}: report warns: "
                             f"{row['overfit_warning']}")  # fmt: skip
    lines += ["", "## Report vs independent measurement", ""]
    lines.append("| model | command | differences (cosine / agreement / SQNR dB) | agrees |")
    lines.append("|---|---|---|---|")
    for result in payload["models"]:
        for name, row in result["commands"].items():
            if row["status"] == "ok":
                diffs = row["check"].get("differences", {})
                text = ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()) or "-"
                lines.append(f"| {result['model']} | {name} | {text} | {row['check']['agrees']} |")
    lines += ["", "## Data splits", ""]
    for result in payload["models"]:
        lines.append(
            f"- **{result['model']}** ({result['source']}; scored at commit "
            f"{result.get('commit') or 'unknown'}): {result['split']}"
        )
    return "\n".join(lines) + "\n"


def _write(args: argparse.Namespace, kept: list, results: list) -> None:
    names = {r["model"] for r in results}
    merged = [r for r in kept if r["model"] not in names] + results
    payload = {
        "schema": "onnxprune.scoreboard/1",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs",
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "commands": list(COMMANDS),
        "settings": COMMANDS,
        "models": sorted(merged, key=lambda r: r["model"]),
    }
    text = json.dumps(json_safe(payload), indent=2, sort_keys=True, allow_nan=False)
    Path(args.out + ".json").write_text(text + "\n")
    Path(args.out + ".md").write_text(markdown(payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="zoo entry names (default: all)")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bench-seconds", type=float, default=4.0, help="per model timed")
    parser.add_argument("--timeout", type=float, default=1200.0, help="per command, seconds")
    parser.add_argument("--out", default=str(RESULTS / "scoreboard"))
    args = parser.parse_args()
    from _common import cache_dir

    cache = cache_dir()
    manifest = json.loads((cache / "manifest.json").read_text())
    entries = manifest["entries"] if isinstance(manifest, dict) else manifest
    commands = [c for c in args.commands.split(",") if c]
    unknown = [c for c in commands if c not in COMMANDS]
    if unknown:
        parser.error(f"unknown command {unknown[0]!r}; known: {', '.join(COMMANDS)}")
    previous = Path(args.out + ".json")
    kept = json.loads(previous.read_text())["models"] if previous.exists() and args.only else []
    results: list[dict[str, Any]] = []
    for entry in entries:
        if args.only and entry["name"] not in args.only:
            continue
        print(f"{entry['name']}", flush=True)
        try:
            results.append(score_entry({**entry, "_cache": str(cache)}, commands, args))
        except Exception as exc:  # the scoreboard's own setup failed: record it, go on
            print(f"  scoreboard error: {exc}", flush=True)
            results.append({**_header(entry), "commands": {}, "error": str(exc)[:300]})
        _write(args, kept, results)  # after every model: a later failure loses nothing
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
