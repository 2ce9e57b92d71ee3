"""Fold chains of linear ops with no nonlinearity between them into one op.

Rewrites (every intermediate value must have exactly one consumer and every weight must be
private to the chain; MACs are compared per row / output position):

1. ``MatMul(MatMul(x, W1), W2)`` -> ``MatMul(x, W1 W2)`` when ``K N <= K r + r N``.
2. ``MatMul(MatMul(x, W1) + b1, W2)`` -> ``MatMul(x, W1 W2) + b1 W2`` (``b1`` varies along
   the last axis only), same cost rule.
3. ``Gemm(Gemm(x, B1, C1), B2, C2)`` (second ``transA=0``) -> ``Gemm(x, B, C)`` with
   ``B = a1 a2 B1' B2'``, ``C = a2 b1 (C1 B2') + b2 C2`` (``B'`` = ``B`` transposed per
   ``transB``; ``a``/``b`` = alpha/beta), same cost rule.
4. ``Conv1x1(Conv1x1(x, W1, c1), W2, c2)`` (group 1, second conv unpadded) ->
   ``Conv1x1(x, W2 W1, W2 c1 + c2)`` with strides ``s1 s2`` and the first conv's pads (a
   padded position yields ``W2 c1 + c2`` either way), when
   ``O2 C <= O1 C prod(s2) + O2 O1``.
5. LoRA: ``x W (+ b) + s ((x A) B)`` (scalar ``s`` via ``Mul``, before or after ``B``, or
   none) -> ``x (W + s A B) (+ b)``: always cheaper.

Rules 1 and 3 also merge a factorized pair back when its rank no longer saves work.
A chain where the merged form costs more is skipped with the MAC comparison as reason.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnxprune.lowrank.fold_rules import FOLD_RULES
from onnxprune.passes.base import Pass, PassReport
from onnxprune.reports import Change, Skip

__all__ = ["FoldLinearPass"]

logger = logging.getLogger(__name__)

_MAX_ROUNDS = 1000


class FoldLinearPass(Pass):
    """Merge linear chains (see the module docstring for the rules and the math)."""

    name = "lowrank-fold"

    def run(self, model: ir.Model, report: PassReport) -> None:
        seen_skips: set[Skip] = set()
        for _ in range(_MAX_ROUNDS):
            if not self._one_round(model, report, seen_skips):
                return
        logger.warning("fold stopped after %d rounds", _MAX_ROUNDS)

    def _one_round(self, model: ir.Model, report: PassReport, seen_skips: set[Skip]) -> bool:
        """Apply the first rule that matches anywhere; True if the graph changed."""
        for node in list(model.graph):
            for rule in FOLD_RULES:
                result = rule(model.graph, node)
                if isinstance(result, Change):
                    report.changes.append(result)
                    return True
                if result is not None and result not in seen_skips:
                    seen_skips.add(result)
                    report.skips.append(result)
        return False
