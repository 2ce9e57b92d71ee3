"""int8 static quantization: onnxprune vs onnxruntime.quantization.quantize_static.

Both tools get the same float model file, the same calibration samples and the same range
method; onnxruntime's is run in QDQ format, per-channel, uint8 activations / int8 weights
(its defaults otherwise). Measured in one run:

* latency (onnxprune.bench, interleaved rounds of ``--block`` consecutive runs per model,
  2 threads, onnxruntime optimizations on) of
  fp32 / onnxprune int8 / onnxruntime int8 on ResNet-50, MobileNetV2 and the encoder (plus
  both tools' dynamic int8 on the encoder);
* fidelity: top-1 accuracy of the digits CNN on ``digits_test``; top-1 agreement with fp32
  on held-out inputs for the image models; mean cosine for the encoder;
* quantization wall time, the calibration phase alone (ours: the streaming statistics pass;
  onnxruntime: from ``create_calibrator`` to the end of ``compute_data``, timed by wrapping
  it) and peak RSS, each run in its own subprocess, for minmax and (``--calib-models``)
  percentile and entropy. onnxprune's total also covers its verification run, the u8s8
  remedy choice, bias correction and the equalized candidate; the JSON has its seconds per
  phase.

The reference image models and the encoder have random-ish (seeded, untrained) weights and
the inputs are random: top-1 agreement on them is a harsh proxy (logits are close together),
not ImageNet accuracy. Writes ``benchmarks/results/quantize.json`` and ``.md``. The real
pretrained models of the zoo, judged on held-out data against quantize_static, NNCF and
onnxsim, are ``benchmarks/quantize_zoo.py``'s (``results/quantize_zoo.md``). Usage::

    python benchmarks/quantize.py [--runs 30] [--block 5] [--samples 32]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import onnxprune
from onnxprune.bench import benchmark
from onnxprune.bundled import digits_calibration, digits_model, digits_test_set
from onnxprune.models_cache import reference_model_path
from onnxprune.runtime import make_session

RESULTS = Path(__file__).resolve().parent / "results"
ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def _child(args: argparse.Namespace) -> None:
    """Quantize once in this process; print seconds (total and calibration phase), peak RSS
    and, for onnxprune, its per-phase timings as JSON."""
    start = time.perf_counter_ns()
    result: dict[str, Any] = {}
    if args.tool.startswith("onnxprune"):
        from onnxprune.quant import quantize_file

        smooth = "off" if args.tool == "onnxprune-nosmooth" else "auto"
        mode = "dynamic" if args.tool == "onnxprune-dynamic" else "static"
        done = quantize_file(
            args.model, args.out, calib=args.calib, method=args.method, smooth=smooth, mode=mode
        )
        phases = done.details.to_dict().get("seconds", {})
        result["phases"] = phases
        result["calibration_seconds"] = phases.get("calibrate")
    elif args.tool == "onnxruntime-dynamic":
        from onnxruntime import quantization as q

        q.quantize_dynamic(args.model, args.out, per_channel=True, weight_type=q.QuantType.QInt8)
    elif args.tool == "onnxruntime-pre":  # onnxruntime's recommended flow: pre-process first
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = Path(args.out).with_suffix(".pre.onnx")
        quant_pre_process(args.model, pre)
        result["calibration_seconds"] = _ort_quantize(str(pre), args.out, args.calib, args.method)
        pre.unlink()
    else:
        result["calibration_seconds"] = _ort_quantize(args.model, args.out, args.calib, args.method)
    result["seconds"] = (time.perf_counter_ns() - start) / 1e9
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _ort_quantize(model: str, out: str, calib: str, method: str) -> float:
    """quantize_static; returns the seconds of its calibration phase (from creating the
    calibrator to the end of ``compute_data``, timed by wrapping ``create_calibrator``)."""
    from onnxruntime import quantization as q

    from onnxprune.calib import load_calibration
    from onnxprune.io import load

    # The module (the package re-exports a function of the same name).
    q_module = importlib.import_module("onnxruntime.quantization.quantize")
    data = load_calibration(calib, load(model))
    phase: dict[str, float] = {}
    create = q_module.create_calibrator

    def timed_create(*args: Any, **kwargs: Any) -> Any:
        phase["start"] = time.perf_counter()
        calibrator = create(*args, **kwargs)
        compute = calibrator.compute_data

        def timed_compute() -> Any:
            ranges = compute()
            phase["end"] = time.perf_counter()
            return ranges

        calibrator.compute_data = timed_compute
        return calibrator

    q_module.create_calibrator = timed_create

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = data.feeds()

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
        calibrate_method=getattr(q.CalibrationMethod, ORT_METHODS[method]),
    )
    return phase["end"] - phase["start"]


def _quantize(tool: str, model: Path, out: Path, calib: Path, method: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        tool,
        "--model",
        str(model),
        "--out",
        str(out),
        "--calib",
        str(calib),
        "--method",
        method,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _image_data(folder: Path, samples: int) -> tuple[Path, Path, np.ndarray]:
    rng = np.random.default_rng(0)
    calib = folder / "image_calib.npz"
    np.savez(calib, input=rng.standard_normal((samples, 1, 3, 224, 224)).astype(np.float32))
    held = rng.standard_normal((32, 1, 3, 224, 224)).astype(np.float32)
    bench = folder / "image_bench.npz"
    np.savez(bench, input=held[:1])
    return calib, bench, held


def _encoder_data(folder: Path, samples: int) -> tuple[Path, Path, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    calib = folder / "encoder_calib"
    calib.mkdir()

    def sample(length: int) -> dict[str, np.ndarray]:
        ids = rng.integers(1000, 30000, size=(1, length)).astype(np.int64)
        mask = np.ones((1, length), np.int64)
        mask[0, length - int(rng.integers(0, length // 4 + 1)) :] = 0
        return {"input_ids": ids, "attention_mask": mask}

    for i in range(samples):  # varying token lengths
        np.savez(calib / f"s{i:03d}.npz", **sample(int(rng.integers(16, 129))))
    held = [sample(int(rng.integers(16, 129))) for _ in range(16)]
    bench = folder / "encoder_bench.npz"
    np.savez(bench, **{k: v[None] for k, v in sample(128).items()})
    return calib, bench, held


def _fidelity(fp32: Path, candidate: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    ref = make_session(fp32, optimize=True, intra_op_threads=0)
    cand = make_session(candidate, optimize=True, intra_op_threads=0)
    agree, cosines = [], []
    for feed in feeds:
        r, c = ref.run(None, feed)[0], cand.run(None, feed)[0]
        agree.append(float(np.argmax(r) == np.argmax(c)))
        a, b = r.ravel().astype(np.float64), c.ravel().astype(np.float64)
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return {"top1_agreement": float(np.mean(agree)), "cosine": float(np.mean(cosines))}


def _digits(folder: Path) -> dict[str, Any]:
    test = np.load(digits_test_set())
    result: dict[str, Any] = {}
    paths = {"fp32": digits_model()}
    for tool in ("onnxprune", "onnxruntime"):
        paths[tool] = folder / f"digits_{tool}.onnx"
        result[f"quantize_{tool}"] = _quantize(
            tool, digits_model(), paths[tool], digits_calibration(), "minmax"
        )
    for name, path in paths.items():
        session = make_session(path, optimize=True)
        logits = session.run(None, {"input": test["input"]})[0]
        result[f"top1_{name}"] = float(np.mean(logits.argmax(1) == test["label"]))
    return result


def _latency(paths: dict[str, Path], bench: Path, runs: int, block: int) -> dict[str, Any]:
    """Interleaved latency of every variant (the first is fp32) in one run: per round each
    model runs ``block`` times in a row (median), so it is timed warm, as deployed; single
    alternating runs start each run with another model's weights in cache
    (benchmarks/README.md)."""
    res = benchmark(
        [str(p) for p in paths.values()],
        threads=2,
        calib=bench,
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
            "speedup_vs_fp32": None if ratio is None else 1 / ratio.ratio,
            "ratio_ci": None if ratio is None else [ratio.low, ratio.high],
        }
    return out


def _model_row(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    fp32 = reference_model_path(name, "torchscript")
    if name == "encoder":
        calib, bench, held = _encoder_data(folder, args.samples)
    else:
        calib, bench, images = _image_data(folder, args.samples)
        held = [{"input": x} for x in images]
    row: dict[str, Any] = {"calibration_samples": args.samples}
    tools = ["onnxprune", "onnxruntime", "onnxruntime-pre"]
    if name == "encoder":  # onnxruntime has no SmoothQuant here: show ours without it too;
        # dynamic activation quantization is the usual CPU choice for transformers.
        tools += ["onnxprune-nosmooth", "onnxprune-dynamic", "onnxruntime-dynamic"]
    paths = {"fp32": fp32}
    for tool in tools:
        out = folder / f"{name}_{tool}_minmax.onnx"
        row[f"quantize_minmax_{tool}"] = _quantize(tool, fp32, out, calib, "minmax")
        if out.exists():
            row[f"fidelity_{tool}"] = _fidelity(fp32, out, held)
            row[f"bytes_{tool}"] = out.stat().st_size
            if tool != "onnxprune-nosmooth":
                paths[tool] = out
    row["bytes_fp32"] = fp32.stat().st_size
    row["latency"] = _latency(paths, bench, args.runs, args.block)
    if name in args.calib_models:
        for method in ("percentile", "entropy"):
            for tool in ("onnxprune", "onnxruntime", "onnxruntime-pre"):
                out = folder / f"{name}_{tool}_{method}.onnx"
                row[f"quantize_{method}_{tool}"] = _quantize(tool, fp32, out, calib, method)
                if out.exists():
                    row[f"fidelity_{method}_{tool}"] = _fidelity(fp32, out, held)
    return row


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def _markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# int8 quantization: onnxprune vs onnxruntime.quantization",
        "",
        payload["note"],
        "",
        f"System: {payload['system']}",
        "",
        "Latency (interleaved rounds of blocks of consecutive runs, timed warm; 2 threads, "
        "onnxruntime optimizations on), "
        "speedup over fp32 with its 95% paired-bootstrap interval, and fidelity on held-out "
        "inputs (minmax calibration):",
        "",
        "| model | variant | ms | speedup vs fp32 (95% CI) | fidelity | size MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in payload["models"].items():
        metric = "cosine" if name == "encoder" else "top1_agreement"
        for label, entry in row.get("latency", {}).items():
            ci = entry.get("ratio_ci")
            span = "" if not ci else f" ({1 / ci[1]:.2f}-{1 / ci[0]:.2f})"
            speed = "1 (reference)" if label == "fp32" else _fmt(entry["speedup_vs_fp32"], 2)
            fid = 1.0 if label == "fp32" else row.get(f"fidelity_{label}", {}).get(metric)
            size = row.get(f"bytes_{label}", 0) / 1e6
            lines.append(
                f"| {name} | {label} | {_fmt(entry['median_ms'], 2)} | {speed}"
                f"{span if label != 'fp32' else ''} | {metric} {_fmt(fid, 4)} | {size:.1f} |"
            )
    digits = payload["digits"]
    lines += [
        "",
        f"Digits CNN top-1 on digits_test: fp32 {digits['top1_fp32']:.4f}, onnxprune "
        f"{digits['top1_onnxprune']:.4f}, onnxruntime {digits['top1_onnxruntime']:.4f}",
        "",
        "Quantization cost, each run alone in a fresh process: total wall seconds, the "
        "calibration phase alone (onnxprune: its streaming statistics pass; onnxruntime: "
        "from creating the calibrator to the end of `compute_data`) and peak RSS.",
        "",
        "| model | method | tool | total s | calibration s | peak RSS MB | fidelity |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in payload["models"].items():
        for method in ("minmax", "percentile", "entropy"):
            for tool in _TOOLS:
                q = row.get(f"quantize_{method}_{tool}")
                if q is None:
                    continue
                key = f"fidelity_{tool}" if method == "minmax" else f"fidelity_{method}_{tool}"
                fid = row.get(key, {})
                lines.append(
                    f"| {name} | {method} | {tool} | {_fmt(q.get('seconds'), 1)} | "
                    f"{_fmt(q.get('calibration_seconds'), 1)} | "
                    f"{_fmt(q.get('peak_rss_mb'), 0)} | "
                    f"{q.get('error') or _fmt(fid.get('top1_agreement'), 3)}"
                    f" top1 / {_fmt(fid.get('cosine'), 4)} cos |"
                )
    lines += ["", "Ratios (theirs / ours) where both ran:", ""]
    lines += [f"- {line}" for line in _ratios(payload)]
    return "\n".join(lines) + "\n"


_TOOLS = (
    "onnxprune",
    "onnxprune-nosmooth",
    "onnxruntime",
    "onnxruntime-pre",
    "onnxprune-dynamic",
    "onnxruntime-dynamic",
)


def _ratios(payload: dict[str, Any]) -> list[str]:
    """Calibration-phase and total-time ratios and RSS ratios, per model, method and
    onnxruntime flow."""
    lines = []
    for name, row in payload["models"].items():
        for method in ("minmax", "percentile", "entropy"):
            ours = row.get(f"quantize_{method}_onnxprune", {})
            for tool in ("onnxruntime", "onnxruntime-pre"):
                theirs = row.get(f"quantize_{method}_{tool}", {})
                if "seconds" not in ours or "seconds" not in theirs:
                    continue
                cal = (theirs.get("calibration_seconds") or 0) / (
                    ours.get("calibration_seconds") or 1
                )
                lines.append(
                    f"{name} {method} vs {tool}: calibration {cal:.2f}x faster, total "
                    f"{theirs['seconds'] / ours['seconds']:.2f}x faster, peak RSS "
                    f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f} of theirs"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--block", type=int, default=5, help="consecutive runs per round")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50", "encoder"])
    parser.add_argument("--calib-models", nargs="*", default=["mobilenet_v2", "encoder"])
    for flag in ("--child", "--model", "--out", "--calib", "--method", "--tool"):
        parser.add_argument(flag)
    args = parser.parse_args()
    if args.child:
        args.tool = args.child
        _child(args)
        return
    logging.basicConfig(level=logging.WARNING)
    import onnxruntime as ort

    from onnxprune.quant.vnni import cpu_isa

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxprune-qbench-") as tmp:
        folder = Path(tmp)
        payload: dict[str, Any] = {
            "schema": "onnxprune.bench.quantize/1",
            "note": "Reference models have seeded random-ish weights and inputs are random: "
            "top-1 agreement with fp32 is a harsh proxy, not accuracy. Both tools: QDQ, "
            "per-channel int8 weights, uint8 activations, same samples and method. "
            "onnxprune's total quantize time also covers what onnxruntime does not do: its "
            "verification against fp32, the u8s8 remedy choice (3 candidate builds on AVX2 "
            "without VNNI), bias correction (auto: kept when it helps) and, on depthwise "
            "models, a cross-layer-equalized candidate (a second calibration). "
            "Dynamic rows: onnxprune --mode dynamic vs quantize_dynamic (per-channel int8 "
            "weights), encoder only. 'onnxruntime-pre' rows run onnxruntime's recommended "
            "quant_pre_process (shape inference, graph optimization incl. BatchNorm folding) "
            "before quantize_static; its time is included. onnxprune applies "
            "SmoothQuant (alpha 0.5) automatically to MatMul-heavy models (the encoder); "
            "'onnxprune-nosmooth' rows show it off. onnxruntime's histogram calibrators "
            "cannot take calibration samples of varying token length (the error is shown).",
            "system": f"onnxruntime {ort.__version__}, onnxprune {onnxprune.__version__}, "
            f"cpu {cpu_isa()}",
            "digits": _digits(folder),
            "models": {name: _model_row(name, folder, args) for name in args.models},
        }
    payload["seconds"] = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantize.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    (RESULTS / "quantize.md").write_text(_markdown(payload))
    print(_markdown(payload))


if __name__ == "__main__":
    main()
