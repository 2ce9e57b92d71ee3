"""Scales, zero points, int8 weights and int32 biases: exact oracles."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.quant.params import (
    MIN_SCALE,
    activation_qparams,
    bias_int32,
    dequantize,
    quantize,
    weight_axis,
    weight_qparams,
)
from onnxprune.quant.vnni import remedy_params, saturating_channels


@pytest.mark.parametrize(
    ("op_type", "shape", "trans_b", "axis"),
    [
        ("Conv", (6, 3, 3, 3), 0, 0),
        ("ConvTranspose", (3, 6, 3, 3), 0, 1),
        ("Gemm", (6, 5), 1, 0),
        ("Gemm", (5, 6), 0, 1),
        ("MatMul", (5, 6), 0, 1),
        ("MatMul", (2, 5, 6), 0, 2),
    ],
)
def test_weights_within_half_a_step_per_channel(op_type, shape, trans_b, axis):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    w = w * rng.uniform(0.01, 10, size=shape[axis]).reshape(
        [-1 if i == axis else 1 for i in range(len(shape))]
    ).astype(np.float32)
    assert weight_axis(op_type, len(shape), trans_b) == axis
    params = weight_qparams(w, axis)
    q = quantize(w, params)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    error = np.abs(dequantize(q, params) - w)
    step = params.scale.reshape([-1 if i == axis else 1 for i in range(len(shape))])
    assert np.all(error <= step / 2 * (1 + 1e-6))
    # The largest weight of every channel maps to +-127: the full range is used.
    assert np.all(np.max(np.abs(np.moveaxis(q, axis, 0).reshape(shape[axis], -1)), axis=1) == 127)


def test_zero_and_tiny_channels_get_a_floor_scale():
    w = np.zeros((3, 4), np.float32)
    w[0] = [1.0, -2.0, 0.5, 0.0]
    w[1] = 1e-30
    params = weight_qparams(w, 0)
    assert np.all(np.isfinite(params.scale)) and np.all(params.scale >= MIN_SCALE)
    assert params.scale[2] == params.scale[1] == np.float32(2.0 / 127 * 2.0**-16)
    assert np.all(quantize(w, params)[2] == 0)


def test_activation_qparams_uint8_and_symmetric():
    p = activation_qparams(-1.0, 3.0)
    assert p.scale == np.float32(4.0 / 255) and p.zero_point == np.uint8(64)
    relu = activation_qparams(0.5, 6.0)  # the range always includes 0
    assert relu.zero_point == 0 and relu.scale == np.float32(6.0 / 255)
    sym = activation_qparams(-1.0, 3.0, symmetric=True)
    assert sym.zero_point.dtype == np.int8 and sym.zero_point == 0
    assert sym.scale == np.float32(3.0 / 127)
    zero = activation_qparams(0.0, 0.0)
    assert zero.scale == np.float32(MIN_SCALE) and np.isfinite(zero.scale)


def test_bias_int32_is_round_b_over_sx_sw_and_overflow_is_none():
    b = np.array([0.3, -1.7, 2.0], np.float32)
    s_x = np.float32(0.02)
    s_w = np.array([0.01, 0.003, 0.05], np.float32)
    q, scale = bias_int32(b, s_x, s_w)
    assert q.dtype == np.int32
    np.testing.assert_array_equal(q, np.round(b / (s_x * s_w)).astype(np.int32))
    np.testing.assert_array_equal(scale, (s_x * s_w).astype(np.float32))
    assert bias_int32(np.array([1e6], np.float32), np.float32(1e-4), np.array([1e-4])) is None


def test_u8s8_coarsen_and_reduce_range_remove_saturating_pairs():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    base = quantize(w, weight_qparams(w, 0))
    assert saturating_channels(base, 0, "Conv").any()
    for remedy in ("coarsen", "reduce-range"):
        params, changed = remedy_params(w, 0, "Conv", remedy)
        assert changed > 0
        assert not saturating_channels(quantize(w, params), 0, "Conv").any(), remedy
    # Channels that cannot saturate keep their full 8-bit scale under "coarsen".
    safe = np.zeros((2, 4), np.float32)
    safe[0] = [1.0, 0.0, 0.0, 0.0]
    safe[1] = [1.0, 1.0, 1.0, 1.0]
    params, changed = remedy_params(safe.T.copy(), 1, "MatMul", "coarsen")
    assert changed == 1
    assert params.scale[0] == np.float32(1.0 / 127)
    assert params.scale[1] > np.float32(1.0 / 127)


def test_onnx_numpy_helper_roundtrip_of_int8():
    # Guards the storage assumption: int8 initializers round-trip through TensorProto.
    q = np.array([-127, 0, 127], np.int8)
    assert onnx.numpy_helper.to_array(onnx.numpy_helper.from_array(q)).tolist() == q.tolist()
