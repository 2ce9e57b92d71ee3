"""Elementwise ops, activations and Softmax/LogSoftmax."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)

from onnxprune.recover.ops._base import (
    RULES,
    Rule,
    Tensor,
    _rule,
)

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


@_rule("BitShift")
def _bit_shift(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, y = inputs
    if attrs["direction"] == "RIGHT":
        return [torch.bitwise_right_shift(x, y)]
    return [torch.bitwise_left_shift(x, y)]


@_rule("Where")
def _where(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]


def _constant_bound(value: Any, dtype: torch.dtype) -> float | int | None:
    """A present Clip bound as a Python number, or None when it must stay a tensor."""
    if isinstance(value, Tensor) and (value.requires_grad or value.numel() != 1):
        return None
    number = value.item() if isinstance(value, Tensor) else value
    return float(number) if dtype.is_floating_point else int(number)


@_rule("Clip")
def _clip(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    """Constant bounds replay as ``hardtanh`` (both, float) or ``clamp``: one fused backward
    kernel, where the ``maximum``/``minimum`` pair's (which splits ties) took a third of a
    MobileNetV2 training step (ReLU6 is a Clip)."""
    x = inputs[0]
    low = attrs.get("min") if opset < 11 else (inputs[1] if len(inputs) > 1 else None)
    high = attrs.get("max") if opset < 11 else (inputs[2] if len(inputs) > 2 else None)
    lo = None if low is None else _constant_bound(low, x.dtype)
    hi = None if high is None else _constant_bound(high, x.dtype)
    if (lo is None) == (low is None) and (hi is None) == (high is None):  # all constant
        if lo is None and hi is None:
            return [x]
        if x.is_floating_point() and lo is not None and hi is not None:
            return [F.hardtanh(x, float(lo), float(hi))]
        return [torch.clamp(x, lo, hi)]
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
