"""The calibration data contract used by every command that takes ``--calib PATH``.

``PATH`` is either

* an ``.npz`` file whose keys are the model's input names and whose axis 0 indexes samples:
  an array of rank ``r + 1`` for an input of rank ``r`` gives feeds ``a[i]``; an array of
  the input's own rank (batch axis first) gives one-sample feeds ``a[i:i+1]``; or
* a directory of ``.npz`` files, one feed each (keys = input names, arrays fed as they
  are), read in file-name order; shapes may differ between files (e.g. token lengths).

Everything is validated against the model's inputs before use: names, dtypes and static
dims. A mismatch is refused with a message naming the input, the sample (or file) and the
expected versus given shape or dtype. Empty data is refused, and so are NaN values in a
float input (naming the input, the sample and the count).
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxprune.errors import CalibrationError

__all__ = ["CalibrationData", "InputSpec", "load_calibration", "model_input_specs"]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and dims (ints, or strings for symbolic/unknown)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str, ...]

    def shape_text(self) -> str:
        return "[" + ", ".join(str(d) for d in self.dims) + "]"

    def matches(self, shape: Sequence[int]) -> bool:
        if len(shape) != len(self.dims):
            return False
        return all(not isinstance(d, int) or d == s for d, s in zip(self.dims, shape, strict=True))


def model_input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise CalibrationError(f"model input {value.name!r} has no tensor element type")
        dims: tuple[int | str, ...] = tuple(
            d if isinstance(d, int) else (str(d) if d.value is not None else "?")
            for d in (value.shape or ())
        )
        specs.append(InputSpec(str(value.name), np.dtype(value.dtype.numpy()), dims))
    return specs


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check_array(spec: InputSpec, array: np.ndarray, where: str) -> None:
    if array.dtype != spec.dtype:
        raise CalibrationError(
            f"calibration input {spec.name!r} ({where}): expected dtype {spec.dtype}, "
            f"given {array.dtype}"
        )
    if not spec.matches(array.shape):
        raise CalibrationError(
            f"calibration input {spec.name!r} ({where}): expected shape {spec.shape_text()}, "
            f"given {_shape_text(array.shape)}"
        )


def _refuse_nan(name: str, array: np.ndarray, where: str, per_sample: bool) -> None:
    """Refuse NaN in a float array; ``per_sample``: axis 0 indexes samples (named)."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    nan = np.isnan(array)
    count = int(np.count_nonzero(nan))
    if not count:
        return
    if per_sample and array.ndim:
        first = int(np.argmax(nan.reshape(len(array), -1).any(axis=1)))
        where = f"first in sample {first} of {where}"
    raise CalibrationError(
        f"calibration input {name!r} holds {count} NaN value(s) ({where}); every feed must "
        "be finite"
    )


def _check_names(specs: Sequence[InputSpec], keys: Sequence[str], where: str) -> None:
    names = [s.name for s in specs]
    missing = [n for n in names if n not in keys]
    if missing:
        raise CalibrationError(
            f"calibration data {where}: no array for model input {missing[0]!r} "
            f"(model inputs: {', '.join(names)}; given: {', '.join(keys) or 'none'})"
        )
    unknown = [k for k in keys if k not in names]
    if unknown:
        raise CalibrationError(
            f"calibration data {where}: {unknown[0]!r} is not a model input "
            f"(model inputs: {', '.join(names)})"
        )


def _check_declared_sizes(data: np.lib.npyio.NpzFile, path: Path) -> None:
    """Refuse an array whose header claims more bytes than its member holds, before any
    allocation (a crafted header can claim terabytes)."""
    archive = data.zip
    assert archive is not None  # an NpzFile that np.load opened keeps its archive
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            continue
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        claimed = math.prod(shape) * dtype.itemsize
        if claimed > info.file_size:
            raise CalibrationError(
                f"calibration file {path}: array {info.filename[:-4]!r} claims shape "
                f"{list(shape)} ({claimed} bytes) but holds {info.file_size} bytes"
            )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not a zip archive of named .npy arrays")
        with np.load(path, allow_pickle=False) as data:
            _check_declared_sizes(data, path)
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CalibrationError(f"calibration file {path}: not a readable .npz ({reason})") from None


