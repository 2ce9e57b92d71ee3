"""Bad model files: a clear one-line error, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

import onnxprune
from conftest import matmul_proto
from onnxprune.cli import main
from onnxprune.errors import ModelLoadError


def _cli_fails(path: Path, tmp_path: Path, capsys, pattern: str) -> None:
    out = tmp_path / "out.onnx"
    code = main(["canonicalize", str(path), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert pattern in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_missing_file(tmp_path: Path, capsys):
    with pytest.raises(ModelLoadError, match="no such file"):
        onnxprune.load(tmp_path / "nope.onnx")
    _cli_fails(tmp_path / "nope.onnx", tmp_path, capsys, "no such file")


def test_empty_file(tmp_path: Path, capsys):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _cli_fails(path, tmp_path, capsys, "empty file, not an ONNX model")


def test_truncated_file(inline_model: Path, tmp_path: Path, capsys):
    path = tmp_path / "trunc.onnx"
    path.write_bytes(inline_model.read_bytes()[:-37])
    with pytest.raises(ModelLoadError, match=r"not a valid ONNX model|not an ONNX model"):
        onnxprune.load(path)
    _cli_fails(path, tmp_path, capsys, str(path))


def test_non_onnx_file(tmp_path: Path, capsys):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a model\n")
    with pytest.raises(ModelLoadError, match="not"):
        onnxprune.load(path)
    _cli_fails(path, tmp_path, capsys, "ONNX model")


def test_directory_instead_of_file(tmp_path: Path, capsys):
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    _cli_fails(folder, tmp_path, capsys, "not a regular file")


def test_opset_onnxruntime_cannot_run(tmp_path: Path, weight, capsys):
    path = tmp_path / "future.onnx"
    path.write_bytes(matmul_proto(weight, opset=99).SerializeToString())
    with pytest.raises(ModelLoadError, match=r"cannot run IR version 10 with opsets \{'': 99\}"):
        onnxprune.load(path)
    _cli_fails(path, tmp_path, capsys, "cannot run")


def test_map_typed_output_is_refused_naming_it(tmp_path: Path, capsys):
    """scikit-learn's ZipMap output (a sequence of maps) cannot be represented: say so."""
    import onnx
    from onnx import TensorProto, helper

    zipmap = helper.make_node(
        "ZipMap", ["p"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1]
    )
    seq_map = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(1, []))
    )
    graph = helper.make_graph(
        [zipmap],
        "g",
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 2])],
        [helper.make_value_info("probabilities", seq_map)],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)],
        ir_version=8,
    )
    path = tmp_path / "zipmap.onnx"
    onnx.save(proto, path)
    _cli_fails(
        path,
        tmp_path,
        capsys,
        "output 'probabilities' has a map type (seq(map(int64, tensor(float32))))",
    )
