"""``onnxprune verify``: output metrics, tolerance exit codes, layer localisation, reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxprune.cli import main
from onnxprune.io.atomic import write_bytes_atomic
from onnxprune.testing import model_from_text
from onnxprune.verification import VERIFY_SCHEMA, verify

# x -> MatMul(w1) -> h1 -> Relu -> h2 -> MatMul(w2) -> h3 -> Add(b) -> logits
MLP_TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
mlp (float[N, 16] x, float[16, 32] w1, float[32, 10] w2, float[10] b) => (float[N, 10] logits) {
    [mm1] h1 = MatMul (x, w1)
    [relu] h2 = Relu (h1)
    [mm2] h3 = MatMul (h2, w2)
    [add] logits = Add (h3, b)
}
"""


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.standard_normal((16, 32)).astype(np.float32),
        "w2": rng.standard_normal((32, 10)).astype(np.float32),
        "b": rng.standard_normal(10).astype(np.float32),
    }


def _write(model: ir.Model, path: Path) -> Path:
    write_bytes_atomic(path, ir.serde.serialize_model(model).SerializeToString())
    return path


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    weights = _weights()
    reference = _write(model_from_text(MLP_TEXT, weights), tmp_path / "ref.onnx")
    copy = _write(model_from_text(MLP_TEXT, weights), tmp_path / "copy.onnx")
    perturbed = dict(weights)
    noise = np.random.default_rng(1).standard_normal(weights["w2"].shape).astype(np.float32)
    perturbed["w2"] = weights["w2"] + noise  # noise as large as the weights
    bad = _write(model_from_text(MLP_TEXT, perturbed), tmp_path / "bad.onnx")
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(2)
    np.savez(calib, x=rng.standard_normal((6, 1, 16)).astype(np.float32))
    return {"reference": reference, "copy": copy, "bad": bad, "calib": calib}


def test_identical_copy_passes_with_exact_metrics(models: dict[str, Path]) -> None:
    result = verify(models["reference"], models["copy"], models["calib"], layers=True)
    assert result.passed
    assert result.samples == 6
    metrics = result.outputs["logits"]
    assert metrics["cosine"] == pytest.approx(1.0)
    assert metrics["sqnr_db"] == math.inf
    assert metrics["max_abs_error"] == 0.0
    assert metrics["top1_agreement"] == 1.0
    assert result.layers is not None
    assert [m.name for m in result.layers.layers] == ["h1", "h2", "h3", "logits"]
    assert result.layers.first_diverging is None


