"""``onnxprune lowrank``: success path, determinism, reports, and every refusal path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import matmul_proto
from onnxprune.cli import main
from onnxprune.io import load


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 4)) @ rng.standard_normal((4, 40))).astype(np.float32)
    path = tmp_path / "model.onnx"
    onnx.save(matmul_proto(w), path)
    return path


@pytest.fixture
def calib_path(tmp_path: Path) -> Path:
    x = np.random.default_rng(1).standard_normal((8, 48)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x[:, None, :])
    return path


def test_lowrank_writes_deterministic_output_and_report(model_path, tmp_path, capsys):
    before = model_path.read_bytes()
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        code = main(["lowrank", str(model_path), "-o", str(out), "--rank", "4",
                     "--report", str(tmp_path / "r.json")])  # fmt: skip
        assert code == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert model_path.read_bytes() == before
    text = capsys.readouterr().out
    assert "factorized 1 layers" in text and "cosine 1.000000" in text
    assert "fidelity on 4 synthetic random samples" in text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema"] == "onnxprune.lowrank/2"
    assert report["lowrank"]["layers"][0]["ranks"] == [4]
    assert float(report["fidelity"]["outputs"]["y"]["sqnr_db"]) > 80


def test_lowrank_output_is_not_factorized_again(model_path, tmp_path, capsys):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main(["lowrank", str(model_path), "-o", str(first), "--energy", "0.5"]) == 0
    assert main(["lowrank", str(first), "-o", str(second), "--energy", "0.5"]) == 0
    assert "factorized 0 layers, skipped 2" in capsys.readouterr().out
    assert len(load(second).graph) == 2


def test_activation_aware_with_calibration(model_path, calib_path, tmp_path, capsys):
    out = tmp_path / "aware.onnx"
    args = ["lowrank", str(model_path), "-o", str(out), "--rank", "4", "--activation-aware"]
    assert main([*args, "--calib", str(calib_path)]) == 0
    assert "fidelity on held-out samples 6-7 of" in capsys.readouterr().out


def test_fold_only(tmp_path, capsys):
    rng = np.random.default_rng(2)
    proto = matmul_proto(rng.standard_normal((8, 16)).astype(np.float32))
    node = onnx.helper.make_node("MatMul", ["y", "w2"], ["z"], name="mm2")
    proto.graph.node.append(node)
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")
    )
    proto.graph.output[0].CopyFrom(
        onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["batch", 4])
    )
    src, out = tmp_path / "chain.onnx", tmp_path / "folded.onnx"
    onnx.save(proto, src)
    assert main(["lowrank", str(src), "-o", str(out), "--fold"]) == 0
    assert "folded 1 layers" in capsys.readouterr().out
    assert [n.op_type for n in load(out).graph] == ["MatMul"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "0"], "onnxprune lowrank: error: --rank 0: must be a positive integer"),
        (["--rank", "-3"], "onnxprune lowrank: error: --rank -3: must be a positive integer"),
        (["--energy", "1.5"], "onnxprune lowrank: error: --energy 1.5: must be in (0, 1]"),
        (["--energy", "0"], "onnxprune lowrank: error: --energy 0.0: must be in (0, 1]"),
        (
            ["--rank", "2", "--activation-aware"],
            "onnxprune lowrank: error: --activation-aware needs --calib PATH: the input "
            "statistics come from calibration data",
        ),
        (
            ["--rank", "2", "--exclude", "nope"],
            "onnxprune lowrank: error: --exclude 'nope': no node of that name in the model",
        ),
        (
            [],
            "onnxprune lowrank: error: give a rank rule: --rank R, --energy E, "
            "--target-params F, --target-macs F or --max-layer-error B",
        ),
        (
            ["--target-params", "1.2"],
            "onnxprune lowrank: error: --target-params 1.2: must be in (0, 1)",
        ),
        (
            ["--rank", "2", "--round-to", "0"],
            "onnxprune lowrank: error: --round-to 0: must be >= 1",
        ),
    ],
)
def test_refusals_exit_2_and_write_nothing(model_path, tmp_path, capsys, args, message):
    out = tmp_path / "out.onnx"
    assert main(["lowrank", str(model_path), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.strip() == message
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
