"""Low-rank factorization benchmark: speed and fidelity on the reference encoder and ResNet-50.

1. BERT-style encoder (``models/export.py``, hidden 384, FFN 1536): all attention and FFN
   projections (the pooler excluded) factorized to half their parameters
   (``target_params=0.5``) with plain SVD, then with SVD-LLM whitening at the *same ranks*
   (replayed through ``layer_ranks``). ORT CPU latency (``onnxprune.bench.benchmark``:
   2 threads, interleaved rounds, medians) and fidelity on held-out token feeds.
2. ResNet-50 (BatchNorm folded by ``canonicalize`` first): k x k convs by Tucker-2 and by
   the depthwise-separable conversion at half their parameters; latency and fidelity.
3. One linear layer with correlated inputs: relative output error of plain SVD, SVD-LLM and
   ASVD at equal ranks (the reference models have random weights and nearly isotropic
   activations, where activation-aware methods cannot show their advantage).

    python benchmarks/lowrank.py --out benchmarks/results

Writes ``lowrank.json`` and ``lowrank.md`` under ``--out``.
"""

from __future__ import annotations

import os

# Many-threaded BLAS SVDs oversubscribe a busy machine badly (seconds instead of 0.15 s for
# a 384 x 1536 SVD); the factorization itself is not what is timed here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxprune.bench import benchmark
from onnxprune.calib import load_calibration
from onnxprune.fidelity import compare
from onnxprune.io import load, save
from onnxprune.io.atomic import write_text_atomic
from onnxprune.lowrank import LowRankConfig, decompose, lowrank_file
from onnxprune.lowrank.whiten import InputStats
from onnxprune.passes import pipeline

ROOT = Path(__file__).resolve().parent.parent
SEQ = 128


def _export(name: str, model_dir: Path) -> Path:
    path = model_dir / f"{name}.torchscript.onnx"
    if path.is_file():
        return path
    spec = importlib.util.spec_from_file_location(
        "onnxprune_models_export", ROOT / "models/export.py"
    )
    if spec is None or spec.loader is None:
        raise SystemExit("cannot load models/export.py")
    module = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return Path(module.export_model(name, "torchscript", model_dir))


def _token_calib(path: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 30522, size=(count, 1, SEQ), dtype=np.int64)
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))
    return path


def _image_calib(path: Path, count: int, seed: int) -> Path:
    x = np.random.default_rng(seed).standard_normal((count, 1, 3, 224, 224)).astype(np.float32)
    np.savez(path, input=x)
    return path


def _speed(paths: list[Path], dims: dict[str, int], runs: int, threads: int) -> list[dict]:
    result = benchmark([str(p) for p in paths], threads=threads, dims=dims, runs=runs, warmup=5)
    rows = []
    for model in result.models:
        ratio = model.ratio_to_first
        rows.append(
            {
                "model": model.label,
                "median_ms": model.latency_ms.median,
                "speedup": None if ratio is None else 1.0 / ratio.ratio,
                "ratio_ci95": None if ratio is None else [ratio.low, ratio.high],
            }
        )
    return rows


def _variant(src: Path, out: Path, config: LowRankConfig, calib: Path | None) -> dict:
    start = time.perf_counter_ns()
    res = lowrank_file(src, out, config, calib=calib)
    data = res.to_dict()
    return {
        "path": str(out),
        "rewrite_s": (time.perf_counter_ns() - start) / 1e9,
        "params": data["params"],
        "macs": data["macs"],
        "layers": len(res.details.layers),
        "ranks": {layer.node: layer.ranks for layer in res.details.layers},
        "fidelity": data["fidelity"],
        "shared_energy": data["lowrank"]["shared_energy"],
    }


def run_encoder(model_dir: Path, work: Path, runs: int, threads: int) -> dict:
    src = _export("encoder", model_dir)
    calib = _token_calib(work / "enc_calib.npz", 16, seed=0)
    held_out = _token_calib(work / "enc_test.npz", 4, seed=1)
    dims = {"batch": 1, "seq": SEQ}
    common = {"exclude": ("/pooler/Gemm",), "dims": dims}
    plain = _variant(
        src, work / "enc_svd.onnx", LowRankConfig(target_params=0.5, **common), held_out
    )
    ranks = {node: tuple(r) for node, r in plain["ranks"].items()}
    aware_cfg = LowRankConfig(layer_ranks=ranks, method="svd-llm", **common)
    # Statistics come from --calib; fidelity is then measured on the same (training) feeds,
    # so measure both variants again on held-out feeds below.
    aware = _variant(src, work / "enc_svdllm.onnx", aware_cfg, calib)
    feeds = list(load_calibration(held_out, load(src)).feeds())
    for variant in (plain, aware):
        variant["fidelity_held_out"] = compare(src, variant["path"], feeds).worst_feed
    speed = _speed([src, Path(plain["path"]), Path(aware["path"])], dims, runs, threads)
    return {"plain_svd": plain, "svd_llm_equal_ranks": aware, "speed": speed, "dims": dims}


