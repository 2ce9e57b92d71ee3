"""CLI: inspect and canonicalize end to end, exit codes, atomic and deterministic outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.bundled import default_calibration, default_model
from onnxprune.cli import main
from onnxprune.passes import pipeline
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text

BN_MODEL = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[batch, 3, 8, 8] x, float[4, 3, 3, 3] w, float[4] s, float[4] b, float[4] m, float[4] v)
  => (float[batch, 4, 8, 8] y)
{
  c = Conv <pads=[1,1,1,1]> (x, w)
  n = BatchNormalization (c, s, b, m, v)
  i = Identity (n)
  y = Relu (i)
}
"""


@pytest.fixture
def bn_model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    model = model_from_text(
        BN_MODEL,
        {
            "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "s": rng.uniform(0.5, 2, 4).astype(np.float32),
            "b": rng.standard_normal(4).astype(np.float32),
            "m": rng.standard_normal(4).astype(np.float32),
            "v": rng.uniform(0.5, 2, 4).astype(np.float32),
        },
    )
    path = tmp_path / "bn.onnx"
    ir.save(model, path)
    return path


def test_inspect_default_model_table(capsys):
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "MACs" in out and "logits" in out and "Conv" in out


def test_inspect_json(bn_model: Path, capsys):
    assert main(["inspect", str(bn_model), "--json", "--dim", "batch=2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schema"] == "onnxprune.inspect/1"
    # Conv 3->4, 3x3, 8x8 output, batch 2: 2 * 4 * 64 * 3 * 9
    assert report["total_macs"] == 2 * 4 * 64 * 27


def test_inspect_bad_dim_is_usage_error(bn_model: Path, capsys):
    assert main(["inspect", str(bn_model), "--dim", "batch=zero"]) == 2
    assert "--dim 'batch=zero'" in capsys.readouterr().err


def test_canonicalize_folds_and_is_deterministic(bn_model: Path, tmp_path: Path, capsys):
    out1, out2 = tmp_path / "a.onnx", tmp_path / "b.onnx"
    report = tmp_path / "r.json"
    assert main(["canonicalize", str(bn_model), "-o", str(out1), "--report", str(report)]) == 0
    assert main(["canonicalize", str(bn_model), "-o", str(out2)]) == 0
    assert out1.read_bytes() == out2.read_bytes()
    ops = [n.op_type for n in ir.load(out1).graph]
    assert ops == ["Conv", "Relu"]
    data = json.loads(report.read_text())
    assert data["schema"] == "onnxprune.canonicalize/2"
    assert data["check"]["samples"] == 4
    assert data["canonicalize"]["converged"] is True
    assert data["params"] == {"before": 124, "after": 112}
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run_model(str(out1), {"x": x})["y"], run_model(str(bn_model), {"x": x})["y"], atol=1e-5
    )


def test_canonicalize_with_bundled_calibration(tmp_path: Path, capsys):
    out = tmp_path / "d.onnx"
    code = main(
        [
            "canonicalize",
            str(default_model()),
            "-o",
            str(out),
            "--calib",
            str(default_calibration()),
        ]
    )
    assert code == 0
    assert "checked on 4 feeds" in capsys.readouterr().out


def test_canonicalize_unknown_pass_is_usage_error(bn_model: Path, tmp_path: Path, capsys):
    out = tmp_path / "x.onnx"
    assert main(["canonicalize", str(bn_model), "-o", str(out), "--skip", "fold-everything"]) == 2
    err = capsys.readouterr().err
    assert "unknown pass 'fold-everything'" in err and "fold-batchnorm" in err
    assert not out.exists()


def test_canonicalize_refuses_to_overwrite_input(bn_model: Path, capsys):
    before = bn_model.read_bytes()
    assert main(["canonicalize", str(bn_model), "-o", str(bn_model)]) == 2
    assert "input model" in capsys.readouterr().err
    assert bn_model.read_bytes() == before


def test_rewrite_that_changes_outputs_exits_1_and_writes_nothing(
    bn_model: Path, tmp_path: Path, monkeypatch, capsys
):
    real = pipeline.canonicalize

    def broken(model: ir.Model, **kwargs):
        report = real(model, **kwargs)
        weight = next(v for v in model.graph.initializers.values() if v.const_value.size > 100)
        weight.const_value = ir.tensor(weight.const_value.numpy() * 1.01)
        return report

    monkeypatch.setattr(pipeline, "canonicalize", broken)
    out = tmp_path / "x.onnx"
    assert main(["canonicalize", str(bn_model), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "output 'y' changed" in err and "nothing written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.onnx"]


def test_console_script_entry_point(bn_model: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "onnxprune.cli", "inspect", str(bn_model), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["op_histogram"]["BatchNormalization"] == 1


@pytest.mark.parametrize("verbose", [[], ["-vv"]])
def test_traceback_only_with_vv(bn_model: Path, capsys, verbose: list[str]):
    """An error is one line; ``-vv`` adds the traceback before it, for a bug report."""
    assert main([*verbose, "canonicalize", str(bn_model), "-o", str(bn_model)]) == 2
    err = capsys.readouterr().err
    assert ("Traceback (most recent call last)" in err) == bool(verbose)
    assert err.strip().splitlines()[-1].startswith("onnxprune canonicalize: error:")


def test_one_json_writer_is_strict_and_deterministic():
    """Every report goes through one writer: no Infinity/NaN tokens (strict parsers reject
    them), numpy scalars as numbers, sorted keys."""
    import math

    from onnxprune.reporting import json_text

    payload = {"b": np.float32(1.5), "a": [math.inf, -math.inf, math.nan, (1, 2)], "c": {1: 2}}
    text = json_text(payload)
    assert json.loads(text) == {"a": ["inf", "-inf", "nan", [1, 2]], "b": 1.5, "c": {"1": 2}}
    assert "Infinity" not in text and "NaN" not in text
    assert text == json_text(dict(reversed(payload.items())))
