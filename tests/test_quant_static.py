"""Static QDQ quantization end to end: exact oracles, placement, determinism, refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.io import load
from onnxprune.quant import quantize_file
from onnxprune.quant.analysis import int8_mac_share
from onnxprune.quant.testing import conv_net, image_calib, matmul_net, write, write_calib
from onnxprune.runtime import run_model


def _initializers(path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_ternary_inputs_give_predictable_activation_errors(tmp_path):
    # Inputs in {-1, 0, 1}: minmax range [-1, 1] -> scale float32(2/255), which is a hair
    # above 2/255, so 1/scale = 127.49999... and the zero point is 127. Then -1 -> q 0,
    # 0 -> q 127 (exact), 1 -> q 254: every input is off by exactly 1 - 127 * scale.
    # Weights in {-1, 0, 1} are exact in int8 (scale 1/127 per channel), so the output with
    # ORT optimizations off is exactly dequant(x) @ W.
    rng = np.random.default_rng(0)
    w = rng.integers(-1, 2, size=(6, 5)).astype(np.float32)
    w[:, 0] = [1, 0, 0, 0, 0, 0]  # every channel has |w| = 1 somewhere
    w[0, :] = 1
    x = rng.integers(-1, 2, size=(8, 1, 3, 6)).astype(np.float32)
    model_path = write(matmul_net(w), tmp_path)
    calib = write_calib(tmp_path, x=x)
    out = tmp_path / "q.onnx"
    quantize_file(model_path, out, calib=calib, u8s8="none", smooth="off")
    scale = np.float32(2.0 / 255)
    expected_x = {-1.0: np.float32(-127 * scale), 0.0: 0.0, 1.0: np.float32(127 * scale)}
    for sample in x:
        dq = np.vectorize(expected_x.get)(sample).astype(np.float32)
        got = run_model(out, {"x": sample})["y"]
        np.testing.assert_allclose(got, dq @ w, rtol=0, atol=1e-6)
    inits = _initializers(out)
    assert inits["x_scale"] == scale and inits["x_zero_point"] == 127
    assert inits["w_quantized"].dtype == np.int8
    np.testing.assert_array_equal(inits["w_quantized"], (w * 127).astype(np.int8))


def test_conv_net_structure_bias_and_weights(tmp_path):
    model_path = write(conv_net(), tmp_path)
    calib = image_calib(tmp_path)
    out = tmp_path / "q.onnx"
    # Bias correction off and nearest rounding: this checks the plain rounding of the bias
    # and weights (test_quant_bias.py and the GPTQ tests cover the corrected ones; auto
    # keeps GPTQ or not by measurement, which differs between CPUs).
    result = quantize_file(
        model_path, out, calib=calib, u8s8="none", bias_correction="off", rounding="nearest"
    )
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert "Conv" in ops and ops.count("DequantizeLinear") > ops.count("QuantizeLinear") > 0
    inits = _initializers(out)
    float_model = load(model_path)
    w1 = float_model.graph.initializers["w1"].const_value.numpy()
    b1 = float_model.graph.initializers["b1"].const_value.numpy()
    s_w, s_x = inits["w1_scale"], inits["x_scale"]
    # Weights: within half a step per output channel (axis 0); bias: round(b / (s_x * s_w)).
    error = np.abs(inits["w1_quantized"] * s_w.reshape(-1, 1, 1, 1) - w1)
    assert np.all(error <= s_w.reshape(-1, 1, 1, 1) / 2 * (1 + 1e-6))
    expected_bias = np.round(b1.astype(np.float64) / (s_x * s_w).astype(np.float64))
    np.testing.assert_array_equal(inits["b1_quantized"], expected_bias.astype(np.int32))
    np.testing.assert_array_equal(inits["b1_scale"], (s_x * s_w).astype(np.float32))
    # Add is quantized (both inputs quantized), so the residual runs as QLinearAdd.
    assert "s_scale" in inits or "r2_scale" in inits
    assert result.worst["sqnr_db"] > 20
    # Weights are stored int8 (the float originals are gone), biases int32.
    assert "w1" not in inits and inits["w2_quantized"].dtype == np.int8
    assert inits["b2_quantized"].dtype == np.int32


def test_int8_mac_share_of_a_small_cnn(tmp_path):
    # ORT optimizations ON here: the share measures what onnxruntime actually runs.
    out = tmp_path / "q.onnx"
    quantize_file(write(conv_net(), tmp_path), out, calib=image_calib(tmp_path))
    share = int8_mac_share(load(out))
    assert share["int8_mac_share"] >= 0.95, share
    assert share["optimized_op_counts"].get("QLinearConv", 0) == 2


def test_determinism_same_bytes_twice(tmp_path):
    model_path = write(conv_net(), tmp_path)
    calib = image_calib(tmp_path)
    for name in ("a.onnx", "b.onnx"):
        quantize_file(model_path, tmp_path / name, calib=calib, method="entropy")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_old_opset_is_upgraded_to_13(tmp_path):
    out = tmp_path / "q.onnx"
    quantize_file(write(conv_net(opset=11), tmp_path), out, calib=image_calib(tmp_path))
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert {o.domain: o.version for o in proto.opset_import}[""] >= 13


def test_varying_token_lengths(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, length in enumerate((3, 7, 5)):
        np.savez(folder / f"s{i}.npz", x=rng.standard_normal((1, length, 4)).astype(np.float32))
    out = tmp_path / "q.onnx"
    result = quantize_file(write(matmul_net(w), tmp_path), out, calib=folder, smooth="off")
    # two files fitted on, the third held out for the report
    assert result.samples == 2 and result.fidelity.held_out.samples == 1
    assert np.isfinite(_initializers(out)["x_scale"]).all()
    assert result.worst["cosine"] > 0.99


@pytest.mark.parametrize("mode", ["dynamic", "fp16"])
def test_dynamic_and_fp16_modes(tmp_path, mode):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    calib = write_calib(tmp_path, x=rng.standard_normal((4, 1, 5, 16)).astype(np.float32))
    out = tmp_path / "q.onnx"
    kwargs = {"mode": "dynamic"} if mode == "dynamic" else {"dtype": "fp16"}
    result = quantize_file(write(matmul_net(w), tmp_path), out, calib=calib, **kwargs)
    assert result.mode == mode
    assert result.worst["cosine"] > 0.999
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("MatMulInteger" in ops) if mode == "dynamic" else ("Cast" in ops)


def test_cli_writes_report_and_budget_keeps_layers_float(tmp_path):
    model_path = write(conv_net(), tmp_path)
    calib = image_calib(tmp_path)
    full = quantize_file(
        model_path, tmp_path / "full.onnx", calib=calib, u8s8="none", method="minmax"
    )
    # Unreachable with every layer int8, on the calibration samples (where the search runs)
    # and on the held-out ones (where the result is checked): CPUs differ in which is lower.
    budget = max(full.worst["sqnr_db"], full.metrics["y"]["sqnr_db"]) + 3
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main(
        [
            "quantize",
            str(model_path),
            "-o",
            str(out),
            "--calib",
            str(calib),
            "--u8s8",
            "none",
            "--method",
            "minmax",
            "--budget",
            f"sqnr_db>={budget}",
            "--report",
            str(report),
        ]
    )
    assert code == 0 and out.exists()
    payload = json.loads(report.read_text())
    assert payload["mode"] == "static" and payload["details"]["u8s8"]["remedy"] == "none"
    assert payload["details"]["kept_float"]
    # JSON writes an exact output's infinite SQNR as the string "inf".
    assert float(payload["worst"]["sqnr_db"]) >= budget


def test_refusals_exit_codes_and_messages(tmp_path, capsys):
    model_path = write(conv_net(), tmp_path)
    calib = image_calib(tmp_path)
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(model_path), "-o", str(out), "--calib", str(calib)]) == 0
    again = tmp_path / "again.onnx"
    assert main(["quantize", str(out), "-o", str(again), "--calib", str(calib)]) == 2
    assert "already quantized" in capsys.readouterr().err and not again.exists()
    bad = tmp_path / "bad.onnx"
    # a choice outside the config's Literal is refused by the flag parser (exit 2)
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(model_path), "-o", str(bad), "--calib", str(calib), "--method", "kl"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --method: invalid choice: 'kl'" in err and not bad.exists()
    assert (
        main(
            [
                "quantize",
                str(model_path),
                "-o",
                str(bad),
                "--calib",
                str(calib),
                "--budget",
                "top1_agreement>=1.5",
            ]
        )
        == 1
    )
    assert "cannot be met" in capsys.readouterr().err and not bad.exists()


def test_all_nan_calibration_tensor_is_refused(tmp_path, capsys):
    model_path = write(conv_net(), tmp_path)
    calib = write_calib(tmp_path, x=np.full((2, 1, 3, 8, 8), np.nan, np.float32))
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(model_path), "-o", str(out), "--calib", str(calib)]) == 2
    err = capsys.readouterr().err
    assert "calibration input 'x' holds 384 NaN value(s)" in err and not out.exists()


def test_tensorrt_target_uses_int8_symmetric_activations(tmp_path):
    out = tmp_path / "q.onnx"
    result = quantize_file(
        write(conv_net(), tmp_path), out, calib=image_calib(tmp_path), target="tensorrt"
    )
    inits = _initializers(out)
    assert inits["x_zero_point"].dtype == np.int8 and inits["x_zero_point"] == 0
    assert inits["r1_zero_point"].dtype == np.int8
    assert result.details.u8s8.remedy == "none"
    assert "s8s8" in result.details.u8s8.reason


def test_method_auto_keeps_the_best_measured_method_and_matches_it_byte_for_byte(tmp_path):
    model_path = write(conv_net(), tmp_path)
    calib = image_calib(tmp_path)
    auto = tmp_path / "auto.onnx"
    result = quantize_file(model_path, auto, calib=calib, method="auto", u8s8="none")
    scores = result.details.method.candidates_sqnr_db
    chosen = result.details.method.chosen
    assert set(scores) == {"minmax", "percentile", "entropy", "mse", "mean-minmax"}
    assert scores[chosen] == max(scores.values())
    assert result.method == chosen == result.details.range_method
    assert result.worst["sqnr_db"] >= scores[chosen] - 1e-9  # bias correction only helps
    explicit = tmp_path / "explicit.onnx"
    quantize_file(model_path, explicit, calib=calib, method=chosen, u8s8="none")
    assert auto.read_bytes() == explicit.read_bytes()
