"""Structured pruning: dependency analysis, importance, plans, physical channel removal."""

from onnxprune.prune.analysis import Analysis, Group, analyze
from onnxprune.prune.apply import apply_removal, zero_units
from onnxprune.prune.core import PruneOptions, PruneReport, decide_plan, prune_model
from onnxprune.prune.plan import PruningPlan

__all__ = [
    "Analysis",
    "Group",
    "PruneOptions",
    "PruneReport",
    "PruningPlan",
    "analyze",
    "apply_removal",
    "decide_plan",
    "prune_model",
    "zero_units",
]
