"""Every command on small random-init graphs of every exporter users have (issue 14, "Every
exporter"): torch (both exporters, dynamo with external data), tf.keras (Keras 3
``model.export(format="onnx")``), scikit-learn (skl2onnx, with and without ZipMap).

Each command either writes a valid model within its contract (canonicalize exact; the lossy
ones with a fidelity block on held-out samples) or refuses in one line with exit 1 or 2,
writing nothing; never a traceback. The expected refusals are pinned in ``REFUSED``.

Exports are built in the test run (see ``exporter_models.py``). The default run covers every
exporter and architecture family in about two minutes on two cores; the full matrix
(both torch exporters for every architecture) runs with ``ONNXPRUNE_SLOW_TESTS=1``.
Without torch, TensorFlow or scikit-learn installed, their cases are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import exporter_models
from onnxprune.cli import main
from onnxprune.runtime import make_session

SLOW = pytest.mark.skipif(
    os.environ.get("ONNXPRUNE_SLOW_TESTS") != "1",
    reason="full exporter matrix; set ONNXPRUNE_SLOW_TESTS=1",
)

#: Commands that write a model, and those of them that are lossy (report held-out fidelity).
WRITERS = ("canonicalize", "prune", "sparsify", "lowrank", "quantize", "optimize")
LOSSY = ("prune", "sparsify", "lowrank", "quantize")
COMMANDS = (*WRITERS, "verify", "inspect", "bench")

#: (model, command) -> words of the expected one-line refusal.
REFUSED: dict[tuple[str, str], str] = {
    **{("sklearn-zipmap", c): "has a map type" for c in COMMANDS},
}

_NEEDS = {"torch": ("torch", "onnxscript"), "keras": (), "sklearn": ("sklearn", "skl2onnx")}

#: The default run: every architecture once, dynamo (external data) on two of them.
DEFAULT = (
    "torch-torchscript-resnet",
    "torch-torchscript-mobilenet",
    "torch-dynamo-vit",
    "torch-dynamo-densenet",
    "keras",
    "sklearn-tensor",
    "sklearn-zipmap",
)
MODELS = [
    pytest.param(name, marks=() if name in DEFAULT else SLOW) for name in exporter_models.BUILDERS
]


def _skip_unless_installed(name: str) -> None:
    family = name.split("-", maxsplit=1)[0]
    if family == "keras" and not exporter_models.keras_available():
        pytest.skip("tensorflow/keras/tf2onnx not installed")
    for module in _NEEDS[family]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed")


def _argv(command: str, model: Path, calib: Path, out: Path, report: Path) -> list[str]:
    m, c, o, r = str(model), str(calib), str(out), str(report)
    written = ["-o", o, "--calib", c, "--report", r]
    return {
        "canonicalize": ["canonicalize", m, "-o", o, "--calib", c],
        "prune": ["prune", m, *written, "--ratio", "0.25"],
        "sparsify": ["sparsify", m, *written, "--sparsity", "0.5"],
        "lowrank": ["lowrank", m, *written, "--energy", "0.9"],
        "quantize": ["quantize", m, *written],
        "optimize": ["optimize", m, *written, "--bench-seconds", "0"],
        "verify": ["verify", m, m, "--calib", c],
        "inspect": ["inspect", m],
        "bench": ["bench", m, "--runs", "3", "--warmup", "1", "--threads", "1"],
    }[command]


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    session = make_session(path)
    names = [o.name for o in session.get_outputs()]
    return [session.run(names, feed) for feed in feeds]


def _check_written(command: str, model: Path, out: Path, report: Path, calib: Path) -> None:
    """The written model is valid and runs; canonicalize is exact; lossy reports are held out."""
    onnx.checker.check_model(str(out))
    with np.load(calib) as data:
        feeds = [{k: data[k][i] for k in data.files} for i in range(2)]
    before, after = _outputs(model, feeds), _outputs(out, feeds)
    for ref_feed, new_feed in zip(before, after, strict=True):
        for ref, new in zip(ref_feed, new_feed, strict=True):
            assert ref.shape == new.shape and ref.dtype == new.dtype
            if command == "canonicalize":
                bound = 1e-4 * max(1.0, float(np.max(np.abs(ref))))
                assert float(np.max(np.abs(ref - new))) <= bound
    if command in LOSSY:
        fidelity = json.loads(report.read_text())["fidelity"]
        assert fidelity["data"].startswith("held-out samples") and fidelity["outputs"]
    if command == "optimize":
        assert "held-out" in json.loads(report.read_text())["fidelity_data"]


def _run(command: str, name: str, files: tuple[Path, Path, Path], capsys) -> str:
    """Run one command on (model, calibration, work folder); returns ``"ok"`` or the
    refusal line."""
    model, calib, tmp = files
    out, report = tmp / f"{command}.onnx", tmp / f"{command}.json"
    code = main(_argv(command, model, calib, out, report))
    captured = capsys.readouterr()
    if code == 0:
        if command in WRITERS:
            _check_written(command, model, out, report, calib)
        return "ok"
    lines = captured.err.strip().splitlines()
    assert code in (1, 2) and len(lines) == 1, f"{name} {command}: exit {code}\n{captured.err}"
    assert lines[0].startswith(f"onnxprune {command}: error: "), lines[0]
    assert not out.exists(), f"{name} {command}: refused but wrote {out}"
    return lines[0]


@pytest.mark.parametrize("name", MODELS)
def test_every_command_writes_within_contract_or_refuses_in_one_line(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _skip_unless_installed(name)
    model, calib = exporter_models.build(name, tmp_path / "model")
    if name.startswith("torch-dynamo"):
        assert (model.parent / "model.onnx.data").is_file()  # torch's external data layout
    outcomes = {}
    for command in COMMANDS:
        outcomes[command] = _run(command, name, (model, calib, tmp_path), capsys)
    for command, outcome in outcomes.items():
        expected = REFUSED.get((name, command))
        if expected is None:
            assert outcome == "ok", f"{name} {command}: {outcome}"
        else:
            assert expected in outcome, f"{name} {command}: {outcome}"
