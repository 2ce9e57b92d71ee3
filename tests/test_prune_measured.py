"""Measured allocation (issue 17 item 3): per-group errors measured as prune --calib cuts.

The probe's error for one group must be exactly that of the physically pruned model with
measured compensation (constant channels into a zero-padded conv included), and the
allocation must meet the MACs target with less error than one uniform ratio.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.cli import main
from onnxprune.prune import PruneOptions, analyze, measured, prune_model
from onnxprune.prune.activations import removed_input_means
from onnxprune.prune.measured import (
    COARSE_RATIOS,
    MIN_SAMPLES,
    RATIOS,
    measured_allocation,
    measurement_size,
)
from onnxprune.prune.sensitivity import measure_sensitivity, measured_means
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text

HEADER = '<ir_version: 10, opset_import: ["" : 18]>'
FIRST, SECOND = "w1:0", "w2:0"


def _model(seed: int = 0) -> ir.Model:
    """Conv 3x3 (16) -> Relu -> Conv 3x3 (16, zero-padded) -> Relu -> Conv 1x1 (4).

    Channels 0-3 of the first conv have zero weights and a positive bias: they are the
    constant ``relu(b)`` everywhere, their l2 score is lowest, and removing them from the
    padded second conv needs the exact border term. The second conv's channel ``i`` is
    scaled by ``2^-i/2`` (tolerant to pruning); the first conv's channels matter alike.
    """
    rng = np.random.default_rng(seed)
    decay = (2.0 ** (-np.arange(16) / 2)).astype(np.float32)
    w1 = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    w1 /= np.linalg.norm(w1.reshape(16, -1), axis=1)[:, None, None, None]
    w1[:4] = 0
    b1 = (np.abs(rng.standard_normal(16)) * 0.5 + 0.1).astype(np.float32)
    w2 = (rng.standard_normal((16, 16, 3, 3)) * 0.3).astype(np.float32)
    w2 *= decay[:, None, None, None]
    w3 = rng.standard_normal((4, 16, 1, 1)).astype(np.float32) * decay[None, :, None, None]
    text = f"""{HEADER}
