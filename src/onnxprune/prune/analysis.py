"""Dependency analysis driver: run the op rules over a model and form prunable groups.

A *unit* is a set of channel elements removed together (see :mod:`channels`). Units whose
initializer elements live in the same set of initializer axes form a *group*: for a plain
convolution, every output channel is a unit and the layer's output channels are the group;
for a Concat, each input branch forms its own group. A group is reported blocked, with the
node and reason, when its units touch a blocked space.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterator

import onnx_ir as ir

from onnxprune.analysis.run_shapes import refine_symbolic_dims
from onnxprune.analysis.shapes import infer_shapes, shape_tuple
from onnxprune.passes._match import name_of
from onnxprune.prune import (
    rules_shape,  # noqa: F401  (registers the shape rules)
    shape_flow,
)
from onnxprune.prune.channels import ChannelGraph, Dims, Space, SpaceKey
from onnxprune.prune.context import RuleContext
from onnxprune.prune.rules import RULES, UNARY
from onnxprune.reports import Skip

__all__ = ["Analysis", "Group", "Unit", "analyze"]

_SHAPE_PRESERVING = frozenset(
    [
        *UNARY,
        "GroupNormalization",
        "LayerNormalization",
        "InstanceNormalization",
        "BatchNormalization",
        "Softmax",
        "LogSoftmax",
    ]
)


def _label(node: ir.Node) -> str:
    if node.name:
        return node.name
    outputs = ",".join(name_of(o) for o in node.outputs if o is not None)
    return f"{node.op_type}({outputs})"


@dataclasses.dataclass
class Unit:
    """Elements removed together, as (space, index) pairs."""

    root: int
    members: list[tuple[Space, int]]
    blocked: Skip | None = None

    def position(self, anchor: SpaceKey) -> int:
        return min(i for s, i in self.members if s.key == anchor)


@dataclasses.dataclass
class Group:
    """Units sharing the same initializer axes; pruning keeps a subset of them.

    ``blocked`` is the first block met (the one reported), ``reasons`` every distinct one.
    """

    id: str
    anchor: SpaceKey
    initializers: list[SpaceKey]
    nodes: list[str]
    units: list[Unit]
    blocked: Skip | None = None
    reasons: list[Skip] = dataclasses.field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def touches_activations(self) -> bool:
        return any(not s.is_initializer for s, _ in self.units[0].members)


@dataclasses.dataclass
class Analysis:
    """Result of :func:`analyze`; ``context`` keeps the rewrites pruning must apply."""

    graph: ChannelGraph
    context: RuleContext
    groups: list[Group]

    @property
    def reported(self) -> list[Group]:
        """Groups that involve activations (drops kernel axes and other weight-only axes)."""
        return [g for g in self.groups if g.touches_activations]

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.blocked is None and g.size > 1]

    def group(self, group_id: str) -> Group:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(group_id)


def _shapes(model: ir.Model) -> dict[str, Dims]:
    inferred = infer_shapes(model)
    shapes: dict[str, Dims] = {}
    for graph_value in inferred.graph.initializers.values():
        tensor = graph_value.const_value
        if tensor is not None:
            shapes[name_of(graph_value)] = tuple(int(d) for d in tensor.shape.numpy())
    for node in inferred.graph:
        for value in (*node.inputs, *node.outputs):
            if value is not None and name_of(value) not in shapes:
                shape = shape_tuple(value.shape)
                if shape is not None:
                    shapes[name_of(value)] = shape
    for value in inferred.graph.inputs:
        shape = shape_tuple(value.shape)
        if shape is not None:
            shapes.setdefault(name_of(value), shape)
    # Dims inference lost track of (fresh symbols, unknowns) are measured from two runs.
    shapes = refine_symbolic_dims(model, shapes)
    # onnx cannot infer some function ops (GroupNormalization-21): their output has the
    # input's shape.
    for node in inferred.graph:
        out = node.outputs[0] if node.outputs else None
        if out is not None and out.name not in shapes and node.op_type in _SHAPE_PRESERVING:
            source = node.inputs[0].name if node.inputs and node.inputs[0] is not None else None
            if source is not None and source in shapes:
                shapes[name_of(out)] = shapes[source]
    return shapes


def _subgraphs(node: ir.Node) -> Iterator[tuple[str, ir.Graph]]:
    """``(attribute name, body)`` of each If/Loop/Scan body of ``node``."""
    for name, attr in node.attributes.items():
        if attr.is_ref() or attr.value is None:
            continue
        if attr.type == ir.AttributeType.GRAPH:
            yield name, attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from ((name, g) for g in attr.value)


def _captures(body: ir.Graph) -> Iterator[tuple[str, str]]:
    """``(value, reading node)`` for every outer-scope value read inside ``body``, nested
    bodies included (a capture is read by name, not listed among the node's inputs)."""
    defined = {v.name for v in body.inputs} | set(body.initializers)
    for node in body:
        defined.update(v.name for v in node.outputs if v is not None)
    for node in body:
        for value in node.inputs:
            if value is not None and value.name and value.name not in defined:
                yield value.name, f"node {_label(node)!r}"
        for _, inner in _subgraphs(node):
            yield from ((name, reader) for name, reader in _captures(inner) if name not in defined)
    for value in body.outputs:  # a body may output an outer value directly
        if value.name not in defined:
            yield name_of(value), "a body output"


def _block_captures(node: ir.Node, ctx: RuleContext) -> None:
    """Channels read across a subgraph boundary must not change: block them."""
    for attr_name, body in _subgraphs(node):
        for name, reader in _captures(body):
            reason = (
                f"{name!r} is read inside its subgraph {attr_name!r} (by {reader}), "
                "which pruning does not rewrite"
            )
            ctx.graph.block_all(name, ctx.node_name, reason)
            shape_flow.block_sources(name, ctx, reason)


def _run_rules(model: ir.Model, ctx: RuleContext) -> None:
    graph = ctx.graph
    for node in model.graph:
        ctx.node_name = _label(node)
        _block_captures(node, ctx)
        ctx.touched = set()
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx", "com.microsoft") else None
        values = [v.name for v in (*node.inputs, *node.outputs) if v is not None and v.name]
        shape_flow.follow(node, ctx)
        if rule is None:
            for name in values:
                graph.block_all(name, ctx.node_name, f"no pruning rule for {node.op_type}")
            continue
        rule(node, ctx)
        for name in values:
            for axis in range(graph.rank(name) or 0):
                if (name, axis) not in ctx.touched:
                    graph.block(name, axis, ctx.node_name, f"axis not mapped by {node.op_type}")
    for value in model.graph.inputs:
        if value.name not in model.graph.initializers:
            graph.block_all(name_of(value), "graph input", "channels come from a graph input")
    ctx.node_name = "graph output"
    for value in model.graph.outputs:
        graph.block_all(name_of(value), "graph output", "graph output shapes must not change")
        shape_flow.block_sources(name_of(value), ctx, "a graph output is read from this size")
    shape_flow.check_links(ctx)


def _units(graph: ChannelGraph) -> list[Unit]:
    members: dict[int, list[tuple[Space, int]]] = defaultdict(list)
    for space in graph.spaces.values():
        for i in range(space.size):
            members[graph.find(space.base + i)].append((space, i))
    units = []
    for root in sorted(members):
        elems = members[root]
        if not any(s.is_initializer for s, _ in elems):
            continue
        blocked = next((graph.blocked[s.key] for s, _ in elems if s.key in graph.blocked), None)
        units.append(Unit(root, elems, blocked))
    return units


def _consumers(model: ir.Model) -> dict[str, list[str]]:
    users: dict[str, list[str]] = defaultdict(list)
    for node in model.graph:
        for value in node.inputs:
            if value is not None and value.name in model.graph.initializers:
                users[name_of(value)].append(_label(node))
    return users


def analyze(model: ir.Model) -> Analysis:
    """Run the rules over ``model`` (not modified) and return its groups."""
    shapes = _shapes(model)
    graph = ChannelGraph(shapes, model.graph.initializers.keys())
    ctx = RuleContext(graph, model)
    _run_rules(model, ctx)
    by_signature: dict[tuple[SpaceKey, ...], list[Unit]] = defaultdict(list)
    for unit in _units(graph):
        keys = sorted({s.key for s, _ in unit.members if s.is_initializer})
        by_signature[tuple(keys)].append(unit)
    users = _consumers(model)
    groups = []
    for signature, units in by_signature.items():
        anchor = min(signature, key=lambda k: graph.spaces[k].base)
        nodes = sorted({n for v, _ in signature for n in users.get(v, [])})
        blocked = next((u.blocked for u in units if u.blocked is not None), None)
        reasons = sorted(
            {graph.blocked[s.key] for u in units for s, _ in u.members if s.key in graph.blocked}
        )
        group_id = f"{anchor[0]}:{anchor[1]}"
        groups.append(Group(group_id, anchor, list(signature), nodes, units, blocked, reasons))
    groups.sort(key=lambda g: (graph.spaces[g.anchor].base, g.units[0].position(g.anchor)))
    # Several groups can share an anchor axis (the halves of a Split): name them by the
    # position of their first channel on it.
    anchors = defaultdict(list)
    for group in groups:
        anchors[group.id].append(group)
    for shared in anchors.values():
        if len(shared) > 1:
            for group in shared:
                group.id = f"{group.id}@{group.units[0].position(group.anchor)}"
    return Analysis(graph, ctx, groups)
