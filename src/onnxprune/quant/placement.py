"""Where Q/DQ pairs go, so that onnxruntime fuses them into integer kernels.

onnxruntime turns ``DQ -> op -> Q`` node units into QLinearConv, QGemm, QLinearMatMul,
QLinearAdd, QLinearConcat, QLinearGlobalAveragePool, ... and ``DQ -> MatMul`` (float output)
into MatMulIntegerToFloat. The plan therefore quantizes:

1. Every float activation input of a *primary* node (Conv, ConvTranspose, Gemm, MatMul);
   their constant weights become int8 initializers + DequantizeLinear (per channel), their
   biases int32 + DequantizeLinear.
2. The output of Conv/ConvTranspose, taken after a single following Relu/Clip (onnxruntime
   folds ``Relu -> Q`` / ``Clip -> Q`` into the quantized range), so a QLinearConv can form.
3. *Secondary* nodes (Add, Mul, Concat, pooling, Resize, Sigmoid, Softmax) only when all their
   data inputs are already quantized; then their output (after Relu/Clip) is quantized too.
   Quantizing them in isolation would only add Q/DQ round trips.

Concat (inputs and output), MaxPool and Resize (input and output) share one scale, so the
integer kernels need no requantization. Shape-only ops (Reshape, Transpose, ...) never get
Q/DQ of their own; a Q/DQ sits right before the consumer that needs it. MatMul outputs are
left float (MatMulIntegerToFloat with a fused bias Add is the fastest form on CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable

import onnx_ir as ir

__all__ = ["PRIMARY_OPS", "SECONDARY_OPS", "QuantPlan", "WeightUse", "plan_quantization"]

PRIMARY_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
SECONDARY_OPS = frozenset(
    {
        "Add",
        "Mul",
        "Concat",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Resize",
        "Sigmoid",
        "Softmax",
    }
)
_SHARED_SCALE_OPS = frozenset({"Concat", "MaxPool", "Resize"})
_FOLDABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
_QUANTIZED_OUTPUT_PRIMARY = frozenset({"Conv", "ConvTranspose"})


@dataclasses.dataclass(frozen=True)
class WeightUse:
    """A constant weight (and optional bias) of a primary node.

    Attributes:
        node: The node's name.
        op_type: Its op type.
        weight: Name of the weight initializer (input 1).
        axis: Output-channel axis of the weight.
        activation: Name of the activation input whose scale the bias uses.
        bias: Name of the bias initializer, or None.
    """

    node: str
    op_type: str
    weight: str
    axis: int
    activation: str | None
    bias: str | None


@dataclasses.dataclass
class QuantPlan:
    """The decision, as data: what gets quantized and what was skipped and why."""

    activations: list[str] = dataclasses.field(default_factory=list)
    groups: dict[str, str] = dataclasses.field(default_factory=dict)
    weights: list[WeightUse] = dataclasses.field(default_factory=list)
    nodes: list[str] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def group_members(self) -> dict[str, list[str]]:
        """Representative -> tensors that share its scale."""
        members: dict[str, list[str]] = {}
        for name in self.activations:
            members.setdefault(self.groups.get(name, name), []).append(name)
        return members


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.producer() is None


def _empty_weight(node: ir.Node) -> bool:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not _is_const(weight):
        return False
    assert weight is not None and weight.const_value is not None  # checked by _is_const
    return weight.const_value.size == 0


def _is_float(value: ir.Value) -> bool:
    return value.dtype in (None, ir.DataType.FLOAT)


def _after_activation(value: ir.Value, graph_outputs: Collection[str | None]) -> ir.Value:
    """``value`` or, when its only consumer is a Relu/Clip, that consumer's output."""
    uses = list(value.uses())
    if value.name in graph_outputs or len(uses) != 1:
        return value
    consumer = uses[0].node
    if consumer.op_type in _FOLDABLE_ACTIVATIONS and consumer.domain == "":
        return consumer.outputs[0]
    return value


def _data_inputs(node: ir.Node) -> list[ir.Value | None]:
    return list(node.inputs[:1]) if node.op_type == "Resize" else list(node.inputs)


