"""Sensitivity analysis: exact at ratio 0, matches physical removal, allocation meets targets."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.cli import main
from onnxprune.errors import UsageError
from onnxprune.prune import PruneOptions, prune_model
from onnxprune.prune.allocate import allocate_ratios
from onnxprune.prune.analysis import analyze
from onnxprune.prune.sensitivity import (
    SCHEMA,
    SensitivityResult,
    measure_sensitivity,
    measured_means,
)
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text

HEADER = '<ir_version: 10, opset_import: ["" : 18]>'
SENSITIVE, TOLERANT = "w1:0", "w2:0"


def _two_groups(seed: int = 0) -> ir.Model:
    """Conv A (16 ch, equal magnitudes: sensitive) -> Conv B (16 ch, 2^-i magnitudes) -> out.

    Channel i of B has weights (and downstream weights) scaled by ``2^-i/2``: its output
    contribution falls geometrically, so removing the weakest channels of B first costs
    little and the error grows with the ratio; every channel of A matters about equally.
    """
    rng = np.random.default_rng(seed)
    decay = (2.0 ** (-np.arange(16) / 2)).astype(np.float32)
    w1 = rng.standard_normal((16, 4, 3, 3)).astype(np.float32) * 0.3
    w1 /= np.linalg.norm(w1.reshape(16, -1), axis=1)[:, None, None, None]
    w2 = rng.standard_normal((16, 16, 1, 1)).astype(np.float32) * decay[:, None, None, None]
    w3 = rng.standard_normal((4, 16, 1, 1)).astype(np.float32) * decay[None, :, None, None]
    text = f"""{HEADER}
g (float[1,4,6,6] x, float[16,4,3,3] w1, float[16] b1, float[16,16,1,1] w2, float[4,16,1,1] w3)
  => (float[1,4,6,6] y) {{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r1 = Relu (c1)
  c2 = Conv (r1, w2)
  r2 = Relu (c2)
  y = Conv (r2, w3)
}}"""
    b1 = np.abs(rng.standard_normal(16)).astype(np.float32) * 0.2  # > 0: compensation acts
    return model_from_text(text, {"w1": w1, "b1": b1, "w2": w2, "w3": w3})


def _feeds(n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(n)]


def _nsr(reference: ir.Model, candidate: ir.Model, feeds: list) -> float:
    ref = np.concatenate([run_model(reference, f)["y"] for f in feeds]).astype(np.float64)
    got = np.concatenate([run_model(candidate, f)["y"] for f in feeds]).astype(np.float64)
    return float(np.sum((got - ref) ** 2) / np.sum(ref**2))


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


@pytest.fixture(scope="module")
def measured() -> tuple[ir.Model, SensitivityResult]:
    model = _two_groups()
    result = measure_sensitivity(
        model, _feeds(), ratios=(0.0, 0.25, 0.5, 0.75), round_to=1, criterion="l2"
    )
    return model, result


def _row(result: SensitivityResult, gid: str) -> dict:
    return next(r for r in result.groups if r["id"] == gid)


def test_ratio_zero_is_exact_and_the_model_is_restored(measured):
    model, result = measured
    assert {r["id"] for r in result.groups} == {SENSITIVE, TOLERANT}
    for row in result.groups:
        zero = row["points"][0]
        assert zero["ratio"] == 0.0 and zero["kept"] == row["size"]
        assert zero["nsr"] == 0.0
        assert zero["outputs"]["y"]["cosine"] == pytest.approx(1.0, abs=1e-12)
        assert zero["outputs"]["y"]["sqnr_db"] is None  # infinite: identical outputs
    fresh = _two_groups()
    for name, value in model.graph.initializers.items():
        np.testing.assert_array_equal(
            value.const_value.numpy(), fresh.graph.initializers[name].const_value.numpy()
        )


def test_errors_grow_with_the_ratio_and_tolerant_group_is_cheaper(measured):
    _, result = measured
    for gid in (SENSITIVE, TOLERANT):
        nsr = [p["nsr"] for p in _row(result, gid)["points"]]
        assert nsr[1] > 0
        assert all(b >= a * 0.9 for a, b in itertools.pairwise(nsr)), (gid, nsr)
    tolerant = [p["nsr"] for p in _row(result, TOLERANT)["points"]]
    sensitive = [p["nsr"] for p in _row(result, SENSITIVE)["points"]]
    assert all(t < s for t, s in zip(tolerant[1:], sensitive[1:], strict=True))


@pytest.mark.parametrize("compensate", [True, False])
def test_measured_error_equals_physical_removal(measured, compensate: bool):
    """Zeroing is the exactness oracle: the measured error is that of the pruned model,
    with and without prune's data-free bias compensation."""
    model, result = measured
    if not compensate:
        result = measure_sensitivity(model, _feeds(), ratios=(0.5,), round_to=1, compensate=False)
    point = next(p for p in _row(result, SENSITIVE)["points"] if p["ratio"] == 0.5)
    pruned = _copy(model)
    options = PruneOptions(layer_ratios={SENSITIVE: 0.5}, round_to=1, compensate=compensate)
    report = prune_model(pruned, options)
    assert any("compensation" in n for n in report.notes) == compensate
    assert pruned.graph.initializers["w1"].const_value.shape[0] == point["kept"] == 8
    assert _nsr(model, pruned, _feeds()) == pytest.approx(point["nsr"], rel=1e-4)


