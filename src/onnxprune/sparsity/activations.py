"""Input statistics of weight layers on calibration data, with bounded memory.

For a layer viewed as ``y = W x`` with ``x`` in ``R^K`` (see :mod:`onnxprune.sparsity.layers`),
the calibration set gives rows ``X[n, K]``: the tokens of a MatMul/Gemm input reshaped to
``[-1, K]``, the im2col patches of a Conv input (column order ``(i, j, c)``, matching the
weight view), or the pixels of a ConvTranspose input. Accumulated in float64 over samples:

* ``sq[k] = sum_n X[n, k]^2`` (so ``||x_k||_2 = sqrt(sq[k])``, used by Wanda);
* ``gram = X^T X`` (``K x K``, only when asked for; used by the OBS update);
* ``cross = X^T X_ref`` (``K x K``, only with a ``reference`` model): ``X_ref`` are the
  same rows taken from the reference (dense) model on the same feeds, so the update can
  aim at the dense model's layer output ``W x_ref`` instead of ``W x`` (it then corrects
  the error that layers pruned earlier left in ``x``).
* with ``holdout``, the same sums once more over the rows of the held-out feeds only
  (:func:`is_held`: every fourth pair of consecutive feeds), plus ``X_ref^T X_ref`` there:
  the update's dampening is chosen by its error on those feeds (:mod:`.damping`). The
  totals still hold every row; the fit part is the total minus the held-out part.

Memory is bounded: :func:`collect_stats` reads the needed intermediate values with
:func:`onnxprune.intermediates.iter_intermediates` (a temporary copy of the model with them
as extra outputs, streamed one feed at a time; the sequential update reads them from cut
models instead, :mod:`onnxprune.sparsity.sequential`, and sums them with
:func:`accumulate_stats`), and a Conv keeps at most ``max_rows`` patch positions per sample
(chosen by a seeded generator, so results are reproducible). Layers reading the same value
with the same view (Q/K/V projections) share one statistic.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.intermediates import iter_intermediates
from onnxprune.sparsity.layers import WeightLayer

__all__ = [
    "HeldOut",
    "InputStats",
    "accumulate_stats",
    "collect_stats",
    "is_held",
    "layer_rows",
    "stats_support",
]

logger = logging.getLogger(__name__)


#: Held-out feeds: the last ``HOLD_BLOCK`` of every ``HOLD_EVERY * HOLD_BLOCK`` consecutive
#: feeds (blocks of neighbours, so crops of one photo mostly stay on one side).
HOLD_EVERY = 4
HOLD_BLOCK = 2


def is_held(index: int) -> bool:
    """Whether feed ``index`` (0-based) is held out of the fit (see :data:`HOLD_EVERY`)."""
    return (index // HOLD_BLOCK) % HOLD_EVERY == HOLD_EVERY - 1


@dataclasses.dataclass
class HeldOut:
    """Sums over the held-out rows only: ``gram = X^T X``, ``cross = X^T X_ref`` and
    ``target = X_ref^T X_ref`` (``X_ref = X`` without a reference model)."""

    rows: int
    gram: np.ndarray
    cross: np.ndarray
    target: np.ndarray

    def add(self, x: np.ndarray, x_ref: np.ndarray) -> None:
        self.add_products(x.shape[0], x.T @ x, x.T @ x_ref, x_ref.T @ x_ref)

    def add_products(
        self, rows: int, gram: np.ndarray, cross: np.ndarray, target: np.ndarray
    ) -> None:
        """Add the products of ``rows`` rows computed elsewhere (:meth:`InputStats.add`)."""
        self.rows += rows
        self.gram += gram
        self.cross += cross
        self.target += target


@dataclasses.dataclass
class InputStats:
    """Sums over the rows ``X[n, K]`` seen so far (``held``: those of held-out feeds again)."""

    rows: int
    sq: np.ndarray
    gram: np.ndarray | None = None
    cross: np.ndarray | None = None
    held: HeldOut | None = None

    def add(self, x: np.ndarray, x_ref: np.ndarray | None = None, held: bool = False) -> None:
        x = x.astype(np.float64, copy=False)
        ref = x_ref.astype(np.float64, copy=False) if x_ref is not None else None
        self.rows += x.shape[0]
        if self.gram is None:
            self.sq += np.einsum("nk,nk->k", x, x)
            return
        gram = x.T @ x  # each product once, shared by the totals and the held-out sums
        self.sq += np.diag(gram)
        self.gram += gram
        cross = x.T @ ref if ref is not None else gram
        if self.cross is not None:
            self.cross += cross
        if held and self.held is not None:
            target = ref.T @ ref if ref is not None else gram
            self.held.add_products(x.shape[0], gram, cross, target)

    def fit_part(self) -> InputStats:
        """The sums over the rows not held out (all rows when nothing was held out)."""
        if self.held is None or self.held.rows == 0:
            return self
        h = self.held
        return InputStats(
            self.rows - h.rows,
            self.sq - np.diag(h.gram),
            None if self.gram is None else self.gram - h.gram,
            None if self.cross is None else self.cross - h.cross,
        )

    @property
    def norms(self) -> np.ndarray:
        """``||x_k||_2`` per input column."""
        return np.sqrt(self.sq)


def stats_support(layer: WeightLayer) -> str | None:
    """A reason why input statistics are not collected for ``layer``, or None."""
    if layer.op in ("Conv", "ConvTranspose"):
        if layer.group != 1:
            return f"{layer.op} with group={layer.group}: data-aware statistics not supported"
        if len(layer.shape) != 4:
            return f"{len(layer.shape) - 2}-D {layer.op}: only 2-D convolutions are supported"
        if layer.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return f"{layer.op} with auto_pad: data-aware statistics not supported"
    return None


def _im2col(x: np.ndarray, layer: WeightLayer) -> np.ndarray:
    """Patches of ``x[N, C, H, W]`` as rows ``[N*OH*OW, kh*kw*C]`` in ``(i, j, c)`` order."""
    kh, kw = layer.shape[2:]
    sh, sw = layer.attrs.get("strides", (1, 1))
    dh, dw = layer.attrs.get("dilations", (1, 1))
    top, left, bottom, right = layer.attrs.get("pads", (0, 0, 0, 0))
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    taps = [
        xp[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = np.stack(taps, axis=1)  # [N, kh*kw, C, OH, OW]
    return patches.transpose(0, 3, 4, 1, 2).reshape(-1, kh * kw * x.shape[1])


def _rows(layer: WeightLayer, x: np.ndarray) -> np.ndarray:
    k = layer.matrix_shape[1]
    if layer.op == "Conv":
        return _im2col(x, layer)
    if layer.op == "ConvTranspose":
        return np.moveaxis(x, 1, -1).reshape(-1, k)
    return x.reshape(-1, k)


def layer_rows(
    layer: WeightLayer,
    x: np.ndarray,
    rng: np.random.Generator,
    max_rows: int,
    x_ref: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows ``X[n, K]`` of one sample's input ``x`` and the same rows of ``x_ref``.

    Conv patches are subsampled to ``max_rows`` positions (the same ones for both).
    """
    rows = _rows(layer, x)
    ref = _rows(layer, x_ref) if x_ref is not None else None
    if layer.op in ("Conv", "ConvTranspose") and rows.shape[0] > max_rows:
        pick = np.sort(rng.choice(rows.shape[0], size=max_rows, replace=False))
        rows, ref = rows[pick], (ref[pick] if ref is not None else None)
    return rows, ref


