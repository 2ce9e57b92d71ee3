"""CPU ISA detection and the u8s8 saturation remedy for AVX2 without VNNI.

On AVX2 without VNNI, onnxruntime's u8 x s8 kernels use ``vpmaddubsw``, which multiplies
uint8 activations by int8 weights and adds *adjacent pairs* of products into an int16 with
saturation. With activations up to 255, a pair ``(q_i, q_j)`` of quantized weights of one
output channel, adjacent in the reduction (K) order, can saturate when
``255 * (|q_i| + |q_j|) > 32767``, i.e. ``|q_i| + |q_j| > 128``. VNNI (``vpdpbusd``)
accumulates in int32 and has no such problem.

Remedies, per weight:

* ``coarsen``: only for output channels with a saturating pair, raise the scale to
  ``s_c' = max_pair(|w_i| + |w_j|) / 128`` (and a little more until no pair exceeds 128 after
  rounding); other channels keep full 8-bit precision.
* ``reduce-range``: 7-bit weights (``qmax = 63``) everywhere, so ``|q_i| + |q_j| <= 126``.
* ``none``: keep the 8-bit weights.

``auto`` builds the candidates and keeps the one with the best measured output SQNR on
calibration data (onnxruntime optimizations on, i.e. the real kernels). The K order of a
Conv is not fixed by ONNX (onnxruntime may reorder to ``kh, kw, C``), so Conv pairs are
checked in both the ``C, kh, kw`` and the ``kh, kw, C`` order.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from onnxprune.bench.system import cpu_info
from onnxprune.quant.params import QParams, quantize, weight_qparams

__all__ = [
    "REMEDIES",
    "cpu_isa",
    "limit_pairs",
    "needs_u8s8_remedy",
    "remedy_params",
    "saturating_channels",
]

logger = logging.getLogger(__name__)

REMEDIES = ("auto", "none", "coarsen", "reduce-range")
_PAIR_LIMIT = 128  # 255 * 128 = 32640 <= 32767
_MAX_BUMPS = 64


@functools.lru_cache(maxsize=1)
def cpu_isa() -> dict[str, bool]:
    """Relevant x86 flags of this CPU (:func:`onnxprune.bench.system.cpu_info`; all False
    where they cannot be read)."""
    _, isa = cpu_info()
    return {
        "avx2": isa["avx2"],
        "avx512_vnni": isa["avx512_vnni"],
        "avx_vnni": isa["avx_vnni"],
        "amx_int8": isa["amx"],
    }


def needs_u8s8_remedy() -> bool:
    """True on AVX2 CPUs without VNNI (where u8s8 pair sums saturate in int16)."""
    isa = cpu_isa()
    return isa["avx2"] and not (isa["avx512_vnni"] or isa["avx_vnni"] or isa["amx_int8"])


def _k_orders(array: np.ndarray, axis: int, op_type: str) -> list[np.ndarray]:
    """``array`` as ``[channels, K]`` in each plausible reduction order."""
    moved = np.moveaxis(array, axis, 0)
    orders = [moved.reshape(moved.shape[0], -1)]
    if op_type in ("Conv", "ConvTranspose") and moved.ndim > 2:
        orders.append(np.moveaxis(moved, 1, -1).reshape(moved.shape[0], -1))
    return orders


def _max_pair(array: np.ndarray, axis: int, op_type: str) -> np.ndarray:
    """Per output channel, the largest ``|a_i| + |a_j|`` over adjacent K pairs."""
    result = np.zeros(array.shape[axis])
    for matrix in _k_orders(np.abs(array.astype(np.float64)), axis, op_type):
        k = matrix.shape[1] - matrix.shape[1] % 2
        if k:
            result = np.maximum(result, (matrix[:, :k:2] + matrix[:, 1:k:2]).max(axis=1))
    return result


def saturating_channels(q: np.ndarray, axis: int, op_type: str) -> np.ndarray:
    """Boolean per output channel: some adjacent K pair has ``|q_i| + |q_j| > 128``."""
    return _max_pair(q, axis, op_type) > _PAIR_LIMIT


def limit_pairs(q: np.ndarray, axis: int, op_type: str) -> np.ndarray:
    """``q`` (integers) with every adjacent K pair brought to ``|q_i| + |q_j| <= 128`` in each
    reduction order, by lowering the larger magnitude of a pair that exceeds it by the
    excess: the smallest change that keeps a model free of u8s8 saturation when its weights
    are changed after quantization (distillation). Values in no such pair are unchanged."""
    out = np.moveaxis(np.array(q, dtype=np.int64), axis, 0)
    shape = out.shape
    conv = op_type in ("Conv", "ConvTranspose") and out.ndim > 2
    for _ in range(_MAX_BUMPS):
        changed = False
        for last in (False, True) if conv else (False,):
            view = np.moveaxis(out, 1, -1) if last else out
            flat = view.reshape(shape[0], -1).copy()
            k = flat.shape[1] - flat.shape[1] % 2
            a, b = flat[:, :k:2], flat[:, 1:k:2]
            excess = np.abs(a) + np.abs(b) - _PAIR_LIMIT
            bad = excess > 0
            if not bad.any():
                continue
            changed = True
            larger_a = np.abs(a) >= np.abs(b)
            a_new = np.where(bad & larger_a, a - np.sign(a) * excess, a)
            b_new = np.where(bad & ~larger_a, b - np.sign(b) * excess, b)
            flat[:, :k:2], flat[:, 1:k:2] = a_new, b_new
            restored = flat.reshape(view.shape)
            out = np.moveaxis(restored, -1, 1) if last else restored
        if not changed:
            break
    return np.moveaxis(out, 0, axis).astype(np.asarray(q).dtype)


def _bump_until_safe(weight: np.ndarray, params: QParams, op_type: str) -> QParams:
    assert params.axis is not None
    scale = params.scale.astype(np.float64).copy()
    for _ in range(_MAX_BUMPS):
        flagged = saturating_channels(quantize(weight, params), params.axis, op_type)
        if not flagged.any():
            break
        scale[flagged] *= 1.0 + 1.0 / _PAIR_LIMIT
        params = weight_qparams(weight, params.axis, scale=scale)
    return params


def remedy_params(
    weight: np.ndarray, axis: int | None, op_type: str, remedy: str
) -> tuple[QParams, int]:
    """Weight parameters under ``remedy``; returns them and the number of affected channels."""
    if remedy == "reduce-range":
        return weight_qparams(weight, axis, qmax=63), weight.shape[axis] if axis is not None else 1
    params = weight_qparams(weight, axis)
    if remedy == "none" or axis is None:
        return params, 0
    flagged = saturating_channels(quantize(weight, params), axis, op_type)
    if not flagged.any():
        return params, 0
    # Scale so that the worst pair is exactly 128 units, then bump until rounding is safe.
    shape = [1] * weight.ndim
    shape[axis] = -1
    units = weight.astype(np.float64) / params.scale.astype(np.float64).reshape(shape)
    factor = np.maximum(_max_pair(units, axis, op_type) / _PAIR_LIMIT, 1.0)
    scale = np.where(flagged, params.scale * factor, params.scale)
    coarse = weight_qparams(weight, axis, scale=scale)
    return _bump_until_safe(weight, coarse, op_type), int(flagged.sum())
