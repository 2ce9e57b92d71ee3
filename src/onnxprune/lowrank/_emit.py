"""Write a factorization into the graph: one node becomes a chain of weight-carrying nodes."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxprune.lowrank._candidate import mark_factor
from onnxprune.passes._match import add_initializer, fresh_name, replace_value, required

__all__ = ["Step", "replace_with_chain"]


@dataclasses.dataclass
class Step:
    """One node of the chain: ``op_type(previous, weight, *extra)`` with ``attributes``."""

    op_type: str
    weight: np.ndarray
    extra: list[ir.Value | None] = dataclasses.field(default_factory=list)
    attributes: dict | None = None


def replace_with_chain(
    graph: ir.Graph, node: ir.Node, x: ir.Value, steps: list[Step], *, kind: str
) -> None:
    """Replace ``node`` by ``steps`` applied in turn to ``x``.

    Weights become initializers named from the original weight (``<w>_lowrank_<i>``); the
    last node takes over the name of ``node``'s output, so downstream names do not change.
    The new nodes are marked as factors of ``kind`` (:func:`mark_factor`).
    """
    name = node.name or str(node.outputs[0].name)
    base = str(required(node.inputs[1]).name)
    current = x
    new_nodes = []
    for index, step in enumerate(steps):
        weight = add_initializer(graph, f"{base}_lowrank_{index}", step.weight)
        out = ir.Value(name=fresh_name(graph, f"{name}_lowrank_{index}_out"))
        new_nodes.append(
            ir.node(
                step.op_type,
                [current, weight, *step.extra],
                step.attributes,
                outputs=[out],
                name=f"{name}_lowrank_{index}",
            )
        )
        current = out
    mark_factor(new_nodes, kind)
    graph.insert_before(node, new_nodes)
    replace_value(node.outputs[0], current)
    graph.remove(node, safe=True)
