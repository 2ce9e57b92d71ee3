"""Peak resident memory of loading and saving a large external-data model.

Writes a model of ``--gb`` gigabytes of float32 weights (a chain of Add nodes over 256 MiB
initializers, data written in chunks so this script itself stays small), then, in a fresh
child process, runs ``onnxprune.load`` + ``onnxprune.save`` into another folder and reports
the child's peak RSS (``ru_maxrss``) and wall time. Target: a 3 GB model round-trips under
1 GB peak RSS. Output: JSON and Markdown under ``--out``.

    python benchmarks/io_memory.py --gb 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

TENSOR_MB = 256
CHUNK = 16 << 20


def write_model(folder: Path, total_gb: float) -> Path:
    """A model with ``total_gb`` of external weights, written without holding them in memory."""
    n_tensors = max(1, round(total_gb * 1024 / TENSOR_MB))
    numel = TENSOR_MB * (1 << 20) // 4
    data = folder / "weights.bin"
    inits, nodes = [], []
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal(CHUNK // 4).astype(np.float32).tobytes()
    with data.open("wb") as handle:
        for i in range(n_tensors):
            offset = handle.tell()
            for _ in range(TENSOR_MB * (1 << 20) // CHUNK):
                handle.write(chunk)
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[numel])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", offset), ("length", numel * 4)):
                tensor.external_data.add(key=key, value=str(value))
            inits.append(tensor)
            prev = "x" if i == 0 else f"h{i - 1}"
            nodes.append(helper.make_node("Add", [prev, f"w{i}"], [f"h{i}"], name=f"add{i}"))
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [numel])],
        [helper.make_tensor_value_info(f"h{n_tensors - 1}", TensorProto.FLOAT, [numel])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


CHILD = """
import resource, sys, time, json
import onnxprune
t0 = time.perf_counter_ns()
model = onnxprune.load(sys.argv[1])
t1 = time.perf_counter_ns()
onnxprune.save(model, sys.argv[2])
t2 = time.perf_counter_ns()
print(json.dumps({"load_s": (t1 - t0) / 1e9, "save_s": (t2 - t1) / 1e9,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workdir", help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="onnxprune-io-"))
    (work / "in").mkdir(parents=True, exist_ok=True)
    (work / "out").mkdir(exist_ok=True)
    try:
        src = write_model(work / "in", args.gb)
        data_bytes = (work / "in" / "weights.bin").stat().st_size
        dest = work / "out" / "big.onnx"
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(src), str(dest)],
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        out_data = work / "out" / "big.onnx.data"
        result.update(
            {
                "model_gb": data_bytes / 1e9,
                "output_data_bytes": out_data.stat().st_size,
                "same_bytes": filecmp_chunks(work / "in" / "weights.bin", out_data),
                "target_peak_rss_mb": 1024,
                "onnx": onnx.__version__,
                "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"),
            }
        )
        result["pass"] = result["peak_rss_mb"] < 1024 and result["same_bytes"]
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "io_memory.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "io_memory.md").write_text(
        "| model | load s | save s | peak RSS MB | target | data identical |\n"
        "|---|---|---|---|---|---|\n"
        f"| {result['model_gb']:.2f} GB external | {result['load_s']:.2f} | "
        f"{result['save_s']:.2f} | {result['peak_rss_mb']:.0f} | < 1024 | "
        f"{result['same_bytes']} |\n"
    )
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


def filecmp_chunks(a: Path, b: Path) -> bool:
    """Byte-compare two large files chunk by chunk."""
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


if __name__ == "__main__":
    sys.exit(main())
