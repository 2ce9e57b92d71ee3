"""``prune --recover distill``: the pruned model is distilled from the input, weights only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("torch")

from onnxprune.cli import main
from test_recover_cli import _files
from test_recover_distill import _structure


@pytest.mark.parametrize("mode", ["distill", "blockwise"])
def test_prune_recover_distill_changes_weights_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    teacher, _, calib = _files(tmp_path)
    plain, recovered, report = tmp_path / "p.onnx", tmp_path / "r.onnx", tmp_path / "r.json"
    base = ["prune", str(teacher), "--ratio", "0.25", "--calib", str(calib), "--round-to", "1"]
    assert main([*base, "-o", str(plain)]) == 0
    argv = [*base, "-o", str(recovered), "--recover", mode, "--recover-budget", "3"]
    argv += ["--report", str(report)]
    assert main(argv) == 0
    assert "distillation:" in capsys.readouterr().out
    data = json.loads(report.read_text())["recovery"]
    assert data["distillation"]["steps"] > 0
    assert bool(data["distillation"]["segments"]) == (mode == "blockwise")
    # Same graph as plain pruning; the weights differ exactly when distillation was kept.
    a, b = ir.load(plain), ir.load(recovered)
    assert _structure(a) == _structure(b)
    same = all(
        np.array_equal(v.const_value.numpy(), b.graph.initializers[k].const_value.numpy())
        for k, v in a.graph.initializers.items()
    )
    assert same != data["distillation"]["kept"]
    assert list(tmp_path.glob("*.tmp*")) == []


def test_prune_recover_needs_calib(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher, _, _ = _files(tmp_path)
    out = tmp_path / "o.onnx"
    assert (
        main(["prune", str(teacher), "--ratio", "0.25", "-o", str(out), "--recover", "distill"])
        == 2
    )
    assert "--recover distill needs --calib" in capsys.readouterr().err
    assert not out.exists()
