"""The inputs of each pruning stage, on the partly sparsified model and on the dense one.

The sequential update (:mod:`onnxprune.sparsity.prune`) collects, stage after stage, the
inputs of the stage's layers on the model whose earlier stages are already pruned, and the
same inputs on the dense reference. Running both full models for every stage costs
``O(stages x model)``: on MobileNetV2 (53 stages, 384 feeds) two thirds of the whole run.

Instead each stage runs *cut models* (:mod:`onnxprune.quant.segments`, shared with the
quantizer's sequential bias correction): the nodes its inputs depend on, back to tensors
cached at earlier stages for every feed (one byte budget for both models, those read
soonest kept; the rest recomputed from further back, so the values never depend on the
budget beyond onnxruntime's rounding). On the sparsified side, the tensors computed from a
stage's weights are dropped from the cache once the stage is pruned; the dense side's stay
valid for the whole run.

Graph inputs and initializers read directly by a layer are taken from the feed or the
model, not from a cut model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import const_numpy
from onnxprune.quant import segments
from onnxprune.sparsity.activations import stats_support
from onnxprune.sparsity.layers import WeightLayer

__all__ = ["CACHE_BYTES", "StageInputs"]

#: Bytes of cached tensors, both models and every feed together.
CACHE_BYTES = 768 << 20

DENSE, SPARSE = segments.FLOAT, segments.QUANT

Pair = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


class StageInputs:
    """Per stage, feed by feed: ``(sparsified model's values, dense model's values)`` of the
    stage's layer inputs (see the module docstring).

    Call :meth:`pairs` for stages in order, consume each iterator to the end, and call
    :meth:`pruned` after a stage's weights were changed in ``model`` (in place: the cut
    models read the initializers when they are built).
    """

    def __init__(
        self,
        model: ir.Model,
        reference: ir.Model,
        groups: Sequence[Sequence[WeightLayer]],
        feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]],
        budget: int = CACHE_BYTES,
    ) -> None:
        self._feeds = feeds
        self._inputs = {v.name for v in model.graph.inputs}
        self._model, self._reference = model, reference
        produced = {o.name for node in model.graph for o in node.outputs if o.name}
        wanted = [
            sorted({x.activation for x in group if stats_support(x) is None}) for group in groups
        ]
        self._direct = [[n for n in names if n not in produced] for names in wanted]
        targets = [tuple(n for n in names if n in produced) for names in wanted]
        exposed = {n for t in targets for n in t}
        self._sides = [
            segments.Side.build(key, m, targets, segments.float_cuts(m, exposed), exposed)
            for key, m in ((DENSE, reference), (SPARSE, model))
        ]
        weights = model.graph.initializers
        self._changed = [
            set().union(*(segments.downstream(weights[x.weight]) for x in group))
            for group in groups
        ]
        uses = {(DENSE, n): s for n, s in self._sides[DENSE].plan_uses().items()}
        plan = self._sides[SPARSE].plan_uses(self._changed)
        uses.update(((SPARSE, n), s) for n, s in plan.items())
        count, shapes = 0, set()
        for feed in feeds():
            count += 1
            shapes.add(tuple(sorted((k, np.shape(v)) for k, v in feed.items())))
        for side in self._sides:
            side.fixed_shapes = len(shapes) <= 1
        self._cache = segments.Cache(budget, uses, count)

    @property
    def peak_bytes(self) -> int:
        """The most bytes the cache held at once."""
        return self._cache.peak

    def pairs(self, step: int) -> Iterator[Pair]:
        """The inputs of stage ``step``'s layers, feed by feed."""
        outputs = segments.shared_outputs(self._sides, step, self._cache, self._feeds())
        direct = self._direct[step]
        if not direct:
            for ref, (mine,) in outputs:
                yield mine, ref
            return
        for feed, (ref, (mine,)) in zip(self._feeds(), outputs, strict=True):
            for name in direct:
                if name in self._inputs:
                    mine[name] = ref[name] = np.asarray(feed[name])
                else:  # a constant input
                    mine[name] = const_numpy(self._model.graph.initializers[name])
                    ref[name] = const_numpy(self._reference.graph.initializers[name])
            yield mine, ref

    def pruned(self, step: int) -> None:
        """Stage ``step``'s weights changed: drop what was computed from them."""
        self._cache.invalidate(SPARSE, self._changed[step])
