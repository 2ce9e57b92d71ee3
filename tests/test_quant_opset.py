"""Old opsets (10-12) quantize: upgraded when exact, else per-tensor weights, never refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.quant import prepare, quantize_file
from onnxprune.quant.report import OpsetChange
from onnxprune.quant.testing import conv_net, image_calib, write
from onnxprune.runtime import run_model


def _opset(path: Path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def _weight_scales(path: Path) -> dict[str, tuple[int, ...]]:
    proto = onnx.load(str(path))
    return {
        t.name: tuple(t.dims)
        for t in proto.graph.initializer
        if t.name.endswith("weight_scale") or (t.name.startswith("w") and t.name.endswith("_scale"))
    }


@pytest.mark.parametrize("opset", [11, 12])
def test_old_opset_is_upgraded_and_quantized_per_channel(tmp_path: Path, opset: int) -> None:
    model = write(conv_net(opset=opset), tmp_path)
    calib = image_calib(tmp_path)
    out = tmp_path / "q.onnx"
    result = quantize_file(model, out, calib=calib, bias_correction="off", equalize="off")
    assert result.details.opset == OpsetChange(opset, 13, True)
    assert result.to_dict()["details"]["opset"] == {"from": opset, "to": 13, "per_channel": True}
    assert _opset(out) == 13
    assert _weight_scales(out)["w1_scale"] == (8,)  # one scale per output channel
    assert f"opset {opset} -> 13" in result.summary()
    assert result.fidelity.held_out.outputs["y"]["sqnr_db"] > 25


def test_failed_conversion_falls_back_to_per_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The converter failing on a real export ("a value had no shape") must not refuse.
    def fail(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError("Unsupported: value 'onnx::Reshape_12' has no shape")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fail)
    model = write(conv_net(opset=11), tmp_path)
    calib = image_calib(tmp_path)
    out = tmp_path / "q.onnx"
    result = quantize_file(model, out, calib=calib, bias_correction="off", equalize="off")
    opset = result.details.opset
    assert (opset.from_, opset.to, opset.per_channel) == (11, 11, False)
    assert opset.reason is not None and "has no shape" in opset.reason
    assert _opset(out) == 11
    assert _weight_scales(out)["w1_scale"] == ()  # one scale for the whole tensor
    assert "weights per tensor" in result.summary()
    feed = {"x": np.load(calib)["x"][0]}
    ref = run_model(model, feed)["y"]
    got = run_model(out, feed)["y"]
    assert float(np.max(np.abs(got - ref))) < 0.1 * float(np.max(np.abs(ref)))


def test_conversion_that_changes_outputs_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert = onnx.version_converter.convert_version

    def wrong(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
        converted = convert(proto, target)
        bias = next(t for t in converted.graph.initializer if t.name == "bg")
        array = onnx.numpy_helper.to_array(bias) + 1.0
        bias.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), "bg"))
        return converted

    monkeypatch.setattr(onnx.version_converter, "convert_version", wrong)
    model = write(conv_net(opset=12), tmp_path)
    calib = image_calib(tmp_path)
    _, record = prepare.ensure_opset(prepare_model(model), [{"x": np.load(calib)["x"][0]}])
    assert record["per_channel"] is False
    assert "output 'y' changed in the conversion" in record["reason"]


def prepare_model(path: Path):
    from onnxprune.io import load

    return load(path)
