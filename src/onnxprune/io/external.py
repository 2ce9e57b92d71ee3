"""Validation of external-data references, which are untrusted input.

An ONNX file names the files holding its large tensors (``location``, ``offset``,
``length``). Those strings come from whoever produced the file, and ONNX has had repeated
path-traversal CVEs, so every reference is checked with ``lstat``/``stat`` only, before
any byte outside the model file is read:

* the location is a relative path with no ``..`` component, no drive or root, no NUL;
* no component of it (the file or any folder between the model folder and the file) is a
  symbolic link, and the resolved path stays inside the model folder;
* the file exists, is a regular file and has exactly one hard link;
* ``offset`` and ``length`` are non-negative integers and lie within the file;
* ``length`` equals the byte size implied by the tensor's dtype and shape;
* a ``checksum`` entry, when present, is the SHA-1 digest of the file.

Each file is then opened once, folder by folder without following symbolic links
(``O_NOFOLLOW``), and must be the very file that was checked (same device and inode). The
open descriptor is kept (:class:`onnxprune.io.pinned.DataFile`) and every later read goes
through it, so a file swapped for a link after validation is never read.
"""

from __future__ import annotations

import errno
import math
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx

from onnxprune.errors import ModelLoadError, UnsafeExternalDataError
from onnxprune.io.pinned import DataFile

__all__ = ["ExternalRef", "iter_tensor_protos", "validate_external_data"]