def run_resnet(model_dir: Path, work: Path, runs: int, threads: int) -> dict:
    base = work / "resnet50_bnfolded.onnx"
    model = load(_export("resnet50", model_dir))
    pipeline.canonicalize(model)
    save(model, base)
    calib = _image_calib(work / "img_calib.npz", 4, seed=0)
    out = {}
    for kind in ("tucker", "separable"):
        config = LowRankConfig(target_params=0.5, conv=kind, exclude=("/fc/Gemm",))
        out[kind] = _variant(base, work / f"resnet50_{kind}.onnx", config, calib)
    paths = [base, Path(out["tucker"]["path"]), Path(out["separable"]["path"])]
    out["speed"] = _speed(paths, {"batch": 1}, runs, threads)
    return out


def run_correlated_layer(seed: int = 0) -> dict:
    """Output error at equal ranks on a 768 -> 768 layer with correlated, uneven inputs."""
    rng = np.random.default_rng(seed)
    k = n = 768
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    mix = rng.standard_normal((k, k)) * np.logspace(0, -2, k)[:, None]
    scales = np.exp(rng.standard_normal(k))  # uneven channel magnitudes (outlier channels)
    train = (rng.standard_normal((4096, k)) @ mix) * scales
    test = (rng.standard_normal((1024, k)) @ mix) * scales
    stats = InputStats.empty(k)
    stats.update(train)
    rows = []
    for rank in (32, 64, 128, 256):
        row: dict = {"rank": rank}
        for method in ("svd", "svd-llm", "asvd"):
            a, b = decompose(w, method, None if method == "svd" else stats).factors(rank)
            ref = test @ w
            row[method] = float(np.linalg.norm(ref - test @ a @ b) / np.linalg.norm(ref))
        rows.append(row)
    return {"shape": [k, n], "train_rows": 4096, "test_rows": 1024, "relative_error": rows}


def _markdown(report: dict) -> str:
    lines = ["# Low-rank factorization benchmark", ""]
    lines += [f"onnxruntime {report['onnxruntime']}, {report['threads']} intra-op threads, "
              f"{report['runs']} interleaved rounds; weights are random init (no trained "
              "checkpoints), so fidelity at rank cuts is poor by construction.", ""]  # fmt: skip
    lines += ["## Encoder (half the projection params)", "",
              "| variant | params / MACs kept | median ms | speedup [95% CI] | cosine (held-out) "
              "| SQNR dB |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    enc = report["encoder"]
    variants = [("original", None), ("plain SVD", enc["plain_svd"]),
                ("SVD-LLM (same ranks)", enc["svd_llm_equal_ranks"])]  # fmt: skip
    for (name, var), speed in zip(variants, enc["speed"], strict=True):
        lines.append(_row(name, var, speed, "fidelity_held_out", "last_hidden_state"))
    lines += ["", "## ResNet-50 (BN folded; k x k convs at half their params)", "",
              "| variant | params / MACs kept | median ms | speedup [95% CI] | cosine | SQNR dB |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    res = report["resnet50"]
    variants = [("original", None), ("Tucker-2", res["tucker"]), ("separable", res["separable"])]
    for (name, var), speed in zip(variants, res["speed"], strict=True):
        lines.append(_row(name, var, speed, "fidelity", "logits"))
    lines += ["", "## One layer, correlated inputs: relative output error at equal rank", "",
              "| rank | plain SVD | SVD-LLM | ASVD |", "|---|---|---|---|"]  # fmt: skip
    for row in report["correlated_layer"]["relative_error"]:
        lines.append(
            f"| {row['rank']} | {row['svd']:.4f} | {row['svd-llm']:.4f} | {row['asvd']:.4f} |"
        )
    lines += ["", f"wall time {report['wall_s']:.0f} s"]
    return "\n".join(lines) + "\n"


def _row(name: str, var: dict | None, speed: dict, key: str, output: str) -> str:
    params = "-"
    if var is not None:
        p, m = var["params"], var["macs"]
        params = f"{p['after'] / p['before']:.1%} / {m['after'] / m['before']:.1%}"
    fid = None if var is None else var[key][output]
    ci = speed["ratio_ci95"]
    sp = (
        "1"
        if speed["speedup"] is None
        else f"{speed['speedup']:.2f} [{1 / ci[1]:.2f}, {1 / ci[0]:.2f}]"
    )
    cos = "1" if fid is None else f"{float(fid['cosine']):.4f}"
    sqnr = "inf" if fid is None else f"{float(fid['sqnr_db']):.1f}"
    return f"| {name} | {params} | {speed['median_ms']:.2f} | {sp} | {cos} | {sqnr} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/onnxprune-models"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnxprune-lowrank"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args(argv)
    for folder in (args.model_dir, args.work, args.out):
        folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter_ns()
    report = {
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "runs": args.runs,
        "weights": "random init (models/export.py builders), not trained",
        "correlated_layer": run_correlated_layer(),
        "encoder": run_encoder(args.model_dir, args.work, args.runs, args.threads),
        "resnet50": run_resnet(args.model_dir, args.work, args.runs, args.threads),
    }
    report["wall_s"] = (time.perf_counter_ns() - start) / 1e9
    write_text_atomic(
        args.out / "lowrank.json", json.dumps(report, indent=2, sort_keys=True) + "\n"
    )
    write_text_atomic(args.out / "lowrank.md", _markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
