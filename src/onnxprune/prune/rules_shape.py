"""Rules for ops that move, merge or split axes: Reshape, Flatten, Squeeze, Unsqueeze,
Gather, reductions, Pad, Resize, Expand, Shape.

Reshape is matched axis group by axis group: walking input and output dims, a run of input
axes whose product equals a run of output axes forms a group. A one-to-one group maps
identically; a merge ``(C, H, W) -> C*H*W`` maps channel c of the leading axis to the block
``c*H*W .. c*H*W + H*W - 1`` (Flatten into a classifier); a split ``D -> (heads, d)`` maps
head h to the block of hidden dims it covers (attention heads). The remaining axes of a
merge or split are blocked, and so is any group that mixes channels otherwise. One split is
read the other way: ``D -> (k, D/k)`` whose outer axis is only ever indexed by constant
Gathers (torch's ``nn.MultiheadAttention`` views its packed q/k/v in-projection as
``(3, E)`` and selects each): there inner element ``e`` owns input elements ``e``,
``D/k + e``, ... (the same hidden unit of every projection) and the outer axis is blocked.
"""

from __future__ import annotations

import math
from typing import cast

import onnx_ir as ir

from onnxprune.passes._match import name_of, required
from onnxprune.prune.channels import Dims
from onnxprune.prune.context import RuleContext, ShapeRewrite
from onnxprune.prune.rules import RULES, _attr, _broadcast_into, _rule
from onnxprune.prune.shape_flow import read_shape

__all__ = ["match_axis_groups"]


def match_axis_groups(src: Dims, dst: Dims) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of axes with equal products; None when the shapes cannot be matched."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) and j < len(dst):
        a, b = src[i], dst[j]
        if not isinstance(a, int) or not isinstance(b, int):
            if a != b or a is None:
                return None
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        gi, gj, pa, pb = [i], [j], a, b
        i, j = i + 1, j + 1
        while pa != pb:
            next_a = src[i] if i < len(src) else None
            next_b = dst[j] if j < len(dst) else None
            if pa < pb and isinstance(next_a, int):
                pa *= next_a
                gi.append(i)
                i += 1
            elif pb < pa and isinstance(next_b, int):
                pb *= next_b
                gj.append(j)
                j += 1
            else:
                return None
        groups.append((gi, gj))
    # Trailing size-1 axes on either side join the last group.
    if any(src[k] != 1 for k in range(i, len(src))) or any(dst[k] != 1 for k in range(j, len(dst))):
        return None
    if groups:
        groups[-1][0].extend(range(i, len(src)))
        groups[-1][1].extend(range(j, len(dst)))
    return groups


def _leading(axes: list[int], dims: Dims) -> int:
    """The first axis of a run whose size is not 1 (the one that indexes blocks)."""
    return next((a for a in axes if dims[a] != 1), axes[0])


def _moved_axis(node: ir.Node, axis: int, ctx: RuleContext) -> int | None:
    """Where ``axis`` of input 0 lands in the output of an Unsqueeze/Squeeze/Transpose."""
    rank = ctx.rank(name_of(node.inputs[0]))
    if rank is None:
        return None
    if node.op_type == "Transpose":
        perm = _attr(node, "perm")
        perm = list(perm) if perm is not None else list(range(rank))[::-1]
        return perm.index(axis)
    axes = ctx.const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    axes = axes if axes is not None else list(_attr(node, "axes", []) or [])
    if node.op_type == "Unsqueeze":
        out_rank = rank + len(axes)
        inserted = {a % out_rank for a in axes}
        return [p for p in range(out_rank) if p not in inserted][axis]
    squeezed = {a % rank for a in axes}
    if not axes or axis in squeezed:
        return None
    return axis - sum(1 for a in squeezed if a < axis)


def _only_selected(value: ir.Value, axis: int, ctx: RuleContext, depth: int = 0) -> bool:
    """Every use of ``axis`` of ``value`` picks one index with a constant scalar Gather,
    through Unsqueeze/Squeeze/Transpose: the axis enumerates packed projections (torch's
    ``nn.MultiheadAttention`` in-projection viewed as ``(3, E)`` and split into q, k, v)."""
    uses = list(value.uses())
    if not uses or depth > 8:
        return False
    for use in uses:
        node = use.node
        if use.idx != 0 or not node.outputs:
            return False
        if node.op_type == "Gather":
            rank = ctx.rank(name_of(value))
            index = required(node.inputs[1]).const_value if len(node.inputs) > 1 else None
            if rank is None or index is None or index.shape != ():
                return False
            if int(_attr(node, "axis", 0)) % rank != axis:
                return False
            continue
        if node.op_type not in ("Unsqueeze", "Squeeze", "Transpose"):
            return False
        moved = _moved_axis(node, axis, ctx)
        if moved is None or not _only_selected(node.outputs[0], moved, ctx, depth + 1):
            return False
    return True


