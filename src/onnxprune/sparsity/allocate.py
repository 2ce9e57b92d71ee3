"""Measured per-layer sparsity for one overall target (``--scope measured``).

A uniform target is wrong for most networks: a 3x3 depthwise filter has 9 weights and
loses its channel with 5 of them, while a 1280x1000 classifier barely notices half of its
weights gone. Measured on the zoo's MobileNetV2 (50 %, evaluation photos): every layer at
50 % collapses the model (top-1 agreement 0.00 by magnitude, 0.07 with the OBS update).

**Measurement.** Each layer is sparsified *alone* at every level of :data:`LEVELS`
(magnitude, ranked within the layer) and the model runs on up to :data:`SAMPLES`
calibration feeds; the layer's cost at that level is the outputs' noise-to-signal ratio
against the dense model, worst output::

    nsr_l(s) = sum (y - y0)^2 / sum y0^2

(:func:`onnxprune.metrics.worst_nsr`, as for structured pruning's sensitivity: integer
outputs are skipped). One onnxruntime session serves every probe: the candidate weights are
made graph inputs (with their initializers as defaults) and a probe feeds the sparsified
weight of one layer.

**Allocation.** Perturbations of different layers add up in noise power to first order,
so the levels ``s_l`` minimise ``sum_l nsr_l(s_l)`` subject to
``sum_l s_l n_l >= s sum_l n_l`` (``n_l`` the layer's weights): each curve is made
non-decreasing, and a greedy pass repeatedly raises the layer whose next level costs the
least noise per removed weight; the last step is taken only as far as the target needs
(a fraction between two levels).

**With the update** (``--update``), a layer is probed the way it will be pruned: Wanda
scores and the OBS update (:func:`~onnxprune.sparsity.sparsegpt.obs_update`, dampening
:data:`PROBE_DAMP`) on input statistics of the dense model collected on up to
:data:`GRAM_SAMPLES` *other* calibration feeds (the probe feeds are never fitted on). The
update helps layers very unequally: on the zoo's MobileNetV2 it cut the classifier's
held-out error 2.7x at 62.5 % and the 1280-channel head conv's by 3 % at 75 %, so
magnitude curves put the sparsity where the update cannot repair it. Layers without
statistics (depthwise convs), or past :data:`GRAM_BYTES` of ``K x K`` sums, keep magnitude
probes.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.io.pinned import copy_model
from onnxprune.metrics import worst_nsr
from onnxprune.passes._match import const_numpy
from onnxprune.progress import Progress
from onnxprune.runtime import make_session
from onnxprune.sparsity import masks as masks_mod
from onnxprune.sparsity.activations import InputStats, collect_stats, stats_support
from onnxprune.sparsity.layers import WeightLayer
from onnxprune.sparsity.sparsegpt import obs_update
from onnxprune.sparsity.wanda import magnitude_scores, wanda_scores

__all__ = [
    "GRAM_SAMPLES",
    "LEVELS",
    "SAMPLES",
    "SparsityAllocation",
    "allocate_sparsity",
    "measure_curves",
]

#: Sparsity levels each layer is measured at (0 is the dense model, nsr 0).
LEVELS = (0.25, 0.5, 0.625, 0.75, 0.875, 0.95)
#: Calibration feeds each probe runs on (at most).
SAMPLES = 16
#: Further calibration feeds whose input statistics fit the updated probes (at most).
GRAM_SAMPLES = 128
#: Dampening of the updated probes (the value most layers chose on held-out feeds).
PROBE_DAMP = 0.1
#: At most this many bytes of ``K x K`` input sums are held for the updated probes.
GRAM_BYTES = 1 << 30


@dataclasses.dataclass
class SparsityAllocation:
    """Per-layer targets and the measurements they came from."""

    targets: dict[str, float]
    curves: dict[str, list[float]]  # nsr at LEVELS, per layer
    samples: int
    predicted_nsr: float

    def note(self) -> str:
        return (
            f"measured allocation on {self.samples} calibration feeds: {len(self.targets)} "
            f"layers at {min(self.targets.values()):.2f}-{max(self.targets.values()):.2f} "
            f"sparsity (predicted output nsr {self.predicted_nsr:.3g})"
        )


def _sparsified(
    layer: WeightLayer, weight: np.ndarray, level: float, stats: InputStats | None = None
) -> np.ndarray:
    """``weight`` at ``level``: by magnitude, or with ``stats`` (a gram) Wanda + OBS."""
    matrix = layer.to_matrix(weight)
    if stats is None or stats.gram is None:
        keep = masks_mod.select_layer(magnitude_scores(matrix), level)
        return layer.from_matrix(np.where(keep, matrix, 0.0).astype(weight.dtype))
    keep = masks_mod.select_layer(wanda_scores(matrix, stats.norms), level)
    new, _ = obs_update(matrix, keep, stats.gram, stats.rows, damp=PROBE_DAMP)
    return layer.from_matrix(new.astype(weight.dtype))


def _probe_stats(
    model: ir.Model, layers: Sequence[WeightLayer], feeds: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, InputStats]:
    """Dense-model input statistics (with gram) of the supported layers, smallest ``K``
    first until :data:`GRAM_BYTES`."""
    chosen, used, seen = [], 0, set()
    for layer in sorted(layers, key=lambda x: x.matrix_shape[1]):
        if stats_support(layer) is not None:
            continue
        k = layer.matrix_shape[1]
        key = (layer.activation, k)
        if key not in seen and used + 8 * k * k > GRAM_BYTES:
            continue
        used += 0 if key in seen else 8 * k * k
        seen.add(key)
        chosen.append(layer)
    if not chosen:
        return {}
    stats = collect_stats(model, chosen, feeds, gram=True)
    return {name: x for name, x in stats.items() if x.rows > 0}


def measure_curves(
    model: ir.Model,
    layers: Sequence[WeightLayer],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    samples: int = SAMPLES,
    threads: int = 0,
    gram_feeds: Iterable[Mapping[str, np.ndarray]] | None = None,
) -> tuple[dict[str, list[float]], int]:
    """``{layer: [nsr at each of LEVELS]}`` and the number of feeds measured on.

    With ``gram_feeds`` (feeds other than the probed ones), layers are probed with the OBS
    update fitted on them (module docstring), else by magnitude. ``threads``: onnxruntime's
    intra-op threads for the probe runs (0: one per core)."""
    stats = _probe_stats(model, layers, gram_feeds) if gram_feeds is not None else {}
    probe = copy_model(model)
    weights = {layer.node: const_numpy(probe.graph.initializers[layer.weight]) for layer in layers}
    for layer in layers:  # an initializer that is also an input can be fed
        probe.graph.inputs.append(probe.graph.initializers[layer.weight])
    session = make_session(probe, intra_op_threads=threads)
    names = [o.name for o in session.get_outputs()]
    data = [dict(feed) for _, feed in zip(range(samples), feeds, strict=False)]
    reference = [session.run(names, feed) for feed in data]
    count = len(data)
    stacked = _stacked(session, names, data, reference)
    if stacked is not None:  # one run per probe instead of one per feed
        data, reference = [stacked[0]], [stacked[1]]
    ref = _joined(names, reference)
    curves: dict[str, list[float]] = {}
    with Progress(len(layers) * len(LEVELS), "sparsity sensitivity") as bar:
        for layer in layers:
            curve = []
            for level in LEVELS:
                weight = _sparsified(layer, weights[layer.node], level, stats.get(layer.node))
                override = {layer.weight: weight}
                got = [session.run(names, {**feed, **override}) for feed in data]
                curve.append(worst_nsr(ref, _joined(names, got)))
                bar.update()
            curves[layer.node] = curve
    return curves, count


def _joined(names: Sequence[str], runs: Sequence[list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Each output of every run, flattened and joined: ``{name: values}``."""
    return {n: np.concatenate([r[i].reshape(-1) for r in runs]) for i, n in enumerate(names)}


