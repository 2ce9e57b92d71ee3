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

``obs`` (:func:`obs_removal_order`) ranks for the refit that follows instead: after removing
``R`` the consumer is refit by least squares on the kept inputs, so what is lost is only the
part of ``X_R W_R`` the kept channels cannot predict. With the (centered, since the bias
absorbs means) Gram ``G`` of the consumer's input channels and ``H = (G + d I)^-1``
(damping ``d`` = 1% of the mean diagonal), the least-squares loss of removing one more set
``S`` from the current, already refit weights ``W`` is Optimal Brain Surgeon's

    L_S = tr(W_S^T (H_SS)^-1 W_S),     W <- W - H[:, S] (H_SS)^-1 W[S, :],
                                       H <- H - H[:, S] (H_SS)^-1 H[S, :]

(the updates are the refit and the inverse Gram of the remaining channels). The greedy
removes the unit with the least ``sum_consumers L / tr(W0^T G W0)`` one at a time, updating
``W`` and ``H`` after each: the structured OBS of Frantar & Alistarh's Optimal Brain
Compression, applied to whole input channels. For a ``k x k`` Conv the channel-level Gram
is the same approximation as above.
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

__all__ = [
    "Consumer",
    "damped",
    "greedy_removal_order",
    "group_consumers",
    "obs_removal_order",
    "reconstruction_scores",
]


@dataclasses.dataclass(frozen=True)
class Consumer:
    """A layer reading the group's channels: its input channel space and weight columns."""

    node: str
    input: SpaceKey
    #: indices into the input channel axis owned by each unit of the group
    channels: tuple[tuple[int, ...], ...]
    #: the weight as ``[input channels, everything else]`` (alpha folded in for Gemm)
    weight: np.ndarray
    #: the layer itself, in the model the consumer was found in
    layer: ir.Node | None = dataclasses.field(default=None, compare=False, repr=False)


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
            Consumer(
                node.name or name_of(node.outputs[0]), key, channels, _weight_columns(node), node
            )
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


#: OBS damping: this fraction of the Gram's mean diagonal is added before inverting.
OBS_DAMPING = 0.01


@dataclasses.dataclass
class _ObsState:
    """One consumer's refit weights ``w`` and inverse Gram ``h`` of the kept channels."""

    w: np.ndarray
    h: np.ndarray
    energy: float
    channels: tuple[tuple[int, ...], ...]

    def loss(self, unit: int) -> float:
        s = list(self.channels[unit])
        if not s:
            return 0.0
        ws = self.w[s]
        return float(np.trace(ws.T @ np.linalg.solve(self.h[np.ix_(s, s)], ws)))

    def losses(self) -> np.ndarray:
        """``loss(u)`` of every unit (vectorized where units own one channel each)."""
        if all(len(c) == 1 for c in self.channels):
            per_channel = (self.w**2).sum(1) / np.maximum(np.diag(self.h), 1e-300)
            return per_channel[[c[0] for c in self.channels]]
        return np.array([self.loss(u) for u in range(len(self.channels))])

    def remove(self, unit: int) -> None:
        s = list(self.channels[unit])
        if not s:
            return
        column = self.h[:, s] @ np.linalg.inv(self.h[np.ix_(s, s)])
        self.w -= column @ self.w[s]
        self.h -= column @ self.h[s]
        self.w[s] = 0.0
        self.h[s] = 0.0
        self.h[:, s] = 0.0
        self.h[s, s] = 1.0  # keeps later divisions finite; removed units are never chosen


def damped(gram: np.ndarray) -> np.ndarray:
    """``gram + d I`` with ``d`` = :data:`OBS_DAMPING` of its mean diagonal."""
    damping = OBS_DAMPING * max(float(np.mean(np.diag(gram))), 1e-12)
    return gram + damping * np.eye(len(gram))


def _obs_state(consumer: Consumer, gram: np.ndarray) -> _ObsState | None:
    w = consumer.weight.astype(np.float64)
    if gram.shape != (len(w), len(w)):
        return None
    energy = float(np.sum(w * (gram @ w)))
    if energy <= 0:
        return None
    h = np.linalg.inv(damped(gram))
    return _ObsState(w.copy(), h, energy, consumer.channels)


def obs_removal_order(states: list[_ObsState], units: int) -> list[int]:
    """Units in greedy OBS removal order (least refit loss first; see the module docstring).

    Ties remove the higher index first, as :func:`greedy_removal_order` does.
    """
    removed = np.zeros(units, dtype=bool)
    order = []
    for _ in range(units):
        cost = np.zeros(units)
        for state in states:
            cost += state.losses() / state.energy
        candidates = np.where(removed, np.inf, cost)
        best = float(candidates.min())
        u = int(np.flatnonzero(candidates <= best)[-1])
        order.append(u)
        removed[u] = True
        for state in states:
            state.remove(u)
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
    obs: bool = False,
) -> np.ndarray | None:
    """Scores (greedy removal rank + 1) of ``group``'s units; None without a measured consumer.

    ``grams`` maps a consumer input space ``(value, channel axis)`` to its mean ``X^T X``
    (see :func:`onnxprune.prune.activations.reconstruction_stats`). Without ``greedy`` the
    score is ``M[u, u]``, each unit's output change removed alone: ``||x_u||^2 ||w_u||^2``,
    the square of the structured Wanda score with the Gram (``|W| * ||x||``), FLAP's
    fluctuation metric with the covariance. With ``obs`` the order is
    :func:`obs_removal_order` (``grams`` should then be centered).
    """
    if obs:
        states = [
            state
            for consumer in group_consumers(model, analysis, group)
            if (gram := grams.get(consumer.input)) is not None
            and (state := _obs_state(consumer, gram)) is not None
        ]
        if not states:
            return None
        scores = np.empty(group.size)
        scores[obs_removal_order(states, group.size)] = np.arange(1, group.size + 1.0)
        return scores
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
