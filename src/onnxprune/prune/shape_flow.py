"""Runtime shape vectors: where the sizes read by a ``Shape`` op go.

A ``Shape`` op reads its input's axis sizes at run time. Pruning changes a size, which is
harmless where the size only travels, unchanged, into the target of a Reshape or the shape
of an Expand: the pruned model computes its new target itself. (torch's dynamo export of
``scaled_dot_product_attention`` reads the shape of the keys, ``(batch, heads, seq, d)``,
to fold ``batch*heads`` together and split it back around a transpose.)

Each 1-D shape vector is followed entry by entry through pure index plumbing (Slice, Gather
and Concat on axis 0 with constant indices, Unsqueeze, Squeeze, Identity, Cast):

* entry ``j`` of a Reshape target read from axis ``a`` of ``v``: output axis ``j`` gets the
  size of ``v``'s axis ``a``, which is right after a cut only if the two axes are cut alike.
  That is checked once every rule has run (:func:`check_links`): the data rules must have
  put each element of one axis in the same unit as the same element of the other, else both
  are blocked (a reshape that reads sizes in another order, say). The link itself relates
  nothing, so an axis the data rule left unmapped stays blocked;
* entry ``j`` that is a constant concatenated into the target (torchscript exports write
  ``view(b, s, heads, d)`` as ``Concat(Shape(x)[0], Shape(x)[1], 12, 32)``): the constant is
  rewritten to the kept size when output axis ``j`` is pruned. Every axis one constant sizes
  (a target shared by two reshapes, an entry gathered twice) must be cut alike, and a vector
  that also reaches a use pruning does not rewrite blocks the axes its constants size; an
  entry of unknown origin blocks output axis ``j`` (its size would not follow the cut);
* the same for an Expand shape, right-aligned to the output;
* any other use (arithmetic, Range, ConstantOfShape, a Slice bound, a graph output, a read
  inside a subgraph) blocks every axis the vector was read from: the size enters a
  computation that pruning does not rewrite.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.passes._match import name_of
from onnxprune.prune.channels import SpaceKey
from onnxprune.prune.context import RuleContext, ShapeConstant, ShapeEntry, ShapeRewrite
from onnxprune.prune.rules import _attr

__all__ = ["block_sources", "check_links", "follow", "read_shape"]

_PASS_THROUGH = frozenset(["Unsqueeze", "Squeeze", "Identity", "Cast"])


def read_shape(node: ir.Node, ctx: RuleContext) -> None:
    """A Shape op: its output's entries are the sizes of its input's axes."""
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    rank = ctx.rank(x)
    if rank is None:
        return
    start = int(_attr(node, "start", 0))
    end = _attr(node, "end")
    end = None if end is None else int(end)
    axes = list(range(rank))[slice(start, end)]
    for axis in range(rank):
        ctx.touch((x, axis))
    ctx.shape_sources[y] = [(x, a) for a in axes]


def block_sources(value: str, ctx: RuleContext, reason: str) -> None:
    """Block every axis whose size entered the shape vector ``value``, and every axis sized
    by one of its constants (which would be rewritten for a use that cannot follow)."""
    for entry in ctx.shape_sources.get(value, ()):
        if isinstance(entry, tuple):
            ctx.graph.block(entry[0], entry[1], ctx.node_name, reason)
        elif isinstance(entry, ShapeConstant):
            ctx.poisoned.add(entry)


def _entries(node: ir.Node, input_index: int, ctx: RuleContext) -> list[ShapeEntry] | None:
    """A Concat part: followed entries, constants, or unknowns of a static length."""
    value = node.inputs[input_index]
    if value is None:
        return None
    name = name_of(value)
    if name in ctx.shape_sources:
        return ctx.shape_sources[name]
    constant = ctx.const_ints(value)
    if constant is not None:
        return [ShapeConstant(v, node, input_index, i) for i, v in enumerate(constant)]
    dims = ctx.dims(name)
    if dims is not None and len(dims) == 1 and isinstance(dims[0], int):
        return [None] * dims[0]
    return None


def _relate(ctx: RuleContext, value: str, y: str, align_right: bool) -> None:
    """Output axis ``j`` of ``y`` gets the size entry ``j`` was read from (checked later), or
    the constant's (rewritten when the axis is pruned); unknown entries block it."""
    entries = ctx.shape_sources[value]
    rank = ctx.rank(y)
    if rank is None:  # where the sizes land is unknown: nothing they size may change
        block_sources(value, ctx, f"{ctx.node_name}'s output rank is unknown")
        return
    shift = rank - len(entries) if align_right else 0
    for j, entry in enumerate(entries):
        axis = j + shift
        if not 0 <= axis < rank:
            continue
        if isinstance(entry, tuple):
            ctx.size_links.append((entry, (y, axis), ctx.node_name))
        elif isinstance(entry, ShapeConstant):
            if entry.value > 0:
                rewrite = ShapeRewrite(entry.node, entry.input_index, entry.index, (y, axis))
                ctx.shape_rewrites.append(rewrite)
                ctx.size_links.append((entry, (y, axis), ctx.node_name))
        else:
            ctx.block(y, axis, "the target size of this axis is computed at run time")


