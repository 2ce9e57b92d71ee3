"""Cross-layer equalization (CLE, Nagel et al. 2019, "Data-Free Quantization").

Rewrites the constant weights of pairs of convolutions ``A -> [activation] -> B`` so that, per
channel ``i`` shared by A's output and B's input, A's output-channel range equals B's
input-channel range. Per-tensor weight quantization then wastes less of the int8 grid on
channels much smaller than the largest one (the usual failure of depthwise convolutions).

A pair is a Conv A (any ``group``, depthwise included) whose output feeds, directly or through
one activation node, exactly one Conv B (any ``group``) at B's data input. A's output and the
activation's output must each have exactly one consumer and must not be graph outputs; both
weights and A's bias (if any) must be constant initializers used by that node only. Anything
else is skipped with the reason in the report.

Math. With ``r1_i = max |W_A[i, ...]|`` (A's output channel ``i``; a grouped A changes nothing
here) and ``r2_i = max |W_B[o, j, ...]|`` over the weights of B that read input channel ``i``
(B has ``g`` groups and ``cin_g = W_B.shape[1]`` input channels per group, so channel ``i`` is
in group ``k = i // cin_g``, at position ``j = i % cin_g``, read by the output channels ``o`` in
``[k * cout_g, (k + 1) * cout_g)``; depthwise is ``cin_g == 1``)::

    s_i = sqrt(r1_i / r2_i)          (s_i = 1 where r1_i or r2_i is 0)
    W_A[i] /= s_i,  b_A[i] /= s_i,  W_B[o, j] *= s_i  (the o, j of channel i),  b_B unchanged

after which ``r1_i == r2_i == sqrt(r1_i * r2_i)``. A's output channel ``i`` becomes
``z_i / s_i``; for a positive-homogeneous activation, ``f(z / s) = f(z) / s`` (``s > 0``), and B
multiplies channel ``i`` back by ``s_i``, so the float model is unchanged (zero padding stays
zero). Positive homogeneous here: no activation, Relu, LeakyRelu and PRelu (any slope: the
sign of ``z / s`` is the sign of ``z``, so each element keeps its branch).

``Clip(z, 0, m)`` is not: in the scaled domain channel ``i`` would need the bound ``m / S_i``
(``S_i`` the pair's accumulated scale), which one Clip cannot hold. ``clip="relax"`` sets the
bound to ``M = max_i m / S_i``, so channel ``i`` now clips at ``M * S_i >= m`` in original
units: exact for every value below ``m`` and for the channel attaining the maximum, and closer
to the original than DFQ's replacement of ReLU6 by Relu. Every such Clip is recorded with its
old and new bound. ``clip="skip"`` skips pairs through a Clip instead. Only Clip with
``min == 0`` given as a constant input (opset >= 11) is accepted; a missing ``max`` is
``+inf``, which is exact and left alone. Any other node between A and B skips the pair.

Chains (``A -> B -> C``) share B: equalizing ``(B, C)`` rescales B's rows, which moves the
ranges ``(A, B)`` had equalized. All pairs are equalized in graph order, repeatedly, until the
largest ``|log s_i|`` of a sweep is below ``tolerance`` or after ``max_iterations`` sweeps. At
that fixed point every pair has ``r1_i == r2_i`` (up to the last sweep's scales, each within
``exp(tolerance)`` of 1). The arithmetic runs in float64; weights are written back in their own
dtype.

Limitations: Conv only (not ConvTranspose, Gemm or MatMul); at most one node between A and B;
a channel with ``r1_i << r2_i`` gets a large ``b_A[i] / s_i`` (DFQ's bias absorption, not done
here, would move it into B).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import const_shape

if TYPE_CHECKING:
    from onnx_ir._core import Usage  # not re-exported by onnx_ir; for annotations only

__all__ = ["CLIP_MODES", "equalize"]

logger = logging.getLogger(__name__)

CLIP_MODES = ("relax", "skip")
_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")


class _SkipError(Exception):
    """A candidate pair cannot be equalized; ``args[0]`` is the reason."""


@dataclasses.dataclass
class _Pair:
    """An equalizable ``A -> [activation] -> B``.

    Attributes:
        producer: Conv A.
        consumer: Conv B.
        activation: The node between them, or None.
        clip_max: The Clip's max value to relax (None when there is nothing to relax).
        scale: Accumulated per-channel scale ``S_i`` (product over sweeps).
        r1_before: A's per-output-channel ranges before the rewrite.
        r2_before: B's per-input-channel ranges before the rewrite.
    """

    producer: ir.Node
    consumer: ir.Node
    activation: ir.Node | None
    clip_max: ir.Value | None
    scale: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(0))
    r1_before: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(0))
    r2_before: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(0))


def _name(node: ir.Node | None) -> str | None:
    return None if node is None else node.name or ""


def _private_constant(value: ir.Value | None, what: str) -> ir.Value:
    """``value`` if it is a constant initializer read by one node only, else :class:`_SkipError`."""
    if value is None:
        raise _SkipError(f"{what} is missing")
    if value.const_value is None or value.producer() is not None:
        raise _SkipError(f"{what} {value.name!r} is not a constant initializer")
    if value.is_graph_input():
        raise _SkipError(f"{what} {value.name!r} is also a graph input")
    if len(value.uses()) != 1:
        raise _SkipError(f"{what} {value.name!r} is shared with another node")
    dtype = value.const_value.dtype
    if not dtype.is_floating_point():
        raise _SkipError(f"{what} {value.name!r} is not floating point ({dtype})")
    return value


def _single_consumer(value: ir.Value, what: str) -> Usage:
    """The one use of ``value``; :class:`_SkipError` when it has several or is a graph output."""
    if value.is_graph_output():
        raise _SkipError(f"{what} {value.name!r} is a graph output")
    uses = list(value.uses())
    if len(uses) != 1:
        raise _SkipError(f"{what} {value.name!r} has {len(uses)} consumers")
    return uses[0]


def _reads_conv(value: ir.Value) -> bool:
    """Whether ``value`` reaches a Conv's data input directly or through one node."""
    for use in value.uses():
        if use.node.op_type == "Conv" and use.idx == 0:
            return True
        outputs = use.node.outputs
        if (
            use.idx == 0
            and outputs
            and any(u.node.op_type == "Conv" and u.idx == 0 for u in outputs[0].uses())
        ):
            return True
    return False


