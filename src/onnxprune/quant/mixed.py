"""Mixed precision: keep the most harmful layers in float until a budget is met.

Harm of a quantized Conv/Gemm/MatMul node is the relative noise power its own quantization
adds: ``harm = 10 log10(10^(-SQNR_out/10) - 10^(-SQNR_in/10))`` dB, with both SQNRs measured
against the float model on the same feeds, so noise arriving from upstream is not blamed on
the node (a harm of -30 dB: the node adds noise at 1/1000 of the signal power). Nodes are
kept in float in decreasing order of harm; the count grows 1, 2, 4, ... until the budget
holds and is then narrowed by bisection. A budget that only holds with every layer in float
is impossible.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.errors import BudgetError
from onnxprune.quant.analysis import layer_sqnr
from onnxprune.tolerance import Tolerance

__all__ = ["BudgetSearch", "rank_harm", "search_budget"]

logger = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float | None]]
#: Builds a quantized model keeping the given nodes float; returns it and its output metrics.
BuildFn = Callable[[Sequence[str]], tuple[ir.Model, dict, Metrics]]


@dataclasses.dataclass
class BudgetSearch:
    """Result of :func:`search_budget`."""

    model: ir.Model
    summary: dict
    metrics: Metrics
    kept_float: list[str]
    trials: list[dict[str, object]]


def rank_harm(
    reference: ir.Model,
    quantized: ir.Model,
    nodes: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
) -> list[tuple[str, float]]:
    """``[(node, harm dB)]`` for the quantized primary ``nodes``, most harmful first."""
    by_name = {n.name: n for n in reference.graph}
    pairs = []
    for name in nodes:
        node = by_name[name]
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        source = node.inputs[0]
        pairs.append((name, source.name if source is not None else None, node.outputs[0].name))
    inputs = {p[1] for p in pairs if p[1]} - {v.name for v in reference.graph.inputs}
    names = sorted(inputs | {p[2] for p in pairs if p[2]})
    sqnr = layer_sqnr(reference, quantized, names, feeds)
    harm = []
    for name, source_name, output in pairs:
        added = _noise(sqnr[output or ""]) - _noise(sqnr.get(source_name or "", math.inf))
        harm.append((name, 10 * math.log10(max(added, 1e-30))))
    return sorted(harm, key=lambda kv: -kv[1])


def _noise(sqnr_db: float) -> float:
    """Relative noise power ``10^(-SQNR/10)`` (0 for an exact tensor)."""
    return 0.0 if sqnr_db == math.inf else 10 ** (-sqnr_db / 10)


def search_budget(
    build: BuildFn,
    ranking: Sequence[str],
    tolerance: Tolerance,
) -> BudgetSearch:
    """Smallest prefix of ``ranking`` kept in float that meets ``tolerance``.

    Raises:
        BudgetError: not met even with all but one of the ranked layers kept in float.
    """
    trials: list[dict[str, object]] = []
    cache: dict[int, tuple[ir.Model, dict, Metrics]] = {}

    def meets(k: int) -> bool:
        if k not in cache:
            cache[k] = build(ranking[:k])
        ok = not tolerance.violations(cache[k][2])
        trials.append({"kept_float": k, "meets_budget": ok})
        logger.info("budget: %d layer(s) in float -> %s", k, "ok" if ok else "violated")
        return ok

    k, previous = 1, 0
    while k < len(ranking) and not meets(k):
        previous, k = k, min(2 * k, len(ranking))
    if k >= len(ranking) and not meets(len(ranking) - 1 if len(ranking) > 1 else 0):
        raise BudgetError(
            f"budget {tolerance} cannot be met: it still fails with {max(len(ranking) - 1, 0)} "
            f"of {len(ranking)} quantized layers kept in float; nothing written"
        )
    lo, hi = previous, k if k < len(ranking) else len(ranking) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    model, summary, metrics = cache[hi]
    return BudgetSearch(model, summary, metrics, list(ranking[:hi]), trials)
