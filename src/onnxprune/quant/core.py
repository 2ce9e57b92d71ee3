"""Static int8 QDQ quantization of an in-memory model: calibrate once, build variants.

:class:`StaticQuantizer` holds the canonicalized float model, calibrates the ranges of every
tensor the placement plan may quantize (one streaming pass over the calibration feeds), and
builds quantized copies for a given set of excluded nodes and a u8s8 remedy. Variants (the
saturation remedies, layers kept in float for a budget) reuse the same statistics.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx_ir as ir

from onnxprune.errors import UsageError
from onnxprune.intermediates import budget_chunks, iter_intermediates
from onnxprune.io import pinned
from onnxprune.progress import Progress
from onnxprune.quant.calib_cache import CalibrationCache, cache_key
from onnxprune.quant.calibrate import Calibrator
from onnxprune.quant.gptq import WeightMoments
from onnxprune.quant.hazards import hazard_node
from onnxprune.quant.params import QParams, activation_qparams, weight_qparams
from onnxprune.quant.placement import QuantPlan, plan_quantization
from onnxprune.quant.rewrite import apply_plan, quantize_embeddings, values_by_name
from onnxprune.quant.vnni import remedy_params

__all__ = ["QuantOptions", "StaticQuantizer", "copy_model"]

logger = logging.getLogger(__name__)

CHUNK_BUDGET = 256 * 2**20
# Ranges used by an ``auto`` calibration until a method is chosen.
AUTO_START = "percentile"


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """Options of static quantization.

    Attributes:
        method: Calibration method (minmax, percentile, entropy, mse, mean-minmax, or auto:
            histograms are collected and the caller picks a method with
            :meth:`StaticQuantizer.use_method`).
        per_channel: Per-output-channel weight scales (else one per tensor).
        symmetric_activations: int8 symmetric activations (TensorRT) instead of uint8.
        percentile: Percentile for the ``percentile`` method.
        embeddings: Store large Gather tables int8 (dequantizing only gathered rows).
    """

    method: str = "minmax"
    per_channel: bool = True
    symmetric_activations: bool = False
    percentile: float = 99.999
    embeddings: bool = True


def copy_model(model: ir.Model) -> ir.Model:
    """A deep copy (via the proto; external tensors stay bound to their validated files)."""
    return pinned.copy_model(model)


class StaticQuantizer:
    """Calibrate ``model`` (already canonicalized, opset >= 13) and build quantized copies."""

    def __init__(self, model: ir.Model, options: QuantOptions) -> None:
        self.model = model
        self.options = options
        self.full_plan = plan_quantization(model)
        self.ranges: dict[str, tuple[float, float]] = {}
        self.calibrator: Calibrator | None = None
        self.method = options.method
        self.non_float: list[str] = []
        # Error-compensated weight rounding (:mod:`.gptq`) when set; nearest otherwise.
        self.moments: WeightMoments | None = None

    def calibrate(
        self, feeds: Sequence[Mapping[str, np.ndarray]], cache: CalibrationCache | None = None
    ) -> bool:
        """Stream ``feeds`` through the model and fix every planned tensor's range.

        With ``cache``, statistics stored for the same model, method family and feeds are
        loaded instead (returns True on such a hit), and fresh ones are stored.

        Tensors are fetched in chunks that fit :data:`CHUNK_BUDGET` bytes per feed (one
        pass over the feeds when the model is small), and the statistics of one feed are
        accumulated on a worker thread while onnxruntime runs the next (both release the
        GIL), so at most two feeds' chunks are alive. Updates are applied in feed order:
        the result is the same as a sequential pass.
        """
        names = self.full_plan.activations
        calibrator = Calibrator(names, self.options.method)
        key = cache_key(self.model, feeds, self.options.method) if cache is not None else ""
        if cache is not None:
            non_float = cache.load(key, calibrator)
            if non_float is not None:
                self.non_float = non_float
                self._finish(calibrator)
                return True
        self._collect(calibrator, names, feeds)
        if cache is not None:
            try:
                cache.store(key, calibrator, self.non_float)
            except OSError as exc:  # a read-only cache folder must not fail the run
                logger.warning("calibration cache not written: %s", exc)
        self._finish(calibrator)
        return False

    def _collect(
        self,
        calibrator: Calibrator,
        names: Sequence[str],
        feeds: Sequence[Mapping[str, np.ndarray]],
    ) -> None:
        chunks = list(budget_chunks(self.model, names, feeds, budget=CHUNK_BUDGET))
        with (
            ThreadPoolExecutor(max_workers=1) as worker,
            Progress(len(chunks) * len(feeds), "calibrate") as bar,
        ):
            pending: Future[None] | None = None
            for chunk in chunks:
                for values in iter_intermediates(self.model, chunk, feeds):
                    if pending is not None:
                        pending.result()
                    pending = worker.submit(self._update, calibrator, values)
                    bar.update()
            if pending is not None:
                pending.result()

    def _finish(self, calibrator: Calibrator) -> None:
        for name in self.non_float:
            calibrator.stats.pop(name, None)
        self.calibrator = calibrator
        self.use_method(AUTO_START if self.options.method == "auto" else self.options.method)

    def use_method(self, method: str) -> None:
        """Take the ranges of ``method`` from the collected statistics (any method after an
        ``auto`` calibration, which collects histograms)."""
        assert self.calibrator is not None, "calibrate first"
        self.ranges = self.calibrator.ranges(self.options.percentile, method)
        self.method = method

    def _update(self, calibrator: Calibrator, values: Mapping[str, np.ndarray]) -> None:
        floats = {}
        for name, array in values.items():
            if array.dtype == np.float32:
                floats[name] = array
            elif name not in self.non_float:
                self.non_float.append(name)
        calibrator.update(floats)

    def plan(self, exclude: Collection[str] = ()) -> QuantPlan:
        """The placement plan without the excluded nodes (and non-float tensors)."""
        plan = plan_quantization(self.model, exclude)
        plan.activations = [n for n in plan.activations if n in self.ranges]
        return plan

    def activation_params(self, plan: QuantPlan) -> dict[str, QParams]:
        """Scale/zero point per activation; a shared-scale group uses its members' union."""
        params = {}
        for members in plan.group_members().values():
            lo = min(self.ranges[m][0] for m in members)
            hi = max(self.ranges[m][1] for m in members)
            shared = activation_qparams(lo, hi, symmetric=self.options.symmetric_activations)
            params.update(dict.fromkeys(members, shared))
        return params

    def weight_params(self, plan: QuantPlan, remedy: str) -> tuple[dict[str, QParams], int]:
        """Weight parameters per initializer and the count of channels the remedy changed."""
        values = values_by_name(self.model.graph)
        params: dict[str, QParams] = {}
        changed = 0
        for use in plan.weights:
            if use.weight in params:
                continue
            const = values[use.weight].const_value
            assert const is not None
            array = const.numpy()
            axis = use.axis if self.options.per_channel else None
            if remedy == "none" or self.options.symmetric_activations:
                params[use.weight] = weight_qparams(array, axis)
                continue
            params[use.weight], count = remedy_params(array, axis, use.op_type, remedy)
            changed += count
        return params, changed

    def build(self, exclude: Collection[str] = (), remedy: str = "none") -> tuple[ir.Model, dict]:
        """A quantized copy of the model and a summary of what was done.

        A layer whose int8 output would make onnxruntime abort (:mod:`.hazards`) is kept
        float, with the reason in the summary's ``skipped``.
        """
        keep = list(exclude)
        reasons: dict[str, str] = {}
        while True:
            model, summary, plan = self._build(keep, remedy)
            found = hazard_node(model, plan.nodes)
            if found is None:
                break
            node, reason = found
            if node is None or node in keep:
                raise UsageError(f"onnxruntime would abort on the int8 model: {reason}")
            logger.warning("keeping %r float: %s", node, reason)
            keep.append(node)
            reasons[node] = f"kept float: {reason}"
        for entry in summary["skipped"]:
            entry["reason"] = reasons.get(entry["node"], entry["reason"])
        return model, summary

    def _build(self, exclude: Collection[str], remedy: str) -> tuple[ir.Model, dict, QuantPlan]:
        plan = self.plan(exclude)
        act = self.activation_params(plan)
        weights, changed = self.weight_params(plan, remedy)
        model = copy_model(self.model)
        rounder = None if self.moments is None else self.moments.rounder(remedy)
        notes = apply_plan(model, plan, act, weights, rounder)
        embeddings = quantize_embeddings(model) if self.options.embeddings else []
        summary = {
            "quantized_nodes": len(plan.nodes),
            "quantized_activations": len(plan.activations),
            "int8_weights": len(weights),
            "remedy_channels": changed,
            "int8_embeddings": embeddings,
            "notes": notes,
            "skipped": plan.skipped,
        }
        return model, summary, plan
