"""Error-compensated (GPTQ) weight rounding: the math against exact oracles, then the
quantizer's use of it, judged with onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.cli import main
from onnxprune.io import load
from onnxprune.quant import quantize_file
from onnxprune.quant.gptq import _layer, _rows, gptq_round
from onnxprune.quant.params import QParams, dequantize
from onnxprune.quant.testing import write, write_calib
from onnxprune.quant.vnni import saturating_channels
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text


def _quadratic(w: np.ndarray, q: np.ndarray, scale: np.ndarray, h: np.ndarray) -> float:
    d = w - q * scale[:, :, None]
    return float(np.einsum("goi,gij,goj->", d, h, d))


def test_uncorrelated_inputs_give_nearest_rounding_exactly():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 5, 12))
    h = np.stack([np.diag(rng.uniform(0.5, 2.0, 12)) for _ in range(2)])
    scale = np.abs(w).max(axis=2) / 127
    q = gptq_round(w, h, scale, -127, 127, block=5)
    np.testing.assert_array_equal(q, np.clip(np.round(w / scale[:, :, None]), -127, 127))


@pytest.mark.parametrize("block", [4, 128])
def test_correlated_inputs_lower_the_output_error_and_stay_in_range(block):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 24)) @ rng.standard_normal((24, 24))  # correlated inputs
    h = (x.T @ x)[None]
    w = rng.standard_normal((1, 16, 24))
    scale = np.abs(w).max(axis=2) / 15  # coarse steps: rounding error is visible
    nearest = np.clip(np.round(w / scale[:, :, None]), -15, 15)
    q = gptq_round(w, h, scale, -15, 15, block=block)
    assert q.min() >= -15 and q.max() <= 15
    assert np.array_equal(q, np.round(q))
    assert _quadratic(w, q, scale, h) < 0.7 * _quadratic(w, nearest, scale, h)


def test_block_size_does_not_change_the_result():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 20)) @ rng.standard_normal((20, 20))
    h = (x.T @ x)[None]
    w = rng.standard_normal((1, 6, 20))
    scale = np.abs(w).max(axis=2) / 127
    np.testing.assert_array_equal(
        gptq_round(w, h, scale, -127, 127, block=3), gptq_round(w, h, scale, -127, 127)
    )


def test_a_dead_input_keeps_nearest_rounding_and_takes_no_error():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 8))
    x[:, 3] = 0.0
    w = rng.standard_normal((1, 4, 8))
    scale = np.abs(w).max(axis=2) / 127
    q = gptq_round(w, (x.T @ x)[None], scale, -127, 127)
    np.testing.assert_array_equal(q[0, :, 3], np.round(w[0, :, 3] / scale[0]))


_CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,6,9,8] x, float[4,3,3,2] w) => (float[1,4,5,3] y) {
  y = Conv <group = 2, strides = [2, 3], pads = [1, 0, 1, 1], dilations = [1, 2]> (x, w)
}
"""


def test_conv_rows_times_the_weight_is_the_convolution():
    """The im2col rows (per group, in the weight's K order) reproduce onnxruntime's Conv."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    model = model_from_text(_CONV, {"w": w})
    x = rng.standard_normal((1, 6, 9, 8)).astype(np.float32)
    expected = run_model(model, {"x": x})["y"]  # (1, 4, 5, 3)
    node = next(iter(model.graph))
    layer = _layer(node, w)
    assert layer is not None
    rows = _rows(layer, x.astype(np.float64), rng)  # (2 groups, 15 positions, 3 * 3 * 2)
    got = np.einsum("grk,gok->gor", rows, w.reshape(2, 2, -1))  # (group, out, position)
    np.testing.assert_allclose(got.reshape(4, 5, 3), expected[0], rtol=1e-5, atol=1e-5)


def test_sampled_conv_rows_are_the_drawn_rows_of_all_positions():
    """Gathering patches only at drawn positions gives exactly those rows of the full
    im2col (batch of 2: positions are drawn over batch and space together)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    layer = _layer(next(iter(model_from_text(_CONV, {"w": w}).graph)), w)
    assert layer is not None
    x = rng.standard_normal((2, 6, 9, 8))
    full = _rows(layer, x, np.random.default_rng(0))  # 2 * 15 = 30 rows, all kept
    sampled = _rows(layer, x, np.random.default_rng(1), limit=7)
    pick = np.sort(np.random.default_rng(1).choice(30, 7, False))
    assert full.shape == (2, 30, 18)
    np.testing.assert_array_equal(sampled, full[:, pick])


