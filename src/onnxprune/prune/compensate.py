"""Fold the removed channels' expected contribution into the next layer.

When input channel ``c`` of a consumer layer is removed, the layer loses the term
``W[:, c] * x_c``. Replacing ``x_c`` by its expected value keeps the layer's output right
on average: ``b'[o] = b[o] + sum_{c removed} E[x_c] * sum_k W[o, c, k]`` (the kernel sum
for a Conv; exact in the interior, approximate where zero padding covers the kernel).

``E[x_c]`` comes from calibration data when there is any (:class:`InputMean`, measured by
:func:`onnxprune.prune.activations.removed_input_means` on the unpruned model): the mean of
the channel over every sample and position. A channel that takes the same value on every
sample (a dead or saturated unit, or a constant pushed through a zero-padded depthwise conv,
which is constant in the interior and different near the borders) is compensated *exactly*:
its contribution ``conv(M_c, W[:, c])`` over the per-position map ``M_c`` is the bias term
above plus a border residual ``R[o, h, w]``, which is added after the layer as a constant.

Without data ``E[x_c]`` is estimated from the producer: when the consumer's input is
``act(z)`` with ``z = producer(x) + bias`` (Conv/Gemm bias, or a MatMul followed by a
constant Add) and ``act`` is ReLU-like, ``E[x_c] ~ act(bias_c)``: the weighted sum of a
zero-mean input contributes zero on average. A depthwise Conv does not mix channels, so its
input's own estimate is carried through: ``E[z_c] = b_c + E[in_c] * sum_k K_c[k]``.
Channels whose producer cannot be traced this way are left alone (no compensation rather
than a guess).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import (
    add_initializer,
    const_numpy,
    const_shape,
    fresh_name,
    name_of,
    required,
    uses_of,
)
from onnxprune.prune.channels import SpaceKey
from onnxprune.prune.recover import conv_rows

__all__ = [
    "InputMean",
    "add_border_corrections",
    "add_to_bias",
    "bias_value",
    "compensate_removed_inputs",
    "compensation_requests",
    "expected_input",
]

#: A channel is constant when every sample is within this (relative) distance of the first.
CONSTANT_RTOL = 1e-6


@dataclasses.dataclass
class InputMean:
    """Measured statistics of a consumer input's removed channels.

    ``mean[c]`` is ``E[x_c]`` over samples and positions (full channel length; channels
    not measured are 0). ``constant[c]`` is the channel's value at every position (without
    the batch axis), for channels identical on every sample.
    """

    mean: np.ndarray
    constant: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


_ACTS = {
    "Relu": lambda b, _n: np.maximum(b, 0),
    "Identity": lambda b, _n: b,
}


def _clip(bias: np.ndarray, node: ir.Node) -> np.ndarray:
    lo = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] else None
    hi = node.inputs[2].const_value if len(node.inputs) > 2 and node.inputs[2] else None
    low = float(lo.numpy()) if lo is not None else -np.inf
    high = float(hi.numpy()) if hi is not None else np.inf
    return np.clip(bias, low, high)


def _depthwise_mean(node: ir.Node, bias: np.ndarray) -> np.ndarray:
    """``E[z_c] = b_c + E[in_c] * sum_k K_c[k]`` for a depthwise Conv (interior value)."""
    source = expected_input(required(node.inputs[0]))
    if source is None:
        return bias
    kernel = const_numpy(node.inputs[1]).astype(np.float64)
    return bias + source * kernel.reshape(len(kernel), -1).sum(axis=1)


def _is_depthwise(node: ir.Node) -> bool:
    group = node.attributes.get("group")
    weight = required(node.inputs[1]).const_value
    if group is None or weight is None or len(weight.shape) < 3:
        return False
    return group.value > 1 and weight.shape[1] == 1 and weight.shape[0] == group.value


def _producer_bias(value: ir.Value) -> np.ndarray | None:
    """``E[z]`` of the per-channel pre-activation ``value`` (Conv/Gemm bias or Add const)."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2].const_value
        if bias is None or len(bias.shape) != 1:
            return None
        if node.op_type == "Conv" and _is_depthwise(node):
            return _depthwise_mean(node, bias.numpy().astype(np.float64))
        return bias.numpy()
    if node.op_type == "Add":
        for operand in node.inputs:
            if operand is not None and operand.const_value is not None:
                array = operand.const_value.numpy()
                return array.reshape(-1) if array.ndim <= 1 else None
    return None


def expected_input(value: ir.Value) -> np.ndarray | None:
    """``E[x]`` per channel of ``value`` estimated from its producer, or None."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Clip":
        bias = _producer_bias(required(node.inputs[0]))
        return None if bias is None else _clip(bias, node)
    if node.op_type in _ACTS:
        bias = _producer_bias(required(node.inputs[0]))
        return None if bias is None else _ACTS[node.op_type](bias, node)
    return None


def _in_axis(node: ir.Node) -> int | None:
    """The weight axis indexing a compensable layer's input channels, or None."""
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
        return None
    if node.op_type == "Conv":
        group = node.attributes.get("group")
        return 1 if group is None or group.value == 1 else None
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return 1 if trans_b is not None and trans_b.value else 0
    if node.op_type == "MatMul" and len(node.inputs[1].const_value.shape) == 2:
        return 0 if _matmul_bias(node) is not None else None
    return None


