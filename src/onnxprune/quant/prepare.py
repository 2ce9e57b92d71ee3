"""Preconditions and model preparation before quantizing.

* Refuse models that are already quantized (QDQ or QOperator ops present), and models
  whose inputs, outputs or weights are float16/float64/bfloat16 (only float32 models are
  quantized).
* Give unnamed nodes deterministic names (``<op_type>_<index>``): plans, reports and
  ``--exclude`` refer to nodes by name.
* Per-channel QuantizeLinear/DequantizeLinear (``axis``) need opset >= 13: older models are
  converted with ``onnx.version_converter``, checked with ``onnx.checker`` and against the
  original's outputs; when that fails they keep their opset (>= 10) and get per-tensor
  weights instead of a refusal (:func:`ensure_opset`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.errors import UsageError
from onnxprune.io.pinned import rebind_external
from onnxprune.io.validate import WEIGHT_OPERANDS
from onnxprune.runtime import run_model

__all__ = [
    "INT8_OPS",
    "MIN_OPSET",
    "QUANTIZED_OPS",
    "ensure_opset",
    "name_nodes",
    "refuse_non_float32",
    "refuse_quantized",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 13
#: Integer compute kernels (Conv/Gemm/MatMul family), as onnxruntime names them.
INT8_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "MatMulInteger",
        "ConvInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QAttention",
        "NhwcQLinearConv",
        "QLinearConvTranspose",
    }
)
#: Any of these in a model means it is already quantized.
QUANTIZED_OPS = INT8_OPS | {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearSigmoid",
    "QLinearSoftmax",
}


def refuse_quantized(model: ir.Model) -> None:
    """Raise UsageError when ``model`` already contains quantization ops."""
    found = sorted({n.op_type for n in model.graph if n.op_type in QUANTIZED_OPS})
    if found:
        raise UsageError(
            f"the model is already quantized ({', '.join(found)} present); "
            "quantize the float model instead"
        )


def _non_float32(values: Iterable[ir.Value | None]) -> ir.Value | None:
    for value in values:
        dtype = None if value is None else value.dtype
        if dtype is not None and dtype.is_floating_point() and dtype != ir.DataType.FLOAT:
            return value
    return None


def refuse_non_float32(model: ir.Model) -> None:
    """Raise UsageError naming the first float input, output or weight that is not float32."""
    graph = model.graph
    weights = [
        node.inputs[i]
        for node in graph
        if node.domain == ""
        for i in WEIGHT_OPERANDS.get(node.op_type, ())
        if i < len(node.inputs) and (value := node.inputs[i]) is not None and value.is_initializer()
    ]
    for where, values in (
        ("graph input", graph.inputs),
        ("graph output", graph.outputs),
        ("weight", weights),
    ):
        found = _non_float32(values)
        if found is not None and found.dtype is not None:
            raise UsageError(
                f"quantize needs a float32 model, but {where} {found.name!r} is "
                f"{found.dtype.name.lower()}; convert the model to float32 first"
            )


def name_nodes(model: ir.Model) -> int:
    """Name unnamed (or duplicate-named) nodes ``<op_type>_<index>``; returns how many."""
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
            renamed += 1
        seen.add(node.name)
    return renamed


def default_opset(model: ir.Model) -> int:
    """The model's ``ai.onnx`` opset version."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


#: QuantizeLinear/DequantizeLinear exist (per-tensor) from this opset on.
QDQ_OPSET = 10


def _converted(model: ir.Model, minimum: int) -> ir.Model | str:
    """``model`` converted to opset ``minimum``, or the reason the conversion failed."""
    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, minimum)
        onnx.checker.check_model(converted)
    except Exception as exc:
        return f"onnx.version_converter failed: {str(exc).strip().splitlines()[0][:200]}"
    return rebind_external(ir.serde.deserialize_model(converted), model)


def _same_outputs(
    original: ir.Model, converted: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]]
) -> str | None:
    """None when both models compute the same outputs on ``feeds``, else the difference."""
    for feed in feeds:
        try:
            ref, got = run_model(original, feed), run_model(converted, feed)
        except Exception as exc:
            return f"the converted model does not run: {str(exc).splitlines()[0][:200]}"
        for name, r in ref.items():
            c = got.get(name)
            if c is None or np.shape(c) != np.shape(r):
                return f"output {name!r} changed shape in the conversion"
            r64, c64 = np.asarray(r, np.float64), np.asarray(c, np.float64)
            scale = float(np.max(np.abs(r64))) if r64.size else 0.0
            if not np.allclose(c64, r64, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True):
                return f"output {name!r} changed in the conversion"
    return None


def ensure_opset(
    model: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]] = (),
    minimum: int = MIN_OPSET,
) -> tuple[ir.Model, dict[str, Any]]:
    """``model`` at opset >= ``minimum`` when it can be upgraded exactly, else as it is.

    An older model is converted with ``onnx.version_converter``, checked with the checker
    and, on ``feeds``, run against the original (outputs must agree to float rounding: a
    converter adapter that changes semantics is caught here). When any of that fails, the
    model keeps its opset and the caller quantizes weights per tensor (per-channel
    ``axis`` needs opset 13); below opset 10, which has no QuantizeLinear at all, the
    conversion goes to 10 instead.

    Returns:
        The model to quantize and a record: ``from``, ``to``, ``per_channel`` (allowed),
        and ``reason`` when the upgrade was not taken.

    Raises:
        UsageError: an opset below 10 that cannot be converted to 10 either.
    """
    version = default_opset(model)
    record: dict[str, Any] = {"from": version, "to": version, "per_channel": True}
    if version >= minimum:
        return model, record
    attempt = _converted(model, minimum)
    reason = attempt if isinstance(attempt, str) else _same_outputs(model, attempt, feeds)
    if reason is None and not isinstance(attempt, str):
        logger.info("converted the model from opset %d to %d", version, minimum)
        return attempt, {**record, "to": minimum}
    record.update(per_channel=False, reason=f"kept opset {version}, weights per tensor: {reason}")
    logger.warning("opset %d -> %d: %s; weights quantized per tensor", version, minimum, reason)
    if version >= QDQ_OPSET:
        return model, record
    fallback = _converted(model, QDQ_OPSET)
    if isinstance(fallback, str):
        raise UsageError(
            f"the model uses opset {version}, which has no QuantizeLinear, and the "
            f"conversion to opset {QDQ_OPSET} failed: {fallback}"
        )
    return fallback, {**record, "to": QDQ_OPSET}
