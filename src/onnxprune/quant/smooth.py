"""SmoothQuant: move activation outliers into the weights of the MatMuls that read them.

For a float activation ``X [..., K]`` read (as the left operand) by MatMuls with constant
weights ``W_j [K, N_j]``, with per-channel calibration maxima ``a_k = max |X[..., k]|`` and
``w_k = max_j max_n |W_j[k, n]|``::

    s_k = a_k^alpha / w_k^(1 - alpha)          (clipped to [1e-5, 1e5]; 1 where a_k or w_k is 0)
    X' = X * (1 / s)      (a new Mul, so other readers of X, e.g. residual Adds, keep X)
    W_j' = diag(s) W_j

``X' W_j' = X W_j`` exactly in real arithmetic, so the float model is unchanged, while ``X'``
has flatter channels and quantizes per tensor with less error. Weights shared with other
nodes are left alone (the tensor is skipped, with the reason recorded).

When ``X`` is the output of a LayerNormalization over its last axis read only by these
MatMuls (the Q/K/V and first FFN inputs of a transformer), ``1 / s`` is folded into its
constant scale and bias instead (``LN(x) * g / s + b / s``): no Mul is added (pre-LN
transformers). In a post-LN encoder (BERT, our reference encoder) the LayerNorm output is
also the residual input of the next block, so it keeps the Mul, as do the inputs after GELU
and the attention context.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.intermediates import iter_intermediates

__all__ = ["smooth_matmuls"]

logger = logging.getLogger(__name__)

_CLIP = (1e-5, 1e5)


def _weight(node: ir.Node) -> ir.Value | None:
    """The constant 2-D weight of a MatMul used by that node only, else None."""
    if node.op_type != "MatMul" or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or w.producer() is not None:
        return None
    if len(w.shape or ()) != 2 or len(w.uses()) != 1:
        return None
    return w


def _candidates(model: ir.Model) -> dict[str, list[ir.Node]]:
    """Activation name -> MatMuls reading it with a private constant weight."""
    found: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        x = node.inputs[0] if node.inputs else None
        if _weight(node) is not None and x is not None and x.name and x.const_value is None:
            found.setdefault(x.name, []).append(node)
    return found


def _channel_max(
    model: ir.Model, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    peaks: dict[str, np.ndarray] = {}
    for values in iter_intermediates(model, names, feeds):
        for name, array in values.items():
            a = np.abs(array.reshape(-1, array.shape[-1]).astype(np.float32))
            a[~np.isfinite(a)] = 0.0
            peak = a.max(axis=0)
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    return peaks


def smooth_matmuls(
    model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], alpha: float = 0.5
) -> dict[str, object]:
    """Apply SmoothQuant in place (see module docstring); returns a report."""
    candidates = _candidates(model)
    if not candidates:
        return {"smoothed": [], "alpha": alpha}
    peaks = _channel_max(model, list(candidates), feeds)
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    smoothed: list[str] = []
    folded_into: list[str] = []
    for name, nodes in candidates.items():
        weights = [_weight(n) for n in nodes]
        arrays = [w.const_value.numpy() for w in weights if w is not None and w.const_value]
        a = peaks[name].astype(np.float64)
        if any(x.size == 0 for x in arrays):  # a zero-size weight has nothing to balance
            continue
        w_max = np.max(np.stack([np.abs(x).max(axis=1) for x in arrays]), axis=0)
        if a.shape != w_max.shape:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.power(a, alpha) / np.power(w_max, 1.0 - alpha)
        s = np.where((a > 0) & (w_max > 0), np.clip(s, *_CLIP), 1.0)
        folded = _fold_into_layernorm(values[name], nodes, 1.0 / s)
        if folded is not None:
            _scale_weights(weights, arrays, s)
            smoothed.append(name)
            folded_into.append(folded)
            continue
        inv = ir.val(
            f"{name}_smooth_inv",
            ir.DataType.FLOAT,
            [len(s)],
            const_value=ir.tensor((1.0 / s).astype(np.float32), name=f"{name}_smooth_inv"),
        )
        model.graph.register_initializer(inv)
        out = ir.val(f"{name}_smoothed", ir.DataType.FLOAT, values[name].shape)
        mul = ir.node("Mul", [values[name], inv], outputs=[out], name=f"{name}_Smooth")
        model.graph.insert_before(nodes[0], mul)
        for node in nodes:
            node.replace_input_with(0, out)
        _scale_weights(weights, arrays, s)
        smoothed.append(name)
    logger.info("SmoothQuant (alpha %.2f): %d activation(s) smoothed", alpha, len(smoothed))
    return {"smoothed": smoothed, "folded_into_layernorm": folded_into, "alpha": alpha}


def _scale_weights(
    weights: Sequence[ir.Value | None], arrays: Sequence[np.ndarray], s: np.ndarray
) -> None:
    """``W_j' = diag(s) W_j`` in place."""
    for weight, array in zip(weights, arrays, strict=True):
        assert weight is not None
        scaled = (array.astype(np.float64) * s[:, None]).astype(np.float32)
        weight.const_value = ir.tensor(scaled, name=weight.name)


def _private_constant(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.const_value is not None
        and value.producer() is None
        and not value.is_graph_input()
        and len(value.uses()) == 1
    )


def _fold_into_layernorm(x: ir.Value, readers: Sequence[ir.Node], inv: np.ndarray) -> str | None:
    """Scale the LayerNormalization producing ``x`` by ``inv`` per channel; its name, or
    None when ``x`` is not such an output read by ``readers`` only (then a Mul is needed)."""
    ln = x.producer()
    if ln is None or ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx"):
        return None
    if ln.outputs[0] is not x or x.is_graph_output() or len(x.uses()) != len(readers):
        return None
    if {id(u.node) for u in x.uses()} != {id(n) for n in readers}:
        return None
    rank = len(x.shape) if x.shape is not None else None
    axis = ln.attributes.get_int("axis", -1)
    if not (axis == -1 or (rank is not None and axis == rank - 1)):
        return None
    scale = ln.inputs[1] if len(ln.inputs) > 1 else None
    bias = ln.inputs[2] if len(ln.inputs) > 2 else None
    params = [v for v in (scale, bias) if v is not None]
    if not _private_constant(scale) or not all(_private_constant(v) for v in params):
        return None
    if any(v.const_value.shape != (inv.size,) for v in params):  # type: ignore[union-attr]
        return None
    for value in params:
        array = value.const_value.numpy().astype(np.float64) * inv  # type: ignore[union-attr]
        value.const_value = ir.tensor(array.astype(np.float32), name=value.name)
    return ln.name or x.name or ""