# Bits per element of the sub-byte types; all others use their numpy item size.
_SUB_BYTE_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (
        ("INT4", 4),
        ("UINT4", 4),
        ("FLOAT4E2M1", 4),
        ("INT2", 2),
        ("UINT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(onnx.TensorProto, name)
}


class ExternalRef:
    """A validated external-data reference of one tensor."""

    __slots__ = ("file", "length", "location", "offset", "path", "tensor")

    def __init__(
        self, tensor: str, location: str, path: Path, offset: int, length: int, *, file: DataFile
    ) -> None:
        self.tensor = tensor
        self.location = location
        self.path = path
        self.offset = offset
        self.length = length
        self.file = file


def iter_tensor_protos(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every TensorProto in the model: initializers, sparse parts, attributes, subgraphs."""

    def from_graph(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto]]:
        for tensor in graph.initializer:
            yield tensor.name, tensor
        for sparse in graph.sparse_initializer:
            yield sparse.values.name, sparse.values
            yield sparse.indices.name or f"{sparse.values.name}.indices", sparse.indices
        yield from from_nodes(graph.node)

    def from_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[tuple[str, onnx.TensorProto]]:
        for node in nodes:
            for attr in node.attribute:
                where = f"attribute {attr.name!r} of node {node.name or node.op_type!r}"
                if attr.HasField("t"):
                    yield attr.t.name or where, attr.t
                for tensor in attr.tensors:
                    yield tensor.name or where, tensor
                if attr.HasField("g"):
                    yield from from_graph(attr.g)
                for sub in attr.graphs:
                    yield from from_graph(sub)

    yield from from_graph(model.graph)
    for function in model.functions:
        yield from from_nodes(function.node)


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dtype and dims imply, or None when not fixed (strings)."""
    numel = math.prod(tensor.dims)
    bits = _SUB_BYTE_BITS.get(tensor.data_type)
    if bits is not None:
        return (numel * bits + 7) // 8
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return numel * itemsize


def _check_location(name: str, location: str) -> tuple[str, ...]:
    """Return the location's path components, refusing anything that could escape."""

    def refuse(reason: str) -> UnsafeExternalDataError:
        return UnsafeExternalDataError(
            f"tensor {name!r}: external data location {location!r} {reason}; refusing to load"
        )

    if not location:
        raise refuse("is empty")
    if "\x00" in location:
        raise refuse("contains a NUL byte")
    win = PureWindowsPath(location)
    if location.startswith(("/", "\\")) or win.drive or win.root:
        raise refuse("is an absolute path")
    parts = tuple(p for p in location.replace("\\", "/").split("/") if p not in ("", "."))
    if not parts:
        raise refuse("names no file")
    if ".." in parts:
        raise refuse("contains '..' (path traversal)")
    if PurePosixPath(*parts).is_absolute():
        raise refuse("is an absolute path")
    return parts


def _check_file(
    name: str, location: str, base_dir: Path, parts: tuple[str, ...]
) -> tuple[Path, os.stat_result]:
    """lstat every component below ``base_dir``: no links, a regular single-link file.

    Returns the path and the file's ``lstat`` result.
    """
    current = base_dir
    for i, part in enumerate(parts):
        current = current / part
        try:
            info = current.lstat()
        except FileNotFoundError:
            raise UnsafeExternalDataError(
                f"tensor {name!r}: external data file {location!r} does not exist "
                f"(looked for {current})"
            ) from None
        if stat.S_ISLNK(info.st_mode):
            what = "file" if i == len(parts) - 1 else f"folder {part!r} on its path"
            raise UnsafeExternalDataError(
                f"tensor {name!r}: external data {what} of {location!r} is a symbolic link; "
                "refusing to follow it"
            )
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeExternalDataError(
            f"tensor {name!r}: external data {location!r} is not a regular file"
        )
    if info.st_nlink != 1:
        raise UnsafeExternalDataError(
            f"tensor {name!r}: external data file {location!r} has {info.st_nlink} hard links; "
            "refusing a file that may alias one outside the model folder"
        )
    real_base = os.path.realpath(base_dir)
    real = os.path.realpath(current)
    if os.path.commonpath([real_base, real]) != real_base:
        raise UnsafeExternalDataError(
            f"tensor {name!r}: external data {location!r} resolves outside the model folder"
        )
    return current, info


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# O_NONBLOCK: a FIFO swapped in after the lstat check must not block the open.
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def _open_nofollow(base_dir: Path, parts: tuple[str, ...]) -> int:
    """Open ``base_dir/parts`` read-only, following no symbolic link below ``base_dir``."""
    if os.open not in os.supports_dir_fd or not _NOFOLLOW:
        return os.open(base_dir.joinpath(*parts), _FILE_FLAGS)
    dir_fd = os.open(base_dir, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            child = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = child
        return os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _open_file(
    name: str, location: str, base_dir: Path, parts: tuple[str, ...], checked: os.stat_result
) -> DataFile:
    """Open the checked file once and make sure it is still the file that was checked."""
    try:
        fd = _open_nofollow(base_dir, parts)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise UnsafeExternalDataError(
                f"tensor {name!r}: external data {location!r} became a symbolic link after "
                "it was checked; refusing to follow it"
            ) from None
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise ModelLoadError(
                f"tensor {name!r}: cannot open external data {location!r}: too many open "
                "files (raise the limit with `ulimit -n`)"
            ) from None
        raise UnsafeExternalDataError(
            f"tensor {name!r}: cannot open external data {location!r}: {exc.strerror}"
        ) from None
    file = DataFile(fd, location)
    info = os.fstat(fd)
    same = file.identity == (checked.st_dev, checked.st_ino)
    if not same or not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        file.close()
        raise UnsafeExternalDataError(
            f"tensor {name!r}: external data file {location!r} was replaced while it was "
            "being checked; refusing to load"
        )
    return file


def _parse_int(name: str, key: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise UnsafeExternalDataError(
            f"tensor {name!r}: external data {key} {raw!r} is not an integer"
        ) from None
    if value < 0:
        raise UnsafeExternalDataError(f"tensor {name!r}: external data {key} {value} is negative")
    return value


def _check_range(
    name: str, location: str, entries: dict[str, str], size: int
) -> tuple[int, int | None]:
    """Validate offset and length against the file size; returns both (length may be None)."""
    offset = _parse_int(name, "offset", entries.get("offset", "0"))
    if offset > size:
        raise UnsafeExternalDataError(
            f"tensor {name!r}: external data offset {offset} is beyond the end of "
            f"{location!r} ({size} bytes)"
        )
    length = _parse_int(name, "length", entries["length"]) if "length" in entries else None
    if length is not None and offset + length > size:
        raise UnsafeExternalDataError(
            f"tensor {name!r}: external data offset {offset} + length {length} is beyond "
            f"the end of {location!r} ({size} bytes)"
        )
    return offset, length


def _check_size(name: str, tensor: onnx.TensorProto, actual: int) -> int:
    """The byte size the dtype and shape need, which must equal ``actual``."""
    expected = _expected_nbytes(tensor)
    if expected is None:
        raise UnsafeExternalDataError(
            f"tensor {name!r}: external data is not supported for this tensor type"
        )
    if actual != expected:
        raise UnsafeExternalDataError(
            f"tensor {name!r}: external data holds {actual} bytes but dtype "
            f"{onnx.TensorProto.DataType.Name(tensor.data_type)} and shape "
            f"{list(tensor.dims)} need {expected}"
        )
    return expected


def _check_checksum(name: str, location: str, entries: dict[str, str], file: DataFile) -> None:
    """A recorded ``checksum`` (SHA-1 of the data file, per the ONNX spec) must match."""
    recorded = entries.get("checksum")
    if recorded is None:
        return
    actual = file.sha1()
    if recorded.strip().lower() != actual:
        raise UnsafeExternalDataError(
            f"tensor {name!r}: external data file {location!r} has SHA-1 {actual}, but the "
            f"model records checksum {recorded[:64]!r}; the file is not the one the model "
            "was saved with"
        )


def validate_external_data(model: onnx.ModelProto, base_dir: Path) -> list[ExternalRef]:
    """Check every external-data reference of ``model`` relative to ``base_dir``.

    Each data file is opened once (see the module doc); the returned references carry the
    open :class:`DataFile` their tensor must be read through.

    Raises:
        UnsafeExternalDataError: naming the tensor and the reason, for the first bad reference.
    """
    refs = []
    files: dict[tuple[str, ...], DataFile] = {}
    for name, tensor in iter_tensor_protos(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        parts = _check_location(name, location)
        path, checked = _check_file(name, location, base_dir, parts)
        file = files.get(parts)
        if file is None:
            file = files[parts] = _open_file(name, location, base_dir, parts, checked)
        elif file.identity != (checked.st_dev, checked.st_ino):
            raise UnsafeExternalDataError(
                f"tensor {name!r}: external data file {location!r} was replaced while the "
                "model was being loaded; refusing to load"
            )
        offset, length = _check_range(name, location, entries, file.size)
        expected = _check_size(name, tensor, length if length is not None else file.size - offset)
        _check_checksum(name, location, entries, file)
        refs.append(ExternalRef(name, location, path, offset, expected, file=file))
    return refs
