"""Graph cleanup: dead nodes, unused and duplicate initializers, deterministic order.

- :class:`RemoveDeadNodesPass` removes nodes none of whose outputs reach a graph output.
  Values read inside If/Loop/Scan bodies count as read by the node that owns the body.
- :class:`RemoveUnusedInitializersPass` removes initializers nothing reads. An initializer that
  is also a graph input is part of the interface (a caller may feed it) and is kept.
- :class:`DeduplicateInitializersPass` makes readers of identical initializers (same dtype,
  shape and bytes, compared in full, not only by hash) read the first one, in initializer
  order. Graph inputs and graph outputs are left alone.
- :class:`TopologicalSortPass` runs onnx-ir's stable ``TopologicalSortPass`` (the main graph,
  subgraphs, and function bodies, which the checker and onnxruntime already require sorted),
  so the order only changes where it must, and counts the nodes that moved.

Not onnx-ir's ``RemoveUnusedNodesPass``: it also deletes unused initializers and trims unused
optional outputs of live nodes (a Dropout mask), in subgraphs and functions too. Not its
``DeduplicateInitializersPass``: it also merges string tensors and subgraph initializers,
skips tensors over 1024 elements by default, and does not say what a duplicate became.
"""

from __future__ import annotations

import hashlib
import logging

import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from onnxprune.passes.base import Pass, PassReport
from onnxprune.passes.constant_folding import node_label

__all__ = [
    "DeduplicateInitializersPass",
    "RemoveDeadNodesPass",
    "RemoveUnusedInitializersPass",
    "TopologicalSortPass",
]

logger = logging.getLogger(__name__)


def _inner_nodes(node: ir.Node) -> list[ir.Node]:
    """Nodes inside ``node``'s subgraphs, recursively."""
    inner: list[ir.Node] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.as_graph()]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.as_graphs())
        else:
            continue
        for graph in graphs:
            inner.extend(ir.traversal.RecursiveGraphIterator(graph))
    return inner


def _captured_values(node: ir.Node) -> list[ir.Value]:
    """Values read by nodes inside ``node``'s subgraphs (outer-scope reads included)."""
    return [v for inner in _inner_nodes(node) for v in inner.inputs if v is not None]


class RemoveDeadNodesPass(Pass):
    """Remove nodes whose outputs reach no graph output."""

    name = "remove-dead-nodes"

    def run(self, model: ir.Model, report: PassReport) -> None:
        graph = model.graph
        live_values: set[ir.Value] = set(graph.outputs)
        live_nodes: set[ir.Node] = set()
        for node in reversed(list(graph)):
            if not any(v in live_values for v in node.outputs):
                continue
            live_nodes.add(node)
            live_values.update(v for v in node.inputs if v is not None)
            live_values.update(_captured_values(node))
        dead = [node for node in graph if node not in live_nodes]
        if not dead:
            return
        # Detach dead nodes (and their subgraph bodies) first: they may read each other's
        # outputs, also from inside an If/Loop body, which a safe removal would refuse.
        for node in dead:
            for inner in [node, *_inner_nodes(node)]:
                for i in range(len(inner.inputs)):
                    inner.replace_input_with(i, None)
        graph.remove(dead)
        for node in dead:
            report.change(node_label(node), f"removed dead {node.op_type}")


class RemoveUnusedInitializersPass(Pass):
    """Remove initializers that no node (in any subgraph) reads and that are not outputs."""

    name = "remove-unused-initializers"

    def run(self, model: ir.Model, report: PassReport) -> None:
        graph = model.graph
        for name, value in list(graph.initializers.items()):
            if value.uses() or value.is_graph_output():
                continue
            if value.is_graph_input():
                report.skip(name, "unused, but it is a graph input (part of the interface)")
                continue
            del graph.initializers[name]
            report.change(name, "removed unused initializer")


def _digest(value: ir.Value) -> tuple[str, tuple[int, ...], str] | None:
    tensor = value.const_value
    if tensor is None or value.dtype == ir.DataType.STRING:
        return None
    data = tensor.tobytes()
    return (str(tensor.dtype), tuple(tensor.shape.numpy()), hashlib.sha256(data).hexdigest())


def _tensor_bytes(value: ir.Value) -> bytes:
    """The bytes of an initializer that :func:`_digest` grouped (so it has a tensor)."""
    tensor = value.const_value
    assert tensor is not None
    return tensor.tobytes()


class DeduplicateInitializersPass(Pass):
    """Make readers of identical initializers read one copy; drop the others."""

    name = "deduplicate-initializers"

    def run(self, model: ir.Model, report: PassReport) -> None:
        graph = model.graph
        groups: dict[tuple[str, tuple[int, ...], str], list[ir.Value]] = {}
        for value in graph.initializers.values():
            key = _digest(value)
            if key is not None:
                groups.setdefault(key, []).append(value)
        for values in groups.values():
            if len(values) > 1:
                self._merge(graph, values, report)

    def _merge(self, graph: ir.Graph, values: list[ir.Value], report: PassReport) -> None:
        free = [v for v in values if not (v.is_graph_input() or v.is_graph_output())]
        for value in values:
            if value not in free:
                kind = "graph input" if value.is_graph_input() else "graph output"
                report.skip(str(value.name), f"identical to another initializer but is a {kind}")
        if len(free) < 2:
            return
        keep = free[0]
        keep_bytes = _tensor_bytes(keep)
        for dup in free[1:]:
            # Equal hashes are not proof: compare the bytes.
            if _tensor_bytes(dup) != keep_bytes:
                report.skip(str(dup.name), f"hash equals {keep.name!r} but bytes differ")
                continue
            ir.convenience.replace_all_uses_with(dup, keep)
            del graph.initializers[str(dup.name)]
            report.change(str(dup.name), f"duplicate of {keep.name!r}; readers now use it")


def _all_nodes(model: ir.Model) -> list[ir.Node]:
    """Nodes of the main graph, its subgraphs and the model's functions, in order."""
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    return [node for g in graphs for node in ir.traversal.RecursiveGraphIterator(g)]


class TopologicalSortPass(Pass):
    """Stable topological sort of the main graph, its subgraphs and the model's functions.

    The sort is onnx-ir's ``TopologicalSortPass``; the report counts the node positions
    that changed.
    """

    name = "topological-sort"

    def run(self, model: ir.Model, report: PassReport) -> None:
        before = _all_nodes(model)
        ir_passes.TopologicalSortPass()(model)
        moved = sum(1 for a, b in zip(before, _all_nodes(model), strict=True) if a is not b)
        if moved:
            report.change(model.graph.name or "graph", f"reordered {moved} node positions")
