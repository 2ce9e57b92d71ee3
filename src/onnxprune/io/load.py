"""Load a model file safely into the ONNX IR.

The protobuf is parsed without external data, every external reference is validated
(:mod:`onnxprune.io.external`), and only then is the IR built; external tensors stay lazy
(memory-mapped on first use), so a multi-GB model loads in a few MB.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import google.protobuf.message
import onnx
import onnx_ir as ir

from onnxprune.errors import ModelLoadError
from onnxprune.io.compat import check_runtime_support
from onnxprune.io.external import validate_external_data

__all__ = ["SOURCE_FILES_KEY", "load", "source_files"]

logger = logging.getLogger(__name__)

#: ``model.meta`` key listing the real paths a loaded model reads from (model + data files).
SOURCE_FILES_KEY = "onnxprune.source_files"

_MAX_PROTO_BYTES = 2**31 - 1


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
    refs = validate_external_data(proto, base_dir)
    if check_runtime:
        check_runtime_support(proto, str(path))
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # the IR raises a variety of errors on malformed graphs
        raise ModelLoadError(f"{path}: malformed ONNX graph: {exc}") from None
    del proto
    ir.external_data.set_base_dir(model.graph, str(base_dir))
    sources = {os.path.realpath(path)} | {os.path.realpath(r.path) for r in refs}
    model.meta[SOURCE_FILES_KEY] = sorted(sources)
    logger.debug("loaded %s (%d external tensors)", path, len(refs))
    return model


def source_files(model: ir.Model) -> list[str]:
    """Real paths the model was loaded from (empty for models built in memory)."""
    return list(model.meta.get(SOURCE_FILES_KEY, []))
