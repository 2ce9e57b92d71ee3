"""File-level API of ``onnxprune sparsify``: validate, sparsify, store compactly, check, save.

The input file is never modified. Statistics and OBS updates use the fit part of the
calibration data; the written model is compared with the original on ``--eval`` data, else on
the held-out part of the calibration data (:mod:`onnxprune.heldout`), for the fidelity
report. The compact (bitmask) model must equal the masked model exactly or nothing is
written. The output is written
atomically; the same input, settings and seed give byte-identical files.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune.analysis.inspect import disk_bytes
from onnxprune.errors import UsageError
from onnxprune.heldout import FidelityReport, measure, split_data
from onnxprune.io import load, save
from onnxprune.io.pinned import copy_model
from onnxprune.io.validate import refuse_unrewritable
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
from onnxprune.sparsity.report import SparsifyResult
from onnxprune.sparsity.storage import check_exact, store_bitmask

__all__ = ["sparsify_file", "validate_config"]

logger = logging.getLogger(__name__)


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
    if config.data_aware and not has_calib:
        raise UsageError("--method wanda and --update need calibration data (--calib PATH)")
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


def _copy(model: ir.Model) -> ir.Model:
    return copy_model(model)


def sparsify_file(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    config: SparsifyConfig,
    *,
    calib: str | os.PathLike[str] | None = None,
    calib_samples: int = 128,
    eval_data: str | os.PathLike[str] | None = None,
) -> SparsifyResult:
    """Sparsify ``model_path`` into ``output_path`` (see the module docstring).

    Args:
        model_path: Input model (never modified).
        output_path: Output model, written atomically.
        config: What to prune and how.
        calib: Calibration data (required for Wanda and ``update``).
        calib_samples: At most this many fit samples feed activation statistics.
        eval_data: Held-out data the fidelity is reported on (default: the held-out part
            of ``calib``).

    Raises:
        UsageError, CalibrationError: bad settings or data (nothing written).
        BudgetError: the compact model does not equal the masked one (nothing written).
    """
    model = load(model_path)
    refuse_unrewritable(model, str(model_path))
    input_bytes = disk_bytes(model_path)
    layers, skipped = find_layers(model)
    names = [layer.node for layer in layers] + [s.node for s in skipped]
    validate_config(config, names, calib is not None)
    split = split_data(model, calib, eval_data)
    data = split.fit
    layers = _eligible(layers, skipped, config)
    _refuse_nothing_to_prune(model, layers, skipped)

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        assert data is not None
        return data.feeds(range(min(len(data), calib_samples)))

    results, steps = apply_sparsity(model, layers, config, feeds if data is not None else None)
    check = split.held_feeds(4) if split.held is not None else split.synthetic
    masked = _copy(model)
    stored = {s.weight: s for s in store_bitmask(model, [layer.weight for layer in layers])}
    error = check_exact(
        masked, model, check[:4], [w for w, s in stored.items() if s.format == "bitmask"]
    )
    for result in results:
        record = stored[result.weight]
        result.storage, result.dense_bytes, result.stored_bytes = (
            record.format,
            record.dense_bytes,
            record.stored_bytes,
        )
        if record.reason:
            result.notes.append(f"stored dense: {record.reason}")
    fidelity: list[FidelityReport] = []

    def measure_written(path: Path) -> None:
        fidelity.append(measure(model_path, path, split))

    dest = save(model, output_path, before_commit=measure_written)
    return SparsifyResult(
        input=str(model_path),
        output=str(dest),
        settings=config.to_dict(),
        layers=results,
        skipped=sorted(skipped),
        input_bytes=input_bytes,
        output_bytes=disk_bytes(dest),
        fidelity=fidelity[0],
        steps=steps,
        stored_vs_masked_max_abs_error=error,
    )
