"""Prune's MACs come from concrete input shapes, never from the exporter's annotations.

Issue 17 item 1: an export with symbolic spatial dims and wrong ``value_info`` (``unk__``
dims, a 1x1 where the map is 32x32) must be counted at the sizes of the calibration feeds
(or ``--dim``), with a symbolic batch of 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.analysis.dims import feed_dims
from onnxprune.prune.api import prune_file
from onnxprune.prune.core import PruneOptions
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text

TEXT = """<ir_version: 10, opset_import: ["" : 18]>
g (float[N,3,H,W] x, float[8,3,3,3] w1, float[16,8,3,3] w2) => (float[N,16,H,W] y)
<float[N,8,unk__1,unk__2] c1, float[N,8,1,1] r1>
{
  c1 = Conv <pads=[1,1,1,1]> (x, w1)
  r1 = Relu (c1)
  y = Conv <pads=[1,1,1,1]> (r1, w2)
}"""


def _macs(c1: int, hw: int) -> int:
    """Exact MACs: conv1 c1 x 3 x 9 per position, conv2 16 x c1 x 9 per position."""
    return (c1 * 3 * 9 + 16 * c1 * 9) * hw


@pytest.fixture
def lying(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "w2": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
    }
    model = model_from_text(TEXT, weights)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert list(relu.outputs[0].shape)[2:] == [1, 1]  # the annotation lies
    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    ir.save(model, path)
    np.savez(calib, x=rng.standard_normal((6, 1, 3, 32, 24)).astype(np.float32))
    return path, calib


def test_macs_come_from_the_calibration_feeds(lying, tmp_path: Path):
    path, calib = lying
    out = tmp_path / "out.onnx"
    result = prune_file(path, out, PruneOptions(ratio=0.5, round_to=1), calib=calib)
    assert result.macs == (_macs(8, 32 * 24), _macs(4, 32 * 24))
    shape = run_model(ir.load(out), {"x": np.zeros((1, 3, 32, 24), np.float32)})["y"].shape
    assert shape == (1, 16, 32, 24)


def test_dim_overrides_the_feeds_and_binds_without_data(lying, tmp_path: Path):
    path, calib = lying
    options = PruneOptions(ratio=0.5, round_to=1)
    dims = {"H": 16, "W": 8}
    with_data = prune_file(path, tmp_path / "a.onnx", options, calib=calib, dims=dims)
    without = prune_file(path, tmp_path / "b.onnx", options, dims=dims)
    assert with_data.macs == without.macs == (_macs(8, 16 * 8), _macs(4, 16 * 8))


def test_feed_dims_median_and_unbound_batch():
    model = model_from_text(
        """<ir_version: 10, opset_import: ["" : 18]>
g (float[B,S,4] x, float[?,4] z) => (float[B,S,4] y) { y = Relu (x) }""",
        {},
    )
    feeds = [
        {"x": np.zeros((2, s, 4), np.float32), "z": np.zeros((n, 4), np.float32)}
        for s, n in ((7, 1), (3, 5), (12, 2))
    ]
    assert feed_dims(model, feeds) == {"S": 7}
    assert feed_dims(model, []) == {}
