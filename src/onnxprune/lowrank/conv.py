"""Low-rank factorizations of 2-D convolutions, emitted as standard ``Conv`` nodes.

``W`` is ``[O, C, kh, kw]`` (group 1, no ``auto_pad`` other than VALID); the bias always goes
on the last conv. Pads, strides and dilations are split so the chain computes exactly the
original conv at full rank (the first conv never has a bias, so zero padding commutes).

* **spatial** (``k x k -> (k x 1, 1 x k)``): SVD of ``M[(c,i),(o,j)] = W[o,c,i,j]`` =
  ``U S V^T``; ``W1[t,c,i,0] = (U S^{1/2})[(c,i),t]``, ``W2[o,t,0,j] = (S^{1/2} V^T)[t,(o,j)]``.
  Conv 1 takes the vertical pads/stride/dilation, conv 2 the horizontal ones.
  Params ``r (C kh + O kw)`` vs ``O C kh kw``.
* **tucker** (Tucker-2 by HOSVD on the channel modes): ``U_out`` / ``U_in`` are the leading
  left singular vectors of the mode-0 (``[O, C kh kw]``) and mode-1 (``[C, O kh kw]``)
  unfoldings; core ``G = W x_0 U_out^T x_1 U_in^T`` (``[r_out, r_in, kh, kw]``). Emitted as
  ``1x1 (U_in^T) -> kh x kw core (original pads/strides/dilations) -> 1x1 (U_out) + bias``.
  Params ``C r_in + r_out r_in kh kw + r_out O``.
* **separable** (depthwise with channel multiplier ``m``, then 1x1): for each input channel
  ``c`` the slice ``W[:, c]`` as ``[O, kh kw]`` = ``U_c S_c V_c^T``; depthwise filter
  ``c m + t`` is ``S_c[t] V_c[t]`` reshaped to ``kh x kw`` and pointwise weight
  ``P[o, c m + t] = U_c[o, t]``. Exact at ``m = min(O, kh kw)``. Params ``C m (kh kw + O)``.
  The multiplier is not rounded to ``round_to``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxprune.lowrank._candidate import Candidate, Ranks
from onnxprune.lowrank._emit import Step, replace_with_chain
from onnxprune.lowrank._linalg import svd
from onnxprune.lowrank.latency import conv_probe_models
from onnxprune.passes._match import (
    attr,
    const_array,
    drop_if_unused,
    exclusive_const_reason,
    required,
)

__all__ = ["ConvCandidate", "conv_candidate"]


@dataclasses.dataclass
class ConvCandidate(Candidate):
    """A Conv and the precomputed decomposition for its scheme (``kind``)."""

    weight: ir.Value | None = None
    w: np.ndarray | None = None
    factors: tuple[np.ndarray, ...] = ()
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """``(O, C, kh, kw)``."""
        assert self.w is not None
        o, c, kh, kw = self.w.shape
        return o, c, kh, kw

    def rounded(self, ranks: Ranks, multiple: int) -> Ranks:
        return ranks if self.kind == "separable" else super().rounded(ranks, multiple)

    def params(self, ranks: Ranks) -> int:
        o, c, kh, kw = self.dims
        if self.kind == "spatial":
            return ranks[0] * (c * kh + o * kw)
        if self.kind == "tucker":
            r_out, r_in = ranks
            return c * r_in + r_out * r_in * kh * kw + r_out * o
        return c * ranks[0] * (kh * kw + o)

    def chain(self, ranks: Ranks) -> list[tuple[np.ndarray, dict]]:
        """``(weight, attributes)`` of each conv of the factored chain (no ``kernel_shape``)."""
        assert self.w is not None
        specs = getattr(self, f"_{self.kind}")(ranks)
        return [(w.astype(self.w.dtype), a) for w, a in specs]

    def probe_models(self, ranks: Ranks, x_shape: list[int]) -> tuple:
        """Standalone ``(original, factored)`` onnx models of this layer for input ``x_shape``."""
        assert self.w is not None
        dense = (
            self.w,
            {
                "pads": list(self.pads),
                "strides": list(self.strides),
                "dilations": list(self.dilations),
            },
        )
        bias_value = self.node.inputs[2] if len(self.node.inputs) > 2 else None
        bias = const_array(bias_value)
        return conv_probe_models(dense, self.chain(ranks), bias, x_shape)

    def apply(self, graph: ir.Graph, ranks: Ranks) -> str:
        assert self.w is not None and self.weight is not None
        specs = self.chain(ranks)
        bias = list(self.node.inputs[2:3])
        steps = [Step("Conv", w, [], {"kernel_shape": list(w.shape[2:]), **a}) for w, a in specs]
        steps[-1].extra = bias
        replace_with_chain(graph, self.node, required(self.node.inputs[0]), steps, kind=self.kind)
        drop_if_unused(graph, self.weight)
        shapes = " -> ".join("x".join(str(d) for d in w.shape) for w, _ in specs)
        return f"{self.kind} ranks {list(ranks)}: {shapes}"

    def _spatial(self, ranks: Ranks) -> list[tuple[np.ndarray, dict]]:
        o, c, kh, kw = self.dims
        u, s, vt = self.factors
        r = ranks[0]
        root = np.sqrt(s[:r])
        w1 = (u[:, :r] * root).reshape(c, kh, r).transpose(2, 0, 1)[..., None]
        w2 = (root[:, None] * vt[:r]).reshape(r, o, kw).transpose(1, 0, 2)[:, :, None, :]
        (pt, pl, pb, pr), (sh, sw), (dh, dw) = self.pads, self.strides, self.dilations
        return [
            (w1, {"pads": [pt, 0, pb, 0], "strides": [sh, 1], "dilations": [dh, 1]}),
            (w2, {"pads": [0, pl, 0, pr], "strides": [1, sw], "dilations": [1, dw]}),
        ]

    def _tucker(self, ranks: Ranks) -> list[tuple[np.ndarray, dict]]:
        assert self.w is not None
        o, c, _, _ = self.dims
        r_out, r_in = ranks
        u_out, u_in = self.factors[0][:, :r_out], self.factors[1][:, :r_in]
        # G = W x_0 U_out^T x_1 U_in^T, as two tensordots (a naive 6-index einsum is slow).
        core = np.tensordot(u_out.T, self.w.astype(np.float64), axes=(1, 0))
        core = np.tensordot(core, u_in, axes=(1, 0)).transpose(0, 3, 1, 2)
        same = {"pads": list(self.pads), "strides": list(self.strides)}
        return [
            (u_in.T.reshape(r_in, c, 1, 1), {}),
            (core, {**same, "dilations": list(self.dilations)}),
            (u_out.reshape(o, r_out, 1, 1), {}),
        ]

    def _separable(self, ranks: Ranks) -> list[tuple[np.ndarray, dict]]:
        o, c, kh, kw = self.dims
        u, s, vt = self.factors  # [C, O, k], [C, k], [C, k, kh*kw]
        m = ranks[0]
        depthwise = (s[:, :m, None] * vt[:, :m]).reshape(c * m, 1, kh, kw)
        pointwise = u[:, :, :m].transpose(1, 0, 2).reshape(o, c * m, 1, 1)
        same = {"pads": list(self.pads), "strides": list(self.strides)}
        return [
            (depthwise, {**same, "dilations": list(self.dilations), "group": c}),
            (pointwise, {}),
        ]


def _geometry(node: ir.Node, w: np.ndarray) -> tuple[tuple, tuple, tuple] | str:
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad={auto_pad} (run canonicalize or export with explicit pads)"
    if int(attr(node, "group", 1)) != 1:
        return f"grouped conv (group={attr(node, 'group')})"
    pads = tuple(attr(node, "pads", None) or (0, 0, 0, 0)) if auto_pad == "NOTSET" else (0,) * 4
    strides = tuple(attr(node, "strides", None) or (1, 1))
    dilations = tuple(attr(node, "dilations", None) or (1, 1))
    if w.ndim != 4 or len(pads) != 4 or len(strides) != 2 or len(dilations) != 2:
        return f"not a 2-D conv (weight shape {list(w.shape)})"
    return pads, strides, dilations


def _decompose(kind: str, w: np.ndarray) -> tuple[tuple, tuple, Ranks] | str:
    """``(factors, spectra, full ranks)`` of scheme ``kind``, or why it does not apply."""
    o, c, kh, kw = w.shape
    w64 = w.astype(np.float64)
    if kind == "spatial":
        if kh == 1 or kw == 1:
            return f"kernel {kh}x{kw} is already separable in space"
        u, s, vt = svd(w64.transpose(1, 2, 0, 3).reshape(c * kh, o * kw))
        return (u, s, vt), (s,), (len(s),)
    if kind == "tucker":
        if kh == 1 and kw == 1:
            return "1x1 kernel: Tucker-2 needs a spatial kernel (plain SVD applies to 1x1)"
        u_out, s_out, _ = svd(w64.reshape(o, -1))
        u_in, s_in, _ = svd(w64.transpose(1, 0, 2, 3).reshape(c, -1))
        return (u_out, u_in), (s_out, s_in), (len(s_out), len(s_in))
    if kh * kw == 1:
        return "1x1 kernel has no spatial part to make depthwise"
    u, s, vt = np.linalg.svd(w64.transpose(1, 0, 2, 3).reshape(c, o, kh * kw), full_matrices=False)
    # Energy over all channels: keeping multiplier m keeps sum_c sum_{t<m} s[c, t]^2.
    return (u, s, vt), (np.sqrt((s**2).sum(axis=0)),), (s.shape[1],)


def conv_candidate(node: ir.Node, kind: str) -> ConvCandidate | str:
    """A :class:`ConvCandidate` of scheme ``kind`` for ``node``, or why not."""
    value = node.inputs[1] if len(node.inputs) > 1 else None
    w = const_array(value)
    if w is None or value is None:
        return "weight is not a constant"
    reason = exclusive_const_reason(value, node, "weight")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if reason is None and bias is not None and const_array(bias) is None:
        reason = "bias is not a constant"
    geometry = _geometry(node, w)
    if reason or isinstance(geometry, str):
        return reason or str(geometry)
    if w.size == 0:
        return f"weight {value.name!r} has no elements"
    try:
        found = _decompose(kind, w)
    except np.linalg.LinAlgError as exc:
        return f"the decomposition of weight {value.name!r} failed ({exc})"
    if isinstance(found, str):
        return found
    factors, spectra, full = found
    return ConvCandidate(
        node=node,
        kind=kind,
        spectra=spectra,
        full=full,
        dense_params=int(w.size),
        weight=value,
        w=w,
        factors=factors,
        pads=geometry[0],
        strides=geometry[1],
        dilations=geometry[2],
    )
