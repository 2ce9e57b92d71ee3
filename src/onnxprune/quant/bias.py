"""Bias correction: remove the mean output error that weight quantization adds per channel.

Rounding the weights of output channel ``c`` changes its output by
``e_c = sum_k (w_q[c, k] - w[c, k]) * x_k``. When the rounding errors do not average out
(few weights per channel, depthwise convolutions, weights that round one way), ``e_c`` has a
nonzero mean over the data, ``mu_c = E[y_q,c - y_c]``: a constant offset that the next layers
amplify. A constant is exactly what a bias absorbs, so the correction is ``b'_c = b_c - mu_c``
and, for an int32 bias with scale ``s_b,c = s_x * s_w,c``, ``q'_b,c = q_b,c - round(mu_c /
s_b,c)`` (same scale, the integer kernels stay valid; a shift that would overflow int32 is
skipped). A float bias (left float by the quantizer) is shifted directly.

Measuring ``mu_c``: the quantized model runs with onnxruntime's optimizations on (the integer
kernels users get, as the other checks of the quantizer), the float model alongside it on the
same calibration feeds. The layer's own output cannot be read in the optimized quantized graph
when onnxruntime fuses it away: ``DQ -> Conv -> Relu -> Q`` becomes one QLinearConv, and
exposing ``Conv``'s output as a graph output would block that fusion (the measurement would
then be of the float fallback kernel). So the first tensor that survives the fusion is read:

* Conv/ConvTranspose, and Gemm when its output is quantized, after a single Relu/Clip: the
  output of that QuantizeLinear (``t_quantized``, the fused kernel's own output),
  dequantized here with its scale/zero point, ``t_q = (q - zp) * s`` -- exactly what the
  following DequantizeLinear yields.
* Gemm with a float output, MatMul (QGemm / MatMulIntegerToFloat): the layer's output.

``t_q = Q(a(y_q))`` differs from ``y_q`` by the activation ``a`` and by the output rounding.
The rounding is zero-mean; the activation and the Q range are masked out on the float side:
only positions where the float activation is the identity (``a(y) == y``, e.g. ``y > 0`` for
Relu) and the float value is representable (``qmin < y / s + zp < qmax``) are averaged, where
``t_q - y = y_q - y + rounding`` up to the few positions that the error itself pushes past a
bound. So ``mu_c = sum_mask (t_q - y) / |mask|`` per channel (0 when no position qualifies).

The mask is a function of the float value only. Masking on the quantized value instead
(``qmin < q < qmax``) selects on the error being measured: near the top of the range it keeps
the positions whose error pulled them down and drops those pushed into saturation, near a
Relu knee the reverse, so the mean is biased by the noise mass at the bounds. That was small
with wide ranges and is not with tight ones (mean-minmax puts many values near the top): on
the zoo's MobileNetV2 (512 calibration samples, mean-minmax, held-out eval split) the
corrected model measured 15.32 dB masked on ``q``, 16.51 dB masked on ``y``; a margin
inside the bounds was worse (2 steps 16.04 dB, 8 steps 14.19 dB), no range mask at all
15.20 dB.

MatMul has no bias input: a following ``Add`` of a 1-D float constant over the output
channels is its bias (shifted, read after the Add); a MatMul without one is skipped with the
reason, as is a Conv/Gemm without a bias (adding one would change the graph's structure).

Layers are corrected one at a time in graph order, each measured on the quantized model in
which the layers before it are already corrected. Measuring all layers on one run instead
double-counts: layer ``L``'s measured ``mu`` also holds the mean error inherited from upstream
layers, which their own correction already removes. Measured output SQNR (calibration /
held-out): digits CNN 19.5 / 19.5 dB uncorrected, 14.6 / 14.4 one pass, 23.3 / 23.5
sequential; MobileNetV2 (random weights and inputs) 8.9 / 9.0, -3.3 / -3.3, 10.4 / 9.7.

Noise. ``mu_c`` is estimated from a few calibration feeds; where it is within its own noise
(a classifier calibrated on 32 images sees one position per image), subtracting it moves
the bias by noise that does not generalize: on MobileNetV2 the plain correction raised the
calibration SQNR (12.73 -> 12.95 dB) and lowered the held-out one (12.85 -> 12.70). So each
channel's offset is shrunk by its standard error ``se_c`` (the spread of the per-feed means
over ``sqrt(feeds)``; positions inside a feed are correlated, the feeds are the samples):
``mu_c * max(0, 1 - se_c^2 / mu_c^2)``, a clear offset kept in full, one within its noise
dropped. Measured held-out SQNR without / with (shrunk) correction: MobileNetV2 12.85 /
12.88 dB, ResNet-50 14.71 / 14.86, digits CNN (its real test split) 41.91 / 43.98. The
quantizer's ``auto`` mode also fits on three quarters of the feeds and keeps the correction
only when the held-out quarter improves (:func:`onnxprune.quant.api.quantize_file`).

Cost of the sequential pass. Running the full quantized and float models for every layer
(``truncate=False``) costs, per layer, a serialize + save + session of the whole model and
2 full runs per feed. Instead (the default), both models are cut per layer, step ``k``
measuring layer ``k`` (the machinery is :mod:`onnxprune.quant.segments`):

* Each model runs, per step, only the nodes its targets depend on (float: the layer's
  ``y`` and ``a(y)``; quantized: its measured tensor) back to tensors cached at earlier
  steps, as a small model handed to onnxruntime in memory (nodes and initializers are
  serialized when a cut model needs them; corrected biases are read from the model). The
  two cut models run side by side (a thread each, one onnxruntime thread each), feed by
  feed, and the error is accumulated per feed: no reference tensor is held for all feeds.
* Cached: the tensors a cut model computes that a later step reads (planned from the
  graph: each is dropped after its last reader). Quantized side: only int8 outputs of
  QuantizeLinear nodes read only by DequantizeLinear nodes (fused kernels' own outputs),
  so the graph between the cut and the measured tensor fuses the same way: same kernels,
  same values; a cached tensor downstream of a bias just corrected is dropped (the next
  step runs that layer again, with the new bias). Float side: any tensor except where a
  cut would change onnxruntime's kernels: the float session keeps its optimizations on,
  and a cut tensor enters in the plain layout, so tensors from which an averaging op
  (GlobalAveragePool, AveragePool, Resize, ...) is reached through layout-keeping ops
  (Relu, Add, ...) are not cut (onnxruntime runs it in its blocked NCHWc layout in the full
  model, summing in another order), nor inputs of an Add/Sum fusable with a hidden Conv;
  and every layer's ``y``/``a(y)`` is a graph output wherever computed, as in the full
  model (exposing a Conv's output blocks its fusion with a following op).
* One budget, ``CACHE_BYTES`` (256 MB), for the cached float and int8 tensors of all feeds
  together; when they do not fit, those read soonest are kept and the others recomputed
  from further back (a tiny budget degenerates to cut models starting at the graph
  inputs: still exact). Cached arrays are copied out of onnxruntime's buffers (its outputs
  point into the session's arena, which they would keep alive).

So each layer costs about its own segment on the float side and its own plus the previous
layer's on the quantized side. Checked against the previous implementation (one float run
per window of layers, quantized cuts at measured tensors only): identical corrected
biases (every int32 value) and per-channel offsets (relative difference < 1e-9) on
MobileNetV2 and ResNet-50, identical output bytes on the digits CNN; tests compare with
the full-model path, a budget forcing evictions too.

Measured (``quantize_file``, 32 feeds, minmax, 2 cores shared with other work, so
ranges over repeated runs; the ``bias_correction`` phase includes the SQNR check of the
corrected model), previous implementation -> now: ResNet-50 41.5 s -> 9.5-10.9 s
(``correct_biases`` alone 38 s -> 7.7-9 s), process peak RSS 2265 -> 1170-1188 MB (1133 MB
without bias correction); MobileNetV2 8.1 s -> 3.0-4.7 s (``correct_biases`` 2.4-3.3 s),
1254 -> 585-609 MB (571 without); BERT-style encoder (32 feeds of 16-128 tokens) 19.0 s ->
5.0-5.7 s, 1351 -> 1126-1129 MB. ``correct_biases`` alone adds ~250 MB of peak RSS over
the loaded models (the cache peaks at 227 MB on ResNet-50), less than the quantizer's
earlier phases. SQNR with / without correction unchanged: ResNet-50 15.19 / 14.76 dB,
MobileNetV2 12.95 / 12.73, encoder 29.43 / 28.92, digits CNN 44.56 / 42.33. All feeds are
still used. A cut model over 1 GB of initializers is saved with external data first
(protobuf's 2 GB limit for in-memory models).

Several strengths at once (:func:`correct_bias_variants`, what ``auto`` fits): copies of
the quantized model, one per shrinkage strength, are corrected in the same pass. The float
cut model runs once per layer and feed for all of them (on its worker thread, while the
copies' int8 cut models run in turn), each copy has its own cache key, and one budget holds
all; each copy gets the biases it would get alone (tested byte for byte).

A Gemm followed by Relu and a QuantizeLinear is fused by onnxruntime into one QGemm with an
int8 output, so, as for Conv, that int8 output is read (reading the Gemm's float output
would block the fusion and measure a float Gemm instead of the deployed kernel).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxprune.intermediates import session_with_outputs
from onnxprune.passes._match import const_numpy, const_shape
from onnxprune.quant.placement import _after_activation
from onnxprune.quant.rewrite import values_by_name
from onnxprune.quant.segments import (
    FLOAT,
    QUANT,
    Cache,
    Side,
    downstream,
    float_cuts,
    int8_outputs,
    shared_outputs,
)
from onnxprune.reports import Change, Skip

__all__ = [
    "BIAS_MODES",
    "BiasCorrection",
    "BiasLayer",
    "correct_bias_variants",
    "correct_biases",
    "find_layers",
    "measure_offsets",
]

logger = logging.getLogger(__name__)

BIAS_MODES = ("auto", "on", "off")
_INT32_MAX = 2**31 - 1
_CHANNEL_AXIS = {"Conv": 1, "ConvTranspose": 1, "Gemm": -1, "MatMul": -1}
# Tensors (float and int8, all feeds) kept between the steps of the sequential pass on cut
# models, see the module docstring.
CACHE_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class BiasLayer:
    """A quantized layer whose bias can absorb its mean error.

    Attributes:
        node: Node name (the same in the float and the quantized model).
        op_type: Conv, ConvTranspose, Gemm or MatMul.
        reference: Float model tensor holding the pre-activation output ``y``.
        activated: Float model tensor ``a(y)`` (``reference`` when there is no activation).
        measured: Quantized model tensor read (``t_quantized`` or the layer's output).
        bias_node: Node whose input ``bias_index`` is the bias (the layer, or MatMul's Add).
        bias_index: Input index of the bias on ``bias_node``.
    """

    node: str
    op_type: str
    reference: str
    activated: str
    measured: str
    bias_node: str
    bias_index: int


@dataclasses.dataclass
class BiasCorrection:
    """What :func:`correct_biases` did: a :class:`Change` per corrected layer (``amount``:
    its largest per-channel offset ``max_c |mu_c|``) and a :class:`Skip` per skipped one."""

    changes: list[Change] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)

    @property
    def corrected(self) -> list[str]:
        """The corrected layers, in the order they were corrected."""
        return [c.node for c in self.changes]

    @property
    def largest_offsets(self) -> dict[str, float]:
        """The 10 largest offsets, largest first."""
        amounts = [(c.node, c.amount or 0.0) for c in self.changes]
        return dict(sorted(amounts, key=lambda kv: -kv[1])[:10])

    def to_dict(self) -> dict[str, Any]:
        return {
            "corrected": self.corrected,
            "skipped": [s.to_dict() for s in self.skipped],
            "largest_offsets": self.largest_offsets,
        }


def _matmul_bias(node: ir.Node) -> tuple[ir.Node, int] | None:
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    if other is None:
        return None
    const = other.const_value
    if const is None or other.producer() is not None or len(const.shape) != 1:
        return None
    return add, 1 - uses[0].idx


def find_layers(
    reference: ir.Model, quantized: ir.Model, nodes: Sequence[str]
) -> tuple[list[BiasLayer], list[Skip]]:
    """The correctable layers among quantized ``nodes`` and the skipped ones with reasons."""
    by_name = {n.name: n for n in reference.graph}
    q_values = values_by_name(quantized.graph)
    outputs = {v.name for v in reference.graph.outputs}
    layers: list[BiasLayer] = []
    skipped: list[Skip] = []
    for name in nodes:
        node = by_name[name]
        if node.op_type not in _CHANNEL_AXIS:
            continue
        y = node.outputs[0]
        bias_node, index = node, 2
        if node.op_type == "MatMul":
            found = _matmul_bias(node)
            if found is None:
                skipped.append(Skip(name, "MatMul without a constant bias Add"))
                continue
            bias_node, index = found
            y = bias_node.outputs[0]
        elif len(node.inputs) < 3 or node.inputs[2] is None:
            skipped.append(Skip(name, "no bias input"))
            continue
        activated = y
        measured = y.name or ""
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            after = _after_activation(y, outputs)
            # A Gemm whose (activated) output is quantized runs as one QGemm with an int8
            # output: read that, as for Conv. A Gemm with a float output (a classifier)
            # is read directly.
            if node.op_type != "Gemm" or f"{after.name}_quantized" in q_values:
                activated, measured = after, f"{after.name}_quantized"
        if measured not in q_values:
            skipped.append(Skip(name, f"tensor {measured!r} not in quantized model"))
            continue
        layers.append(
            BiasLayer(
                name,
                node.op_type,
                y.name or "",
                activated.name or "",
                measured,
                bias_node.name or "",
                index,
            )
        )
    return layers, skipped


@dataclasses.dataclass
class _Readout:
    """How to turn the measured tensor into float and which positions are linear."""

    scale: float = 1.0
    zero: int = 0
    qmin: float = -math.inf
    qmax: float = math.inf

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (q.astype(np.float64) - self.zero) * self.scale

    def representable(self, y: np.ndarray) -> np.ndarray:
        """Where the float value ``y`` lies strictly inside the readout's integer range (the
        mask is on the reference, never on the noisy quantized value: see the module
        docstring); everywhere for a float readout."""
        if self.qmax == math.inf:
            return np.ones(y.shape, bool)
        level = y.astype(np.float64) / self.scale + self.zero
        return (level > self.qmin) & (level < self.qmax)


def _readout(quantized: ir.Model, layer: BiasLayer) -> _Readout:
    values = values_by_name(quantized.graph)
    producer = values[layer.measured].producer()
    if producer is None or producer.op_type != "QuantizeLinear":
        return _Readout()
    scale = const_numpy(producer.inputs[1])
    zero = const_numpy(producer.inputs[2])
    info = np.iinfo(zero.dtype)
    return _Readout(float(scale), int(zero), info.min, info.max)


def _channels(array: np.ndarray, axis: int) -> np.ndarray:
    a = np.asarray(array)
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis]) if a.ndim > 1 else a[None]


def _reference_names(layers: Sequence[BiasLayer]) -> list[str]:
    return sorted({n for layer in layers for n in (layer.reference, layer.activated)})


def measure_offsets(
    reference: ort.InferenceSession,
    quantized: ir.Model,
    layers: Sequence[BiasLayer],
    feeds: Sequence[Mapping[str, np.ndarray]],
    evidence: int | None = None,
) -> dict[str, np.ndarray]:
    """``{node: mu_c}``, the masked mean error per output channel (see module docstring).

    ``reference`` is a session of the float model exposing the layers' float tensors.
    """
    ref_names = _reference_names(layers)
    q_names = sorted({layer.measured for layer in layers})
    readouts = {layer.node: _readout(quantized, layer) for layer in layers}
    per_feed: dict[str, _FeedSums] = {layer.node: _FeedSums() for layer in layers}
    with session_with_outputs(quantized, q_names, optimize=True) as session:
        for feed in feeds:
            ref = dict(zip(ref_names, reference.run(ref_names, dict(feed)), strict=True))
            cand = dict(zip(q_names, session.run(q_names, dict(feed)), strict=True))
            sums: dict[str, np.ndarray] = {}
            counts: dict[str, np.ndarray] = {}
            _accumulate(layers, readouts, (ref, cand), (sums, counts))
            for node, total in sums.items():
                per_feed[node].add(total, counts[node])
    return {node: sums.offset(evidence) for node, sums in per_feed.items()}


@dataclasses.dataclass
class _FeedSums:
    """Per-feed sums and counts of the masked error of one layer, per channel."""

    sums: list[np.ndarray] = dataclasses.field(default_factory=list)
    counts: list[np.ndarray] = dataclasses.field(default_factory=list)

    def add(self, total: np.ndarray, count: np.ndarray) -> None:
        self.sums.append(np.asarray(total, np.float64))
        self.counts.append(np.asarray(count, np.int64))

    def offset(self, evidence: int | None = None) -> np.ndarray:
        """``mu_c``, shrunk by its noise: ``mu_c * max(0, 1 - se_c^2 / mu_c^2)``.

        ``se_c`` is the standard error of ``mu_c`` with the feeds as the independent
        samples (positions inside one feed are correlated, so their count would overstate
        the evidence): the spread of the per-feed means over ``sqrt(feeds)``. A channel whose
        mean error is within its noise (the classifier of a model calibrated on 32 images,
        one position per image) is left nearly alone instead of being shifted by noise
        that does not generalize; a clear offset is removed in full. With fewer than 2
        feeds holding the channel, nothing is known about the noise and ``mu_c`` is used.

        ``evidence`` caps the number of feeds counted as independent (``se_c^2 =
        var_c / min(feeds, evidence)``): calibration feeds are rarely independent draws of
        what the model will see (crops of one photo, photos of one source), and an offset
        that varies from feed to feed is the part of the error that does not carry over.
        """
        sums, counts = np.stack(self.sums), np.stack(self.counts)
        total = counts.sum(axis=0)
        mu = np.where(total > 0, sums.sum(axis=0) / np.maximum(total, 1), 0.0)
        seen = counts > 0
        feeds = seen.sum(axis=0)
        means = np.where(seen, sums / np.maximum(counts, 1), 0.0)
        spread = np.where(
            seen, means - np.where(feeds > 0, means.sum(0) / np.maximum(feeds, 1), 0), 0
        )
        var = (spread**2).sum(axis=0) / np.maximum(feeds - 1, 1)
        units = feeds if evidence is None else np.minimum(feeds, evidence)
        se2 = np.where(feeds >= 2, var / np.maximum(units, 1), 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            keep = np.where(mu != 0, np.clip(1.0 - se2 / mu**2, 0.0, 1.0), 0.0)
        return mu * keep


def _accumulate(
    layers: Sequence[BiasLayer],
    readouts: Mapping[str, _Readout],
    values: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]],
    totals: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    """Add one feed's masked error sums and counts per channel to ``totals``."""
    ref, cand = values
    sums, counts = totals
    for layer in layers:
        axis = _CHANNEL_AXIS[layer.op_type]
        y = _channels(ref[layer.reference], axis).astype(np.float64)
        linear = _channels(ref[layer.activated], axis) == y
        readout = readouts[layer.node]
        t_q = readout.dequantize(_channels(cand[layer.measured], axis))
        mask = linear & readout.representable(y) & np.isfinite(y)
        err = np.where(mask, t_q - y, 0.0)
        sums[layer.node] = sums.get(layer.node, 0.0) + err.sum(axis=0)
        counts[layer.node] = counts.get(layer.node, 0) + mask.sum(axis=0)


def _shift_bias(
    quantized: ir.Model,
    layer: BiasLayer,
    offset: np.ndarray,
    changed: list[ir.Value] | None = None,
) -> str | None:
    """Subtract ``offset`` from the layer's bias in place; None, or why it was skipped.

    The rewritten initializer is appended to ``changed`` (when given).
    """
    node = next(n for n in quantized.graph if n.name == layer.bias_node)
    bias = node.inputs[layer.bias_index]
    assert bias is not None
    producer = bias.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        stored, scale_value = producer.inputs[0], producer.inputs[1]
        assert stored is not None and scale_value is not None
        if stored.const_value is None or scale_value.const_value is None:
            return "bias is not a constant"
        q = stored.const_value.numpy().astype(np.int64)
        scale = np.broadcast_to(scale_value.const_value.numpy(), q.shape).astype(np.float64)
        shifted = q - np.round(offset / scale).astype(np.int64)
        if np.max(np.abs(shifted), initial=0) > _INT32_MAX:
            return "corrected int32 bias would overflow"
        target, array = stored, shifted.astype(np.int32)
    elif bias.const_value is not None and producer is None:
        target = bias
        array = (bias.const_value.numpy().astype(np.float64) - offset).astype(np.float32)
    else:
        return "bias is not a constant"
    if len(target.uses()) != 1:
        return "bias is shared with another node"
    if array.shape != const_shape(target):
        return "bias shape does not match the output channels"
    target.const_value = ir.tensor(array, name=target.name)
    if changed is not None:
        changed.append(target)
    return None


def correct_biases(
    reference: ir.Model,
    quantized: ir.Model,
    nodes: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    sequential: bool = True,
    truncate: bool = True,
    evidence: int | None = None,
) -> BiasCorrection:
    """Shift the biases of ``quantized`` (in place) by their measured mean errors.

    Args:
        reference: The float model ``quantized`` was built from (same node names).
        quantized: The QDQ model; modified in place.
        nodes: Quantized primary nodes (the plan's ``nodes``).
        feeds: Calibration feeds.
        sequential: Measure and correct one layer at a time in graph order (one run of
            the quantized model per layer), so each layer only absorbs its own error;
            False measures all layers on one run (faster, but see the module docstring).
        truncate: Sequential only: run, per layer, the float and the quantized model cut
            to the ancestors of the layer's tensors back to tensors cached at earlier
            layers (within ``CACHE_BYTES``, see the module docstring). False runs the full
            models per layer (the original path, same results; kept for checks).
        evidence: At most this many feeds count as independent when an offset is shrunk
            by its standard error (:meth:`_FeedSums.offset`); None: every feed.

    Returns:
        The corrected layers (with their largest offsets) and the skipped ones.
    """
    if sequential and truncate:
        return correct_bias_variants(reference, [quantized], nodes, feeds, [evidence])[0]
    layers, skipped = find_layers(reference, quantized, nodes)
    record = BiasCorrection(skipped=skipped)
    if layers:
        with session_with_outputs(reference, _reference_names(layers), optimize=True) as session:
            for batch in [[layer] for layer in layers] if sequential else [layers]:
                _apply(session, quantized, batch, feeds, record, evidence=evidence)
    _log(record)
    return record


def correct_bias_variants(
    reference: ir.Model,
    quantized: Sequence[ir.Model],
    nodes: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    evidences: Sequence[int | None],
) -> list[BiasCorrection]:
    """:func:`correct_biases` (sequential, on cut models) of several copies of one quantized
    model, copy ``j`` with ``evidences[j]``, in one pass: the float model runs once per
    layer for all of them. Each copy gets exactly the biases :func:`correct_biases` would
    give it alone."""
    layers, skipped = find_layers(reference, quantized[0], nodes)
    records = [BiasCorrection(skipped=list(skipped)) for _ in quantized]
    if layers:
        variants = list(zip(quantized, records, evidences, strict=True))
        stats = _correct_on_cuts(reference, variants, layers, feeds)
        logger.debug("bias correction: cache peak %d bytes", stats["cache_peak_bytes"])
    for record in records:
        _log(record)
    return records


def _log(record: BiasCorrection) -> None:
    logger.info(
        "bias correction: %d layer(s) corrected, %d skipped",
        len(record.changes),
        len(record.skipped),
    )


def _apply(
    reference: ort.InferenceSession,
    quantized: ir.Model,
    batch: Sequence[BiasLayer],
    feeds: Sequence[Mapping[str, np.ndarray]],
    record: BiasCorrection,
    *,
    evidence: int | None,
) -> None:
    """Measure ``batch`` on the current (full) ``quantized`` model and shift its biases."""
    offsets = measure_offsets(reference, quantized, batch, feeds, evidence)
    for layer in batch:
        _record(quantized, layer, offsets[layer.node], record)


def _record(
    quantized: ir.Model,
    layer: BiasLayer,
    offset: np.ndarray,
    record: BiasCorrection,
    changed: list[ir.Value] | None = None,
) -> None:
    """Shift the layer's bias by ``offset`` and note the outcome (the new initializer is
    appended to ``changed``)."""
    why = _shift_bias(quantized, layer, offset, changed)
    if why is not None:
        record.skipped.append(Skip(layer.node, why))
        return
    amount = float(np.max(np.abs(offset), initial=0.0))
    record.changes.append(Change(layer.node, "bias shifted by the mean error", amount))


def _correct_on_cuts(
    reference: ir.Model,
    variants: Sequence[tuple[ir.Model, BiasCorrection, int | None]],
    layers: Sequence[BiasLayer],
    feeds: Sequence[Mapping[str, np.ndarray]],
) -> dict[str, int]:
    """The sequential pass on cut models (see the module docstring) for one or more
    ``(quantized model, record, evidence)`` variants, the float side computed once for all
    of them; returns cache stats."""
    # The float side exposes every layer's tensors wherever computed, as the full-model
    # path does: exposing a tensor blocks onnxruntime's fusions of its producer (a Conv into
    # a following Add, say), which would change the float rounding.
    ref_targets: list[tuple[str, ...]] = [(x.reference, x.activated) for x in layers]
    exposed = {n for t in ref_targets for n in t}
    sides = [Side.build(FLOAT, reference, ref_targets, float_cuts(reference, exposed), exposed)]
    sides += [
        Side.build(QUANT + j, model, [(x.measured,) for x in layers], int8_outputs(model), set())
        for j, (model, _, _) in enumerate(variants)
    ]
    uses = {(FLOAT, n): s for n, s in sides[FLOAT].plan_uses().items()}
    for side in sides[QUANT:]:
        invalidated = [downstream(_bias_value(side.model, layer)) for layer in layers]
        uses.update(((side.key, n), s) for n, s in side.plan_uses(invalidated).items())
    cache = Cache(CACHE_BYTES, uses, len(feeds))
    fixed = all(
        {n: a.shape for n, a in feed.items()} == {n: a.shape for n, a in feeds[0].items()}
        for feed in feeds
    )
    for side in sides:
        side.fixed_shapes = fixed
    evidences = [evidence for _, _, evidence in variants]
    for step, layer in enumerate(layers):
        offsets = _measure_step(sides, cache, step, layer, feeds, evidences=evidences)
        for side, (model, record, _), offset in zip(sides[QUANT:], variants, offsets, strict=True):
            changed: list[ir.Value] = []
            _record(model, layer, offset, record, changed)
            for value in changed:
                cache.invalidate(side.key, downstream(value))
    return {"cache_peak_bytes": cache.peak}


def _bias_value(quantized: ir.Model, layer: BiasLayer) -> ir.Value:
    """The stored bias of ``layer`` (the int32 initializer, or the float bias)."""
    node = next(n for n in quantized.graph if n.name == layer.bias_node)
    value = node.inputs[layer.bias_index]
    assert value is not None
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0]:
        return producer.inputs[0]
    return value


