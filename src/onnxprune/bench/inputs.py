"""The one feed a benchmark runs on: a calibration sample, or generated from the inputs.

* With calibration data, the first sample is used; with ``batch`` B > 1, the first B samples
  (cycled if there are fewer) are concatenated on axis 0. ``shapes``/``dims`` are refused
  then, since the data fixes the shapes.
* Without it, each input is generated (:func:`onnxprune.feeds.synthetic_feeds`, fixed seed)
  at a shape from ``shapes[name]`` if given, else from the model with ``batch`` binding a
  symbolic first axis and ``dims`` binding the other symbolic dims. Dims still symbolic
  then take the model's ``defaults`` (:func:`onnxprune.analysis.dims.input_dim_defaults`:
  1 on a leading axis, a size a consumer's weight fixes elsewhere). A symbolic dim left
  unbound is a :class:`~onnxprune.errors.UsageError` naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from onnxprune.analysis.dims import DimDefault, dim_key
from onnxprune.calib import CalibrationData, InputSpec
from onnxprune.errors import UsageError
from onnxprune.feeds import synthetic_feeds

__all__ = ["bench_feed", "parse_shape", "samples_per_run"]

_DIMS = re.compile(r"^\[?\s*\d+(\s*[x,]\s*\d+)*\s*\]?$")


def parse_shape(item: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME:DIMS`` (``input:1x3x224x224`` or ``input:1,3,224,224``)."""
    name, sep, text = item.rpartition(":")
    text = text.strip()
    if not sep or not name or not _DIMS.match(text):
        raise UsageError(
            f"--shape {item!r}: expected NAME:DIMS, e.g. input:1x3x224x224 or ids:1,128"
        )
    dims = tuple(int(d) for d in re.split(r"[x,]", text.strip("[] ")))
    if any(d <= 0 for d in dims):
        raise UsageError(f"--shape {item!r}: dimensions must be positive")
    return name, dims


def _given_shape(spec: InputSpec, shape: tuple[int, ...]) -> InputSpec:
    if len(shape) != len(spec.dims):
        raise UsageError(
            f"--shape for input {spec.name!r}: rank {len(shape)} given, the model input "
            f"{spec.shape_text()} has rank {len(spec.dims)}"
        )
    if not spec.matches(shape):
        raise UsageError(
            f"--shape for input {spec.name!r}: {list(shape)} does not fit the model input "
            f"{spec.shape_text()}"
        )
    return InputSpec(spec.name, spec.dtype, shape)


def _batched(spec: InputSpec, batch: int) -> InputSpec:
    if not spec.dims:
        return spec
    first = spec.dims[0]
    if isinstance(first, int):
        if first != batch:
            raise UsageError(
                f"--batch {batch}: input {spec.name!r} has a static first dimension {first} "
                f"({spec.shape_text()})"
            )
        return spec
    return InputSpec(spec.name, spec.dtype, (batch, *spec.dims[1:]))


def _with_defaults(
    spec: InputSpec,
    dims: Mapping[str, int],
    defaults: Mapping[str, DimDefault],
    used: dict[str, DimDefault],
) -> InputSpec:
    """``spec`` with the symbolic dims that ``dims`` leaves open taken from ``defaults``."""
    out: list[int | str] = []
    for axis, dim in enumerate(spec.dims):
        key = dim_key(spec.name, axis, None if isinstance(dim, int) else dim)
        if isinstance(dim, int) or dim in dims or key not in defaults:
            out.append(dim)
            continue
        used[key] = defaults[key]
        out.append(defaults[key].value)
    return InputSpec(spec.name, spec.dtype, tuple(out))


def _calib_feed(calib: CalibrationData, batch: int | None) -> dict[str, np.ndarray]:
    if not batch or batch == 1:
        return calib.feed(0)
    samples = [calib.feed(i % len(calib)) for i in range(batch)]
    feed = {}
    for name in samples[0]:
        arrays = [s[name] for s in samples]
        if any(a.ndim == 0 or a.shape[0] != 1 for a in arrays):
            raise UsageError(
                f"--batch {batch} with --calib: input {name!r} samples do not have a batch "
                f"axis of 1 to concatenate on (sample 0 shape {list(arrays[0].shape)})"
            )
        feed[name] = np.concatenate(arrays, axis=0)
    return feed


def bench_feed(
    specs: Sequence[InputSpec],
    *,
    calib: CalibrationData | None = None,
    batch: int | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    defaults: Mapping[str, DimDefault] | None = None,
    used: dict[str, DimDefault] | None = None,
) -> dict[str, np.ndarray]:
    """The feed to benchmark ``specs`` with (see the module docstring).

    ``used``, when given, receives the ``defaults`` that were applied (for the notice).
    """
    shapes = dict(shapes or {})
    if batch is not None and batch <= 0:
        raise UsageError(f"--batch {batch}: must be positive")
    if calib is not None:
        if shapes or dims:
            raise UsageError(
                "--shape/--dim cannot be combined with --calib: the calibration data fixes "
                "the input shapes"
            )
        return _calib_feed(calib, batch)
    names = [s.name for s in specs]
    unknown = [n for n in shapes if n not in names]
    if unknown:
        raise UsageError(
            f"--shape names {unknown[0]!r}, which is not a model input (inputs: {', '.join(names)})"
        )
    concrete = []
    for spec in specs:
        if spec.name in shapes:
            concrete.append(_given_shape(spec, tuple(int(d) for d in shapes[spec.name])))
        elif batch is not None:
            concrete.append(_batched(spec, batch))
        else:
            concrete.append(spec)
    applied: dict[str, DimDefault] = {}
    concrete = [_with_defaults(s, dims or {}, defaults or {}, applied) for s in concrete]
    if used is not None:
        used.update(applied)
    return synthetic_feeds(concrete, dict(dims or {}), count=1, seed=seed)[0]


def samples_per_run(feed: Mapping[str, np.ndarray], batch: int | None) -> int:
    """Samples one run processes: ``batch`` if given, else axis 0 of the first input (or 1)."""
    if batch:
        return batch
    first = next(iter(feed.values()), None)
    if first is None or first.ndim == 0:
        return 1
    return int(first.shape[0])
