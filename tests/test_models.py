"""Reference models: the bundled digits fixtures (the digits CNN and the default digits
ResNet), and exports with both torch exporters.

The export tests need torch and are skipped cleanly without it. ResNet-18/50 and
MobileNetV2 exports take ~40 s together on 2 CPU cores, so they run only when
``ONNXPRUNE_SLOW_TESTS=1``; their parameter/MAC counts are checked by default (cheap).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.bundled import default_calibration, default_model, default_test_set
from onnxprune.errors import UsageError
from onnxprune.runtime import make_session

DATA = Path(onnxprune.__file__).parent / "data"
SLOW = pytest.mark.skipif(
    os.environ.get("ONNXPRUNE_SLOW_TESTS") != "1", reason="slow export; set ONNXPRUNE_SLOW_TESTS=1"
)


def _op_counts(path: Path) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


# ---------------------------------------------------------------- bundled fixtures (no torch)


def test_digits_fixture_accuracy() -> None:
    session = make_session(DATA / "digits_cnn.onnx")
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    test = np.load(DATA / "digits_test.npz")
    x, labels = test["input"], test["label"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
    assert labels.dtype == np.int64 and labels.shape == (x.shape[0],)
    assert x.min() >= 0.0 and x.max() <= 1.0  # pixels / 16
    (logits,) = session.run(["logits"], {"input": x})
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    assert accuracy >= 0.95, accuracy


def test_digits_fixture_contract() -> None:
    model = onnx.load(str(DATA / "digits_cnn.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    assert _dims(model.graph.input[0]) == ["batch", 1, 8, 8]
    assert _dims(model.graph.output[0]) == ["batch", 10]
    ops = collections.Counter(node.op_type for node in model.graph.node)
    # BN folding and channel pruning need something to work on.
    assert ops["Conv"] == 2 and ops["BatchNormalization"] == 2
    calib = np.load(DATA / "digits_calib.npz")
    assert sorted(calib.files) == ["input"]  # keys = model input names
    assert calib["input"].dtype == np.float32 and calib["input"].shape == (256, 1, 8, 8)
    # One calibration sample is a batch-of-one feed.
    (out,) = make_session(model).run(None, {"input": calib["input"][3:4]})
    assert out.shape == (1, 10)
    total = sum(p.stat().st_size for p in DATA.glob("digits_*"))
    assert total < 512 * 1024


def test_default_model_fixture_accuracy() -> None:
    """The default model (digits ResNet, 32x32) on its held-out split."""
    session = make_session(default_model())
    test = np.load(default_test_set())
    x, labels = test["input"], test["label"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 32, 32)
    assert labels.dtype == np.int64 and labels.shape == (x.shape[0],) == (360,)
    (logits,) = session.run(["logits"], {"input": x})
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    assert accuracy >= 0.98, accuracy


def test_default_model_fixture_contract() -> None:
    model = onnx.load(str(default_model()))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    assert _dims(model.graph.input[0]) == ["batch", 1, 32, 32]
    assert _dims(model.graph.output[0]) == ["batch", 10]
    ops = collections.Counter(node.op_type for node in model.graph.node)
    # stem + 3 blocks x 2 convs + 2 projection shortcuts, each with its BatchNorm; residual Adds
    assert ops["Conv"] == ops["BatchNormalization"] == 9 and ops["Add"] == 3
    calib = np.load(default_calibration())
    assert sorted(calib.files) == ["input"]
    assert calib["input"].dtype == np.float32 and calib["input"].shape == (384, 1, 32, 32)
    (out,) = make_session(model).run(None, {"input": calib["input"][3:4]})
    assert out.shape == (1, 10)
    paths = (default_model(), default_calibration(), default_test_set())
    assert sum(p.stat().st_size for p in paths) < 5 * 1024 * 1024


def test_cache_rejects_unknown_exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxprune.models_cache import reference_model_path

    monkeypatch.setenv("ONNXPRUNE_CACHE", str(tmp_path))
    with pytest.raises(UsageError, match="unknown exporter 'jit'"):
        reference_model_path("mlp", "jit")


# ---------------------------------------------------------------------- exports (torch)


@pytest.fixture(scope="module")
def export() -> ModuleType:
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from onnxprune.models_cache import load_export_module

    return load_export_module()


# (model, atol, ops that must appear in both exports)
SMALL_MODELS = [
    ("mlp", 1e-6, {"Gemm", "Relu"}),
    ("fusion", 1e-6, {"Conv", "Gather", "Concat", "ReduceMean"}),
    ("detector", 1e-4, {"Conv", "Split", "Concat", "Resize", "Sigmoid"}),
    ("encoder", 1e-4, {"MatMul", "Reshape", "Transpose", "Softmax", "LayerNormalization"}),
]


def _check_export(export: ModuleType, name: str, exporter: str, out: Path, atol: float) -> Path:
    spec = export.MODEL_SPECS[name]
    path = export.export_model(name, exporter, out)
    assert path == out / f"{name}.{exporter}.onnx"
    assert [p.name for p in out.iterdir()] == [path.name]  # self-contained: no external data
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == [i.name for i in spec.inputs]
    assert [o.name for o in model.graph.output] == list(spec.outputs)
    for value in model.graph.input:
        assert _dims(value)[0] == "batch"
    # Built again from the same seed, the module must be the one that was exported; the
    # check runs on batch 3 / seq 24, not the traced 2 / 16, so dynamic axes are exercised.
    diff = export.verify_export(path, spec.build(), spec)
    assert diff <= atol, f"{name}/{exporter}: max |onnxruntime - torch| = {diff:.2e}"
    return path


@pytest.mark.torch
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("case", SMALL_MODELS, ids=[m[0] for m in SMALL_MODELS])
def test_export_small_models(
    export: ModuleType, tmp_path: Path, case: tuple[str, float, set[str]], exporter: str
) -> None:
    name, atol, ops = case
    path = _check_export(export, name, exporter, tmp_path, atol)
    counts = _op_counts(path)
    assert ops <= set(counts), ops - set(counts)
    if exporter == "torchscript":
        assert onnx.load(str(path)).opset_import[0].version == export.TORCHSCRIPT_OPSET
        # BatchNorm is kept (not folded by the exporter) wherever the model has one.
        expected_bn = {"mlp": 0, "fusion": 3, "detector": 41, "encoder": 0}[name]
        assert counts["BatchNormalization"] == expected_bn
    if name == "encoder":
        assert counts["MatMul"] >= 6 * 6  # 4 projections + 2 attention MatMuls per layer
        assert counts["Softmax"] == 6


@pytest.mark.torch
def test_verify_export_detects_wrong_weights(export: ModuleType, tmp_path: Path) -> None:
    spec = export.MODEL_SPECS["mlp"]
    path = export.export_model("mlp", "torchscript", tmp_path)
    model = onnx.load(str(path))
    # Shifting the output layer's bias by 0.5 shifts every logit by exactly 0.5.
    (bias,) = [t for t in model.graph.initializer if list(t.dims) == [10]]
    array = onnx.numpy_helper.to_array(bias) + np.float32(0.5)
    bias.CopyFrom(onnx.numpy_helper.from_array(array, bias.name))
    onnx.save(model, str(path))
    assert export.verify_export(path, spec.build(), spec) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.torch
def test_reference_model_cache(
    export: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxprune.models_cache import reference_model_path

    monkeypatch.setenv("ONNXPRUNE_CACHE", str(tmp_path / "cache"))
    path = reference_model_path("mlp", "torchscript")
    assert path == tmp_path / "cache" / "mlp.torchscript.onnx"
    stamp = path.stat().st_mtime_ns
    assert reference_model_path("mlp", "torchscript").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in path.parent.iterdir()) == ["mlp.torchscript.onnx"]
    with pytest.raises(UsageError, match="unknown reference model 'vgg'"):
        reference_model_path("vgg", "torchscript")


@pytest.mark.torch
@pytest.mark.parametrize(
    ("name", "params", "gmacs"),
    [
        ("resnet18", 11_689_512, 1.814),
        ("resnet50", 25_557_032, 4.089),
        ("mobilenet_v2", 3_504_872, 0.301),
        ("densenet121", 7_978_856, 2.834),  # torchvision's densenet121: 7,978,856, 2.83 G
    ],
)
def test_imagenet_model_sizes(export: ModuleType, name: str, params: int, gmacs: float) -> None:
    import torch

    arch = export.architectures
    module = {
        "resnet18": lambda: arch.ResNet(arch.BasicBlock, [2, 2, 2, 2]),
        "resnet50": lambda: arch.ResNet(arch.Bottleneck, [3, 4, 6, 3]),
        "mobilenet_v2": arch.MobileNetV2,
        "densenet121": arch.DenseNet,
    }[name]().eval()
    counted_params, macs = arch.count_params_and_macs(module, (torch.zeros(1, 3, 224, 224),))
    assert counted_params == params
    assert macs / 1e9 == pytest.approx(gmacs, abs=0.002)


@pytest.mark.torch
@SLOW
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_export_imagenet_models(
    export: ModuleType, tmp_path: Path, name: str, exporter: str
) -> None:
    path = _check_export(export, name, exporter, tmp_path, 1e-4)
    counts = _op_counts(path)
    assert counts["Conv"] == {"resnet18": 20, "resnet50": 53, "mobilenet_v2": 52}[name]
    if exporter == "torchscript":
        assert counts["BatchNormalization"] == counts["Conv"]