def test_cli_exit_0_on_own_copy(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "v.json"
    code = main(
        [
            "verify",
            str(models["reference"]),
            str(models["copy"]),
            "--calib",
            str(models["calib"]),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    assert "PASSED" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["schema"] == VERIFY_SCHEMA
    assert report["passed"] is True
    assert report["tolerance"] == "cosine>=0.99,top1_agreement>=0.98"
    assert report["outputs"]["logits"]["sqnr_db"] == "inf"  # non-finite floats as strings
    assert report["violations"] == []


def test_perturbed_weight_exits_1_naming_output_and_layer(
    models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "v.json"
    md = tmp_path / "v.md"
    code = main(
        [
            "verify",
            str(models["reference"]),
            str(models["bad"]),
            "--calib",
            str(models["calib"]),
            "--layers",
            "--json",
            str(out),
            "--markdown",
            str(md),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    err = captured.err.strip()
    assert err.startswith("onnxprune verify: error: verification failed: output 'logits': cosine")
    assert "first diverging layer: 'h3' (MatMul node 'mm2'" in err
    report = json.loads(out.read_text())
    assert report["passed"] is False
    assert report["violations"][0]["output"] == "logits"
    assert report["violations"][0]["metric"] == "cosine"
    assert report["violations"][0]["value"] < 0.99
    layers = report["layers"]
    assert layers["first_diverging"]["name"] == "h3"
    # Everything before the perturbed node is bit-identical.
    by_name = {entry["name"]: entry for entry in layers["layers"]}
    assert by_name["h1"]["sqnr_db"] == "inf" and by_name["h2"]["sqnr_db"] == "inf"
    assert by_name["h3"]["diverged"] is True
    assert layers["worst"]["name"] in {"h3", "logits"}
    assert "FAILED" in md.read_text()


def test_layers_in_chunks_of_one_give_the_same_answer(models: dict[str, Path]) -> None:
    whole = verify(models["reference"], models["bad"], models["calib"], layers=True)
    chunked = verify(models["reference"], models["bad"], models["calib"], layers=True, chunk_size=1)
    assert chunked.layers is not None and whole.layers is not None
    assert chunked.layers.chunks == 4
    assert whole.layers.chunks == 1
    for a, b in zip(whole.layers.layers, chunked.layers.layers, strict=True):
        assert a.name == b.name
        assert a.sqnr_db == pytest.approx(b.sqnr_db)


def test_input_files_are_not_modified(models: dict[str, Path]) -> None:
    before = {k: p.read_bytes() for k, p in models.items()}
    verify(models["reference"], models["bad"], models["calib"], layers=True, chunk_size=2)
    assert {k: p.read_bytes() for k, p in models.items()} == before


def test_loose_tolerance_passes_the_perturbed_model(models: dict[str, Path], capsys) -> None:
    code = main(
        [
            "verify",
            str(models["reference"]),
            str(models["bad"]),
            "--calib",
            str(models["calib"]),
            "--tolerance",
            "cosine>=-1",
        ]
    )
    assert code == 0


def test_bad_tolerance_is_usage_error(models: dict[str, Path], capsys) -> None:
    code = main(
        [
            "verify",
            str(models["reference"]),
            str(models["copy"]),
            "--calib",
            str(models["calib"]),
            "--tolerance",
            "cosin>=0.9",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown metric 'cosin'" in err
    assert "known metrics: top1_agreement, cosine" in err


def test_mismatched_outputs_are_refused(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    proto = onnx.load(str(models["copy"]))
    proto.graph.node[-1].output[0] = "scores"
    proto.graph.output[0].name = "scores"
    other = tmp_path / "renamed.onnx"
    other.write_bytes(proto.SerializeToString())
    code = main(["verify", str(models["reference"]), str(other), "--calib", str(models["calib"])])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "onnxprune verify: error: reference and candidate outputs differ: only in reference: "
        "logits; only in candidate: scores"
    )


def test_mismatched_output_shape_is_refused(
    models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    text = (
        MLP_TEXT.replace("float[32, 10] w2", "float[32, 8] w2")
        .replace("float[10] b", "float[8] b")
        .replace("float[N, 10] logits", "float[N, 8] logits")
    )
    rng = np.random.default_rng(0)
    weights = _weights()
    weights["w2"] = rng.standard_normal((32, 8)).astype(np.float32)
    weights["b"] = rng.standard_normal(8).astype(np.float32)
    narrow = _write(model_from_text(text, weights), tmp_path / "narrow.onnx")
    code = main(["verify", str(models["reference"]), str(narrow), "--calib", str(models["calib"])])
    assert code == 2
    assert (
        "output 'logits' has shape [1, 10] in the reference but [1, 8] in the candidate "
        "(sample 0)" in capsys.readouterr().err
    )


def test_missing_calibration_is_exit_2(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    code = main(
        [
            "verify",
            str(models["reference"]),
            str(models["copy"]),
            "--calib",
            str(tmp_path / "nope.npz"),
        ]
    )
    assert code == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "--layer-chunk", "0"], "--layer-chunk 0: must be at least 1"),
        (["--layers", "--layer-samples", "0"], "--layer-samples 0: must be at least 1"),
    ],
)
def test_bad_layer_options_are_usage_errors(
    models: dict[str, Path], capsys, args: list[str], message: str
) -> None:
    code = main(
        ["verify", str(models["reference"]), str(models["copy"]), "--calib",
         str(models["calib"]), *args]
    )  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err


def test_metrics_aggregate_over_all_samples(models: dict[str, Path]) -> None:
    """Aggregated metrics equal metrics over the stacked outputs of every sample."""
    from onnxprune.metrics import output_metrics
    from onnxprune.runtime import run_model

    x = np.load(models["calib"])["x"]
    ref = np.concatenate([run_model(models["reference"], {"x": s})["logits"] for s in x])
    bad = np.concatenate([run_model(models["bad"], {"x": s})["logits"] for s in x])
    result = verify(models["reference"], models["bad"], models["calib"])
    expected = output_metrics(ref, bad)
    assert {k: result.outputs["logits"][k] for k in expected} == pytest.approx(expected)
