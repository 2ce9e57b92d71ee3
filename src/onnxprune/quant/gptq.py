"""Error-compensating rounding of int8 weights (GPTQ / OBQ), closed form, scales fixed.

Rounding each weight to its nearest step is optimal per weight, not for the layer's output.
For a layer ``y = W x`` whose inputs on calibration data have the second moment
``H = E[x x^T]`` (over samples and positions; for a convolution ``x`` is the im2col patch
of one output position, per group), the output error of a weight perturbation ``dW`` of one
output channel ``w`` is ``dw^T H dw``. GPTQ (Frantar et al., 2023, after Optimal Brain
Quantization) rounds the columns of ``W`` one at a time and spreads each column's rounding
error over the columns not yet rounded, in the way that minimizes that quadratic form:
with ``U`` the upper Cholesky factor of ``H^-1``,

    q_j = clip(round(w_j / s), qmin, qmax)
    e_j = (w_j - s q_j) / U_jj
    w_k <- w_k - e_j U_jk            for k > j

(done in blocks of columns, the far columns updated once per block with one matrix
product). ``H`` is damped by ``0.01 * mean(diag H)`` and an input that is zero on every
calibration sample gets ``H_jj = 1``: its weights keep the plain rounding and nothing is
pushed into or out of them. All output channels of a group share ``H`` and are rounded
together; depthwise convolutions have one ``K x K`` moment per channel (``K = kh * kw``).
Layers that read the same input the same way (a transformer's q, k and v projections) share
one moment, computed once.

What stays fixed: the scales and zero points (so int32 biases and the u8s8 remedy's scales
are untouched), the graph. What changes: the int8 values of each weight, within
``[qmin, qmax]``. Where the u8s8 saturation remedy bounds adjacent pairs (``coarsen``,
``reduce-range``), a channel whose error-compensated rounding would create a saturating pair
keeps its plain rounding. A layer keeps its plain rounding when its calibration rows
(samples x positions) are fewer than its fan-in (``H`` would be rank-deficient and the
compensation fitted to noise), when its weight is shared by several nodes, or when its
kind is not covered (ConvTranspose, Conv other than 1-D/2-D, MatMul with a batched weight).

Inputs ``x`` are the float model's (GPTQ's choice; the int8 model's own inputs would fold
upstream activation noise into the fit, which did not carry over to unseen data in the
learned rounding of :mod:`onnxprune.quant.refine`). Rows are sampled per feed and layer with
a fixed seed, so the result is reproducible.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.intermediates import budget_chunks, iter_intermediates
from onnxprune.progress import Progress
from onnxprune.quant.params import QParams, quantize
from onnxprune.quant.placement import WeightUse
from onnxprune.quant.rewrite import WeightRounder, values_by_name
from onnxprune.quant.vnni import saturating_channels

__all__ = ["DAMPING", "WeightMoments", "collect_moments", "gptq_round"]

logger = logging.getLogger(__name__)

DAMPING = 0.01
_ROWS_PER_FEED = 512
_BLOCK = 128
_PAIR_REMEDIES = ("coarsen", "reduce-range")


@dataclasses.dataclass(frozen=True)
class _Layer:
    """How a weight's layer turns its input into rows: kind, conv geometry, groups (layers
    equal in all of these read the same rows and share one moment)."""

    op_type: str
    input: str
    groups: int
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()


def _ints(node: ir.Node, name: str, default: Sequence[int]) -> tuple[int, ...]:
    attr = node.attributes.get(name)
    return tuple(int(v) for v in attr.as_ints()) if attr is not None else tuple(default)


def _layer(node: ir.Node, weight: np.ndarray) -> _Layer | None:
    """The layer of ``node`` if its kind is covered (see the module docstring)."""
    source = node.inputs[0]
    if source is None or not source.name:
        return None
    if node.op_type == "Conv" and weight.ndim in (3, 4):
        spatial = weight.ndim - 2
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None
        return _Layer(
            "Conv",
            source.name,
            node.attributes.get_int("group", 1),
            tuple(int(k) for k in weight.shape[2:]),
            _ints(node, "strides", [1] * spatial),
            _ints(node, "pads", [0] * (2 * spatial)),
            _ints(node, "dilations", [1] * spatial),
        )
    if node.op_type in ("MatMul", "Gemm") and weight.ndim == 2:
        trans_a = node.attributes.get("transA")
        if node.op_type == "Gemm" and trans_a is not None and trans_a.as_int():
            return None
        return _Layer(node.op_type, source.name, 1)
    return None


def _rows(
    layer: _Layer, x: np.ndarray, rng: np.random.Generator, limit: int = _ROWS_PER_FEED
) -> np.ndarray:
    """``x`` as rows of the layer's inputs: ``(groups, rows, K)`` in ``x``'s precision (at
    least float32: each feed's product runs in single precision, 2x faster than double,
    and the sums over feeds in float64), at most
    ``limit`` rows (positions drawn with ``rng`` without replacement, in order, when there
    are more; only those are converted).

    A Conv's im2col patches are gathered at the drawn positions only (building every
    position's patch and then sampling cost as much as the moments themselves)."""
    if layer.op_type != "Conv":
        rows = x.reshape(1, -1, x.shape[-1])
        return rows[:, _pick(rows.shape[1], rng, limit)].astype(_working(x))
    spatial = len(layer.kernel)
    lo, hi = layer.pads[:spatial], layer.pads[spatial:]
    padded = np.pad(x, [(0, 0), (0, 0), *zip(lo, hi, strict=True)])
    n, channels = padded.shape[:2]
    outs = [
        (padded.shape[2 + i] - layer.dilations[i] * (layer.kernel[i] - 1) - 1) // layer.strides[i]
        + 1
        for i in range(spatial)
    ]
    batch, *places = np.unravel_index(_pick(n * math.prod(outs), rng, limit), (n, *outs))
    last = np.ascontiguousarray(np.moveaxis(padded, 1, -1))  # channels last: one gather per tap
    taps = []
    for offset in np.ndindex(*layer.kernel):
        spots = zip(places, layer.strides, offset, layer.dilations, strict=True)
        index = (batch, *(p * s + o * d for p, s, o, d in spots))
        taps.append(last[index])
    cols = np.stack(taps, axis=-1)  # (R, C, taps)
    g = layer.groups
    rows = cols.reshape(len(batch), g, (channels // g) * len(taps)).astype(_working(x))
    return np.moveaxis(rows, 1, 0)


def _working(x: np.ndarray) -> np.dtype:
    """float64 for float64 inputs, else float32."""
    return np.dtype(np.float64 if x.dtype == np.float64 else np.float32)


def _pick(total: int, rng: np.random.Generator, limit: int) -> np.ndarray:
    """Row indices: all of ``total``, or ``limit`` of them drawn without replacement, sorted."""
    if total <= limit:
        return np.arange(total)
    return np.sort(rng.choice(total, limit, False))


class WeightMoments:
    """Per weight initializer, the input second moment ``H = sum x x^T`` of its layer."""

    def __init__(self) -> None:
        self.moments: dict[str, np.ndarray] = {}
        self.skipped: dict[str, str] = {}

    def rounder(self, remedy: str) -> WeightRounder:
        """:meth:`round` under the u8s8 ``remedy``, for :func:`~.rewrite.apply_plan`."""
        return functools.partial(self.round, remedy=remedy)

    def round(
        self, use: WeightUse, array: np.ndarray, params: QParams, *, remedy: str
    ) -> np.ndarray:
        """The int8 values of ``array`` under ``params``: error-compensated where a moment
        was collected, plain rounding otherwise (and per channel where compensation would
        create a saturating u8s8 pair under a pair-bounding remedy)."""
        plain = quantize(array, params)
        op_type = use.op_type
        moment = self.moments.get(use.weight)
        if moment is None or params.axis is None or params.zero_point.any():
            return plain
        axis = params.axis
        moved = np.moveaxis(np.asarray(array, np.float64), axis, 0)
        out = moved.shape[0]
        groups = moment.shape[0]
        w = moved.reshape(groups, out // groups, -1)
        scale = params.scale.astype(np.float64).reshape(groups, out // groups)
        q = gptq_round(w, moment, scale, params.qmin, params.qmax)
        result = np.moveaxis(q.reshape(moved.shape), 0, axis).astype(plain.dtype)
        if remedy in _PAIR_REMEDIES:
            bad = saturating_channels(result, axis, op_type) & ~saturating_channels(
                plain, axis, op_type
            )
            if bad.any():
                index = [slice(None)] * result.ndim
                index[axis] = bad
                result[tuple(index)] = plain[tuple(index)]
        return result


def collect_moments(
    model: ir.Model,
    weights: Sequence[WeightUse],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    seed: int = 0,
) -> WeightMoments:
    """Input moments of the layers of ``weights`` on ``feeds`` (float model ``model``)."""
    result = WeightMoments()
    values = values_by_name(model.graph)
    nodes = {node.name: node for node in model.graph}
    users = collections.Counter(use.weight for use in weights)
    layers: dict[str, _Layer] = {}
    for use in weights:
        if users[use.weight] > 1:
            result.skipped[use.weight] = "weight shared by several nodes"
            continue
        const = values[use.weight].const_value
        node = nodes.get(use.node)
        layer = None if const is None or node is None else _layer(node, const.numpy())
        if layer is None:
            result.skipped[use.weight] = f"{use.op_type} of this form not covered"
            continue
        layers[use.weight] = layer
    inputs = sorted({layer.input for layer in layers.values()})
    if not inputs:
        return result
    by_input: dict[str, list[_Layer]] = {}
    for layer in dict.fromkeys(layers.values()):
        by_input.setdefault(layer.input, []).append(layer)
    moments: dict[_Layer, np.ndarray] = {}
    rows_seen: dict[_Layer, int] = {}
    rng = np.random.default_rng(seed)
    chunks = budget_chunks(model, inputs, feeds)
    with Progress(len(chunks) * len(feeds), "input moments") as bar:
        for chunk in chunks:
            for tensors in iter_intermediates(model, chunk, feeds):
                for name in chunk:
                    x = tensors[name]
                    for layer in by_input[name]:
                        rows = _rows(layer, x, rng)
                        h = np.matmul(rows.transpose(0, 2, 1), rows)
                        if layer in moments:
                            moments[layer] += h
                        else:
                            moments[layer] = h.astype(np.float64)
                        rows_seen[layer] = rows_seen.get(layer, 0) + rows.shape[1]
                bar.update()
    for weight, layer in layers.items():
        moment, count = moments[layer], rows_seen[layer]
        if count < moment.shape[-1]:
            result.skipped[weight] = f"{count} calibration rows for fan-in {moment.shape[-1]}"
        else:
            result.moments[weight] = moment
    return result


def gptq_round(
    weight: np.ndarray,
    moment: np.ndarray,
    scale: np.ndarray,
    qmin: int,
    qmax: int,
    *,
    damping: float = DAMPING,
    block: int = _BLOCK,
) -> np.ndarray:
    """Integer values for ``weight`` ``(groups, out, K)`` minimizing, per output row,
    ``(w - s q)^T H (w - s q)`` greedily column by column (see the module docstring).

    ``moment`` is ``(groups, K, K)``, ``scale`` ``(groups, out)`` (one step per row).
    """
    w = np.array(weight, np.float64)
    h = np.array(moment, np.float64)
    groups, _, k = w.shape
    diag = np.einsum("gii->gi", h)
    dead = diag <= 0
    eye = np.eye(k)
    mean = np.where(dead, 0.0, diag).sum(axis=1) / np.maximum((~dead).sum(axis=1), 1)
    h = h + (damping * np.maximum(mean, 1e-30))[:, None, None] * eye
    for g in range(groups):
        idx = np.flatnonzero(dead[g])
        h[g][idx, :] = 0.0
        h[g][:, idx] = 0.0
        h[g][idx, idx] = 1.0
    upper = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h)), 1, 2)
    step = scale[:, :, None]
    q = np.zeros_like(w)
    for start in range(0, k, block):
        stop = min(start + block, k)
        part = w[:, :, start:stop].copy()
        errors = np.zeros_like(part)
        u = upper[:, start:stop, start:stop]
        for j in range(stop - start):
            column = part[:, :, j]
            rounded = np.clip(np.round(column / step[:, :, 0]), qmin, qmax)
            q[:, :, start + j] = rounded
            err = (column - rounded * step[:, :, 0]) / u[:, j, j][:, None]
            part[:, :, j:] -= err[:, :, None] * u[:, None, j, j:]
            errors[:, :, j] = err
        w[:, :, stop:] -= errors @ upper[:, start:stop, stop:]
    return q
