"""Atomic writes of small text/binary outputs (reports, plans, plots)."""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from pathlib import Path

from onnxprune.errors import SaveError
from onnxprune.io.outputs import publish, show_path

__all__ = ["write_bytes_atomic", "write_text_atomic"]


def _set_mode(fd: int, dest: Path) -> None:
    """Give the temporary file the mode a plain ``open`` would (mkstemp makes it 0600):
    the mode of the file it replaces, else 0666 less the umask."""
    try:
        mode = stat.S_IMODE(dest.stat().st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)


@functools.cache
def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path`` and rename it into place.

    Raises:
        SaveError: the folder is missing or not writable, or the write failed; no
            temporary file is left behind.
    """
    dest = Path(path).absolute()
    shown = show_path(dest)
    if not dest.parent.is_dir():
        raise SaveError(f"cannot write {shown}: folder {show_path(dest.parent)} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    except OSError as exc:
        raise SaveError(f"cannot write {shown}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            _set_mode(handle.fileno(), dest)
            handle.write(data)
        publish(tmp, dest)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise SaveError(f"cannot write {shown}: {exc.strerror or exc}") from None
        raise
    return dest


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Atomic UTF-8 text write."""
    return write_bytes_atomic(path, text.encode("utf-8"))
