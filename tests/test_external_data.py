"""External-data locations are untrusted: every refusal names the tensor and the reason."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from conftest import write_external
from onnxprune.cli import main
from onnxprune.errors import UnsafeExternalDataError


def _refused(path: Path, pattern: str) -> None:
    with pytest.raises(UnsafeExternalDataError, match=pattern) as info:
        onnxprune.load(path)
    assert "tensor 'w'" in str(info.value)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    return model_dir


def _secret(tmp_path: Path, weight: np.ndarray) -> Path:
    # A file outside the model folder with exactly the right size: a refusal must not
    # depend on its contents.
    secret = tmp_path / "secret.bin"
    secret.write_bytes(weight.tobytes())
    return secret


@pytest.mark.parametrize("location", ["../secret.bin", "a/../../secret.bin", "..\\secret.bin"])
def test_refuses_parent_traversal(folder: Path, tmp_path: Path, weight, location):
    _secret(tmp_path, weight)
    (folder / "a").mkdir()
    path = write_external(folder, weight, location=location, write_data=False)
    _refused(path, r"contains '\.\.' \(path traversal\)")


@pytest.mark.parametrize("make_location", [str, lambda p: "C:\\x\\secret.bin"])
def test_refuses_absolute_paths(folder: Path, tmp_path: Path, weight, make_location):
    location = make_location(_secret(tmp_path, weight))
    path = write_external(folder, weight, location=location, write_data=False)
    _refused(path, "is an absolute path")


def test_refuses_symlinked_file(folder: Path, tmp_path: Path, weight):
    (folder / "w.bin").symlink_to(_secret(tmp_path, weight))
    path = write_external(folder, weight, location="w.bin", write_data=False)
    _refused(path, "file of 'w.bin' is a symbolic link")


def test_refuses_symlinked_parent_folder(folder: Path, tmp_path: Path, weight):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(weight.tobytes())
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    path = write_external(folder, weight, location="sub/w.bin", write_data=False)
    _refused(path, "folder 'sub' on its path .* is a symbolic link")


def test_refuses_hard_link(folder: Path, tmp_path: Path, weight):
    os.link(_secret(tmp_path, weight), folder / "w.bin")
    path = write_external(folder, weight, location="w.bin", write_data=False)
    _refused(path, "has 2 hard links")


def test_refuses_missing_file(folder: Path, weight):
    path = write_external(folder, weight, location="gone.bin", write_data=False)
    _refused(path, "'gone.bin' does not exist")


def test_refuses_offset_beyond_file(folder: Path, weight):
    path = write_external(folder, weight, offset=10**6)
    _refused(path, "offset 1000000 is beyond the end of 'w.bin' \\(8192 bytes\\)")


def test_refuses_offset_plus_length_beyond_file(folder: Path, weight):
    path = write_external(folder, weight, offset=8, length=8192)
    _refused(path, "offset 8 \\+ length 8192 is beyond the end")


def test_refuses_length_that_does_not_match_shape(folder: Path, weight):
    path = write_external(folder, weight, length=256)
    _refused(path, r"holds 256 bytes but dtype FLOAT and shape \[64, 32\] need 8192")


def test_refuses_file_too_short_for_shape(folder: Path, weight):
    path = write_external(folder, weight, write_data=False)
    (folder / "w.bin").write_bytes(weight.tobytes()[:100])
    _refused(path, r"holds 100 bytes but dtype FLOAT and shape \[64, 32\] need 8192")


def test_refuses_negative_offset(folder: Path, weight):
    _refused(write_external(folder, weight, offset=-1), "offset -1 is negative")


def test_refuses_non_integer_length(folder: Path, weight):
    path = write_external(folder, weight)
    proto = onnx.load(str(path), load_external_data=False)
    proto.graph.initializer[0].external_data.add(key="length", value="12abc")
    path.write_bytes(proto.SerializeToString())
    _refused(path, "length '12abc' is not an integer")


def test_valid_nested_location_loads(folder: Path, weight):
    path = write_external(folder, weight, location="data/w.bin")
    model = onnxprune.load(path)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), weight)


def test_cli_refusal_exit_code_and_nothing_written(folder: Path, tmp_path: Path, weight, capsys):
    _secret(tmp_path, weight)
    path = write_external(folder, weight, location="../secret.bin", write_data=False)
    out = tmp_path / "out.onnx"
    code = main(["canonicalize", str(path), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "tensor 'w'" in err and "path traversal" in err
    assert not out.exists()
