"""Preconditions and model preparation before quantizing.

* Refuse models that are already quantized (QDQ or QOperator ops present), and models
  whose inputs, outputs or weights are float16/float64/bfloat16 (only float32 models are
  quantized).
* Give unnamed nodes deterministic names (``<op_type>_<index>``): plans, reports and
  ``--exclude`` refer to nodes by name.
* Per-channel QuantizeLinear/DequantizeLinear (``axis``) need opset >= 13: older models are
  converted with ``onnx.version_converter`` and checked with ``onnx.checker``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx
import onnx_ir as ir

from onnxprune.errors import UsageError
from onnxprune.io.pinned import rebind_external
from onnxprune.io.validate import WEIGHT_OPERANDS

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
        if i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].is_initializer()
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


def ensure_opset(model: ir.Model, minimum: int = MIN_OPSET) -> ir.Model:
    """``model`` unchanged, or converted to opset ``minimum`` when it is older.

    Raises:
        UsageError: the conversion fails or produces a model the checker rejects.
    """
    version = default_opset(model)
    if version >= minimum:
        return model
    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, minimum)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise UsageError(
            f"the model uses opset {version}; per-channel quantization needs opset >= {minimum} "
            f"and the conversion failed: {exc}"
        ) from None
    logger.info("converted the model from opset %d to %d", version, minimum)
    return rebind_external(ir.serde.deserialize_model(converted), model)