g (float[1,4,6,6] x, float[16,4,3,3] w1, float[16] b1, float[16,16,3,3] w2,
   float[4,16,1,1] w3) => (float[1,4,6,6] y) {{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, w2)
  r2 = Relu (c2)
  y = Conv (r2, w3)
}}"""
    return model_from_text(text, {"w1": w1, "b1": b1, "w2": w2, "w3": w3})


def _feeds(n: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(n)]


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _nsr(reference: ir.Model, candidate: ir.Model, feeds: list) -> float:
    ref = np.concatenate([run_model(reference, f)["y"] for f in feeds]).astype(np.float64)
    got = np.concatenate([run_model(candidate, f)["y"] for f in feeds]).astype(np.float64)
    return float(np.sum((got - ref) ** 2) / np.sum(ref**2))


def _prune_measured(model: ir.Model, options: PruneOptions, feeds: list) -> ir.Model:
    pruned = _copy(model)
    measure = functools.partial(removed_input_means, pruned, feeds=feeds)
    prune_model(pruned, options, measure=measure)
    return pruned


@pytest.mark.parametrize(("ratio", "kept"), [(0.25, 12), (0.5, 8)])
def test_probe_error_is_the_error_of_the_pruned_model(ratio: float, kept: int):
    """Oracle: the probe zeroes units and compensates with measured means and border terms;
    prune removes them physically with the same compensation. Same outputs, same error.
    At 0.25 only the four constant channels go, which the exact compensation restores."""
    model, feeds = _model(), _feeds()
    means = measured_means(model, analyze(model), feeds)
    result = measure_sensitivity(model, feeds, ratios=(ratio,), round_to=1, measured=means)
    point = next(r for r in result.groups if r["id"] == FIRST)["points"][0]
    assert point["kept"] == kept
    pruned = _prune_measured(model, PruneOptions(layer_ratios={FIRST: ratio}, round_to=1), feeds)
    assert pruned.graph.initializers["w1"].const_value.shape[0] == kept
    expected = _nsr(model, pruned, feeds)
    if ratio == 0.25:
        assert expected < 1e-10 and point["nsr"] < 1e-10
    else:
        assert expected > 1e-3
        assert point["nsr"] == pytest.approx(expected, rel=1e-4)


def test_allocation_meets_the_target_with_less_error_than_uniform():
    model, feeds = _model(), _feeds()
    options = PruneOptions(target_macs=0.7, round_to=1)
    allocation = measured_allocation(model, options, feeds)
    # The four constant channels cost nothing and are taken; beyond them the first conv is
    # fragile, so the rest of the saving comes from the second (tolerant) one.
    assert allocation.ratios[FIRST] == 0.25 and allocation.ratios[SECOND] > 0
    assert allocation.macs[1] <= 0.7 * allocation.macs[0]
    assert {c["id"] for c in allocation.curves} == {FIRST, SECOND}
    guided = _prune_measured(model, PruneOptions(layer_ratios=allocation.ratios, round_to=1), feeds)
    uniform = _prune_measured(model, options, feeds)
    held_out = _feeds(8, seed=2)
    assert _nsr(model, guided, held_out) < _nsr(model, uniform, held_out)
    with pytest.raises(ValueError, match="MACs target"):
        measured_allocation(model, PruneOptions(ratio=0.5), feeds)


def test_excluded_groups_are_not_cut():
    model, feeds = _model(), _feeds()
    options = PruneOptions(target_macs=0.8, round_to=1, exclude=[SECOND])
    allocation = measured_allocation(model, options, feeds)
    assert SECOND not in allocation.ratios and allocation.ratios[FIRST] > 0


def _files(tmp_path: Path) -> tuple[Path, Path]:
    model_path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    ir.save(_model(), model_path)
    np.savez(calib, x=np.stack([f["x"] for f in _feeds(12)]))
    return model_path, calib


def test_cli_measures_by_default_with_calib_and_reports_the_choice(tmp_path: Path):
    model_path, calib = _files(tmp_path)
    common = ["prune", str(model_path), "--target-macs", "0.7", "--calib", str(calib)]
    common += ["--round-to", "1"]
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main([*common, "-o", str(out), "--report", str(report)]) == 0
    step = json.loads(report.read_text())["steps"][0]
    allocation = step["allocation"]
    assert allocation["samples"] == 9  # the fit part of 12 feeds (3 held out)
    assert set(allocation["layer_ratios"]) == {FIRST, SECOND}
    assert any(n.startswith("measured allocation") for n in step["notes"])
    assert step["macs"]["after"] <= 0.7 * step["macs"]["before"]
    run_model(ir.load(out), _feeds(1)[0])
    again = tmp_path / "again.onnx"
    assert main([*common, "-o", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()  # same input, same bytes
    uniform = tmp_path / "u.json"
    args = [*common, "-o", str(tmp_path / "u.onnx"), "--report", str(uniform)]
    assert main([*args, "--allocation", "uniform"]) == 0
    assert "allocation" not in json.loads(uniform.read_text())["steps"][0]


def test_measured_allocation_without_data_is_refused(tmp_path: Path, capsys):
    model_path, _ = _files(tmp_path)
    out = tmp_path / "out.onnx"
    args = ["prune", str(model_path), "-o", str(out), "--target-macs", "0.7"]
    assert main([*args, "--allocation", "measured"]) != 0
    assert "--allocation measured needs --calib" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("groups", "macs", "expected"),
    [
        # small model: every feed at every ratio fits (2 x 5 x 1e6 x 18 << 4e12)
        (2, 10**6, (16, RATIOS)),
        # DenseNet-121: 89 groups x 5 ratios of 2.8 GMACs -> 4e12 / 1.25e12 - 2 = 1 feed, below
        # the floor; coarse: 4e12 / 7.5e11 - 2 = 3, still below: the floor, over budget
        (89, 2_800_000_000, (MIN_SAMPLES, COARSE_RATIOS)),
        # 40 groups of 1 GMAC: 4e12 / 2e11 - 2 = 18 -> all 16 feeds
        (40, 10**9, (16, RATIOS)),
        # 100 groups of 1 GMAC: 4e12 / 5e11 - 2 = 6 feeds at every ratio
        (100, 10**9, (6, RATIOS)),
        # 200 groups of 1 GMAC: 4e12 / 1e12 - 2 = 2 -> coarse: 4e12 / 6e11 - 2 = 4
        (200, 10**9, (4, COARSE_RATIOS)),
    ],
)
def test_measurement_is_sized_to_the_work_budget(groups, macs, expected):
    assert measurement_size(groups, RATIOS, macs, available=64, budget=4e12) == expected
    # never more feeds than there are
    assert measurement_size(groups, RATIOS, macs, available=3, budget=4e12)[0] <= 3


def test_a_tight_budget_is_reported_and_still_meets_the_target():
    model, feeds = _model(), _feeds()
    options = PruneOptions(target_macs=0.7, round_to=1)
    allocation = measured_allocation(model, options, feeds, budget=1.0)
    assert allocation.samples == MIN_SAMPLES
    assert any("to stay near" in note for note in allocation.notes), allocation.notes
    assert allocation.macs[1] <= 0.7 * allocation.macs[0]


def test_a_second_target_on_the_same_model_and_data_reuses_the_curves():
    """optimize's milder retry of a prune step: the curves are not measured again, and the
    allocation is the one a fresh measurement gives."""
    model, feeds = _model(), _feeds()
    first = measured_allocation(model, PruneOptions(target_macs=0.7, round_to=1), feeds)
    assert not any("reused" in note for note in first.notes)
    again = measured_allocation(model, PruneOptions(target_macs=0.85, round_to=1), feeds)
    assert any("reused" in note for note in again.notes)
    measured._CURVES.clear()
    fresh = measured_allocation(model, PruneOptions(target_macs=0.85, round_to=1), feeds)
    assert fresh.ratios == again.ratios and fresh.curves == again.curves
    other = measured_allocation(model, PruneOptions(target_macs=0.85, round_to=1), _feeds(8, 5))
    assert not any("reused" in note for note in other.notes)
