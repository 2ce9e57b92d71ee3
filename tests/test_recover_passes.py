"""``sparsify --recover distill`` and ``lowrank --recover distill`` (every generated lossy
command): the pass's model is distilled from the input, weights only; sparsity stays."""

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

PASSES = {
    "sparsify": ["--sparsity", "0.5"],
    "lowrank": [
        *("--conv", "tucker", "--rank", "2", "--round-to", "1", "--margin", "1"),
        "--no-conv-latency-check",
    ],
}


@pytest.mark.parametrize("name", sorted(PASSES))
def test_recover_distill_after_a_generated_pass(tmp_path: Path, capsys, name: str) -> None:
    teacher, _, calib = _files(tmp_path)
    plain, recovered, report = tmp_path / "p.onnx", tmp_path / "r.onnx", tmp_path / "r.json"
    base = [name, str(teacher), "--calib", str(calib), *PASSES[name]]
    assert main([*base, "-o", str(plain)]) == 0
    argv = [*base, "-o", str(recovered), "--recover", "distill", "--recover-budget", "3"]
    assert main([*argv, "--report", str(report)]) == 0
    assert "distillation:" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["recovery"]["distillation"]["steps"] > 0
    a, b = ir.load(plain), ir.load(recovered)
    assert _structure(a) == _structure(b)  # the pass's graph, unchanged
    changed = False
    for key, value in a.graph.initializers.items():
        before, after = value.const_value.numpy(), b.graph.initializers[key].const_value.numpy()
        if not np.issubdtype(before.dtype, np.floating):
            np.testing.assert_array_equal(before, after)  # bitmasks, shapes, indices
            continue
        assert np.all(after[before == 0] == 0), key  # zeros (the sparsity) stay zero
        changed |= not np.array_equal(before, after)
    assert changed == data["recovery"]["distillation"]["kept"]
    assert list(tmp_path.glob("*.tmp*")) == []


def test_recover_needs_calib_on_generated_commands(tmp_path: Path, capsys) -> None:
    teacher, _, _ = _files(tmp_path)
    out = tmp_path / "o.onnx"
    argv = ["sparsify", str(teacher), "--sparsity", "0.5", "-o", str(out), "--recover", "distill"]
    assert main(argv) == 2
    assert "--recover distill needs --calib" in capsys.readouterr().err
    assert not out.exists()
