"""Shape inference that keeps symbolic dims and never reads weight bytes.

``infer_shapes`` runs onnx's C++ shape inference (with data propagation, so a Reshape whose
target is computed from ``Shape`` arithmetic resolves) on a *stripped* serialization of the
model: every initializer larger than :data:`SMALL_TENSOR_BYTES`, and every initializer whose
data is external or lazily loaded, is declared as a typed graph input instead of being
serialized. Tensor bytes of such initializers are never read, so a model loaded with lazy
external data can be analysed without touching its weight files. The one exception: int32 /
int64 initializers of at most :data:`SMALL_TENSOR_BYTES` (Reshape targets, axes) are read
even when stored externally, because data propagation needs their values.

The caller's model is **not modified**: the result is a new ``ir.Model`` whose structure comes
from the inferred proto and whose initializers hold the *same* tensor objects as the input
(shared, neither copied nor read). Contrast ``onnx_ir.passes.common.ShapeInferencePass``,
which works in place and, while it runs, temporarily detaches the initializers of the
caller's model.

Symbolic dims (``"batch"``) stay symbolic unless the caller binds them with ``dims``
(``{"batch": 1, "seq": 128}``) or replaces whole input shapes with ``overrides``; binding
happens before inference, so downstream shapes (and data-propagated Reshape targets)
become concrete.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.errors import UsageError

__all__ = ["SMALL_TENSOR_BYTES", "ShapeLike", "infer_shapes", "shape_tuple"]

logger = logging.getLogger(__name__)

#: Initializers up to this size (in memory, not external) are serialized for inference, so
#: small shape/axes constants feed data propagation. Larger ones become typed inputs.
SMALL_TENSOR_BYTES = 1024

ShapeLike = Sequence[int | str | None]

_INTEGER_DTYPES = frozenset({ir.DataType.INT32, ir.DataType.INT64})


def infer_shapes(
    model: ir.Model,
    overrides: Mapping[str, ShapeLike] | None = None,
    *,
    dims: Mapping[str, int] | None = None,
    data_prop: bool = True,
) -> ir.Model:
    """Return a copy of ``model`` with inferred value shapes and dtypes; the input is untouched.

    Args:
        model: The model to analyse. It is not modified; its main-graph initializer tensors
            are shared with the result (not copied) and only small integer ones are read.
            Subgraph initializers (If/Loop bodies) in the result are copies.
        overrides: Replacement shapes for graph inputs by input name, e.g.
            ``{"x": ["batch", 3, 224, 224]}``. A string is a symbolic dim, ``None`` an
            unknown dim.
        dims: Values for symbolic dims by name, e.g. ``{"batch": 1, "seq": 128}``, applied
            to every input, output and recorded value shape before inference.
        data_prop: Let onnx propagate constant data (``Shape`` -> arithmetic -> ``Reshape``).

    Returns:
        A new model whose values carry the inferred shapes. If onnx's inference fails, a
        warning is logged and the copy carries only the shapes the input already had.

    Raises:
        UsageError: ``overrides`` names something that is not a graph input.
    """
    proto, stripped = _stripped_proto(model)
    _apply_overrides(proto.graph, model, overrides or {})
    if dims:
        _bind_dims(proto.graph, dims)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            proto, check_type=False, strict_mode=False, data_prop=data_prop
        )
    except Exception as error:  # onnx raises several unrelated types here
        logger.warning("onnx shape inference failed, shapes left as given: %s", error)
        inferred = proto
    result = ir.serde.deserialize_model(inferred)
    _reattach_initializers(result, model, stripped)
    return result


def shape_tuple(shape: ir.Shape | None) -> tuple[int | str | None, ...] | None:
    """A JSON-friendly tuple of a shape: ints, symbolic names, ``None`` for unknown dims."""
    if shape is None:
        return None
    out: list[int | str | None] = []
    for dim in shape:
        if isinstance(dim, int):
            out.append(dim)
        else:
            out.append(dim.value)
    return tuple(out)


def _keep_inline(value: ir.Value) -> bool:
    """True if the initializer's data may be serialized for inference (small, in memory)."""
    tensor = value.const_value
    if tensor is None or isinstance(tensor, (ir.ExternalTensor, ir.LazyTensor)):
        return False
    return tensor.nbytes <= SMALL_TENSOR_BYTES


def _small_external_constant(value: ir.Value) -> np.ndarray | None:
    """Data of a small integer initializer stored outside the proto, else ``None``.

    Such tensors are shape, axes or index constants that data propagation needs; reading a
    few bytes of them is the one exception to "never read tensor data".
    """
    tensor = value.const_value
    if not isinstance(tensor, (ir.ExternalTensor, ir.LazyTensor)):
        return None
    if tensor.dtype not in _INTEGER_DTYPES or tensor.nbytes > SMALL_TENSOR_BYTES:
        return None
    try:
        return tensor.numpy()
    except (OSError, ValueError) as error:
        logger.debug("cannot read small constant %s: %s", value.name, error)
        return None


