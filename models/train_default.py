"""Train onnxprune's default model, a residual CNN on scikit-learn digits upsampled to 32x32.

Usage::

    python models/train_default.py [--out src/onnxprune/data] [--epochs 15] [--seed 0]

Data: the 1797 8x8 digits bundled with scikit-learn (no download), pixels / 16, the same
stratified 80/20 split as ``train_digits.py`` (1437 train, 360 test), upsampled bilinearly
to 32x32. Training adds a mild seeded augmentation: a random affine warp per sample
(rotation within +-10 degrees, scale 0.9-1.1, shift within +-2 pixels).
Model: ``architectures.DigitsResNet`` (stem conv 1->32, BasicBlocks of 32, 64 and 128
channels at 32x32, 16x16 and 8x8, global average pool, FC 128->10): 48.5 M MACs.

Writes into ``--out``:
    resnet_digits.onnx        TorchScript exporter, opset 17, input ``input`` [batch,1,32,32]
                              float32, output ``logits`` [batch,10]; BatchNormalization kept.
    resnet_digits_calib.npz   key ``input``: 384 training samples, float32 [384,1,32,32].
    resnet_digits_test.npz    keys ``input`` (float32 [360,1,32,32]) and ``label`` (int64):
                              the held-out split.

Training runs with a fixed thread count (``--threads``, default 2) and fixed seeds, so the
same command on the same machine and torch build writes the same bytes.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional

import export
from architectures import DigitsResNet, count_params_and_macs
from train_digits import load_split, save_npz

__all__ = ["augment", "main", "train", "upsample"]

logger = logging.getLogger("onnxprune.models.train_default")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "onnxprune" / "data"
SIZE = 32
#: optimize fits on the first 3/4 of these (288); with 256 (192 to fit) the recovery refit
#: did visibly better on its own samples than on held-out ones and optimize warned.
CALIBRATION_SAMPLES = 384
NAMES = ("resnet_digits.onnx", "resnet_digits_calib.npz", "resnet_digits_test.npz")
RESNET_SPEC = export.ModelSpec(
    build=DigitsResNet,
    inputs=(export.InputSpec("input", ("batch", 1, SIZE, SIZE)),),
    outputs=("logits",),
    description="digits ResNet (32x32)",
)


def upsample(x: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Bilinear upsampling of [N,1,8,8] float32 digits to [N,1,size,size]."""
    tensor = functional.interpolate(
        torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False
    )
    return tensor.numpy().astype(np.float32)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine warp per sample: rotation +-10 degrees, scale 0.9-1.1, shift +-2 px."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 0.9 + torch.rand(n, generator=gen) * 0.2
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * 2 / x.shape[-1])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = functional.affine_grid(theta, list(x.shape), align_corners=False)
    return functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def train(
    x: np.ndarray, y: np.ndarray, *, epochs: int = 15, seed: int = 0, batch_size: int = 128
) -> DigitsResNet:
    """Train a DigitsResNet with AdamW and a one-cycle schedule; returns it in eval mode.

    Runs channels-last (about twice as fast on CPU); the returned model is contiguous again.
    """
    torch.manual_seed(seed)
    model = DigitsResNet().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
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
            batch = augment(xs[idx], gen).contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(batch), ys[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        logger.info("epoch %d loss %.4f", epoch, total / len(xs))
    return model.to(memory_format=torch.contiguous_format).eval()


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x})
    return _accuracy(logits, y)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (fixed for bytes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 1 if the exported model's accuracy differs from torch's."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, y_train, x_test, y_test = load_split(args.seed)
    x_train, x_test = upsample(x_train), upsample(x_test)
    start = time.perf_counter_ns()
    model = train(x_train, y_train, epochs=args.epochs, seed=args.seed)
    train_s = (time.perf_counter_ns() - start) / 1e9
    with torch.no_grad():
        torch_acc = _accuracy(model(torch.from_numpy(x_test)).numpy(), y_test)
    params, macs = count_params_and_macs(model, (torch.zeros(1, 1, SIZE, SIZE),))

    onnx_path = export.export_module(model, RESNET_SPEC, "torchscript", args.out / NAMES[0])
    diff = export.verify_export(onnx_path, model, RESNET_SPEC)
    onnx_acc = _onnx_accuracy(onnx_path, x_test, y_test)

    calib = np.random.default_rng(args.seed).permutation(len(x_train))[:CALIBRATION_SAMPLES]
    save_npz(args.out / NAMES[1], {"input": x_train[np.sort(calib)]})
    save_npz(args.out / NAMES[2], {"input": x_test, "label": y_test})

    print(
        f"train {len(x_train)} / test {len(x_test)} samples, {args.epochs} epochs, "
        f"{train_s:.1f} s on {args.threads} threads"
    )
    print(f"{params:,} parameters, {macs / 1e6:.1f} M MACs (batch 1)")
    print(f"held-out accuracy: torch {torch_acc:.4f}, onnxruntime {onnx_acc:.4f}")
    print(f"max |onnxruntime - torch| on random inputs: {diff:.2e}")
    for name in NAMES:
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1024:.1f} KiB)")
    return 0 if onnx_acc == torch_acc else 1


if __name__ == "__main__":
    sys.exit(main())
