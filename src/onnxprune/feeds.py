"""Model inputs for runs without calibration data: generated from input types and shapes.

Float inputs are standard normal; integer and bool inputs are drawn from {0, 1}, which is a
valid token id for any embedding and a valid attention-mask value. Symbolic dimensions
must be bound (``dims``); an unbound one is an error that names it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from onnxprune.calib import InputSpec
from onnxprune.errors import UsageError

__all__ = ["bind_shape", "synthetic_feeds"]


def bind_shape(spec: InputSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    """Concrete shape of ``spec`` with symbolic dims taken from ``dims``."""
    shape = []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int):
            shape.append(dim)
        elif dim in dims:
            shape.append(int(dims[dim]))
        else:
            raise UsageError(
                f"input {spec.name!r} axis {axis} has symbolic dimension {dim!r}; "
                f"give its size (e.g. --dim {dim if dim != '?' else 'NAME'}=1) or --calib data"
            )
    return tuple(shape)


def synthetic_feeds(
    specs: Sequence[InputSpec], dims: Mapping[str, int], count: int = 1, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``count`` deterministic feeds for ``specs``."""
    rng = np.random.default_rng(seed)
    shapes = {s.name: bind_shape(s, dims) for s in specs}
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            shape = shapes[spec.name]
            if np.issubdtype(spec.dtype, np.floating):
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                feed[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        feeds.append(feed)
    return feeds