def _signature(layer: WeightLayer) -> tuple[Any, ...]:
    keys = ("strides", "dilations", "pads")
    conv = tuple(tuple(layer.attrs.get(k, ())) for k in keys) if layer.op != "MatMul" else ()
    view = "conv" if layer.op == "Conv" else ("convT" if layer.op == "ConvTranspose" else "mm")
    kernel = layer.shape[2:] if layer.op == "Conv" else ()
    return (layer.activation, view, layer.matrix_shape[1], kernel, conv)


def _new_stats(
    layers: Sequence[WeightLayer], *, gram: bool, cross: bool, holdout: bool
) -> tuple[dict[tuple[Any, ...], InputStats], dict[tuple[Any, ...], WeightLayer]]:
    """Empty sums per signature of the supported ``layers`` (layers reading the same value
    with the same view share one), and one layer of each signature."""
    shared: dict[tuple[Any, ...], InputStats] = {}
    by_sig: dict[tuple[Any, ...], WeightLayer] = {}
    for layer in layers:
        if stats_support(layer) is not None:
            continue
        sig = _signature(layer)
        if sig not in shared:
            k = layer.matrix_shape[1]
            shared[sig] = InputStats(
                0,
                np.zeros(k),
                np.zeros((k, k)) if gram else None,
                np.zeros((k, k)) if gram and cross else None,
                HeldOut(0, *(np.zeros((k, k)) for _ in range(3))) if gram and holdout else None,
            )
            by_sig[sig] = layer
    return shared, by_sig


def accumulate_stats(
    layers: Sequence[WeightLayer],
    pairs: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray] | None]],
    *,
    gram: bool,
    cross: bool,
    max_rows: int = 256,
    seed: int = 0,
    holdout: bool = False,
) -> dict[str, InputStats]:
    """Input statistics per supported layer from ``pairs``: per feed, the layers' input
    values and (with ``cross``) the reference model's (see :func:`collect_stats`)."""
    shared, by_sig = _new_stats(layers, gram=gram, cross=cross, holdout=holdout)
    if not shared:
        return {}
    rng = np.random.default_rng(seed)
    samples = 0
    for values, ref_values in pairs:
        held = is_held(samples)
        for sig, layer in by_sig.items():
            x_ref = ref_values[layer.activation] if ref_values is not None else None
            rows = layer_rows(layer, values[layer.activation], rng, max_rows, x_ref)
            shared[sig].add(*rows, held=held)
        samples += 1
    logger.info("collected input statistics of %d layers on %d samples", len(by_sig), samples)
    return {
        layer.node: shared[_signature(layer)] for layer in layers if stats_support(layer) is None
    }


def collect_stats(
    model: ir.Model,
    layers: Sequence[WeightLayer],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    gram: bool,
    max_rows: int = 256,
    seed: int = 0,
    reference: ir.Model | None = None,
    holdout: bool = False,
) -> dict[str, InputStats]:
    """Input statistics per layer node name (layers without support are left out).

    With ``reference`` (a model with the same graph, e.g. the dense original) and ``gram``,
    ``cross`` is accumulated from both models run on the same feeds. With ``holdout`` (and
    ``gram``), the held-out feeds' sums are kept apart too (:class:`HeldOut`).
    """
    wanted = [layer for layer in layers if stats_support(layer) is None]
    if not wanted:
        return {}
    fetch = sorted({layer.activation for layer in wanted})
    with_cross = gram and reference is not None
    pairs: Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]]
    if with_cross:
        assert reference is not None
        mine, theirs = itertools.tee(feeds)  # consumed in lockstep: one feed buffered
        pairs = zip(
            iter_intermediates(model, fetch, mine),
            iter_intermediates(reference, fetch, theirs),
            strict=True,
        )
    else:
        pairs = ((values, None) for values in iter_intermediates(model, fetch, feeds))
    return accumulate_stats(
        wanted, pairs, gram=gram, cross=with_cross, max_rows=max_rows, seed=seed, holdout=holdout
    )
