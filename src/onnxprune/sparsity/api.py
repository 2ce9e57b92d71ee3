"""Transform ``sparsify``: validate, sparsify, store compactly (the file driver does the rest).

Statistics and OBS updates use (at most :data:`STATS_SAMPLES` of) the fit part of the
calibration data; the driver (:mod:`onnxprune.registry.driver`) measures the written model
against the original on ``--eval`` data, else on the held-out part (:mod:`onnxprune.heldout`).
The compact (bitmask) model must equal the masked model exactly or nothing is written; the
same input, settings and seed give byte-identical files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune import registry
from onnxprune.errors import UsageError
from onnxprune.heldout import DataSplit
from onnxprune.io.pinned import copy_model
from onnxprune.registry.driver import FileResult, run_file
from onnxprune.reports import Skip
from onnxprune.sparsity.layers import WeightLayer, find_layers
from onnxprune.sparsity.prune import (
    COMPARES,
    METHODS,
    PATTERNS,
    SCOPES,
    SparsifyConfig,
    apply_sparsity,
    parse_pattern,
)
from onnxprune.sparsity.report import SparsifyReport
from onnxprune.sparsity.storage import check_exact, store_bitmask

__all__ = ["STATS_SAMPLES", "sparsify_apply", "sparsify_file", "validate", "validate_config"]

#: At most this many fit samples feed the activation statistics.
STATS_SAMPLES = 128


def _check_fraction(what: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value < 1.0):
        raise UsageError(f"{what} {value!r} is outside [0, 1)")


def validate_config(config: SparsifyConfig, node_names: Sequence[str], has_calib: bool) -> None:
    """Refuse bad settings with a message naming the offending value.

    Raises:
        UsageError: sparsity outside [0, 1), unknown pattern/scope/method/compare, an N:M pattern
            with another sparsity, an unknown --exclude/--layer-sparsity node, a
            data-aware method without calibration data, or iterations < 1.
    """
    for what, value, allowed in (
        ("pattern", config.pattern, PATTERNS),
        ("scope", config.scope, SCOPES),
        ("method", config.method, METHODS),
        ("compare", config.compare, COMPARES),
    ):
        if value not in allowed:
            raise UsageError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
    if config.sparsity is None:
        raise UsageError("--sparsity is required for --pattern unstructured")
    _check_fraction("--sparsity", config.sparsity)
    nm = parse_pattern(config.pattern)
    if nm is not None and not math.isclose(config.sparsity, 1 - nm[0] / nm[1]):
        raise UsageError(
            f"--pattern {config.pattern} means sparsity {1 - nm[0] / nm[1]:g}; "
            f"--sparsity {config.sparsity:g} contradicts it"
        )
    known = set(node_names)
    for option, names in (
        ("--exclude", config.exclude),
        ("--layer-sparsity", config.layer_sparsity),
    ):
        for name in names:
            if name not in known:
                raise UsageError(
                    f"{option}: no node {name!r} in the model; prunable or skipped "
                    f"Conv/ConvTranspose/Gemm/MatMul nodes: {', '.join(sorted(known)) or 'none'}"
                )
    for name, fraction in config.layer_sparsity.items():
        _check_fraction(f"--layer-sparsity {name}", fraction)
    if nm is not None and config.layer_sparsity:
        raise UsageError("--layer-sparsity cannot be combined with an N:M pattern")
    if config.with_data(has_calib).data_aware and not has_calib:
        raise UsageError("--method wanda and --update need calibration data (--calib PATH)")
    if config.scope == "measured" and not has_calib:
        raise UsageError("--scope measured needs calibration data (--calib PATH)")
    if config.scope == "measured" and nm is not None:
        raise UsageError(f"--scope measured cannot be combined with --pattern {config.pattern}")
    if config.iterative < 1:
        raise UsageError(f"--iterative {config.iterative} must be >= 1")


def _eligible(
    layers: list[WeightLayer], skipped: list[Skip], config: SparsifyConfig
) -> list[WeightLayer]:
    """Layers to prune; the others are added to ``skipped`` with the reason."""
    nm = parse_pattern(config.pattern)
    kept = []
    for layer in layers:
        if layer.node in config.exclude:
            skipped.append(Skip(layer.node, "excluded (--exclude)"))
        elif nm is not None and layer.channel_run % nm[1]:
            reason = (
                f"{config.pattern} needs groups of {nm[1]} consecutive input channels; "
                f"the reduction runs over {layer.channel_run} channels"
            )
            skipped.append(Skip(layer.node, reason))
        else:
            kept.append(layer)
    return kept


#: Ops that compute with integer weights: a model holding them is already quantized.
_QUANTIZED_OPS = (
    "ConvInteger",
    "MatMulInteger",
    "QLinearConv",
    "QLinearMatMul",
    "DynamicQuantizeLSTM",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
)


def _refuse_nothing_to_prune(
    model: ir.Model, found: list[WeightLayer], skipped: list[Skip]
) -> None:
    """Refuse in one line when no layer is left to sparsify, naming why."""
    if found:
        return
    counts: dict[str, int] = {}
    for node in model.graph:
        if node.op_type in _QUANTIZED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if counts:
        ops = ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))
        reason = (
            f"the model is already quantized ({ops} compute with integer weights); "
            "sparsify the float model before quantizing it"
        )
    elif skipped:
        first = min(skipped)
        reason = (
            f"every candidate layer is skipped ({len(skipped)}; e.g. {first.node!r}: "
            f"{first.reason})"
        )
    else:
        reason = "the model has no Conv/ConvTranspose/Gemm/MatMul with a float weight"
    raise UsageError(f"nothing to sparsify: {reason}")


def validate(model: ir.Model, config: SparsifyConfig, has_calib: bool) -> None:
    """The driver's check of the options against ``model`` (:func:`validate_config`)."""
    layers, skipped = find_layers(model)
    validate_config(config, [layer.node for layer in layers] + [s.node for s in skipped], has_calib)


