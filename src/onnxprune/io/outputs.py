"""One rule for every file a run writes, checked once before any work.

A command declares the files it reads (:class:`Source`: models, calibration and evaluation
data, plans, recipes) and the files it writes (:class:`Target`: models, reports, plans,
plots). :func:`check_run_files` resolves them all (real paths, so ``./sub/../m.onnx``,
symbolic links and hard links are caught) and refuses, with one line naming both paths,

* an output that is an input file, one of an input model's external-data files or a file
  of an input folder;
* an output that is another output of the same run (an ``.onnx`` output also owns its
  ``OUT.onnx.data`` file);
* an output that is a folder, or whose folder is missing or not writable.

:func:`output_transaction` then makes the run's outputs one unit: every file published
while it is active (by :func:`onnxprune.io.save` and the atomic writers) is recorded with a
backup of what it replaced, and when the run fails (an error, Ctrl-C, SIGTERM) every output
is rolled back: written all, or none.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import onnx

from onnxprune.errors import SaveError
from onnxprune.io.external import iter_tensor_protos

__all__ = [
    "RunFiles",
    "Source",
    "Target",
    "check_run_files",
    "data_file_name",
    "output_transaction",
    "publish",
    "show_path",
]


def data_file_name(path: str | os.PathLike[str]) -> str:
    """The external data file name generated for an output model path."""
    return Path(path).name + ".data"


def show_path(path: str | os.PathLike[str]) -> str:
    """A path for a one-line message (control characters escaped)."""
    text = os.fspath(path)
    return text if text.isprintable() else repr(text)[1:-1]


@dataclasses.dataclass(frozen=True)
class Source:
    """A file or folder the run reads; ``model`` expands to its external-data files."""

    what: str
    path: str | os.PathLike[str]
    model: bool = False


@dataclasses.dataclass(frozen=True)
class Target:
    """A file the run writes, named by its option (``-o``, ``--report``)."""

    option: str
    path: str | os.PathLike[str]
    model: bool = False


@dataclasses.dataclass
class RunFiles:
    """Every input and output path of one run (``None`` paths are options not given)."""

    sources: list[Source] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)

    def read(
        self, what: str, path: str | os.PathLike[str] | None, *, model: bool = False
    ) -> RunFiles:
        """Add an input (skipped when ``path`` is None or empty)."""
        if path:
            self.sources.append(Source(what, os.fspath(path), model))
        return self

    def write(
        self, option: str, path: str | os.PathLike[str] | None, *, model: bool = False
    ) -> RunFiles:
        """Add an output (skipped when ``path`` is None or empty)."""
        if path:
            self.targets.append(Target(option, os.fspath(path), model))
        return self


def _model_data_files(path: Path) -> list[Path]:
    """External-data files an ONNX file names (best effort: a model that cannot be parsed
    lists none, and its load reports the error)."""
    try:
        if not path.is_file():
            return []
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # any unreadable model is reported by its own load
        return []
    files = set()
    for _, tensor in iter_tensor_protos(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value and "\x00" not in entry.value:
                    files.add(path.parent / entry.value)
    return sorted(files)


def _source_files(source: Source) -> list[tuple[str, Path]]:
    """(description, path) of every file behind an input."""
    path = Path(source.path)
    entries = [(source.what, path)]
    if source.model:
        entries += [(f"a data file of {source.what}", p) for p in _model_data_files(path)]
    elif path.is_dir():
        with contextlib.suppress(OSError):
            entries += [(f"a file of {source.what}", p) for p in sorted(path.iterdir())]
    return entries


def _target_files(target: Target) -> list[tuple[str, Path]]:
    """(option, path) of every file an output writes (a model also writes OUT.data)."""
    path = Path(target.path)
    entries = [(target.option, path)]
    if target.model:
        entries.append((f"{target.option}'s data file", path.with_name(data_file_name(path))))
    return entries


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_writable(option: str, path: Path) -> None:
    shown = show_path(path)
    if path.is_dir():
        raise SaveError(f"{option} {shown}: is a directory; nothing written")
    folder = path.absolute().parent
    if not folder.is_dir():
        raise SaveError(
            f"{option} {shown}: folder {show_path(folder)} does not exist; nothing written"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SaveError(
            f"{option} {shown}: folder {show_path(folder)} is not writable; nothing written"
        )


def check_run_files(files: RunFiles) -> None:
    """Refuse, before any work, outputs that clash with an input or with each other.

    Raises:
        SaveError: one line naming the output and the input (or other output) it resolves
            to, or why the output's folder cannot be written; exit code 2.
    """
    inputs = [entry for source in files.sources for entry in _source_files(source)]
    written: list[tuple[str, Path]] = []
    for target in files.targets:
        _check_writable(target.option, Path(target.path))
        for option, path in _target_files(target):
            for what, source in inputs:
                if _same_file(path, source):
                    raise SaveError(
                        f"{option} {show_path(path)}: is {what} ({show_path(source)}); "
                        "refusing to overwrite it, choose another output path; nothing written"
                    )
            for other, earlier in written:
                if _same_file(path, earlier):
                    raise SaveError(
                        f"{option} {show_path(path)}: is the same file as {other} "
                        f"{show_path(earlier)}; give each output its own path; nothing written"
                    )
        written += _target_files(target)


class _Transaction:
    """Outputs published so far, with what they replaced, for an all-or-none run."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self._covered = {os.path.realpath(p) for p in paths}
        self._undo: list[tuple[Path, Path | None]] = []
        self._seen: set[str] = set()

    def covers(self, dest: Path) -> bool:
        return os.path.realpath(dest) in self._covered

    def before_replace(self, dest: Path) -> None:
        """Keep what ``dest`` holds now (once per run), to restore it on rollback."""
        key = os.path.realpath(dest)
        if key in self._seen:
            return
        self._seen.add(key)
        backup = None
        if os.path.lexists(dest):
            backup = dest.with_name(f".{dest.name}.bak-{secrets.token_hex(4)}")
            try:
                os.link(dest, backup, follow_symlinks=False)
            except (OSError, NotImplementedError):  # no hard links here: copy instead
                shutil.copy2(dest, backup, follow_symlinks=False)
        self._undo.append((dest, backup))

    def commit(self) -> None:
        for _, backup in self._undo:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()
        self._undo.clear()

    def rollback(self) -> None:
        for dest, backup in reversed(self._undo):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, dest)
                else:
                    dest.unlink()
        self._undo.clear()


