"""Shared fixtures: tiny models written to disk, with and without external data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper


def matmul_proto(weight: np.ndarray, opset: int = 17) -> onnx.ModelProto:
    """y = x @ w with ``w`` an initializer (inline)."""
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def write_external(
    folder: Path,
    weight: np.ndarray,
    *,
    location: str = "w.bin",
    offset: int | None = None,
    length: int | None = None,
    write_data: bool = True,
) -> Path:
    """Write ``model.onnx`` in ``folder`` whose weight ``w`` lives in ``location``."""
    proto = matmul_proto(weight)
    tensor = proto.graph.initializer[0]
    raw = tensor.raw_data
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location}
    if offset is not None:
        entries["offset"] = str(offset)
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    if write_data:
        target = folder / location
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.fixture
def weight() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)


@pytest.fixture
def inline_model(tmp_path: Path, weight: np.ndarray) -> Path:
    path = tmp_path / "inline.onnx"
    path.write_bytes(matmul_proto(weight).SerializeToString())
    return path


@pytest.fixture
def external_model(tmp_path: Path, weight: np.ndarray) -> Path:
    folder = tmp_path / "ext"
    folder.mkdir()
    return write_external(folder, weight)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches (quantize's calibration statistics) go to a per-session folder, never the
    user's ~/.cache, so tests neither read stale entries nor leave files behind."""
    import os

    os.environ["ONNXPRUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("onnxprune-cache"))
