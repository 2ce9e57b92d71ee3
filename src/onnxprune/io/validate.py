"""Up-front checks of a parsed model, so a bad model is refused in one line naming the culprit.

onnxruntime and numpy refuse many malformed models only deep inside a command, with a
message that names a temporary file or none of the model's tensors. :func:`validate_proto`
runs on the parsed protobuf before anything else (no tensor data is read):

* duplicate initializer names (onnxruntime uses the first copy, the IR the last), duplicate
  node names, a value defined twice;
* tensor dims that are negative or whose element count overflows int64, inline data whose
  size does not match dtype and dims, external-data entries with unknown keys or offsets
  and lengths that are not plain decimal numbers;
* nodes missing a required attribute, operators unknown to their opset, operators from a
  custom domain onnxruntime does not implement, graph inputs and outputs of element types
  onnxruntime's Python API cannot feed or return (bfloat16, float8, 4-bit).

:func:`refuse_unrewritable` is for commands that rewrite weights: NaN/Inf weights and
initializers that are also graph inputs (a caller may override them) are refused.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.errors import ModelLoadError

__all__ = ["refuse_unrewritable", "validate_proto"]

#: Keys onnxruntime accepts in ``TensorProto.external_data`` (others: "model format error!").
EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum"})

#: Domains whose operators onnxruntime implements without a custom-op library.
RUNTIME_DOMAINS = frozenset(
    {
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "com.microsoft",
        "com.microsoft.nchwc",
        "ai.onnx.preview.training",
    }
)

#: Element types without a numpy type in onnxruntime's Python API.
_UNFEEDABLE = frozenset(
    {
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.FLOAT8E4M3FN,
        onnx.TensorProto.FLOAT8E4M3FNUZ,
        onnx.TensorProto.FLOAT8E5M2,
        onnx.TensorProto.FLOAT8E5M2FNUZ,
        onnx.TensorProto.INT4,
        onnx.TensorProto.UINT4,
        getattr(onnx.TensorProto, "FLOAT4E2M1", -1),
        getattr(onnx.TensorProto, "FLOAT8E8M0", -1),
    }
)

_FOUR_BIT = frozenset(
    {
        onnx.TensorProto.INT4,
        onnx.TensorProto.UINT4,
        getattr(onnx.TensorProto, "FLOAT4E2M1", -1),
    }
)

_INT64_MAX = 2**63 - 1

#: Operand positions that hold weights, per op type (NaN/Inf there is refused).
WEIGHT_OPERANDS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2, 3, 4),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
}


def _fail(source: str, message: str) -> ModelLoadError:
    return ModelLoadError(f"{source}: {message}")


def _dtype_name(elem_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()
    except (KeyError, ValueError):
        return f"element type {elem_type}"


# --- graphs, walked with their scope ----------------------------------------------------


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph nested in it (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _graphs(sub)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers, sparse-initializer parts and tensor attributes of ``graph``'s nodes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors


# --- names -------------------------------------------------------------------------------


def _first_duplicate(names: Iterable[str]) -> str | None:
    counts = Counter(n for n in names if n)
    return next((n for n, c in counts.items() if c > 1), None)


def _check_names(graph: onnx.GraphProto, source: str) -> None:
    inits = [t.name for t in graph.initializer] + [s.values.name for s in graph.sparse_initializer]
    dup = _first_duplicate(inits)
    if dup is not None:
        raise _fail(
            source,
            f"initializer {dup!r} is defined more than once (onnxruntime would use the first "
            "copy and other tools the last); give each initializer a unique name",
        )
    dup = _first_duplicate(n.name for n in graph.node)
    if dup is not None:
        raise _fail(source, f"two nodes are named {dup!r}; node names must be unique")
    init_names = set(inits)
    defined = [i.name for i in graph.input if i.name not in init_names] + inits
    defined += [out for node in graph.node for out in node.output]
    dup = _first_duplicate(defined)
    if dup is not None:
        raise _fail(
            source, f"value {dup!r} is defined more than once (inputs, initializers, node outputs)"
        )


# --- tensors -------------------------------------------------------------------------------


def _element_count(tensor: onnx.TensorProto, source: str) -> int:
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            raise _fail(source, f"tensor {tensor.name!r} has a negative dim {dim}")
        count *= dim
        if count > _INT64_MAX:
            raise _fail(
                source,
                f"tensor {tensor.name!r}: dims {list(tensor.dims)} give more elements than int64 "
                "can count",
            )
    return count


def _expected_fields(tensor: onnx.TensorProto, count: int) -> tuple[str, int]:
    """The typed field holding ``tensor``'s values and how many entries it needs."""
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    if tensor.data_type in _FOUR_BIT:
        return field, (count + 1) // 2
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        return field, 2 * count
    return field, count


