"""Low-rank factorization and folding of linear layers and convolutions.

Public API: :func:`lowrank_file` (``onnxprune lowrank`` through the file driver),
:func:`lowrank_model` (in memory), :class:`LowRankConfig`, the passes :class:`FactorizePass` and
:class:`FoldLinearPass`, and :func:`collect_input_stats` / :func:`decompose` for
activation-aware decompositions. The math of each rewrite is in its module docstring
(``svd``, ``whiten``, ``conv``, ``fold``).
"""

from onnxprune.lowrank.api import LowRankOutcome, lowrank_file, lowrank_model
from onnxprune.lowrank.config import CONV_MODES, METHODS, LowRankConfig
from onnxprune.lowrank.factorize import FactorizePass, LayerRecord
from onnxprune.lowrank.fold import FoldLinearPass
from onnxprune.lowrank.whiten import Decomposition, InputStats, collect_input_stats, decompose

__all__ = [
    "CONV_MODES",
    "METHODS",
    "Decomposition",
    "FactorizePass",
    "FoldLinearPass",
    "InputStats",
    "LayerRecord",
    "LowRankConfig",
    "LowRankOutcome",
    "collect_input_stats",
    "decompose",
    "lowrank_file",
    "lowrank_model",
]
