"""One definition of a model's size on disk (issue 14 item 28): the ``.onnx`` file plus every
external data file its tensors reference, whatever that file is called; every command
reports the size ``inspect`` reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_external
from onnxprune.cli import main


@pytest.mark.parametrize("command", ["canonicalize", "quantize", "sparsify"])
def test_reported_sizes_are_inspects(tmp_path: Path, capsys, weight, command: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    model = write_external(folder, weight, location="weights.bin")  # not model.onnx.data
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((16, 1, 64)).astype(np.float32))
    extra = {"canonicalize": [], "quantize": ["--calib", str(calib)], "sparsify": []}[command]
    extra += ["--sparsity", "0.5"] if command == "sparsify" else []
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = [command, str(model), "-o", str(out), "--report", str(report), *extra]
    assert main(argv) == 0
    capsys.readouterr()
    data = json.loads(report.read_text())
    sizes = {}
    for path in (model, out):
        assert main(["inspect", str(path), "--json"]) == 0
        sizes[path] = json.loads(capsys.readouterr().out)["file_size"]["total_bytes"]
    assert sizes[model] > 64 * 32 * 4  # the weights file is counted
    assert (data["input_bytes"], data["output_bytes"]) == (sizes[model], sizes[out])
