"""MACs and parameters after removing units, computed without rewriting the model.

A Conv/ConvTranspose/Gemm/MatMul costs the product of the sizes of its output axes and its
reduction axes (see :mod:`onnxprune.analysis.macs`). Pruning scales each of those sizes to
its kept count, so a node's MACs after pruning is its MACs before times the product of
``kept / size`` over those axes: exact, and cheap enough to evaluate inside a search for a
global MACs or parameters target. Parameters are recomputed per initializer the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.macs import count_costs
from onnxprune.passes._match import name_of
from onnxprune.prune.analysis import Analysis
from onnxprune.prune.channels import SpaceKey

__all__ = ["CostModel"]


def _mac_axes(node: ir.Node, rank: Callable[[str], int | None]) -> list[SpaceKey]:
    """The axes whose sizes multiply into the node's MACs."""
    out = name_of(node.outputs[0])
    axes: list[SpaceKey] = [(out, a) for a in range(rank(out) or 0)]
    op = node.op_type
    if op in ("Conv", "ConvInteger"):
        w = name_of(node.inputs[1])
        axes += [(w, a) for a in range(1, rank(w) or 0)]
    elif op == "ConvTranspose":
        x, w = name_of(node.inputs[0]), name_of(node.inputs[1])
        axes = [(x, a) for a in range(rank(x) or 0)]
        axes += [(w, a) for a in range(1, rank(w) or 0)]
    elif op == "Gemm":
        trans_a = node.attributes.get("transA")
        axes.append((name_of(node.inputs[0]), 0 if trans_a is not None and trans_a.value else 1))
    elif op in ("MatMul", "MatMulInteger"):
        axes.append((name_of(node.inputs[0]), -1))
    return axes


class CostModel:
    """Original per-node MACs and per-initializer sizes, rescaled by kept channel counts."""

    def __init__(self, model: ir.Model, analysis: Analysis, dims: Mapping[str, int] | None = None):
        self.analysis = analysis
        costs = count_costs(model, dims=dims)
        nodes = list(model.graph)
        self.macs_before = int(costs.total_macs)
        self._node_terms: list[tuple[int, list[SpaceKey]]] = []
        for cost in costs.nodes:
            if cost.macs:
                node = nodes[cost.index]
                axes = [self._normalize(k) for k in _mac_axes(node, analysis.graph.rank)]
                self._node_terms.append((int(cost.macs), [k for k in axes if k is not None]))
        self._init_terms = []
        for name, value in model.graph.initializers.items():
            if value.const_value is not None:
                shape = tuple(int(d) for d in value.const_value.shape.numpy())
                self._init_terms.append((name, shape))
        self.params_before = sum(math.prod(s) for _, s in self._init_terms)
        graph = analysis.graph
        self._n_elements = sum(s.size for s in graph.spaces.values())
        self._roots = {
            key: np.array([graph.find(s.base + i) for i in range(s.size)])
            for key, s in graph.spaces.items()
        }

    def _normalize(self, key: SpaceKey) -> SpaceKey | None:
        rank = self.analysis.graph.rank(key[0])
        if not rank:
            return None
        key = (key[0], key[1] % rank)
        return key if key in self.analysis.graph.spaces else None

    def _fractions(self, removed: Collection[int]) -> dict[SpaceKey, float]:
        if not removed:
            return {}
        mask = np.zeros(self._n_elements, dtype=bool)
        mask[np.fromiter(removed, dtype=np.int64)] = True
        fractions = {}
        for key, roots in self._roots.items():
            lost = int(mask[roots].sum())
            if lost:
                fractions[key] = (len(roots) - lost) / len(roots)
        return fractions

    def evaluate(self, removed: Collection[int]) -> tuple[int, int]:
        """(MACs, parameters) after removing the units with roots ``removed``."""
        frac = self._fractions(removed)
        macs = sum(m * math.prod(frac.get(k, 1.0) for k in keys) for m, keys in self._node_terms)
        params = 0
        for name, shape in self._init_terms:
            params += round(math.prod(d * frac.get((name, a), 1.0) for a, d in enumerate(shape)))
        return round(macs), params
