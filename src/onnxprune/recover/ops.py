"""Replay rules: one function per ONNX op (default domain), written with torch ops.

A rule takes the node's inputs (torch tensors; ``None`` for an omitted optional input), its
attributes as plain Python values and the opset version, and returns the node's outputs in
order (``None`` for an output it does not compute). Rules are differentiable wherever the ONNX
op is; integer and shape computations run on int64 tensors and are constant in practice.

Math that is not just "call the torch function":

* Conv / pooling pads are ONNX ``[b1, b2, ..., e1, e2, ...]``; asymmetric pads are applied with
  ``F.pad`` (``-inf`` for MaxPool). ``auto_pad=SAME_*``: ``total = max(0, (ceil(n/s) - 1) * s
  + (k - 1) * d + 1 - n)``, the odd pixel at the end (UPPER) or the start (LOWER).
* AveragePool with explicit pads is ``sum-pool(x padded with 0) / sum-pool(ones padded with
  c)``, c = 1 when ``count_include_pad`` else 0; any divisor torch uses cancels in the ratio.
* ConvTranspose: the full transposed convolution, ``output_padding`` appended at the end,
  then ``pads`` cropped (negative F.pad); with ``output_shape``, ``total = s * (n - 1) +
  output_padding + (k - 1) * d + 1 - output_shape`` split as for SAME.
* Resize (nearest, linear): per axis, output coordinate -> input coordinate by the
  ``coordinate_transformation_mode``, then a gather (nearest, with ``nearest_mode``) or a
  two-tap linear interpolation, separably over the resized axes.
* QuantizeLinear rounds with a straight-through estimator: ``q = t + (round(t) - t).detach()``
  with ``t = x / scale``, so gradients pass the rounding as identity (and are zero where the
  saturation clamps); the result stays a float tensor holding integer values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)

__all__ = ["RULES", "TORCH_DTYPES", "Rule", "has_rule"]

Tensor = torch.Tensor
Rule = Callable[[list[Any], dict[str, Any], int], list[Any]]

#: ONNX TensorProto data type -> torch dtype (the types a replay can hold).
TORCH_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}
_QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767)}

RULES: dict[str, Rule] = {}


def has_rule(op_type: str, domain: str = "") -> bool:
    return domain in ("", "ai.onnx") and op_type in RULES


def _rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(attrs: dict[str, Any], inputs: list[Any], index: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or input ``index`` (newer); None if neither."""
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    return None


# ---------------------------------------------------------------- elementwise


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Rule:
    return lambda i, a, o: [fn(i[0], i[1])]


def _div(x: Tensor, y: Tensor) -> Tensor:
    if x.is_floating_point():
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


def _pow(x: Tensor, y: Tensor) -> Tensor:
    return torch.pow(x, y.to(x.dtype) if x.is_floating_point() else y).to(x.dtype)


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Pow": _pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "BitShift": torch.bitwise_left_shift,
}
for _name, _fn in _BINARY.items():
    RULES[_name] = _binary(_fn)


def _unary(fn: Callable[[Tensor], Tensor]) -> Rule:
    return lambda i, a, o: [fn(i[0])]