def _packed_split(
    ctx: RuleContext, x: str, y: str, node: ir.Node, groups: tuple[int, list[int], list[int]]
) -> bool:
    """Map a split ``D -> (k, D/k)`` whose outer axis only selects one of ``k`` packed
    projections: element ``e`` of the inner axis owns input elements ``e, D/k + e, ..``."""
    li, gi, gj = groups
    dst = ctx.dims(y)
    src = ctx.dims(x)
    if dst is None or src is None or len([a for a in gi if src[a] != 1]) != 1:
        return False
    split = [a for a in gj if dst[a] != 1]
    if len(split) != 2:
        return False
    outer, inner = split
    if not _only_selected(node.outputs[0], outer, ctx):
        return False
    count, size = dst[outer], dst[inner]
    # A group of several axes has only static sizes (see match_axis_groups).
    assert isinstance(count, int) and isinstance(size, int)
    for k in range(count):
        ctx.unite((y, inner), (x, li), offset=k * size, partial=True)
    for a in gj:
        if a != inner:
            ctx.block(y, a, "selects one of packed projections")
    return True


def _batch_like(dims: Dims) -> bool:
    """Leading axes that may be merged around channels: symbolic (a batch) or of size 1."""
    return bool(dims) and all(not isinstance(d, int) or d == 1 for d in dims)


def _periodic(
    ctx: RuleContext,
    source: tuple[str, Dims],
    dest: tuple[str, Dims],
    node: ir.Node,
    *,
    target_index: int | None,
    target: list[int] | None,
) -> None:
    """Merge symbolic leading axes with a static inner axis into one symbolic axis, or split
    such an axis back: ``(batch, H, ..) <-> (batch*H, ..)`` with the other axes equal.

    Row-major, index ``b*H + h`` of the merged axis is element ``h`` of the inner axis for
    every ``b``, so the merged axis is a *periodic* space of size ``H`` (its symbol is
    recorded in :attr:`ChannelGraph.periods`) and relates one-to-one to the inner axis.
    """
    (x, src), (y, dst) = source, dest
    periods = ctx.graph.periods
    if len(src) > len(dst):  # merge
        k = len(src) - len(dst)
        merged, inner, lead = dst[0], src[k], src[:k]
        if (
            not isinstance(merged, str)
            or not isinstance(inner, int)
            or inner <= 1
            or merged in src
            or not _batch_like(lead)
            or src[k + 1 :] != dst[1:]
            or periods.setdefault(merged, inner) != inner
        ):
            return
        ctx.unite((x, k), (y, 0))
        for a in range(k):
            ctx.block(x, a, "merged into another axis by a reshape")
        for a in range(1, len(dst)):
            ctx.unite((x, k + a), (y, a))
        return
    k = len(dst) - len(src)  # split
    merged, inner, lead = src[0], dst[k] if k < len(dst) else None, dst[:k]
    if (
        k < 1
        or not isinstance(merged, str)
        or periods.get(merged) != inner
        or not _batch_like(lead)
        or src[1:] != dst[k + 1 :]
    ):
        return
    ctx.unite((x, 0), (y, k))
    for a in range(k):
        ctx.block(y, a, "split off another axis by a reshape")
    for a in range(1, len(src)):
        ctx.unite((x, a), (y, k + a))
    if target is not None and target_index is not None and k < len(target) and target[k] > 0:
        ctx.shape_rewrites.append(ShapeRewrite(node, target_index, k, (y, k)))


def _map_reshape(ctx: RuleContext, x: str, y: str, node: ir.Node, target_index: int | None) -> None:
    src, dst = ctx.dims(x), ctx.dims(y)
    if src is None or dst is None:
        return
    groups = match_axis_groups(src, dst)
    target = ctx.const_ints(node.inputs[target_index]) if target_index is not None else None
    if groups is None:
        _periodic(ctx, (x, src), (y, dst), node, target_index=target_index, target=target)
        return  # anything else stays unmapped (blocked)
    for gi, gj in groups:
        li, lj = _leading(gi, src), _leading(gj, dst)
        if len([a for a in gi if src[a] != 1]) > 1 and len([a for a in gj if dst[a] != 1]) > 1:
            continue  # many-to-many: mixes channels, blocked
        if _packed_split(ctx, x, y, node, (li, gi, gj)):
            inner = [a for a in gj if dst[a] != 1][1]
            if (
                target is not None
                and target_index is not None
                and inner < len(target)
                and target[inner] > 0
            ):
                ctx.shape_rewrites.append(ShapeRewrite(node, target_index, inner, (y, inner)))
            continue
        # Only a group of several axes has other axes, and those are static (int).
        block_in = math.prod(cast(int, src[a]) for a in gi if a != li)
        block_out = math.prod(cast(int, dst[a]) for a in gj if a != lj)
        if block_in > 1:  # merge: input element c owns output block c*block_in ..
            ctx.unite((x, li), (y, lj), block=block_in)
        else:  # split (or one-to-one): output element h owns input block h*block_out ..
            ctx.unite((y, lj), (x, li), block=block_out)
        for a in gi:
            if a != li:
                ctx.block(x, a, "merged into another axis by a reshape")
        for a in gj:
            if a != lj:
                ctx.block(y, a, "split off another axis by a reshape")
        if target is not None and target_index is not None and lj < len(target) and target[lj] > 0:
            ctx.shape_rewrites.append(ShapeRewrite(node, target_index, lj, (y, lj)))


