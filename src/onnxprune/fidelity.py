"""The one fidelity comparator: every command measures a candidate against its reference here.

Both models run in onnxruntime on the same feeds. By default with onnxruntime's graph
optimizations **on**, as a user deploys the model (int8 QDQ models then run onnxruntime's
integer kernels, not a float emulation of them); ``optimize=False`` runs both graphs as
written. The setting is recorded in the result.

Per output, two aggregations of :func:`onnxprune.metrics.output_metrics`:

* **pooled** (the headline): the metrics over all feeds together. Outputs are cut into rows
  of their last axis (a rank-1 output is one row per feed), so ``top1_agreement`` is the
  share of agreeing rows over every row of every feed; when the last axis varies between
  feeds (token lengths) the feeds are flattened and concatenated instead (no top-1);
* **worst feed**: each metric's worst value over the feeds taken one at a time.

``top1_agreement`` is reported for class scores only (logits, probabilities; decided from the
graph by :mod:`onnxprune.output_kinds`), not for embeddings or hidden states. Integer outputs
(labels) are compared exactly: ``top1_agreement`` is the share of equal elements and the
float metrics do not apply. Non-tensor outputs (a sequence of maps, as
scikit-learn's ZipMap writes) become a matrix, one row per map, columns in key order.

``nn_agreement`` (pooled only, float outputs with 3 to 4096 rows): the share of rows whose
nearest other row (by cosine) is the same in the candidate as in the reference, the
retrieval view of an embedding model.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.errors import UsageError
from onnxprune.intervals import fidelity_intervals
from onnxprune.io import load
from onnxprune.metrics import HIGHER_IS_BETTER, output_metrics, rows
from onnxprune.output_kinds import class_score_outputs
from onnxprune.runtime import make_session

__all__ = ["FidelityResult", "compare", "overfit_note", "run_outputs"]

ModelLike = str | os.PathLike[str] | ir.Model

#: At most this many rows for the O(rows^2) nearest-neighbour agreement.
_NN_MAX_ROWS = 4096


@dataclasses.dataclass
class FidelityResult:
    """Metrics per output, pooled over feeds and worst over feeds."""

    data: str  # which samples were used, in words
    samples: int
    graph_optimizations: bool
    outputs: dict[str, dict[str, float | None]]
    worst_feed: dict[str, dict[str, float | None]]
    #: 95 % intervals of the pooled metrics, ``{output: {metric: [low, high]}}``
    #: (:mod:`onnxprune.intervals`)
    intervals: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def worst_output(self) -> dict[str, float | None]:
        """Each metric's worst pooled value over the outputs (None where none applies)."""
        return _worst([self.outputs[n] for n in self.outputs])

    def summary(self) -> list[str]:
        """One line per output: ``output logits: top-1 0.9219, cosine 0.995612, SQNR 20.1 dB``,
        with the 95 % intervals where there are several samples."""
        return [
            f"output {name}: {describe(m, self.intervals.get(name))}"
            for name, m in self.outputs.items()
        ]


def describe(
    metrics: Mapping[str, float | None], intervals: Mapping[str, Sequence[float]] | None = None
) -> str:
    """``top-1 agreement 0.9219 [0.89, 0.95], cosine 0.995612, SQNR 20.13 dB`` (metrics that
    apply; ``[low, high]`` where ``intervals`` has one)."""
    spans = intervals or {}

    def span(key: str, spec: str) -> str:
        if key not in spans:
            return ""
        low, high = spans[key]
        return f" [{low:{spec}}, {high:{spec}}]"

    parts = []
    if metrics.get("top1_agreement") is not None:
        top1 = metrics["top1_agreement"]
        parts.append(f"top-1 agreement {top1:.4f}{span('top1_agreement', '.2f')}")
    if metrics.get("nn_agreement") is not None:
        parts.append(f"nearest-neighbour agreement {metrics['nn_agreement']:.4f}")
    if metrics.get("cosine") is not None:
        parts.append(f"cosine {metrics['cosine']:.6f}{span('cosine', '.4f')}")
    if metrics.get("sqnr_db") is not None:
        parts.append(f"SQNR {metrics['sqnr_db']:.2f} dB{span('sqnr_db', '.1f')}")
    if metrics.get("max_abs_error") is not None:
        parts.append(f"max abs error {metrics['max_abs_error']:.4g}")
    return ", ".join(parts)