def _smooth_images(count: int, seed: int) -> np.ndarray:
    """Images whose neighbouring pixels and channels are correlated (like photos)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, 1, 1, 10, 10))
    mix = rng.uniform(0.5, 1.0, (1, 1, 4, 1, 1))
    x = base * mix + 0.3 * rng.standard_normal((count, 1, 4, 10, 10))
    x = (x + np.roll(x, 1, axis=-1) + np.roll(x, 1, axis=-2)) / 3
    return x.astype(np.float32)


def _net(seed: int = 0) -> ir.Model:
    """Conv 3x3 (4->16) + Relu -> depthwise 3x3 + Relu -> Conv 1x1 (16->8) -> pool -> Gemm."""
    rng = np.random.default_rng(seed)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4,10,10] x, float[16,4,3,3] w1, float[16] b1, float[16,1,3,3] wd,
       float[16] bd, float[8,16,1,1] w2, float[8] b2, float[5,8] wg, float[5] bg)
      => (float[N,5] y) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu (c1)
        cd = Conv <group = 16, pads = [1, 1, 1, 1]> (r1, wd, bd)
        rd = Relu (cd)
        c2 = Conv (rd, w2, b2)
        p = GlobalAveragePool (c2)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, wg, bg)
    }
    """
    weights = {
        "w1": rng.standard_normal((16, 4, 3, 3)) * 0.3,
        "b1": rng.standard_normal(16) * 0.1,
        "wd": rng.standard_normal((16, 1, 3, 3)) * 0.5,
        "bd": rng.standard_normal(16) * 0.1,
        "w2": rng.standard_normal((8, 16, 1, 1)) * 0.3,
        "b2": rng.standard_normal(8) * 0.1,
        "wg": rng.standard_normal((5, 8)),
        "bg": np.zeros(5),
    }
    return model_from_text(text, {k: v.astype(np.float32) for k, v in weights.items()})


@pytest.fixture
def files(tmp_path):
    return write(_net(), tmp_path), write_calib(tmp_path, x=_smooth_images(48, 1))


def _quantize(files, tmp_path, rounding: str, name: str, **options):
    model, calib = files
    out = tmp_path / name
    result = quantize_file(
        model,
        out,
        calib=calib,
        u8s8="none",
        bias_correction="off",
        equalize="off",
        method="minmax",
        calib_cache=False,
        rounding=rounding,
        **options,
    )
    return result, out


def _int8_weights(path) -> dict[str, np.ndarray]:
    model = load(path)
    return {
        v.name: v.const_value.numpy()
        for v in model.graph.initializers.values()
        if v.const_value is not None and v.const_value.dtype == ir.DataType.INT8
    }


def _weight_error_sqnr(model_path, quantized_path, x: np.ndarray) -> float:
    """Output SQNR of the model with only its weights dequantized (activations float)."""
    quantized = load(quantized_path)
    float_weights = {}
    for node in quantized.graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None:
            q = node.inputs[0].const_value.numpy()
            if q.dtype != np.int8:
                continue
            params = QParams(
                node.inputs[1].const_value.numpy(),
                node.inputs[2].const_value.numpy(),
                node.attributes.get_int("axis", 1),
            )
            float_weights[node.inputs[0].name.removesuffix("_quantized")] = dequantize(q, params)
    original = load(model_path)
    for name, value in original.graph.initializers.items():
        if name in float_weights:
            value.const_value = ir.tensor(float_weights[name], name=name)
    ref = np.concatenate([run_model(model_path, {"x": s})["y"] for s in x])
    got = np.concatenate([run_model(original, {"x": s})["y"] for s in x])
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)))


