"""Training-free recovery: refit the layers that lost input channels, by least squares.

After channels are removed, each *consumer* (a Conv with group 1, a Gemm, or a MatMul with a
constant 2-D weight whose input-channel axis was pruned) is refit so that, on calibration
data, its output in the pruned model matches its output in the original model (the
original is the teacher; layer-wise distillation):

    W', b' = argmin  sum_rows || A_p W' + b' - Y_o ||^2 + lam * n * sum_k p_k ||S'_k - S0_k||^2

``A_p`` are the consumer's input rows in the pruned model (im2col patches for a Conv,
token rows for Gemm/MatMul), ``Y_o`` the original model's consumer output on the same
rows, restricted to the consumer's kept output channels (where the layer's output is added
to a skip, ``Y_o`` is the original sum minus the pruned model's skip, and a border
compensation constant added after the layer is subtracted: :func:`_follow_adds`),
``S' = [W'; b']`` and ``S0`` the
un-refit (pruned, compensated) weights: the ridge pulls toward them, not toward zero, so
``lam -> inf`` is no refit. ``lam`` (or no refit) is chosen per layer by leave-feeds-out
cross-validation, and a refit is kept only where it predicts held-out feeds better
(:mod:`onnxprune.prune.ridge`). Rows are sampled from every feed with a seeded generator
and kept per fold; each fold's normal equations are one product over its rows (memory
~folds * K^2 for the consumer being solved), and the consumers are refit in topological
order.

Cost: the teacher's rows come from one pass over the feeds. The consumers' input rows come
from passes over the pruned model, each serving a *chunk* of consecutive consumers (at most
:data:`MAX_PASSES` chunks, fewer consumers per chunk when their sampled rows would exceed
:data:`GRAM_BUDGET` bytes). A refit sees the refits of earlier chunks; within a chunk
the inputs are those before its refits. With up to ``MAX_PASSES`` consumers (small models)
every consumer gets its own pass, so each refit sees every earlier one. Passes were one per
consumer before: a DenseNet-121 (120 consumers) then ran the whole model 120 times per feed.
A shared pass costs fidelity where consecutive consumers' errors compound: the zoo's
MobileNetV2 pruned to 0.75 of its MACs (16 consumers) measured 6.19 dB on the evaluation
photos with 8 passes (two consumers each) and 6.64 dB with one pass per consumer (the whole
prune 131 s before, 120 s after on an idle machine: the passes are a small part), hence 24.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.intermediates import iter_intermediates
from onnxprune.passes._match import const_numpy, const_shape, name_of, required, uses_of
from onnxprune.progress import Progress
from onnxprune.prune.channels import SpaceKey
from onnxprune.prune.ridge import Folds, cross_validated_refit, fold_of

__all__ = [
    "GRAM_BUDGET",
    "MAX_PASSES",
    "MAX_ROWS",
    "RefitResult",
    "consumers",
    "conv_output_shape",
    "conv_rows",
    "positions",
    "refit_chunks",
    "refit_consumers",
    "refittable",
    "weight_input_axis",
]

logger = logging.getLogger(__name__)

#: At most this many passes over the pruned model collect the consumers' input rows.
MAX_PASSES = 24
#: Sampled rows per consumer, spread evenly over the feeds. More rows generalize better
#: (MobileNetV2 at 0.75 of the MACs, 384 fit photos, evaluation photos: 4096 rows 6.64 dB /
#: top-1 0.622, 16384 6.86 dB / 0.658, 65536 6.91 dB / 0.652, the same wall time); a
#: 3073-column consumer holds 200 MB of rows at this size.
MAX_ROWS = 16384
#: The sampled input rows of one chunk of consumers stay under this many bytes.
GRAM_BUDGET = 512 * 2**20


@dataclasses.dataclass
class RefitResult:
    """One refit layer: relative output error on the sampled rows before and after."""

    node: str
    rows: int
    error_before: float
    error_after: float
    #: ridge strength toward the un-refit weights chosen by cross-validation; None: no refit
    strength: float | None = None
    #: relative error on held-out feeds (leave-feeds-out), without and with the refit
    heldout_before: float | None = None
    heldout_after: float | None = None


@dataclasses.dataclass
class _Consumer:
    node: ir.Node
    kind: str  # "conv" | "gemm" | "matmul"
    weight: ir.Value
    bias: ir.Value | None
    out_kept: np.ndarray | None
    #: the layer's own output (a MatMul's bias Add): names this consumer's rows
    target: str = ""
    #: the original model's value the targets are read from: ``target``, or the residual
    #: Add right after it
    teacher: str = ""
    #: the residual Add's other input (the skip), read from the pruned model and subtracted
    skip_value: ir.Value | None = None
    #: a constant ``[C, H, W]`` (broadcastable) added right after a Conv, subtracted
    offset: np.ndarray | None = None

    @property
    def skip(self) -> str | None:
        return None if self.skip_value is None else name_of(self.skip_value)


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def weight_input_axis(node: ir.Node) -> int | None:
    """The axis of a Conv/Gemm/MatMul weight that indexes the layer's input channels."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if _attr(node, "transB", 0) else 0
    if node.op_type == "MatMul":
        return 0
    return None


