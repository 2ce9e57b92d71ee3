"""Rank selection: from a rank rule to per-layer ranks, or a recorded skip.

Rules (see :class:`~onnxprune.lowrank.config.LowRankConfig`):

* ``rank``: the same rank for every layer (capped at full rank); ``layer_ranks``: given
  ranks per node (layers not listed are skipped).
* ``energy``: per layer, the smallest rank keeping that share of ``sum s^2``.
* ``max_layer_error``: per layer, the smallest rank within the relative error budget.
* ``target_params`` / ``target_macs``: one energy level ``E`` shared by all layers, the largest
  with ``sum_l cost_l(E) <= F * sum_l dense_l`` (bisection; cost is non-decreasing in
  ``E``). A layer whose ranks save no work counts at its dense cost. MACs are
  ``params * positions`` (rows of a MatMul, output positions of a Conv).

Derived ranks (not an explicit one) are then rounded up to ``round_to``; a layer is skipped
when the factored form costs more than ``margin`` times the dense weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from onnxprune.lowrank._candidate import Candidate, Ranks
from onnxprune.lowrank.config import LowRankConfig

__all__ = ["Planned", "plan_ranks", "saves_no_work"]

_BISECT_STEPS = 40


@dataclasses.dataclass
class Planned:
    """The decision for one candidate: ranks to apply, or the reason it stays dense."""

    candidate: Candidate
    ranks: Ranks
    skip: str | None = None


def saves_no_work(cand: Candidate, ranks: Ranks, margin: float) -> str | None:
    """The skip reason when ``ranks`` save less than ``1 - margin`` of the parameters."""
    factored = cand.params(ranks)
    if factored <= margin * cand.dense_params:
        return None
    return (
        f"rank {list(ranks)} saves no work: factored {factored} params > {margin:g} x dense "
        f"{cand.dense_params}{cand.breakeven_text(ranks)}"
    )


def _effective_cost(cand: Candidate, ranks: Ranks, config: LowRankConfig, macs: bool) -> int:
    weight = cand.positions if macs else 1
    if saves_no_work(cand, ranks, config.margin) is not None:
        return cand.dense_params * weight
    return cand.params(ranks) * weight


def _energy_for_target(cands: Sequence[Candidate], config: LowRankConfig) -> float:
    """The largest shared energy level whose total cost meets the target fraction."""
    macs = config.target_macs is not None
    fraction = config.target_macs if macs else config.target_params
    assert fraction is not None
    dense = sum(c.dense_params * (c.positions if macs else 1) for c in cands)

    def cost(energy: float) -> int:
        return sum(
            _effective_cost(c, c.rounded(c.ranks_for_energy(energy), config.round_to), config, macs)
            for c in cands
        )

    low, high = 0.0, 1.0
    if cost(high) <= fraction * dense:
        return high
    for _ in range(_BISECT_STEPS):
        mid = (low + high) / 2
        if cost(mid) <= fraction * dense:
            low = mid
        else:
            high = mid
    return low


def plan_ranks(cands: Sequence[Candidate], config: LowRankConfig) -> tuple[list[Planned], float]:
    """Ranks for every candidate; also returns the shared energy level (targets), else nan."""
    shared = float("nan")
    if config.target_params is not None or config.target_macs is not None:
        shared = _energy_for_target(cands, config)
    plans = []
    for cand in cands:
        if config.layer_ranks is not None:
            if cand.label not in config.layer_ranks:
                plans.append(Planned(cand, (), "no rank given for this layer in layer_ranks"))
                continue
            ranks = tuple(
                min(r, f) for r, f in zip(config.layer_ranks[cand.label], cand.full, strict=True)
            )
        elif config.rank is not None:
            ranks = cand.ranks_for_rank(config.rank)
        elif config.energy is not None:
            ranks = cand.ranks_for_energy(config.energy)
        elif config.max_layer_error is not None:
            ranks = cand.ranks_for_error(config.max_layer_error)
        else:
            ranks = cand.ranks_for_energy(shared)
        if config.rank is None and config.layer_ranks is None:  # explicit ranks are kept
            ranks = cand.rounded(ranks, config.round_to)
        plans.append(Planned(cand, ranks, saves_no_work(cand, ranks, config.margin)))
    return plans, shared