def test_gptq_weights_beat_nearest_on_unseen_inputs_scales_unchanged(files, tmp_path):
    near, near_path = _quantize(files, tmp_path, "nearest", "near.onnx")
    gptq, gptq_path = _quantize(files, tmp_path, "gptq", "gptq.onnx")
    assert near.details.rounding.reason == "nearest"
    assert gptq.details.rounding.applied and gptq.details.rounding.layers == 4
    held_out = _smooth_images(32, 7)
    model = files[0]
    sqnr_near = _weight_error_sqnr(model, near_path, held_out)
    sqnr_gptq = _weight_error_sqnr(model, gptq_path, held_out)
    assert sqnr_gptq > sqnr_near + 1.0, (sqnr_near, sqnr_gptq)
    # Only the int8 values differ: same graph, same scales and int32 biases.
    a, b = load(near_path), load(gptq_path)
    assert [n.op_type for n in a.graph] == [n.op_type for n in b.graph]
    qa, qb = _int8_weights(near_path), _int8_weights(gptq_path)
    assert qa.keys() == qb.keys() and any(not np.array_equal(qa[k], qb[k]) for k in qa)
    for name, value in a.graph.initializers.items():
        if value.const_value is not None and value.const_value.dtype != ir.DataType.INT8:
            np.testing.assert_array_equal(
                value.const_value.numpy(), b.graph.initializers[name].const_value.numpy()
            )


def test_auto_judges_on_the_held_out_quarter_and_records_it(files, tmp_path):
    result, _ = _quantize(files, tmp_path, "auto", "auto.onnx")
    report = result.details.rounding
    # 48 calibration samples: 12 held out for the report (no --eval), of the other 36 the
    # moments come from 27 and the choice is judged on 9.
    assert (report.fit_feeds, report.judged_on_feeds) == (27, 9)
    assert report.applied == (report.sqnr_db_with > report.sqnr_db_without)
    assert report.reason in ("auto: held-out SQNR improved", "auto: no held-out SQNR gain")


def test_same_bytes_twice(files, tmp_path):
    _, first = _quantize(files, tmp_path, "gptq", "a.onnx")
    _, second = _quantize(files, tmp_path, "gptq", "b.onnx")
    assert first.read_bytes() == second.read_bytes()


def test_pair_bounding_remedy_gets_no_new_saturating_pair(files, tmp_path):
    model, calib = files
    out = tmp_path / "coarse.onnx"
    quantize_file(model, out, calib=calib, u8s8="coarsen", rounding="gptq", calib_cache=False)
    convs = [q for q in _int8_weights(out).values() if q.ndim == 4]
    assert len(convs) == 3
    for q in convs:
        assert not saturating_channels(q, 0, "Conv").any()


def test_cli_flag_and_report(files, tmp_path):
    model, calib = files
    report = tmp_path / "r.json"
    code = main(
        [
            "quantize",
            str(model),
            "-o",
            str(tmp_path / "q.onnx"),
            "--calib",
            str(calib),
            "--rounding",
            "gptq",
            "--u8s8",
            "none",
            "--no-calib-cache",
            "--report",
            str(report),
        ]
    )
    assert code == 0
    rounding = json.loads(report.read_text())["details"]["rounding"]
    assert rounding["applied"] and rounding["mode"] == "gptq" and rounding["layers"] == 4


def test_bad_rounding_is_refused(files, tmp_path, capsys):
    model, calib = files
    out = tmp_path / "q.onnx"
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(model), "-o", str(out), "--calib", str(calib), "--rounding", "x"])
    assert exc.value.code == 2 and not out.exists()
    assert "--rounding" in capsys.readouterr().err
    with pytest.raises(Exception, match="--rounding 'x'"):
        quantize_file(model, out, calib=calib, rounding="x")
    assert not out.exists()
