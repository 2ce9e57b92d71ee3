"""Apply a :class:`~onnxprune.quant.placement.QuantPlan` to a model as QDQ nodes.

* An activation ``x`` gets ``x -> QuantizeLinear -> x_quantized -> DequantizeLinear ->
  x_dequantized`` right after its producer; every node that read ``x`` reads
  ``x_dequantized`` (graph outputs keep the float ``x``).
* A weight ``W`` is replaced by the int8 initializer ``W_quantized`` and a
  ``DequantizeLinear`` (``axis`` = output channel), so the file stores 1 byte per weight.
* A bias ``b`` becomes the int32 initializer ``b_quantized`` with scale ``s_x * s_w`` and a
  ``DequantizeLinear``; one that would overflow int32 stays float (recorded as a note).

New values are named from the source value plus a suffix, so the output is deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from onnxprune.quant.params import QParams, bias_int32, quantize, weight_qparams
from onnxprune.quant.placement import QuantPlan, WeightUse

__all__ = ["WeightRounder", "apply_plan", "quantize_embeddings", "values_by_name"]

logger = logging.getLogger(__name__)


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the main graph: inputs, initializers and node outputs."""
    values = {v.name: v for v in graph.inputs if v.name}
    values.update(graph.initializers)
    for node in graph:
        values.update({v.name: v for v in node.outputs if v.name})
    return values


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    array = np.array(array, order="C")
    value = ir.val(
        name,
        ir.DataType.from_numpy(array.dtype),
        array.shape,
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def _dq_node(graph: ir.Graph, source: ir.Value, name: str, params: QParams) -> ir.Node:
    scale = _constant(graph, f"{name}_scale", params.scale)
    zero = _constant(graph, f"{name}_zero_point", params.zero_point)
    attributes = {"axis": params.axis} if params.axis is not None and params.scale.ndim else None
    out = ir.val(f"{name}_dequantized", ir.DataType.FLOAT, source.shape)
    return ir.node(
        "DequantizeLinear",
        [source, scale, zero],
        attributes,
        outputs=[out],
        name=f"{name}_DequantizeLinear",
    )


# Producers onnxruntime runs int8 only when their output is quantized (no float-output
# integer kernel, unlike QGemm and MatMulIntegerToFloat).
_NEEDS_OUTPUT_Q = frozenset({"Conv", "ConvTranspose"})


def _int8_only_with_output_q(value: ir.Value) -> bool:
    """``value`` is computed by a Conv/ConvTranspose, directly or through one Relu/Clip."""
    producer = value.producer()
    if producer is not None and producer.op_type in ("Relu", "Clip") and producer.inputs[0]:
        producer = producer.inputs[0].producer()
    return producer is not None and producer.op_type in _NEEDS_OUTPUT_Q


def _quantize_activation(graph: ir.Graph, value: ir.Value, params: QParams) -> None:
    """Insert ``Q -> DQ`` after ``value``; its readers read the DQ.

    A graph output is special: onnxruntime fuses no producer whose output is a graph
    output, so a Q/DQ pair hanging off it would run as a dangling float round trip and
    leave its producer float (a float island). When the producer is a convolution (int8
    only with a quantized output), the graph output is re-pointed at the DQ (it keeps its
    name; the float tensor becomes ``NAME_float``): the output is then int8-rounded and
    the convolution runs int8. Any other producer keeps the float output and gets no
    Q/DQ (its readers inside the graph, if any, still read a DQ).
    """
    name = value.name or ""
    if value.is_graph_output():
        if _int8_only_with_output_q(value):
            _reroute_output(graph, value, params)
            return
        if not any(True for _ in value.uses()):
            return
        _insert_qdq(graph, value, params, name)
        return
    _insert_qdq(graph, value, params, name)


def _reroute_output(graph: ir.Graph, value: ir.Value, params: QParams) -> None:
    name = value.name or ""
    index = list(graph.outputs).index(value)
    value.name = f"{name}_float"
    dq_out = _insert_qdq(graph, value, params, name)
    graph.outputs[index] = dq_out
    dq_out.name = name


def _insert_qdq(graph: ir.Graph, value: ir.Value, params: QParams, name: str) -> ir.Value:
    scale = _constant(graph, f"{name}_scale", params.scale)
    zero = _constant(graph, f"{name}_zero_point", params.zero_point)
    q_dtype = ir.DataType.from_numpy(params.zero_point.dtype)
    q_out = ir.val(f"{name}_quantized", q_dtype, value.shape)
    q = ir.node(
        "QuantizeLinear", [value, scale, zero], outputs=[q_out], name=f"{name}_QuantizeLinear"
    )
    dq_out = ir.val(f"{name}_dequantized", ir.DataType.FLOAT, value.shape)
    dq = ir.node(
        "DequantizeLinear", [q_out, scale, zero], outputs=[dq_out], name=f"{name}_DequantizeLinear"
    )
    uses = [(u.node, u.idx) for u in value.uses() if u.node is not q]
    for node, index in uses:
        node.replace_input_with(index, dq_out)
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, [q, dq])
    else:
        graph.insert_before(next(iter(graph)), [q, dq])
    return dq_out


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if not value.uses() and value.name is not None and value.name in graph.initializers:
        graph.initializers.pop(value.name)


WeightRounder = Callable[[WeightUse, np.ndarray, QParams], np.ndarray]
"""Integer values of a weight under its parameters (None: nearest, :func:`quantize`)."""


