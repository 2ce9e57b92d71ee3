"""Rewrite a spatial ``ReduceMean`` as ``GlobalAveragePool``.

``ReduceMean(x, axes = {2, ..., r-1}, keepdims = 1)`` on a rank-``r`` tensor (``r >= 3``,
layout N, C, spatial...) averages every spatial position of each (n, c), which is exactly
``GlobalAveragePool(x)``: same output shape ``[N, C, 1, ...]`` and the same mean. PyTorch's
dynamo exporter writes ``adaptive_avg_pool2d(x, 1)`` / ``x.mean((-1, -2), keepdim=True)``
this way. Why rewrite: onnxruntime has an int8 ``QLinearGlobalAveragePool`` but no int8
ReduceMean, so after quantization the ReduceMean stays a float island (dequantize, reduce,
quantize) between int8 kernels.

Axes come from the attribute (opset < 18) or a constant input (opset >= 18); negative axes
count from the end. Skipped with the reason: ``keepdims = 0`` (the output drops the spatial
dims; a reshape would be needed), unknown input rank, non-constant axes,
``noop_with_empty_axes`` with no axes. A ReduceMean over other axes is not a candidate.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.passes._shape_vectors import constant_array
from onnxprune.passes.base import Pass, PassReport
from onnxprune.passes.constant_folding import infer_shapes, node_label

__all__ = ["ReduceMeanToPoolPass"]


def _axes(node: ir.Node) -> list[int] | str | None:
    """The reduced axes (None: all axes), or a reason they are unknown."""
    if "axes" in node.attributes:
        return list(node.attributes["axes"].as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_array(node.inputs[1])
        if array is None:
            return "axes is not a constant"
        return [int(a) for a in array.reshape(-1)]
    if node.attributes.get_int("noop_with_empty_axes", 0):
        return "no axes with noop_with_empty_axes=1 (an identity)"
    return None


class ReduceMeanToPoolPass(Pass):
    """Replace ``ReduceMean`` over all spatial axes (keepdims) by ``GlobalAveragePool``."""

    name = "reduce-mean-to-pool"

    def run(self, model: ir.Model, report: PassReport) -> None:
        candidates = [
            n for n in model.graph if n.op_type == "ReduceMean" and n.domain in ("", "ai.onnx")
        ]
        if any(n.inputs[0] is not None and n.inputs[0].shape is None for n in candidates):
            infer_shapes(model)  # the rank decides; the pipeline drops inferred shapes later
        for node in candidates:
            self._try_rewrite(model, node, report)

    def _try_rewrite(self, model: ir.Model, node: ir.Node, report: PassReport) -> bool:
        """True if ``node`` was replaced."""
        label = node_label(node)
        source = node.inputs[0]
        shape = source.shape if source is not None else None
        axes = _axes(node)
        if isinstance(axes, str):
            report.skip(label, axes)
            return False
        if shape is None:
            report.skip(label, "input rank unknown")
            return False
        rank = len(shape)
        reduced = set(range(rank)) if axes is None else {a % rank for a in axes}
        if rank < 3 or reduced != set(range(2, rank)):
            return False  # not a spatial mean: not a candidate
        if not node.attributes.get_int("keepdims", 1):
            report.skip(label, "keepdims=0 (the spatial dims are dropped)")
            return False
        pool = ir.node("GlobalAveragePool", [source], name=node.name)
        old = node.outputs[0]
        new = pool.outputs[0]
        name = old.name
        old.name = f"{name}_reduce_mean"  # one value per name while both exist
        new.name, new.shape, new.type = name, old.shape, old.type
        model.graph.insert_before(node, pool)
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        report.change(label, f"ReduceMean over axes {sorted(reduced)} -> GlobalAveragePool")
        return True
