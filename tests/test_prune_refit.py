"""Least-squares recovery (prune --reconstruct): the number of passes over the model is
bounded, whatever the number of consumers, and the normal equations cost one product per
fold, whatever the number of feeds (issue 14 item 27: DenseNet-121)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.intermediates import iter_intermediates
from onnxprune.prune import analyze, recover, ridge
from onnxprune.prune.activations import removed_input_means
from onnxprune.prune.api import prune_file
from onnxprune.prune.core import PruneOptions, prune_model
from onnxprune.prune.plan import PruningPlan
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text
from prune_models import HEADER, deep_chain


def test_refit_chunks_bound_passes_and_memory() -> None:
    assert recover.refit_chunks([1] * 5, passes=8) == [[0], [1], [2], [3], [4]]
    chunks = recover.refit_chunks([1] * 20, passes=8)
    assert len(chunks) == 7 and [i for c in chunks for i in c] == list(range(20))
    assert recover.refit_chunks([6, 6, 6, 20, 1], passes=1, budget=12) == [
        [0, 1],
        [2],
        [3],
        [4],
    ]


def test_refit_passes_do_not_grow_with_the_number_of_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """39 consumers: once one pass over every feed per consumer (40 passes), now at most
    ``MAX_PASSES`` + the teacher's pass; every refit still helps."""
    model_path, calib = tmp_path / "deep.onnx", tmp_path / "calib.npz"
    ir.save(deep_chain(40), model_path)
    x = np.random.default_rng(1).standard_normal((12, 1, 3, 6, 6)).astype(np.float32)
    np.savez(calib, x=x)
    passes = []
    original = recover.iter_intermediates

    def counting(model, names, feeds, **kwargs):
        passes.append(len(names))
        return original(model, names, feeds, **kwargs)

    monkeypatch.setattr(recover, "iter_intermediates", counting)
    products = []
    add = ridge.Folds.add

    def counting_add(self, fold, design, target):
        products.append(len(design))
        return add(self, fold, design, target)

    monkeypatch.setattr(ridge.Folds, "add", counting_add)
    options = PruneOptions(ratio=0.5, round_to=1)
    result = prune_file(model_path, tmp_path / "out.onnx", options, calib=calib, reconstruct=True)
    refits = result.refits[0]
    assert len(refits) == 39
    assert len(passes) <= recover.MAX_PASSES + 1 < len(refits), passes
    # one K x K product per consumer and fold, not one per feed (12 feeds, 5 folds)
    assert len(products) <= ridge.MAX_FOLDS * len(refits) < 12 * len(refits)
    assert all(r.error_after <= r.error_before for r in refits)
    assert sum(r.error_after < r.error_before for r in refits) >= 20


def test_cross_validation_decomposes_once_per_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chosen strength is applied with one solve (same solution as its eigen path), so
    a consumer costs one eigendecomposition per fold, not one more."""
    rng = np.random.default_rng(0)
    folds = ridge.Folds.zeros(5, 40, 5)
    for fold in range(5):
        design = rng.standard_normal((60, 40))
        folds.add(fold, design, design[:, :5] * 0.5 + 0.3 * rng.standard_normal((60, 5)))
    s0 = np.full((40, 5), 0.01)
    calls = []
    eigh = np.linalg.eigh

    def counting(matrix, *args, **kwargs):
        calls.append(matrix.shape)
        return eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(ridge.np.linalg, "eigh", counting)
    chosen = ridge.cross_validated_refit(folds, s0)
    assert np.isfinite(chosen.strength) and len(calls) == 5
    r, _ = ridge._error_terms(folds, s0)
    p = ridge._scales(folds.gram.sum(0), float(folds.rows.sum()))
    index = [g for g in ridge.GRID if np.isfinite(g)].index(chosen.strength)
    path = ridge._path(folds.gram.sum(0), r.sum(0), p, float(folds.rows.sum()))
    np.testing.assert_allclose(chosen.solution, s0 + path[index], rtol=1e-9, atol=1e-12)


def _residual_mlp(seed: int = 0) -> ir.Model:
    """Two residual blocks ``z = Gemm(Relu(Gemm(x))) + x`` of 8 hidden units on a 4-wide stream."""
    rng = np.random.default_rng(seed)
    text = f"""{HEADER}