@dataclasses.dataclass
class CalibrationData:
    """Validated calibration feeds. Iterate :meth:`feeds` for one dict per sample."""

    source: Path
    specs: list[InputSpec]
    _arrays: dict[str, np.ndarray] | None = None
    _files: list[Path] = dataclasses.field(default_factory=list)
    _add_axis: dict[str, bool] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        if self._arrays is not None:
            return len(next(iter(self._arrays.values())))
        return len(self._files)

    def feed(self, index: int) -> dict[str, np.ndarray]:
        """The feed of sample ``index``."""
        if self._arrays is not None:
            # np.asarray: indexing a stacked scalar input gives a numpy scalar, which
            # onnxruntime refuses; it must stay a rank-0 array.
            return {
                name: np.asarray(a[index] if self._add_axis[name] else a[index : index + 1])
                for name, a in self._arrays.items()
            }
        return _read_npz(self._files[index])

    def feeds(self, indices: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feeds in order (all, or those at ``indices``)."""
        for i in range(len(self)) if indices is None else indices:
            yield self.feed(i)

    def subset(self, start: int, stop: int) -> CalibrationData:
        """Samples ``start:stop`` as their own data (whole files of a folder)."""
        if self._arrays is not None:
            arrays = {name: a[start:stop] for name, a in self._arrays.items()}
            return dataclasses.replace(self, _arrays=arrays)
        return dataclasses.replace(self, _files=self._files[start:stop])


def _from_npz(path: Path, specs: list[InputSpec], ignore: Sequence[str] = ()) -> CalibrationData:
    arrays = {k: v for k, v in _read_npz(path).items() if k not in ignore}
    _check_names(specs, list(arrays), str(path))
    counts = {name: a.shape[0] if a.ndim else 0 for name, a in arrays.items()}
    if any(n == 0 for n in counts.values()):
        raise CalibrationError(f"calibration data {path}: no samples (axis 0 is empty)")
    if len(set(counts.values())) > 1:
        raise CalibrationError(
            f"calibration data {path}: inputs have different sample counts on axis 0: {counts}"
        )
    add_axis = {}
    for spec in specs:
        array = arrays[spec.name]
        add_axis[spec.name] = array.ndim == len(spec.dims) + 1
        sample = array[0] if add_axis[spec.name] else array[0:1]
        _check_array(spec, sample, f"sample 0 of {path.name}; axis 0 indexes samples")
        _refuse_nan(spec.name, array, path.name, per_sample=True)
    return CalibrationData(path, specs, _arrays=arrays, _add_axis=add_axis)


def _from_dir(path: Path, specs: list[InputSpec]) -> CalibrationData:
    files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        raise CalibrationError(f"calibration folder {path}: no .npz files")
    for index, file in enumerate(files):
        arrays = _read_npz(file)
        _check_names(specs, list(arrays), str(file))
        for spec in specs:
            _check_array(spec, arrays[spec.name], f"sample {index}, file {file.name}")
            _refuse_nan(spec.name, arrays[spec.name], f"sample {index}, file {file.name}", False)
    return CalibrationData(path, specs, _files=files)


def load_calibration(
    path: str | os.PathLike[str], model: ir.Model, *, ignore: Sequence[str] = ()
) -> CalibrationData:
    """Load and validate calibration data for ``model``.

    ``ignore`` names arrays of an ``.npz`` that are not model inputs and are skipped (an
    evaluation set's ``label``), unless the model has an input of that name.

    Raises:
        CalibrationError: missing path, unreadable file, empty data, or a name, dtype or
            shape mismatch (the message names the input and the sample or file).
    """
    path = Path(path)
    specs = model_input_specs(model)
    if not specs:
        raise CalibrationError("the model has no inputs to calibrate")
    if path.is_dir():
        return _from_dir(path, specs)
    if not path.is_file():
        raise CalibrationError(f"calibration data {path}: no such file or folder")
    names = {s.name for s in specs}
    return _from_npz(path, specs, [k for k in ignore if k not in names])
