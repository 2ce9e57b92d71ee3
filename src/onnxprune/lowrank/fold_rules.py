"""The matchers behind :class:`onnxprune.lowrank.fold.FoldLinearPass` (math documented there).

Each rule takes ``(graph, node)`` and returns None when the node does not start its
pattern, a :class:`~onnxprune.reports.Change` after rewriting, or a
:class:`~onnxprune.reports.Skip` when the pattern matched but folding would not pay off or
is unsafe.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import (
    add_initializer,
    attr,
    const_array,
    const_array_of,
    drop_if_unused,
    fresh_name,
    is_private_to,
    label,
    replace_value,
    required,
    scalar_const,
)
from onnxprune.reports import Change, Skip

__all__ = ["FOLD_RULES", "Outcome"]

#: What a rule did at a node: rewrote it, left it alone with the reason, or did not match.
Outcome = Change | Skip | None


def _private_const(node: ir.Node | None, index: int) -> np.ndarray | None:
    """Input ``index`` of ``node`` when it is a constant only ``node`` uses."""
    if node is None or index >= len(node.inputs):
        return None
    value = node.inputs[index]
    if value is None:
        return None
    array = const_array(value)
    return array if array is not None and is_private_to(value, node) else None


def _producer(value: ir.Value | None, consumer: ir.Node, op_type: str) -> ir.Node | None:
    """The ``op_type`` producer of ``value`` when ``consumer`` is its only user."""
    if value is None or not is_private_to(value, consumer) or len(value.uses()) != 1:
        return None
    node = value.producer()
    if node is None or node.op_type != op_type or node.domain != "":
        return None
    return node


def _replace(
    graph: ir.Graph,
    last: ir.Node,
    old: list[ir.Node],
    specs: list[tuple[str, list, dict]],
) -> None:
    """Insert nodes ``(op, inputs, attrs)`` (arrays become initializers; ``None`` = previous
    output), route ``last``'s output to the final one, and drop ``old`` and their constants."""
    name = label(last).replace("/", "_").strip("_") if not last.name else last.name
    current: ir.Value | None = None
    new_nodes = []
    for index, (op_type, inputs, attrs) in enumerate(specs):
        values: list[ir.Value | None] = []
        for item in inputs:
            if isinstance(item, np.ndarray):
                values.append(add_initializer(graph, f"{name}_folded_{index}", item))
            else:
                values.append(current if item is None else item)
        out = ir.Value(name=fresh_name(graph, f"{name}_folded_{index}_out"))
        new_nodes.append(
            ir.node(op_type, values, attrs, outputs=[out], name=f"{name}_folded_{index}")
        )
        current = out
    graph.insert_before(last, new_nodes)
    assert current is not None  # specs is never empty
    replace_value(last.outputs[0], current)
    _remove_with_consts(graph, old)


