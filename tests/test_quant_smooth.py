"""SmoothQuant: exact in float, and it helps when one activation channel is an outlier."""

from __future__ import annotations

import numpy as np

from onnxprune.quant import quantize_file
from onnxprune.quant.core import copy_model
from onnxprune.quant.smooth import smooth_matmuls
from onnxprune.quant.testing import matmul_net, write, write_calib
from onnxprune.testing import assert_same_outputs, model_from_text


def _outlier_data(seed: int = 0, outlier: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    x = rng.standard_normal((8, 1, 6, 16)).astype(np.float32)
    x[..., 3] *= outlier  # one outlier channel, as in transformer activations
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
    assert smooth.details.smoothquant.alpha == 0.5
    assert smooth.worst["sqnr_db"] > plain.worst["sqnr_db"] + 6


def test_auto_measures_each_alpha_and_keeps_the_best(tmp_path):
    """``auto`` on a MatMul model builds a candidate per alpha, keeps the best worst-output
    SQNR on the calibration feeds, and writes exactly what that alpha chosen by hand writes."""
    w, x = _outlier_data(1, outlier=1000.0)  # data on which 0.5 is not the best
    model_path = write(matmul_net(w), tmp_path)
    calib = write_calib(tmp_path, x=x)
    auto = quantize_file(model_path, tmp_path / "auto.onnx", calib=calib, smooth="auto")
    report = auto.details.smoothquant
    assert report.candidates_sqnr_db is not None
    assert set(report.candidates_sqnr_db) == {"0.5", "0.75", "0.95"}
    best = max(report.candidates_sqnr_db, key=report.candidates_sqnr_db.__getitem__)
    assert report.alpha == float(best) != 0.5
    assert f"SmoothQuant alpha {report.alpha} chosen by measurement" in auto.summary()
    by_hand = quantize_file(model_path, tmp_path / "hand.onnx", calib=calib, smooth=float(best))
    assert by_hand.details.smoothquant.candidates_sqnr_db is None
    assert (tmp_path / "auto.onnx").read_bytes() == (tmp_path / "hand.onnx").read_bytes()


def _layernorm_net(residual: bool):
    """LayerNorm -> two MatMuls (Q/K-like, sharing the input); with ``residual`` the LN
    output is also added to the first MatMul's output (another reader: no fold)."""
    rng = np.random.default_rng(3)
    extra = "y1r = Add (y1, h)" if residual else "y1r = Identity (y1)"
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,S,16] x, float[16] g, float[16] b, float[16,16] w1, float[16,16] w2)
      => (float[1,S,16] y1r, float[1,S,16] y2) {{
        h = LayerNormalization <axis = -1> (x, g, b)
        y1 = MatMul (h, w1)
        y2 = MatMul (h, w2)
        {extra}
    }}
    """
    gamma = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    gamma[5] = 40.0  # an outlier channel after the norm, as in trained transformers
    weights = {
        "g": gamma,
        "b": rng.standard_normal(16).astype(np.float32) * 0.1,
        "w1": rng.standard_normal((16, 16)).astype(np.float32),
        "w2": rng.standard_normal((16, 16)).astype(np.float32),
    }
    return model_from_text(text, weights)


def test_smoothing_folds_into_a_layernorm_read_only_by_the_matmuls():
    model = _layernorm_net(residual=False)
    smoothed = copy_model(model)
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((1, 7, 16)).astype(np.float32)} for _ in range(4)]
    report = smooth_matmuls(smoothed, feeds, alpha=0.5)
    assert report["smoothed"] == ["h"] and report["folded_into_layernorm"] == ["h"]  # unnamed LN
    assert [n.op_type for n in smoothed.graph].count("Mul") == 0
    gamma = smoothed.graph.initializers["g"].const_value.numpy()
    assert gamma[5] < 40.0 / 2  # the outlier channel was flattened
    assert_same_outputs(model, smoothed, feeds[0], rtol=1e-4, atol=1e-4)


def test_smoothing_inserts_a_mul_when_the_layernorm_output_has_other_readers():
    model = _layernorm_net(residual=True)
    smoothed = copy_model(model)
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((1, 7, 16)).astype(np.float32)} for _ in range(4)]
    report = smooth_matmuls(smoothed, feeds, alpha=0.5)
    assert report["smoothed"] == ["h"] and report["folded_into_layernorm"] == []
    assert [n.op_type for n in smoothed.graph].count("Mul") == 1
    np.testing.assert_array_equal(
        smoothed.graph.initializers["g"].const_value.numpy(),
        model.graph.initializers["g"].const_value.numpy(),
    )
    assert_same_outputs(model, smoothed, feeds[0], rtol=1e-4, atol=1e-4)