_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Reciprocal": torch.reciprocal,
    "Abs": torch.abs,
    "Exp": torch.exp,
    "Log": torch.log,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,
    "Sign": torch.sign,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "Identity": lambda x: x,
}
for _name, _ufn in _UNARY.items():
    RULES[_name] = _unary(_ufn)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Rule:
    def run(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
        result = inputs[0]
        for other in inputs[1:]:
            result = fn(result, other)
        return [result]

    return run


RULES["Max"] = _variadic(torch.maximum)
RULES["Min"] = _variadic(torch.minimum)
RULES["Sum"] = _variadic(torch.add)


@_rule("Mean")
def _mean(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [_variadic(torch.add)(inputs, attrs, opset)[0] / len(inputs)]


@_rule("IsInf")
def _isinf(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    pos, neg = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    return [(torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))]


@_rule("Where")
def _where(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]


@_rule("Clip")
def _clip(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    low = attrs.get("min") if opset < 11 else (inputs[1] if len(inputs) > 1 else None)
    high = attrs.get("max") if opset < 11 else (inputs[2] if len(inputs) > 2 else None)
    if low is not None:
        x = torch.maximum(x, torch.as_tensor(low, dtype=x.dtype))
    if high is not None:
        x = torch.minimum(x, torch.as_tensor(high, dtype=x.dtype))
    return [x]


@_rule("LeakyRelu")
def _leaky(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))]


@_rule("Elu")
def _elu(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [F.elu(inputs[0], attrs.get("alpha", 1.0))]


@_rule("Selu")
def _selu(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    alpha, gamma = (
        attrs.get("alpha", 1.67326319217681884765625),
        attrs.get("gamma", 1.05070102214813232421875),
    )
    x = inputs[0]
    return [gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))]


@_rule("PRelu")
def _prelu(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, slope = inputs
    return [torch.where(x >= 0, x, x * slope)]


@_rule("HardSigmoid")
def _hard_sigmoid(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return [torch.clamp(alpha * inputs[0] + beta, 0.0, 1.0)]


@_rule("HardSwish")
def _hard_swish(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    return [x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)]


@_rule("Gelu")
def _gelu(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))]


def _softmax_like(fn: Callable[..., Tensor]) -> Rule:
    def run(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
        x = inputs[0]
        if opset >= 13:
            return [fn(x, dim=attrs.get("axis", -1))]
        # Before opset 13: coerced to 2-D at ``axis`` (default 1), normalised over the tail.
        axis = attrs.get("axis", 1) % max(x.dim(), 1)
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return [fn(flat, dim=1).reshape(x.shape)]

    return run


RULES["Softmax"] = _softmax_like(torch.softmax)
RULES["LogSoftmax"] = _softmax_like(torch.log_softmax)


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


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX ``[b1..bn, e1..en]`` -> F.pad's ``[bn, en, ..., b1, e1]``."""
    rank = len(pads) // 2
    out: list[int] = []
    for axis in reversed(range(rank)):
        out += [pads[axis], pads[axis + rank]]
    return out


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


# ---------------------------------------------------------------- reductions


def _reduce(fn: Callable[[Tensor, list[int], bool], Tensor], axes_input_since: int) -> Rule:
    def run(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
        x = inputs[0]
        keep = bool(attrs.get("keepdims", 1))
        axes = _axes(attrs, inputs, 1) if opset >= axes_input_since else attrs.get("axes")
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, [a % max(x.dim(), 1) for a in axes], keep)]

    return run


_REDUCERS: dict[str, Callable[[Tensor, list[int], bool], Tensor]] = {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),  # noqa: PLW0108 (defined below)
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(dim=d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


def _prod(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    for axis in sorted(dims, reverse=True):
        x = x.prod(dim=axis, keepdim=keep)
    return x


for _name, _red in _REDUCERS.items():
    RULES[_name] = _reduce(_red, 13 if _name == "ReduceSum" else 18)


def _arg(fn: Callable[..., Tensor]) -> Rule:
    def run(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
        x = inputs[0]
        axis = attrs.get("axis", 0) % x.dim()
        keep = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
            return [x.shape[axis] - 1 - flipped]
        return [fn(x, dim=axis, keepdim=keep)]

    return run


RULES["ArgMax"] = _arg(torch.argmax)
RULES["ArgMin"] = _arg(torch.argmin)


@_rule("CumSum")
def _cumsum(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, axis = inputs[0], int(inputs[1].reshape(-1)[0]) % inputs[0].dim()
    if attrs.get("reverse", 0):
        x = x.flip(axis)
    y = torch.cumsum(x, dim=axis).to(x.dtype)
    if attrs.get("exclusive", 0):
        y = y - x
    return [y.flip(axis) if attrs.get("reverse", 0) else y]


# ---------------------------------------------------------------- shapes and indexing


@_rule("Shape")
def _shape(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    dims = list(inputs[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


@_rule("Size")
def _size(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [torch.tensor(inputs[0].numel(), dtype=torch.int64)]


@_rule("Reshape")
def _reshape(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    shape = _ints(inputs[1]) if opset >= 5 else list(attrs["shape"])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


@_rule("Flatten")
def _flatten(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    axis = attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@_rule("Transpose")
def _transpose(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    perm = attrs.get("perm", list(reversed(range(x.dim()))))
    return [x.permute(*perm)]


@_rule("Squeeze")
def _squeeze(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    axes = _axes(attrs, inputs, 1)
    if axes is None:
        return [x.squeeze()]
    keep = [d for i, d in enumerate(x.shape) if i not in {a % x.dim() for a in axes}]
    return [x.reshape(keep)]


@_rule("Unsqueeze")
def _unsqueeze(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    axes = _axes(attrs, inputs, 1) or []
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return [x]


@_rule("Concat")
def _concat(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [torch.cat([t for t in inputs if t is not None], dim=attrs["axis"])]


@_rule("Split")
def _split(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    axis = attrs.get("axis", 0) % x.dim()
    if "split" in attrs:
        sizes = list(attrs["split"])
    elif len(inputs) > 1 and inputs[1] is not None:
        sizes = _ints(inputs[1])
    else:
        count = attrs.get("num_outputs", attrs.get("_outputs", 1))
        size = math.ceil(x.shape[axis] / count)
        sizes = [size] * (count - 1) + [x.shape[axis] - size * (count - 1)]
    return list(torch.split(x, sizes, dim=axis))


@_rule("Slice")
def _slice(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    if opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        axes = axes if axes is not None else list(range(len(starts)))
        steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
        steps = steps if steps is not None else [1] * len(starts)
    for start, end, raw_axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = raw_axis % x.dim()
        indices = range(*slice(start, end, step).indices(x.shape[axis]))
        if step == 1:
            x = x.narrow(axis, indices.start, len(indices))
        else:
            x = x.index_select(axis, torch.tensor(list(indices), dtype=torch.int64))
    return [x]


@_rule("Gather")
def _gather(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, indices = inputs
    axis = attrs.get("axis", 0) % x.dim()
    indices = indices.long()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    picked = x.index_select(axis, indices.reshape(-1))
    shape = list(x.shape[:axis]) + list(indices.shape) + list(x.shape[axis + 1 :])
    return [picked.reshape(shape)]


@_rule("GatherElements")
def _gather_elements(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, indices = inputs
    axis = attrs.get("axis", 0) % x.dim()
    indices = indices.long()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    return [torch.gather(x, axis, indices)]


@_rule("GatherND")
def _gather_nd(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, indices = inputs[0], inputs[1].long()
    batch = attrs.get("batch_dims", 0)
    depth = indices.shape[-1]
    lead = list(x.shape[:batch])
    xs = x.reshape(math.prod(lead), *x.shape[batch:])
    idx = indices.reshape(math.prod(lead), -1, depth)
    rows = []
    for b in range(xs.shape[0]):
        sizes = torch.tensor(list(xs.shape[1 : 1 + depth]), dtype=torch.int64)
        ib = torch.where(idx[b] < 0, idx[b] + sizes, idx[b])
        rows.append(xs[b][tuple(ib.unbind(-1))])
    out = torch.stack(rows)
    return [out.reshape(*indices.shape[:-1], *x.shape[batch + depth :])]


@_rule("Expand")
def _expand(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1])))
    return [x.expand(shape)]


@_rule("Tile")
def _tile(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [inputs[0].repeat(*_ints(inputs[1]))]


@_rule("ConstantOfShape")
def _constant_of_shape(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    value = attrs.get("value")
    fill = torch.zeros(1) if value is None else torch.from_numpy(np.array(value).reshape(1))
    return [fill.reshape([]).expand(_ints(inputs[0])).clone()]


@_rule("Range")
def _range(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    start, limit, delta = (t.reshape([]) for t in inputs)
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


@_rule("Constant")
def _constant(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in attrs:
            array = np.array(attrs[key])
            if key in ("value_float", "value_floats"):
                array = array.astype(np.float32)
            elif key in ("value_int", "value_ints"):
                array = array.astype(np.int64)
            return [torch.from_numpy(np.array(array, copy=True))]
    raise NotImplementedError("Constant without a numeric value attribute")


@_rule("Cast")
def _cast(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [inputs[0].to(TORCH_DTYPES[attrs["to"]])]


@_rule("CastLike")
def _cast_like(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [inputs[0].to(inputs[1].dtype)]


@_rule("Dropout")
def _dropout(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [inputs[0], torch.ones_like(inputs[0], dtype=torch.bool)]


@_rule("Einsum")
def _einsum(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [torch.einsum(attrs["equation"], *inputs)]


@_rule("Pad")
def _pad(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    if opset < 11:
        pads, value = list(attrs["pads"]), attrs.get("value", 0.0)
        axes = list(range(x.dim()))
    else:
        pads = _ints(inputs[1])
        value = inputs[2].reshape(-1)[0].item() if len(inputs) > 2 and inputs[2] is not None else 0
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        axes = [a % x.dim() for a in axes] if axes is not None else list(range(x.dim()))
    full = [0] * (2 * x.dim())
    for i, axis in enumerate(axes):
        full[axis], full[axis + x.dim()] = pads[i], pads[i + len(axes)]
    mode = attrs.get("mode", "constant")
    if mode == "constant":
        return [F.pad(x, _torch_pad(full), value=value)]
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    # torch pads up to the last three axes in these modes: fold the leading axes into one.
    rank = x.dim()
    padded = [a for a in range(rank) if full[a] or full[a + rank]]
    if not padded:
        return [x]
    first = padded[0]
    if rank - first > 3:
        raise NotImplementedError(f"Pad mode {mode} on more than the last three axes")
    lead, tail = list(x.shape[:first]), list(x.shape[first:])
    y = F.pad(
        x.reshape(1, -1, *tail),
        _torch_pad(full[first:rank] + full[rank + first :]),
        mode=torch_mode,
    )
    return [y.reshape(*lead, *y.shape[2:])]


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
    else:
        scales = [float(s) for s in scales_in.reshape(-1).tolist()]
        sizes = [math.floor(n * s) for n, s in zip(x.shape, scales, strict=True)]
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
