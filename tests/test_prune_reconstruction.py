"""Reconstruction criterion: quadratic form, greedy order, dead units, wiring, refusals."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.bundled import digits_calibration, digits_model, digits_test_set
from onnxprune.cli import main
from onnxprune.prune import PruneOptions, analyze
from onnxprune.prune.activations import reconstruction_stats
from onnxprune.prune.api import prune_file
from onnxprune.prune.core import prune_model
from onnxprune.prune.importance import group_scores
from onnxprune.prune.reconstruction import group_consumers
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text
from prune_models import HEADER, conv_chain

DEAD = (1, 5)


def _mlp(hidden: int, seed: int, dead: tuple[int, ...] = ()) -> tuple[ir.Model, dict]:
    """x -> Gemm -> Relu -> Gemm(transB, alpha=2); ``dead`` units never fire on |x| <= 1."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((4, hidden)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32) * 0.1
    w2 = rng.standard_normal((3, hidden)).astype(np.float32)
    for u in dead:  # large weights, so l2 ranks them highest, but the ReLU is always off
        w1[:, u] *= 10
        w2[:, u] *= 10
        b1[u] = -1000.0
    text = f"""{HEADER}
g (float[batch,4] x, float[4,{hidden}] w1, float[{hidden}] b1, float[3,{hidden}] w2,
   float[3] b2) => (float[batch,3] y) {{
  h = Gemm (x, w1, b1)
  rh = Relu (h)
  y = Gemm <transB=1, alpha=2.0> (rh, w2, b2)
}}"""
    weights = {"w1": w1, "b1": b1, "w2": w2, "b2": np.zeros(3, np.float32)}
    return model_from_text(text, weights), weights


def _feeds(seed: int, count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(-1, 1, (16, 4)).astype(np.float32)} for _ in range(count)]


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _hidden_and_weight(weights: dict, feeds: list) -> tuple[np.ndarray, np.ndarray]:
    """Hidden activations (rows) and the consumer weight as [hidden, out], in float64."""
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    h = np.maximum(x @ weights["w1"].astype(np.float64) + weights["b1"], 0)
    return h, 2.0 * weights["w2"].T.astype(np.float64)


def _change(h: np.ndarray, w: np.ndarray, removed: tuple[int, ...]) -> float:
    r = list(removed)
    return float(np.sum((h[:, r] @ w[r]) ** 2))


def test_quadratic_form_is_the_output_change_and_greedy_matches_brute_force():
    model, weights = _mlp(6, seed=3)
    feeds = _feeds(0)
    analysis = analyze(model)
    (group,) = analysis.prunable
    grams = reconstruction_stats(model, analysis, feeds)
    assert set(grams) == {("rh", 1)}
    (consumer,) = group_consumers(model, analysis, group)
    h, w = _hidden_and_weight(weights, feeds)
    m = grams[("rh", 1)] * (consumer.weight @ consumer.weight.T) * len(h)
    # the quadratic form is the measured output change, for every pair (brute force)
    for pair in itertools.combinations(range(6), 2):
        ones = np.zeros(6)
        ones[list(pair)] = 1
        assert ones @ m @ ones == pytest.approx(_change(h, w, pair), rel=1e-6)
    # the greedy order is the brute-force greedy on measured output changes
    removed: tuple[int, ...] = ()
    for _ in range(6):
        rest = [u for u in range(6) if u not in removed]
        removed = (*removed, min(rest, key=lambda u: _change(h, w, (*removed, u))))
    scores, notes = group_scores(model, analysis, "reconstruction", grams)
    assert not notes
    assert [int(u) for u in np.argsort(scores[group.id])] == list(removed)


def test_dead_units_go_first_and_beat_l2_on_held_out_data():
    model, _ = _mlp(8, seed=0, dead=DEAD)
    calib, held_out = _feeds(0), _feeds(1)
    analysis = analyze(model)
    (group,) = analysis.prunable
    grams = reconstruction_stats(model, analysis, calib)
    recon, _ = group_scores(model, analysis, "reconstruction", grams)
    l2, _ = group_scores(model, analysis, "l2")
    assert set(np.argsort(recon[group.id])[:2]) == set(DEAD)
    assert set(np.argsort(l2[group.id])[-2:]) == set(DEAD)  # l2 keeps them longest

    errors = {}
    for criterion in ("l2", "reconstruction"):
        pruned = _copy(model)
        options = PruneOptions(ratio=0.25, criterion=criterion, compensate=False)
        report = prune_model(pruned, options, grams if criterion == "reconstruction" else None)
        kept = report.plan.keep[group.id]
        assert len(kept) == 6
        assert (not set(kept) & set(DEAD)) == (criterion == "reconstruction")
        diffs = [run_model(pruned, f)["y"] - run_model(model, f)["y"] for f in held_out]
        errors[criterion] = float(np.sqrt(sum(np.sum(d**2) for d in diffs)))
    assert errors["reconstruction"] < 1e-4  # dead units contribute nothing
    assert errors["l2"] > 0.1


