"""Remove operators that do nothing.

Rewrite cases (a node ``y = Op(x, ...)`` is removed and the uses of ``y`` read ``x``):

1. ``Identity``.
2. ``Dropout`` at inference: no ``training_mode`` input, or a constant false one, and the mask
   output is unused. The ratio is irrelevant at inference.
3. ``Cast`` to the dtype ``x`` already has.
4. ``Reshape`` whose constant target yields ``x``'s own shape: ``0`` copies the input dim
   (unless ``allowzero=1``, where it is a literal zero), one ``-1`` takes the remaining size.
5. ``Transpose`` with the identity permutation (or no ``perm`` on a tensor of rank <= 1).
6. ``Unsqueeze`` then ``Squeeze`` (or ``Squeeze`` then ``Unsqueeze``) on the same axes.
7. ``Expand`` whose broadcast result is ``x``'s own shape.
8. ``Pad`` with all pads zero (mode and value are then irrelevant).
9. ``Slice`` with unit steps whose range covers every sliced axis.

When ``y`` is a graph output its name must survive: the producer of ``x`` is renamed to ``y``.
When ``x`` is itself a graph input, an initializer or another graph output, renaming is
impossible, so an ``Identity`` is kept (or put in place of the removed op). Both choices are
recorded in the report. A candidate the pass cannot prove to be a no-op (unknown dtype or shape,
non-constant parameters, a used Dropout mask) is recorded as a skip with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import onnx_ir as ir

from onnxprune.passes._match import required
from onnxprune.passes.base import Pass, PassReport
from onnxprune.passes.constant_folding import constant_array, infer_shapes, node_label

__all__ = ["EliminateNoOpsPass"]

logger = logging.getLogger(__name__)

_INT64_MAX = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class _NoOp:
    """Verdict: the node's first output equals ``source``; ``first`` is a cancelled partner."""

    source: ir.Value
    what: str
    first: ir.Node | None = None


_Verdict = _NoOp | str | None  # a no-op, a skip reason, or "not a no-op"


def _ints(node: ir.Node, index: int, attr: str | None = None) -> list[int] | None:
    """Integer parameter from an attribute (old opsets) or a constant input."""
    if attr is not None and attr in node.attributes:
        return list(node.attributes[attr].as_ints())
    if index >= len(node.inputs) or node.inputs[index] is None:
        return None
    array = constant_array(node.inputs[index])
    return None if array is None else [int(v) for v in array.reshape(-1)]


def _has_input(node: ir.Node, index: int) -> bool:
    return index < len(node.inputs) and node.inputs[index] is not None


def _identity(node: ir.Node) -> _Verdict:
    return _NoOp(required(node.inputs[0]), "removed Identity")


def _dropout(node: ir.Node) -> _Verdict:
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return "Dropout mask output is used"
    if _has_input(node, 2):
        mode = constant_array(node.inputs[2])
        if mode is None:
            return "training_mode is not a constant"
        if bool(mode):
            return "training_mode is true"
    return _NoOp(required(node.inputs[0]), "removed Dropout (inference)")


def _cast(node: ir.Node) -> _Verdict:
    source = node.inputs[0]
    assert source is not None
    if source.dtype is None:
        return f"dtype of {source.name!r} is unknown"
    if source.dtype != ir.DataType(node.attributes["to"].as_int()):
        return None
    return _NoOp(source, f"removed Cast to the same dtype {source.dtype.name}")


def _reshape(node: ir.Node) -> _Verdict:
    source = node.inputs[0]
    assert source is not None
    target = _ints(node, 1)
    if target is None:
        return "Reshape target is not constant"
    if source.shape is None:
        return f"shape of {source.name!r} is unknown"
    if len(target) != len(source.shape) or target.count(-1) > 1:
        return None
    allowzero = node.attributes.get("allowzero")
    copy_zero = allowzero is None or allowzero.as_int() == 0
    for dim, want in zip(source.shape, target, strict=True):
        if want == -1 or (want == 0 and copy_zero) or (isinstance(dim, int) and dim == want):
            continue
        if isinstance(dim, int):
            return None
        return f"cannot prove symbolic dim {dim} equals {want}"
    return _NoOp(source, f"removed Reshape to the same shape {target}")


def _transpose(node: ir.Node) -> _Verdict:
    source = node.inputs[0]
    assert source is not None
    perm_attr = node.attributes.get("perm")
    if perm_attr is None:
        if source.shape is None:
            return f"rank of {source.name!r} is unknown and perm is default (reverse)"
        if len(source.shape) > 1:
            return None
        return _NoOp(source, "removed Transpose of a rank<=1 tensor")
    perm = list(perm_attr.as_ints())
    if perm != list(range(len(perm))):
        return None
    return _NoOp(source, f"removed Transpose with identity perm {perm}")


def _squeeze_pair(node: ir.Node) -> _Verdict:
    first = node.inputs[0].producer() if node.inputs[0] is not None else None
    partner = "Unsqueeze" if node.op_type == "Squeeze" else "Squeeze"
    if first is None or first.op_type != partner or first.domain not in ("", "ai.onnx"):
        return None
    source = first.inputs[0]
    assert source is not None
    axes_first, axes_second = _ints(first, 1, "axes"), _ints(node, 1, "axes")
    if axes_first is None or axes_second is None:
        return "Squeeze/Unsqueeze axes are not constant (or Squeeze has no axes)"
    rank = None
    if source.shape is not None:
        rank = len(source.shape) + (len(axes_first) if partner == "Unsqueeze" else 0)
    if rank is None and any(a < 0 for a in axes_first + axes_second):
        return f"rank of {source.name!r} is unknown and axes are negative"
    norm_first = sorted(a % rank if rank else a for a in axes_first)
    norm_second = sorted(a % rank if rank else a for a in axes_second)
    if norm_first != norm_second:
        return None
    return _NoOp(source, f"removed {partner}/{node.op_type} pair on axes {norm_first}", first)


