"""Without data: fold the removed channels' expected contribution into the next bias.

When input channel ``c`` of a consumer layer is removed, the layer loses the term
``W[:, c] * x_c``. Replacing ``x_c`` by its expected value keeps the layer's output right
on average: ``b'[o] = b[o] + sum_{c removed} E[x_c] * sum_k W[o, c, k]`` (the kernel sum
for a Conv; exact in the interior, approximate where zero padding covers the kernel).

Without calibration data ``E[x_c]`` is estimated from the producer: when the consumer's
input is ``act(z)`` with ``z = producer(x) + bias`` (Conv/Gemm bias, or a MatMul followed
by a constant Add) and ``act`` is ReLU-like, ``E[x_c] ~ act(bias_c)``: the weighted sum of
a zero-mean input contributes zero on average. Channels whose producer cannot be traced
this way are left alone (no compensation rather than a guess).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import add_initializer
from onnxprune.prune.channels import SpaceKey

__all__ = ["compensate_removed_inputs", "expected_input"]

_ACTS = {
    "Relu": lambda b, _n: np.maximum(b, 0),
    "Identity": lambda b, _n: b,
}


def _clip(bias: np.ndarray, node: ir.Node) -> np.ndarray | None:
    lo = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] else None
    hi = node.inputs[2].const_value if len(node.inputs) > 2 and node.inputs[2] else None
    low = float(lo.numpy()) if lo is not None else -np.inf
    high = float(hi.numpy()) if hi is not None else np.inf
    return np.clip(bias, low, high)


def _producer_bias(value: ir.Value) -> np.ndarray | None:
    """The per-channel bias added right before ``value`` (Conv/Gemm bias or Add const)."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2].const_value
        return None if bias is None or len(bias.shape) != 1 else bias.numpy()
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
        bias = _producer_bias(node.inputs[0])
        return None if bias is None else _clip(bias, node)
    if node.op_type in _ACTS:
        bias = _producer_bias(node.inputs[0])
        return None if bias is None else _ACTS[node.op_type](bias, node)
    return None


def compensate_removed_inputs(
    model: ir.Model, kept: Mapping[SpaceKey, np.ndarray], expected: Mapping[str, np.ndarray]
) -> list[str]:
    """Adjust consumer biases for removed input channels; call *before* slicing.

    Args:
        model: The model before removal (weights still full size).
        kept: Kept indices per pruned space (from ``kept_indices``).
        expected: ``E[x]`` per channel for consumer input values, by value name.

    Returns:
        Labels of the layers whose bias was adjusted.
    """
    adjusted = []
    for node in list(model.graph):
        if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        x = node.inputs[0]
        trans_b = node.attributes.get("transB")
        in_axis = 1 if node.op_type == "Conv" or (trans_b is not None and trans_b.value) else 0
        idx = kept.get((weight.name, in_axis))
        mean = expected.get(x.name)
        if idx is None or mean is None or weight.const_value is None:
            continue
        if (
            node.op_type == "Conv"
            and node.attributes.get("group") not in (None,)
            and (node.attributes["group"].value != 1)
        ):
            continue
        w = weight.const_value.numpy().astype(np.float64)
        removed = np.setdiff1d(np.arange(w.shape[in_axis]), idx)
        if node.op_type == "Conv":
            per_channel = w.sum(axis=tuple(range(2, w.ndim)))  # [O, C]
        else:
            per_channel = w if in_axis == 1 else w.T  # [O, C]
        delta = per_channel[:, removed] @ mean[removed].astype(np.float64)
        if not np.any(delta):
            continue
        out_kept = kept.get((node.outputs[0].name, 1))
        _add_to_bias(model, node, delta, out_kept)
        adjusted.append(node.name or node.outputs[0].name)
    return adjusted


def _add_to_bias(
    model: ir.Model, node: ir.Node, delta: np.ndarray, out_kept: np.ndarray | None
) -> None:
    """Add ``delta`` to the layer's bias. A bias that did not exist is created already
    cut to the kept output channels: it is not part of the analysis, so the removal that
    follows would not slice it."""
    dtype = node.inputs[1].const_value.numpy().dtype
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value:
        bias = node.inputs[2]
        scale = 1.0
        beta = node.attributes.get("beta")
        if node.op_type == "Gemm" and beta is not None:
            scale = float(beta.value)
        new = bias.const_value.numpy().astype(np.float64) + delta / scale
        if len(bias.uses()) > 1:
            fresh = add_initializer(model.graph, f"{bias.name}_comp", new.astype(dtype))
            node.replace_input_with(2, fresh)
        else:
            bias.const_value = ir.tensor(new.astype(dtype), name=bias.name)
        return
    if out_kept is not None:
        delta = delta[out_kept]
    fresh = add_initializer(model.graph, f"{node.name or 'layer'}_bias", delta.astype(dtype))
    if len(node.inputs) == 2:
        node.resize_inputs(3)
    node.replace_input_with(2, fresh)
