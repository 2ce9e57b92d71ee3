"""Speed of canonicalized models against their originals, measured side by side.

Models: an OCR-recognizer-like backbone written the way some exporters (Paddle) emit it
(Conv without bias, then a per-channel Mul and Add affine block, then HardSwish decomposed
into ``x * HardSigmoid(x)``), built here with onnx.helper; and the reference models from
``models/`` in both torch exporters when torch is installed. For each: canonicalize, check
the outputs (max abs error), and run ``onnxprune.benchmark`` on original and canonical,
interleaved, 2 threads, ORT optimizations on (what users deploy), reporting the median
latency ratio with its paired bootstrap 95% interval. A second column repeats the pair with
onnxruntime's ORT_ENABLE_BASIC level (sessions built here directly, half the time): there
ORT's own Conv+Mul/Add and HardSwish fusions are off, so it shows what canonicalization adds
for deployments that do not run ORT's extended optimizers.

    python benchmarks/canonicalize.py --out benchmarks/results [--models ocr,resnet50,...]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.api import canonicalize_file
from onnxprune.bench.inputs import bench_feed
from onnxprune.bench.stats import paired_ratio_ci
from onnxprune.calib import model_input_specs


def _affine_block(nodes, inits, rng, x, *, c_in, c_out, k, stride, group, act, name):
    w = rng.standard_normal((c_out, c_in // group, k, k)).astype(np.float32) * 0.2
    scale = (rng.uniform(0.5, 1.5, (1, c_out, 1, 1))).astype(np.float32)
    shift = (rng.standard_normal((1, c_out, 1, 1)) * 0.1).astype(np.float32)
    for suffix, arr in (("w", w), ("s", scale), ("t", shift)):
        inits.append(numpy_helper.from_array(arr, f"{name}_{suffix}"))
    pad = k // 2
    nodes += [
        helper.make_node(
            "Conv",
            [x, f"{name}_w"],
            [f"{name}_c"],
            group=group,
            strides=[stride, stride],
            pads=[pad] * 4,
            kernel_shape=[k, k],
        ),
        helper.make_node("Mul", [f"{name}_c", f"{name}_s"], [f"{name}_m"]),
        helper.make_node("Add", [f"{name}_m", f"{name}_t"], [f"{name}_a"]),
    ]
    if act == "hswish":
        nodes += [
            helper.make_node("HardSigmoid", [f"{name}_a"], [f"{name}_hs"], alpha=1 / 6, beta=0.5),
            helper.make_node("Mul", [f"{name}_a", f"{name}_hs"], [f"{name}_y"]),
        ]
    else:
        nodes.append(helper.make_node("Relu", [f"{name}_a"], [f"{name}_y"]))
    return f"{name}_y"


def ocr_like(path: Path) -> Path:
    """A MobileNetV3-style recognizer backbone on a 48x320 text line, Paddle-style ops."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    block = {"nodes": nodes, "inits": inits, "rng": rng}
    x = _affine_block(
        **block, x="x", c_in=3, c_out=16, k=3, stride=2, group=1, act="hswish", name="stem"
    )
    channels = 16
    plan = [(64, 24, 1), (72, 24, 1), (96, 40, 2), (240, 40, 1), (240, 80, 2), (480, 96, 1)]
    for i, (hidden, out, stride) in enumerate(plan):
        e = _affine_block(
            **block,
            x=x,
            c_in=channels,
            c_out=hidden,
            k=1,
            stride=1,
            group=1,
            act="hswish",
            name=f"b{i}e",
        )
        d = _affine_block(
            **block,
            x=e,
            c_in=hidden,
            c_out=hidden,
            k=3,
            stride=stride,
            group=hidden,
            act="hswish",
            name=f"b{i}d",
        )
        x = _affine_block(
            **block,
            x=d,
            c_in=hidden,
            c_out=out,
            k=1,
            stride=1,
            group=1,
            act="relu",
            name=f"b{i}p",
        )
        channels = out
    graph = helper.make_graph(
        nodes,
        "ocr_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 48, 320])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


def _reference(name: str, exporter: str, folder: Path) -> Path | None:
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
        from export import export_model  # type: ignore[import-not-found]
    except ImportError:
        return None
    return Path(export_model(name, exporter, folder))


def _basic_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def basic_ratio(src: Path, dst: Path, dims: dict, seconds: float) -> list[float]:
    """Paired ratio canonical/original at ORT_ENABLE_BASIC: ``[ratio, low, high]``."""
    feed = bench_feed(model_input_specs(onnxprune.load(src)), dims=dims, seed=0)
    sessions = [_basic_session(src), _basic_session(dst)]
    for session in sessions:
        for _ in range(10):
            session.run(None, feed)
    latencies: list[list[float]] = [[], []]
    order, rng = [0, 1], random.Random(0)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        rng.shuffle(order)
        for i in order:
            start = time.perf_counter_ns()
            sessions[i].run(None, feed)
            latencies[i].append((time.perf_counter_ns() - start) / 1e6)
    ci = paired_ratio_ci(*latencies, seed=0)
    return [ci.ratio, ci.low, ci.high]


def measure(src: Path, folder: Path, seconds: float) -> dict:
    dst = folder / (src.stem + ".canonical.onnx")
    dims = {"batch": 1, "seq": 128}
    result = canonicalize_file(src, dst, dims=dims)
    bench = onnxprune.benchmark([src, dst], threads=2, dims=dims, seconds=seconds, warmup=10)
    first, second = bench.models
    ratio = second.paired_ratio_to_first
    nodes = [len(onnxprune.load(p).graph) for p in (src, dst)]
    worst = max(m["max_abs_error"] or 0 for m in result.check.outputs.values())
    basic = basic_ratio(src, dst, dims, seconds / 2)
    return {
        "model": src.stem,
        "nodes": nodes,
        "median_ms": [first.latency_ms.median, second.latency_ms.median],
        "speedup": 1 / ratio.ratio,
        "speedup_ci95": [1 / ratio.high, 1 / ratio.low],
        "speedup_basic": 1 / basic[0],
        "speedup_basic_ci95": [1 / basic[2], 1 / basic[1]],
        "max_abs_error": worst,
    }


NOTES = [
    "Speedup = original / canonical median latency (> 1 is faster); 2 threads, batch 1, seq 128;",
    "paired bootstrap 95% interval over interleaved rounds. The ORT_ENABLE_BASIC column runs half",
    "as long, sessions built directly: level-1 rewrites only (constant folding, redundant nodes,",
    "Conv+BatchNorm/Mul/Add), none of the extended fusions (Gelu, LayerNorm, Conv+activation).",
    "",
    "- ocr_like: onnxruntime already folds the Conv -> Mul -> Add chains itself, at both levels",
    "  (level-1 Conv+Mul/Add fusion), and with ORT_ENABLE_ALL also fuses x * HardSigmoid(x) into",
    "  the Conv (19 Conv left). The graphs ORT runs are identical for original and canonical at",
    "  both levels (ORT 1.31.1), so ~1.00x is expected; any deviation in that row is noise.",
    "- encoder.torchscript was 0.90-0.95x before this fix: canonicalize saved the shapes it",
    "  inferred (value_info with generated symbolic dims), which let ORT fuse Add + Add +",
    "  LayerNormalization into SkipLayerNormalization, several times slower than the unfused ops",
    "  on this CPU. canonicalize now keeps only the annotations the input had",
    "  (src/onnxprune/passes/_annotations.py).",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--models", default="ocr,resnet50,mobilenet_v2,encoder,detector")
    parser.add_argument("--exporters", default="torchscript,dynamo")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            sources = (
                [ocr_like(folder / "ocr_like.onnx")]
                if name == "ocr"
                else [_reference(name, exp, folder) for exp in args.exporters.split(",")]
            )
            for src in sources:
                if src is None:
                    continue
                rows.append(measure(src, folder, args.seconds))
                print(json.dumps(rows[-1]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"schema": "onnxprune.bench.canonicalize/1", "threads": 2, "rows": rows}
    (out / "canonicalize.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "| model | nodes before -> after | median ms before -> after (ENABLE_ALL) "
        "| speedup ORT_ENABLE_ALL [95% CI] | speedup ORT_ENABLE_BASIC [95% CI] | max abs err |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['nodes'][0]} -> {r['nodes'][1]} | "
            f"{r['median_ms'][0]:.2f} -> {r['median_ms'][1]:.2f} | {r['speedup']:.2f}x "
            f"[{r['speedup_ci95'][0]:.2f}, {r['speedup_ci95'][1]:.2f}] | "
            f"{r['speedup_basic']:.2f}x "
            f"[{r['speedup_basic_ci95'][0]:.2f}, {r['speedup_basic_ci95'][1]:.2f}] | "
            f"{r['max_abs_error']:.1e} |"
        )
    lines += ["", *NOTES]
    (out / "canonicalize.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
