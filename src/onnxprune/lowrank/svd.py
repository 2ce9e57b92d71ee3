"""Truncated-SVD factorization of linear layers with a constant 2-D weight.

Rewrites, for a weight ``W`` (``[m, n]`` as applied, ``y = x W``) and rank ``r``:

1. ``MatMul(x, W)``  ->  ``MatMul(MatMul(x, A), B)``
2. ``Gemm(x, B0, C, alpha, beta, transB)``  ->  ``Gemm(Gemm(x, A), B, C, beta)`` with
   ``W = alpha * (B0^T if transB else B0)``; the bias ``C`` and ``beta`` are kept.

with ``A = (P U)_r S_r`` (``[m, r]``) and ``B = V_r^T`` (``[r, n]``) from
:func:`onnxprune.lowrank.whiten.decompose` (plain SVD: ``P = I``, so ``A B = W_r``, the best
rank-``r`` approximation, ``||W - W_r||_F = sqrt(sum_{i>r} s_i^2)``). The pair costs
``r (m + n)`` MACs per row instead of ``m n``; it is skipped, with the reason, when that does
not save at least the configured margin (``r > margin * m n / (m + n)``).

Skipped with a reason: a constant left operand, a weight that is not a constant 2-D float
initializer or is shared with another node, ``Gemm`` with ``transA=1``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxprune.lowrank._candidate import Candidate, Ranks
from onnxprune.lowrank._emit import Step, replace_with_chain
from onnxprune.lowrank._linalg import breakeven_rank
from onnxprune.lowrank.whiten import Decomposition, InputStats, decompose
from onnxprune.passes._match import (
    attr,
    const_array,
    const_numpy,
    drop_if_unused,
    exclusive_const_reason,
    required,
)

__all__ = ["LinearCandidate", "linear_candidate", "linear_weight"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LinearCandidate(Candidate):
    """A MatMul/Gemm whose weight is decomposed as ``W ~= A B``."""

    x: ir.Value | None = None
    weight: ir.Value | None = None
    decomposition: Decomposition | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the applied weight."""
        assert self.decomposition is not None
        return self.decomposition.q.shape[0], self.decomposition.vt.shape[1]

    def ranks_for_error(self, budget: float) -> Ranks:
        """Smallest rank whose relative *output* error on calibration data is within budget."""
        assert self.decomposition is not None
        if self.decomposition.errors is None:
            return super().ranks_for_error(budget)
        for rank in range(1, self.full[0] + 1):
            err = self.decomposition.output_error(rank)
            if err is not None and err <= budget:
                return (rank,)
        return self.full

    def params(self, ranks: Ranks) -> int:
        m, n = self.shape
        return ranks[0] * (m + n)

    def breakeven_text(self, ranks: Ranks) -> str:
        m, n = self.shape
        return f"; break-even rank m*n/(m+n) = {m}*{n}/{m + n} = {breakeven_rank(m, n):.1f}"

    def apply(self, graph: ir.Graph, ranks: Ranks) -> str:
        assert self.decomposition is not None and self.weight is not None and self.x is not None
        a, b = self.decomposition.factors(ranks[0])
        dtype = const_numpy(self.weight).dtype
        op = self.node.op_type
        tail = Step(op, b.astype(dtype))
        if op == "Gemm":  # the bias and beta stay on the second Gemm; alpha is in A
            tail.extra = list(self.node.inputs[2:3])
            tail.attributes = {"beta": float(attr(self.node, "beta", 1.0))}
        steps = [Step(op, a.astype(dtype)), tail]
        replace_with_chain(graph, self.node, self.x, steps, kind=self.kind)
        drop_if_unused(graph, self.weight)
        m, n = self.shape
        return f"{self.kind} rank {ranks[0]}: [{m},{n}] -> [{m},{ranks[0]}] x [{ranks[0]},{n}]"


def linear_weight(node: ir.Node) -> tuple[np.ndarray, ir.Value] | str:
    """The applied weight ``W`` (``x @ W``) of a MatMul/Gemm and its value, or why not."""
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return "missing inputs"
    if const_array(node.inputs[0]) is not None:
        return "the constant is the left operand (W @ x); only x @ W is factorized"
    value = node.inputs[1]
    array = const_array(value)
    if array is None:
        return f"weight {value.name!r} is not a constant"
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        return f"weight {value.name!r} is not a 2-D float matrix (shape {list(array.shape)})"
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return "Gemm with transA=1"
        alpha = float(attr(node, "alpha", 1.0))
        array = alpha * (array.T if attr(node, "transB", 0) else array)
    return np.asarray(array, dtype=np.float64), value


def linear_candidate(node: ir.Node, method: str, stats: InputStats | None) -> LinearCandidate | str:
    """A :class:`LinearCandidate` for ``node``, or the reason it cannot be factorized."""
    found = linear_weight(node)
    if isinstance(found, str):
        return found
    w, value = found
    reason = exclusive_const_reason(value, node, "weight")
    if reason:
        return reason
    if method != "svd" and stats is None:
        return f"no input statistics for {method} (input {required(node.inputs[0]).name!r})"
    if w.size == 0:
        return f"weight {value.name!r} has no elements"
    try:
        dec = decompose(w, method, stats)
    except np.linalg.LinAlgError as exc:
        return f"the {method} decomposition of weight {value.name!r} failed ({exc})"
    m, n = w.shape
    return LinearCandidate(
        node=node,
        kind=method,
        spectra=(dec.s,),
        full=(min(m, n),),
        dense_params=m * n,
        x=node.inputs[0],
        weight=value,
        decomposition=dec,
    )
