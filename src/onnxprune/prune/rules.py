"""One small rule per op kind: which channel spaces of its inputs and outputs correspond.

A rule relates axes (:meth:`RuleContext.unite`) or blocks them with a reason; any axis of
the node's inputs and outputs a rule leaves unmentioned is blocked by the driver ("not
mapped"), so a rule can only make pruning *less* conservative by saying something explicit.
Ops with no rule block all their axes. Rules look at op patterns, never at node names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from onnxprune.passes._match import name_of
from onnxprune.prune.context import AttrRewrite, RuleContext, ShapeRewrite, SliceRewrite

__all__ = ["RULES"]

Rule = Callable[[ir.Node, RuleContext], None]
RULES: dict[str, Rule] = {}

UNARY = (
    "Relu",
    "LeakyRelu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Gelu",
    "Erf",
    "Tanh",
    "Exp",
    "Log",
    "Sqrt",
    "Neg",
    "Abs",
    "Softplus",
    "Softsign",
    "Elu",
    "Selu",
    "Celu",
    "ThresholdedRelu",
    "Mish",
    "Identity",
    "Cast",
    "Dropout",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Sin",
    "Cos",
    "QuickGelu",
    "Not",
    "IsNaN",
    "IsInf",
    "Swish",
)
BINARY = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Where",
    "PRelu",
    "Equal",
    "Less",
    "Greater",
    "And",
    "Or",
)


def _rule(*ops: str) -> Callable[[Rule], Rule]:
    def register(func: Rule) -> Rule:
        for op in ops:
            RULES[op] = func
        return func

    return register


def _name(value: ir.Value | None) -> str | None:
    return None if value is None else value.name


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _equal_all(ctx: RuleContext, a: str, b: str) -> None:
    """Identity relation on every axis (same rank)."""
    for axis in range(ctx.rank(a) or 0):
        ctx.unite((a, axis), (b, axis))


def _broadcast_into(ctx: RuleContext, x: str, y: str) -> None:
    """Relate ``x`` to output ``y`` under numpy broadcasting (right-aligned)."""
    xd, yd = ctx.dims(x), ctx.dims(y)
    if xd is None or yd is None:
        return
    shift = len(yd) - len(xd)
    for axis, size in enumerate(xd):
        out_axis = axis + shift
        if size == yd[out_axis] or not isinstance(size, int) or size != 1:
            ctx.unite((x, axis), (y, out_axis))
        else:
            ctx.block(x, axis, "broadcast axis")


@_rule(*UNARY)
def _unary(node: ir.Node, ctx: RuleContext) -> None:
    x, y = _name(node.inputs[0]), _name(node.outputs[0])
    if x and y:
        _equal_all(ctx, x, y)
    mask = node.outputs[1].name if node.op_type == "Dropout" and len(node.outputs) > 1 else None
    if x is not None and mask:  # a nameless input has no recorded shape: nothing to relate
        _equal_all(ctx, x, mask)


@_rule(*BINARY)
def _binary(node: ir.Node, ctx: RuleContext) -> None:
    y = name_of(node.outputs[0])
    for value in node.inputs:
        if value is not None:
            _broadcast_into(ctx, name_of(value), y)


@_rule("Conv", "ConvInteger", "ConvTranspose")
def _conv(node: ir.Node, ctx: RuleContext) -> None:
    transpose = node.op_type == "ConvTranspose"
    x, w, y = name_of(node.inputs[0]), name_of(node.inputs[1]), name_of(node.outputs[0])
    bias = name_of(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    wd, xd = ctx.dims(w), ctx.dims(x)
    if wd is None or xd is None:
        return
    group = int(_attr(node, "group", 1))
    c_in = xd[1]
    out_axis = 1 if transpose else 0
    in_axis = 0 if transpose else 1
    if group == 1:
        ctx.unite((w, out_axis), (y, 1))
    if bias:
        ctx.unite((bias, 0), (y, 1))
    for axis in range(2, len(wd)):
        ctx.block(w, axis, "kernel axis")
    for axis in (0, *range(2, len(xd))):
        ctx.block(x, axis, "batch or spatial axis of a convolution")
        ctx.block(y, axis, "batch or spatial axis of a convolution")
    if group == 1:
        ctx.unite((w, in_axis), (x, 1))
        return
    y_dims = ctx.dims(y)
    c_out = y_dims[1] if y_dims else None
    # Depthwise when group == C_in (both sizes static) and C_out is a multiple of C_in.
    if isinstance(c_in, int) and isinstance(c_out, int) and group == c_in and c_out % c_in == 0:
        # Depthwise (channel multiplier m = C_out / C_in): input channel c owns outputs
        # c*m .. c*m+m-1 and weight rows alike; ``group`` follows the kept input channels.
        m = c_out // c_in
        ctx.unite((x, 1), (y, 1), block=m)
        ctx.unite((x, 1), (w, 0), block=1 if transpose else m)
        ctx.block(w, 1, "depthwise kernel has one input channel per group")
        ctx.attr_rewrites.append(AttrRewrite(node, "group", (x, 1)))
        return
    reason = f"grouped convolution (group={group}) is not pruned"
    for value in (x, y):
        ctx.block(value, 1, reason)
    for axis in (0, 1):
        ctx.block(w, axis, reason)


@_rule("Gemm")
def _gemm(node: ir.Node, ctx: RuleContext) -> None:
    a, b, y = name_of(node.inputs[0]), name_of(node.inputs[1]), name_of(node.outputs[0])
    ta, tb = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
    ctx.unite((a, 1 - ta), (b, tb))  # K
    ctx.unite((a, ta), (y, 0))  # M
    ctx.unite((b, 1 - tb), (y, 1))  # N
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        _broadcast_into(ctx, name_of(node.inputs[2]), y)


@_rule("MatMul", "MatMulInteger")
def _matmul(node: ir.Node, ctx: RuleContext) -> None:
    a, b, y = name_of(node.inputs[0]), name_of(node.inputs[1]), name_of(node.outputs[0])
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if not ra or not rb or ra < 2 or rb < 2 or ry is None:
        return  # 1-D operands: every axis stays unmapped (blocked)
    ctx.unite((a, -1), (b, -2))
    ctx.unite((a, -2), (y, -2))
    ctx.unite((b, -1), (y, -1))
    for value, rank in ((a, ra), (b, rb)):
        dims, out_dims = ctx.dims(value), ctx.dims(y)
        assert dims is not None and out_dims is not None  # rank() is len(dims()): both known
        for axis in range(rank - 2):
            out_axis = axis + ry - rank
            if dims[axis] == out_dims[out_axis] or dims[axis] != 1:
                ctx.unite((value, axis), (y, out_axis))
            else:
                ctx.block(value, axis, "broadcast axis")


@_rule("BatchNormalization", "InstanceNormalization")
def _channel_norm(node: ir.Node, ctx: RuleContext) -> None:
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    if len(node.outputs) > 1 and any(o.name for o in node.outputs[1:]):
        ctx.block_all(x, "training-mode BatchNormalization")
        return
    _equal_all(ctx, x, y)
    for param in node.inputs[1:]:
        if param is not None:
            ctx.unite((name_of(param), 0), (x, 1))
    if node.op_type == "InstanceNormalization":
        for axis in range(2, ctx.rank(x) or 0):
            ctx.block(x, axis, "InstanceNormalization normalizes over this axis")


@_rule("GroupNormalization")
def _group_norm(node: ir.Node, ctx: RuleContext) -> None:
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    groups = int(_attr(node, "num_groups", 1))
    dims = ctx.dims(x)
    if dims is None or not isinstance(dims[1], int) or dims[1] % groups:
        return
    per_group = dims[1] // groups
    _equal_all(ctx, x, y)
    # Whole groups only: the channels of a group form one unit.
    ctx.graph.unite_within(x, 1, per_group, ctx.node_name)
    for param in node.inputs[1:]:
        size = (ctx.dims(name_of(param)) or (None,))[0] if param is not None else None
        if size == groups:
            ctx.unite((name_of(param), 0), (x, 1), block=per_group)
        elif param is not None:
            ctx.unite((name_of(param), 0), (x, 1))
    ctx.attr_rewrites.append(AttrRewrite(node, "num_groups", (x, 1), per_group))
    for axis in range(2, len(dims)):
        ctx.block(x, axis, "GroupNormalization normalizes over this axis")


def _normalized_axes(node: ir.Node, ctx: RuleContext, default: int) -> tuple[str, str, int]:
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    rank = ctx.rank(x) or 0
    return x, y, int(_attr(node, "axis", default)) % max(rank, 1)


@_rule("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
def _layer_norm(node: ir.Node, ctx: RuleContext) -> None:
    x, y, axis = _normalized_axes(node, ctx, -1)
    _equal_all(ctx, x, y)
    reason = f"{node.op_type} normalizes over this axis; pruning it changes the statistics"
    for a in range(axis, ctx.rank(x) or 0):
        ctx.block(x, a, reason)
    for param in node.inputs[1:]:
        if param is not None:
            ctx.block_all(name_of(param), reason)


@_rule("Softmax", "LogSoftmax", "Hardmax")
def _softmax(node: ir.Node, ctx: RuleContext) -> None:
    x, y, axis = _normalized_axes(node, ctx, -1)
    _equal_all(ctx, x, y)
    ctx.block(x, axis, f"{node.op_type} normalizes over this axis")


@_rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _pool(node: ir.Node, ctx: RuleContext) -> None:
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    ctx.unite((x, 0), (y, 0))
    ctx.unite((x, 1), (y, 1))
    for axis in range(2, ctx.rank(x) or 0):
        ctx.block(x, axis, "pooled axis")
        ctx.block(y, axis, "pooled axis")


@_rule("Transpose")
def _transpose(node: ir.Node, ctx: RuleContext) -> None:
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    rank = ctx.rank(x) or 0
    perm = list(_attr(node, "perm", list(reversed(range(rank)))))
    for out_axis, in_axis in enumerate(perm):
        ctx.unite((x, in_axis), (y, out_axis))


@_rule("Concat")
def _concat(node: ir.Node, ctx: RuleContext) -> None:
    y = name_of(node.outputs[0])
    rank = ctx.rank(y) or 0
    axis = int(_attr(node, "axis", 0)) % max(rank, 1)
    offset = 0
    for value in node.inputs:
        dims = ctx.dims(name_of(value))
        size = None if dims is None else dims[axis]
        if not isinstance(size, int):
            ctx.block(y, axis, "Concat input of unknown size")
            return
        for a in range(rank):
            if a == axis:
                ctx.unite((name_of(value), a), (y, a), offset=offset, partial=True)
            else:
                ctx.unite((name_of(value), a), (y, a))
        offset += size


@_rule("Split")
def _split(node: ir.Node, ctx: RuleContext) -> None:
    x = name_of(node.inputs[0])
    rank = ctx.rank(x) or 0
    axis = int(_attr(node, "axis", 0)) % max(rank, 1)
    offset = 0
    for k, out in enumerate(node.outputs):
        dims = ctx.dims(name_of(out))
        size = None if dims is None else dims[axis]
        if not isinstance(size, int):
            ctx.block(x, axis, "Split output of unknown size")
            return
        for a in range(rank):
            if a == axis:
                ctx.unite((name_of(out), a), (x, a), offset=offset, partial=True)
            else:
                ctx.unite((name_of(out), a), (x, a))
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            ctx.shape_rewrites.append(ShapeRewrite(node, 1, k, (name_of(out), axis)))
        offset += size
    if _attr(node, "num_outputs") is not None or _attr(node, "split") is not None:
        # Equal splits by count or a split attribute cannot follow uneven pruning.
        ctx.block(x, axis, "Split sizes given by attribute")


@_rule("Slice")
def _slice(node: ir.Node, ctx: RuleContext) -> None:
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    rank = ctx.rank(x) or 0
    starts, ends = ctx.const_ints(node.inputs[1]), ctx.const_ints(node.inputs[2])
    axes = ctx.const_ints(node.inputs[3]) if len(node.inputs) > 3 else None
    steps = ctx.const_ints(node.inputs[4]) if len(node.inputs) > 4 else None
    if starts is None or ends is None:
        return
    axes = [a % rank for a in (axes or list(range(len(starts))))]
    sliced = {a: i for i, a in enumerate(axes)}
    dims = ctx.dims(x)
    for a in range(rank):
        if a not in sliced:
            ctx.unite((x, a), (y, a))
            continue
        i = sliced[a]
        size = dims[a] if dims else None
        if (steps and steps[i] != 1) or not isinstance(size, int):
            continue  # left unmapped: blocked
        start = max(0, min(size, starts[i] + size if starts[i] < 0 else starts[i]))
        end = max(start, min(size, ends[i] + size if ends[i] < 0 else ends[i]))
        # Output element j is input element start + j: the input's other elements are
        # dropped by the Slice anyway, so only the covered ones are related.
        out = ctx.graph.space(y, a)
        if out is not None and out.size == end - start:
            src = ctx.graph.space(x, a)
            assert src is not None  # x's axis a has the static size ``size`` (checked above)
            ctx.touch((x, a))
            ctx.touch((y, a))
            for j in range(out.size):
                ctx.graph._union(src.base + start + j, out.base + j)
            ctx.slice_rewrites.append(SliceRewrite(node, i, (x, a), start, end))


@_rule("QuantizeLinear", "DequantizeLinear")
def _qdq(node: ir.Node, ctx: RuleContext) -> None:
    """Q/DQ are elementwise; per-axis scales and zero points follow their channel axis."""
    x, y = name_of(node.inputs[0]), name_of(node.outputs[0])
    _equal_all(ctx, x, y)
    if int(_attr(node, "block_size", 0) or 0):
        ctx.block_all(x, "blocked quantization is not pruned")
        return
    rank = ctx.rank(x) or 0
    axis = int(_attr(node, "axis", 1)) % max(rank, 1)
    for param in node.inputs[1:]:
        if param is not None and ctx.rank(name_of(param)) == 1:
            ctx.unite((name_of(param), 0), (x, axis))
