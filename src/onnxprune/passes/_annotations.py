"""Keep a model's intermediate shape annotations (``value_info``) as the user gave them.

Passes run ONNX shape inference (with data propagation) to decide rewrites. Left on the
values, those inferred shapes would be written out as ``value_info``, including generated
symbolic dims (``unk__1``) shared by many tensors. onnxruntime trusts them and fires fusions
it could not prove on the original, e.g. ``Add + Add + LayerNormalization`` ->
``SkipLayerNormalization`` on a torchscript encoder whose residual shapes it otherwise cannot
infer. On the CPU provider that kernel measured several times slower than the unfused ops
(onnxruntime 1.31.1), which made the canonical model ~6-10% slower. Inferred shapes are a means, not
part of the result: :func:`restore` puts back exactly the annotations the input had.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["Annotations", "restore", "snapshot"]

#: Shape and type annotation of each intermediate value, as found before any pass ran.
Annotations = dict[ir.Value, tuple[ir.Shape | None, ir.TypeProtocol | None]]


def _intermediates(model: ir.Model) -> list[ir.Value]:
    """Node outputs that are not graph outputs: the values ``value_info`` may describe."""
    return [
        value
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        for value in node.outputs
        if not value.is_graph_output()
    ]


def snapshot(model: ir.Model) -> Annotations:
    """The current annotations of every intermediate value of ``model``."""
    return {value: (value.shape, value.type) for value in _intermediates(model)}


def restore(model: ir.Model, before: Annotations) -> int:
    """Give intermediate values their ``before`` annotations; values new since get none.

    Returns:
        How many values had an annotation that is now dropped or put back.
    """
    count = 0
    for value in _intermediates(model):
        shape, type_ = before.get(value, (None, None))
        if value.shape != shape or value.type != type_:
            value.shape, value.type = shape, type_
            count += 1
    return count
