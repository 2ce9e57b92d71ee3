"""``onnxprune sparsify`` end to end: refusals (message + exit 2, nothing written), determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.io import load
from onnxprune.runtime import run_model

DATA = Path(onnxprune.__file__).parent / "data"
MODEL = str(DATA / "digits_cnn.onnx")
CALIB = str(DATA / "digits_calib.npz")
_LAYERS = [f"/features/features.{i}/Conv" for i in (0, 3)] + [
    f"/classifier/classifier.{i}/Gemm" for i in (1, 3)
]


def test_sparsify_writes_exact_smaller_model_and_report(tmp_path: Path) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    before = Path(MODEL).read_bytes()
    argv = ["sparsify", MODEL, "-o", str(out), "--sparsity", "0.5", "--report", str(report)]
    assert main(argv) == 0
    assert Path(MODEL).read_bytes() == before
    doc = json.loads(report.read_text())
    assert doc["schema"] == "onnxprune.sparsify/2"
    assert doc["output_bytes"] < 0.7 * doc["input_bytes"]
    details = doc["sparsify"]
    assert details["stored_vs_masked_max_abs_error"] == 0.0
    assert [layer["sparsity"] for layer in details["layers"]] == [0.5, 0.5, 0.5, 0.5]
    assert "trt_sparsity_enable" in details["speedup"]["tensorrt"]
    feed = {"input": np.load(CALIB)["input"][:2]}
    assert run_model(load(out), feed)["logits"].shape == (2, 10)


def test_same_input_and_seed_give_same_bytes(tmp_path: Path) -> None:
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        argv = [
            "sparsify",
            MODEL,
            "-o",
            str(out),
            "--sparsity",
            "0.5",
            "--method",
            "wanda",
            "--update",
            "--calib",
            CALIB,
        ]
        assert main(argv) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "1.0"], "--sparsity 1.0 is outside [0, 1)"),
        (["--sparsity", "-0.1"], "--sparsity -0.1 is outside [0, 1)"),
        (["--sparsity", "0.5", "--exclude", "nope"], "--exclude: no node 'nope'"),
        (["--sparsity", "0.5", "--layer-sparsity", "nope=0.2"], "--layer-sparsity: no node 'nope'"),
        (["--sparsity", "0.5", "--layer-sparsity", "bad"], "expected NODE=S"),
        (["--sparsity", "0.5", "--method", "wanda"], "need calibration data (--calib PATH)"),
        (["--pattern", "2:4", "--sparsity", "0.7"], "contradicts it"),
        (["--sparsity", "0.5", "--scope", "measured"], "--scope measured needs calibration"),
        (
            ["--pattern", "2:4", "--scope", "measured", "--calib", CALIB],
            "--scope measured cannot be combined with --pattern 2:4",
        ),
        (["--sparsity", "0.5", "--iterative", "0"], "--iterative 0 must be >= 1"),
        ([], "--sparsity is required"),
        (
            ["--sparsity", "0.5", "--exclude", *_LAYERS],
            "nothing to sparsify: every candidate layer is skipped (4; e.g. "
            "'/classifier/classifier.1/Gemm': excluded (--exclude))",
        ),
    ],
)
def test_refusals_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "out.onnx"
    assert main(["sparsify", MODEL, "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "onnxprune sparsify: error:" in err and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("where", ["missing/r.json", "."])
def test_bad_report_path_is_refused_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    out = tmp_path / "out.onnx"
    argv = ["sparsify", MODEL, "-o", str(out), "--sparsity", "0.5"]
    assert main([*argv, "--report", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert "onnxprune sparsify: error: --report" in err, err
    assert ("does not exist" if "missing" in where else "is a directory") in err, err
    assert not out.exists()


def test_calibration_mismatch_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((4, 1, 9, 9), np.float32))
    out = tmp_path / "out.onnx"
    argv = [
        "sparsify",
        MODEL,
        "-o",
        str(out),
        "--sparsity",
        "0.5",
        "--method",
        "wanda",
        "--calib",
        str(bad),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "calibration input 'input'" in err and "expected shape" in err, err
    assert not out.exists()


def test_exclude_and_override_and_two_four_skip(tmp_path: Path) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = [
        "sparsify",
        MODEL,
        "-o",
        str(out),
        "--pattern",
        "2:4",
        "--exclude",
        "/classifier/classifier.3/Gemm",
        "--report",
        str(report),
    ]
    assert main(argv) == 0
    doc = json.loads(report.read_text())["sparsify"]
    assert doc["skipped"]["/classifier/classifier.3/Gemm"] == "excluded (--exclude)"
    assert "groups of 4" in doc["skipped"]["/features/features.0/Conv"]
    assert {layer["pattern"] for layer in doc["layers"]} == {"2:4"}
    out2 = tmp_path / "o2.onnx"
    argv = [
        "sparsify",
        MODEL,
        "-o",
        str(out2),
        "--sparsity",
        "0.5",
        "--layer-sparsity",
        "/features/features.0/Conv=0.25",
        "--report",
        str(report),
    ]
    assert main(argv) == 0
    details = json.loads(report.read_text())["sparsify"]
    layers = {layer["node"]: layer for layer in details["layers"]}
    assert layers["/features/features.0/Conv"]["zeros"] == 36  # round(0.25 * 144)


def _dynamic_int8_model(folder: Path) -> tuple[Path, Path]:
    """A Conv + MatMul model quantized by onnxruntime's ``quantize_dynamic`` (ConvInteger,
    MatMulInteger: no float weight left), and calibration data for it."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "cw"),
        numpy_helper.from_array(np.array([1, 4 * 6 * 6], np.int64), "shape"),
        numpy_helper.from_array(rng.standard_normal((144, 10)).astype(np.float32), "mw"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "shape"], ["r"], name="flat"),
        helper.make_node("MatMul", ["r", "mw"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    float_path, path = folder / "float.onnx", folder / "dynamic.onnx"
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    float_path.write_bytes(proto.SerializeToString())
    quantize_dynamic(str(float_path), str(path), weight_type=QuantType.QUInt8)
    calib = folder / "calib.npz"
    np.savez(calib, x=rng.standard_normal((8, 1, 1, 8, 8)).astype(np.float32))
    return path, calib


@pytest.mark.parametrize("extra", [[], ["--update"], ["--method", "wanda"]])
def test_already_quantized_model_is_refused_naming_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    """ddddocr's dynamically quantized recognizer ended in IndexError with --update: no
    float weight is left to sparsify. Refused in one line (exit 2), nothing written."""
    model, calib = _dynamic_int8_model(tmp_path)
    out = tmp_path / "out.onnx"
    argv = ["sparsify", str(model), "-o", str(out), "--sparsity", "0.5", "--calib", str(calib)]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxprune sparsify: error: nothing to sparsify" in err, err
    assert "already quantized" in err and "ConvInteger" in err and "MatMulInteger" in err, err
    assert not out.exists()
