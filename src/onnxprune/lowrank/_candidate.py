"""A layer that can be factorized: its spectra, its cost at given ranks, and its rewrite.

Rank selection (:mod:`onnxprune.lowrank.plan`) only sees this interface, so the same rules
(explicit rank, energy, global parameter / MAC target, error budget) apply to linear layers
and to every convolution scheme.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np
import onnx_ir as ir

from onnxprune.lowrank._linalg import energy_rank, round_rank
from onnxprune.passes._match import label

__all__ = ["FACTOR_KEY", "Candidate", "Ranks", "mark_factor"]

#: Ranks of one factorization (one entry per factored mode).
Ranks = tuple[int, ...]

#: Node metadata key on the nodes a factorization wrote; such nodes are not factorized
#: again (energy rules would otherwise keep shrinking them on every run).
FACTOR_KEY = "onnxprune.lowrank"


def mark_factor(nodes: list[ir.Node], kind: str) -> None:
    """Record on ``nodes`` that they are the factors of a ``kind`` factorization."""
    for node in nodes:
        node.metadata_props[FACTOR_KEY] = kind


@dataclasses.dataclass
class Candidate(abc.ABC):
    """One layer the low-rank pass may rewrite.

    Attributes:
        node: The layer (MatMul, Gemm or Conv).
        kind: Scheme name for reports (``svd``, ``svd-llm``, ``spatial``, ...).
        spectra: Singular values per factored mode, descending.
        full: The largest meaningful rank per mode (exact reconstruction there).
        dense_params: Parameters of the dense weight.
        positions: Rows (linear) or output positions (conv) the weight is applied at, so
            ``MACs = params * positions``; 1 when shapes are unknown.
    """

    node: ir.Node
    kind: str
    spectra: tuple[np.ndarray, ...]
    full: Ranks
    dense_params: int
    positions: int = 1

    @property
    def label(self) -> str:
        """The node name used in reports."""
        return label(self.node)

    def ranks_for_rank(self, rank: int) -> Ranks:
        """The explicit rank, capped at the full rank of each mode."""
        return tuple(min(rank, f) for f in self.full)

    def ranks_for_energy(self, energy: float) -> Ranks:
        """Per mode, the smallest rank keeping ``energy`` of ``sum s^2``."""
        return tuple(energy_rank(s, energy) for s in self.spectra)

    def ranks_for_error(self, budget: float) -> Ranks:
        """Smallest ranks whose relative weight error is within ``budget``.

        ``||W - W_r||_F / ||W||_F = sqrt(1 - kept energy)``, so this is the energy rule at
        ``1 - budget^2``. Linear layers with activation statistics override it with the
        output error.
        """
        return self.ranks_for_energy(1.0 - budget * budget)

    def rounded(self, ranks: Ranks, multiple: int) -> Ranks:
        """``ranks`` rounded up to ``multiple`` (capped at full rank)."""
        return tuple(round_rank(r, multiple, f) for r, f in zip(ranks, self.full, strict=True))

    @abc.abstractmethod
    def params(self, ranks: Ranks) -> int:
        """Parameters of the factored form at ``ranks``."""

    def breakeven_text(self, ranks: Ranks) -> str:
        """Extra detail for the 'saves no work' reason (the break-even rank, if simple)."""
        del ranks
        return ""

    @abc.abstractmethod
    def apply(self, graph: ir.Graph, ranks: Ranks) -> str:
        """Rewrite the layer at ``ranks``; return a short description of the new nodes."""
