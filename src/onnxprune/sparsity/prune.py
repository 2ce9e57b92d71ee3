"""Decide and apply weight sparsity on an in-memory model (the algorithm, no file I/O).

One step: score every layer's weight view ``W[rows, K]`` (magnitude ``|W|`` or Wanda
``|W| * ||x_k||``), select keep-masks (:mod:`onnxprune.sparsity.masks`: global or
per-layer threshold, per-row for Wanda at layer scope, or N:M), then either zero the
pruned weights or, with ``update``, apply the OBS/SparseGPT compensation
(:mod:`onnxprune.sparsity.sparsegpt`) with the layer's input Gram matrix.

Iterative mode (``iterations = T``) reaches each layer's target ``s`` in ``T`` steps
with the cubic schedule of Zhu & Gupta (2017), ``s_t = s * (1 - (1 - t/T)^3)``, and
re-collects input statistics on the partially sparsified model before every step. Masks
only shrink (a pruned weight stays pruned). With an N:M pattern the intermediate steps
are unstructured per layer and the last step applies N:M.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.sparsity import masks as masks_mod
from onnxprune.sparsity.activations import InputStats, collect_stats, stats_support
from onnxprune.sparsity.layers import WeightLayer
from onnxprune.sparsity.report import LayerResult
from onnxprune.sparsity.sparsegpt import obs_update
from onnxprune.sparsity.wanda import magnitude_scores, wanda_scores

__all__ = ["PATTERNS", "SparsifyConfig", "apply_sparsity", "parse_pattern", "schedule"]

logger = logging.getLogger(__name__)

PATTERNS = ("unstructured", "2:4")
SCOPES = ("global", "layer")
METHODS = ("magnitude", "wanda")

FeedSource = Callable[[], Iterable[Mapping[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class SparsifyConfig:
    """Settings of :func:`apply_sparsity` (validated by the file-level API)."""

    sparsity: float = 0.5
    pattern: str = "unstructured"
    scope: str = "layer"
    method: str = "magnitude"
    update: bool = False
    iterative: int = 1
    exclude: tuple[str, ...] = ()
    layer_sparsity: Mapping[str, float] = dataclasses.field(default_factory=dict)
    seed: int = 0
    damp: float = 0.01
    max_rows: int = 256

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["exclude"] = list(self.exclude)
        data["layer_sparsity"] = dict(sorted(self.layer_sparsity.items()))
        return data

    @property
    def data_aware(self) -> bool:
        return self.method == "wanda" or self.update


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``(N, M)`` for an N:M pattern, None for unstructured."""
    if pattern == "unstructured":
        return None
    n, m = (int(p) for p in pattern.split(":"))
    return n, m


def schedule(target: float, step: int, steps: int) -> float:
    """Cubic schedule ``target * (1 - (1 - step/steps)^3)``."""
    return target * (1.0 - (1.0 - step / steps) ** 3)


def _weight(model: ir.Model, layer: WeightLayer) -> np.ndarray:
    return model.graph.initializers[layer.weight].const_value.numpy()  # type: ignore[union-attr]


def _set_weight(model: ir.Model, layer: WeightLayer, array: np.ndarray) -> None:
    value = model.graph.initializers[layer.weight]
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=layer.weight)


def _scores(
    matrix: np.ndarray, layer: WeightLayer, stats: Mapping[str, InputStats], result: LayerResult
) -> np.ndarray:
    if layer.node in stats:
        result.scores = "wanda"
        return wanda_scores(matrix, stats[layer.node].norms)
    return magnitude_scores(matrix)


