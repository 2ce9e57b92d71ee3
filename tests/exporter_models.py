"""Small random-init graphs from the exporters onnxprune users have, built in the test run.

* torch (both exporters: ``dynamo=False`` at opset 17, and ``dynamo=True`` saved with
  external data as torch does by default, ``model.onnx`` + ``model.onnx.data``): a
  ResNet-ish, a MobileNet-ish (depthwise), a ViT-ish (patch conv + ``nn.MultiheadAttention``
  + LayerNorm + GELU MLP) and a DenseNet-ish (Concat in dense blocks) network;
* tf.keras via Keras 3 ``model.export(format="onnx")`` (run in a subprocess: importing
  TensorFlow costs seconds and its threads are best kept out of the test process);
* scikit-learn via skl2onnx: an ``MLPClassifier`` with ``zipmap=False`` and with ZipMap.

Each builder writes the model and a calibration ``.npz`` (16 seeded samples) into a folder
and returns both paths. Sizes are tiny (widths 4-16, 16x16 or 32x32 images).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["BUILDERS", "TORCH_ARCHS", "build"]

SAMPLES = 16
_MODELS = Path(__file__).resolve().parent.parent / "models"


def _calib(folder: Path, name: str, shape: tuple[int, ...], seed: int = 0) -> Path:
    path = folder / "calib.npz"
    data = np.random.default_rng(seed).standard_normal((SAMPLES, 1, *shape)).astype(np.float32)
    np.savez(path, **{name: data})
    return path


# ------------------------------------------------------------------------------ torch


def _torch_modules() -> dict[str, Callable[[], tuple[object, tuple[int, ...]]]]:
    """Builders of the torch architectures: module (eval, BN statistics measured), shape."""
    import torch
    from torch import nn

    if str(_MODELS) not in sys.path:
        sys.path.insert(0, str(_MODELS))
    import architectures as arch

    class EncoderBlock(nn.Module):
        """torchvision's ViT block: pre-LN MultiheadAttention and a GELU MLP."""

        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(dim)
            self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.ln_2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.ln_1(x)
            x = x + self.attention(y, y, y, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))

    class TinyViT(nn.Module):
        """4x4 patches of a 16x16 image, 16 tokens of width 16, one block, mean pool."""

        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 4, 4)
            self.position = nn.Parameter(torch.randn(1, 16, 16) * 0.02)
            self.block = EncoderBlock(16, 2)
            self.norm = nn.LayerNorm(16)
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
            return self.head(self.norm(self.block(tokens)).mean(dim=1))

    def resnet() -> nn.Module:
        return nn.Sequential(
            *arch._conv_bn(3, 8, 3),
            nn.ReLU(),
            arch.BasicBlock(8, 8, 1),
            arch.BasicBlock(8, 16, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )

    def mobilenet() -> nn.Module:
        return nn.Sequential(
            *arch._conv_bn(3, 8, 3, 2),
            nn.ReLU6(),
            arch.InvertedResidual(8, 8, 1, 2),
            arch.InvertedResidual(8, 16, 2, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )

    def densenet() -> nn.Module:
        return arch.DenseNet(blocks=(2, 2), growth=4, init_features=8, bn_size=2, num_classes=10)

    def made(factory: Callable[[], nn.Module], shape: tuple[int, ...]):
        def build() -> tuple[nn.Module, tuple[int, ...]]:
            torch.manual_seed(0)
            module = factory()
            example = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
            return arch.init_normalization(module, (example,), seed=0), shape

        return build

    return {
        "resnet": made(resnet, (3, 32, 32)),
        "mobilenet": made(mobilenet, (3, 32, 32)),
        "vit": made(TinyViT, (3, 16, 16)),
        "densenet": made(densenet, (3, 32, 32)),
    }


TORCH_ARCHS = ("resnet", "mobilenet", "vit", "densenet")


def _export_torch(arch: str, exporter: str, folder: Path) -> tuple[Path, Path]:
    import warnings

    import torch

    module, shape = _torch_modules()[arch]()
    example = (torch.randn(2, *shape),)
    path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                module,
                example,
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        else:
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.onnx.export(
                module,
                example,
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
            assert program is not None
            # torch's default layout: model.onnx + model.onnx.data
            program.save(str(path), external_data=True)
    return path, _calib(folder, "input", shape)


# ------------------------------------------------------------------------------ keras

_KERAS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 1), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.DepthwiseConv2D(3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(5, activation="softmax")(keras.layers.Dense(16, activation="relu")(x))
    model = keras.Model(inp, out)
    model(np.zeros((1, 12, 12, 1), np.float32))
    model.export(sys.argv[1], format="onnx", verbose=False)
    """
)


def keras_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "keras", "tf2onnx"))


def _export_keras(folder: Path) -> tuple[Path, Path]:
    path = folder / "model.onnx"
    subprocess.run(
        [sys.executable, "-c", _KERAS_SCRIPT, str(path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    import onnx

    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    return path, _calib(folder, name, (12, 12, 1))


# ---------------------------------------------------------------------------- sklearn


def _export_sklearn(folder: Path, zipmap: bool) -> tuple[Path, Path]:
    import warnings

    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier((16,), max_iter=50, random_state=0).fit(x, y)
    options = None if zipmap else {id(clf): {"zipmap": False}}
    proto = convert_sklearn(
        clf, initial_types=[("input", FloatTensorType([None, 8]))], options=options
    )
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    np.savez(folder / "calib.npz", input=x[:SAMPLES, None, :])
    return path, folder / "calib.npz"


# ------------------------------------------------------------------------------ table

BUILDERS: dict[str, Callable[[Path], tuple[Path, Path]]] = {
    **{
        f"torch-{exporter}-{arch}": (lambda folder, a=arch, e=exporter: _export_torch(a, e, folder))
        for exporter in ("torchscript", "dynamo")
        for arch in TORCH_ARCHS
    },
    "keras": _export_keras,
    "sklearn-tensor": lambda folder: _export_sklearn(folder, zipmap=False),
    "sklearn-zipmap": lambda folder: _export_sklearn(folder, zipmap=True),
}


def build(name: str, folder: Path) -> tuple[Path, Path]:
    """Export model ``name`` into ``folder``; returns (model path, calibration path)."""
    folder.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name](folder)