def _raw_bytes(tensor: onnx.TensorProto, count: int) -> int:
    if tensor.data_type in _FOUR_BIT:
        return (count + 1) // 2
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return count * itemsize


def _lenient_int(text: str) -> bool:
    """True for what Python's ``int`` reads but is no plain decimal ("1_6", " 16", "+16");
    other bad numbers are named by :mod:`onnxprune.io.external`."""
    if re.fullmatch(r"-?[0-9]+", text):
        return False
    try:
        int(text)
    except ValueError:
        return False
    return True


def _check_external_entries(tensor: onnx.TensorProto, source: str) -> None:
    for entry in tensor.external_data:
        if entry.key not in EXTERNAL_KEYS:
            raise _fail(
                source,
                f"tensor {tensor.name!r}: unknown external-data key {entry.key!r} (onnxruntime "
                f"accepts {', '.join(sorted(EXTERNAL_KEYS))})",
            )
        if entry.key in ("offset", "length") and _lenient_int(entry.value):
            raise _fail(
                source,
                f"tensor {tensor.name!r}: external data {entry.key} {entry.value!r} is not a "
                "plain non-negative decimal integer",
            )


def _check_tensor(tensor: onnx.TensorProto, source: str) -> None:
    if tensor.data_type == onnx.TensorProto.UNDEFINED:
        raise _fail(source, f"tensor {tensor.name!r} has no element type")
    try:
        onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError):
        raise _fail(
            source, f"tensor {tensor.name!r} has unknown element type {tensor.data_type}"
        ) from None
    count = _element_count(tensor, source)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        _check_external_entries(tensor, source)
        return
    if tensor.data_type == onnx.TensorProto.STRING:
        given, expected, unit = len(tensor.string_data), count, "strings"
    elif tensor.HasField("raw_data"):
        given, expected, unit = len(tensor.raw_data), _raw_bytes(tensor, count), "bytes"
    else:
        field, expected = _expected_fields(tensor, count)
        given, unit = len(getattr(tensor, field)), f"{field} entries"
    if given != expected:
        raise _fail(
            source,
            f"tensor {tensor.name!r}: holds {given} {unit} but dtype "
            f"{_dtype_name(tensor.data_type)} and dims {list(tensor.dims)} need {expected}",
        )


# --- nodes ---------------------------------------------------------------------------------


def _schema(op: str, domain: str, version: int | None) -> onnx.defs.OpSchema | None:
    if version is None:
        return None
    try:
        return onnx.defs.get_schema(op, version, domain)
    except onnx.defs.SchemaError:
        return None


def _node_text(node: onnx.NodeProto) -> str:
    op = f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
    return f"node {node.name!r} ({op})" if node.name else f"a {op} node"


def _check_node(
    node: onnx.NodeProto,
    opsets: dict[str, int],
    functions: set[tuple[str, str]],
    source: str,
    runtime: bool,
) -> None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    if (node.domain, node.op_type) in functions:
        return
    if domain not in ("", "ai.onnx.ml", "ai.onnx.preview.training"):
        if runtime and domain not in RUNTIME_DOMAINS:
            raise _fail(
                source,
                f"{_node_text(node)} is a custom operator of domain {node.domain!r}, which "
                "onnxruntime does not implement without its custom-op library; onnxprune can "
                "only rewrite models onnxruntime runs",
            )
        return
    version = opsets.get(domain, opsets.get("ai.onnx") if domain == "" else None)
    schema = _schema(node.op_type, domain, version)
    if schema is None:
        raise _fail(
            source,
            f"{_node_text(node)}: operator {node.op_type!r} does not exist in opset "
            f"{domain or 'ai.onnx'} {version}",
        )
    given = {a.name for a in node.attribute}
    for name, attr in sorted(schema.attributes.items()):
        if attr.required and name not in given:
            raise _fail(source, f"{_node_text(node)} lacks its required attribute {name!r}")