def _static(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant input (initializer or Constant node), None when absent."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    raise _SkipError(f"Clip bound {value.name!r} is not a constant")


def _clip_max(node: ir.Node, clip: str, opset: int) -> ir.Value | None:
    """Check a Clip between A and B; its max value to relax, or None when it is +inf."""
    if clip == "skip":
        raise _SkipError("Clip is not positive homogeneous (clip='skip')")
    if opset < 11:
        raise _SkipError("Clip with attribute bounds (opset < 11)")
    inputs = list(node.inputs) + [None] * 3
    low, high = _static(inputs[1]), _static(inputs[2])
    if low is None or low.size != 1 or float(low.reshape(())) != 0.0:
        raise _SkipError("Clip min is not 0")
    if high is None:
        return None
    if high.size != 1 or not float(high.reshape(())) >= 0.0:
        raise _SkipError("Clip max is not a non-negative scalar")
    if math.isinf(float(high.reshape(()))):
        return None
    max_value = inputs[2]
    assert max_value is not None
    if max_value.is_graph_input():
        raise _SkipError(f"Clip max {max_value.name!r} is a graph input")
    return max_value


def _check_activation(node: ir.Node, clip: str, opset: int) -> ir.Value | None:
    """Validate the node between A and B; the Clip max to relax, if any."""
    if node.op_type in _HOMOGENEOUS:
        return None
    if node.op_type == "Clip":
        return _clip_max(node, clip, opset)
    raise _SkipError(f"activation {node.op_type} is not positive homogeneous")


def _check_channels(producer: ir.Node, consumer: ir.Node) -> None:
    """:class:`_SkipError` unless A's output channels match B's grouped input channels."""
    a_shape = const_shape(producer.inputs[1])
    b_shape = const_shape(consumer.inputs[1])
    group = consumer.attributes.get_int("group", 1)
    if len(a_shape) < 3 or len(b_shape) < 3:
        raise _SkipError("Conv weight has fewer than 3 dimensions")
    if group < 1 or b_shape[0] % group or a_shape[0] != b_shape[1] * group:
        raise _SkipError(
            f"channel mismatch: A has {a_shape[0]} outputs, B reads {b_shape[1]} x {group} groups"
        )
    bias = producer.inputs[2] if len(producer.inputs) > 2 else None
    shape = (a_shape[0],)
    if bias is not None and bias.const_value is not None and tuple(bias.const_value.shape) != shape:
        raise _SkipError("A's bias does not have one value per output channel")


def _match(producer: ir.Node, clip: str, opset: int) -> _Pair:
    """The pair starting at Conv ``producer``, or :class:`_SkipError` with the reason."""
    use = _single_consumer(producer.outputs[0], "output of A")
    activation = None
    clip_max = None
    if use.node.op_type != "Conv":
        activation = use.node
        if use.idx != 0 or len(activation.outputs) != 1:
            raise _SkipError(f"A's output is not the data input of {activation.op_type}")
        clip_max = _check_activation(activation, clip, opset)
        use = _single_consumer(activation.outputs[0], "output of the activation")
    consumer = use.node
    if consumer.op_type != "Conv" or use.idx != 0:
        raise _SkipError(
            f"{consumer.op_type} after the activation is not a Conv reading it as data"
        )
    _private_constant(producer.inputs[1] if len(producer.inputs) > 1 else None, "A's weight")
    _private_constant(consumer.inputs[1] if len(consumer.inputs) > 1 else None, "B's weight")
    if len(producer.inputs) > 2 and producer.inputs[2] is not None:
        _private_constant(producer.inputs[2], "A's bias")
    _check_channels(producer, consumer)
    return _Pair(producer, consumer, activation, clip_max)


def _find_pairs(model: ir.Model, clip: str) -> tuple[list[_Pair], list[dict[str, str | None]]]:
    """Pairs in graph order, and the skipped candidates (A's output reaching a Conv)."""
    opset = model.graph.opset_imports.get("", 1)
    pairs: list[_Pair] = []
    skipped: list[dict[str, str | None]] = []
    for node in model.graph:
        if node.op_type != "Conv" or not node.outputs or not _reads_conv(node.outputs[0]):
            continue
        try:
            pairs.append(_match(node, clip, opset))
        except _SkipError as why:
            skipped.append(
                {"producer": _name(node), "consumer": _consumer_name(node), "reason": str(why)}
            )
    return pairs, skipped


def _consumer_name(producer: ir.Node) -> str | None:
    """B's name when A's output leads to exactly one node (after at most one more)."""
    uses = list(producer.outputs[0].uses())
    if len(uses) != 1:
        return None
    node = uses[0].node
    if node.op_type == "Conv":
        return _name(node)
    after = list(node.outputs[0].uses()) if node.outputs else []
    return _name(after[0].node) if len(after) == 1 else None


def _weight(node: ir.Node) -> ir.Value:
    value = node.inputs[1]
    assert value is not None
    return value


def _bias(node: ir.Node) -> ir.Value | None:
    return node.inputs[2] if len(node.inputs) > 2 else None


def _grouped(w_b: np.ndarray, group: int) -> np.ndarray:
    """``W_B`` as ``[group, cout_g, cin_g, -1]``: axis 2 is the input channel within a group."""
    cout, cin_g = w_b.shape[0], w_b.shape[1]
    return w_b.reshape(group, cout // group, cin_g, -1)


def producer_ranges(w_a: np.ndarray) -> np.ndarray:
    """``r1_i = max |W_A[i, ...]|`` per output channel of A."""
    return np.abs(w_a.reshape(w_a.shape[0], -1)).max(axis=1)


def consumer_ranges(w_b: np.ndarray, group: int) -> np.ndarray:
    """``r2_i``: the largest ``|W_B|`` over the weights of B reading input channel ``i``."""
    return np.abs(_grouped(w_b, group)).max(axis=(1, 3)).reshape(-1)


def channel_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """``s_i = sqrt(r1_i / r2_i)``, 1 where either range is 0 (or not finite)."""
    ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(r1 / r2)
    return np.where(ok, s, 1.0)


class _Arrays:
    """float64 working copies of the weights and biases, written back once at the end."""

    def __init__(self, pairs: Sequence[_Pair]) -> None:
        self.values: dict[str, ir.Value] = {}
        self.arrays: dict[str, np.ndarray] = {}
        for pair in pairs:
            for value in (_weight(pair.producer), _bias(pair.producer), _weight(pair.consumer)):
                if value is not None and value.name not in self.values:
                    assert value.const_value is not None and value.name is not None
                    self.values[value.name] = value
                    self.arrays[value.name] = value.const_value.numpy().astype(np.float64)

    def __getitem__(self, value: ir.Value) -> np.ndarray:
        return self.arrays[value.name or ""]

    def __setitem__(self, value: ir.Value, array: np.ndarray) -> None:
        self.arrays[value.name or ""] = array

    def write_back(self) -> None:
        for name, value in self.values.items():
            assert value.const_value is not None
            dtype = value.const_value.dtype.numpy()
            array = np.ascontiguousarray(self.arrays[name].astype(dtype))
            value.const_value = ir.tensor(array, name=name)


def _ranges(pair: _Pair, arrays: _Arrays) -> tuple[np.ndarray, np.ndarray]:
    group = pair.consumer.attributes.get_int("group", 1)
    w_a, w_b = arrays[_weight(pair.producer)], arrays[_weight(pair.consumer)]
    return producer_ranges(w_a), consumer_ranges(w_b, group)


def _equalize_pair(pair: _Pair, arrays: _Arrays) -> float:
    """One CLE step on ``pair`` (see module docstring); returns the largest ``|log s_i|``."""
    r1, r2 = _ranges(pair, arrays)
    s = channel_scales(r1, r2)
    weight_a, weight_b = _weight(pair.producer), _weight(pair.consumer)
    w_a = arrays[weight_a]
    arrays[weight_a] = w_a / s.reshape((-1,) + (1,) * (w_a.ndim - 1))
    bias = _bias(pair.producer)
    if bias is not None:
        arrays[bias] = arrays[bias] / s
    w_b = arrays[weight_b]
    group = pair.consumer.attributes.get_int("group", 1)
    grouped = _grouped(w_b, group) * s.reshape(group, 1, -1, 1)
    arrays[weight_b] = grouped.reshape(w_b.shape)
    pair.scale = pair.scale * s
    return float(np.max(np.abs(np.log(s)), initial=0.0))


def _spread(r: np.ndarray) -> float:
    """``max(r) / min(r)`` over the nonzero channel ranges (1.0 when none is nonzero)."""
    nonzero = r[(r > 0) & np.isfinite(r)]
    return float(nonzero.max() / nonzero.min()) if nonzero.size else 1.0


def _set_clip_max(clip: ir.Node, value: ir.Value, array: np.ndarray) -> None:
    """Give ``clip`` the max ``array``: in place when ``value`` is its private initializer,
    else (a shared constant, a Constant node) as a new initializer of its own."""
    private = value.const_value is not None and value.producer() is None
    if private and len(value.uses()) == 1:
        value.const_value = ir.tensor(array, name=value.name)
        return
    graph = clip.graph
    assert graph is not None
    name, k = f"{clip.name or value.name}_max_equalized", 0
    while name in graph.initializers:
        k += 1
        name = f"{clip.name or value.name}_max_equalized_{k}"
    tensor = ir.tensor(array, name=name)
    # ir.tensor builds an ir.Tensor, whose shape is an ir.Shape (typed as the protocol)
    shape = cast(ir.Shape, tensor.shape)
    fresh = ir.Value(name=name, shape=shape, type=ir.TensorType(tensor.dtype))
    fresh.const_value = tensor
    graph.register_initializer(fresh)
    clip.replace_input_with(2, fresh)
    if value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if producer is not None:  # a Constant node no one reads any more
        graph.remove(producer, safe=True)
    elif value.name is not None and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def _relax_clip(pair: _Pair) -> dict[str, Any] | None:
    """Set the Clip max to ``M = max_i m / S_i``; the report entry, None without a Clip."""
    if pair.clip_max is None or pair.activation is None:
        return None
    before = _static(pair.clip_max)
    assert before is not None
    m = float(before.reshape(()))
    relaxed = float(np.max(m / pair.scale, initial=m))
    array = np.asarray(relaxed, dtype=before.dtype).reshape(before.shape)
    _set_clip_max(pair.activation, pair.clip_max, array)
    return {
        "node": _name(pair.activation),
        "producer": _name(pair.producer),
        "max_before": m,
        "max_after": float(array.reshape(())),
    }


def _pair_entry(pair: _Pair, arrays: _Arrays) -> dict[str, Any]:
    r1, r2 = _ranges(pair, arrays)
    return {
        "producer": _name(pair.producer),
        "consumer": _name(pair.consumer),
        "activation": None if pair.activation is None else pair.activation.op_type,
        "channels": int(r1.size),
        "producer_spread_before": _spread(pair.r1_before),
        "consumer_spread_before": _spread(pair.r2_before),
        "producer_spread_after": _spread(r1),
        "consumer_spread_after": _spread(r2),
        "scale_min": float(pair.scale.min(initial=1.0)),
        "scale_max": float(pair.scale.max(initial=1.0)),
    }


def _sweep(
    pairs: Sequence[_Pair], arrays: _Arrays, max_iterations: int, tolerance: float
) -> tuple[int, bool]:
    """Equalize all pairs in order until a sweep's largest ``|log s|`` < ``tolerance``.

    Returns:
        The number of sweeps and whether the last one was below ``tolerance``.
    """
    for iteration in range(1, max_iterations + 1):
        largest = max(_equalize_pair(pair, arrays) for pair in pairs)
        if largest < tolerance:
            return iteration, True
    return max_iterations, False


def equalize(
    model: ir.Model,
    *,
    clip: str = "relax",
    max_iterations: int = 20,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Apply cross-layer equalization to ``model`` in place (see the module docstring).

    Args:
        model: The model; its Conv weights, biases and relaxed Clip bounds are replaced.
        clip: ``"relax"`` (raise the max of a ``Clip(0, m)`` between A and B to
            ``max_i m / S_i``) or ``"skip"`` (leave pairs through a Clip alone).
        max_iterations: At most this many sweeps over all pairs.
        tolerance: Stop after a sweep whose largest ``|log s_i|`` is below this.

    Returns:
        A JSON-serializable report: ``{"pairs": [{producer, consumer, activation, channels,
        producer_spread_before/after, consumer_spread_before/after, scale_min, scale_max}],
        "iterations": n, "converged": bool, "relaxed_clips": [{node, producer, max_before,
        max_after}], "skipped": [{producer, consumer, reason}]}``. A spread is
        ``max_i r_i / min_i r_i`` over the nonzero per-channel ranges: ``r1`` (A's output
        channels) for ``producer_*``, ``r2`` (B's input channels) for ``consumer_*``; after
        equalization both equal the spread of ``sqrt(r1 * r2)``. ``S_i`` (``scale_*``) is the
        accumulated factor A's channel ``i`` was divided by.
    """
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, not {clip!r}")
    pairs, skipped = _find_pairs(model, clip)
    arrays = _Arrays(pairs)
    for pair in pairs:
        pair.r1_before, pair.r2_before = _ranges(pair, arrays)
        pair.scale = np.ones_like(pair.r1_before)
    iterations, converged = _sweep(pairs, arrays, max_iterations, tolerance) if pairs else (0, True)
    arrays.write_back()
    relaxed = [entry for entry in map(_relax_clip, pairs) if entry is not None]
    logger.info(
        "cross-layer equalization: %d pair(s), %d sweep(s), %d skipped",
        len(pairs),
        iterations,
        len(skipped),
    )
    return {
        "pairs": [_pair_entry(pair, arrays) for pair in pairs],
        "iterations": iterations,
        "converged": converged,
        "relaxed_clips": relaxed,
        "skipped": skipped,
    }
