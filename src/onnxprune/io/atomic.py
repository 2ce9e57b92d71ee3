"""Atomic writes of small text/binary outputs (reports, plans, plots)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from onnxprune.errors import SaveError

__all__ = ["write_bytes_atomic", "write_text_atomic"]


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path`` and rename it into place."""
    dest = Path(path).absolute()
    if not dest.parent.is_dir():
        raise SaveError(f"cannot write {dest}: folder {dest.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, dest)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SaveError(f"cannot write {dest}: {exc}") from exc
    return dest


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Atomic UTF-8 text write."""
    return write_bytes_atomic(path, text.encode("utf-8"))
