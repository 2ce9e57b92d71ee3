"""Content digests of a model and its feeds, for caches keyed by what was computed from them."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

__all__ = ["model_feeds_digest"]


def model_feeds_digest(
    prefix: str, model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]]
) -> hashlib._Hash:
    """SHA-256 over ``prefix``, the model serialized deterministically (structure and
    tensors) and every feed's input names, dtypes, shapes and bytes, in order; callers add
    their own settings before ``hexdigest()``."""
    digest = hashlib.sha256(prefix.encode())
    digest.update(ir.serde.serialize_model(model).SerializeToString(deterministic=True))
    for index, feed in enumerate(feeds):
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            digest.update(f"\n{index}:{name}:{array.dtype.str}:{array.shape}\n".encode())
            digest.update(array.tobytes())
    return digest
