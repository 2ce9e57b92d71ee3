"""Layer-by-layer comparison: which intermediate tensor diverges first.

Float node outputs of the top-level graph are matched by name between the reference and
the candidate. In chunks of at most ``chunk_size`` tensors, both in-memory models get those
tensors as extra graph outputs, are saved to a temporary folder (the input files are never
touched; :func:`onnxprune.intermediates.session_with_outputs`) and run on the same samples
with graph optimizations off. Per tensor only running sums are kept (signal, noise, dot
product, norms, max error), so memory is one sample's chunk of tensors however many samples
and layers there are.

``sqnr_db = 10 log10(sum r^2 / sum (c - r)^2)`` and ``cosine = <r, c> / (|r| |c|)`` over all
compared samples, as in :mod:`onnxprune.metrics`. A tensor *diverges* when its SQNR is below
``sqnr_threshold`` or its cosine below ``cosine_threshold`` (or the candidate has NaN/inf
where the reference has none). The first diverging tensor in the reference's topological
order is where an error enters; the worst one (lowest SQNR) is where it is largest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxprune.intermediates import session_with_outputs
from onnxprune.progress import Progress

__all__ = ["LayerMetrics", "LayerReport", "compare_layers", "matched_tensors"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


@dataclasses.dataclass
class LayerMetrics:
    """Error of one intermediate tensor over the compared samples."""

    index: int
    name: str
    node: str
    op_type: str
    shape: list[int]
    sqnr_db: float
    cosine: float
    max_abs_error: float
    diverged: bool

    def describe(self) -> str:
        """``'h2' (MatMul node 'mm2', SQNR 3.1 dB, cosine 0.71)``."""
        return (
            f"{self.name!r} ({self.op_type} node {self.node!r}, SQNR {self.sqnr_db:.1f} dB, "
            f"cosine {self.cosine:.6f})"
        )


@dataclasses.dataclass
class LayerReport:
    """All compared tensors (topological order), skips with reasons, first and worst."""

    layers: list[LayerMetrics]
    skipped: list[dict[str, str]]
    sqnr_threshold: float
    cosine_threshold: float
    samples: int
    chunk_size: int
    chunks: int

    @property
    def first_diverging(self) -> LayerMetrics | None:
        return next((m for m in self.layers if m.diverged), None)

    @property
    def worst(self) -> LayerMetrics | None:
        return min(self.layers, key=lambda m: (m.sqnr_db, m.cosine, m.index), default=None)

    def ranked(self) -> list[LayerMetrics]:
        """Tensors by increasing SQNR (worst first); ties in topological order."""
        return sorted(self.layers, key=lambda m: (m.sqnr_db, m.cosine, m.index))

    def to_dict(self) -> dict[str, Any]:
        first, worst = self.first_diverging, self.worst
        return {
            "sqnr_threshold_db": self.sqnr_threshold,
            "cosine_threshold": self.cosine_threshold,
            "samples": self.samples,
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
            "compared": len(self.layers),
            "first_diverging": None if first is None else dataclasses.asdict(first),
            "worst": None if worst is None else dataclasses.asdict(worst),
            "layers": [dataclasses.asdict(m) for m in self.layers],
            "skipped": self.skipped,
        }


@dataclasses.dataclass
class _Sums:
    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    cand_sq: float = 0.0
    max_abs: float = 0.0
    nonfinite: bool = False
    shape: tuple[int, ...] | None = None

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r = ref.astype(np.float64).ravel()
        c = cand.astype(np.float64).ravel()
        if not np.all(np.isfinite(c)) and np.all(np.isfinite(r)):
            self.nonfinite = True
        diff = c - r
        self.signal += float(r @ r)
        self.noise += float(diff @ diff)
        self.dot += float(r @ c)
        self.cand_sq += float(c @ c)
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))

    def sqnr_cosine(self) -> tuple[float, float]:
        if self.noise == 0:
            sqnr = math.inf
        elif self.signal == 0 or not math.isfinite(self.noise):
            sqnr = -math.inf
        else:
            sqnr = 10 * math.log10(self.signal / self.noise)
        if self.signal == 0 and self.cand_sq == 0:
            cosine = 1.0
        elif self.signal == 0 or self.cand_sq == 0 or not math.isfinite(self.dot):
            cosine = 0.0
        else:
            cosine = self.dot / math.sqrt(self.signal * self.cand_sq)
        return sqnr, cosine


def _infer(model: ir.Model) -> None:
    # Intermediate values need a type to become graph outputs; torch exports often lack it.
    ShapeInferencePass(strict_mode=False)(model)


def _produced(model: ir.Model) -> dict[str, tuple[ir.Value, ir.Node]]:
    return {
        out.name: (out, node)
        for node in model.graph
        for out in node.outputs
        if out.name  # optional outputs left empty have no name
    }


def matched_tensors(
    reference: ir.Model, candidate: ir.Model
) -> tuple[list[tuple[str, ir.Node]], list[dict[str, str]]]:
    """Float node outputs of ``reference`` (topological order) also typed float in ``candidate``.

    Returns:
        The ``(name, producing reference node)`` pairs to compare, and skips with reasons.
    """
    _infer(reference)
    _infer(candidate)
    cand = _produced(candidate)
    matched, skipped = [], []
    for name, (value, node) in _produced(reference).items():
        if value.dtype is None:
            skipped.append({"name": name, "reason": "type unknown in the reference"})
            continue
        if value.dtype not in _FLOAT_TYPES:
            continue
        if name not in cand:
            skipped.append({"name": name, "reason": "not produced in the candidate"})
            continue
        if cand[name][0].dtype not in _FLOAT_TYPES:
            skipped.append({"name": name, "reason": "not a float tensor in the candidate"})
            continue
        matched.append((name, node))
    return matched, skipped


def _run_chunk(
    models: tuple[ir.Model, ir.Model],
    names: Sequence[str],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    sums: dict[str, _Sums],
    bar: Progress,
) -> None:
    with (
        session_with_outputs(models[0], names) as ref_session,
        session_with_outputs(models[1], names) as cand_session,
    ):
        for feed in feeds:
            ref_out = ref_session.run(list(names), feed)
            cand_out = cand_session.run(list(names), feed)
            for name, r, c in zip(names, ref_out, cand_out, strict=True):
                acc = sums[name]
                if acc.shape is None:
                    acc.shape = tuple(r.shape)
                if r.shape != c.shape:
                    acc.shape = (-1,)
                    continue
                if acc.shape != (-1,):
                    acc.add(r, c)
            bar.update()


def compare_layers(
    reference: ir.Model,
    candidate: ir.Model,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    chunk_size: int = 64,
    sqnr_threshold: float = 40.0,
    cosine_threshold: float = 0.999,
    show_progress: bool | None = None,
) -> LayerReport:
    """Compare matched intermediate tensors of two loaded models on ``feeds``.

    The models are modified in memory only (shape inference; outputs added then removed).
    """
    matched, skipped = matched_tensors(reference, candidate)
    names = [name for name, _ in matched]
    chunks = [names[i : i + chunk_size] for i in range(0, len(names), chunk_size)]
    sums = {name: _Sums() for name in names}
    with Progress(len(chunks) * len(feeds), "layers", enabled=show_progress) as bar:
        for chunk in chunks:
            _run_chunk((reference, candidate), chunk, feeds, sums=sums, bar=bar)
    layers = []
    for index, (name, node) in enumerate(matched):
        acc = sums[name]
        if acc.shape == (-1,):
            skipped.append({"name": name, "reason": "shapes differ between the models"})
            continue
        sqnr, cosine = acc.sqnr_cosine()
        diverged = acc.nonfinite or sqnr < sqnr_threshold or cosine < cosine_threshold
        layers.append(
            LayerMetrics(
                index,
                name,
                node.name or "",
                node.op_type,
                list(acc.shape or ()),
                sqnr,
                cosine,
                acc.max_abs,
                diverged,
            )
        )
    logger.info("compared %d tensors in %d chunks", len(layers), len(chunks))
    return LayerReport(
        layers, skipped, sqnr_threshold, cosine_threshold, len(feeds), chunk_size, len(chunks)
    )
