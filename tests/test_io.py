"""Model I/O: round trips, determinism, atomic writes, and never overwriting the input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import onnxprune
from onnxprune.errors import SaveError
from onnxprune.runtime import run_model


def _outputs(path: Path, weight: np.ndarray) -> np.ndarray:
    x = np.arange(3 * weight.shape[0], dtype=np.float32).reshape(3, -1)
    return run_model(str(path), {"x": x})["y"]


def test_inline_round_trip_is_exact_and_deterministic(inline_model: Path, tmp_path: Path, weight):
    model = onnxprune.load(inline_model)
    a = onnxprune.save(model, tmp_path / "a.onnx")
    b = onnxprune.save(model, tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    assert not (tmp_path / "a.onnx.data").exists()
    np.testing.assert_array_equal(_outputs(a, weight), _outputs(inline_model, weight))


def test_external_round_trip_generates_data_name(external_model: Path, tmp_path: Path, weight):
    before = {p.name: p.read_bytes() for p in external_model.parent.iterdir()}
    model = onnxprune.load(external_model)
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    out = tmp_path / "out.onnx"
    onnxprune.save(model, out, external_data=True)
    assert (tmp_path / "out.onnx.data").is_file()
    np.testing.assert_array_equal(_outputs(out, weight), _outputs(external_model, weight))
    # Re-saving gives identical bytes (model and data), and the input folder is untouched.
    again = tmp_path / "again"
    again.mkdir()
    onnxprune.save(model, again / "out.onnx", external_data=True)
    assert (again / "out.onnx").read_bytes() == out.read_bytes()
    assert (again / "out.onnx.data").read_bytes() == (tmp_path / "out.onnx.data").read_bytes()
    assert {p.name: p.read_bytes() for p in external_model.parent.iterdir()} == before


def test_external_model_saved_small_is_inlined(external_model: Path, tmp_path: Path, weight):
    out = tmp_path / "small.onnx"
    onnxprune.save(onnxprune.load(external_model), out)
    assert not (tmp_path / "small.onnx.data").exists()
    np.testing.assert_array_equal(_outputs(out, weight), _outputs(external_model, weight))


def test_threshold_switches_to_external(tmp_path: Path):
    from conftest import matmul_proto

    big = np.ones((64, 64), np.float32)
    src = tmp_path / "big.onnx"
    src.write_bytes(matmul_proto(big).SerializeToString())
    out = tmp_path / "t.onnx"
    onnxprune.save(onnxprune.load(src), out, threshold_bytes=100)
    assert (tmp_path / "t.onnx.data").stat().st_size == big.nbytes
    np.testing.assert_array_equal(_outputs(out, big), _outputs(src, big))


def test_small_tensors_stay_inline_without_empty_data_file(tmp_path: Path):
    from conftest import matmul_proto

    src = tmp_path / "small_src.onnx"
    src.write_bytes(matmul_proto(np.ones((4, 4), np.float32)).SerializeToString())
    out = tmp_path / "s.onnx"
    onnxprune.save(onnxprune.load(src), out, external_data=True)
    assert not (tmp_path / "s.onnx.data").exists()


def test_refuses_to_overwrite_input_model(inline_model: Path):
    before = inline_model.read_bytes()
    model = onnxprune.load(inline_model)
    with pytest.raises(SaveError, match="input model or one of its data files"):
        onnxprune.save(model, inline_model)
    assert inline_model.read_bytes() == before


def test_refuses_to_overwrite_input_data_file(tmp_path: Path, weight):
    from conftest import write_external

    # The input's data file is named exactly what our generated name for out.onnx would be.
    folder = tmp_path / "m"
    folder.mkdir()
    path = write_external(folder, weight, location="out.onnx.data")
    before = (folder / "out.onnx.data").read_bytes()
    with pytest.raises(SaveError, match=r"out\.onnx\.data"):
        onnxprune.save(onnxprune.load(path), folder / "out.onnx", external_data=True)
    assert (folder / "out.onnx.data").read_bytes() == before
    assert not (folder / "out.onnx").exists()


def test_failed_commit_writes_nothing(inline_model: Path, tmp_path: Path):
    out_dir = tmp_path / "o"
    out_dir.mkdir()

    def reject(path: Path) -> None:
        assert path.is_file()
        raise SaveError("verification failed")

    with pytest.raises(SaveError, match="verification failed"):
        onnxprune.save(onnxprune.load(inline_model), out_dir / "x.onnx", before_commit=reject)
    assert os.listdir(out_dir) == []


def test_missing_output_folder(inline_model: Path, tmp_path: Path):
    with pytest.raises(SaveError, match="does not exist"):
        onnxprune.save(onnxprune.load(inline_model), tmp_path / "nope" / "x.onnx")


def test_save_does_not_modify_model_in_memory(external_model: Path, tmp_path: Path):
    model = onnxprune.load(external_model)
    onnxprune.save(model, tmp_path / "x.onnx", external_data=False)
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