def test_json_schema_and_round_trip(measured):
    _, result = measured
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["schema"] == SCHEMA == "onnxprune.sensitivity/1"
    assert data["round_to"] == 1 and data["criterion"] == "l2" and data["samples"] == 8
    row = _row(SensitivityResult.from_dict(data), SENSITIVE)
    assert set(row) == {"id", "size", "nodes", "mac_share", "points"}
    # MACs: c1 = 16*4*9*36, c2 = 16*16*36, c3 = 4*16*36; A scales c1 and c2, B c2 and c3.
    total = 16 * 4 * 9 * 36 + 16 * 16 * 36 + 4 * 16 * 36  # biases cost no MACs
    assert data["macs_before"] == total
    assert row["mac_share"] == pytest.approx((16 * 4 * 9 * 36 + 16 * 16 * 36) / total)
    assert set(row["points"][1]) >= {"ratio", "kept", "nsr", "macs_saved_fraction", "outputs"}
    with pytest.raises(UsageError, match="not a sensitivity result"):
        SensitivityResult.from_dict({"schema": "other"})
    # blocked groups are typed records; the JSON round-trips
    assert data["blocked"] and set(data["blocked"][0]) == {"id", "node", "reason"}
    assert SensitivityResult.from_dict(data).to_dict() == data
    with pytest.raises(UsageError, match="'blocked' must list"):
        SensitivityResult.from_dict({**data, "blocked": [{"id": "x"}]})


def test_allocation_meets_target_and_prunes_the_tolerant_group_more(measured):
    model, result = measured
    alloc = allocate_ratios(model, result, 0.85)
    assert alloc.ratios[TOLERANT] > alloc.ratios[SENSITIVE]
    assert not alloc.notes
    guided = _copy(model)
    options = PruneOptions(layer_ratios=alloc.ratios, round_to=1)
    report = prune_model(guided, options)
    assert report.macs[1] <= 0.85 * report.macs[0]
    assert report.macs[1] == alloc.macs[1]
    # The same MACs target reached uniformly costs more accuracy.
    uniform = _copy(model)
    prune_model(uniform, PruneOptions(target_macs=0.85, round_to=1))
    assert _nsr(model, guided, _feeds()) < _nsr(model, uniform, _feeds())


def test_allocation_reports_unreachable_targets(measured):
    model, result = measured
    alloc = allocate_ratios(model, result, 0.05)
    assert alloc.notes and "not reachable" in alloc.notes[0]
    assert max(alloc.ratios.values()) <= 0.75
    with pytest.raises(UsageError, match="fraction of MACs"):
        allocate_ratios(model, result, 1.5)


