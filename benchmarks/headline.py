"""Headline benchmark: fp32 / pruned / low-rank / int8 / combined, and onnxruntime's
``quantize_static`` as the baseline, side by side per reference model.

For each model every variant is timed in ONE interleaved ``onnxprune.benchmark`` run
(2 threads, ORT optimizations on, batch 1), so latency ratios share the machine's drift.
Fidelity is measured against the canonical fp32 model on held-out inputs; the digits CNN
also reports accuracy on its real held-out test split. The ImageNet models and the encoder
carry deterministic random-init weights (no model hub is reachable here) and get random
inputs, so for them fidelity is an agreement measure, not an accuracy.

    python benchmarks/headline.py [--models digits,resnet50,mobilenet_v2,encoder]
        [--seconds 20] [--out benchmarks]    # writes benchmarks/RESULTS.md, results/*.json, *.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import onnxprune
from onnxprune.analysis.macs import count_costs
from onnxprune.api import canonicalize_file
from onnxprune.bundled import digits_calibration, digits_model, digits_test_set
from onnxprune.io import source_files
from onnxprune.optimize.data import accuracy, split_calibration

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "models"))


def _calib_for(name: str, folder: Path) -> Path:
    """Calibration inputs: the real digits data, else deterministic random inputs."""
    if name == "digits":
        return digits_calibration()
    rng = np.random.default_rng(0)
    path = folder / f"{name}_calib.npz"
    if name == "encoder":
        ids = rng.integers(0, 30522, size=(24, 1, 128)).astype(np.int64)
        np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))
    else:
        np.savez(path, input=rng.standard_normal((24, 1, 3, 224, 224)).astype(np.float32))
    return path


def _source(name: str, folder: Path) -> Path:
    if name == "digits":
        return digits_model()
    from export import export_model  # type: ignore[import-not-found]

    return Path(export_model(name, "torchscript", folder))


def _ort_baseline(src: Path, dst: Path, calib: Path) -> None:
    """onnxruntime.quantization.quantize_static: QDQ, per-channel, min-max, same data."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    model = onnxprune.load(src)
    data = onnxprune.calib.load_calibration(calib, model)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(data.feeds())

        def get_next(self):
            return next(self._feeds, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)


def _variants(name: str, fp32: Path, fit: Path, folder: Path) -> dict[str, Path]:
    from onnxprune.lowrank.api import lowrank_file
    from onnxprune.lowrank.config import LowRankConfig
    from onnxprune.prune.api import prune_file
    from onnxprune.prune.core import PruneOptions
    from onnxprune.quant.api import quantize_file

    out = {"fp32": fp32}
    timings = {}
    t0 = time.perf_counter()
    prune_file(
        fp32, folder / "pruned.onnx", PruneOptions(target_macs=0.5), calib=fit, reconstruct=True
    )
    out["pruned"] = folder / "pruned.onnx"
    timings["prune_s"] = time.perf_counter() - t0
    conv = None if name == "encoder" else "tucker"
    lowrank_file(
        fp32,
        folder / "lowrank.onnx",
        LowRankConfig(
            target_params=0.5, conv=conv, method="svd-llm" if name == "encoder" else "svd"
        ),
        calib=fit,
    )
    out["lowrank"] = folder / "lowrank.onnx"
    mode = "dynamic" if name == "encoder" else "static"
    quantize_file(fp32, folder / "int8.onnx", calib=fit, method="percentile", mode=mode)
    out["int8"] = folder / "int8.onnx"
    quantize_file(
        out["pruned"], folder / "combined.onnx", calib=fit, method="percentile", mode=mode
    )
    out["pruned+int8"] = folder / "combined.onnx"
    _ort_baseline(fp32, folder / "ort_int8.onnx", fit)
    out["ort quantize_static"] = folder / "ort_int8.onnx"
    return out


def _size(path: Path) -> int:
    return sum(Path(f).stat().st_size for f in source_files(onnxprune.load(path)))


def run_model(name: str, folder: Path, seconds: float) -> dict:
    calib = _calib_for(name, folder)
    fp32 = folder / "fp32.onnx"
    canonicalize_file(_source(name, folder), fp32, calib=calib)
    fit, hold = split_calibration(calib, folder)
    variants = _variants(name, fp32, fit, folder)
    paths = list(variants.values())
    bench = onnxprune.benchmark(
        paths, threads=2, calib=hold, seconds=seconds, warmup=10, show_progress=False
    )
    rows = []
    for (label, path), result in zip(variants.items(), bench.models, strict=True):
        model = onnxprune.load(path)
        costs = count_costs(model, dims={"batch": 1, "seq": 128})
        check = onnxprune.verify(fp32, path, hold, tolerance="cosine>=-1")
        metrics = next(iter(check.outputs.values()))
        ratio = result.paired_ratio_to_first
        rows.append(
            {
                "variant": label,
                "macs": int(costs.total_macs),
                "params": int(costs.total_params),
                "file_bytes": _size(path),
                "median_ms": result.latency_ms.median,
                "speedup": 1.0 if ratio is None else 1 / ratio.ratio,
                "speedup_ci95": None if ratio is None else [1 / ratio.high, 1 / ratio.low],
                "cosine": metrics.get("cosine"),
                "top1_agreement": metrics.get("top1_agreement"),
                "accuracy": accuracy(path, digits_test_set()) if name == "digits" else None,
            }
        )
    return {
        "model": name,
        "system": bench.system.to_dict() if hasattr(bench.system, "to_dict") else None,
        "rows": rows,
    }


def _markdown(results: list[dict]) -> str:
    lines = [
        "# onnxprune headline results",
        "",
        "Regenerate with `python benchmarks/headline.py` (2 threads, ORT CPU, batch 1; all "
        "variants of a model timed in one interleaved run; speedup = 1 / paired median "
        "latency ratio to fp32 with its 95% bootstrap interval).",
        "ImageNet models and the encoder have random-init weights and random inputs: their "
        "fidelity columns measure agreement with fp32, not accuracy. The digits CNN is trained "
        "on real data and its accuracy is on the held-out test split.",
        "",
    ]
    for res in results:
        lines += [
            f"## {res['model']}",
            "",
            "| variant | MACs | params | file | speedup [95% CI] | cosine | top-1 agr. "
            "| accuracy |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            ci = r["speedup_ci95"]
            ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            acc = f"{100 * r['accuracy']:.2f}%" if r["accuracy"] is not None else "-"
            agree = f"{r['top1_agreement']:.3f}" if r["top1_agreement"] is not None else "-"
            lines.append(
                f"| {r['variant']} | {r['macs'] / 1e6:.1f} M | {r['params'] / 1e6:.2f} M | "
                f"{r['file_bytes'] / 1e6:.2f} MB | {r['speedup']:.2f}x{ci_text} | "
                f"{r['cosine']:.4f} | {agree} | {acc} |"
            )
        lines.append("")
    return "\n".join(lines)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for r in res["rows"]:
            ax.scatter(r["speedup"], r["cosine"], label=r["variant"])
        ax.set_title(res["model"])
        ax.set_xlabel("speedup over fp32")
        ax.set_ylabel("cosine to fp32")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,resnet50,mobilenet_v2,encoder")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run_model(name, Path(tmp), args.seconds))
        print(json.dumps(results[-1]["rows"], indent=1))
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / "headline.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "RESULTS.md").write_text(
        _markdown(results) + "\n![fidelity vs speed](results/headline.png)\n"
    )
    _plot(results, out / "results" / "headline.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
