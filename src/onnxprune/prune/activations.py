"""Per-channel activation statistics on calibration data, for data-driven importance.

For each chosen channel space ``(value, axis)``: ``activation`` accumulates
``mean |a|`` over every other axis and every sample; ``apoz`` accumulates the share of
positive entries (1 - the average percentage of zeros after a ReLU). For ``reconstruction``
:func:`reconstruction_stats` accumulates the input-channel Gram ``X^T X / rows`` of every
consumer of a prunable group (C x C per consumer input). Values are streamed feed by feed
through :func:`onnxprune.intermediates.iter_intermediates`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxprune.intermediates import iter_intermediates
from onnxprune.prune.analysis import Analysis
from onnxprune.prune.channels import SpaceKey
from onnxprune.prune.compensate import CONSTANT_RTOL, InputMean
from onnxprune.prune.reconstruction import group_consumers

__all__ = ["activation_stats", "reconstruction_stats", "removed_input_means"]

_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_RECTIFIERS = frozenset({"Relu", "Clip"})


def _spaces(model: ir.Model, analysis: Analysis, criterion: str) -> list[SpaceKey]:
    ops = _PRODUCERS if criterion == "activation" else _RECTIFIERS
    produced = {
        node.outputs[0].name for node in model.graph if node.op_type in ops and node.outputs
    }
    keys = set()
    for group in analysis.prunable:
        for space, _ in group.units[0].members:
            periodic = analysis.graph.periodic(space.key)  # batch*heads rows: not per channel
            if not space.is_initializer and space.value in produced and not periodic:
                keys.add(space.key)
    return sorted(keys)


def activation_stats(
    model: ir.Model,
    analysis: Analysis,
    feeds: Iterable[Mapping[str, np.ndarray]],
    criterion: str,
) -> dict[SpaceKey, np.ndarray]:
    """Per-channel ``mean |a|`` (activation) or share of positive values (apoz)."""
    keys = _spaces(model, analysis, criterion)
    if not keys:
        return {}
    names = sorted({k[0] for k in keys})
    sums = {k: np.zeros(analysis.graph.spaces[k].size) for k in keys}
    counts = dict.fromkeys(keys, 0)
    for outputs in iter_intermediates(model, names, feeds):
        for key in keys:
            array = outputs[key[0]]
            moved = np.moveaxis(array, key[1], 0).reshape(array.shape[key[1]], -1)
            values = np.abs(moved) if criterion == "activation" else (moved > 0)
            sums[key] += values.sum(1, dtype=np.float64)
            counts[key] += moved.shape[1]
    return {k: sums[k] / max(counts[k], 1) for k in keys}


def reconstruction_stats(
    model: ir.Model,
    analysis: Analysis,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    centered: bool = False,
) -> dict[SpaceKey, np.ndarray]:
    """Mean input-channel Gram ``X^T X / rows`` of each consumer of a prunable group.

    ``centered``: the covariance ``X^T X / rows - mu mu^T`` instead (what remains of a
    removed channel once its mean is compensated: FLAP's fluctuation).
    """
    keys = sorted(
        {c.input for group in analysis.prunable for c in group_consumers(model, analysis, group)}
    )
    if not keys:
        return {}
    names = sorted({k[0] for k in keys})
    grams: dict[SpaceKey, np.ndarray] = {}
    sums: dict[SpaceKey, np.ndarray] = {}
    counts = dict.fromkeys(keys, 0)
    for outputs in iter_intermediates(model, names, feeds):
        for key in keys:
            array = outputs[key[0]]
            rows = np.moveaxis(array, key[1], 0).reshape(array.shape[key[1]], -1)
            # One feed's product in single precision (2x faster than double), the sums over
            # feeds in float64.
            rows = rows.astype(np.float32, copy=False)
            gram = (rows @ rows.T).astype(np.float64)
            total = rows.sum(1, dtype=np.float64)
            grams[key] = grams[key] + gram if key in grams else gram
            sums[key] = sums[key] + total if key in sums else total
            counts[key] += rows.shape[1]
    result = {k: grams[k] / max(counts[k], 1) for k in grams}
    if centered:
        for key, gram in result.items():
            mean = sums[key] / max(counts[key], 1)
            result[key] = gram - np.outer(mean, mean)
    return result


@dataclasses.dataclass
class _MeanAccumulator:
    """Streams ``sum x`` per channel and the per-position spread of the first sample."""

    axis: int
    channels: np.ndarray
    total: np.ndarray | None = None
    count: int = 0
    first: np.ndarray | None = None
    spread: np.ndarray | None = None

    def add(self, array: np.ndarray) -> None:
        moved = np.moveaxis(array, self.axis % array.ndim, 1)[:, self.channels]
        moved = moved.astype(np.float64)  # [batch, R, *positions]
        sums = moved.sum(axis=(0, *range(2, moved.ndim)))
        self.total = sums if self.total is None else self.total + sums
        self.count += moved.size // max(len(self.channels), 1)
        if self.first is None:
            self.first = moved[0]
            self.spread = np.zeros(len(self.channels))
        if self.spread is None or moved.shape[1:] != self.first.shape:
            self.spread = None  # positions differ between feeds: no per-position map
            return
        deviation = np.abs(moved - self.first[None]).reshape(len(moved), len(self.channels), -1)
        self.spread = np.maximum(self.spread, deviation.max(axis=(0, 2), initial=0.0))

    def result(self, size: int) -> InputMean:
        mean = np.zeros(size)
        if self.total is not None:
            mean[self.channels] = self.total / max(self.count, 1)
        constant = {}
        if self.spread is not None and self.first is not None:
            scale = np.abs(self.first).reshape(len(self.channels), -1).max(axis=1, initial=0.0)
            for i, c in enumerate(self.channels):
                if self.spread[i] <= CONSTANT_RTOL * (scale[i] + 1e-30):
                    constant[int(c)] = self.first[i]
        return InputMean(mean, constant)


def removed_input_means(
    model: ir.Model,
    requests: Mapping[str, tuple[int, np.ndarray]],
    feeds: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, InputMean]:
    """``E[x_c]`` of the removed channels ``{value: (axis, channels)}`` over every sample
    and position (:class:`~onnxprune.prune.compensate.InputMean`), with the per-position
    values of channels that are the same on every sample."""
    if not requests:
        return {}
    names = sorted(requests)
    accumulators = {n: _MeanAccumulator(*requests[n]) for n in names}
    sizes: dict[str, int] = {}
    for outputs in iter_intermediates(model, names, feeds):
        for name in names:
            array = np.asarray(outputs[name])
            sizes[name] = array.shape[requests[name][0] % array.ndim]
            accumulators[name].add(array)
    return {n: accumulators[n].result(sizes[n]) for n in names if n in sizes}