def _stacked(
    session: Any, names: Sequence[str], data: Sequence[dict], reference: Sequence[list]
) -> tuple[dict[str, np.ndarray], list[np.ndarray]] | None:
    """The feeds concatenated on axis 0 and the model's outputs for them, where those are
    every feed's outputs concatenated on axis 0 (a dynamic batch axis), else None."""
    if len(data) < 2:
        return None
    try:
        joined = {k: np.concatenate([feed[k] for feed in data]) for k in data[0]}
        got = session.run(names, joined)
    except Exception:  # a fixed batch or ragged feeds (any error): one run per feed
        return None
    for i, value in enumerate(got):
        want = np.concatenate([r[i] for r in reference])
        if value.shape != want.shape or not np.allclose(value, want, rtol=1e-4, atol=1e-5):
            return None
    return joined, got


def allocate_sparsity(
    sizes: Mapping[str, int], curves: Mapping[str, Sequence[float]], target: float
) -> tuple[dict[str, float], float]:
    """Per-layer sparsities whose removed weights reach ``target`` of ``sum(sizes)`` with the
    least summed nsr (greedy over :data:`LEVELS`, see the module docstring); returns the
    targets and the predicted summed nsr."""
    levels = (0.0, *LEVELS)
    cost = {}
    for name, curve in curves.items():
        cost[name] = list(np.maximum.accumulate([0.0, *curve]))  # non-decreasing
    goal = target * sum(sizes.values())
    removed = 0.0
    chosen = dict.fromkeys(curves, 0)  # index into levels
    targets = dict.fromkeys(curves, 0.0)

    def entry(name: str) -> tuple[float, str] | None:
        i = chosen[name]
        if i + 1 >= len(levels):
            return None
        extra = (levels[i + 1] - levels[i]) * sizes[name]
        return (cost[name][i + 1] - cost[name][i]) / extra, name

    heap = [e for name in sorted(curves) if (e := entry(name)) is not None]
    heapq.heapify(heap)
    nsr = 0.0
    while heap and removed < goal:
        _, name = heapq.heappop(heap)
        i = chosen[name]
        step = (levels[i + 1] - levels[i]) * sizes[name]
        take = min(1.0, (goal - removed) / step)
        targets[name] = levels[i] + take * (levels[i + 1] - levels[i])
        nsr += take * (cost[name][i + 1] - cost[name][i])
        removed += take * step
        chosen[name] = i + 1
        if take >= 1.0 and (e := entry(name)) is not None:
            heapq.heappush(heap, e)
    return targets, nsr
