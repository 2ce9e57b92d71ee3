"""Importance of pruning units: which channels of a group matter least.

Scores are per unit (a set of coupled channels) and comparable within a group:

* ``l1`` / ``l2``: for every weight (an initializer of rank >= 2) the unit touches, the norm
  of its slice (all other axes) divided by that weight's mean slice norm; summed over the
  weights. Normalizing per weight keeps one large tensor from dominating the group sum.
* ``bn``: ``|gamma|`` of the BatchNormalization scales in the unit (network slimming);
  groups without a BatchNorm fall back to ``l2`` (recorded in the report).
* ``activation``: mean ``|a|`` of the unit's channels in the outputs of the group's
  Conv/Gemm/MatMul producers on calibration data, normalized per tensor; ``apoz`` is the
  share of non-zero activations (1 - average percentage of zeros).
* ``reconstruction``: ThiNet-style greedy removal order by the change of the next layers'
  outputs on calibration data (see :mod:`onnxprune.prune.reconstruction`); groups without a
  measured Conv/Gemm/MatMul consumer fall back to ``l2``.
* ``wanda``: each unit's own output change ``||x_u||^2 ||w_u||^2`` (structured Wanda,
  ``|W| * ||x||`` squared, no interaction between units); ``flap``: the same with the
  centered input (``Var(x_u) ||w_u||^2``, FLAP's fluctuation metric, whose mean the bias
  compensation restores). Same statistics and fallback as ``reconstruction``.
* ``obs``: greedy removal order by what the least-squares refit of the next layers cannot
  recover (structured Optimal Brain Surgeon on the centered input Gram; see
  :mod:`onnxprune.prune.reconstruction`). Same fallback.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import const_numpy, name_of
from onnxprune.prune.analysis import Analysis, Group
from onnxprune.prune.channels import SpaceKey
from onnxprune.prune.reconstruction import reconstruction_scores

__all__ = ["CENTERED_CRITERIA", "CRITERIA", "GRAM_CRITERIA", "group_scores", "slice_norms"]

CRITERIA = ("l1", "l2", "bn", "activation", "apoz", "reconstruction", "wanda", "flap", "obs")

#: Criteria scored from consumer input Grams (:func:`reconstruction_stats`).
GRAM_CRITERIA = ("reconstruction", "wanda", "flap", "obs")
#: ... of which these use the centered Gram (the covariance).
CENTERED_CRITERIA = ("flap", "obs")


def slice_norms(array: np.ndarray, axis: int, order: int) -> np.ndarray:
    """Norm of each slice of ``array`` along ``axis`` (over all other axes)."""
    moved = np.moveaxis(array.astype(np.float64), axis, 0).reshape(array.shape[axis], -1)
    return np.abs(moved).sum(1) if order == 1 else np.sqrt((moved**2).sum(1))


def _bn_scales(model: ir.Model) -> set[str]:
    return {
        name_of(n.inputs[1])
        for n in model.graph
        if n.op_type == "BatchNormalization" and n.inputs[1] is not None
    }


def _normalized(values: np.ndarray) -> np.ndarray:
    mean = float(values.mean()) if values.size else 0.0
    return values / mean if mean > 0 else values


def _weight_scores(
    model: ir.Model, group: Group, order: int, cache: dict[tuple[SpaceKey, int], np.ndarray]
) -> np.ndarray:
    scores = np.zeros(group.size)
    inits = model.graph.initializers
    for key in group.initializers:
        array = const_numpy(inits[key[0]])
        if array.ndim < 2:
            continue
        cache_key = (key, order)
        if cache_key not in cache:
            cache[cache_key] = _normalized(slice_norms(array, key[1], order))
        norms = cache[cache_key]
        for u, unit in enumerate(group.units):
            scores[u] += sum(norms[i] for s, i in unit.members if s.key == key)
    return scores


def _bn_group_scores(model: ir.Model, group: Group, scales: set[str]) -> np.ndarray | None:
    keys = [k for k in group.initializers if k[0] in scales]
    if not keys:
        return None
    scores = np.zeros(group.size)
    for key in keys:
        gamma = np.abs(const_numpy(model.graph.initializers[key[0]]).astype(np.float64))
        for u, unit in enumerate(group.units):
            scores[u] += sum(gamma[i] for s, i in unit.members if s.key == key)
    return scores


def _activation_group_scores(
    group: Group, stats: Mapping[SpaceKey, np.ndarray]
) -> np.ndarray | None:
    scores = np.zeros(group.size)
    found = False
    normalized = {k: _normalized(v) for k, v in stats.items()}
    for u, unit in enumerate(group.units):
        for space, i in unit.members:
            values = normalized.get(space.key)
            if values is not None:
                scores[u] += values[i]
                found = True
    return scores if found else None


def group_scores(
    model: ir.Model,
    analysis: Analysis,
    criterion: str,
    activation_stats: Mapping[SpaceKey, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Scores per prunable group (higher = more important) and notes on fallbacks.

    ``activation_stats`` holds the criterion's calibration statistics: per-channel values
    for ``activation`` / ``apoz``, consumer input Grams for ``reconstruction``.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    cache: dict[tuple[SpaceKey, int], np.ndarray] = {}
    scales = _bn_scales(model) if criterion == "bn" else set()
    notes = []
    result = {}
    for group in analysis.prunable:
        scores = None
        if criterion == "bn":
            scores = _bn_group_scores(model, group, scales)
        elif criterion in ("activation", "apoz"):
            scores = _activation_group_scores(group, activation_stats or {})
        elif criterion in GRAM_CRITERIA:
            greedy = criterion == "reconstruction"
            stats = activation_stats or {}
            scores = reconstruction_scores(
                model, analysis, group, stats, greedy=greedy, obs=criterion == "obs"
            )
        if scores is None and criterion not in ("l1", "l2"):
            notes.append(f"group {group.id}: no {criterion} statistics, scored by l2")
        if scores is None:
            scores = _weight_scores(model, group, 1 if criterion == "l1" else 2, cache)
        result[group.id] = scores
    return result, notes
