"""Runtime shape vectors: where the sizes read by a ``Shape`` op go.

A ``Shape`` op reads its input's axis sizes at run time. Pruning changes a size, which is
harmless where the size only travels, unchanged, into the target of a Reshape or the shape
of an Expand: the pruned model computes its new target itself. (torch's dynamo export of
``scaled_dot_product_attention`` reads the shape of the keys, ``(batch, heads, seq, d)``,
to fold ``batch*heads`` together and split it back around a transpose.)

Each 1-D shape vector is followed entry by entry through pure index plumbing (Slice, Gather
and Concat on axis 0 with constant indices, Unsqueeze, Squeeze, Identity, Cast):

* entry ``j`` of a Reshape target read from axis ``a`` of ``v``: output axis ``j`` has the
  size of ``v``'s axis ``a``, so the two spaces are related (pruned together);
* entry ``j`` that is a constant concatenated into the target (torchscript exports write
  ``view(b, s, heads, d)`` as ``Concat(Shape(x)[0], Shape(x)[1], 12, 32)``): the constant is
  rewritten to the kept size when output axis ``j`` is pruned; an entry of unknown origin
  blocks output axis ``j`` (its size would not follow the cut);
* the same for an Expand shape, right-aligned to the output;
* any other use (arithmetic, Range, ConstantOfShape, a Slice bound, a graph output, a read
  inside a subgraph) blocks every axis the vector was read from: the size enters a
  computation that pruning does not rewrite.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnxprune.passes._match import name_of
from onnxprune.prune.context import RuleContext, ShapeConstant, ShapeEntry, ShapeRewrite

__all__ = ["block_sources", "follow", "read_shape"]

_PASS_THROUGH = frozenset(["Unsqueeze", "Squeeze", "Identity", "Cast"])


def _int_attr(node: ir.Node, name: str, default: int | None) -> int | None:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def read_shape(node: ir.Node, ctx: RuleContext) -> None:
    """A Shape op: its output's entries are the sizes of its input's axes."""
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    rank = ctx.rank(x)
    if rank is None:
        return
    start = _int_attr(node, "start", 0) or 0
    end = _int_attr(node, "end", None)
    axes = list(range(rank))[slice(start, end)]
    for axis in range(rank):
        ctx.touch((x, axis))
    ctx.shape_sources[y] = [(x, a) for a in axes]


def block_sources(value: str, ctx: RuleContext, reason: str) -> None:
    """Block every axis whose size entered the shape vector ``value``."""
    for entry in ctx.shape_sources.get(value, ()):
        if isinstance(entry, tuple):
            ctx.graph.block(entry[0], entry[1], ctx.node_name, reason)


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


def _relate(ctx: RuleContext, entries: Sequence[ShapeEntry], y: str, shift: int) -> None:
    """Output axis ``j + shift`` of ``y`` has the size of the axis entry ``j`` was read from,
    or the constant's (rewritten when the axis is pruned); unknown entries block it."""
    rank = ctx.rank(y)
    for j, entry in enumerate(entries):
        axis = j + shift
        if rank is None or not 0 <= axis < rank:
            continue
        if isinstance(entry, tuple):
            ctx.unite(entry, (y, axis))
        elif isinstance(entry, ShapeConstant):
            if entry.value > 0:
                rewrite = ShapeRewrite(entry.node, entry.input_index, entry.index, (y, axis))
                ctx.shape_rewrites.append(rewrite)
        else:
            ctx.block(y, axis, "the target size of this axis is computed at run time")


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
    if op == "Gather" and index == 0 and (_int_attr(node, "axis", 0) or 0) == 0:
        indices = ctx.const_ints(node.inputs[1])
        if indices is None or not all(-len(source) <= i < len(source) for i in indices):
            return None
        return [source[i] for i in indices]
    if op == "Concat" and (_int_attr(node, "axis", 0) or 0) in (0, -1):
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
        if node.op_type == "Reshape" and index == 1:
            _relate(ctx, ctx.shape_sources[name_of(value)], y, 0)
            continue
        if node.op_type == "Expand" and index == 1:
            entries = ctx.shape_sources[name_of(value)]
            _relate(ctx, entries, y, (ctx.rank(y) or 0) - len(entries))
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
