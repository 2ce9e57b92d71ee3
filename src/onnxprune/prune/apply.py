"""Physical removal: slice initializers, rewrite shapes, attributes and shape constants.

Given the set of units to remove, every channel space keeps the indices whose unit stays.
Then: every initializer is sliced along each of its pruned axes (weights, biases, BN
parameters, PRelu slopes, per-channel Q/DQ scales alike: they are all initializer axes in
some group); value shapes recorded in the model are updated; ``group`` of depthwise
convolutions and ``num_groups`` of GroupNormalization follow the kept channels; Reshape
targets, Split sizes, Expand shapes, Resize sizes and Slice bounds on pruned axes are
rewritten. Constants shared by several nodes are copied before a node-specific rewrite.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import cast

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import add_initializer, const_numpy, name_of, required
from onnxprune.prune.analysis import Analysis
from onnxprune.prune.channels import SpaceKey

__all__ = ["apply_removal", "kept_counts", "kept_indices", "zero_units"]


def kept_indices(analysis: Analysis, removed_roots: Collection[int]) -> dict[SpaceKey, np.ndarray]:
    """Kept indices of every space that loses at least one element."""
    removed = np.fromiter(set(removed_roots), np.int64)
    graph = analysis.graph
    kept: dict[SpaceKey, np.ndarray] = {}
    for key, space in graph.spaces.items():
        mask = ~np.isin(graph.roots(space), removed)
        if not mask.all():
            if not mask.any():
                raise ValueError(f"pruning would remove every channel of {key[0]} axis {key[1]}")
            kept[key] = np.flatnonzero(mask)
    return kept


def _slice_initializers(model: ir.Model, kept: dict[SpaceKey, np.ndarray]) -> None:
    by_value: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (name, axis), idx in kept.items():
        by_value.setdefault(name, []).append((axis, idx))
    for name, value in model.graph.initializers.items():
        cuts = by_value.get(name)
        if not cuts or value.const_value is None:
            continue
        array = value.const_value.numpy()
        for axis, idx in sorted(cuts):
            array = np.take(array, idx, axis=axis)
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        value.const_value = tensor
        value.shape = cast(ir.Shape, tensor.shape)  # ir.tensor of an array has an ir.Shape


def _update_shapes(model: ir.Model, kept: dict[SpaceKey, np.ndarray]) -> None:
    for node in model.graph:
        for value in node.outputs:
            if value is None or value.shape is None:
                continue
            dims = list(value.shape)
            changed = False
            for axis in range(len(dims)):
                idx = kept.get((name_of(value), axis))
                if idx is not None and isinstance(dims[axis], int):
                    dims[axis] = len(idx)
                    changed = True
            if changed:
                value.shape = ir.Shape(dims)


def _node_constant(model: ir.Model, node: ir.Node, index: int) -> np.ndarray:
    """A private copy of the node's constant input ``index`` (copied if shared)."""
    value = required(node.inputs[index])
    array = const_numpy(value).copy()
    if len(value.uses()) > 1 or value.is_graph_output():
        fresh = add_initializer(model.graph, f"{value.name}_pruned", array)
        node.replace_input_with(index, fresh)
    return array


def _set_node_constant(node: ir.Node, index: int, array: np.ndarray) -> None:
    value = required(node.inputs[index])
    value.const_value = ir.tensor(array, name=value.name)


def _count(kept: dict[SpaceKey, np.ndarray], analysis: Analysis, key: SpaceKey) -> int:
    if key in kept:
        return len(kept[key])
    return analysis.graph.spaces[key].size


def _rewrite_constants(model: ir.Model, analysis: Analysis, kept: dict[SpaceKey, np.ndarray]):
    ctx = analysis.context
    for attr_rw in ctx.attr_rewrites:
        if attr_rw.space in kept:
            count = len(kept[attr_rw.space]) // attr_rw.divisor
            attr_rw.node.attributes[attr_rw.attr] = ir.AttrInt64(attr_rw.attr, count)
    pending: dict[tuple[int, int], tuple[ir.Node, int, np.ndarray]] = {}
    for rw in ctx.shape_rewrites:
        if rw.space not in kept:
            continue
        slot = (id(rw.node), rw.input_index)
        if slot not in pending:
            pending[slot] = (
                rw.node,
                rw.input_index,
                _node_constant(model, rw.node, rw.input_index),
            )
        pending[slot][2].reshape(-1)[rw.index] = _count(kept, analysis, rw.space) * rw.multiplier
    for slice_rw in ctx.slice_rewrites:
        idx = kept.get(slice_rw.source)
        if idx is None:
            continue
        start = int(np.searchsorted(idx, slice_rw.start))
        end = int(np.searchsorted(idx, slice_rw.end))
        for input_index, bound in ((1, start), (2, end)):
            slot = (id(slice_rw.node), input_index)
            if slot not in pending:
                array = _node_constant(model, slice_rw.node, input_index)
                pending[slot] = (slice_rw.node, input_index, array)
            pending[slot][2].reshape(-1)[slice_rw.position] = bound
    for node, index, array in pending.values():
        _set_node_constant(node, index, array)


def apply_removal(
    model: ir.Model, analysis: Analysis, removed_roots: Collection[int]
) -> dict[SpaceKey, np.ndarray]:
    """Remove the units with the given roots from ``model`` in place.

    Returns:
        The kept indices of every space that lost channels.
    """
    kept = kept_indices(analysis, removed_roots)
    _rewrite_constants(model, analysis, kept)
    _slice_initializers(model, kept)
    _update_shapes(model, kept)
    return kept


def kept_counts(analysis: Analysis, kept: dict[SpaceKey, np.ndarray]) -> dict[str, list[int]]:
    """``{"value:axis": [before, after]}`` for a report."""
    return {
        f"{name}:{axis}": [analysis.graph.spaces[(name, axis)].size, len(idx)]
        for (name, axis), idx in sorted(kept.items())
    }


def zero_units(model: ir.Model, analysis: Analysis, removed_roots: Collection[int]) -> int:
    """Set every initializer element of the given units to zero (in place).

    This is the exactness oracle: a model whose removed channels are zero everywhere
    computes the same outputs as the model with those channels physically removed.
    Returns the number of initializer slices zeroed.
    """
    kept = kept_indices(analysis, removed_roots)
    zeroed = 0
    for (name, axis), idx in kept.items():
        value = model.graph.initializers.get(name)
        if value is None or value.const_value is None:
            continue
        array = value.const_value.numpy().copy()
        drop = np.setdiff1d(np.arange(array.shape[axis]), idx)
        index: list[slice | np.ndarray] = [slice(None)] * array.ndim
        index[axis] = drop
        array[tuple(index)] = 0
        value.const_value = ir.tensor(array, name=name)
        zeroed += len(drop)
    return zeroed