g (float[16,4] x, float[4,8] w1, float[8] b1, float[8,4] w2, float[4] b2, float[4,8] w3,
   float[8] b3, float[8,4] w4, float[4] b4) => (float[16,4] z2) {{
  h1 = Gemm (x, w1, b1)
  r1 = Relu (h1)
  y1 = Gemm (r1, w2, b2)
  z1 = Add (y1, x)
  h2 = Gemm (z1, w3, b3)
  r2 = Relu (h2)
  y2 = Gemm (r2, w4, b4)
  z2 = Add (y2, z1)
}}"""
    shapes = {"w1": (4, 8), "b1": (8,), "w2": (8, 4), "b2": (4,)}
    shapes |= {"w3": (4, 8), "b3": (8,), "w4": (8, 4), "b4": (4,)}
    return model_from_text(
        text, {k: (rng.standard_normal(v) * 0.7).astype(np.float32) for k, v in shapes.items()}
    )


def test_refit_before_a_residual_add_targets_the_sum_minus_the_pruned_skip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consumer whose output is added to a skip is fit to ``Z_o - s_p``: the original sum
    minus the pruned model's skip (which carries the earlier blocks' error), not to its own
    original output. Oracle: the normal equations built from rows computed here."""
    model = _residual_mlp()
    pruned = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    report = prune_model(pruned, PruneOptions(ratio=0.5, round_to=1))
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((16, 4)).astype(np.float32)} for _ in range(6)]
    seen = []
    solve = recover.cross_validated_refit
    monkeypatch.setattr(
        recover, "cross_validated_refit", lambda folds, s0: seen.append(folds) or solve(folds, s0)
    )
    results = recover.refit_consumers(model, pruned, report.kept, feeds, report.ranks)
    assert len(results) == len(seen) == 2
    teacher = list(iter_intermediates(model, ["z1", "z2"], feeds))
    student = list(iter_intermediates(pruned, ["r1", "r2", "z1"], feeds))
    for folds, hidden, target in (
        (seen[0], "r1", [t["z1"] - f["x"] for t, f in zip(teacher, feeds, strict=True)]),
        (seen[1], "r2", [t["z2"] - s["z1"] for t, s in zip(teacher, student, strict=True)]),
    ):
        a = np.concatenate([s[hidden] for s in student]).astype(np.float64)
        design = np.hstack([a, np.ones((len(a), 1))])
        t = np.concatenate(target).astype(np.float64)
        np.testing.assert_allclose(folds.cross.sum(0), design.T @ t, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(folds.target_sq.sum(), np.sum(t * t), rtol=1e-5)
    # the skip of the second block differs from the original's: the target is not y2's own
    assert not np.allclose(teacher[0]["z1"], student[0]["z1"], atol=1e-3)


def test_refit_of_a_conv_followed_by_border_compensation_stays_exact() -> None:
    """Constant channels removed before a zero-padded 3x3 conv are compensated exactly (bias
    plus the border constant added after the conv); the refit that follows aims at the
    original output minus that constant, so the model stays exact (before the fix it
    absorbed the border into the weights and the constant was then added twice)."""
    rng = np.random.default_rng(0)
    w = {
        "we": rng.standard_normal((8, 3, 1, 1)).astype(np.float32),
        "be": rng.uniform(0.5, 2.0, 8).astype(np.float32),
        "w2": (rng.standard_normal((4, 8, 3, 3)) * 0.3).astype(np.float32),
        "b2": rng.standard_normal(4).astype(np.float32),
    }
    w["we"][[1, 4, 6]] = 0.0  # these channels are Relu(be): constant, but not at the borders
    text = f"""{HEADER}
g (float[2,3,6,6] x, float[8,3,1,1] we, float[8] be, float[4,8,3,3] w2, float[4] b2)
  => (float[2,4,6,6] y) {{
  e = Conv (x, we, be)
  r = Relu (e)
  c = Conv <pads=[1,1,1,1]> (r, w2, b2)
  y = Sigmoid (c)
}}"""
    model = model_from_text(text, w)
    feeds = [{"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)} for _ in range(5)]
    pruned = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    (group,) = analyze(model).prunable
    plan = PruningPlan({group.id: [0, 2, 3, 5, 7]}, {group.id: 8})
    measure = functools.partial(removed_input_means, pruned, feeds=feeds)
    report = prune_model(pruned, PruneOptions(plan=plan), measure=measure)
    assert any("border" in n for n in report.notes)
    (result,) = recover.refit_consumers(model, pruned, report.kept, feeds, report.ranks)
    assert result.heldout_before < 1e-5
    for feed in feeds:
        np.testing.assert_allclose(
            run_model(pruned, feed)["y"], run_model(model, feed)["y"], atol=1e-5
        )


def test_a_constant_of_the_model_after_a_conv_is_not_taken_for_compensation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Conv -> Add(constant of the model) -> y: the refit target is the original ``y`` minus
    the constant (= the original conv output), not the conv output minus the constant."""
    rng = np.random.default_rng(0)
    text = f"""{HEADER}
g (float[2,3,6,6] x, float[8,3,1,1] we, float[8] be, float[4,8,3,3] w2, float[4] b2,
   float[1,4,6,6] pe) => (float[2,4,6,6] y) {{
  e = Conv (x, we, be)
  r = Relu (e)
  c = Conv <pads=[1,1,1,1]> (r, w2, b2)
  y = Add (c, pe)
}}"""
    shapes = {"we": (8, 3, 1, 1), "be": (8,), "w2": (4, 8, 3, 3), "b2": (4,), "pe": (1, 4, 6, 6)}
    model = model_from_text(
        text, {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    )
    feeds = [{"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)} for _ in range(5)]
    pruned = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    (group,) = analyze(model).prunable
    report = prune_model(
        pruned, PruneOptions(plan=PruningPlan({group.id: [0, 2, 3, 5]}, {group.id: 8}))
    )
    seen = []
    solve = recover.cross_validated_refit
    monkeypatch.setattr(
        recover, "cross_validated_refit", lambda folds, s0: seen.append(folds) or solve(folds, s0)
    )
    recover.refit_consumers(model, pruned, report.kept, feeds, report.ranks)
    (folds,) = seen
    original = list(iter_intermediates(model, ["c"], feeds))
    t = np.concatenate([o["c"].transpose(0, 2, 3, 1).reshape(-1, 4) for o in original])
    np.testing.assert_allclose(folds.target_sq.sum(), np.sum(t.astype(np.float64) ** 2), rtol=1e-5)


def test_a_skip_computed_in_the_same_pass_starts_a_new_one() -> None:
    """One pass for both blocks (``passes=1``): the second consumer's skip comes from the
    first, so it gets a pass of its own, after the first refit."""
    model = _residual_mlp()
    pruned = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    report = prune_model(pruned, PruneOptions(ratio=0.5, round_to=1))
    layers = recover.consumers(pruned, report.kept, report.ranks)
    assert [c.skip for c in layers] == ["x", "z1"]
    assert recover._split_at_skips([[0, 1]], layers) == [[0], [1]]
    layers[1].skip_value = layers[0].skip_value  # a skip from before the chunk: one pass
    assert recover._split_at_skips([[0, 1]], layers) == [[0, 1]]