class _WeightRewriter:
    def __init__(
        self,
        graph: ir.Graph,
        weight_params: Mapping[str, QParams],
        rounder: WeightRounder | None = None,
    ) -> None:
        self.graph = graph
        self.params = weight_params
        self.rounder = rounder
        self.values = values_by_name(graph)
        self.nodes = {node.name: node for node in graph}
        self.done: dict[str, ir.Value] = {}
        self.notes: list[dict[str, str]] = []

    def weight(self, use: WeightUse) -> None:
        node = self.nodes[use.node]
        source = self.values[use.weight]
        if use.weight not in self.done:
            params = self.params[use.weight]
            array = source.const_value.numpy() if source.const_value is not None else None
            assert array is not None
            values = (
                quantize(array, params)
                if self.rounder is None
                else self.rounder(use, array, params)
            )
            stored = _constant(self.graph, f"{use.weight}_quantized", values)
            dq = _dq_node(self.graph, stored, use.weight, params)
            self.graph.insert_before(node, dq)
            self.done[use.weight] = dq.outputs[0]
        node.replace_input_with(1, self.done[use.weight])
        _drop_if_unused(self.graph, source)

    def bias(self, use: WeightUse, act_params: Mapping[str, QParams]) -> None:
        if use.bias is None or use.activation is None or use.activation not in act_params:
            return
        node = self.nodes[use.node]
        source = self.values[use.bias]
        array = source.const_value.numpy() if source.const_value is not None else None
        assert array is not None
        quantized = bias_int32(
            array, act_params[use.activation].scale, self.params[use.weight].scale
        )
        if quantized is None:
            self.notes.append(
                {
                    "node": use.node,
                    "note": "bias left float: round(b / (s_x * s_w)) overflows int32",
                }
            )
            return
        q_bias, scale = quantized
        if self.params[use.weight].scale.ndim == 0:
            # Per-tensor weights: one bias scale (a per-channel ``axis`` needs opset 13).
            scale = np.asarray(scale.reshape(-1)[0] if scale.size else scale)
        key = f"{use.bias}_{use.node}" if len(source.uses()) > 1 else use.bias
        stored = _constant(self.graph, f"{key}_quantized", q_bias)
        per_channel = QParams(scale, np.zeros(scale.shape, np.int32), 0 if scale.ndim else None)
        dq = _dq_node(self.graph, stored, key, per_channel)
        self.graph.insert_before(node, dq)
        node.replace_input_with(2, dq.outputs[0])
        _drop_if_unused(self.graph, source)


def apply_plan(
    model: ir.Model,
    plan: QuantPlan,
    act_params: Mapping[str, QParams],
    weight_params: Mapping[str, QParams],
    rounder: WeightRounder | None = None,
) -> list[dict[str, str]]:
    """Rewrite ``model`` in place; returns notes (biases left float and why). ``rounder``
    gives each weight's integer values (nearest rounding by default)."""
    graph = model.graph
    rewriter = _WeightRewriter(graph, weight_params, rounder)
    for use in plan.weights:
        rewriter.bias(use, act_params)
        rewriter.weight(use)
    values = values_by_name(graph)
    for name in plan.activations:
        if name in act_params:
            _quantize_activation(graph, values[name], act_params[name])
    logger.debug(
        "inserted %d activation Q/DQ pairs and %d weight DQ nodes",
        len(plan.activations),
        len(rewriter.done),
    )
    return rewriter.notes


def quantize_embeddings(model: ir.Model, min_elements: int = 4096) -> list[str]:
    """Store large Gather tables (embeddings) int8 and dequantize only the gathered rows.

    ``Gather(T, ids)`` with a constant float ``T [V, D]`` (``axis = 0``) becomes
    ``DequantizeLinear(Gather(T_q, ids), s, 0, axis=-1)`` with per-column symmetric scales
    ``s_d = max_v |T[v, d]| / 127``: each gathered value is within ``s_d / 2`` of the float
    one, the table shrinks 4x, and only the gathered rows are dequantized at run time.

    Returns:
        Names of the rewritten Gather nodes.
    """
    graph = model.graph
    done = []
    for node in list(graph):
        table = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
        if table is None or table.const_value is None or table.producer() is not None:
            continue
        if node.attributes.get_int("axis", 0) != 0 or len(table.uses()) != 1:
            continue
        array = table.const_value.numpy()
        if array.dtype != np.float32 or array.ndim != 2 or array.size < min_elements:
            continue
        params = weight_qparams(array, 1)
        stored = _constant(graph, f"{table.name}_quantized", quantize(array, params))
        scale = _constant(graph, f"{table.name}_scale", params.scale)
        zero = _constant(graph, f"{table.name}_zero_point", params.zero_point)
        old = node.outputs[0]
        name = old.name or f"{node.name}_output"
        old.name = f"{name}_float"
        gathered = ir.val(f"{name}_quantized", ir.DataType.INT8, old.shape)
        gather = ir.node(
            "Gather", [stored, node.inputs[1]], {"axis": 0}, outputs=[gathered], name=node.name
        )
        result = ir.val(name, ir.DataType.FLOAT, old.shape)
        dq = ir.node(
            "DequantizeLinear",
            [gathered, scale, zero],
            {"axis": -1},
            outputs=[result],
            name=f"{node.name}_DequantizeLinear",
        )
        graph.insert_after(node, [gather, dq])
        for index, output in enumerate(graph.outputs):
            if output is old:
                graph.outputs[index] = result
        ir.convenience.replace_all_uses_with(old, result)
        graph.remove(node, safe=True)
        _drop_if_unused(graph, table)
        done.append(node.name or "")
    return done
