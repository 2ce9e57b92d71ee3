"""Fold Mul/Add/Sub/Div by constants into an adjacent Conv, ConvTranspose, Gemm or MatMul.

Each candidate node computes ``y = x * s + t`` with ``s, t`` from one constant operand
(``x*c``: s=c; ``x+c``: t=c; ``x-c``: t=-c; ``c-x``: s=-1, t=c; ``x/c``: s=1/c; ``c/x`` is not
affine). The constant must vary along the layer's channel axis only (NCHW axis 1 for
convolutions, the last axis for Gemm/MatMul), so it reduces to per-channel vectors.

After the layer, ``L(x) * s + t`` with output channel ``o``::

    W'[o] = W[o] * s[o]          b' = b * s + t

(ConvTranspose keeps output channels on weight axis 1 within each group; Gemm folds ``t/beta``
into ``C``; a MatMul's bias is the constant ``Add`` that follows it.)

Before the layer, ``L(x * s + t)`` with input channel ``i`` (for a grouped conv, output channel
``o`` reads input channels ``grp(o) * I/g + i``)::

    W'[o, i, k] = W[o, i, k] * s[i]          b'[o] = b[o] + sum_{i,k} W[o, i, k] * t[i]

The shift part is exact only without zero padding (padded zeros would have been ``t``), so with
padding only a pure scale folds; ConvTranspose scatters, so an input shift never folds into it,
and a MatMul needs a bias Add to take it. Run to a fixed point, chains such as
``Conv -> Mul -> Add`` (Paddle exports) collapse into the Conv.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple, cast

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import (
    add_initializer,
    attr,
    channel_vector,
    const_array,
    const_array_of,
    drop_if_unused,
    exclusive_const_reason,
    input_rank,
    is_private_to,
    label,
    replace_value,
    required,
    uses_of,
    write_const_input,
)
from onnxprune.passes.base import Pass, PassReport

__all__ = ["LAYER_OPS", "FoldAffinePass", "Layer", "find_layer", "fold_output_affine"]

logger = logging.getLogger(__name__)

LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
AFFINE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})


@dataclasses.dataclass
class Layer:
    """A linear layer with constant weights; a MatMul may own the constant bias Add after it."""

    node: ir.Node
    bias_add: ir.Node | None = None

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.node).outputs[0]

    @property
    def weight(self) -> np.ndarray:
        array = const_array(self.node.inputs[1])
        assert array is not None
        return array

    @property
    def conv_like(self) -> bool:
        return self.node.op_type in ("Conv", "ConvTranspose")

    @property
    def group(self) -> int:
        return int(attr(self.node, "group", 1))

    @property
    def trans_b(self) -> bool:
        return bool(attr(self.node, "transB", 0))

    def out_channels(self) -> int:
        w, op = self.weight, self.node.op_type
        if op == "Conv":
            return w.shape[0]
        if op == "ConvTranspose":
            return w.shape[1] * self.group
        return w.shape[0] if op == "Gemm" and self.trans_b else w.shape[1]

    def in_channels(self) -> int:
        w, op = self.weight, self.node.op_type
        if op == "Conv":
            return w.shape[1] * self.group
        if op == "ConvTranspose":
            return w.shape[0]
        return w.shape[1] if op == "Gemm" and self.trans_b else w.shape[0]

    def out_rank(self) -> int | None:
        if self.conv_like:
            return self.weight.ndim
        if self.node.op_type == "Gemm":
            return 2
        shape = self.node.outputs[0].shape or required(self.node.inputs[0]).shape
        return None if shape is None else max(len(shape), 1)

    def out_axis(self) -> int:
        """The channel axis of the output, counted from the end (negative)."""
        return 1 - self.weight.ndim if self.conv_like else -1

    def in_axis(self) -> int:
        if self.conv_like:
            return 1 - self.weight.ndim
        return -2 if self.node.op_type == "Gemm" and attr(self.node, "transA", 0) else -1


def layer_reason(node: ir.Node) -> str | None:
    """Why ``node`` cannot have its weights rewritten, or None when it can."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    reason = exclusive_const_reason(weight, node, "weight")
    if weight is None or reason:
        return reason or f"{node.op_type} has no weight input"
    ndim = const_array_of(weight).ndim  # exclusive_const_reason found it constant
    if node.op_type in ("Conv", "ConvTranspose") and ndim < 3:
        return f"{node.op_type} weight has rank {ndim}"
    if node.op_type in ("Gemm", "MatMul") and ndim != 2:
        return f"{node.op_type} weight is not 2-D (rank {ndim})"
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return exclusive_const_reason(bias, node, "bias")


