"""Dynamic int8 quantization of MatMul/Gemm weights (MatMul-heavy transformers).

For ``y = x @ W`` (MatMul with a constant 2-D ``W``, or Gemm with a constant ``B``,
``transA = 0``, ``alpha = beta = 1``; ``W = B^T`` when ``transB``)::

    x_q, s_x, z_x = DynamicQuantizeLinear(x)          # uint8, s_x = (max - min) / 255 per call
    acc = MatMulInteger(x_q, W_q, z_x, 0)              # int32, W_q int8 per column of W
    y = Cast(acc, float) * (s_x * s_W)                 # s_W one scale per output column
    (+ C for Gemm)

onnxruntime fuses this into DynamicQuantizeMatMul. Activations need no calibration; weights are
stored int8 (the file shrinks ~4x).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxprune.quant.core import copy_model
from onnxprune.quant.params import QParams, quantize, weight_qparams
from onnxprune.quant.rewrite import quantize_embeddings
from onnxprune.quant.vnni import remedy_params

__all__ = ["build"]

logger = logging.getLogger(__name__)


def _weight_matrix(node: ir.Node) -> np.ndarray | None:
    """``W`` of ``x @ W`` for supported nodes, else None."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    value = node.inputs[1]
    if value.const_value is None or value.producer() is not None:
        return None
    array = value.const_value.numpy()
    if array.ndim != 2 or array.dtype != np.float32:
        return None
    if node.op_type == "MatMul":
        return array
    attrs = node.attributes
    if (
        attrs.get_int("transA", 0)
        or attrs.get_float("alpha", 1.0) != 1.0
        or attrs.get_float("beta", 1.0) != 1.0
    ):
        return None
    return array.T if attrs.get_int("transB", 0) else array


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.val(
        name,
        ir.DataType.from_numpy(array.dtype),
        array.shape,
        const_value=ir.tensor(np.array(array, order="C"), name=name),
    )
    graph.register_initializer(value)
    return value


def _rewrite(graph: ir.Graph, node: ir.Node, weight: np.ndarray, params: QParams) -> None:
    name = node.name or "node"
    x = node.inputs[0]
    w_q = _const(graph, f"{name}_weight_quantized", quantize(weight, params))
    w_zp = _const(graph, f"{name}_weight_zero_point", np.zeros(weight.shape[1], np.int8))
    w_scale = _const(
        graph, f"{name}_weight_scale", np.broadcast_to(params.scale, weight.shape[1]).copy()
    )
    dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{name}_DynamicQuantize")
    for value, suffix in zip(dql.outputs, ("quantized", "scale", "zero_point"), strict=True):
        value.name = f"{name}_input_{suffix}"
    x_q, x_scale, x_zp = dql.outputs
    mmi = ir.node("MatMulInteger", [x_q, w_q, x_zp, w_zp], name=f"{name}_MatMulInteger")
    cast = ir.node("Cast", [mmi.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}_Cast")
    scale = ir.node("Mul", [x_scale, w_scale], name=f"{name}_Scale")
    new_nodes = [dql, mmi, cast, scale]
    for n in new_nodes:
        n.outputs[0].name = n.outputs[0].name or f"{n.name}_output"
    result = node.outputs[0]
    final_name = result.name or f"{name}_output"
    result.name = f"{final_name}_float"
    has_bias = node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None
    # The original output's type and shape (a type without a shape fails onnx's checker).
    mul_out = ir.Value(
        name=f"{name}_scaled" if has_bias else final_name, type=result.type, shape=result.shape
    )
    new_nodes.append(
        ir.node(
            "Mul", [cast.outputs[0], scale.outputs[0]], name=f"{name}_Rescale", outputs=[mul_out]
        )
    )
    if has_bias:
        out = ir.Value(name=final_name, type=result.type, shape=result.shape)
        new_nodes.append(
            ir.node("Add", [mul_out, node.inputs[2]], name=f"{name}_Bias", outputs=[out])
        )
    final = new_nodes[-1].outputs[0]
    graph.insert_after(node, new_nodes)
    for index, output in enumerate(graph.outputs):
        if output is result:
            graph.outputs[index] = final
    ir.convenience.replace_all_uses_with(result, final)
    graph.remove(node, safe=True)


def build(
    model: ir.Model, per_channel: bool = True, remedy: str = "none"
) -> tuple[ir.Model, dict[str, object]]:
    """A dynamically quantized copy of ``model`` and a summary."""
    result = copy_model(model)
    graph = result.graph
    done, skipped = [], []
    for node in list(graph):
        if node.op_type not in ("MatMul", "Gemm") or node.domain != "":
            continue
        weight = _weight_matrix(node)
        if weight is None:
            skipped.append({"node": node.name, "reason": "no constant 2-D float weight"})
            continue
        axis = 1 if per_channel else None
        if remedy == "none":
            params = weight_qparams(weight, axis)
        else:
            params, _ = remedy_params(weight, axis, "MatMul", remedy)
        source = node.inputs[1]
        _rewrite(graph, node, weight, params)
        unused = source.name if source is not None and not source.uses() else None
        if unused is not None and unused in graph.initializers:
            graph.initializers.pop(unused)
        done.append(node.name)
    embeddings = quantize_embeddings(result)
    summary = {"quantized_nodes": done, "skipped": skipped, "remedy": remedy}
    return result, {**summary, "int8_embeddings": embeddings}