def _as_array(value: Any) -> np.ndarray:
    """A run output as an array: sequences of maps (ZipMap) become rows in key order."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list) and value and isinstance(value[0], Mapping):
        keys = sorted(value[0])
        return np.array([[row[k] for k in keys] for row in value], dtype=np.float64)
    return np.asarray(value)


def run_outputs(
    model: ModelLike,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    optimize: bool = True,
    provider: str = "cpu",
    names: Sequence[str] | None = None,
) -> dict[str, list[np.ndarray]]:
    """``{output: [array per feed]}`` of ``model`` on ``feeds``."""
    session = make_session(model, provider=provider, optimize=optimize)
    available = [o.name for o in session.get_outputs()]
    names = list(names) if names is not None else available
    missing = [n for n in names if n not in available]
    if missing:
        raise UsageError(f"the candidate has no output {missing[0]!r} (it has {available})")
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, dict(feed)), strict=True):
            collected[name].append(_as_array(value))
    return collected


def _rows(array: np.ndarray) -> np.ndarray:
    return rows(array) if array.ndim >= 1 else array.reshape(1, 1)


def _pool(parts: Sequence[np.ndarray]) -> np.ndarray:
    if len({a.shape[-1] if a.ndim else 1 for a in parts}) == 1:
        return np.concatenate([_rows(a) for a in parts])
    return np.concatenate([a.ravel() for a in parts])


def _integer_metrics(r: np.ndarray, c: np.ndarray) -> dict[str, float | None]:
    diff = np.abs(r.astype(np.float64) - c.astype(np.float64))
    return {
        "top1_agreement": float(np.mean(r == c)) if r.size else 1.0,
        "cosine": None,
        "sqnr_db": None,
        "max_abs_error": float(diff.max()) if diff.size else 0.0,
        "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
        "max_rel_error": None,
    }


def _nn_agreement(r: np.ndarray, c: np.ndarray) -> float | None:
    if r.ndim != 2 or not 3 <= len(r) <= _NN_MAX_ROWS or r.shape[1] < 2:
        return None

    def nearest(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        unit = x / np.where(norms > 0, norms, 1.0)
        sim = unit @ unit.T
        np.fill_diagonal(sim, -np.inf)
        return np.argmax(np.nan_to_num(sim, nan=-np.inf), axis=1)

    return float(np.mean(nearest(r) == nearest(c)))


def metrics_of(
    r: np.ndarray, c: np.ndarray, *, pooled: bool, top1: bool = True
) -> dict[str, float | None]:
    """The comparator's metrics of one (reference, candidate) pair of arrays.

    ``top1=False`` (a float output that is not class scores) leaves top-1 agreement out.
    """
    if r.shape != c.shape:
        raise UsageError(f"shape mismatch: reference {list(r.shape)}, candidate {list(c.shape)}")
    if np.issubdtype(r.dtype, np.integer) or r.dtype == np.bool_:
        metrics = _integer_metrics(r, c)
    else:
        metrics = dict(output_metrics(r, c))
        if not top1:
            metrics["top1_agreement"] = None
    metrics["nn_agreement"] = (
        _nn_agreement(r, c) if pooled and metrics.get("cosine") is not None else None
    )
    return metrics


def _worst(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    keys = dict.fromkeys(k for row in rows for k in row)
    worst: dict[str, float | None] = {}
    for key in keys:
        values = [row.get(key) for row in rows]
        present = [float(v) for v in values if v is not None]
        if not present:
            worst[key] = None
        elif any(math.isnan(v) for v in present):
            worst[key] = math.nan
        else:
            worst[key] = min(present) if key in HIGHER_IS_BETTER else max(present)
    return worst


def compare(
    reference: ModelLike | Mapping[str, Sequence[np.ndarray]],
    candidate: ModelLike,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    data: str = "",
    optimize: bool = True,
    provider: str = "cpu",
    class_scores: Collection[str] | None = None,
) -> FidelityResult:
    """Fidelity of ``candidate`` against ``reference`` on ``feeds``.

    Args:
        reference: A model, or its :func:`run_outputs` on the same feeds (computed once,
            compared many times).
        candidate: The model to judge; it must have the reference's outputs.
        feeds: The samples, one feed each.
        data: Which samples these are, in words (goes into the result).
        optimize: onnxruntime graph optimizations on (as deployed) or off.
        provider: Execution provider for both models.
        class_scores: Outputs whose top-1 agreement is reported (default: decided from the
            reference graph, else the candidate's, by :mod:`onnxprune.output_kinds`).

    Raises:
        UsageError: no feeds, an output missing from the candidate, or a shape mismatch
            (naming the output and the sample).
    """
    if not feeds:
        raise UsageError("no samples to measure fidelity on")
    if class_scores is None:
        class_scores = _class_scores(candidate if isinstance(reference, Mapping) else reference)
    if not isinstance(reference, Mapping):
        reference = run_outputs(reference, feeds, optimize=optimize, provider=provider)
    names = list(reference)
    cand = run_outputs(candidate, feeds, optimize=optimize, provider=provider, names=names)
    pooled: dict[str, dict[str, float | None]] = {}
    worst: dict[str, dict[str, float | None]] = {}
    spans: dict[str, dict[str, list[float]]] = {}
    for name in names:
        refs, cands = list(reference[name])[: len(feeds)], cand[name]
        for index, (r, c) in enumerate(zip(refs, cands, strict=True)):
            if r.shape != c.shape:
                raise UsageError(
                    f"output {name!r} has shape {list(r.shape)} in the reference but "
                    f"{list(c.shape)} in the candidate (sample {index})"
                )
        top1 = name in class_scores
        pooled[name] = metrics_of(_pool(refs), _pool(cands), pooled=True, top1=top1)
        worst[name] = _worst(
            [metrics_of(r, c, pooled=False, top1=top1) for r, c in zip(refs, cands, strict=True)]
        )
        found = fidelity_intervals(refs, cands, top1_agreement=pooled[name].get("top1_agreement"))
        if found:
            spans[name] = found
    return FidelityResult(data, len(feeds), optimize, pooled, worst, spans)


def _class_scores(model: ModelLike) -> frozenset[str]:
    if not isinstance(model, ir.Model):
        model = load(model)
    return class_score_outputs(model)


#: A fitted step overfits when the fit samples beat the held-out ones by more than this.
#: (Not nearest-neighbour agreement: it depends on how many rows are compared.)
OVERFIT_GAP = {"top1_agreement": 0.05, "cosine": 0.02, "sqnr_db": 3.0}


def overfit_note(fit: FidelityResult, held: FidelityResult) -> str | None:
    """One line when the fit samples look much better than the held-out ones, else None."""
    found = []
    for name, held_metrics in held.outputs.items():
        fit_metrics = fit.outputs.get(name, {})
        for metric, gap in OVERFIT_GAP.items():
            a, b = fit_metrics.get(metric), held_metrics.get(metric)
            if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
                continue
            if a - b > gap:
                found.append(f"{name} {metric} {a:.4g} on fit samples vs {b:.4g} held out")
    if not found:
        return None
    return (
        "fitted steps do much better on the samples they were fitted on than on held-out "
        f"ones ({'; '.join(found[:3])}): trust the held-out numbers; more varied "
        "calibration data may help"
    )
