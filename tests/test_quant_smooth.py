"""SmoothQuant: exact in float, and it helps when one activation channel is an outlier."""

from __future__ import annotations

import numpy as np

from onnxprune.quant import quantize_file
from onnxprune.quant.core import copy_model
from onnxprune.quant.smooth import smooth_matmuls
from onnxprune.quant.testing import matmul_net, write, write_calib
from onnxprune.testing import assert_same_outputs


def _outlier_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    x = rng.standard_normal((8, 1, 6, 16)).astype(np.float32)
    x[..., 3] *= 100.0  # one outlier channel, as in transformer activations
    return w, x


def test_smoothing_does_not_change_the_float_model():
    w, x = _outlier_data()
    model = matmul_net(w)
    smoothed = copy_model(model)
    report = smooth_matmuls(smoothed, [{"x": s} for s in x], alpha=0.5)
    assert report["smoothed"] == ["x"]
    ops = [n.op_type for n in smoothed.graph]
    assert ops == ["Mul", "MatMul"]
    assert_same_outputs(model, smoothed, {"x": x[0]}, rtol=1e-4, atol=1e-4)


def test_smoothquant_improves_sqnr_with_an_outlier_channel(tmp_path):
    w, x = _outlier_data()
    model_path = write(matmul_net(w), tmp_path)
    calib = write_calib(tmp_path, x=x)
    plain = quantize_file(model_path, tmp_path / "a.onnx", calib=calib, smooth="off")
    smooth = quantize_file(model_path, tmp_path / "b.onnx", calib=calib, smooth=0.5)
    assert smooth.details["smoothquant"]["alpha"] == 0.5
    assert smooth.worst["sqnr_db"] > plain.worst["sqnr_db"] + 6
