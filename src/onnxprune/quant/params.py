"""Scales and zero points for activations, weights and biases.

Activations (``rmin = min(lo, 0)``, ``rmax = max(hi, 0)`` so that 0 is exact):

* CPU, uint8 asymmetric: ``scale = (rmax - rmin) / 255``,
  ``zero_point = clip(round(-rmin / scale), 0, 255)``.
* TensorRT, int8 symmetric: ``scale = max(|rmin|, |rmax|) / 127``, ``zero_point = 0``.

A zero range gets :data:`MIN_SCALE`. Quantization is ``q = clip(round(x / scale) + zp)`` and
dequantization ``x' = (q - zp) * scale``.

Weights: int8 symmetric per output channel, ``scale_c = max|w_c| / qmax`` (``qmax = 127``,
or 63 for 7-bit reduced range), ``q = clip(round(w / scale_c), -qmax, qmax)``; since
``|w / scale_c| <= qmax`` every weight is within half a step of its dequantized value. Tiny
or all-zero channels get a floor scale ``max(MIN_SCALE, WEIGHT_FLOOR_RATIO * max_c scale_c)``.
The channel axis is 0 for Conv, 1 for ConvTranspose, 0 for Gemm with ``transB`` (else 1),
and the last axis for MatMul.

Bias: ``q_b = round(b / (s_x * s_w))`` in int32 with scale ``s_x * s_w`` (float32 product,
the value onnxruntime's fused kernels assume). A bias that would overflow int32 is left float.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "MIN_SCALE",
    "QParams",
    "activation_qparams",
    "bias_int32",
    "dequantize",
    "quantize",
    "weight_axis",
    "weight_qparams",
]

MIN_SCALE = 1e-8
WEIGHT_FLOOR_RATIO = 2.0**-16
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class QParams:
    """Quantization parameters; ``axis`` is None for per-tensor.

    Attributes:
        scale: float32 scale (scalar or one per channel).
        zero_point: uint8 or int8 zero point, same shape as ``scale``.
        axis: Channel axis for per-channel parameters.
        qmin: Smallest quantized value used.
        qmax: Largest quantized value used.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    qmin: int = 0
    qmax: int = 255


def activation_qparams(lo: float, hi: float, *, symmetric: bool = False) -> QParams:
    """Per-tensor activation parameters for the range ``[lo, hi]`` (see module docstring)."""
    rmin, rmax = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        scale = np.float32(max(max(-rmin, rmax) / 127.0, MIN_SCALE))
        return QParams(np.array(scale, np.float32), np.array(0, np.int8), None, -127, 127)
    scale = np.float32(max((rmax - rmin) / 255.0, MIN_SCALE))
    zero_point = np.clip(np.round(-rmin / float(scale)), 0, 255)
    return QParams(np.array(scale, np.float32), np.array(zero_point, np.uint8), None, 0, 255)


def weight_axis(op_type: str, rank: int, trans_b: int = 0) -> int:
    """The output-channel axis of a weight of ``op_type`` with ``rank`` dimensions."""
    if op_type == "ConvTranspose":
        return 1
    if op_type == "Gemm":
        return 0 if trans_b else 1
    if op_type == "MatMul":
        return rank - 1
    return 0


def weight_qparams(
    weight: np.ndarray, axis: int | None, *, qmax: int = 127, scale: np.ndarray | None = None
) -> QParams:
    """Symmetric int8 parameters, per channel along ``axis`` (per tensor when None).

    Args:
        weight: Float weight.
        axis: Channel axis, or None for one scale.
        qmax: 127 for 8-bit, 63 for 7-bit reduced range.
        scale: Use these scales instead of ``max|w_c| / qmax`` (floors still apply).
    """
    w = np.asarray(weight, dtype=np.float32)
    if scale is None:
        if axis is None:
            peak = np.array(np.max(np.abs(w)) if w.size else 0.0)
        else:
            reduce = tuple(i for i in range(w.ndim) if i != axis)
            peak = np.max(np.abs(w), axis=reduce) if reduce else np.abs(w)
        scale = peak.astype(np.float64) / qmax
    scale = np.asarray(scale, dtype=np.float64)
    floor = max(MIN_SCALE, WEIGHT_FLOOR_RATIO * float(scale.max(initial=0.0)))
    scale32 = np.maximum(scale, floor).astype(np.float32)
    zero = np.zeros(scale32.shape, np.int8)
    return QParams(scale32, zero, axis, -qmax, qmax)


def _broadcast(params: QParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    if params.axis is None or params.scale.ndim == 0:
        return params.scale, params.zero_point.astype(np.int64)
    shape = [1] * ndim
    shape[params.axis] = -1
    return params.scale.reshape(shape), params.zero_point.astype(np.int64).reshape(shape)


def quantize(x: np.ndarray, params: QParams) -> np.ndarray:
    """``clip(round(x / scale) + zp, qmin, qmax)`` (round half to even, as ONNX)."""
    scale, zero = _broadcast(params, np.ndim(x))
    q = np.round(np.asarray(x, np.float32) / scale) + zero
    return np.clip(q, params.qmin, params.qmax).astype(params.zero_point.dtype)


def dequantize(q: np.ndarray, params: QParams) -> np.ndarray:
    """``(q - zp) * scale`` in float32."""
    scale, zero = _broadcast(params, np.ndim(q))
    return ((q.astype(np.int64) - zero) * scale).astype(np.float32)


def bias_int32(
    bias: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(q_b, s_b)`` with ``s_b = s_x * s_w`` and ``q_b = round(b / s_b)``; None on overflow."""
    scale = (np.float32(input_scale) * np.asarray(weight_scale, np.float32)).astype(np.float32)
    scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
    q = np.round(np.asarray(bias, np.float64) / scale.astype(np.float64))
    if q.size and np.max(np.abs(q)) > _INT32_MAX:
        return None
    return q.astype(np.int32), scale
