"""u8s8 pair sums: onnxruntime's depthwise int8 kernel has none, so the AVX2 remedy leaves
depthwise convolutions at full 8-bit precision; checked against the kernels themselves."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.quant import quantize_file
from onnxprune.quant.testing import write, write_calib
from onnxprune.quant.vnni import is_depthwise, needs_u8s8_remedy, saturating_channels
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text

# x (uint8 up to 255) -> Conv with int8 weights of 100 (adjacent pairs sum to 200 > 128) ->
# uint8 output with a step large enough for the exact sum 9 * 9 * 255 * 100.
_QDQ = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,9,5,5] x) => (float[1,{out},5,5] y) {{
  xs = Constant <value = float {{1.0}}> ()
  xz = Constant <value = uint8 {{0}}> ()
  q = QuantizeLinear (x, xs, xz)
  d = DequantizeLinear (q, xs, xz)
  wq = Constant <value = int8[{out},{cin},3,3] {{{weights}}}> ()
  ws = Constant <value = float {{1.0}}> ()
  wz = Constant <value = int8 {{0}}> ()
  w = DequantizeLinear (wq, ws, wz)
  c = Conv <group = {group}, pads = [1, 1, 1, 1]> (d, w)
  ys = Constant <value = float {{10000.0}}> ()
  yz = Constant <value = uint8 {{0}}> ()
  yq = QuantizeLinear (c, ys, yz)
  y = DequantizeLinear (yq, ys, yz)
}}
"""


def _model(out: int, cin: int, group: int):
    weights = ", ".join(["100"] * (out * cin * 9))
    return model_from_text(_QDQ.format(out=out, cin=cin, group=group, weights=weights))


@pytest.mark.parametrize(("out", "cin", "group", "pairs"), [(9, 1, 9, False), (2, 9, 1, True)])
def test_which_int8_conv_kernels_add_pairs_in_int16(out, cin, group, pairs):
    """The fused int8 kernel (optimizations on) against the unfused float path (exact on
    these integers): the depthwise conv matches everywhere; a plain conv with the same
    weights saturates where the CPU has u8s8 pair sums (AVX2 without VNNI) and matches
    where it has not."""
    model = _model(out, cin, group)
    x = {"x": np.full((1, 9, 5, 5), 255.0, np.float32)}
    exact = run_model(model, x)["y"]
    fused = run_model(model, x, optimize=True)["y"]
    assert exact.max() == pytest.approx(9 * 255 * 100 * (cin if group == 1 else 1), rel=0.01)
    if pairs and needs_u8s8_remedy():
        assert fused.max() < 0.7 * exact.max()
    else:
        np.testing.assert_array_equal(fused, exact)


def test_is_depthwise():
    assert is_depthwise("Conv", (8, 1, 3, 3), 8)
    assert not is_depthwise("Conv", (16, 1, 3, 3), 8)  # channel multiplier 2: GEMM path
    assert not is_depthwise("Conv", (8, 2, 3, 3), 4)  # grouped, 2 channels per group
    assert not is_depthwise("Conv", (1, 1, 3, 3), 1)  # a plain conv of one channel
    assert not is_depthwise("MatMul", (8, 1), 8)


_NET = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4,6,6] x, float[4,1,3,3] wd, float[4] bd, float[4,4,3,3] wc, float[4] bc)
  => (float[N,4,6,6] y) {
    d = Conv <group = 4, pads = [1, 1, 1, 1]> (x, wd, bd)
    r = Relu (d)
    y = Conv <pads = [1, 1, 1, 1]> (r, wc, bc)
}
"""


def test_coarsen_leaves_depthwise_weights_at_full_precision(tmp_path):
    """Both convs have saturating pairs at 8 bits; under ``coarsen`` only the plain conv's
    channels get a coarser scale, the depthwise one keeps ``max|w| / 127``."""
    rng = np.random.default_rng(0)
    weights = {
        "wd": rng.uniform(0.5, 1.0, (4, 1, 3, 3)),
        "bd": np.zeros(4),
        "wc": rng.uniform(0.5, 1.0, (4, 4, 3, 3)),
        "bc": np.zeros(4),
    }
    model = model_from_text(_NET, {k: v.astype(np.float32) for k, v in weights.items()})
    for i, node in enumerate(model.graph):
        node.name = f"node{i}"
    calib = write_calib(tmp_path, x=rng.uniform(0, 1, (8, 1, 4, 6, 6)).astype(np.float32))
    out = tmp_path / "q.onnx"
    quantize_file(
        write(model, tmp_path), out, calib=calib, u8s8="coarsen", calib_cache=False, rounding="gptq"
    )
    from onnxprune.io import load

    stored = {
        name: value.const_value.numpy()
        for name, value in load(out).graph.initializers.items()
        if value.const_value is not None
    }
    wd_scale = stored["wd_scale"]
    expected = np.abs(weights["wd"]).reshape(4, -1).max(axis=1) / 127
    np.testing.assert_allclose(wd_scale, expected, rtol=1e-6)
    assert saturating_channels(stored["wd_quantized"], 0, "Conv").all()  # left as it is
    assert not saturating_channels(stored["wc_quantized"], 0, "Conv").any()