@_rule("Reshape")
def _reshape(node: ir.Node, ctx: RuleContext) -> None:
    y = name_of(node.outputs[0])
    _map_reshape(ctx, name_of(node.inputs[0]), y, node, 1)
    target = node.inputs[1]
    if ctx.const_ints(target) is None and name_of(target) not in ctx.shape_sources:
        # A target computed otherwise: the sizes it gives would not follow a cut.
        for axis, size in enumerate(ctx.dims(y) or ()):
            if isinstance(size, int) and size > 1:
                ctx.block(y, axis, "the reshape's target is computed at run time")


@_rule("Flatten")
def _flatten(node: ir.Node, ctx: RuleContext) -> None:
    _map_reshape(ctx, name_of(node.inputs[0]), name_of(node.outputs[0]), node, None)


@_rule("Squeeze", "Unsqueeze")
def _squeeze(node: ir.Node, ctx: RuleContext) -> None:
    _map_reshape(ctx, name_of(node.inputs[0]), name_of(node.outputs[0]), node, None)


@_rule("Gather")
def _gather(node: ir.Node, ctx: RuleContext) -> None:
    data, indices, y = name_of(node.inputs[0]), name_of(node.inputs[1]), name_of(node.outputs[0])
    rank, ri = ctx.rank(data), ctx.rank(indices)
    if rank is None or ri is None:
        return
    axis = int(_attr(node, "axis", 0)) % rank
    for a in range(axis):
        ctx.unite((data, a), (y, a))
    for a in range(ri):
        ctx.unite((indices, a), (y, axis + a))
    for a in range(axis + 1, rank):
        ctx.unite((data, a), (y, a - 1 + ri))
    ctx.block(data, axis, "gathered axis")


@_rule(
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceSumSquare",
    "ReduceLogSumExp",
)
def _reduce(node: ir.Node, ctx: RuleContext) -> None:
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    rank = ctx.rank(x) or 0
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 1:
        axes = ctx.const_ints(node.inputs[1])
    if axes is None or not rank:
        return  # unknown rank (inside control flow, say): the value has no channel spaces
    reduced = {a % rank for a in axes} if axes else set(range(rank))
    keep = int(_attr(node, "keepdims", 1))
    out = 0
    for a in range(rank):
        if a in reduced:
            ctx.block(x, a, f"{node.op_type} reduces over this axis")
            out += keep
        else:
            ctx.unite((x, a), (y, out))
            out += 1


@_rule("Pad")
def _pad(node: ir.Node, ctx: RuleContext) -> None:
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    rank = ctx.rank(x) or 0
    pads = ctx.const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    pads = pads if pads is not None else list(_attr(node, "pads", []) or [])
    axes = ctx.const_ints(node.inputs[3]) if len(node.inputs) > 3 else None
    if len(pads) != 2 * len(axes or range(rank)):
        return
    axes = [a % rank for a in (axes or range(rank))]
    padded = {a for k, a in enumerate(axes) if pads[k] or pads[k + len(axes)]}
    for a in range(rank):
        if a in padded:
            ctx.block(x, a, "padded axis")
        else:
            ctx.unite((x, a), (y, a))


@_rule("Resize", "Upsample")
def _resize(node: ir.Node, ctx: RuleContext) -> None:
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    xd, yd = ctx.dims(x), ctx.dims(y)
    if xd is None or yd is None:
        return
    sizes_index = 3 if node.op_type == "Resize" else None
    for a, (i, o) in enumerate(zip(xd, yd, strict=False)):
        if isinstance(i, int) and i == o:
            ctx.unite((x, a), (y, a))
            has_sizes = sizes_index is not None and len(node.inputs) > sizes_index
            if has_sizes and sizes_index is not None and node.inputs[sizes_index] is not None:
                ctx.shape_rewrites.append(ShapeRewrite(node, sizes_index, a, (y, a)))
        else:
            ctx.block(x, a, "resized axis")


@_rule("Expand")
def _expand(node: ir.Node, ctx: RuleContext) -> None:
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    _broadcast_into(ctx, x, y)
    shape = ctx.const_ints(node.inputs[1])
    xd, yd = ctx.dims(x), ctx.dims(y)
    if shape is None or xd is None or yd is None:
        return
    shift = len(yd) - len(shape)
    for k, entry in enumerate(shape):
        axis = k + shift
        if entry > 1 and axis >= len(yd) - len(xd):
            ctx.shape_rewrites.append(ShapeRewrite(node, 1, k, (y, axis)))


@_rule("Shape")
def _shape(node: ir.Node, ctx: RuleContext) -> None:
    read_shape(node, ctx)  # where the sizes go is followed (shape_flow)


@_rule("Size")
def _size(node: ir.Node, ctx: RuleContext) -> None:
    ctx.block_all(name_of(node.inputs[0]), "Size reads the size of this axis")


assert "Reshape" in RULES
