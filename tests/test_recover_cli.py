"""``onnxprune recover`` end to end: writes the recovered model and its report; refusals are
one line, exit 2, nothing written; without torch it names the extra to install."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("torch")

from onnxprune.cli import main
from test_recover_distill import _cnn, _damaged, _weights


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    teacher, student, calib = tmp_path / "t.onnx", tmp_path / "s.onnx", tmp_path / "c.npz"
    ir.save(_cnn(_weights(0)), teacher)
    ir.save(_cnn(_damaged(_weights(0))), student)
    rng = np.random.default_rng(5)
    np.savez(calib, x=rng.standard_normal((40, 1, 3, 8, 8)).astype(np.float32))
    return teacher, student, calib


def test_recover_writes_model_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher, student, calib = _files(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    before = student.read_bytes()
    argv = ["recover", str(student), "--teacher", str(teacher), "--calib", str(calib)]
    argv += ["-o", str(out), "--steps", "40", "--lr", "3e-3", "--threads", "1"]
    assert main([*argv, "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "kept the distilled weights" in text
    data = json.loads(report.read_text())
    assert data["distillation"]["kept"] is True
    # Reported on the last quarter of --calib, which distillation never saw.
    assert "held-out samples 30-39" in data["fidelity"]["data"]
    old = data["fidelity_before"]["outputs"]["logits"]["sqnr_db"]
    new = data["fidelity"]["outputs"]["logits"]["sqnr_db"]
    assert new > old + 3.0
    assert student.read_bytes() == before
    # Same command, same bytes.
    again = tmp_path / "again.onnx"
    assert main([*argv[:-8], "-o", str(again), *argv[-6:]]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_refusals_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher, student, calib = _files(tmp_path)
    out = tmp_path / "out.onnx"
    base = ["recover", str(student), "--calib", str(calib), "-o", str(out)]
    assert main([*base, "--teacher", str(teacher), "--steps", "0"]) == 2
    assert (
        "--steps, --batch-size, --threads and --block-layers must be positive"
        in capsys.readouterr().err
    )
    other = tmp_path / "other.onnx"
    model = _cnn(_weights(0))
    model.graph.inputs[0].name = "image"
    ir.save(model, other)
    assert main([*base, "--teacher", str(other)]) == 2
    err = capsys.readouterr().err
    assert "the student's inputs ['x'] differ from the teacher's ['image']" in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_without_torch_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher, student, calib = _files(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    out = tmp_path / "out.onnx"
    argv = ["recover", str(student), "--teacher", str(teacher), "--calib", str(calib)]
    assert main([*argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "onnxprune recover: error: recover needs torch: pip install onnxprune[recover]\n"
    assert not out.exists()


def test_lr_auto_reports_its_trials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher, student, calib = _files(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = ["recover", str(student), "--teacher", str(teacher), "--calib", str(calib)]
    argv += ["-o", str(out), "--steps", "20", "--threads", "1", "--report", str(report)]
    assert main([*argv, "--lr", "auto"]) == 0
    assert "learning rate" in capsys.readouterr().out
    distilled = json.loads(report.read_text())["distillation"]
    trials = dict(distilled["lr_trials"])
    assert sorted(trials) == [3e-5, 1e-4, 3e-4, 1e-3]
    assert distilled["lr"] == min(trials, key=lambda rate: trials[rate])
    assert main([*argv[:-2], "-o", str(tmp_path / "x.onnx"), "--lr", "fast"]) == 2
    assert "--lr 'fast': a positive number or auto" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_blockwise_reports_its_segments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher, student, calib = _files(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = ["recover", str(student), "--teacher", str(teacher), "--calib", str(calib)]
    argv += ["-o", str(out), "--steps", "40", "--lr", "3e-3", "--threads", "1", "--blockwise"]
    argv += ["--block-layers", "1"]
    assert main([*argv, "--report", str(report)]) == 0
    assert "block-wise: 3 segments" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert [s["end"] for s in data["distillation"]["segments"]] == [["r1"], ["r2"], ["logits"]]
    old = data["fidelity_before"]["outputs"]["logits"]["sqnr_db"]
    assert data["fidelity"]["outputs"]["logits"]["sqnr_db"] > old + 3.0


def test_blockwise_refuses_end_to_end_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher, student, calib = _files(tmp_path)
    out = tmp_path / "out.onnx"
    argv = ["recover", str(student), "--teacher", str(teacher), "--calib", str(calib)]
    assert main([*argv, "-o", str(out), "--blockwise", "--augment"]) == 2
    assert "--augment and --match apply to end-to-end" in capsys.readouterr().err
    assert main([*argv, "-o", str(out), "--block-layers", "2"]) == 2
    assert "--block-layers sets the segment size of --blockwise" in capsys.readouterr().err
    assert not out.exists()