def refittable(node: ir.Node) -> bool:
    """Whether the layer's weight can be refit by least squares (constant, plain layout)."""
    if node.op_type == "Conv":
        w = required(node.inputs[1]).const_value
        return (
            _attr(node, "group", 1) == 1
            and w is not None
            and len(w.shape) == 4
            and _attr(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")
        )
    if node.op_type == "Gemm":
        return not _attr(node, "transA", 0) and required(node.inputs[1]).const_value is not None
    if node.op_type == "MatMul":
        weight = required(node.inputs[1])
        w = weight.const_value
        return w is not None and len(w.shape) == 2 and not weight.is_graph_input()
    return False


def consumers(
    model: ir.Model,
    kept: Mapping[SpaceKey, np.ndarray],
    ranks: Mapping[str, int],
    original: Collection[str] = (),
) -> list[_Consumer]:
    """Layers of the pruned model whose weight lost input channels, in graph order."""
    found = []
    for node in model.graph:
        axis = weight_input_axis(node)
        if axis is None or not refittable(node) or (name_of(node.inputs[1]), axis) not in kept:
            continue
        kind = {"Conv": "conv", "Gemm": "gemm", "MatMul": "matmul"}[node.op_type]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if bias is not None and (bias.const_value is None or len(bias.const_value.shape) != 1):
            bias = None if kind == "conv" else bias
        out_axis = 1 if kind in ("conv", "gemm") else -1
        out = name_of(node.outputs[0])
        rank = ranks.get(out)
        if not rank:
            continue
        key = (out, out_axis % rank)
        value = node.outputs[0]
        if kind == "matmul" and (add := _bias_add(node)) is not None:
            bias = add.inputs[1 - add.inputs.index(node.outputs[0])]
            value = add.outputs[0]
        consumer = _Consumer(node, kind, required(node.inputs[1]), bias, kept.get(key), out)
        consumer.target = consumer.teacher = name_of(value)
        _follow_adds(consumer, value, ranks, original)
        found.append(consumer)
    return found


def _sole_add(value: ir.Value) -> tuple[ir.Node, ir.Value] | None:
    """The Add that is ``value``'s only use, and that Add's other input."""
    uses = uses_of(value)
    if len(uses) != 1 or uses[0][0].op_type != "Add":
        return None
    add, index = uses[0]
    other = add.inputs[1 - index]
    return None if other is None else (add, other)


def _follow_adds(
    c: _Consumer, value: ir.Value, ranks: Mapping[str, int], original: Collection[str]
) -> None:
    """Aim the refit at what the model adds the layer's output to.

    A constant ``R`` added right after a Conv (border compensation, or a constant of the
    model) is subtracted from the target: the layer alone must give ``Z_o - R``, ``Z_o`` the
    original model's value after the Add where it has one (a constant of the model), else the
    layer's original output (compensation, which exists only in the pruned model). A
    residual Add right after that (``z = y + s``, the skip ``s`` a computed tensor of the same
    rank) makes the target ``Z_o - s_p``: the original sum minus the pruned model's skip, so
    the refit also cancels the error that earlier cuts left in the skip stream where the
    layer's inputs can predict it (the same least squares; cross-validation judges it on the
    sum, which is what the next layers read).
    """
    found = _sole_add(value)
    const = None if found is None or c.kind != "conv" else found[1].const_value
    if found is not None and const is not None and len(const.shape) in (3, 4):
        array = const.numpy().astype(np.float64)
        offset = array[0] if array.ndim == 4 and array.shape[0] == 1 else array
        if offset.ndim != 3:
            return
        c.offset = offset
        out = name_of(found[0].outputs[0])
        if out in original:
            c.teacher = out
        found = _sole_add(found[0].outputs[0])
    if found is None or found[1].const_value is not None:
        return
    add, skip = found
    rank = ranks.get(name_of(add.outputs[0]))
    if rank is None or ranks.get(name_of(skip)) != rank:
        return
    c.teacher, c.skip_value = name_of(add.outputs[0]), skip


def _bias_add(node: ir.Node) -> ir.Node | None:
    """The Add of a 1-D constant right after a MatMul (its only use): the layer's bias, which
    compensation may have changed, so it is fit with the weights against the Add's output."""
    uses = uses_of(node.outputs[0])
    if len(uses) != 1 or uses[0][0].op_type != "Add":
        return None
    add = uses[0][0]
    other = add.inputs[1 - uses[0][1]]
    if other is None or other.const_value is None or len(other.const_value.shape) != 1:
        return None
    return add if len(other.uses()) == 1 else None


def conv_rows(x: np.ndarray, node: ir.Node, kernel: tuple[int, int], pos: np.ndarray):
    """im2col rows ``[R, C*kh*kw]`` (weight layout order) at output positions (n, oh, ow)."""
    kh, kw = kernel
    sh, sw = _attr(node, "strides", [1, 1])
    dh, dw = _attr(node, "dilations", [1, 1])
    t, left, b, r = _attr(node, "pads", [0, 0, 0, 0])
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)))
    n, oh, ow = pos[:, 0], pos[:, 1], pos[:, 2]
    ii = oh[:, None, None] * sh + np.arange(kh)[None, :, None] * dh
    jj = ow[:, None, None] * sw + np.arange(kw)[None, None, :] * dw
    chans = np.arange(x.shape[1])[None, :, None, None]
    patches = xp[n[:, None, None, None], chans, ii[:, None], jj[:, None]]
    return patches.reshape(len(pos), -1)


