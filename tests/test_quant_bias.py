"""Bias correction: the mean int8 error per output channel is absorbed by the bias."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.cli import main
from onnxprune.io import load
from onnxprune.passes import pipeline
from onnxprune.quant import quantize_file
from onnxprune.quant.core import QuantOptions, StaticQuantizer
from onnxprune.quant.prepare import ensure_opset, name_nodes
from onnxprune.quant.testing import write, write_calib
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text


def _biased(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Weights that all round *down* in int8: per row a peak 1.0 (scale 1/127), then a zero
    (the peak's u8s8 pair partner, so no int16 pair saturates), then (k + 0.45) / 127."""
    w = (rng.integers(5, 60, (rows, cols)) + 0.45) / 127.0
    w[:, 0], w[:, 1] = 1.0, 0.0
    return w.astype(np.float32)


def _net(seed: int = 0):
    """Conv 1x1 (8->8) + Relu -> GlobalAveragePool -> Flatten -> Gemm (8->4)."""
    rng = np.random.default_rng(seed)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,8,4,4] x, float[8,8,1,1] w1, float[8] b1, float[4,8] wg, float[4] bg)
      => (float[N,4] y) {
        c = Conv (x, w1, b1)
        r = Relu (c)
        p = GlobalAveragePool (r)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, wg, bg)
    }
    """
    weights = {
        "w1": _biased(8, 8, rng).reshape(8, 8, 1, 1),
        "b1": np.full(8, 0.2, np.float32),
        "wg": _biased(4, 8, rng),
        "bg": np.zeros(4, np.float32),
    }
    return model_from_text(text, weights)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.uniform(0.5, 1.5, (24, 1, 8, 4, 4)).astype(np.float32)
    return write(_net(), tmp_path), write_calib(tmp_path, x=x), x


def _quantize(files, tmp_path, mode: str, name: str = "q.onnx"):
    model, calib, _ = files
    out = tmp_path / name
    return quantize_file(model, out, calib=calib, u8s8="none", bias_correction=mode), out


def _errors(model_path, quantized_path, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean error per output channel and output SQNR (dB), int8 kernels (optimizations on)."""
    ref = np.concatenate([run_model(model_path, {"x": s})["y"] for s in x])
    got = np.concatenate([run_model(quantized_path, {"x": s}, optimize=True)["y"] for s in x])
    err = got.astype(np.float64) - ref
    return err.mean(axis=0), float(10 * np.log10(np.sum(ref**2) / np.sum(err**2)))


def test_correction_removes_the_mean_error_and_improves_sqnr(files, tmp_path):
    _, off_path = _quantize(files, tmp_path, "off", "off.onnx")
    result, on_path = _quantize(files, tmp_path, "on", "on.onnx")
    mean_off, sqnr_off = _errors(files[0], off_path, files[2])
    mean_on, sqnr_on = _errors(files[0], on_path, files[2])
    # Every weight rounds down and every input is positive: a clear negative offset.
    assert np.all(mean_off < 0) and np.min(np.abs(mean_off)) > 0.01
    assert np.max(np.abs(mean_on)) < 0.01 * np.min(np.abs(mean_off))
    assert sqnr_on > sqnr_off + 20
    info = result.details["bias_correction"]
    assert info["applied"] and info["reason"] == "on"
    assert info["corrected"] == ["Conv_0", "Gemm_4"] and info["skipped"] == []
    assert info["sqnr_db_with"] > info["sqnr_db_without"]


def test_auto_keeps_it_when_sqnr_improves_and_report_records_it(files, tmp_path):
    result, _ = _quantize(files, tmp_path, "auto")
    info = result.details["bias_correction"]
    assert info["mode"] == "auto" and info["applied"]
    assert info["reason"] == "auto: output SQNR improved"
    assert result.worst["sqnr_db"] == pytest.approx(info["sqnr_db_with"])


def test_off_is_the_uncorrected_model_byte_for_byte(files, tmp_path):
    result, out = _quantize(files, tmp_path, "off")
    assert result.details["bias_correction"] == {"mode": "off", "applied": False, "reason": "off"}
    # The path before bias correction existed: canonicalize, calibrate, build, save.
    model = load(files[0])
    pipeline.canonicalize(model)
    name_nodes(model)
    model = ensure_opset(model)
    quantizer = StaticQuantizer(model, QuantOptions())
    quantizer.calibrate([{"x": s} for s in files[2]])
    built, _ = quantizer.build((), "none")
    expected = write(built, tmp_path, "expected.onnx")
    assert out.read_bytes() == expected.read_bytes()


def test_same_bytes_twice(files, tmp_path):
    _, first = _quantize(files, tmp_path, "on", "a.onnx")
    _, second = _quantize(files, tmp_path, "on", "b.onnx")
    assert first.read_bytes() == second.read_bytes()


def test_bad_mode_is_refused(files, tmp_path, capsys):
    out = tmp_path / "bad.onnx"
    args = ["quantize", str(files[0]), "-o", str(out), "--calib", str(files[1])]
    assert main([*args, "--bias-correction", "maybe"]) == 2
    assert "--bias-correction 'maybe'" in capsys.readouterr().err and not out.exists()