def _select(
    config: SparsifyConfig,
    scores: Mapping[str, np.ndarray],
    targets: Mapping[str, float],
    forced: Mapping[str, np.ndarray],
    final: bool,
) -> dict[str, np.ndarray]:
    """Keep-masks for this step (``targets`` are this step's sparsities)."""
    nm = parse_pattern(config.pattern)
    if nm is not None and final:
        return {k: masks_mod.nm_mask(s, *nm, forced[k]) for k, s in scores.items()}
    per_row = config.method == "wanda" and config.scope == "layer"
    overrides = set(config.layer_sparsity)
    pooled = {k: s for k, s in scores.items() if k not in overrides}
    keep: dict[str, np.ndarray] = {}
    if config.scope == "global" and nm is None and pooled:
        step_target = next(targets[k] for k in pooled)
        keep, threshold = masks_mod.select_global(pooled, step_target, forced)
        logger.info("global threshold %.6g at sparsity %.4f", threshold, step_target)
    for name, s in scores.items():
        if name in keep:
            continue
        select = masks_mod.select_rows if per_row else masks_mod.select_layer
        keep[name] = select(s, targets[name], forced[name])
    return keep


def _step(  # noqa: PLR0917 - private helper of apply_sparsity
    model: ir.Model,
    layers: list[WeightLayer],
    config: SparsifyConfig,
    targets: Mapping[str, float],
    results: Mapping[str, LayerResult],
    feeds: FeedSource | None,
    final: bool,
) -> dict[str, Any]:
    """One pruning step on every layer; returns the step's summary."""
    stats: dict[str, InputStats] = {}
    if config.data_aware and feeds is not None:
        stats = collect_stats(
            model, layers, feeds(), gram=config.update, max_rows=config.max_rows, seed=config.seed
        )
    matrices = {layer.node: layer.to_matrix(_weight(model, layer)) for layer in layers}
    scores = {
        layer.node: _scores(matrices[layer.node], layer, stats, results[layer.node])
        for layer in layers
    }
    forced = {
        k: m.reshape(-1).view(f"u{m.itemsize}").reshape(m.shape) == 0 for k, m in matrices.items()
    }
    keep = _select(config, scores, targets, forced, final)
    for layer in layers:
        matrix, mask = matrices[layer.node], keep[layer.node]
        layer_stats = stats.get(layer.node)
        if (
            config.update
            and layer_stats is not None
            and layer_stats.gram is not None
            and not mask.all()
        ):
            nm = parse_pattern(config.pattern) if final else None
            new, mask = obs_update(
                matrix,
                mask,
                layer_stats.gram,
                layer_stats.rows,
                damp=config.damp,
                group=nm[1] if nm else None,
                forced=forced[layer.node],
            )
            keep[layer.node] = mask
            results[layer.node].updated = True
        else:
            new = np.where(mask, matrix, 0.0)
        _set_weight(model, layer, layer.from_matrix(new.astype(matrix.dtype)))
    zeros = sum(int((~keep[k]).sum()) for k in keep)
    total = sum(m.size for m in matrices.values())
    return {"sparsity": zeros / total if total else 0.0, "data_aware_layers": len(stats)}


def apply_sparsity(
    model: ir.Model,
    layers: list[WeightLayer],
    config: SparsifyConfig,
    feeds: FeedSource | None = None,
) -> tuple[list[LayerResult], list[dict[str, Any]]]:
    """Sparsify ``layers`` of ``model`` in place; returns per-layer results and step summaries.

    ``feeds`` yields calibration feeds anew on each call (needed when ``config.data_aware``).
    """
    pattern = config.pattern
    results = {
        layer.node: LayerResult(
            node=layer.node,
            op=layer.op,
            weight=layer.weight,
            shape=list(layer.shape),
            params=layer.size,
            target=config.layer_sparsity.get(layer.node, config.sparsity),
            pattern=pattern,
        )
        for layer in layers
    }
    if config.data_aware:
        for layer in layers:
            reason = stats_support(layer)
            if reason is not None:
                results[layer.node].notes.append(reason + "; magnitude scores, no update")
    steps = []
    for step in range(1, config.iterative + 1):
        targets = {k: schedule(r.target, step, config.iterative) for k, r in results.items()}
        summary = _step(model, layers, config, targets, results, feeds, step == config.iterative)
        steps.append({"step": step, **summary})
        logger.info("step %d/%d: sparsity %.4f", step, config.iterative, summary["sparsity"])
    for layer in layers:
        weight = _weight(model, layer)
        results[layer.node].zeros = int(weight.size - np.count_nonzero(weight))
    return [results[layer.node] for layer in layers], steps