def _expand(node: ir.Node) -> _Verdict:
    source = node.inputs[0]
    assert source is not None
    shape = _ints(node, 1)
    if shape is None:
        return "Expand shape is not constant"
    if source.shape is None:
        return f"shape of {source.name!r} is unknown"
    dims = list(source.shape)
    if len(shape) > len(dims):
        return None
    for dim, want in zip(dims[len(dims) - len(shape) :], shape, strict=True):
        if want == 1 or (isinstance(dim, int) and dim == want):
            continue
        return None if isinstance(dim, int) else f"cannot prove symbolic dim {dim} equals {want}"
    return _NoOp(source, f"removed Expand to the same shape (target {shape})")


def _pad(node: ir.Node) -> _Verdict:
    pads = _ints(node, 1, "pads")
    if pads is None:
        return "pads are not constant"
    if any(pads):
        return None
    return _NoOp(required(node.inputs[0]), "removed Pad with all-zero pads")


def _slice(node: ir.Node) -> _Verdict:
    source = node.inputs[0]
    assert source is not None
    starts, ends = _ints(node, 1, "starts"), _ints(node, 2, "ends")
    if starts is None or ends is None:
        return "Slice starts/ends are not constant"
    axes = _ints(node, 3, "axes") if _has_input(node, 3) or "axes" in node.attributes else None
    steps = _ints(node, 4) if _has_input(node, 4) else [1] * len(starts)
    if axes is None and (_has_input(node, 3) or "axes" in node.attributes):
        return "Slice axes are not constant"
    if steps is None:
        return "Slice steps are not constant"
    if source.shape is None:
        return f"shape of {source.name!r} is unknown"
    rank = len(source.shape)
    for i, (start, end, step) in enumerate(zip(starts, ends, steps, strict=True)):
        dim = source.shape[(axes[i] if axes else i) % rank]
        if step != 1:
            return None
        if isinstance(dim, int):
            if (start + dim if start < 0 else start) > 0 or end < dim:
                return None
        elif not (start == 0 or start <= -_INT64_MAX) or end < _INT64_MAX:
            return f"cannot prove slice [{start}:{end}] covers symbolic dim {dim}"
    return _NoOp(source, "removed Slice covering the whole tensor")


_CHECKS: dict[str, Callable[[ir.Node], _Verdict]] = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Squeeze": _squeeze_pair,
    "Unsqueeze": _squeeze_pair,
    "Expand": _expand,
    "Pad": _pad,
    "Slice": _slice,
}


class EliminateNoOpsPass(Pass):
    """Remove Identity, inference Dropout and other operators proven to be no-ops."""

    name = "eliminate-noops"

    def __init__(self, *, infer_shapes: bool = True) -> None:
        """Args: infer_shapes: run ONNX shape inference first (dtypes/shapes decide no-ops)."""
        self.infer_shapes = infer_shapes

    def run(self, model: ir.Model, report: PassReport) -> None:
        if self.infer_shapes:
            infer_shapes(model)
        for node in list(model.graph):
            check = _CHECKS.get(node.op_type)
            # A node may already be gone (the first half of a cancelled pair).
            if check is None or node.graph is None or node.domain not in ("", "ai.onnx"):
                continue
            if not node.inputs or node.inputs[0] is None:
                continue
            verdict = check(node)
            if isinstance(verdict, str):
                report.skip(node_label(node), verdict)
            elif verdict is not None:
                self._remove(node, verdict, report)

    def _remove(self, node: ir.Node, verdict: _NoOp, report: PassReport) -> None:
        graph = node.graph
        assert graph is not None
        label, out, source = node_label(node), node.outputs[0], verdict.source
        pinned = source.is_graph_input() or source.is_initializer() or source.is_graph_output()
        if out.is_graph_output() and pinned:
            if node.op_type == "Identity":
                report.skip(label, _pinned_reason(source, out) + "; Identity kept")
                return
            why = _pinned_reason(source, out)
            keep = ir.Node("", "Identity", [source], name=node.name or f"{out.name}_identity")
            kept = keep.outputs[0]
            out_name, out.name = out.name, None
            kept.name, kept.shape, kept.type = out_name, out.shape, out.type
            graph.insert_before(node, keep)
            ir.convenience.replace_all_uses_with(out, kept, replace_graph_outputs=True)
            what = f"{verdict.what}; Identity kept ({why})"
        elif out.is_graph_output():
            out_name, out.name = out.name, None
            old_name = source.name
            ir.convenience.replace_all_uses_with(out, source, replace_graph_outputs=True)
            source.name = out_name
            source.shape = out.shape if out.shape is not None else source.shape
            source.type = out.type if out.type is not None else source.type
            what = f"{verdict.what}; producer output {old_name!r} renamed to graph output"
        else:
            ir.convenience.replace_all_uses_with(out, source)
            what = verdict.what
        graph.remove(node, safe=True)
        first = verdict.first
        if first is not None and not any(v.uses() or v.is_graph_output() for v in first.outputs):
            graph.remove(first, safe=True)
        logger.debug("%s: %s", label, what)
        report.change(label, what)


def _pinned_reason(source: ir.Value, out: ir.Value) -> str:
    if source.is_graph_input():
        kind = "a graph input"
    elif source.is_initializer():
        kind = "an initializer"
    else:
        kind = "a graph output"
    return f"input {source.name!r} is {kind} and output {out.name!r} is a graph output"
