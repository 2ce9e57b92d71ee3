"""Wanda and FLAP criteria: exact scores, and the fluctuation metric with compensation.

``wanda`` scores a unit ``||x_u||^2 ||w_u||^2`` (relative to the consumer's output energy),
``flap`` ``Var(x_u) ||w_u||^2``. A saturated unit (constant, large output) scores high by
``wanda`` and zero by ``flap``; with its mean compensated, removing it costs nothing.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.prune import PruneOptions, analyze, prune_model
from onnxprune.prune.activations import reconstruction_stats, removed_input_means
from onnxprune.prune.importance import group_scores
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text
from prune_models import HEADER

HIDDEN = 8
SATURATED = 2


def _mlp(seed: int = 0) -> tuple[ir.Model, dict]:
    """x -> Gemm -> Relu -> Gemm(transB, alpha=2); unit 2 is the constant relu(5) = 5."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((4, HIDDEN)).astype(np.float32)
    b1 = (rng.standard_normal(HIDDEN) * 0.1).astype(np.float32)
    w2 = rng.standard_normal((3, HIDDEN)).astype(np.float32)
    w1[:, SATURATED] = 0.0
    b1[SATURATED] = 5.0
    text = f"""{HEADER}
g (float[batch,4] x, float[4,{HIDDEN}] w1, float[{HIDDEN}] b1, float[3,{HIDDEN}] w2,
   float[3] b2) => (float[batch,3] y) {{
  h = Gemm (x, w1, b1)
  rh = Relu (h)
  y = Gemm <transB=1, alpha=2.0> (rh, w2, b2)
}}"""
    weights = {"w1": w1, "b1": b1, "w2": w2, "b2": np.full(3, 0.5, np.float32)}
    return model_from_text(text, weights), weights


def _feeds(seed: int, count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(-1, 1, (16, 4)).astype(np.float32)} for _ in range(count)]


def _hidden(weights: dict, feeds: list) -> np.ndarray:
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    return np.maximum(x @ weights["w1"].astype(np.float64) + weights["b1"], 0.0)


@pytest.mark.parametrize("criterion", ["wanda", "flap"])
def test_scores_are_each_units_output_change(criterion: str):
    model, weights = _mlp()
    feeds = _feeds(1)
    analysis = analyze(model)
    (group,) = analysis.prunable
    stats = reconstruction_stats(model, analysis, feeds, centered=criterion == "flap")
    scores, notes = group_scores(model, analysis, criterion, stats)
    assert not notes
    h = _hidden(weights, feeds)
    if criterion == "flap":
        h = h - h.mean(0)
    w = 2.0 * weights["w2"].astype(np.float64).T  # [hidden, out], alpha folded in
    gram = h.T @ h / len(h)
    total = float(np.sum(gram * (w @ w.T)))
    expected = np.diag(gram) * np.sum(w**2, axis=1) / total
    positions = [u.position(group.anchor) for u in group.units]
    # the hidden activations come from onnxruntime in float32
    np.testing.assert_allclose(scores[group.id], expected[positions], rtol=1e-5)


def test_flap_removes_the_saturated_unit_and_compensation_restores_it():
    model, _ = _mlp()
    fit, held = _feeds(1), _feeds(2)
    analysis = analyze(model)
    group_id = analysis.prunable[0].id
    errors, kept_saturated = {}, {}
    for criterion in ("wanda", "flap"):
        stats = reconstruction_stats(model, analysis, fit, centered=criterion == "flap")
        pruned = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        options = PruneOptions(layer_ratios={group_id: 1 / HIDDEN}, round_to=1, criterion=criterion)
        measure = functools.partial(removed_input_means, pruned, feeds=fit)
        report = prune_model(pruned, options, stats, measure=measure)
        kept_saturated[criterion] = SATURATED in report.plan.keep[group_id]
        diffs = [run_model(pruned, f)["y"] - run_model(model, f)["y"] for f in held]
        errors[criterion] = float(np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in diffs)))
    assert kept_saturated == {"wanda": True, "flap": False}
    assert errors["flap"] < 1e-4 < errors["wanda"]
