"""Linear layers, convolutions, normalisations, pooling, Resize and Q/DQ (see the package
docstring for the padding, Resize and straight-through math)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)

from onnxprune.recover.ops._base import (
    _QRANGE,
    TORCH_DTYPES,
    Tensor,
    _ints,
    _rule,
    _torch_pad,
)

# ---------------------------------------------------------------- linear layers


@_rule("MatMul")
def _matmul(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [torch.matmul(inputs[0], inputs[1])]


@_rule("Gemm")
def _gemm(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    a, b = inputs[0], inputs[1]
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + attrs.get("beta", 1.0) * inputs[2]
    return [y]


def _same_pads(
    sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    mode: str,
) -> list[int]:
    begins, ends = [], []
    for n, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        total = max(0, (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n)
        small, large = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else large)
        ends.append(large if mode == "SAME_UPPER" else small)
    return begins + ends


def _window(x: Tensor, attrs: dict[str, Any], kernel: Sequence[int]) -> tuple[list[int], ...]:
    """Strides, dilations and ONNX pads of a conv/pool window over ``x``'s spatial axes."""
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(list(x.shape[2:]), kernel, strides, dilations, auto_pad)
    elif auto_pad == "VALID":
        pads = [0] * (2 * rank)
    else:
        pads = list(attrs.get("pads", [0] * (2 * rank)))
    return strides, dilations, pads