def _check_io_types(graph: onnx.GraphProto, source: str) -> None:
    for where, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            if value.type.WhichOneof("value") != "tensor_type":
                continue
            elem = value.type.tensor_type.elem_type
            if elem in _UNFEEDABLE:
                raise _fail(
                    source,
                    f"graph {where} {value.name!r} is {_dtype_name(elem)}, which onnxruntime's "
                    "Python API cannot feed or return; cast it to float32 inside the model",
                )


# --- entry points -------------------------------------------------------------------------


def validate_proto(proto: onnx.ModelProto, source: str, *, runtime: bool = True) -> None:
    """Refuse a malformed model (see the module docstring) naming the tensor or node.

    ``runtime`` adds the checks of what onnxruntime cannot run (custom domains, graph inputs
    and outputs of types its Python API cannot handle).
    """
    opsets = {imp.domain: imp.version for imp in proto.opset_import}
    functions = {(f.domain, f.name) for f in proto.functions}
    for graph in _graphs(proto.graph):
        _check_names(graph, source)
        for tensor in _tensors(graph):
            _check_tensor(tensor, source)
        for node in graph.node:
            _check_node(node, opsets, functions, source, runtime)
    if runtime:
        _check_io_types(proto.graph, source)


def _weight_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for index in WEIGHT_OPERANDS.get(node.op_type, ()) if node.domain == "" else ():
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is not None and value.name is not None:  # a loaded value has a name
                names.add(value.name)
    return names


def _nonfinite_counts(tensor: ir.TensorProtocol) -> tuple[int, int]:
    """(NaN count, Inf count) of a floating-point tensor; (0, 0) for other dtypes."""
    if not tensor.dtype.is_floating_point() or tensor.size == 0:
        return 0, 0
    array = tensor.numpy()
    if array.dtype.kind != "f":  # bfloat16, float8: ml_dtypes
        array = array.astype(np.float32)
    return int(np.count_nonzero(np.isnan(array))), int(np.count_nonzero(np.isinf(array)))


def _names_text(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _refuse_bound_initializers(graph: ir.Graph, source: str) -> None:
    inputs = [v.name for v in graph.inputs if v.name is not None and v.name in graph.initializers]
    if inputs:
        raise _fail(
            source,
            f"initializer {_names_text(inputs)} is also a graph input, so a caller may override "
            "it; onnxprune does not rewrite overridable weights: re-export without "
            "keep_initializers_as_inputs (or drop these names from the graph inputs)",
        )
    outputs = [v.name for v in graph.outputs if v.name is not None and v.name in graph.initializers]
    if outputs:
        raise _fail(
            source,
            f"initializer {_names_text(outputs)} is also a graph output, which a rewrite of "
            "that weight would change; output a copy of it (Identity) instead",
        )


def refuse_unrewritable(model: ir.Model, source: str) -> None:
    """Refuse what a weight-rewriting command must not touch.

    * initializers that are also graph inputs (a caller may override them, so folding,
      pruning or quantizing them would change what that caller gets) or graph outputs;
    * non-finite weights: NaN in any initializer with more than one element, NaN or Inf in
      a weight operand (:data:`WEIGHT_OPERANDS`). Inf elsewhere (attention masks) is kept.
    """
    _refuse_bound_initializers(model.graph, source)
    weights = _weight_names(model)
    for sub in model.graphs():
        for name, value in sub.initializers.items():
            if value.const_value is not None:
                _refuse_nonfinite(name, value.const_value, name in weights, source)


def _refuse_nonfinite(name: str, tensor: ir.TensorProtocol, is_weight: bool, source: str) -> None:
    nan, inf = _nonfinite_counts(tensor)
    if (nan and (is_weight or tensor.size > 1)) or (inf and is_weight):
        raise _fail(
            source,
            f"initializer {name!r} holds {nan} NaN and {inf} Inf values (of {tensor.size}); "
            "refusing to rewrite a model with non-finite weights",
        )
