"""Noise floor of ``onnxprune bench``: the same ResNet-50 benchmarked against itself.

Exports ResNet-50 (``models/export.py``, TorchScript exporter, cached in ``--model-dir``),
then runs ``onnxprune bench resnet50.onnx resnet50.onnx --threads T --batch 1 --seconds 90``
through the CLI. Two identical models must come out with a latency ratio whose 95% bootstrap
interval lies within [0.95, 1.05]. Both ratios of the report are checked and printed: the
ratio of medians and the paired ratio (median of per-round ratios, robust to drift between
rounds); the exit status follows the paired one (1 when outside). Output under ``--out``:
``same_model.json`` (the full ``onnxprune.bench/1`` report) and ``same_model.md``
(the bench table plus the check and the wall time).

    python benchmarks/bench_same_model.py --threads 2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from onnxprune.cli import main as onnxprune_main
from onnxprune.io.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
BOUNDS = (0.95, 1.05)


def _export_resnet50(model_dir: Path) -> Path:
    path = model_dir / "resnet50.torchscript.onnx"
    if path.is_file():
        return path
    spec = importlib.util.spec_from_file_location(
        "onnxprune_models_export", ROOT / "models/export.py"
    )
    if spec is None or spec.loader is None:
        raise SystemExit("cannot load models/export.py")
    export = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = export  # dataclasses look their module up there
    spec.loader.exec_module(export)
    return Path(export.export_model("resnet50", "torchscript", model_dir))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--runs", type=int, help="interleaved rounds instead of --seconds")
    count.add_argument(
        "--seconds", type=float, default=90.0, help="measuring time (90: the whole check < 2 min)"
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/onnxprune-models"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.model_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter_ns()
    model = _export_resnet50(args.model_dir)
    export_s = (time.perf_counter_ns() - start) / 1e9
    json_path, md_path = args.out / "same_model.json", args.out / "same_model.md"
    command = [
        "bench", str(model), str(model), "--threads", str(args.threads), "--batch", "1",
        *(["--runs", str(args.runs)] if args.runs else ["--seconds", str(args.seconds)]),
        "--warmup", str(args.warmup),
        "--json", str(json_path), "--markdown", str(md_path),
    ]  # fmt: skip
    start = time.perf_counter_ns()
    code = onnxprune_main(command)
    bench_s = (time.perf_counter_ns() - start) / 1e9
    if code != 0:
        return code
    second = json.loads(json_path.read_text())["models"][1]
    lines = [f"\n## Check\n\n- command: `onnxprune {' '.join(command[:-4])}`"]
    verdicts = {}
    for key, name in (
        ("ratio_to_first", "ratio of medians"),
        ("paired_ratio_to_first", "paired ratio"),
    ):
        ratio = second[key]
        verdicts[key] = BOUNDS[0] <= ratio["low"] and ratio["high"] <= BOUNDS[1]
        lines.append(
            f"- same-model {name} {ratio['ratio']:.4f}, 95% CI [{ratio['low']:.4f}, "
            f"{ratio['high']:.4f}]: {'within' if verdicts[key] else 'NOT within'} "
            f"[{BOUNDS[0]}, {BOUNDS[1]}]"
        )
    lines.append(
        f"- wall time of the bench command: {bench_s:.1f} s (export/cache: {export_s:.1f} s)\n"
    )
    summary = "\n".join(lines)
    write_text_atomic(md_path, md_path.read_text() + summary)
    sys.stdout.write(summary)
    return 0 if verdicts["paired_ratio_to_first"] else 1


if __name__ == "__main__":
    sys.exit(main())
