"""Helpers for tests: build tiny models from ONNX text, fill weights, compare in onnxruntime.

Tests build their models here rather than loading files, so each topology is visible in the
test that uses it. Weights come from ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.runtime import run_model

__all__ = [
    "assert_same_outputs",
    "model_from_text",
    "random_feeds",
    "set_initializer",
]


def model_from_text(text: str, initializers: Mapping[str, np.ndarray] | None = None) -> ir.Model:
    """Parse ONNX text (``onnx.parser`` syntax) into an IR model and attach initializers.

    Declare weights as graph inputs in the text (``g (float[N,3] x, float[4,3] w) => ...``);
    each name in ``initializers`` then becomes an initializer holding that array.
    """
    proto = onnx.parser.parse_model(text)
    model = ir.serde.deserialize_model(proto)
    for name, array in (initializers or {}).items():
        set_initializer(model, name, array)
    return model


def set_initializer(model: ir.Model, name: str, array: np.ndarray) -> None:
    """Add or replace the initializer ``name`` with ``array``."""
    graph = model.graph
    tensor = ir.tensor(np.asarray(array, order="C"), name=name)
    if name in graph.initializers:
        value = graph.initializers[name]
        value.const_value = tensor
        value.shape = cast(ir.Shape, tensor.shape)  # ir.tensor of an array has an ir.Shape
        value.dtype = tensor.dtype
        return
    # An input of the same name is turned into an initializer use.
    existing = {v.name: v for v in graph.inputs}
    if name in existing:
        value = existing[name]
        graph.inputs.remove(value)
        value.const_value = tensor
    else:
        raise KeyError(f"{name!r} is not a graph input or initializer of the model; declare it")
    graph.register_initializer(value)


def random_feeds(model: ir.Model, seed: int = 0, dims: Mapping[str, int] | None = None) -> dict:
    """Random float inputs (standard normal) for every graph input; symbolic dims from ``dims``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        shape = []
        for dim in value.shape or ():
            if isinstance(dim, int):
                shape.append(dim)
            else:
                shape.append((dims or {}).get(str(dim), 2))
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def assert_same_outputs(
    reference: ir.Model | onnx.ModelProto,
    candidate: ir.Model | onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> None:
    """Run both models in onnxruntime (optimizations off) and compare every output."""
    ref = run_model(reference, feeds)
    got = run_model(candidate, feeds)
    assert list(ref) == list(got), f"outputs differ: {list(ref)} vs {list(got)}"
    for name in ref:
        assert ref[name].shape == got[name].shape, f"{name}: {ref[name].shape} vs {got[name].shape}"
        np.testing.assert_allclose(got[name], ref[name], rtol=rtol, atol=atol, err_msg=name)
