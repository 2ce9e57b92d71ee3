"""Low-rank API: the in-memory rewrite behind ``onnxprune lowrank`` (the file driver,
:mod:`onnxprune.registry.driver`, loads, measures and writes)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import onnx_ir as ir

from onnxprune import registry
from onnxprune.calib import CalibrationData
from onnxprune.errors import UsageError
from onnxprune.heldout import DataSplit
from onnxprune.lowrank.config import LowRankConfig
from onnxprune.lowrank.factorize import FactorizePass, LayerRecord, linear_inputs
from onnxprune.lowrank.fold import FoldLinearPass
from onnxprune.lowrank.latency import ConvLatencyProbe, LatencyProbe
from onnxprune.lowrank.report import LowRankOutcome
from onnxprune.lowrank.whiten import InputStats, collect_input_stats
from onnxprune.passes._match import label
from onnxprune.registry.driver import FileResult, run_file

__all__ = ["LowRankOutcome", "lowrank_apply", "lowrank_file", "lowrank_model", "validate"]


def validate(model: ir.Model, config: LowRankConfig, has_calib: bool) -> None:
    """Raise UsageError on bad options (:meth:`LowRankConfig.validate`) or an unknown
    ``exclude`` node."""
    config.validate(has_calib=has_calib)
    known = {label(node) for node in model.graph} | {node.name for node in model.graph}
    for name in config.exclude:
        if name not in known:
            raise UsageError(f"--exclude {name!r}: no node of that name in the model")


def _statistics(
    model: ir.Model, config: LowRankConfig, calib: CalibrationData | None
) -> dict[str, InputStats]:
    """Input statistics when the method or the error budget needs them (and data is given)."""
    wanted = config.activation_aware or config.max_layer_error is not None
    if calib is None or not wanted or not config.factorize:
        return {}
    count = min(len(calib), config.calib_samples)
    return collect_input_stats(
        model, linear_inputs(model, config.exclude), calib.feeds(range(count))
    )


def lowrank_model(
    model: ir.Model,
    config: LowRankConfig,
    *,
    calib: CalibrationData | None = None,
    latency_probe: LatencyProbe | None = None,
    conv_probe: ConvLatencyProbe | None = None,
) -> LowRankOutcome:
    """Factorize (and optionally fold) ``model`` in place.

    Raises:
        UsageError: bad options (see :meth:`LowRankConfig.validate`) or an unknown
            ``exclude`` node.
    """
    validate(model, config, calib is not None)
    factorize = fold = None
    layers: list[LayerRecord] = []
    shared = float("nan")
    if config.factorize:
        stats = _statistics(model, config, calib)
        factor_pass = FactorizePass(config, stats, latency_probe, conv_probe)
        factorize = factor_pass(model)
        layers, shared = factor_pass.layers, factor_pass.shared_energy
    if config.fold:
        fold = FoldLinearPass()(model)
    return LowRankOutcome(factorize, fold, layers, shared)


def lowrank_apply(model: ir.Model, config: LowRankConfig, data: DataSplit) -> LowRankOutcome:
    """Transform ``lowrank``: whitening statistics from the fit part of the data."""
    return lowrank_model(model, config, calib=data.fit)


def lowrank_file(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    config: LowRankConfig,
    *,
    calib: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    dims: Mapping[str, int] | None = None,
) -> FileResult:
    """Rewrite ``model_path`` into ``output_path`` through the file driver (atomically; the
    input is never modified; fidelity measured on ``eval_data``, else on the held-out part of
    ``calib``; lossy, so no tolerance is enforced here). ``dims`` default to ``config.dims``."""
    transform = registry.get("lowrank")
    return run_file(
        transform, model_path, output_path, config, calib=calib, eval_data=eval_data, dims=dims
    )
