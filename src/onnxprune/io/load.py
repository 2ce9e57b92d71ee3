"""Load a model file safely into the ONNX IR.

The protobuf is parsed without external data, every external reference is validated
(:mod:`onnxprune.io.external`), and only then is the IR built; external tensors stay lazy
(memory-mapped on first use), so a multi-GB model loads in a few MB. They are read through
the descriptors opened during validation (:mod:`onnxprune.io.pinned`), never through a
path again, so the current folder and later changes to the model folder cannot matter.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import google.protobuf.message
import onnx
import onnx_ir as ir

from onnxprune.errors import ModelLoadError
from onnxprune.io.compat import check_runtime_support
from onnxprune.io.external import validate_external_data
from onnxprune.io.pinned import bind_external
from onnxprune.io.validate import validate_proto

__all__ = ["SOURCE_FILES_KEY", "load", "source_files"]

logger = logging.getLogger(__name__)

#: ``model.meta`` key listing the real paths a loaded model reads from (model + data files).
SOURCE_FILES_KEY = "onnxprune.source_files"

_MAX_PROTO_BYTES = 2**31 - 1
#: protobuf stops at 100 nested messages; each If/Loop/Scan level takes three.
_MAX_SUBGRAPH_NESTING = 31
_NESTING_ERROR = re.compile(r"MaxDepth|recursion|nest(ing|ed) too deep", re.IGNORECASE)


def _parse(path: Path) -> onnx.ModelProto:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")
    if size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    if size > _MAX_PROTO_BYTES:
        raise ModelLoadError(
            f"{path}: {size} bytes exceeds the 2 GB protobuf limit; large weights must be stored "
            "as external data"
        )
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (google.protobuf.message.DecodeError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if _NESTING_ERROR.search(reason):
            raise ModelLoadError(
                f"{path}: subgraphs (If/Loop/Scan bodies) are nested deeper than the protobuf "
                f"parser allows (about {_MAX_SUBGRAPH_NESTING} levels); onnxprune cannot read "
                "this model"
            ) from None
        raise ModelLoadError(
            f"{path}: not a valid ONNX model (truncated or corrupt protobuf: {reason})"
        ) from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror}") from None
    # Protobuf happily parses many non-ONNX byte strings into a mostly empty message.
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.graph.output:
        raise ModelLoadError(
            f"{path}: not an ONNX model (no IR version, graph or graph outputs found)"
        )
    return proto


def load(path: str | os.PathLike[str], *, check_runtime: bool = True) -> ir.Model:
    """Load an ONNX model, validating external data before reading any of it.

    Args:
        path: The ``.onnx`` file. External data files must sit in its folder (or below it).
        check_runtime: Refuse IR versions and opsets the installed onnxruntime cannot run.

    Returns:
        The model as an ``onnx_ir.Model``; external tensors are loaded lazily.
        ``model.meta[SOURCE_FILES_KEY]`` lists the files it was read from, which
        :func:`onnxprune.save` refuses to overwrite.

    Raises:
        ModelLoadError: missing, truncated, corrupt or non-ONNX files, unsupported opsets.
        UnsafeExternalDataError: an external-data reference fails validation; the message
            names the tensor and the reason.
    """
    path = Path(path)
    proto = _parse(path)
    base_dir = path.parent.absolute()
    validate_proto(proto, str(path), runtime=check_runtime)
    refs = validate_external_data(proto, base_dir)
    if check_runtime:
        check_runtime_support(proto, str(path))
    _refuse_map_types(proto, path)
    _refuse_sparse_tensors(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # the IR raises a variety of errors on malformed graphs
        raise ModelLoadError(f"{path}: malformed ONNX graph: {exc}") from None
    del proto
    bind_external(model, {r.location: r.file for r in refs}, str(base_dir))
    sources = {os.path.realpath(path)} | {os.path.realpath(r.path) for r in refs}
    model.meta[SOURCE_FILES_KEY] = sorted(sources)
    logger.debug("loaded %s (%d external tensors)", path, len(refs))
    return model


def _has_map(type_proto: onnx.TypeProto) -> bool:
    kind = type_proto.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind == "sequence_type":
        return _has_map(type_proto.sequence_type.elem_type)
    if kind == "optional_type":
        return _has_map(type_proto.optional_type.elem_type)
    return False


def _type_text(type_proto: onnx.TypeProto) -> str:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({onnx.helper.tensor_dtype_to_np_dtype(type_proto.tensor_type.elem_type)})"
    if kind == "sequence_type":
        return f"seq({_type_text(type_proto.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({_type_text(type_proto.optional_type.elem_type)})"
    if kind == "map_type":
        key = onnx.helper.tensor_dtype_to_np_dtype(type_proto.map_type.key_type)
        return f"map({key}, {_type_text(type_proto.map_type.value_type)})"
    return str(kind)


def _refuse_map_types(proto: onnx.ModelProto, path: Path) -> None:
    """Map-typed values (scikit-learn's ZipMap output) cannot be represented in onnx-ir 1.1."""
    graph = proto.graph
    for where, values in (
        ("input", graph.input),
        ("output", graph.output),
        ("value", graph.value_info),
    ):
        for value in values:
            if _has_map(value.type):
                raise ModelLoadError(
                    f"{path}: {where} {value.name!r} has a map type "
                    f"({_type_text(value.type)}), which onnxprune cannot "
                    "represent yet; convert a scikit-learn model with skl2onnx's option "
                    "zipmap=False to get a tensor output instead"
                )


def _sparse_in_graph(graph: onnx.GraphProto) -> str | None:
    """What in ``graph`` (or its subgraphs) holds a sparse tensor, or None."""
    for sparse in graph.sparse_initializer:
        return f"sparse initializer {sparse.values.name!r}"
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("sparse_tensor") or attr.sparse_tensors:
                tensor = (
                    attr.sparse_tensor if attr.HasField("sparse_tensor") else attr.sparse_tensors[0]
                )
                label = f" (tensor {tensor.values.name!r})" if tensor.values.name else ""
                return f"node {node.name or node.op_type!r}: attribute {attr.name!r}{label}"
            subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subgraphs:
                found = _sparse_in_graph(sub)
                if found is not None:
                    return found
    return None


def _refuse_sparse_tensors(proto: onnx.ModelProto, path: Path) -> None:
    """Sparse tensors (sparse initializers, ``Constant(sparse_value)``) are not represented
    by onnx-ir 1.1; refuse naming the first one instead of a generic graph error."""
    graphs = [proto.graph, *(onnx.GraphProto(node=f.node) for f in proto.functions)]
    for graph in graphs:
        found = _sparse_in_graph(graph)
        if found is not None:
            raise ModelLoadError(
                f"{path}: {found} is a sparse tensor, which onnxprune cannot represent yet; "
                "store it dense (e.g. onnx.helper.make_tensor with the expanded values)"
            )


def source_files(model: ir.Model) -> list[str]:
    """Real paths the model was loaded from (empty for models built in memory)."""
    return list(model.meta.get(SOURCE_FILES_KEY, []))