def _matmul_bias(node: ir.Node) -> ir.Value | None:
    """The 1-D constant added right after a MatMul (its bias), when it is the only use."""
    uses = uses_of(node.outputs[0])
    if len(uses) != 1 or uses[0][0].op_type != "Add":
        return None
    add = uses[0][0]
    other = add.inputs[1 - uses[0][1]]
    if other is None or other.const_value is None or len(other.const_value.shape) != 1:
        return None
    return other


def compensation_requests(
    model: ir.Model, kept: Mapping[SpaceKey, np.ndarray]
) -> dict[str, tuple[int, np.ndarray]]:
    """Consumer inputs that lose channels: ``{value: (channel axis, removed channels)}``."""
    requests: dict[str, tuple[int, np.ndarray]] = {}
    for node in model.graph:
        axis = _in_axis(node)
        if axis is None or (idx := kept.get((name_of(node.inputs[1]), axis))) is None:
            continue
        size = const_shape(node.inputs[1])[axis]
        removed = np.setdiff1d(np.arange(size), idx)
        channel_axis = -1 if node.op_type == "MatMul" else 1
        name = name_of(node.inputs[0])
        if name in requests:
            removed = np.union1d(removed, requests[name][1])
        requests[name] = (channel_axis, removed)
    return requests


def _per_channel(node: ir.Node, w: np.ndarray, in_axis: int) -> np.ndarray:
    """The weight as ``[O, C]``, summed over kernel taps (alpha folded in for Gemm)."""
    if node.op_type == "Conv":
        return w.sum(axis=tuple(range(2, w.ndim)))
    matrix = w if in_axis == 1 else w.T
    alpha = node.attributes.get("alpha")
    return matrix * (1.0 if alpha is None else float(alpha.value))


def compensate_removed_inputs(
    model: ir.Model,
    kept: Mapping[SpaceKey, np.ndarray],
    expected: Mapping[str, np.ndarray | InputMean],
    *,
    zeroed: bool = False,
) -> list[str]:
    """Adjust consumer biases for removed input channels; call *before* slicing.

    Args:
        model: The model before removal (weights still full size).
        kept: Kept indices per pruned space (from ``kept_indices``).
        expected: ``E[x]`` per channel (or an :class:`InputMean`) by consumer input name.
        zeroed: The removal that follows zeroes units instead of slicing them (a probe):
            a bias created here keeps every output channel, zero on the removed ones.

    Returns:
        Labels of the layers whose bias was adjusted.
    """
    adjusted: list[str] = []
    for node in list(model.graph):
        in_axis = _in_axis(node)
        if in_axis is None or node.inputs[0] is None:
            continue
        idx = kept.get((name_of(node.inputs[1]), in_axis))
        stats = expected.get(name_of(node.inputs[0]))
        if idx is None or stats is None:
            continue
        mean = stats.mean if isinstance(stats, InputMean) else stats
        w = const_numpy(node.inputs[1]).astype(np.float64)
        removed = np.setdiff1d(np.arange(w.shape[in_axis]), idx)
        delta = _per_channel(node, w, in_axis)[:, removed] @ mean[removed].astype(np.float64)
        if not np.any(delta):
            continue
        out_kept = kept.get((name_of(node.outputs[0]), 1 if node.op_type != "MatMul" else -1))
        add_to_bias(model, node, delta, out_kept, zeroed=zeroed)
        adjusted.append(node.name or name_of(node.outputs[0]))
    return adjusted


