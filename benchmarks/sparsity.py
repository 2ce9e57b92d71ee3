"""Weight-sparsity benchmark: magnitude vs Wanda vs Wanda + OBS update, 50 % and 2:4.

Models: the bundled digits CNN (accuracy on ``digits_test.npz``) and the BERT-style
``encoder`` (cosine of ``last_hidden_state`` against the original on held-out random
token sequences; exported with the TorchScript exporter through
``onnxprune.models_cache``, skipped with a note when torch is unavailable). Also compares
the storage formats (dense / sparse_initializer / bitmask) by size and session-load time.

The update is sequential (layer by layer, aiming at the dense model's layer outputs) by
default; on the digits CNN the one-shot update is measured too. Writes
``benchmarks/results/sparsity.json`` and ``.md``. Usage::

    python benchmarks/sparsity.py [--skip-encoder]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import onnxprune
from onnxprune.io import load
from onnxprune.metrics import output_metrics
from onnxprune.runtime import make_session
from onnxprune.sparsity import SparsifyConfig, find_layers, sparsify_file
from onnxprune.sparsity.storage import compare_formats

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(onnxprune.__file__).parent / "data"
CONFIGS = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "wanda+update": {"method": "wanda", "update": True},
}
# The one-shot update (all statistics from the unpruned model) for comparison; digits only,
# as on the encoder it costs as much as the sequential one.
ONE_SHOT = {"wanda+update one-shot": {"method": "wanda", "update": True, "sequential": False}}
PATTERNS = {"50% unstructured": ("unstructured", 0.5), "2:4": ("2:4", 0.5)}

logger = logging.getLogger("bench.sparsity")


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    session = make_session(path)
    return np.concatenate([session.run([name], f)[0] for f in feeds])


def _run_grid(
    model: Path, calib: Path, tmp: Path, score: Any, configs: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    rows = []
    for pattern_name, (pattern, sparsity) in PATTERNS.items():
        for method_name, options in configs.items():
            config = SparsifyConfig(sparsity=sparsity, pattern=pattern, **options)
            out = tmp / f"{model.stem}.{pattern.replace(':', '_')}.{method_name}.onnx"
            start = time.perf_counter_ns()
            result = sparsify_file(model, out, config, calib=calib)
            seconds = (time.perf_counter_ns() - start) / 1e9
            row = {
                "pattern": pattern_name,
                "method": method_name,
                "overall_sparsity": round(result.details.overall_sparsity, 4),
                "size_ratio": round(result.output_bytes / result.input_bytes, 4),
                "input_bytes": result.input_bytes,
                "output_bytes": result.output_bytes,
                "stored_vs_masked_max_abs_error": result.details.stored_vs_masked_max_abs_error,
                "seconds": round(seconds, 2),
                **score(out),
            }
            logger.info("%s %s %s: %s", model.stem, pattern_name, method_name, row)
            rows.append(row)
    return rows


def bench_digits(tmp: Path) -> dict[str, Any]:
    model, calib = DATA / "digits_cnn.onnx", DATA / "digits_calib.npz"
    test = np.load(DATA / "digits_test.npz")
    feeds = [{"input": test["input"]}]
    labels = test["label"]
    reference = _outputs(model, feeds, "logits")

    def score(path: Path) -> dict[str, Any]:
        logits = _outputs(path, feeds, "logits")
        return {
            "accuracy": float(np.mean(logits.argmax(1) == labels)),
            "top1_agreement": float(np.mean(logits.argmax(1) == reference.argmax(1))),
        }

    return {
        "model": "digits CNN (bundled)",
        "metric": "accuracy on digits_test.npz (360 held-out digits)",
        "original_accuracy": float(np.mean(reference.argmax(1) == labels)),
        "rows": _run_grid(model, calib, tmp, score, {**CONFIGS, **ONE_SHOT}),
    }


def _token_feeds(count: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(1000, 30000, size=(count, seq)).astype(np.int64),
        "attention_mask": np.ones((count, seq), dtype=np.int64),
    }


def bench_encoder(tmp: Path) -> dict[str, Any]:
    try:
        from onnxprune.models_cache import reference_model_path

        model = reference_model_path("encoder", "torchscript")
    except Exception as exc:
        return {"model": "encoder", "skipped": f"export unavailable: {exc}"}
    calib = tmp / "encoder_calib.npz"
    np.savez(calib, **_token_feeds(32, 32, seed=0))
    held = _token_feeds(16, 32, seed=1)
    feeds = [{k: v[i : i + 1] for k, v in held.items()} for i in range(16)]
    reference = _outputs(model, feeds, "last_hidden_state")

    def score(path: Path) -> dict[str, Any]:
        metrics = output_metrics(reference, _outputs(path, feeds, "last_hidden_state"))
        return {"cosine": metrics["cosine"], "sqnr_db": metrics["sqnr_db"]}

    return {
        "model": "encoder (BERT-style, 6 layers, hidden 384; torchscript export)",
        "metric": "cosine / SQNR of last_hidden_state vs the original, 16 held-out random "
        "token sequences of length 32 (calibration: 32 other sequences)",
        "rows": _run_grid(model, calib, tmp, score, CONFIGS),
    }


def bench_storage(model_path: Path) -> dict[str, Any]:
    """Storage formats of the magnitude 50 % masked model (sizes and load times)."""
    from onnxprune.sparsity import apply_sparsity

    model = load(model_path)
    layers, _ = find_layers(model)
    apply_sparsity(model, layers, SparsifyConfig(sparsity=0.5))
    return {"model": model_path.name, **compare_formats(model, [lay.weight for lay in layers])}


def _markdown(doc: dict[str, Any]) -> str:
    lines = ["# Weight sparsity benchmark", "", f"System: {doc['system']}", ""]
    for section in doc["models"]:
        lines += [f"## {section['model']}", ""]
        if "skipped" in section:
            lines += [section["skipped"], ""]
            continue
        lines += [f"Metric: {section['metric']}.", ""]
        if "original_accuracy" in section:
            lines += [f"Original accuracy: {section['original_accuracy']:.4f}", ""]
        keys = [
            k
            for k in ("accuracy", "top1_agreement", "cosine", "sqnr_db")
            if k in section["rows"][0]
        ]
        lines += [
            "| pattern | method | sparsity | " + " | ".join(keys) + " | file ratio | exact | s |"
        ]
        lines += ["|" + "---|" * (len(keys) + 6)]
        for r in section["rows"]:
            vals = " | ".join(f"{r[k]:.4f}" for k in keys)
            lines.append(
                f"| {r['pattern']} | {r['method']} | {r['overall_sparsity']:.3f} | {vals} | "
                f"{r['size_ratio']:.3f} | {r['stored_vs_masked_max_abs_error'] == 0} | "
                f"{r['seconds']} |"
            )
        lines.append("")
    lines += ["## Storage formats (magnitude, 50 % per layer)", ""]
    lines += [
        "| model | format | bytes | loads in ORT | load s (opt on) | load s (opt off) |",
        "|---|---|---|---|---|---|",
    ]
    for entry in doc["storage"]:
        for form in ("dense", "sparse_initializer", "bitmask"):
            e = entry[form]
            lines.append(
                f"| {entry['model']} | {form} | {e['bytes']} | {e['loads']} | "
                f"{e.get('load_s_optimized', math.nan):.4f} | "
                f"{e.get('load_s_unoptimized', math.nan):.4f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-encoder", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cpu = platform.processor() or platform.machine()
    system = f"{cpu}, onnxruntime {ort.__version__}, python {sys.version.split()[0]}"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = [bench_digits(tmp)]
        storage = [bench_storage(DATA / "digits_cnn.onnx")]
        if not args.skip_encoder:
            encoder = bench_encoder(tmp)
            models.append(encoder)
            if "skipped" not in encoder:
                from onnxprune.models_cache import reference_model_path

                storage.append(bench_storage(reference_model_path("encoder", "torchscript")))
    doc = {
        "schema": "onnxprune.bench.sparsity/1",
        "system": system,
        "models": models,
        "storage": storage,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sparsity.json").write_text(
        json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"
    )
    (RESULTS / "sparsity.md").write_text(_markdown(doc))
    logger.info("wrote %s", RESULTS / "sparsity.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