def _remove_with_consts(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    consts = [v for n in nodes for v in n.inputs if v is not None and const_array(v) is not None]
    graph.remove(nodes, safe=True)
    for value in consts:
        drop_if_unused(graph, value)


def _cost_reason(op: str, merged: int, chain: int, detail: str) -> str:
    return (
        f"merged {op} costs more MACs than the chain: {merged} > {chain} per row/position "
        f"({detail})"
    )


def _last_axis_bias(b: np.ndarray, width: int) -> np.ndarray | None:
    """``b`` when it varies along the last axis only (scalars broadcast), else None."""
    if b.ndim == 0:
        return np.full((width,), b, dtype=b.dtype)
    if any(d != 1 for d in b.shape[:-1]) or b.shape[-1] not in (1, width):
        return None
    return np.broadcast_to(b, (*b.shape[:-1], width)).copy()


def fold_matmul_chain(graph: ir.Graph, node: ir.Node) -> Outcome:
    """Rules 1-2: ``(x W1 [+ b1]) W2``."""
    w2 = _private_const(node, 1) if node.op_type == "MatMul" and node.domain == "" else None
    if w2 is None or w2.ndim != 2:
        return None
    mid = _producer(node.inputs[0], node, "MatMul") or _producer(node.inputs[0], node, "Add")
    bias, first = None, mid
    if mid is not None and mid.op_type == "Add":
        index = 1 if _private_const(mid, 1) is not None else 0
        bias = _private_const(mid, index)
        first = _producer(mid.inputs[1 - index], mid, "MatMul") if bias is not None else None
    w1 = _private_const(first, 1)
    if first is None or w1 is None or w1.ndim != 2 or const_array(first.inputs[0]) is not None:
        return None
    (k, r), n = w1.shape, w2.shape[1]
    bias = _last_axis_bias(bias, r) if bias is not None else None
    if w2.shape[0] != r or (mid is not first and bias is None):
        return None
    if k * n > k * r + r * n:
        return Skip(label(node), _cost_reason("MatMul", k * n, k * r + r * n, f"rank {r}"))
    w = (w1.astype(np.float64) @ w2).astype(w2.dtype)
    specs: list[tuple[str, list, dict]] = [("MatMul", [first.inputs[0], w], {})]
    if bias is not None:
        specs.append(("Add", [None, (bias.astype(np.float64) @ w2).astype(w2.dtype)], {}))
    _replace(graph, node, [n for n in (first, mid, node) if n is not None], specs)
    return Change(label(node), f"MatMul chain [{k},{r}]x[{r},{n}] -> [{k},{n}]")


def _gemm_weight(node: ir.Node) -> np.ndarray | None:
    b = _private_const(node, 1)
    if b is None or b.ndim != 2:
        return None
    return b.T if attr(node, "transB", 0) else b


def _gemm_bias(node: ir.Node) -> tuple[np.ndarray, bool] | None:
    """``(beta * C, present)``; None when C is not a private constant."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return np.zeros(()), False
    c = _private_const(node, 2)
    return None if c is None else (float(attr(node, "beta", 1.0)) * c.astype(np.float64), True)


def fold_gemm_chain(graph: ir.Graph, node: ir.Node) -> Outcome:
    """Rule 3: ``Gemm(Gemm(x, B1, C1), B2, C2)``."""
    if node.op_type != "Gemm" or node.domain != "" or attr(node, "transA", 0):
        return None
    first = _producer(node.inputs[0], node, "Gemm")
    b1, b2 = _gemm_weight(first) if first else None, _gemm_weight(node)
    c1, c2 = _gemm_bias(first) if first else None, _gemm_bias(node)
    if first is None or b1 is None or b2 is None or c1 is None or c2 is None:
        return None
    (k, r), n = b1.shape, b2.shape[1]
    if b2.shape[0] != r:
        return None
    if k * n > k * r + r * n:
        return Skip(label(node), _cost_reason("Gemm", k * n, k * r + r * n, f"rank {r}"))
    a1, a2 = (float(attr(g, "alpha", 1.0)) for g in (first, node))
    b = a1 * a2 * (b1.astype(np.float64) @ b2)
    c1_rows = np.broadcast_to(c1[0], (*c1[0].shape[:-1], r) if c1[0].ndim == 2 else (1, r))
    c = a2 * (c1_rows @ b2) + c2[0]
    if c.ndim == 2 and c.shape[0] == 1:
        c = c[0]
    dtype = b2.dtype
    inputs = [first.inputs[0], b.astype(dtype)]
    if c1[1] or c2[1]:
        inputs.append(np.asarray(c, dtype=dtype))
    _replace(graph, node, [first, node], [("Gemm", inputs, {"transA": attr(first, "transA", 0)})])
    return Change(label(node), f"Gemm chain [{k},{r}]x[{r},{n}] -> [{k},{n}]")


def _pointwise(node: ir.Node | None) -> np.ndarray | None:
    """The ``[O, C]`` matrix of a private-weight 1x1 group-1 Conv, else None."""
    if node is None or node.op_type != "Conv" or node.domain != "":
        return None
    w = _private_const(node, 1)
    if w is None or w.ndim < 3 or any(d != 1 for d in w.shape[2:]):
        return None
    if int(attr(node, "group", 1)) != 1 or attr(node, "auto_pad", "NOTSET") not in (
        "NOTSET",
        "VALID",
    ):
        return None
    return w.reshape(w.shape[0], w.shape[1])


def _conv_bias(node: ir.Node, channels: int) -> np.ndarray | None:
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return np.zeros(channels)
    b = _private_const(node, 2)
    return None if b is None else b.astype(np.float64)


def fold_conv_chain(graph: ir.Graph, node: ir.Node) -> Outcome:
    """Rule 4: two 1x1 convolutions."""
    w2 = _pointwise(node)
    first = _producer(node.inputs[0], node, "Conv") if w2 is not None else None
    w1 = _pointwise(first)
    if first is None or w1 is None or w2 is None:
        return None
    spatial = const_array_of(first.inputs[1]).ndim - 2  # _pointwise found it constant
    if any(attr(node, "pads", None) or [0]):
        return Skip(label(node), "second 1x1 conv is padded (its padding would see no bias)")
    b1, b2 = _conv_bias(first, w1.shape[0]), _conv_bias(node, w2.shape[0])
    if b1 is None or b2 is None:
        return None
    s1 = list(attr(first, "strides", None) or [1] * spatial)
    s2 = list(attr(node, "strides", None) or [1] * spatial)
    (o1, c), o2 = w1.shape, w2.shape[0]
    merged, chain = o2 * c, o1 * c * int(np.prod(s2)) + o2 * o1
    if merged > chain:
        return Skip(label(node), _cost_reason("Conv", merged, chain, f"{o1} mid channels"))
    dtype = w2.dtype
    w = (w2.astype(np.float64) @ w1).reshape(o2, c, *([1] * spatial)).astype(dtype)
    attrs: dict = {
        "kernel_shape": [1] * spatial,
        "strides": [a * b for a, b in zip(s1, s2, strict=True)],
    }
    if attr(first, "auto_pad", "NOTSET") == "NOTSET" and attr(first, "pads", None):
        attrs["pads"] = list(attr(first, "pads"))
    bias = (w2.astype(np.float64) @ b1 + b2).astype(dtype)
    _replace(graph, node, [first, node], [("Conv", [first.inputs[0], w, bias], attrs)])
    return Change(label(node), f"1x1 Conv chain {c}->{o1}->{o2} -> {c}->{o2}")


def _lora_branch(
    value: ir.Value | None, consumer: ir.Node
) -> tuple[list[ir.Node], ir.Value, float, np.ndarray, int] | None:
    """``(nodes, x, s, A B, r)`` of ``s (x A) B``, walking back from ``value``."""
    nodes: list[ir.Node] = []
    scale = 1.0
    mats: list[np.ndarray] = []
    current: ir.Value | None = value
    user = consumer
    while len(mats) < 2:
        node = _producer(current, user, "Mul") or _producer(current, user, "MatMul")
        if node is None:
            return None
        if node.op_type == "Mul":
            index = 1 if scalar_const(node.inputs[1]) is not None else 0
            factor = scalar_const(node.inputs[index])
            if factor is None:
                return None
            scale *= factor
            current = node.inputs[1 - index]
        else:
            mat = _private_const(node, 1)
            if mat is None or mat.ndim != 2:
                return None
            mats.append(mat.astype(np.float64))
            current = node.inputs[0]
        nodes.append(node)
        user = node
    b, a = mats
    if a.shape[1] != b.shape[0] or current is None:
        return None
    return nodes, current, scale, a @ b, a.shape[1]


def fold_lora(graph: ir.Graph, node: ir.Node) -> Outcome:
    """Rule 5: ``base(x) + s (x A) B`` into the base weight."""
    if node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2:
        return None
    for index in (0, 1):
        branch = _lora_branch(node.inputs[index], node)
        base_out = node.inputs[1 - index]
        if branch is None or base_out is None or not is_private_to(base_out, node):
            continue
        nodes, x, scale, delta, rank = branch
        base = base_out.producer()
        if base is not None and base.op_type == "Add":
            bias_index = 1 if const_array(base.inputs[1]) is not None else 0
            base = _producer(base.inputs[1 - bias_index], base, "MatMul")
        w = _private_const(base, 1) if base is not None and base.op_type == "MatMul" else None
        if base is None or w is None or base.inputs[0] is not x or w.shape != delta.shape:
            continue
        folded = (w.astype(np.float64) + scale * delta).astype(w.dtype)
        weight = required(base.inputs[1])  # _private_const found it
        weight.const_value = ir.tensor(folded, name=weight.name)
        replace_value(node.outputs[0], base_out)
        consts = [
            v for n in nodes for v in n.inputs if v is not None and const_array(v) is not None
        ]
        graph.remove([node, *nodes], safe=True)
        for value in consts:
            drop_if_unused(graph, value)
        return Change(label(base), f"LoRA rank {rank} folded into the weight (scale {scale:g})")
    return None


FOLD_RULES: tuple[Callable[[ir.Graph, ir.Node], Outcome], ...] = (
    fold_lora,
    fold_matmul_chain,
    fold_gemm_chain,
    fold_conv_chain,
)
