"""The factorization pass: find candidates, plan ranks, rewrite, record every decision.

Rewrites MatMul/Gemm layers with a constant 2-D weight into two chained products
(:mod:`onnxprune.lowrank.svd`, optionally activation-aware via
:mod:`onnxprune.lowrank.whiten`) and, when a conv scheme is chosen, 2-D convolutions
(:mod:`onnxprune.lowrank.conv`). Ranks come from :mod:`onnxprune.lowrank.plan`. Each layer
ends up either changed (with its ranks) or skipped with the reason: excluded, not
applicable, saves no work, or not measurably faster (linear layers with ``latency_check``;
conv layers unless ``conv_latency_check`` is off).

A second run changes nothing: the nodes it wrote carry node metadata
``onnxprune.lowrank`` and are skipped as factors already.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxprune.analysis import count_costs, infer_shapes
from onnxprune.lowrank._candidate import FACTOR_KEY, Candidate, Ranks
from onnxprune.lowrank.config import LowRankConfig
from onnxprune.lowrank.conv import ConvCandidate, conv_candidate
from onnxprune.lowrank.latency import (
    SPEEDUP_MARGIN,
    ConvLatencyProbe,
    LatencyProbe,
    measure_conv,
    measure_linear,
)
from onnxprune.lowrank.plan import plan_ranks
from onnxprune.lowrank.svd import LinearCandidate, linear_candidate, linear_weight
from onnxprune.lowrank.whiten import InputStats
from onnxprune.passes._match import const_array, label, required
from onnxprune.passes.base import Pass, PassReport

__all__ = ["FactorizePass", "LayerRecord", "linear_inputs"]

logger = logging.getLogger(__name__)

_LINEAR = ("MatMul", "Gemm")


@dataclasses.dataclass
class LayerRecord:
    """One factorized layer, for the report."""

    node: str
    kind: str
    weight_shape: list[int]
    ranks: list[int]
    full_ranks: list[int]
    params_before: int
    params_after: int
    energy_kept: float
    output_error: float | None = None
    latency_ms: list[float] | None = None


def _has_const_operand(node: ir.Node) -> bool:
    return any(const_array(v) is not None for v in node.inputs[:2])


def linear_inputs(model: ir.Model, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """Input value name -> channels K of every factorizable MatMul/Gemm (for statistics)."""
    found: dict[str, int] = {}
    for node in model.graph:
        if node.op_type not in _LINEAR or node.domain != "" or label(node) in exclude:
            continue
        weight = linear_weight(node)
        if not isinstance(weight, str):
            found[str(required(node.inputs[0]).name)] = weight[0].shape[0]
    return found


class FactorizePass(Pass):
    """Low-rank factorization of linear layers (and convolutions, per ``config.conv``)."""

    name = "lowrank"

    def __init__(
        self,
        config: LowRankConfig,
        stats: Mapping[str, InputStats] | None = None,
        latency_probe: LatencyProbe | None = None,
        conv_probe: ConvLatencyProbe | None = None,
    ) -> None:
        self.config = config
        self.stats = dict(stats or {})
        self.latency_probe = latency_probe
        self.conv_probe = conv_probe
        self.input_shapes: dict[int, list[int]] = {}
        self.layers: list[LayerRecord] = []
        self.shared_energy = float("nan")

    def _candidates(self, model: ir.Model, report: PassReport) -> list[Candidate]:
        cands: list[Candidate] = []
        for node in model.graph:
            linear = node.op_type in _LINEAR and _has_const_operand(node)
            conv = node.op_type == "Conv" and self.config.conv is not None
            if node.domain != "" or not (linear or conv):
                continue
            if label(node) in self.config.exclude:
                report.skip(label(node), "excluded by --exclude")
                continue
            if FACTOR_KEY in node.metadata_props:
                report.skip(label(node), "already a low-rank factor (written by this pass)")
                continue
            found: LinearCandidate | ConvCandidate | str
            if linear:
                stats = self.stats.get(str(node.inputs[0].name)) if node.inputs[0] else None
                found = linear_candidate(node, self.config.method, stats)
            else:
                found = conv_candidate(node, str(self.config.conv))
            if isinstance(found, str):
                report.skip(label(node), found)
            else:
                cands.append(found)
        return cands

    def _set_positions(self, model: ir.Model, cands: list[Candidate]) -> None:
        """MACs per weight element of each candidate (rows / output positions)."""
        costs = count_costs(model, dims=self.config.dims)
        by_index = {id(node): i for i, node in enumerate(model.graph)}
        for cand in cands:
            macs = costs.nodes[by_index[id(cand.node)]].macs
            if macs:
                cand.positions = max(1, macs // cand.dense_params)

    def _set_input_shapes(self, model: ir.Model, cands: list[Candidate]) -> None:
        """Static input shape of each conv candidate, symbolic dims bound (``dims``, else 1)."""
        bound = dict(self.config.dims)
        for value in model.graph.inputs:
            for dim in value.shape or ():
                if not isinstance(dim, int) and dim.value is not None:
                    bound.setdefault(str(dim.value), 1)
        inferred = infer_shapes(model, dims=bound)
        by_index = {id(node): i for i, node in enumerate(model.graph)}
        nodes = list(inferred.graph)
        for cand in cands:
            shape = required(nodes[by_index[id(cand.node)]].inputs[0]).shape
            if shape is not None:
                dims = [d if isinstance(d, int) else bound.get(str(d.value), 1) for d in shape]
                self.input_shapes[id(cand.node)] = dims

    def _conv_latency_skip(
        self, cand: ConvCandidate, ranks: Ranks, record: LayerRecord
    ) -> str | None:
        if not self.config.check_conv_latency:
            return None
        shape = self.input_shapes.get(id(cand.node))
        if shape is None:
            return None  # unknown input rank: nothing sensible to time
        dense, factored = cand.probe_models(ranks, shape)
        if self.conv_probe is not None:
            dense_ms, factored_ms = self.conv_probe(dense, factored)
        else:
            dense_ms, factored_ms = measure_conv(
                dense, factored, threads=self.config.latency_threads
            )
        record.latency_ms = [dense_ms, factored_ms]
        if factored_ms <= dense_ms * (1.0 - SPEEDUP_MARGIN):
            return None
        return (
            f"measured {factored_ms:.3g} ms factorized vs {dense_ms:.3g} ms original: no "
            f"speedup (needs {SPEEDUP_MARGIN:.0%} faster, input {'x'.join(map(str, shape))})"
        )

    def _latency_skip(self, cand: Candidate, ranks: Ranks, record: LayerRecord) -> str | None:
        if isinstance(cand, ConvCandidate):
            return self._conv_latency_skip(cand, ranks, record)
        if not (self.config.latency_check and isinstance(cand, LinearCandidate)):
            return None
        m, n = cand.shape
        probe = self.latency_probe or measure_linear
        dense_ms, factored_ms = probe(m, n, ranks[0], cand.positions)
        record.latency_ms = [dense_ms, factored_ms]
        if factored_ms < dense_ms:
            return None
        return (
            f"measured latency does not improve: dense {dense_ms:.4g} ms, factored "
            f"{factored_ms:.4g} ms at {cand.positions} rows"
        )

    def run(self, model: ir.Model, report: PassReport) -> None:
        cands = self._candidates(model, report)
        if cands and (self.config.target_macs is not None or self.config.latency_check):
            self._set_positions(model, cands)
        if self.config.check_conv_latency and any(isinstance(c, ConvCandidate) for c in cands):
            self._set_input_shapes(model, [c for c in cands if isinstance(c, ConvCandidate)])
        plans, self.shared_energy = plan_ranks(cands, self.config)
        for plan in plans:
            cand, ranks = plan.candidate, plan.ranks
            if plan.skip:
                report.skip(cand.label, plan.skip)
                continue
            record = _record(cand, ranks)
            reason = self._latency_skip(cand, ranks, record)
            if reason:
                report.skip(cand.label, reason)
                continue
            what = cand.apply(model.graph, ranks)
            report.change(record.node, what)
            self.layers.append(record)
            logger.debug("factorized %s: %s", record.node, what)


def _record(cand: Candidate, ranks: Ranks) -> LayerRecord:
    s = cand.spectra[0]
    power = s.astype(np.float64) ** 2
    kept = float(power[: ranks[0]].sum() / power.sum()) if power.sum() else 1.0
    error = None
    if isinstance(cand, LinearCandidate) and cand.decomposition is not None:
        error = cand.decomposition.output_error(ranks[0])
    if isinstance(cand, LinearCandidate):
        shape = list(cand.shape)
    else:
        assert isinstance(cand, ConvCandidate) and cand.w is not None  # the two kinds
        shape = list(cand.w.shape)
    return LayerRecord(
        node=cand.label,
        kind=cand.kind,
        weight_shape=shape,
        ranks=list(ranks),
        full_ranks=list(cand.full),
        params_before=cand.dense_params,
        params_after=cand.params(ranks),
        energy_kept=kept,
        output_error=error,
    )