def _measure_step(
    sides: Sequence[Side],
    cache: Cache,
    step: int,
    layer: BiasLayer,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    evidences: Sequence[int | None],
) -> list[np.ndarray]:
    """``mu_c`` of ``layer`` in each quantized side (``sides[1:]``, shrunk with the matching
    ``evidences``): the cut models run feed by feed, the errors accumulated."""
    readouts = [_readout(side.model, layer) for side in sides[QUANT:]]
    axis = _CHANNEL_AXIS[layer.op_type]
    sums = [_FeedSums() for _ in readouts]
    for ref, cands in shared_outputs(sides, step, cache, feeds):
        y = ref[layer.reference]
        linear = None if layer.activated == layer.reference else ref[layer.activated]
        for total, cand, readout in zip(sums, cands, readouts, strict=True):
            total.add(*_masked_error(y, linear, cand[layer.measured], readout, axis))
        del ref, cands
    return [total.offset(e) for total, e in zip(sums, evidences, strict=True)]


def _masked_error(
    y: np.ndarray, activated: np.ndarray | None, measured: np.ndarray, readout: _Readout, axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the sum of ``t_q - y`` over the masked positions and their count.

    The same sums as :func:`_accumulate` (which reads them per element in float64): the
    masked float32 and integer values are summed in float64 / int64 per channel, and
    ``t_q`` is dequantized on the sums (``sum t_q = s * (sum q - zp * count)``).
    ``activated`` None: no activation (every position is linear).
    """
    mask = np.ones(y.shape, bool) if activated is None else activated == y
    y = _finite(y, mask)
    if readout.qmax != math.inf:
        mask &= readout.representable(y)
    else:
        measured = _finite(measured, mask)
    axis = axis % y.ndim
    shape = (math.prod(y.shape[:axis]), y.shape[axis], -1)
    count = mask.view(np.uint8).reshape(shape).sum(axis=2, dtype=np.int64).sum(axis=0)
    exact = np.int64 if measured.dtype.kind in "iu" else np.float64  # integers: exact sums
    t_sum = (measured * mask).reshape(shape).sum(axis=2, dtype=exact).sum(axis=0)
    t_sum = (t_sum.astype(np.float64) - readout.zero * count) * readout.scale
    y_sum = (y * mask).reshape(shape).sum(axis=2, dtype=np.float64).sum(axis=0)
    return t_sum - y_sum, count


def _finite(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``a`` with its non-finite values, removed from ``mask``, set to 0 (``x * 0`` is NaN
    for them)."""
    if a.dtype.kind != "f":
        return a
    finite = np.isfinite(a)
    if finite.all():
        return a
    mask &= finite
    return np.where(finite, a, 0).astype(a.dtype)
