"""Fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.

Inference BatchNormalization is a per-channel affine map on axis 1::

    y = (x - mean) * g / sqrt(v + eps) + beta = x * s + t
    s = g / sqrt(v + eps)          t = beta - mean * s

so, with output channel ``o`` of the layer (see :mod:`onnxprune.passes.fold_affine`)::

    W'[o] = W[o] * s[o]            b' = (b - mean) * s + beta = b * s + t

- Conv: ``W`` is ``(C_out, C_in/group, k...)``, output channels on axis 0.
- ConvTranspose: ``W`` is ``(C_in, C_out/group, k...)``; output channel
  ``o = grp * (C_out/group) + j`` lives on axis 1 within each group.
- Gemm: scales the columns of ``B`` (rows when ``transB=1``) and sets ``C' = C * s + t / beta``.
- MatMul with a constant ``[K, N]`` weight: scales the columns; the BN channel axis is 1, which
  is the weight's ``N`` axis only when the MatMul output has rank 2. The bias goes into the
  constant ``Add`` after the MatMul, or a new one.

A missing bias is created (Conv gets a third input). The BN output value keeps its name, so
graph output names do not change.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import (
    attr,
    const_array,
    drop_if_unused,
    is_private_to,
    label,
    replace_value,
)
from onnxprune.passes.base import Pass, PassReport
from onnxprune.passes.fold_affine import Layer, find_layer, fold_output_affine

__all__ = ["FoldBatchNormPass", "batchnorm_affine"]

logger = logging.getLogger(__name__)


def batchnorm_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """The per-channel ``(s, t)`` of an inference BatchNormalization, or why there is none."""
    if attr(bn, "training_mode", 0) or any(out.name for out in bn.outputs[1:]):
        return "training-mode BatchNormalization (more than one output)"
    if attr(bn, "spatial", 1) == 0:
        return "BatchNormalization with spatial=0 normalizes per element, not per channel"
    params = [const_array(v) for v in bn.inputs[1:5]]
    arrays = [p for p in params if p is not None]
    if len(params) != 4 or len(arrays) != 4:
        return "BatchNormalization parameters are not constant"
    scale, bias, mean, var = (p.astype(np.float64).reshape(-1) for p in arrays)
    eps = float(attr(bn, "epsilon", 1e-5))
    s = scale / np.sqrt(var + eps)
    return s, bias - mean * s


def _layer_mismatch(layer: Layer, channels: int) -> str | None:
    """Why BN's channel axis 1 is not the layer's output-channel axis, or None."""
    if layer.node.op_type == "MatMul":
        rank = layer.out_rank()
        if rank is None:
            return "MatMul output rank is unknown: BN axis 1 may not be the weight's N axis"
        if rank != 2:
            return f"MatMul output has rank {rank}: BN channel axis 1 is not the weight's N axis"
    if layer.out_channels() != channels:
        return f"layer has {layer.out_channels()} output channels, BN has {channels}"
    return None


class FoldBatchNormPass(Pass):
    """Fold BatchNormalization into a preceding linear layer with constant weights.

    For each BatchNormalization:

    1. It must be inference-mode with constant parameters.
    2. Its input must come from a Conv/ConvTranspose/Gemm/MatMul (a MatMul may carry a
       constant bias Add) whose output only the BN reads, and whose weights are constants
       used by that layer alone.
    3. The layer's weights and bias absorb ``s`` and ``t``; the BN disappears.
    """

    name = "fold-batchnorm"

    def run(self, model: ir.Model, report: PassReport) -> None:
        graph = model.graph
        for node in list(graph):
            if node.op_type == "BatchNormalization" and node.domain == "":
                self._try_fold(graph, node, report)

    def _try_fold(self, graph: ir.Graph, bn: ir.Node, report: PassReport) -> bool:
        name = label(bn)
        affine = batchnorm_affine(bn)
        if isinstance(affine, str):
            report.skip(name, affine)
            return False
        x = bn.inputs[0]
        producer = x.producer() if x is not None else None
        if x is None or producer is None:
            report.skip(name, "input is not produced by a node")
            return False
        layer, reason = find_layer(x)
        if layer is None:
            report.skip(
                name, reason or f"input comes from {producer.op_type}, not a foldable layer"
            )
            return False
        if x.is_graph_output():
            report.skip(name, f"output of {label(producer)} is a graph output")
            return False
        if not is_private_to(x, bn):
            report.skip(name, f"output of {label(producer)} has other consumers")
            return False
        reason = _layer_mismatch(layer, affine[0].size)
        if reason:
            report.skip(name, reason)
            return False
        target = label(layer.node)
        out = fold_output_affine(graph, layer, *affine)
        params = bn.inputs[1:5]
        replace_value(bn.outputs[0], out)
        graph.remove(bn, safe=True)
        for value in params:
            drop_if_unused(graph, value)
        report.change(target, f"folded {name}")
        logger.debug("folded %s into %s", name, target)
        return True
