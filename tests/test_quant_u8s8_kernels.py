"""The premise of the u8s8 remedy (:mod:`onnxprune.quant.vnni`), checked on onnxruntime's
own int8 kernels: a plain conv adds adjacent products in int16 on AVX2 without VNNI and
saturates; the depthwise kernel does not (the remedy still coarsens depthwise weights: leaving
them at 8 bits gained 1 dB at the remedy stage on MobileNetV2 and nothing at the end, see
benchmarks/results/quantize_zoo_notes.md)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.quant.vnni import needs_u8s8_remedy
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