def conv_output_shape(
    shape: tuple[int, ...], node: ir.Node, kernel: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """``(n, 0, oh, ow)`` of a 2-D Conv on an input of ``shape`` (the channel count is not
    needed by :func:`positions`)."""
    kh, kw = kernel
    sh, sw = _attr(node, "strides", [1, 1])
    dh, dw = _attr(node, "dilations", [1, 1])
    t, left, b, r = _attr(node, "pads", [0, 0, 0, 0])
    oh = (shape[2] + t + b - dh * (kh - 1) - 1) // sh + 1
    ow = (shape[3] + left + r - dw * (kw - 1) - 1) // sw + 1
    return (shape[0], 0, oh, ow)


def positions(shape: tuple[int, ...], kind: str, count: int, rng: np.random.Generator):
    """Sampled rows: ``(n, oh, ow)`` output positions of a Conv (``kind="conv"``, ``shape``
    its output shape), else flat token indices."""
    if kind == "conv":
        n, _, h, w = shape
        total = n * h * w
        flat = rng.choice(total, size=min(count, total), replace=False)
        return np.stack(np.unravel_index(np.sort(flat), (n, h, w)), axis=1)
    total = int(np.prod(shape[:-1]))
    return np.sort(rng.choice(total, size=min(count, total), replace=False))


def _rows(c: _Consumer, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    if c.kind == "conv":
        kh, kw = const_shape(c.weight)[2:]
        return conv_rows(x, c.node, (kh, kw), pos)
    return x.reshape(-1, x.shape[-1])[pos]


def _targets(c: _Consumer, y: np.ndarray, pos: np.ndarray) -> np.ndarray:
    if c.kind == "conv":
        rows = y[pos[:, 0], :, pos[:, 1], pos[:, 2]]
    else:
        rows = y.reshape(-1, y.shape[-1])[pos]
    return rows if c.out_kept is None else rows[:, c.out_kept]


def _weight_matrix(c: _Consumer) -> np.ndarray:
    """The consumer's weight as ``[K, N]`` so that output rows = A @ W."""
    w = const_numpy(c.weight).astype(np.float64)
    if c.kind == "conv":
        return w.reshape(w.shape[0], -1).T
    if c.kind == "gemm":
        w = w.T if _attr(c.node, "transB", 0) else w
        return w * float(_attr(c.node, "alpha", 1.0))
    return w


def _store(c: _Consumer, solution: np.ndarray, fit_bias: bool) -> None:
    w_old = const_numpy(c.weight)
    weights = solution[:-1] if fit_bias else solution
    if c.kind == "conv":
        new = weights.T.reshape(w_old.shape)
    elif c.kind == "gemm":
        new = weights / float(_attr(c.node, "alpha", 1.0))
        new = new.T if _attr(c.node, "transB", 0) else new
    else:
        new = weights
    c.weight.const_value = ir.tensor(new.astype(w_old.dtype), name=c.weight.name)
    if fit_bias and c.bias is not None:
        scale = float(_attr(c.node, "beta", 1.0)) if c.kind == "gemm" else 1.0
        b_old = const_numpy(c.bias)
        c.bias.const_value = ir.tensor((solution[-1] / scale).astype(b_old.dtype), name=c.bias.name)


def _columns(c: _Consumer) -> int:
    """Columns of the consumer's design matrix (input features, plus one for a bias)."""
    shape = list(const_shape(c.weight))
    k = int(np.prod(shape[1:])) if c.kind == "conv" else shape[0]
    if c.kind == "gemm" and _attr(c.node, "transB", 0):
        k = shape[1]
    return k + (1 if c.bias is not None else 0)


def refit_chunks(sizes: Sequence[int], *, passes: int = MAX_PASSES, budget: int = GRAM_BUDGET):
    """Split consumers (the bytes each holds during its pass, in order) into consecutive chunks.

    At most ``ceil(len / passes)`` consumers per chunk, fewer where the chunk's bytes would
    exceed ``budget`` (a consumer larger than the budget gets a chunk of its own).
    """
    per_chunk = max(1, -(-len(sizes) // passes))
    chunks: list[list[int]] = []
    used = 0
    for index, size in enumerate(sizes):
        if not chunks or len(chunks[-1]) >= per_chunk or used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(index)
        used += size
    return chunks


def _s0(c: _Consumer) -> np.ndarray:
    """The un-refit solution ``[K, N]`` (the bias row scaled by Gemm's ``beta``)."""
    w = _weight_matrix(c)
    if c.bias is None:
        return w
    scale = float(_attr(c.node, "beta", 1.0)) if c.kind == "gemm" else 1.0
    return np.vstack([w, scale * const_numpy(c.bias).astype(np.float64)[None]])


def _design(c: _Consumer, a: np.ndarray) -> np.ndarray:
    return np.hstack([a, np.ones((len(a), 1))]) if c.bias is not None else a


def refit_consumers(
    original: ir.Model,
    pruned: ir.Model,
    kept: Mapping[SpaceKey, np.ndarray],
    feeds: Sequence[Mapping[str, np.ndarray]],
    ranks: Mapping[str, int],
    *,
    max_rows: int = MAX_ROWS,
    seed: int = 0,
) -> list[RefitResult]:
    """Refit every consumer of pruned channels in ``pruned`` (in place).

    Rows: ``max_rows / len(feeds)`` random positions (tokens) of every feed. Each refit is
    a ridge toward the un-refit weights, its strength (or no refit) chosen by
    leave-feeds-out cross-validation (:mod:`onnxprune.prune.ridge`).
    """
    names = {v.name for node in original.graph for v in node.outputs if v.name}
    layers = consumers(pruned, kept, ranks, names)
    if not layers or not feeds:
        return []
    per_feed = max(1, max_rows // len(feeds))
    teacher_names = list(dict.fromkeys(c.teacher for c in layers))
    teacher: dict[str, list[np.ndarray]] = {c.target: [] for c in layers}
    sampled: dict[str, list[np.ndarray]] = {c.target: [] for c in layers}
    shapes: dict[str, list[tuple[int, ...]]] = {c.target: [] for c in layers}
    rng = np.random.default_rng(seed)
    for outputs in iter_intermediates(original, teacher_names, feeds):
        for c in layers:
            y = outputs[c.teacher]
            pos = positions(y.shape, c.kind, per_feed, rng)
            sampled[c.target].append(pos)
            shapes[c.target].append(y.shape)
            t = _targets(c, y, pos)
            if c.offset is not None:
                offset = np.broadcast_to(c.offset, (t.shape[1], *y.shape[2:]))
                t = t - offset[:, pos[:, 1], pos[:, 2]].T
            teacher[c.target].append(t.astype(np.float32))
    folds = fold_of(len(feeds))
    # A chunk holds its consumers' sampled input rows (float32); the normal equations of one
    # consumer at a time are built from them when it is solved.
    sizes = [4 * min(max_rows, per_feed * len(feeds)) * _columns(c) for c in layers]
    chunks = _split_at_skips(refit_chunks(sizes), layers)
    logger.info(
        "refit %d consumers in %d passes over %d feeds", len(layers), len(chunks), len(feeds)
    )
    results = []
    with Progress(len(layers), "refit") as bar:
        for chunk in chunks:
            results += _refit_chunk(
                pruned, [layers[i] for i in chunk], feeds, teacher, sampled, shapes, folds
            )
            bar.update(len(chunk))
    return results


def _split_at_skips(chunks: list[list[int]], layers: Sequence[_Consumer]) -> list[list[int]]:
    """Start a new chunk at a consumer whose skip is computed from an earlier consumer of its
    chunk: its target subtracts the skip as the pass saw it, before that consumer's refit,
    and would cancel the same error twice."""
    result: list[list[int]] = []
    for chunk in chunks:
        result.append([])
        for index in chunk:
            c = layers[index]
            earlier = {id(layers[i].node) for i in result[-1]}
            if c.skip is not None and earlier and _computed_from(c, earlier):
                result.append([])
            result[-1].append(index)
    return result


def _computed_from(c: _Consumer, nodes: set[int]) -> bool:
    """Whether ``c``'s skip depends on any of ``nodes`` (by id)."""
    assert c.skip_value is not None
    stack, seen = [c.skip_value.producer()], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        if id(node) in nodes:
            return True
        seen.add(id(node))
        stack += [v.producer() for v in node.inputs if v is not None]
    return False


def _refit_chunk(  # noqa: PLR0917 - private helper of refit_consumers
    pruned: ir.Model,
    layers: Sequence[_Consumer],
    feeds: Sequence[Mapping[str, np.ndarray]],
    teacher: Mapping[str, list[np.ndarray]],
    positions: Mapping[str, list[np.ndarray]],
    shapes: Mapping[str, list[tuple[int, ...]]],
    folds: Sequence[int],
) -> list[RefitResult]:
    """One pass over ``pruned`` for the inputs of ``layers``, then their refits in order.

    The sampled rows are kept per consumer and fold, and each fold's normal equations are
    one product over all its rows: accumulating them feed by feed cost a ``K x K`` update
    per feed and consumer, which dominated on DenseNet-121 with a few dozen feeds.
    """
    rows: list[dict[int, list[np.ndarray]]] = [{} for _ in layers]
    targets: list[list[np.ndarray]] = [list(teacher[c.target]) for c in layers]
    x_names = [name_of(c.node.inputs[0]) for c in layers]
    x_names = list(dict.fromkeys(x_names + [c.skip for c in layers if c.skip is not None]))
    for index, out in enumerate(iter_intermediates(pruned, x_names, feeds)):
        for c, kept, t in zip(layers, rows, targets, strict=True):
            pos = positions[c.target][index]
            a = _rows(c, out[name_of(c.node.inputs[0])], pos)
            kept.setdefault(folds[index], []).append(a.astype(np.float32, copy=False))
            if c.skip is not None:
                shape = _kept_shape(c, shapes[c.target][index], t[index].shape[1])
                t[index] = t[index] - _skip_rows(c, out[c.skip], shape, pos)
    results = []
    for c, kept, t in zip(layers, rows, targets, strict=True):
        results.append(_solve(c, _normal_equations(c, kept, t, folds)))
        kept.clear()  # release the rows as soon as the consumer is solved
        t.clear()
    return results


def _kept_shape(c: _Consumer, shape: tuple[int, ...], width: int) -> tuple[int, ...]:
    axis = 1 if c.kind in ("conv", "gemm") else len(shape) - 1
    return (*shape[:axis], width, *shape[axis + 1 :])


def _skip_rows(c: _Consumer, skip: np.ndarray, shape: tuple[int, ...], pos: np.ndarray):
    """The pruned model's skip at the sampled positions, ``[R, C]`` (float32), broadcast as
    the Add does to ``shape`` (the sum's shape in the original model, channels as kept)."""
    if c.kind == "conv":
        full = np.broadcast_to(skip, shape)
        rows = full[pos[:, 0], :, pos[:, 1], pos[:, 2]]
    else:
        rows = np.broadcast_to(skip, shape).reshape(-1, shape[-1])[pos]
    return rows.astype(np.float32, copy=False)


def _normal_equations(
    c: _Consumer,
    rows: Mapping[int, list[np.ndarray]],
    targets: Sequence[np.ndarray],
    folds: Sequence[int],
) -> Folds:
    """Per-fold ``D^T D``, ``D^T T`` from the consumer's rows (feeds in order per fold)."""
    acc = Folds.zeros(max(folds) + 1, _columns(c), targets[0].shape[1])
    for fold, pieces in rows.items():
        a = np.concatenate(pieces).astype(np.float64)
        t = np.concatenate([t for t, f in zip(targets, folds, strict=True) if f == fold])
        acc.add(fold, _design(c, a), t.astype(np.float64))
    return acc


def _solve(c: _Consumer, acc: Folds) -> RefitResult:
    """Cross-validated ridge toward the un-refit weights; stored only when it helps."""
    chosen = cross_validated_refit(acc, _s0(c))
    refit = not np.isinf(chosen.strength)
    if refit:
        _store(c, chosen.solution, c.bias is not None)
    label = c.node.name or name_of(c.node.outputs[0])
    logger.info(
        "refit %s: held-out relative error %.4f -> %.4f (strength %s, %d rows)",
        label,
        chosen.heldout_before,
        chosen.heldout_after,
        chosen.strength,
        int(acc.rows.sum()),
    )
    return RefitResult(
        label,
        int(acc.rows.sum()),
        chosen.fit_before,
        chosen.fit_after,
        chosen.strength if refit else None,
        chosen.heldout_before,
        chosen.heldout_after,
    )
