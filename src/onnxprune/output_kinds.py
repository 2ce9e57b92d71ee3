"""Which graph outputs are class scores (where top-1 agreement means something).

Top-1 agreement is the share of rows whose argmax agrees. For logits, probabilities and
per-step class scores (an OCR head) that is the question a user asks; for an embedding, a
hidden state or a pooled feature it is noise (the largest coordinate of an embedding has no
meaning). So the comparator reports top-1 only for outputs judged to be class scores:

1. by name: a name containing ``embed``, ``feature``, ``hidden``, ``pool``, ``state`` or
   ``encod`` is not a class score; one containing ``logit``, ``prob``, ``score``, ``class``,
   ``pred`` or ``label`` is;
2. otherwise by the op that produces it, looking through ops that do not change values
   (Identity, Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Cast, Quantize/Dequantize) and
   through global pooling, Relu (a 1x1-conv classifier head) and a Mul/Div by a constant
   (dequantization scales): a linear layer (Gemm, MatMul, Conv, their integer and fused
   forms, or an Add of a constant bias to one), Softmax, LogSoftmax or Sigmoid makes class
   scores; anything else (a normalisation, Tanh, a Div by a norm, a residual Add of two
   computed tensors) does not.

Integer outputs are labels and always compared exactly (not decided here).
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["class_score_outputs"]

_NOT_SCORES = ("embed", "feature", "hidden", "pool", "state", "encod")
_SCORES = ("logit", "prob", "score", "class", "pred", "label")
_THROUGH = frozenset(
    {
        "Identity",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "Cast",
        "QuantizeLinear",
        "DequantizeLinear",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Relu",
    }
)
_LINEAR = frozenset(
    {
        "Gemm",
        "MatMul",
        "Conv",
        "ConvTranspose",
        "MatMulInteger",
        "ConvInteger",
        "QGemm",
        "QLinearMatMul",
        "QLinearConv",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "FusedMatMul",
        "FusedGemm",
    }
)
_SCORE_OPS = _LINEAR | {"Softmax", "LogSoftmax", "Sigmoid"}


def _is_const(value: ir.Value | None) -> bool:
    if value is None or value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _next(node: ir.Node) -> ir.Value | None:
    """The input to follow through a value-preserving op, or None to stop."""
    if node.op_type in _THROUGH and node.inputs:
        return node.inputs[0]
    if node.op_type in ("Mul", "Div") and len(node.inputs) == 2 and _is_const(node.inputs[1]):
        return node.inputs[0]  # a constant rescale (dequantization scales)
    if node.op_type == "Mul" and len(node.inputs) == 2 and _is_const(node.inputs[0]):
        return node.inputs[1]
    if node.op_type == "Mul" and node.inputs and _produced_by(node.inputs[0], "Cast"):
        return node.inputs[0]  # dynamic dequantization: Cast(integer product) * scale
    return None


def _produced_by(value: ir.Value | None, op_type: str) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == op_type


def _source(value: ir.Value | None) -> ir.Node | None:
    """The producer of ``value``, looking through value-preserving ops."""
    node = value.producer() if value is not None else None
    for _ in range(64):
        following = _next(node) if node is not None else None
        if following is None:
            break
        node = following.producer()
    return node


def _is_scores(value: ir.Value) -> bool:
    name = (value.name or "").lower()
    if any(word in name for word in _NOT_SCORES):
        return False
    if any(word in name for word in _SCORES):
        return True
    node = _source(value)
    if node is None:
        return False
    if node.op_type in _SCORE_OPS:
        return True
    if node.op_type in ("Add", "Sub"):
        # A bias added to a linear layer's output: at most one input is computed by a
        # linear layer and the other is a constant.
        linear = [v for v in node.inputs if (s := _source(v)) is not None and s.op_type in _LINEAR]
        return bool(linear) and any(_is_const(v) for v in node.inputs)
    return False


def class_score_outputs(model: ir.Model) -> frozenset[str]:
    """Names of the graph outputs that are class scores (see the module docstring)."""
    return frozenset(str(v.name) for v in model.graph.outputs if _is_scores(v))