def _cut_alike(ctx: RuleContext, a: SpaceKey, b: SpaceKey) -> bool:
    """Whether every element of axis ``a`` is in the same unit as that of axis ``b``."""
    graph = ctx.graph
    sa, sb = graph.space(*a), graph.space(*b)
    if sa is None or sb is None:
        return sa is None and sb is None  # two sizes pruning never changes
    if sa.size != sb.size:
        return False
    return all(graph.find(sa.base + i) == graph.find(sb.base + i) for i in range(sa.size))


def check_links(ctx: RuleContext) -> None:
    """Block the axes whose run-time size would not follow a cut (see the module docstring)."""
    graph = ctx.graph
    by_constant: dict[ShapeConstant, list[tuple[SpaceKey, str]]] = {}
    for source, axis, node in ctx.size_links:
        if isinstance(source, ShapeConstant):
            by_constant.setdefault(source, []).append((axis, node))
        elif not _cut_alike(ctx, source, axis):
            reason = "a reshape reads this size from an axis that is not cut alike"
            graph.block(source[0], source[1], node, reason)
            graph.block(axis[0], axis[1], node, reason)
    for constant, axes in by_constant.items():
        first = axes[0][0]
        alike = all(_cut_alike(ctx, first, other) for other, _ in axes[1:])
        if alike and constant not in ctx.poisoned:
            continue
        reason = (
            "a constant size in a computed target also sizes another axis or a use pruning "
            "does not rewrite"
        )
        for axis, node in axes:
            graph.block(axis[0], axis[1], node, reason)


def _moved(node: ir.Node, index: int, ctx: RuleContext) -> list[ShapeEntry] | None:
    """The entries of ``node``'s output when input ``index`` is a followed vector and the
    node only moves entries; None when it uses them otherwise."""
    source = ctx.shape_sources[name_of(node.inputs[index])]
    op = node.op_type
    if op in _PASS_THROUGH and index == 0:
        return list(source)
    if op == "Slice" and index == 0:
        starts, ends = ctx.const_ints(node.inputs[1]), ctx.const_ints(node.inputs[2])
        axes = ctx.const_ints(node.inputs[3]) if len(node.inputs) > 3 else None
        steps = ctx.const_ints(node.inputs[4]) if len(node.inputs) > 4 else None
        if starts is None or ends is None or len(starts) != 1 or (axes and axes != [0]):
            return None
        step = steps[0] if steps else 1
        return list(source)[slice(starts[0], ends[0], step)] if step else None
    if op == "Gather" and index == 0 and int(_attr(node, "axis", 0)) == 0:
        indices = ctx.const_ints(node.inputs[1])
        if indices is None or not all(-len(source) <= i < len(source) for i in indices):
            return None
        return [source[i] for i in indices]
    if op == "Concat" and int(_attr(node, "axis", 0)) in (0, -1):
        parts = [_entries(node, k, ctx) for k in range(len(node.inputs))]
        if any(p is None for p in parts):
            return None
        return [e for p in parts if p is not None for e in p]
    return None


def follow(node: ir.Node, ctx: RuleContext) -> None:
    """Carry followed shape vectors through ``node``, relate or block what they reach."""
    for index, value in enumerate(node.inputs):
        if value is None or name_of(value) not in ctx.shape_sources:
            continue
        y = name_of(node.outputs[0]) if node.outputs else ""
        if node.op_type in ("Reshape", "Expand") and index == 1:
            _relate(ctx, name_of(value), y, align_right=node.op_type == "Expand")
            continue
        moved = _moved(node, index, ctx)
        if moved is None:
            block_sources(
                name_of(value),
                ctx,
                f"{node.op_type} computes with the size of this axis (read by a Shape op)",
            )
        elif y:
            ctx.shape_sources[y] = moved
