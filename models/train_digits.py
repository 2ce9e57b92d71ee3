"""Train the bundled digits CNN on scikit-learn's ``load_digits`` and write the fixtures.

Usage::

    python models/train_digits.py [--out src/onnxprune/data] [--epochs 20] [--seed 0]

Data: the 1797 8x8 grey-scale digits bundled with scikit-learn (no download), pixels
scaled to [0, 1] (divided by 16), a stratified 80/20 train/test split with a fixed seed.
Model: ``architectures.DigitsCNN`` (conv 1->16->32 with BN and ReLU, max pool, FC 512->64->10).

Writes into ``--out``:
    digits_cnn.onnx     TorchScript exporter, opset 17, input ``input`` [batch,1,8,8] float32,
                        output ``logits`` [batch,10]; BatchNormalization nodes are kept.
    digits_calib.npz    key ``input``: 256 training samples, float32 [256,1,8,8].
    digits_test.npz     keys ``input`` (float32 [N,1,8,8]) and ``label`` (int64 [N]): the
                        held-out split.

The npz calibration contract: keys are model input names, axis 0 indexes samples, and
``x[i:i+1]`` is one batch-of-one feed. Training runs single-threaded with fixed seeds, so
the same command on the same torch build writes the same bytes (npz entries carry a fixed
timestamp).
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import export
from architectures import DigitsCNN

__all__ = ["main", "save_npz", "train"]

logger = logging.getLogger("onnxprune.models.train_digits")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "onnxprune" / "data"
CALIBRATION_SAMPLES = 256
DIGITS_SPEC = export.ModelSpec(
    build=DigitsCNN,
    inputs=(export.InputSpec("input", ("batch", 1, 8, 8)),),
    outputs=("logits",),
    description="digits CNN",
)


def load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test); x float32 [N,1,8,8] in [0,1], y int64."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    return x_train, y_train, x_test, y_test


def train(
    x: np.ndarray, y: np.ndarray, *, epochs: int = 20, seed: int = 0, batch_size: int = 32
) -> DigitsCNN:
    """Train a DigitsCNN with Adam and a cosine learning-rate schedule; returns it in eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(xs), generator=gen)
        total = 0.0
        for start in range(0, len(xs), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(xs[idx]), ys[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        scheduler.step()
        logger.debug("epoch %d loss %.4f", epoch, total / len(xs))
    return model.eval()


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``np.load``-compatible compressed npz with fixed entry timestamps."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buffer.getvalue())


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 1 if the exported model's accuracy differs from torch's."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)  # bitwise-reproducible training
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, y_train, x_test, y_test = load_split(args.seed)
    start = time.perf_counter_ns()
    model = train(x_train, y_train, epochs=args.epochs, seed=args.seed)
    train_s = (time.perf_counter_ns() - start) / 1e9
    with torch.no_grad():
        torch_acc = _accuracy(model(torch.from_numpy(x_test)).numpy(), y_test)

    onnx_path = export.export_module(
        model, DIGITS_SPEC, "torchscript", args.out / "digits_cnn.onnx"
    )
    diff = export.verify_export(onnx_path, model, DIGITS_SPEC)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x_test})
    onnx_acc = _accuracy(logits, y_test)

    calib = np.random.default_rng(args.seed).permutation(len(x_train))[:CALIBRATION_SAMPLES]
    save_npz(args.out / "digits_calib.npz", {"input": x_train[np.sort(calib)]})
    save_npz(args.out / "digits_test.npz", {"input": x_test, "label": y_test})

    print(
        f"train {len(x_train)} / test {len(x_test)} samples, {args.epochs} epochs, {train_s:.1f} s"
    )
    print(f"held-out accuracy: torch {torch_acc:.4f}, onnxruntime {onnx_acc:.4f}")
    print(f"max |onnxruntime - torch| on random inputs: {diff:.2e}")
    for name in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1024:.1f} KiB)")
    return 0 if onnx_acc == torch_acc else 1


if __name__ == "__main__":
    sys.exit(main())