def test_cli_writes_json_plot_and_ratios_that_prune_accepts(tmp_path: Path):
    model_path = tmp_path / "m.onnx"
    ir.save(_two_groups(), model_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in _feeds()]))
    out, ratios, plot = tmp_path / "s.json", tmp_path / "r.json", tmp_path / "s.png"
    args = ["sensitivity", str(model_path), "--calib", str(calib), "-o", str(out)]
    args += ["--round-to", "1", "--allocate", "0.85", "--save-ratios", str(ratios)]
    pytest.importorskip("matplotlib")
    assert main([*args, "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 1000
    assert json.loads(out.read_text())["schema"] == SCHEMA
    saved = json.loads(ratios.read_text())
    assert saved["schema"] == "onnxprune.layer_ratios/1" and saved["round_to"] == 1
    pruned = _copy(_two_groups())
    options = PruneOptions(layer_ratios=saved["layer_ratios"], round_to=1)
    report = prune_model(pruned, options)
    assert report.macs[1] <= 0.85 * report.macs[0]
    # Reuse the measurement without --calib.
    again = tmp_path / "r2.json"
    reuse = ["sensitivity", str(model_path), "--from", str(out), "--allocate", "0.85"]
    assert main([*reuse, "--save-ratios", str(again)]) == 0
    assert json.loads(again.read_text())["layer_ratios"] == saved["layer_ratios"]


def test_compensation_when_the_consumer_is_pruned_too():
    model = _two_groups()
    prune_model(model, PruneOptions(ratio=0.5, round_to=1))
    run_model(model, _feeds(1)[0])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--calib is required"),
        (["--calib", "c.npz", "--save-ratios", "r.json"], "--save-ratios needs --allocate"),
        (["--calib", "c.npz"], "nothing to write"),
    ],
)
def test_cli_refusals(tmp_path: Path, capsys, extra: list[str], message: str):
    model_path = tmp_path / "m.onnx"
    ir.save(_two_groups(), model_path)
    argv = ["sensitivity", str(model_path), *extra]
    if "nothing" not in message and "--save-ratios" not in extra:
        argv += ["-o", str(tmp_path / "s.json")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _residual_bias_free() -> ir.Model:
    """Conv A (bias) -> Relu -> Conv B (no bias) -> Add(B, A) -> Conv C.

    The Add couples B's output with A's output, which B also reads: one group holds B's
    input and output channels, and removing it creates B's compensation bias (DenseNet's
    transition convs after a folded BatchNorm have this shape).
    """
    rng = np.random.default_rng(3)
    text = f"""{HEADER}
g (float[1,4,6,6] x, float[8,4,3,3] w1, float[8] b1, float[8,8,1,1] w2, float[4,8,1,1] w3)
  => (float[1,4,6,6] y) {{
  a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu (a)
  b = Conv (r, w2)
  s = Add (b, a)
  y = Conv (s, w3)
}}"""
    arrays = {
        "w1": rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
        "b1": np.abs(rng.standard_normal(8)).astype(np.float32),  # > 0: compensation acts
        "w2": rng.standard_normal((8, 8, 1, 1)).astype(np.float32),
        "w3": rng.standard_normal((4, 8, 1, 1)).astype(np.float32),
    }
    return model_from_text(text, arrays)


@pytest.mark.parametrize("means", ["data-free", "measured"])
def test_probe_of_a_group_that_is_both_input_and_output_of_a_bias_free_conv(means: str):
    """The probe zeroes instead of slicing, so a bias it creates keeps every channel (it
    was created cut and onnxruntime refused the model); its error is the pruned model's."""
    model = _residual_bias_free()
    analysis = analyze(model)
    stats = measured_means(model, analysis, _feeds()) if means == "measured" else None
    result = measure_sensitivity(
        model, _feeds(), ratios=(0.5,), round_to=1, criterion="l2", measured=stats
    )
    (row,) = result.groups
    point = row["points"][0]
    assert point["kept"] == 4 and point["nsr"] > 0
    pruned = _copy(model)
    options = PruneOptions(layer_ratios={row["id"]: 0.5}, round_to=1)
    report = prune_model(pruned, options, measure=None if stats is None else lambda _: stats)
    assert pruned.graph.initializers["w2"].const_value.shape == (4, 4, 1, 1), report.notes
    assert _nsr(model, pruned, _feeds()) == pytest.approx(point["nsr"], rel=1e-4)