_ACTIVE: contextvars.ContextVar[_Transaction | None] = contextvars.ContextVar(
    "onnxprune_output_transaction", default=None
)


def publish(tmp: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Move a fully written temporary file into place (``os.replace``), recording it in the
    active output transaction when ``dest`` is one of the run's outputs."""
    dest = Path(dest)
    transaction = _ACTIVE.get()
    if transaction is not None and transaction.covers(dest):
        transaction.before_replace(dest)
    os.replace(tmp, dest)


@contextlib.contextmanager
def output_transaction(
    files: RunFiles, *, keep_on: Sequence[type[BaseException]] = ()
) -> Iterator[None]:
    """Check ``files`` (:func:`check_run_files`), then run the block as one unit of output.

    Outputs published inside the block stay when it ends normally, or by an exception of a
    type in ``keep_on`` (a failed verification keeps its report); any other exception,
    KeyboardInterrupt included, restores every output to what it was before the run.
    """
    check_run_files(files)
    paths = [path for target in files.targets for _, path in _target_files(target)]
    transaction = _Transaction(paths)
    token = _ACTIVE.set(transaction)
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, tuple(keep_on)):
            transaction.commit()
        else:
            transaction.rollback()
        raise
    else:
        transaction.commit()
    finally:
        _ACTIVE.reset(token)