def _symmetric(pads: Sequence[int]) -> list[int] | None:
    rank = len(pads) // 2
    return list(pads[:rank]) if list(pads[:rank]) == list(pads[rank:]) else None


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@_rule("Conv")
def _conv(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    kernel = list(w.shape[2:])
    strides, dilations, pads = _window(x, attrs, kernel)
    padding = _symmetric(pads)
    if padding is None:
        x = F.pad(x, _torch_pad(pads))
        padding = [0] * len(kernel)
    conv = _CONV[len(kernel)]
    return [conv(x, w, bias, strides, padding, dilations, attrs.get("group", 1))]


@_rule("ConvTranspose")
def _conv_transpose(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    rank = w.dim() - 2
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    out_pad = list(attrs.get("output_padding", [0] * rank))
    groups = attrs.get("group", 1)
    y = _CONV_T[rank](x, w, None, strides, 0, 0, groups, dilations)
    sizes = list(x.shape[2:])
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if "output_shape" in attrs or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if "output_shape" in attrs:
            target = list(attrs["output_shape"])[-rank:]
        else:
            target = [n * s for n, s in zip(sizes, strides, strict=True)]
        totals = [
            s * (n - 1) + op + (k - 1) * d + 1 - t
            for n, s, op, k, d, t in zip(
                sizes, strides, out_pad, kernel, dilations, target, strict=True
            )
        ]
        upper = auto_pad == "SAME_UPPER"
        begins = [t // 2 if upper else t - t // 2 for t in totals]
        pads = begins + [t - b for t, b in zip(totals, begins, strict=True)]
    elif auto_pad == "VALID":
        pads = [0] * (2 * rank)
    else:
        pads = list(attrs.get("pads", [0] * (2 * rank)))
    if any(out_pad):
        y = F.pad(y, _torch_pad([0] * rank + out_pad))
    y = F.pad(y, [-p for p in _torch_pad(pads)])
    if bias is not None:
        y = y + bias.reshape([1, -1] + [1] * rank)
    return [y]


@_rule("BatchNormalization")
def _batch_norm(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, scale, bias, mean, var = inputs[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    eps = attrs.get("epsilon", 1e-5)
    inv = scale.reshape(shape) / torch.sqrt(var.reshape(shape) + eps)
    return [(x - mean.reshape(shape)) * inv + bias.reshape(shape)]


@_rule("InstanceNormalization")
def _instance_norm(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, scale, bias = inputs
    dims = list(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - mean) / torch.sqrt(var + attrs.get("epsilon", 1e-5))
    return [y * scale.reshape(shape) + bias.reshape(shape)]


@_rule("LayerNormalization")
def _layer_norm(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = attrs.get("axis", -1) % x.dim()
    dims = list(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(var + attrs.get("epsilon", 1e-5))
    y = (x - mean) * inv * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv]


# ---------------------------------------------------------------- pooling


def _pool_setup(x: Tensor, attrs: dict[str, Any]) -> tuple[list[int], ...]:
    kernel = list(attrs["kernel_shape"])
    strides, dilations, pads = _window(x, attrs, kernel)
    return kernel, strides, dilations, pads


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@_rule("MaxPool")
def _max_pool(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    kernel, strides, dilations, pads = _pool_setup(x, attrs)
    if any(pads):
        x = F.pad(x, _torch_pad(pads), value=-math.inf)
    pool = _MAX_POOL[len(kernel)]
    y = pool(x, kernel, strides, 0, dilations, ceil_mode=bool(attrs.get("ceil_mode", 0)))
    return [y, None]


@_rule("AveragePool")
def _avg_pool(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    kernel, strides, dilations, pads = _pool_setup(x, attrs)
    if any(d != 1 for d in dilations):
        raise NotImplementedError("AveragePool with dilations")
    pool = _AVG_POOL[len(kernel)]
    ceil = bool(attrs.get("ceil_mode", 0))
    if not any(pads):
        return [pool(x, kernel, strides, 0, ceil_mode=ceil)]
    include = float(attrs.get("count_include_pad", 0))
    total = pool(F.pad(x, _torch_pad(pads)), kernel, strides, 0, ceil_mode=ceil)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    count = pool(F.pad(ones, _torch_pad(pads), value=include), kernel, strides, 0, ceil_mode=ceil)
    return [total / count]


@_rule("GlobalAveragePool")
def _global_avg(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    return [x.mean(dim=list(range(2, x.dim())), keepdim=True)]


@_rule("GlobalMaxPool")
def _global_max(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    return [x.amax(dim=list(range(2, x.dim())), keepdim=True)]


# ---------------------------------------------------------------- Resize


def _source_coords(out: int, size: int, scale: float, mode: str) -> Tensor:
    x = torch.arange(out, dtype=torch.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "align_corners":
        return x * (size - 1) / (out - 1) if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    raise NotImplementedError(f"Resize coordinate_transformation_mode {mode}")


def _nearest(coords: Tensor, mode: str) -> Tensor:
    if mode == "round_prefer_ceil":
        return torch.floor(coords + 0.5)
    if mode == "floor":
        return torch.floor(coords)
    if mode == "ceil":
        return torch.ceil(coords)
    return torch.ceil(coords - 0.5)  # round_prefer_floor (the default)


@_rule("Resize")
def _resize(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    scales_in = inputs[2] if len(inputs) > 2 else None
    sizes_in = inputs[3] if len(inputs) > 3 else None
    if opset < 11:
        scales_in = inputs[1]
    if sizes_in is not None and sizes_in.numel():
        sizes = _ints(sizes_in)
        scales = [o / n for o, n in zip(sizes, x.shape, strict=True)]
    elif scales_in is not None:
        scales = [float(s) for s in scales_in.reshape(-1).tolist()]
        sizes = [math.floor(n * s) for n, s in zip(x.shape, scales, strict=True)]
    else:
        raise ValueError("Resize has neither scales nor sizes")
    mode = attrs.get("mode", "nearest")
    transform = attrs.get(
        "coordinate_transformation_mode", "half_pixel" if opset >= 11 else "asymmetric"
    )
    if mode not in ("nearest", "linear"):
        raise NotImplementedError(f"Resize mode {mode}")
    for axis, (n, out, scale) in enumerate(zip(x.shape, sizes, scales, strict=True)):
        if n == out and scale == 1.0:
            continue
        coords = _source_coords(out, n, scale, transform)
        if mode == "nearest":
            index = _nearest(coords, attrs.get("nearest_mode", "round_prefer_floor"))
            x = x.index_select(axis, index.clamp(0, n - 1).long())
            continue
        coords = coords.clamp(0, n - 1)
        low = torch.floor(coords).long()
        high = torch.clamp(low + 1, max=n - 1)
        weight = (coords - low).to(x.dtype).reshape([-1] + [1] * (x.dim() - axis - 1))
        x = x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight
    return [x]


# ---------------------------------------------------------------- quantization


def _per_axis(t: Tensor, x: Tensor, axis: int) -> Tensor:
    if t.dim() == 0 or (t.numel() == 1 and x.dim() == 0):
        return t.reshape([])
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


def fake_quantize(
    x: Tensor, scale: Tensor, zero: Tensor | None, axis: int, qtype: torch.dtype
) -> Tensor:
    """``clamp(round(x / scale) + zero)`` as float values, rounding straight-through."""
    s = _per_axis(scale, x, axis)
    t = x / s
    rounded = t + (torch.round(t) - t).detach()
    z = 0.0 if zero is None else _per_axis(zero, x, axis).to(x.dtype)
    low, high = _QRANGE.get(qtype, (-128, 127))
    return torch.clamp(rounded + z, low, high)


@_rule("QuantizeLinear")
def _quantize(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, scale = inputs[0], inputs[1]
    zero = inputs[2] if len(inputs) > 2 else None
    qtype = (
        zero.dtype
        if zero is not None
        else TORCH_DTYPES.get(attrs.get("output_dtype", 2), torch.uint8)
    )
    return [fake_quantize(x, scale, zero, attrs.get("axis", 1), qtype)]


@_rule("DequantizeLinear")
def _dequantize(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, scale = inputs[0], inputs[1]
    zero = inputs[2] if len(inputs) > 2 else None
    axis = attrs.get("axis", 1)
    xf = x.to(scale.dtype)
    if zero is not None:
        xf = xf - _per_axis(zero, xf, axis).to(scale.dtype)
    return [xf * _per_axis(scale, xf, axis)]