def sparsify_apply(model: ir.Model, config: SparsifyConfig, data: DataSplit) -> SparsifyReport:
    """Transform ``sparsify``: prune and store compactly, in place (module docstring).

    Raises:
        UsageError: nothing left to sparsify.
        BudgetError: the compact model does not equal the masked one.
    """
    layers, skipped = find_layers(model)
    layers = _eligible(layers, skipped, config)
    _refuse_nothing_to_prune(model, layers, skipped)
    fit = data.fit

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        assert fit is not None
        return fit.feeds(range(min(len(fit), STATS_SAMPLES)))

    results, steps = apply_sparsity(model, layers, config, feeds if fit is not None else None)
    masked = copy_model(model)
    stored = {s.weight: s for s in store_bitmask(model, [layer.weight for layer in layers])}
    bitmasks = [w for w, s in stored.items() if s.format == "bitmask"]
    error = check_exact(masked, model, data.held_feeds(4)[:4], bitmasks)
    for result in results:
        record = stored[result.weight]
        result.storage, result.dense_bytes, result.stored_bytes = (
            record.format,
            record.dense_bytes,
            record.stored_bytes,
        )
        if record.reason:
            result.notes.append(f"stored dense: {record.reason}")
    return SparsifyReport(results, sorted(skipped), steps, error)


def sparsify_file(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    config: SparsifyConfig,
    *,
    calib: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    dims: Mapping[str, int] | None = None,
) -> FileResult:
    """Sparsify ``model_path`` into ``output_path`` through the file driver
    (:func:`onnxprune.registry.driver.run_file`; the input is never modified).

    Raises:
        UsageError, CalibrationError: bad settings or data (nothing written).
        BudgetError: the compact model does not equal the masked one (nothing written).
    """
    transform = registry.get("sparsify")
    return run_file(
        transform, model_path, output_path, config, calib=calib, eval_data=eval_data, dims=dims
    )
