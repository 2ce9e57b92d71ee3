"""Float islands in the graph onnxruntime actually runs (after its QDQ fusions).

"int8 MAC share 100 %" can hide float work *between* int8 kernels: a lone op onnxruntime has
no integer kernel for (a Pad, a Resize, an odd Mul) stays float, wrapped in
``DequantizeLinear -> op -> QuantizeLinear``, and each such island costs a full
dequantize/requantize of the tensor. This module reads the optimized graph
(``SessionOptions.optimized_model_filepath``) and lists:

* ``float island``: a node that is neither a Q/DQ node nor an integer kernel, with at least
  one input computed by a ``DequantizeLinear`` of an activation (not of a constant weight)
  and at least one output read by a ``QuantizeLinear``;
* ``requantize pair``: a ``DequantizeLinear`` whose output is read by a ``QuantizeLinear``
  (a float round trip onnxruntime did not fuse away).

Layout ops onnxruntime inserts itself around its NCHWc kernels (``Reorder*``) are not islands:
they run on the int8 data path of the fused kernels, not on float data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx

__all__ = ["find_islands"]

_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
    return out


def find_islands(proto: onnx.ModelProto, integer_ops: Sequence[str]) -> list[dict[str, Any]]:
    """Float islands and requantize pairs of an optimized graph (see the module docstring).

    Args:
        proto: The graph onnxruntime runs (its ``optimized_model_filepath`` output).
        integer_ops: Op types that are integer kernels (QLinearConv, QGemm, ...).

    Returns:
        One dict per finding: ``kind``, ``node``, ``op_type`` (and the tensor for pairs).
    """
    graph = proto.graph
    constants = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = _consumers(graph)
    integer = set(integer_ops)
    found: list[dict[str, Any]] = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            if node.input[0] in constants:
                continue
            if any(r.op_type == "QuantizeLinear" for r in readers.get(node.output[0], [])):
                found.append(
                    {
                        "kind": "requantize pair",
                        "node": node.name,
                        "op_type": node.op_type,
                        "tensor": node.output[0],
                    }
                )
            continue
        if node.op_type in _QDQ or node.op_type in integer:
            continue
        fed = any(
            (p := producer.get(name)) is not None
            and p.op_type == "DequantizeLinear"
            and p.input[0] not in constants
            for name in node.input
        )
        read = any(r.op_type == "QuantizeLinear" for o in node.output for r in readers.get(o, []))
        if fed and read:
            found.append({"kind": "float island", "node": node.name, "op_type": node.op_type})
    return found
