"""Save a model atomically, with external data when it is large.

The model is written into a temporary folder beside the destination and moved into place
with ``os.replace`` (data file first, model file last), so a reader never sees a half
written model and a failed save leaves nothing behind. The input model and its data files
are never overwritten. The external data file name is generated from the output name
(``out.onnx`` -> ``out.onnx.data``), never copied from the input. Serialization is
deterministic: the same model and options give byte-identical files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import onnx_ir as ir

from onnxprune.errors import SaveError
from onnxprune.io.load import source_files
from onnxprune.io.outputs import data_file_name, publish, show_path

__all__ = ["EXTERNAL_DATA_THRESHOLD", "TENSOR_EXTERNAL_MIN_BYTES", "data_file_name", "save"]

logger = logging.getLogger(__name__)

#: Models whose initializers total more than this are saved with external data.
EXTERNAL_DATA_THRESHOLD = 1 << 30
#: With external data, tensors smaller than this stay inside the model file.
TENSOR_EXTERNAL_MIN_BYTES = 1024


def _initializers(model: ir.Model) -> list[ir.Value]:
    return [v for graph in model.graphs() for v in graph.initializers.values()]


def _same_file(a: Path, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _protected_files(model: ir.Model, extra: Iterable[str | os.PathLike[str]]) -> list[str]:
    files = set(source_files(model)) | {os.path.realpath(p) for p in extra}
    for value in _initializers(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add(os.path.realpath(tensor.path))
    return sorted(files)


def _refuse_overwrite(
    model: ir.Model, targets: list[Path], protect: Iterable[str | os.PathLike[str]]
) -> None:
    protected = _protected_files(model, protect)
    for target in targets:
        if not target.exists():
            continue
        for source in protected:
            if _same_file(target, source):
                raise SaveError(
                    f"refusing to write {show_path(target)}: it is the input model or one of "
                    f"its data files ({show_path(source)}); choose another output path"
                )


@contextlib.contextmanager
def _inlined_external_tensors(model: ir.Model) -> Iterator[None]:
    """Temporarily replace external tensors by in-memory copies (restored afterwards)."""
    saved = []
    for value in _initializers(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            saved.append((value, tensor))
            value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
    try:
        yield
    finally:
        for value, tensor in saved:
            value.const_value = tensor


def _release_after_write(tensor: ir.TensorProtocol, _info: object) -> None:
    # Drop the memory map of a copied external tensor so resident memory stays bounded.
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    threshold_bytes: int = EXTERNAL_DATA_THRESHOLD,
    before_commit: Callable[[Path], None] | None = None,
    protect: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``model`` to ``path`` atomically.

    Args:
        model: The model to save; it is not modified.
        path: Destination ``.onnx`` file. Its folder must exist.
        external_data: Force (True) or forbid (False) external data; by default it is used
            when the initializers total more than ``threshold_bytes``.
        threshold_bytes: Size above which external data is used automatically.
        before_commit: Called with the path of the fully written temporary model before it
            is moved into place; an exception it raises aborts the save and nothing is
            written (used to verify a rewritten model before publishing it).
        protect: Further files never to overwrite, besides the files ``model`` was loaded
            from (the input of a run whose model was rebuilt or reloaded from a temporary
            file).

    Returns:
        The destination path.

    Raises:
        SaveError: the destination folder is missing, the destination is the input model
            or one of its data files, or the write failed.
    """
    dest = Path(path).absolute()
    if not dest.parent.is_dir():
        raise SaveError(f"cannot write {dest}: folder {dest.parent} does not exist")
    data_name = data_file_name(dest)
    data_dest = dest.parent / data_name
    _refuse_overwrite(model, [dest, data_dest], protect)
    total = sum(v.const_value.nbytes for v in _initializers(model) if v.const_value is not None)
    use_external = external_data if external_data is not None else total > threshold_bytes
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as exc:
        raise SaveError(f"cannot write {show_path(dest)}: {exc.strerror or exc}") from None
    try:
        tmp_model = tmp_dir / dest.name
        if use_external:
            ir.save(
                model,
                tmp_model,
                external_data=data_name,
                size_threshold_bytes=TENSOR_EXTERNAL_MIN_BYTES,
                callback=_release_after_write,
            )
        else:
            with _inlined_external_tensors(model):
                ir.save(model, tmp_model)
        if before_commit is not None:
            before_commit(tmp_model)
        tmp_data = tmp_dir / data_name
        if tmp_data.exists() and tmp_data.stat().st_size > 0:
            publish(tmp_data, data_dest)
        publish(tmp_model, dest)
    except (OSError, ValueError) as exc:
        raise SaveError(f"cannot write {show_path(dest)}: {exc}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.debug("saved %s (%d bytes of tensors, external=%s)", dest, total, use_external)
    return dest