def _matmul_bias(add: ir.Node) -> ir.Node | None:
    """The MatMul whose constant per-column bias ``add`` is, or None."""
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None
    for i in (0, 1):
        x, c = add.inputs[i], add.inputs[1 - i]
        mm = x.producer() if x is not None else None
        if mm is None or mm.op_type != "MatMul" or mm.domain != "" or layer_reason(mm):
            continue
        array = const_array(c)
        if x is None or array is None or not is_private_to(x, add):
            continue
        if exclusive_const_reason(c, add, "bias"):
            continue
        layer = Layer(mm)
        if channel_vector(array, layer.out_rank(), -1, layer.out_channels())[0] is not None:
            return mm
    return None


def find_layer(value: ir.Value) -> tuple[Layer | None, str | None]:
    """The foldable layer producing ``value``: ``(layer, None)``, ``(None, reason)``, or neither."""
    node = value.producer()
    if node is None or node.domain != "":
        return None, None
    if node.op_type == "Add":
        mm = _matmul_bias(node)
        return (Layer(mm, node), None) if mm is not None else (None, None)
    if node.op_type not in LAYER_OPS:
        return None, None
    reason = layer_reason(node)
    return (None, reason) if reason else (Layer(node), None)


def _following_bias(mm: ir.Node) -> ir.Node | None:
    uses = uses_of(mm.outputs[0])
    if len(uses) == 1 and _matmul_bias(uses[0].node) is mm:
        return uses[0].node
    return None


def _write(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, dtype: np.dtype) -> None:
    # Only a layer's input 1 is a weight; Gemm's C, a Conv's B and a bias Add's constant are biases.
    role = "weight" if index == 1 and node.op_type in LAYER_OPS else "bias"
    base = f"{node.name or node.op_type}_{role}"
    write_const_input(graph, node, index, array.astype(dtype), base)


def _gemm_add(graph: ir.Graph, node: ir.Node, scale: np.ndarray, shift: np.ndarray) -> None:
    """Make Gemm's ``beta * C`` become ``beta * C * scale + shift``."""
    dtype = const_array_of(node.inputs[1]).dtype  # layer_reason checked the weight
    beta = float(attr(node, "beta", 1.0))
    c = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    if c is not None and beta != 0.0:
        _write(graph, node, 2, c.astype(np.float64) * scale + shift / beta, dtype)
    elif np.any(shift != 0):
        _write(graph, node, 2, shift, dtype)
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)


def _add_bias(graph: ir.Graph, layer: Layer, scale: np.ndarray, shift: np.ndarray) -> ir.Value:
    """Apply ``bias' = bias * scale + shift``; returns the value now carrying the layer output."""
    node, dtype = layer.node, layer.weight.dtype
    if node.op_type == "Gemm":
        _gemm_add(graph, node, scale, shift)
    elif layer.conv_like:
        bias = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        if bias is not None or np.any(shift != 0):
            old = np.zeros_like(shift) if bias is None else bias.astype(np.float64)
            _write(graph, node, 2, old * scale + shift, dtype)
    elif layer.bias_add is not None:
        add = layer.bias_add
        index = 1 if const_array(add.inputs[1]) is not None else 0
        stored = const_array_of(add.inputs[index])  # _matmul_bias checked the constant
        bias = channel_vector(stored, layer.out_rank(), -1, scale.size)[0]
        assert bias is not None  # _matmul_bias checked it is a channel vector
        _write(graph, add, index, bias * scale + shift, dtype)
    elif np.any(shift != 0):
        # A bare MatMul gets a new bias Add, named after the MatMul (deterministic).
        base = node.name or "MatMul"
        const = add_initializer(graph, f"{base}_bias", shift.astype(dtype))
        add = ir.node("Add", [node.outputs[0], const], name=f"{base}_bias_add")
        graph.insert_after(node, add)
        layer.bias_add = add
    return layer.output


