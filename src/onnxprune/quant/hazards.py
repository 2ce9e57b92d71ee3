"""QDQ graphs that make onnxruntime abort the process, found before a session is created.

onnxruntime's ``QDQPropagationTransformer`` (graph optimizations on, the default) moves a
per-tensor DequantizeLinear forward past a Reshape/Transpose/Squeeze/Unsqueeze/Slice/MaxPool
that is its only consumer, rewiring every consumer of that op's output. A consumer that
reads the output only inside a subgraph (an If/Loop/Scan capture) is indexed as an explicit
input, out of range: a C++ assertion aborts the whole process (exit 134), which no Python
code can catch. Found on silero-vad (a Squeeze read by an If branch).

:func:`hazard_node` names the layer to keep float so that the chain is not built.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import onnx_ir as ir

__all__ = ["PROPAGATING_OPS", "hazard_node", "propagation_hazard"]

#: Ops onnxruntime propagates a DequantizeLinear through (``CanNodePropagate``).
PROPAGATING_OPS = frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice"})


def _subgraph_reads(graph: ir.Graph) -> Iterator[str]:
    """Names read by nodes of ``graph`` and of its own subgraphs."""
    for node in graph:
        for value in node.inputs:
            if value is not None and value.name:
                yield value.name
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _subgraph_reads(attr.as_graph())
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.as_graphs():
                    yield from _subgraph_reads(sub)


def _captures(graph: ir.Graph) -> dict[str, str]:
    """``{outer value: node whose subgraph reads it}`` for the nodes of ``graph``."""
    found: dict[str, str] = {}
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                subs = [attr.as_graph()]
            elif attr.type == ir.AttributeType.GRAPHS:
                subs = list(attr.as_graphs())
            else:
                continue
            for sub in subs:
                for name in _subgraph_reads(sub):
                    found.setdefault(name, node.name or node.op_type)
    return found


def _scalar_scale(node: ir.Node) -> bool:
    """Constant one-element scale (onnxruntime propagates only per-tensor DequantizeLinear)."""
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    return scale is not None and scale.const_value is not None and scale.const_value.size == 1


def _single_propagating_user(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    user, index = uses[0]
    propagates = user.op_type in PROPAGATING_OPS and user.domain in ("", "ai.onnx")
    return user if propagates and index == 0 else None


def _walk(node: ir.Node, captures: dict[str, str]) -> tuple[str, str] | None:
    """The (propagating node, capturing node) pair reached from ``node``, if any."""
    out = node.outputs[0]
    if out.is_graph_output():
        return None
    if out.name in captures:
        return node.name or node.op_type, captures[out.name]
    for user, index in out.uses():
        if user.op_type in PROPAGATING_OPS and index == 0:
            found = _walk(user, captures)
            if found:
                return found
    return None


def _first_hazard(model: ir.Model) -> tuple[ir.Node, str, str] | None:
    captures = _captures(model.graph)
    if not captures:
        return None
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or not _scalar_scale(node):
            continue
        user = _single_propagating_user(node.outputs[0])
        found = _walk(user, captures) if user is not None else None
        if found:
            return node, *found
    return None


def propagation_hazard(model: ir.Model) -> tuple[str, str, str] | None:
    """``(DequantizeLinear, propagating node, capturing node)`` of the first hazard, or None."""
    found = _first_hazard(model)
    if found is None:
        return None
    dq, through, capture = found
    return dq.name or "DequantizeLinear", through, capture


def _planned_producer(value: ir.Value | None, planned: Collection[str]) -> str | None:
    """The planned node ``value`` comes from, through single-input ops (Q, Relu, ...)."""
    node = value.producer() if value is not None else None
    while node is not None and node.name not in planned:
        data = [v for v in node.inputs if v is not None and v.const_value is None]
        node = data[0].producer() if len(data) == 1 else None
    return node.name if node is not None else None


def hazard_node(model: ir.Model, planned: Collection[str]) -> tuple[str | None, str] | None:
    """For the first hazard: the planned node to keep float (None if unknown) and why."""
    found = _first_hazard(model)
    if found is None:
        return None
    dq, through, capture = found
    reason = (
        f"onnxruntime's QDQ propagation would move {dq.name!r} past {through!r}, whose "
        f"output {capture!r} reads inside a subgraph, and abort (an onnxruntime bug)"
    )
    return _planned_producer(dq.inputs[0], planned), reason