def test_digits_cnn_reconstruction_beats_l2(tmp_path: Path):
    """Bundled digits CNN at 1.5x fewer MACs, no recovery: reconstruction keeps accuracy."""
    test = np.load(digits_test_set())
    options = PruneOptions(target_macs=0.667, round_to=1, compensate=False, allocation="uniform")
    accuracy = {}
    for criterion in ("l2", "reconstruction"):
        out = tmp_path / f"{criterion}.onnx"
        result = prune_file(
            digits_model(),
            out,
            dataclasses.replace(options, criterion=criterion),
            calib=digits_calibration(),
            reconstruct=False,
        )
        assert not any("scored by l2" in n for n in result.steps[0].notes)
        logits = run_model(str(out), {"input": test["input"]})["logits"]
        accuracy[criterion] = float((logits.argmax(1) == test["label"]).mean())
    assert accuracy["reconstruction"] > accuracy["l2"] + 0.02


def test_cli_refuses_reconstruction_without_calib(tmp_path: Path, capsys):
    model = tmp_path / "chain.onnx"
    ir.save(conv_chain(), model)
    out = tmp_path / "o.onnx"
    args = ["prune", str(model), "-o", str(out), "--ratio", "0.5", "--criterion", "reconstruction"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--calib is required for --criterion reconstruction" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


# --- Refit that generalizes (issue 17 item 2): ridge toward the un-refit weights, CV ---


def _folds(rows_per_feed: int, feeds: int, noise: float, seed: int = 0):
    """Rows ``D`` (+ ones column) and targets ``D S_true + noise`` in folds of whole feeds;
    ``S_true`` is ``S0`` plus a small change (the un-refit weights are nearly right)."""
    from onnxprune.prune.ridge import Folds, fold_of

    rng = np.random.default_rng(seed)
    k, n = 12, 3
    s0 = rng.standard_normal((k + 1, n))
    s_true = s0 + 0.1 * rng.standard_normal((k + 1, n))
    fold = fold_of(feeds)
    folds = Folds.zeros(max(fold) + 1, k + 1, n)
    for f in range(feeds):
        d = np.hstack([rng.standard_normal((rows_per_feed, k)), np.ones((rows_per_feed, 1))])
        t = d @ s_true + noise * rng.standard_normal((rows_per_feed, n))
        folds.add(fold[f], d, t)
    return folds, s0, s_true


def test_refit_with_infinite_strength_is_no_refit_and_zero_strength_is_least_squares():
    from onnxprune.prune.ridge import refit_with

    folds, s0, _ = _folds(40, 4, noise=0.5)
    np.testing.assert_allclose(refit_with(folds, s0, 1e12), s0, atol=1e-8)
    np.testing.assert_array_equal(refit_with(folds, s0, np.inf), s0)
    gram, cross = folds.gram.sum(0), folds.cross.sum(0)
    np.testing.assert_allclose(refit_with(folds, s0, 0.0), np.linalg.solve(gram, cross))


def test_cross_validation_regularizes_more_on_few_noisy_rows():
    from onnxprune.prune.ridge import cross_validated_refit

    clean = cross_validated_refit(*_folds(200, 6, noise=0.01)[:2])
    noisy = cross_validated_refit(*_folds(3, 6, noise=2.0)[:2])
    assert clean.strength < 1e-2 and clean.heldout_after < 0.5 * clean.heldout_before
    assert noisy.strength > 10 * clean.strength
    assert noisy.heldout_after <= noisy.heldout_before


def test_refit_is_declined_when_it_does_not_predict_held_out_feeds():
    """Targets that are S0's output plus pure noise: any refit only fits the noise."""
    from onnxprune.prune.ridge import Folds, cross_validated_refit

    for seed in range(10):
        rng = np.random.default_rng(seed)
        s0 = rng.standard_normal((9, 2))
        folds = Folds.zeros(5, 9, 2)
        for f in range(5):
            d = np.hstack([rng.standard_normal((20, 8)), np.ones((20, 1))])
            folds.add(f, d, d @ s0 + rng.standard_normal((20, 2)))
        chosen = cross_validated_refit(folds, s0)
        assert np.isinf(chosen.strength)
        np.testing.assert_array_equal(chosen.solution, s0)
        assert chosen.fit_after == chosen.fit_before


def test_refit_never_hurts_held_out_feeds_on_a_pruned_model(tmp_path: Path):
    """prune --reconstruct on the digits CNN: every kept refit lowers the leave-feeds-out
    error, declined layers keep their weights, and the report records the strength."""
    options = PruneOptions(target_macs=0.5)
    result = prune_file(
        digits_model(), tmp_path / "r.onnx", options, calib=digits_calibration(), reconstruct=True
    )
    (refits,) = result.refits
    assert refits
    for r in refits:
        assert r.heldout_after <= r.heldout_before
        assert (r.strength is None) == (r.heldout_after == r.heldout_before)
    # the JSON keeps every field, None ones too (a declined refit's strength is null)
    assert result.to_dict()["refits"] == [[dataclasses.asdict(r) for r in refits]]


def _refit_loss(h: np.ndarray, w: np.ndarray, removed: tuple[int, ...]) -> float:
    """What the least-squares refit (weights and bias) of the kept inputs cannot recover."""
    r, k = list(removed), [u for u in range(h.shape[1]) if u not in removed]
    target = h[:, r] @ w[r]
    basis = np.concatenate([h[:, k], np.ones((len(h), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(basis, target, rcond=None)
    return float(np.sum((target - basis @ solution) ** 2))


def _centered_mlp():
    """The 6-unit MLP, 8 feeds, its analysis and group, and the centered consumer Grams."""
    model, weights = _mlp(6, seed=3)
    feeds = _feeds(0, count=8)
    analysis = analyze(model)
    (group,) = analysis.prunable
    grams = reconstruction_stats(model, analysis, feeds, centered=True)
    return model, weights, feeds, analysis, group, grams


def test_obs_order_is_the_brute_force_greedy_on_the_refit_loss(monkeypatch):
    from onnxprune.prune import reconstruction

    monkeypatch.setattr(reconstruction, "OBS_DAMPING", 1e-12)
    model, weights, feeds, analysis, group, grams = _centered_mlp()
    h, w = _hidden_and_weight(weights, feeds)
    removed: tuple[int, ...] = ()
    for _ in range(5):  # the last unit has nothing left to refit with
        rest = [u for u in range(6) if u not in removed]
        losses = {u: _refit_loss(h, w, (*removed, u)) for u in rest}
        best = min(losses.values())
        assert sorted(losses.values())[1] > best * 1.01  # no near-tie in this example
        removed = (*removed, min(rest, key=losses.__getitem__))
    scores, notes = group_scores(model, analysis, "obs", grams)
    assert not notes
    assert [int(u) for u in np.argsort(scores[group.id])][:5] == list(removed)


def test_obs_prices_a_redundant_channel_at_zero_despite_its_large_weight(monkeypatch):
    """x3 = x0 + x1: the refit recovers any one of channels 0, 1, 3 from the others, so OBS
    prices each at zero, while the no-refit reconstruction cost ranks channel 3 (the largest
    weight) the most important. After removing channel 3, channels 0 and 1 are no longer free."""
    from onnxprune.prune import reconstruction
    from onnxprune.prune.reconstruction import Consumer, _obs_state

    monkeypatch.setattr(reconstruction, "OBS_DAMPING", 1e-12)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 4))
    x[:, 3] = x[:, 0] + x[:, 1]
    x -= x.mean(0)
    gram = x.T @ x / len(x)
    weight = np.array([[0.3, 0.1], [0.2, -0.3], [0.4, 0.2], [3.0, 2.0]])
    state = _obs_state(Consumer("c", ("x", 1), ((0,), (1,), (2,), (3,)), weight), gram)
    assert state is not None
    losses = state.losses() / state.energy
    assert max(losses[[0, 1, 3]]) < 1e-6 and losses[2] > 1e-3
    assert int(np.argmax(np.diag(gram * (weight @ weight.T)))) == 3
    state.remove(3)
    assert min(state.losses()[[0, 1]]) / state.energy > 1e-3


def test_closed_form_refit_leaves_exactly_the_least_squares_residual(monkeypatch):
    """The measured allocation's refit-aware probe: compensation, closed-form refit from the
    covariance and zeroing leave the output error of the least-squares refit (weights and
    bias) of the kept units, and less than the zeroed probe without refit."""
    from onnxprune.prune import closed_form, reconstruction
    from onnxprune.prune.apply import kept_indices, zero_units
    from onnxprune.prune.compensate import compensate_removed_inputs
    from onnxprune.prune.sensitivity import measured_means

    monkeypatch.setattr(reconstruction, "OBS_DAMPING", 1e-12)
    model, weights, feeds, analysis, group, covariances = _centered_mlp()
    means = measured_means(model, analysis, feeds)
    removed = [group.units[i].root for i in (1, 4)]

    def error(refit: bool) -> float:
        probe = _copy(model)
        compensate_removed_inputs(probe, kept_indices(analysis, removed), means, zeroed=True)
        if refit:
            done = closed_form.refit_in_closed_form(
                probe, analysis, group, removed, covariances=covariances, means=means
            )
            assert len(done) == 1
        zero_units(probe, analysis, removed)
        return sum(
            float(np.sum((run_model(probe, f)["y"] - run_model(model, f)["y"]) ** 2)) for f in feeds
        )

    h, w = _hidden_and_weight(weights, feeds)
    expected = _refit_loss(h, w, (1, 4))
    assert error(refit=True) == pytest.approx(expected, rel=1e-3)
    assert error(refit=False) > 1.3 * expected  # 1.47x here


def test_closed_form_refit_of_a_3x3_conv_leaves_the_patch_least_squares_residual(monkeypatch):
    """x -> Conv3x3 -> Relu -> Conv3x3 (y, no padding): the probe's closed-form refit over
    im2col patch columns (all positions sampled) leaves exactly the least-squares residual of
    refitting the kept channels' taps and the bias on the removed channels' contribution.
    (With zero padding the mean compensation works per channel, the refit per patch column:
    exact up to that border term.)"""
    from onnxprune.intermediates import iter_intermediates
    from onnxprune.passes._match import const_numpy
    from onnxprune.prune import closed_form, reconstruction
    from onnxprune.prune.apply import kept_indices, zero_units
    from onnxprune.prune.compensate import compensate_removed_inputs
    from onnxprune.prune.recover import conv_rows
    from onnxprune.prune.sensitivity import measured_means

    monkeypatch.setattr(reconstruction, "OBS_DAMPING", 1e-12)
    rng = np.random.default_rng(0)
    text = f"""{HEADER}
g (float[1,3,8,8] x, float[6,3,3,3] w1, float[6] b1, float[4,6,3,3] w2, float[4] b2)
  => (float[1,4,6,6] y) {{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r1 = Relu (c1)
  y = Conv (r1, w2, b2)
}}"""
    shapes = {"w1": (6, 3, 3, 3), "b1": (6,), "w2": (4, 6, 3, 3), "b2": (4,)}
    model = model_from_text(
        text, {k: rng.standard_normal(v).astype(np.float32) * 0.5 for k, v in shapes.items()}
    )
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    analysis = analyze(model)
    (group,) = analysis.prunable
    stats = closed_form.patch_statistics(model, analysis, feeds, rows=64)
    (consumer,) = stats
    means = measured_means(model, analysis, feeds)
    removed = [group.units[i].root for i in (0, 3)]

    probe = _copy(model)
    compensate_removed_inputs(probe, kept_indices(analysis, removed), means, zeroed=True)
    done = closed_form.refit_in_closed_form(
        probe, analysis, group, removed, covariances={}, means=means, patches=stats
    )
    assert done == [consumer]
    zero_units(probe, analysis, removed)
    error = sum(
        float(np.sum((run_model(probe, f)["y"] - run_model(model, f)["y"]) ** 2)) for f in feeds
    )

    node = next(n for n in model.graph if n.outputs[0].name == "y")
    hidden = [o["r1"].astype(np.float64) for o in iter_intermediates(model, ["r1"], feeds)]
    grid = np.stack(np.meshgrid(np.arange(6), np.arange(6), indexing="ij"), -1).reshape(-1, 2)
    pos = np.concatenate([np.zeros((36, 1), int), grid], axis=1)
    rows = np.concatenate([conv_rows(h, node, (3, 3), pos) for h in hidden])
    w = const_numpy(node.inputs[1]).astype(np.float64).reshape(4, -1).T
    r = [c * 9 + t for c in (0, 3) for t in range(9)]
    k = [i for i in range(len(w)) if i not in r]
    target = rows[:, r] @ w[r]
    basis = np.concatenate([rows[:, k], np.ones((len(rows), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(basis, target, rcond=None)
    expected = float(np.sum((target - basis @ solution) ** 2))
    assert error == pytest.approx(expected, rel=1e-3)


def test_report_says_when_only_part_of_the_fit_samples_were_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Statistics and refits read at most FIT_SAMPLES fit samples; the report says so
    rather than letting the split's description ("fitting used ...") claim all of them."""
    from onnxprune.prune import api

    options = PruneOptions(target_macs=0.75, round_to=1, allocation="uniform")
    calib = np.load(digits_calibration())
    fit = len(calib[next(iter(calib.files))]) * 3 // 4  # the rest is held out
    monkeypatch.setattr(api, "FIT_SAMPLES", 10)
    result = prune_file(digits_model(), tmp_path / "p.onnx", options, calib=digits_calibration())
    assert f"statistics and refits used the first 10 of the {fit} fit samples" in (
        result.steps[0].notes
    )
    monkeypatch.setattr(api, "FIT_SAMPLES", 10**6)
    result = prune_file(digits_model(), tmp_path / "q.onnx", options, calib=digits_calibration())
    assert not any("fit samples" in n for n in result.steps[0].notes)
