"""Fold an explicit constant-zero ``Pad`` into the padding of the Conv / AveragePool it feeds.

``y = Conv(Pad(x, p, 0), W, b; pads=q)`` equals ``Conv(x, W, b; pads=q + p_spatial)``: a
convolution's own padding also inserts zeros around the spatial dims, and padding twice adds
the amounts. The same holds for ``AveragePool`` when the inserted zeros are counted in the
average (``count_include_pad=1``), which they are when they come from a ``Pad``; so the pool
must count its padding after folding, which is exact when the pool had no padding of its own
or already counted it.

Rewrite cases (the ``Pad`` output is read only by such consumers, on their data input):

1. ``Pad`` (opset >= 11: ``pads``/``constant_value`` inputs, opset 18 ``axes``; opset < 11:
   attributes) in ``constant`` mode with value 0 (or none), pads >= 0 and zero on the batch
   and channel axes, read by ``Conv`` (``auto_pad`` NOTSET or VALID): the Conv's ``pads``
   become ``q + p`` per spatial axis (begins, then ends), ``auto_pad`` is dropped.
2. The same ``Pad`` read by ``AveragePool`` without ``auto_pad`` SAME_*: ``pads`` add and
   ``count_include_pad`` becomes 1 (skipped when the pool had its own pads and excluded them).

Every consumer is rewritten or none is; the ``Pad`` then has no user and is removed.
``MaxPool`` is never a target: its implicit padding is -inf, not 0. Why this matters: int8
quantizers leave a lone ``Pad`` between two int8 kernels as a float island (dequantize, pad,
quantize); folded, the convolution pads int8 data itself.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxprune.passes._shape_vectors import constant_array
from onnxprune.passes.base import Pass, PassReport
from onnxprune.passes.constant_folding import node_label

__all__ = ["FoldPadPass"]

logger = logging.getLogger(__name__)

_TARGETS = ("Conv", "AveragePool")


def _pads(node: ir.Node) -> list[int] | str:
    """The Pad's amounts over every axis (begins then ends), or a reason it cannot fold."""
    mode = node.attributes.get_string("mode", "constant")
    if mode != "constant":
        return f"mode {mode!r} is not constant"
    if "pads" in node.attributes:  # opset < 11
        pads = list(node.attributes["pads"].as_ints())
        value = node.attributes.get_float("value", 0.0)
    else:
        array = constant_array(node.inputs[1] if len(node.inputs) > 1 else None)
        if array is None:
            return "pads is not a constant"
        pads = [int(v) for v in array.reshape(-1)]
        value_input = node.inputs[2] if len(node.inputs) > 2 else None
        fill = constant_array(value_input) if value_input is not None else np.zeros(1)
        if fill is None:
            return "constant_value is not a constant"
        value = float(fill.reshape(-1)[0]) if fill.size else 0.0
        axes_input = node.inputs[3] if len(node.inputs) > 3 else None
        if axes_input is not None:
            pads_or_reason = _expand_axes(node, axes_input, pads)
            if isinstance(pads_or_reason, str):
                return pads_or_reason
            pads = pads_or_reason
    if value != 0.0:
        return f"pad value {value} is not zero"
    if any(p < 0 for p in pads):
        return "negative pads (cropping)"
    rank = len(pads) // 2
    if rank < 3 or any(pads[i] or pads[rank + i] for i in (0, 1)):
        return "pads the batch or channel axis"
    return pads


def _expand_axes(node: ir.Node, axes_input: ir.Value, pads: list[int]) -> list[int] | str:
    """Opset 18 ``axes``: spread the given pads over every axis of the input."""
    axes = constant_array(axes_input)
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if axes is None or shape is None:
        return "axes is not a constant or the input rank is unknown"
    rank = len(shape)
    full = [0] * (2 * rank)
    count = len(axes.reshape(-1))
    for k, axis in enumerate(int(a) % rank for a in axes.reshape(-1)):
        full[axis], full[rank + axis] = pads[k], pads[count + k]
    return full


def _why_not(consumer: ir.Node, value: ir.Value, pads: list[int]) -> str | None:
    """None when ``consumer`` can absorb the padding of ``value``, else the reason."""
    label = node_label(consumer)
    if consumer.op_type not in _TARGETS or consumer.domain not in ("", "ai.onnx"):
        return f"read by {consumer.op_type} {label}"
    if list(consumer.inputs).count(value) != 1 or consumer.inputs[0] is not value:
        return f"read by {label} on an input other than its data"
    auto_pad = consumer.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return f"{label} has auto_pad {auto_pad}"
    if consumer.op_type == "AveragePool":
        own = list(consumer.attributes["pads"].as_ints()) if "pads" in consumer.attributes else []
        if any(own) and not consumer.attributes.get_int("count_include_pad", 0):
            return f"{label} excludes its own padding from the average"
        kernel = list(consumer.attributes["kernel_shape"].as_ints())
        total = _summed(consumer, pads)
        if any(p >= k for p, k in zip(total, kernel + kernel, strict=False)):
            return f"{label}: padding would reach the kernel size (onnxruntime refuses it)"
    return None


def _summed(consumer: ir.Node, pads: list[int]) -> list[int]:
    """The consumer's own spatial pads (begins, ends) plus the Pad's."""
    rank = len(pads) // 2
    extra = pads[2:rank] + pads[rank + 2 :]
    own = list(consumer.attributes["pads"].as_ints()) if "pads" in consumer.attributes else []
    if consumer.attributes.get_string("auto_pad", "NOTSET") == "VALID" or not own:
        own = [0] * len(extra)
    return [a + b for a, b in zip(own, extra, strict=True)]


def _absorb(consumer: ir.Node, pads: list[int]) -> None:
    total = _summed(consumer, pads)
    consumer.attributes.pop("auto_pad", None)
    consumer.attributes["pads"] = ir.AttrInt64s("pads", total)
    if consumer.op_type == "AveragePool":
        consumer.attributes["count_include_pad"] = ir.AttrInt64("count_include_pad", 1)


class FoldPadPass(Pass):
    """Fold constant-zero ``Pad`` nodes into the padding of the Conv/AveragePool reading them."""

    name = "fold-pad"

    def run(self, model: ir.Model, report: PassReport) -> None:
        for node in list(model.graph):
            if node.op_type == "Pad" and node.domain in ("", "ai.onnx"):
                self._try_fold(model, node, report)

    def _try_fold(self, model: ir.Model, node: ir.Node, report: PassReport) -> bool:
        """True if ``node`` was folded into its consumers and removed."""
        label = node_label(node)
        output = node.outputs[0]
        uses = output.uses()
        if output.is_graph_output() or not uses:
            return False  # nothing reads it as a tensor we could rewrite: not a candidate
        consumers = [use.node for use in uses]
        if all(c.op_type not in _TARGETS for c in consumers):
            return False  # a Pad before other ops is not this pass's business
        pads = _pads(node)
        if isinstance(pads, str):
            report.skip(label, pads)
            return False
        for consumer in consumers:
            reason = _why_not(consumer, output, pads)
            if reason is not None:
                report.skip(label, reason)
                return False
        for consumer in dict.fromkeys(consumers):
            _absorb(consumer, pads)
            consumer.replace_input_with(0, node.inputs[0])
            report.change(node_label(consumer), f"absorbed {label} (pads {pads})")
        model.graph.remove(node, safe=True)
        return True