class _Planner:
    def __init__(self, model: ir.Model, exclude: Collection[str]) -> None:
        self.graph = model.graph
        self.exclude = set(exclude)
        self.outputs: set[str | None] = {v.name for v in self.graph.outputs}
        self.plan = QuantPlan()
        self.chosen: dict[str, None] = {}
        self.parent: dict[str, str] = {}

    def add(self, value: ir.Value | None) -> None:
        if value is None or _is_const(value) or not _is_float(value) or not value.name:
            return
        self.chosen.setdefault(value.name, None)

    def union(self, names: Iterable[str]) -> None:
        roots = sorted({self._find(n) for n in names})
        for root in roots[1:]:
            self.parent[root] = roots[0]

    def _find(self, name: str) -> str:
        while self.parent.get(name, name) != name:
            name = self.parent[name]
        return name

    def skip(self, node: ir.Node, reason: str) -> None:
        self.plan.skipped.append(
            {"node": node.name or "", "op_type": node.op_type, "reason": reason}
        )

    def primary(self, node: ir.Node) -> None:
        inputs = list(node.inputs)
        weight = inputs[1] if len(inputs) > 1 else None
        if _is_const(weight):
            assert weight is not None
            self._weight(node, inputs, weight)
            self.add(inputs[0])
        else:
            for value in inputs[:2]:
                self.add(value)
        if node.op_type in _QUANTIZED_OUTPUT_PRIMARY:
            self.add(_after_activation(node.outputs[0], self.outputs))
        self.plan.nodes.append(node.name or "")  # a graph names its nodes

    def _weight(self, node: ir.Node, inputs: list[ir.Value | None], weight: ir.Value) -> None:
        from onnxprune.quant.params import weight_axis

        trans_b = node.attributes.get_int("transB", 0) if node.op_type == "Gemm" else 0
        rank = len(weight.shape) if weight.shape is not None else 2
        bias = inputs[2] if len(inputs) > 2 and node.op_type != "MatMul" else None
        bias_ok = _is_const(bias) and bias is not None and bias.shape is not None
        if bias_ok and node.op_type == "Gemm":
            assert bias is not None and bias.shape is not None  # checked by bias_ok
            bias_ok = len(bias.shape) == 1 and node.attributes.get_float("beta", 1.0) == 1.0
        activation = inputs[0].name if inputs[0] is not None else None
        self.plan.weights.append(
            WeightUse(
                node.name or "",
                node.op_type,
                weight.name or "",
                weight_axis(node.op_type, rank, trans_b),
                activation,
                bias.name if bias_ok and bias is not None else None,
            )
        )

    def secondary(self, node: ir.Node) -> bool:
        data = [v for v in _data_inputs(node) if v is not None]
        if not data or any(_is_const(v) or v.name not in self.chosen for v in data):
            return False
        output = _after_activation(node.outputs[0], self.outputs)
        self.add(output)
        if node.op_type in _SHARED_SCALE_OPS:
            self.union([*(v.name or "" for v in data), output.name or ""])
        self.plan.nodes.append(node.name or "")  # a graph names its nodes
        return True


def plan_quantization(model: ir.Model, exclude: Collection[str] = ()) -> QuantPlan:
    """Decide which tensors get Q/DQ and which weights become int8 (see module docstring)."""
    planner = _Planner(model, exclude)
    secondary = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.name in planner.exclude:
            planner.skip(node, "excluded by the user")
        elif node.op_type in PRIMARY_OPS and _empty_weight(node):
            planner.skip(node, "its weight has no elements")
        elif node.op_type in PRIMARY_OPS:
            planner.primary(node)
        elif node.op_type in SECONDARY_OPS:
            secondary.append(node)
    pending = secondary
    changed = True
    while changed:
        changed = False
        remaining = []
        for node in pending:
            if planner.secondary(node):
                changed = True
            else:
                remaining.append(node)
        pending = remaining
    for node in pending:
        planner.skip(node, "not all data inputs are quantized (would only add Q/DQ round trips)")
    plan = planner.plan
    plan.activations = list(planner.chosen)
    plan.groups = {name: planner._find(name) for name in plan.activations}
    order = {node.name: i for i, node in enumerate(model.graph)}
    plan.nodes.sort(key=lambda n: order.get(n, 0))
    return plan
