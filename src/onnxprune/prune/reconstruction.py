"""Reconstruction importance (ThiNet-style): remove the units the next layers miss least.

A *consumer* reads the group's channels as its input channels: a Conv with group 1, a Gemm
(no ``transA``) or a MatMul with a constant 2-D weight. With ``X`` its input rows (sampled
positions or tokens, one column ``x_c`` per input channel) and ``w_c`` the weight column
that channel ``c`` multiplies, removing a set ``R`` of channels changes the output by

    || sum_{c in R} x_c w_c^T ||_F^2 = 1_R^T M 1_R,    M[c, d] = (X^T X)[c, d] * (w_c . w_d)

the Hadamard product of the input-channel Gram and the weight-column Gram (both positive
semidefinite, so ``M`` is too). For a ``k x k`` Conv, ``X^T X`` is the per-channel Gram over
input positions and ``w_c . w_d`` is summed over output channels and kernel taps: this
ignores the spatial cross-correlation between neighbouring taps, so for a Conv ``M`` is an
approximation (exact for 1x1 kernels).

Each consumer's ``M`` is divided by ``1^T M 1`` (the bias-free output energy), so it
measures the *relative* output change and consumers of different scale are comparable. A
unit may own several input channels of a consumer (a Flatten block, depthwise multipliers)
and a group may have several consumers: the unit matrix sums ``M`` over the unit's channels
and over consumers.

Selection is ThiNet's greedy: starting from ``R = {}``, repeatedly remove the unit ``u``
minimizing ``M[u, u] + 2 sum_{v in R} M[u, v]`` (the increase of ``1_R^T M 1_R``). The
removal order is the score (the unit removed first scores lowest), so keeping the
highest-scoring units keeps the greedy solution at every pruning amount.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import const_numpy, name_of
from onnxprune.prune.analysis import Analysis, Group
from onnxprune.prune.channels import SpaceKey
from onnxprune.prune.recover import refittable, weight_input_axis

__all__ = ["Consumer", "greedy_removal_order", "group_consumers", "reconstruction_scores"]


@dataclasses.dataclass(frozen=True)
class Consumer:
    """A layer reading the group's channels: its input channel space and weight columns."""

    node: str
    input: SpaceKey
    #: indices into the input channel axis owned by each unit of the group
    channels: tuple[tuple[int, ...], ...]
    #: the weight as ``[input channels, everything else]`` (alpha folded in for Gemm)
    weight: np.ndarray


def _weight_columns(node: ir.Node) -> np.ndarray:
    w = const_numpy(node.inputs[1]).astype(np.float64)
    if node.op_type == "Conv":
        return np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
    if node.op_type == "Gemm":
        alpha = node.attributes.get("alpha")
        w = w.T if (a := node.attributes.get("transB")) is not None and a.value else w
        return w * (1.0 if alpha is None else float(alpha.value))
    return w


def _channel_axis(node: ir.Node, analysis: Analysis) -> int | None:
    if node.op_type == "MatMul":
        rank = analysis.graph.rank(name_of(node.inputs[0]))
        return None if rank is None else rank - 1
    return 1


def group_consumers(model: ir.Model, analysis: Analysis, group: Group) -> list[Consumer]:
    """Consumers whose input channels and weight input axis both belong to ``group``."""
    found = []
    first = {s.key for s, _ in group.units[0].members}
    weights = set(group.initializers)
    for node in model.graph:
        axis = weight_input_axis(node)
        if axis is None or node.inputs[0] is None or not refittable(node):
            continue
        channel_axis = _channel_axis(node, analysis)
        key = (name_of(node.inputs[0]), channel_axis)
        if key not in first or (name_of(node.inputs[1]), axis) not in weights:
            continue
        channels = tuple(tuple(i for s, i in unit.members if s.key == key) for unit in group.units)
        found.append(
            Consumer(node.name or name_of(node.outputs[0]), key, channels, _weight_columns(node))
        )
    return found


def greedy_removal_order(m: np.ndarray) -> list[int]:
    """Units in ThiNet greedy removal order for the PSD cost ``1_R^T M 1_R``.

    Ties remove the higher index first, so (with scores = order) ties keep lower positions.
    """
    n = len(m)
    cost = np.diag(m).astype(np.float64).copy()
    removed = np.zeros(n, dtype=bool)
    order = []
    for _ in range(n):
        candidates = np.where(removed, np.inf, cost)
        best = float(candidates.min())
        u = int(np.flatnonzero(candidates <= best)[-1])
        order.append(u)
        removed[u] = True
        cost += 2.0 * m[u]
    return order


def _unit_matrix(consumer: Consumer, gram: np.ndarray) -> np.ndarray | None:
    w = consumer.weight
    if gram.shape != (len(w), len(w)):
        return None
    m = gram * (w @ w.T)
    total = float(m.sum())
    if total <= 0:
        return None
    indicator = np.zeros((len(consumer.channels), len(w)))
    for u, channels in enumerate(consumer.channels):
        indicator[u, list(channels)] = 1.0
    return indicator @ m @ indicator.T / total


def reconstruction_scores(
    model: ir.Model,
    analysis: Analysis,
    group: Group,
    grams: Mapping[SpaceKey, np.ndarray],
    *,
    greedy: bool = True,
) -> np.ndarray | None:
    """Scores (greedy removal rank + 1) of ``group``'s units; None without a measured consumer.

    ``grams`` maps a consumer input space ``(value, channel axis)`` to its mean ``X^T X``
    (see :func:`onnxprune.prune.activations.reconstruction_stats`). Without ``greedy`` the
    score is ``M[u, u]``, each unit's output change removed alone: ``||x_u||^2 ||w_u||^2``,
    the square of the structured Wanda score with the Gram (``|W| * ||x||``), FLAP's
    fluctuation metric with the covariance.
    """
    total = np.zeros((group.size, group.size))
    found = False
    for consumer in group_consumers(model, analysis, group):
        gram = grams.get(consumer.input)
        m = None if gram is None else _unit_matrix(consumer, gram)
        if m is not None:
            total += m
            found = True
    if not found:
        return None
    if not greedy:
        return np.diag(total).copy()
    scores = np.empty(group.size)
    scores[greedy_removal_order(total)] = np.arange(1, group.size + 1, dtype=np.float64)
    return scores