def fold_output_affine(
    graph: ir.Graph, layer: Layer, scale: np.ndarray, shift: np.ndarray
) -> ir.Value:
    """Rewrite ``layer`` to compute ``layer(x) * scale + shift`` (per output channel).

    Returns the value that now carries the scaled output (the layer's or its bias Add's).
    """
    w, op = layer.weight.astype(np.float64), layer.node.op_type
    if op == "Conv":
        w = w * scale.reshape(-1, *[1] * (w.ndim - 1))
    elif op == "ConvTranspose":
        g = layer.group
        grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        w = (grouped * scale.reshape(g, 1, -1, *[1] * (w.ndim - 2))).reshape(w.shape)
    else:
        w = w * (scale[:, None] if op == "Gemm" and layer.trans_b else scale[None, :])
    _write(graph, layer.node, 1, w, layer.weight.dtype)
    return _add_bias(graph, layer, scale, shift)


def fold_input_affine(graph: ir.Graph, layer: Layer, scale: np.ndarray, shift: np.ndarray) -> None:
    """Rewrite ``layer`` so that ``layer'(x) == layer(x * scale + shift)`` (per input channel)."""
    node, w = layer.node, layer.weight.astype(np.float64)
    if node.op_type == "Conv":
        out, per = w.shape[0], w.shape[1]
        # Input channel read by (output channel o, in-group channel i) in a grouped conv.
        index = (np.arange(out) // (out // layer.group))[:, None] * per + np.arange(per)[None, :]
        tail = (1,) * (w.ndim - 2)
        bias_shift = (w * shift[index].reshape(out, per, *tail)).sum(axis=tuple(range(1, w.ndim)))
        w = w * scale[index].reshape(out, per, *tail)
    elif node.op_type == "ConvTranspose":
        bias_shift = np.zeros(layer.out_channels())
        w = w * scale.reshape(-1, *(1,) * (w.ndim - 1))
    else:
        transposed = node.op_type == "Gemm" and layer.trans_b
        kn = w.T if transposed else w
        bias_shift = shift @ kn
        if node.op_type == "Gemm":
            bias_shift = bias_shift * float(attr(node, "alpha", 1.0))
        kn = kn * scale[:, None]
        w = kn.T if transposed else kn
    _write(graph, node, 1, w, layer.weight.dtype)
    if np.any(bias_shift != 0):
        _add_bias(graph, layer, np.ones_like(bias_shift), bias_shift)


def _shift_reason(layer: Layer) -> str | None:
    """Why an input shift cannot fold into ``layer`` exactly, or None."""
    node = layer.node
    if node.op_type == "Conv":
        pads = attr(node, "pads", None) or ()
        if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or any(pads):
            return "zero padding: shift t is not exact"
    if node.op_type == "ConvTranspose":
        return "ConvTranspose scatters its input: an input shift t is not exact"
    if node.op_type == "MatMul" and layer.bias_add is None:
        return "MatMul has no bias Add to absorb the shift"
    return None


class _Operands(NamedTuple):
    x: ir.Value
    const: ir.Value
    const_first: bool


def _split(node: ir.Node) -> _Operands | None:
    """The operands of a binary node with exactly one constant operand."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    a, b = node.inputs[0], node.inputs[1]
    if (const_array(a) is None) == (const_array(b) is None):
        return None
    return _Operands(b, a, True) if const_array(a) is not None else _Operands(a, b, False)


def _params(op: str, cv: np.ndarray, c_first: bool) -> tuple[np.ndarray, np.ndarray] | str:
    """Per-channel ``(scale, shift)`` of ``x (op) c`` (or ``c (op) x``), or a reason."""
    one, zero = np.ones_like(cv), np.zeros_like(cv)
    if op == "Mul":
        return cv, zero
    if op == "Add":
        return one, cv
    if op == "Sub":
        return (-one, cv) if c_first else (one, -cv)
    if c_first:
        return "c / x is not affine in x"
    if np.any(cv == 0):
        return "division by a zero constant"
    return 1.0 / cv, zero


class FoldAffinePass(Pass):
    """Fold constant Mul/Add/Sub/Div into adjacent Conv/ConvTranspose/Gemm/MatMul weights.

    Cases, tried per node in this order until nothing changes:

    1. Output side: the node consumes a layer's private output -> scale weights and bias.
    2. Input side: the node's private output is a layer's data input -> scale input
       channels; a shift also moves into the bias where that is exact (see module docstring).
    """

    name = "fold-affine"

    def run(self, model: ir.Model, report: PassReport) -> None:
        graph = model.graph
        while True:
            # Skips are taken from the final sweep only, so each is reported once.
            sweep = PassReport(self.name)
            for node in list(graph):
                if node.graph is graph and node.domain == "" and node.op_type in AFFINE_OPS:
                    split = _split(node)
                    if split and not self._try_after(graph, node, split, sweep):
                        self._try_before(graph, node, split, sweep)
            report.changes.extend(sweep.changes)
            if not sweep.changes:
                report.skips.extend(sweep.skips)
                return

    def _try_after(
        self, graph: ir.Graph, node: ir.Node, split: _Operands, report: PassReport
    ) -> bool:
        x, c, c_first = split
        layer, reason = find_layer(x)
        if layer is None:
            producer = x.producer()
            if reason and producer is not None:  # a reason is always about the producer
                report.skip(label(node), f"{label(producer)}: {reason}")
            return False
        if layer.bias_add is None and _matmul_bias(node) is layer.node:
            return False  # the node is the MatMul's bias itself
        array = const_array(c)
        assert array is not None
        cv, reason = channel_vector(array, layer.out_rank(), layer.out_axis(), layer.out_channels())
        # channel_vector gives a vector exactly when it gives no reason
        params = reason or _params(node.op_type, cast(np.ndarray, cv), c_first)
        if isinstance(params, str):
            return self._skip(report, node, params)
        if not is_private_to(x, node):
            return self._skip(report, node, f"output of {label(layer.node)} has other users")
        if layer.node.op_type == "MatMul" and layer.bias_add is None and np.any(params[1] != 0):
            return self._skip(report, node, "MatMul has no bias Add to absorb the shift")
        if array.dtype != layer.weight.dtype:
            return self._skip(report, node, f"constant dtype {array.dtype} != weight dtype")
        what, target = label(node), label(layer.node)
        out = fold_output_affine(graph, layer, *params)
        replace_value(node.outputs[0], out)
        graph.remove(node, safe=True)
        drop_if_unused(graph, c)
        report.change(target, f"folded {what} (output side)")
        logger.debug("folded %s into %s (output side)", what, target)
        return True

    def _try_before(
        self, graph: ir.Graph, node: ir.Node, split: _Operands, report: PassReport
    ) -> bool:
        x, c, c_first = split
        y = node.outputs[0]
        layers = [u.node for u in y.uses() if u.idx == 0 and u.node.op_type in LAYER_OPS]
        if not layers or layers[0].domain != "":
            return False
        consumer = layers[0]
        if not is_private_to(y, consumer):
            return self._skip(report, node, f"output feeds other nodes besides {label(consumer)}")
        reason = layer_reason(consumer)
        if reason:
            return self._skip(report, node, f"{label(consumer)}: {reason}")
        bias_add = _following_bias(consumer) if consumer.op_type == "MatMul" else None
        layer = Layer(consumer, bias_add)
        array = const_array(c)
        assert array is not None
        rank, reason = input_rank(x, array)
        if not reason:
            cv, reason = channel_vector(array, rank, layer.in_axis(), layer.in_channels())
        # channel_vector gives a vector exactly when it gives no reason
        params = reason or _params(node.op_type, cast(np.ndarray, cv), c_first)
        if isinstance(params, str):
            return self._skip(report, node, params)
        if np.any(params[1] != 0) and (reason := _shift_reason(layer)):
            return self._skip(report, node, reason)
        if array.dtype != layer.weight.dtype:
            return self._skip(report, node, f"constant dtype {array.dtype} != weight dtype")
        what, target = label(node), label(consumer)
        fold_input_affine(graph, layer, *params)
        consumer.replace_input_with(0, x)
        graph.remove(node, safe=True)
        drop_if_unused(graph, c)
        report.change(target, f"folded {what} (input side)")
        logger.debug("folded %s into %s (input side)", what, target)
        return True

    @staticmethod
    def _skip(report: PassReport, node: ir.Node, reason: str) -> bool:
        report.skip(label(node), reason)
        return False