def _stripped_proto(model: ir.Model) -> tuple[onnx.ModelProto, list[str]]:
    """Serialize ``model`` without large or external initializer data.

    Uses an ``ir.GraphView`` over the same nodes, so the model itself is not changed.
    Returns the proto and the names of the initializers turned into inputs.
    """
    graph = model.graph
    inline = [v for v in graph.initializers.values() if _keep_inline(v)]
    stripped = [v for v in graph.initializers.values() if not _keep_inline(v)]
    constants = {v.name: _small_external_constant(v) for v in stripped}
    read = {name: array for name, array in constants.items() if array is not None and name}
    stripped = [v for v in stripped if v.name not in read]
    extra_inputs = [v for v in stripped if v not in graph.inputs]
    view = ir.GraphView(
        inputs=[*graph.inputs, *extra_inputs],
        outputs=graph.outputs,
        nodes=graph,
        initializers=inline,
        name=graph.name,
    )
    proto = onnx.ModelProto(ir_version=model.ir_version)
    if model.producer_name:
        proto.producer_name = model.producer_name
    if model.producer_version:
        proto.producer_version = model.producer_version
    for domain, version in sorted(model.opset_imports.items()):
        proto.opset_import.add(domain=domain, version=version)
    # onnx_ir's GraphView does not match its own GraphViewProtocol (doc_string: str | None,
    # read-only meta), though serialize_graph_into documents it as accepted.
    ir.serde.serialize_graph_into(proto.graph, view, model_ir_version=model.ir_version)  # type: ignore[arg-type]
    for function in model.functions.values():
        proto.functions.append(ir.serde.serialize_function(function))
    for name, array in read.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    _type_from_tensors(proto.graph, extra_inputs)
    _stand_in_for_contrib_ops(proto.graph)
    return proto, [v.name for v in stripped if v.name is not None]


#: onnxruntime contrib ops that onnx's shape inference does not know, and the standard op
#: with the same output shape used in their place *for inference only* (input 0 keeps its
#: shape; BiasGelu adds a broadcast bias, like Add).
_CONTRIB_STAND_INS = {
    "Gelu": ("Identity", 1),
    "QuickGelu": ("Identity", 1),
    "FastGelu": ("Identity", 1),
    "BiasGelu": ("Add", 2),
}


def _stand_in_for_contrib_ops(graph: onnx.GraphProto) -> None:
    """Replace shape-preserving com.microsoft activations (as written by our fusions) by
    standard ops with the same output shape, so inference continues past them."""
    for node in graph.node:
        if node.domain != "com.microsoft" or node.op_type not in _CONTRIB_STAND_INS:
            continue
        op_type, arity = _CONTRIB_STAND_INS[node.op_type]
        inputs = list(node.input)[:arity]
        node.op_type, node.domain = op_type, ""
        del node.input[:]
        node.input.extend(inputs)
        del node.attribute[:]


def _type_from_tensors(graph: onnx.GraphProto, values: Iterable[ir.Value]) -> None:
    """Give stripped initializers without a recorded type the type of their tensor.

    The type comes from the tensor header (dtype, shape); an ``ExternalTensor`` knows it
    without reading its data.
    """
    by_name = {v.name: v for v in values if v.const_value is not None}
    for info in graph.input:
        value = by_name.get(info.name)
        if value is None or info.type.HasField("tensor_type"):
            continue
        tensor = value.const_value
        assert tensor is not None
        typed = onnx.helper.make_tensor_value_info(
            info.name, tensor.dtype.value, list(tensor.shape.numpy())
        )
        info.CopyFrom(typed)


def _apply_overrides(
    graph: onnx.GraphProto, model: ir.Model, overrides: Mapping[str, ShapeLike]
) -> None:
    inputs = {v.name for v in model.graph.inputs if v.name is not None}
    unknown = sorted(set(overrides) - inputs)
    if unknown:
        raise UsageError(
            f"shape overrides name unknown inputs {unknown}; inputs are {sorted(inputs)}"
        )
    for info in graph.input:
        if info.name not in overrides:
            continue
        tensor_type = info.type.tensor_type
        tensor_type.ClearField("shape")
        tensor_type.shape.SetInParent()
        for dim in overrides[info.name]:
            entry = tensor_type.shape.dim.add()
            if isinstance(dim, int):
                entry.dim_value = dim
            elif isinstance(dim, str):
                entry.dim_param = dim


def _bind_dims(graph: onnx.GraphProto, dims: Mapping[str, int]) -> None:
    """Replace symbolic dims named in ``dims`` by their values in every recorded shape."""
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if not info.type.HasField("tensor_type"):
            continue
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in dims:
                dim.dim_value = int(dims[dim.dim_param])


def _reattach_initializers(result: ir.Model, source: ir.Model, stripped: Sequence[str]) -> None:
    """Make ``result`` hold the source's initializers (same tensor objects, same order)."""
    graph = result.graph
    values = ir.convenience.create_value_mapping(graph)
    # Stripped initializers were appended as extra inputs; drop those again.
    while len(graph.inputs) > len(source.graph.inputs):
        graph.inputs.pop()
    graph.initializers.clear()
    for name, original in source.graph.initializers.items():
        value = values.get(name)
        if value is None:  # unused initializer: inference may not mention it
            value = ir.Value(name=name, shape=original.shape, type=original.type)
        value.const_value = original.const_value
        if value.shape is None and original.shape is not None:
            value.shape = original.shape
        graph.initializers.add(value)
    logger.debug("re-attached %d initializers, %d stripped", len(graph.initializers), len(stripped))
