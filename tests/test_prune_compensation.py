"""Compensation of removed channels against exact oracles (issue 17 item 0).

Oracle: the original model with the removed channels' contribution replaced by what it
was. A removed channel whose activation is a known constant must be compensated exactly,
including the borders of a zero-padded depthwise conv, where it is not constant.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from onnxprune.intermediates import iter_intermediates
from onnxprune.prune import PruneOptions, analyze
from onnxprune.prune.activations import removed_input_means
from onnxprune.prune.compensate import expected_input
from onnxprune.prune.core import prune_model
from onnxprune.prune.plan import PruningPlan
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text
from prune_models import HEADER

CONSTANT = (1, 4, 6)  # expand channels whose weights are zero: clip(b_e) everywhere


def _inverted_residual(seed: int = 0) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """expand 1x1 -> ReLU6 -> zero-padded depthwise 3x3 -> ReLU6 -> project 1x1."""
    rng = np.random.default_rng(seed)
    w = {
        "we": rng.standard_normal((8, 3, 1, 1)).astype(np.float32),
        "be": rng.uniform(0.5, 2.0, 8).astype(np.float32),
        "wd": rng.uniform(-0.2, 0.6, (8, 1, 3, 3)).astype(np.float32),
        "bd": rng.uniform(0.1, 0.5, 8).astype(np.float32),
        "wp": rng.standard_normal((4, 8, 1, 1)).astype(np.float32),
        "bp": rng.standard_normal(4).astype(np.float32),
    }
    w["we"][list(CONSTANT)] = 0.0
    text = f"""{HEADER}
g (float[2,3,6,6] x, float[8,3,1,1] we, float[8] be, float[8,1,3,3] wd, float[8] bd,
   float[4,8,1,1] wp, float[4] bp) => (float[2,4,6,6] y) {{
  lo = Constant <value = float {{0.0}}> ()
  hi = Constant <value = float {{6.0}}> ()
  e = Conv (x, we, be)
  re = Clip (e, lo, hi)
  d = Conv <group=8, pads=[1,1,1,1]> (re, wd, bd)
  rd = Clip (d, lo, hi)
  y = Conv (rd, wp, bp)
}}"""
    return model_from_text(text, w), w


def _feeds(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)} for _ in range(count)]


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _plan(model: ir.Model, removed: tuple[int, ...]) -> PruningPlan:
    (group,) = [g for g in analyze(model).prunable if g.size == 8]
    keep = [p for p in range(8) if p not in removed]
    return PruningPlan({group.id: keep}, {group.id: 8})


def _prune(model: ir.Model, removed: tuple[int, ...], feeds: list | None) -> tuple[ir.Model, list]:
    pruned = _copy(model)
    measure = None if feeds is None else functools.partial(removed_input_means, pruned, feeds=feeds)
    report = prune_model(pruned, PruneOptions(plan=_plan(model, removed)), measure=measure)
    return pruned, report.notes


def test_constant_channels_through_padded_depthwise_are_compensated_exactly():
    model, _ = _inverted_residual()
    feeds = _feeds(3)
    pruned, notes = _prune(model, CONSTANT, feeds)
    assert pruned.graph.initializers["wp"].const_value.shape == (4, 5, 1, 1)
    assert any("calibration means" in n for n in notes)
    assert any("border" in n for n in notes)
    for feed in [*feeds, *_feeds(2, seed=7)]:  # unseen inputs too: the channels are constant
        expected = run_model(model, feed)["y"]
        np.testing.assert_allclose(run_model(pruned, feed)["y"], expected, atol=1e-4)


def test_mean_compensation_is_the_oracle_on_average():
    """For varying channels the bias absorbs the measured mean: the pruned model equals the
    original with those channels replaced by their mean (exact on the fit data's average)."""
    model, _ = _inverted_residual()
    removed = (0, 3)
    feeds = _feeds(4)
    pruned, _ = _prune(model, removed, feeds)
    delta = np.concatenate(
        [run_model(pruned, f)["y"] - run_model(model, f)["y"] for f in feeds]
    )  # = -sum_c W_p[:, c] (x_c - E x_c), whose mean over the fit data is zero
    np.testing.assert_allclose(delta.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    unpruned_mean = _copy(model)
    nothing, _ = _prune(unpruned_mean, removed, None)
    data_free = np.concatenate(
        [run_model(nothing, f)["y"] - run_model(model, f)["y"] for f in feeds]
    )
    assert np.abs(delta.mean(axis=(0, 2, 3))).max() < np.abs(data_free.mean(axis=(0, 2, 3))).max()


def test_data_free_estimate_goes_through_the_depthwise_conv():
    """Without data, E[rd] of a constant channel is clip(b_d + clip(b_e) * sum K): exact in the
    interior of the map (the border is what only data can give)."""
    model, _ = _inverted_residual()
    rd = next(n for n in model.graph if n.op_type == "Clip" and n.outputs[0].name == "rd")
    estimate = expected_input(rd.outputs[0])
    (outputs,) = iter_intermediates(model, ["rd"], _feeds(1))
    interior = outputs["rd"][:, :, 1:5, 1:5]
    for c in CONSTANT:
        np.testing.assert_allclose(interior[:, c], estimate[c], rtol=1e-5)
    pruned, notes = _prune(model, CONSTANT, None)
    assert any("no data" in n for n in notes)
    feed = _feeds(1)[0]
    got, want = run_model(pruned, feed)["y"], run_model(model, feed)["y"]
    np.testing.assert_allclose(got[:, :, 1:5, 1:5], want[:, :, 1:5, 1:5], atol=1e-4)
    assert not np.allclose(got, want, atol=1e-4)  # the border differs without data


def test_constant_gemm_channels_are_exact_with_alpha():
    """Gemm consumers: alpha multiplies the removed term, and the bias is scaled by beta."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((6, 10)).astype(np.float32)
    w1[:, [2, 7]] = 0.0
    arrays = {
        "w1": w1,
        "b1": np.abs(rng.standard_normal(10)).astype(np.float32),
        "w2": rng.standard_normal((3, 10)).astype(np.float32),
        "b2": rng.standard_normal(3).astype(np.float32),
    }
    text = f"""{HEADER}
g (float[batch,6] x, float[6,10] w1, float[10] b1, float[3,10] w2, float[3] b2)
  => (float[batch,3] y) {{
  h = Gemm (x, w1, b1)
  r = Relu (h)
  y = Gemm <transB=1, alpha=2.0, beta=0.5> (r, w2, b2)
}}"""
    model = model_from_text(text, arrays)
    (group,) = analyze(model).prunable
    plan = PruningPlan({group.id: [p for p in range(10) if p not in (2, 7)]}, {group.id: 10})
    feeds = [{"x": rng.standard_normal((8, 6)).astype(np.float32)} for _ in range(2)]
    for measure in (None, functools.partial(removed_input_means, feeds=feeds)):
        pruned = _copy(model)
        bound = None if measure is None else functools.partial(measure, pruned)
        prune_model(pruned, PruneOptions(plan=plan), measure=bound)
        got = run_model(pruned, feeds[0])["y"]
        np.testing.assert_allclose(got, run_model(model, feeds[0])["y"], atol=1e-4)
