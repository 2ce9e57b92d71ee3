"""Low-rank API: the in-memory rewrite and the file-level command behind ``onnxprune lowrank``."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import onnx_ir as ir

from onnxprune.analysis import count_costs, total_params
from onnxprune.calib import CalibrationData
from onnxprune.errors import UsageError
from onnxprune.heldout import FidelityReport, measure, split_data
from onnxprune.io import load, save
from onnxprune.io.validate import refuse_unrewritable
from onnxprune.lowrank.config import LowRankConfig
from onnxprune.lowrank.factorize import FactorizePass, LayerRecord, linear_inputs
from onnxprune.lowrank.fold import FoldLinearPass
from onnxprune.lowrank.latency import ConvLatencyProbe, LatencyProbe
from onnxprune.lowrank.report import LowRankResult
from onnxprune.lowrank.whiten import InputStats, collect_input_stats
from onnxprune.passes._match import label
from onnxprune.passes.base import PassReport

__all__ = ["LowRankOutcome", "lowrank_file", "lowrank_model"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LowRankOutcome:
    """What :func:`lowrank_model` did to the model."""

    factorize: PassReport | None
    fold: PassReport | None
    layers: list[LayerRecord]
    shared_energy: float


def _check_exclude(model: ir.Model, exclude: tuple[str, ...]) -> None:
    known = {label(node) for node in model.graph} | {node.name for node in model.graph}
    for name in exclude:
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
    config.validate(has_calib=calib is not None)
    _check_exclude(model, config.exclude)
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


def lowrank_file(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    config: LowRankConfig,
    *,
    calib: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
) -> LowRankResult:
    """Rewrite ``model_path`` into ``output_path`` (atomically; the input is never modified).

    The options are validated before anything is read or written. Whitening statistics use
    the fit part of ``calib``; after the rewrite the written file is compared with the
    original on ``eval_data``, else on the held-out part of ``calib``
    (:mod:`onnxprune.heldout`); this is a lossy rewrite, so no tolerance is enforced here.
    """
    config.validate(has_calib=calib is not None)
    model = load(model_path)
    refuse_unrewritable(model, str(model_path))
    _check_exclude(model, config.exclude)
    split = split_data(model, calib, eval_data, dims=config.dims)
    calibration = split.fit
    params_before = total_params(model)
    macs_before = count_costs(model, dims=config.dims).total_macs
    outcome = lowrank_model(model, config, calib=calibration)
    fidelity: list[FidelityReport] = []

    def check(tmp_path: Path) -> None:
        fidelity.append(measure(model_path, tmp_path, split))

    dest = save(model, output_path, before_commit=check)
    return LowRankResult(
        input=str(model_path),
        output=str(dest),
        config=dataclasses.asdict(config),
        factorize=outcome.factorize,
        fold=outcome.fold,
        layers=outcome.layers,
        shared_energy=outcome.shared_energy,
        params=(params_before, total_params(model)),
        macs=(macs_before, count_costs(model, dims=config.dims).total_macs),
        fidelity=fidelity[0],
    )