def _ints_attr(node: ir.Node, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    attr = node.attributes.get(name)
    return tuple(attr.value) if attr else default


def _conv_output(node: ir.Node, maps: np.ndarray, kernel: np.ndarray) -> np.ndarray | None:
    """``conv(maps, kernel)`` without bias as ``[O, H', W']`` (2-D convs only), or None."""
    auto_pad = node.attributes.get("auto_pad")
    if maps.ndim != 3 or kernel.ndim != 4 or (auto_pad and auto_pad.value not in ("NOTSET",)):
        return None
    (sh, sw), (dh, dw) = (_ints_attr(node, k, (1, 1)) for k in ("strides", "dilations"))
    pads = _ints_attr(node, "pads", (0, 0, 0, 0))
    kh, kw = kernel.shape[2:]
    oh = (maps.shape[1] + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (maps.shape[2] + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    pos = np.stack(np.unravel_index(np.arange(oh * ow), (1, oh, ow)), axis=1)
    rows = conv_rows(maps[None], node, (kh, kw), pos)
    return (rows @ kernel.reshape(len(kernel), -1).T).T.reshape(-1, oh, ow)


def border_corrections(
    model: ir.Model, kept: Mapping[SpaceKey, np.ndarray], expected: Mapping[str, object]
) -> dict[str, np.ndarray]:
    """Exact residual of constant removed channels of Conv consumers; call before slicing.

    For the constant channels ``S`` of a consumer input, ``R = conv(M_S, W[:, S]) -
    sum_{c in S} E[x_c] * sum_k W[:, c, k]`` (what the bias term misses near zero-padded
    borders), restricted to the kept output channels, by consumer output name.
    """
    found: dict[str, np.ndarray] = {}
    for node in model.graph:
        stats = expected.get(name_of(node.inputs[0])) if node.inputs else None
        if node.op_type != "Conv" or _in_axis(node) != 1 or not isinstance(stats, InputMean):
            continue
        idx = kept.get((name_of(node.inputs[1]), 1))
        w = const_numpy(node.inputs[1]).astype(np.float64)
        channels = [c for c in sorted(stats.constant) if idx is not None and c not in set(idx)]
        if not channels:
            continue
        maps = np.stack([stats.constant[c] for c in channels]).astype(np.float64)
        full = _conv_output(node, maps, w[:, channels])
        if full is None:
            continue
        interior = _per_channel(node, w, 1)[:, channels] @ stats.mean[channels]
        residual = full - interior[:, None, None]
        if np.max(np.abs(residual), initial=0.0) <= CONSTANT_RTOL * (np.max(np.abs(full)) + 1e-30):
            continue
        out_kept = kept.get((name_of(node.outputs[0]), 1))
        found[name_of(node.outputs[0])] = residual if out_kept is None else residual[out_kept]
    return found


def add_border_corrections(model: ir.Model, corrections: Mapping[str, np.ndarray]) -> int:
    """Add each ``R`` after its layer (``y' = y + R``); call after slicing. Returns the count.

    The layer keeps its output name (refits look it up); a graph output keeps its name too,
    so there the layer's output is renamed and the Add takes the name.
    """
    producers = {n.outputs[0].name: n for n in model.graph if n.outputs}
    for name, residual in corrections.items():
        node = producers[name]
        value = node.outputs[0]
        dtype = const_numpy(node.inputs[1]).dtype
        const = add_initializer(model.graph, f"{name}_border", residual[None].astype(dtype))
        fresh = fresh_name(model.graph, f"{name}_compensated")
        if value.is_graph_output():
            value.name, fresh = fresh, name
        out = ir.Value(name=fresh, shape=value.shape, type=value.type)
        value.replace_all_uses_with(out, replace_graph_outputs=True)
        model.graph.insert_after(node, ir.Node("", "Add", [value, const], outputs=[out]))
    return len(corrections)


def bias_value(node: ir.Node) -> tuple[ir.Value | None, float]:
    """The layer's bias value and the scale it is multiplied by (Gemm ``beta``)."""
    if node.op_type == "MatMul":
        return _matmul_bias(node), 1.0
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value:
        beta = node.attributes.get("beta")
        scale = float(beta.value) if node.op_type == "Gemm" and beta is not None else 1.0
        return node.inputs[2], scale
    return None, 1.0


def add_to_bias(
    model: ir.Model,
    node: ir.Node,
    delta: np.ndarray,
    out_kept: np.ndarray | None,
    *,
    zeroed: bool = False,
) -> None:
    """Add ``delta`` to the layer's bias. A bias that did not exist is not part of the
    analysis, so the removal that follows would not touch it: it is created already cut to
    the kept output channels, or (``zeroed``) full size with the removed channels at zero."""
    dtype = const_numpy(node.inputs[1]).dtype
    bias, scale = bias_value(node)
    if bias is not None:
        new = const_numpy(bias).astype(np.float64) + delta / scale
        if len(bias.uses()) > 1:
            fresh = add_initializer(model.graph, f"{bias.name}_comp", new.astype(dtype))
            user, index = (node, 2) if node.op_type != "MatMul" else _matmul_bias_use(node, bias)
            user.replace_input_with(index, fresh)
        else:
            bias.const_value = ir.tensor(new.astype(dtype), name=bias.name)
        return
    if out_kept is not None and zeroed:
        full = np.zeros_like(delta)
        full[out_kept] = delta[out_kept]
        delta = full
    elif out_kept is not None:
        delta = delta[out_kept]
    fresh = add_initializer(model.graph, f"{node.name or 'layer'}_bias", delta.astype(dtype))
    if len(node.inputs) == 2:
        node.resize_inputs(3)
    node.replace_input_with(2, fresh)


def _matmul_bias_use(node: ir.Node, bias: ir.Value) -> tuple[ir.Node, int]:
    add = uses_of(node.outputs[0])[0][0]
    return add, list(add.inputs).index(bias)
