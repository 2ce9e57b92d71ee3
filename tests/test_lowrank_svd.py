"""Low-rank factorization of MatMul/Gemm: exactness, error formulas, rank rules, skips."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from onnxprune.calib import load_calibration
from onnxprune.lowrank import FactorizePass, LowRankConfig, decompose, lowrank_model
from onnxprune.lowrank._linalg import energy_rank, truncation_error
from onnxprune.lowrank.whiten import InputStats
from onnxprune.runtime import run_model
from onnxprune.testing import assert_same_outputs, model_from_text, random_feeds

MATMUL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 5, {k}] x, float[{k}, {n}] w) => (float[2, 5, {n}] y) {{ y = MatMul(x, w) }}
"""

GEMM = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[6, {k}] x, float[{n}, {k}] w, float[{n}] b) => (float[6, {n}] y) {{
    y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, w, b)
}}
"""


def low_rank(rng: np.random.Generator, m: int, n: int, r: int) -> np.ndarray:
    return (rng.standard_normal((m, r)) @ rng.standard_normal((r, n))).astype(np.float32)


def matmul_model(w: np.ndarray):
    return model_from_text(MATMUL.format(k=w.shape[0], n=w.shape[1]), {"w": w})


def ops(model) -> Counter:
    return Counter(node.op_type for node in model.graph)


def init_shapes(model) -> list[tuple[int, ...]]:
    return sorted(tuple(v.const_value.shape) for v in model.graph.initializers.values())


@pytest.mark.parametrize("config", [LowRankConfig(rank=4), LowRankConfig(energy=1.0, round_to=1)])
def test_exact_rank_weight_factors_exactly(config: LowRankConfig):
    w = low_rank(np.random.default_rng(0), 32, 24, 4)
    model, reference = matmul_model(w), matmul_model(w)
    outcome = lowrank_model(model, config)
    assert ops(model) == Counter({"MatMul": 2})
    assert init_shapes(model) == [(4, 24), (32, 4)]
    assert [c.what for c in outcome.factorize.changes] == ["svd rank 4: [32,24] -> [32,4] x [4,24]"]
    assert outcome.layers[0].energy_kept == pytest.approx(1.0, abs=1e-9)
    assert_same_outputs(reference, model, random_feeds(reference), rtol=1e-5, atol=1e-5)


def test_gemm_transb_alpha_beta_exact_rank():
    rng = np.random.default_rng(1)
    w, b = low_rank(rng, 20, 40, 3), rng.standard_normal(20).astype(np.float32)
    text = GEMM.format(k=40, n=20)
    model, reference = (
        model_from_text(text, {"w": w, "b": b}),
        model_from_text(text, {"w": w, "b": b}),
    )
    lowrank_model(model, LowRankConfig(rank=3))
    assert ops(model) == Counter({"Gemm": 2})
    assert init_shapes(model) == [(3, 20), (20,), (40, 3)]
    assert_same_outputs(reference, model, random_feeds(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 5, 17])
def test_truncation_error_is_norm_of_discarded_singular_values(rank: int):
    w = np.random.default_rng(rank).standard_normal((30, 50))
    dec = decompose(w)
    a, b = dec.factors(rank)
    measured = np.linalg.norm(w - a @ b)
    assert measured == pytest.approx(truncation_error(dec.s, rank), rel=1e-10)
    assert measured == pytest.approx(np.sqrt(np.sum(dec.s[rank:] ** 2)), rel=1e-10)


def test_energy_rank_and_rounding():
    s = np.sqrt(np.array([50.0, 30.0, 10.0, 5.0, 3.0, 2.0]))
    assert energy_rank(s, 0.8) == 2
    assert energy_rank(s, 0.81) == 3
    assert energy_rank(s, 1.0) == 6
    w = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    model = matmul_model(w)
    outcome = lowrank_model(model, LowRankConfig(energy=0.05))  # a few components, then x8
    assert outcome.layers[0].ranks[0] % 8 == 0


def correlated_calib(tmp_path: Path, k: int, seed: int = 0, *, scaled: bool = False) -> Path:
    """Inputs x = z M with a few dominant directions (strongly correlated channels), or,
    with ``scaled``, independent channels of very different magnitudes (outlier channels)."""
    rng = np.random.default_rng(seed)
    if scaled:
        mix = np.diag(np.logspace(1, -2, k))[rng.permutation(k)]
    else:
        mix = rng.standard_normal((k, k)) * np.logspace(0, -3, k)[:, None]
    x = (rng.standard_normal((16, 2, 5, k)) @ mix).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    return path


def layer_error(reference, candidate, feeds) -> float:
    num = den = 0.0
    for feed in feeds:
        r, c = run_model(reference, feed)["y"], run_model(candidate, feed)["y"]
        num += float(np.sum((r - c) ** 2))
        den += float(np.sum(r**2))
    return float(np.sqrt(num / den))


@pytest.mark.parametrize(
    ("method", "scaled"), [("svd-llm", False), ("svd-llm", True), ("asvd", True)]
)
def test_activation_aware_beats_plain_svd_at_equal_rank(tmp_path: Path, method: str, scaled: bool):
    k, n, rank = 48, 32, 6
    w = np.random.default_rng(3).standard_normal((k, n)).astype(np.float32)
    reference = matmul_model(w)
    calib = load_calibration(correlated_calib(tmp_path, k, scaled=scaled), reference)
    feeds = list(calib.feeds())
    errors = {}
    for name in ("svd", method):
        model = matmul_model(w)
        lowrank_model(model, LowRankConfig(rank=rank, method=name), calib=calib)
        errors[name] = layer_error(reference, model, feeds)
    assert errors[method] < 0.5 * errors["svd"], errors


def test_whitened_output_error_formula_matches_measurement(tmp_path: Path):
    k, n, rank = 40, 24, 5
    w = np.random.default_rng(4).standard_normal((k, n)).astype(np.float32)
    reference, model = matmul_model(w), matmul_model(w)
    calib = load_calibration(correlated_calib(tmp_path, k, seed=1), reference)
    outcome = lowrank_model(model, LowRankConfig(rank=rank, method="svd-llm"), calib=calib)
    predicted = outcome.layers[0].output_error
    assert predicted == pytest.approx(layer_error(reference, model, calib.feeds()), rel=1e-3)


def test_max_layer_error_budget_is_met(tmp_path: Path):
    k, n = 40, 24
    w = np.random.default_rng(5).standard_normal((k, n)).astype(np.float32)
    reference, model = matmul_model(w), matmul_model(w)
    calib = load_calibration(correlated_calib(tmp_path, k, seed=2), reference)
    config = LowRankConfig(max_layer_error=0.05, method="svd-llm", round_to=1)
    outcome = lowrank_model(model, config, calib=calib)
    rank = outcome.layers[0].ranks[0]
    assert rank < 15
    assert layer_error(reference, model, calib.feeds()) <= 0.05
    dec = decompose(w, "svd-llm", _stats(calib, k))
    assert dec.output_error(rank - 1) > 0.05  # the smallest rank within budget


def _stats(calib, k: int) -> InputStats:
    stats = InputStats.empty(k)
    for feed in calib.feeds():
        stats.update(feed["x"])
    return stats


TWO_LAYERS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4, 64] x, float[64, 64] w1, float[64, 128] w2) => (float[4, 128] y) {
    h = MatMul(x, w1)
    r = Relu(h)
    y = MatMul(r, w2)
}
"""


@pytest.mark.parametrize("target", ["target_params", "target_macs"])
def test_global_target_meets_budget(target: str):
    rng = np.random.default_rng(6)
    weights = {"w1": rng.standard_normal((64, 64)), "w2": rng.standard_normal((64, 128))}
    model = model_from_text(TWO_LAYERS, {k: v.astype(np.float32) for k, v in weights.items()})
    outcome = lowrank_model(model, LowRankConfig(**{target: 0.5}))
    dense = 64 * 64 + 64 * 128
    assert sum(layer.params_after for layer in outcome.layers) <= 0.5 * dense
    assert len(outcome.layers) == 2
    assert 0.0 < outcome.shared_energy < 1.0


def test_second_run_changes_nothing():
    w = np.random.default_rng(7).standard_normal((64, 64)).astype(np.float32)
    model = matmul_model(w)
    lowrank_model(model, LowRankConfig(energy=0.5))
    again = lowrank_model(model, LowRankConfig(energy=0.5))
    assert again.factorize.changes == []
    assert {s.reason for s in again.factorize.skips} == {
        "already a low-rank factor (written by this pass)"
    }


# ------------------------------------------------------------------ skip reasons


def skips(model, config: LowRankConfig, **kwargs) -> dict[str, str]:
    report = FactorizePass(config, **kwargs)(model)
    assert report.changes == []
    return {s.node: s.reason for s in report.skips}


def test_skip_saves_no_work():
    w = np.random.default_rng(8).standard_normal((32, 24)).astype(np.float32)
    reasons = skips(matmul_model(w), LowRankConfig(rank=14))
    assert reasons == {
        "MatMul(y)": "rank [14] saves no work: factored 784 params > 0.9 x dense 768; "
        "break-even rank m*n/(m+n) = 32*24/56 = 13.7"
    }


def test_skip_latency_not_improved():
    w = np.random.default_rng(9).standard_normal((64, 64)).astype(np.float32)
    config = LowRankConfig(rank=8, latency_check=True)
    reasons = skips(matmul_model(w), config, latency_probe=lambda m, n, r, rows: (1.0, 1.5))
    assert reasons == {
        "MatMul(y)": "measured latency does not improve: dense 1 ms, factored 1.5 ms at 10 rows"
    }


def test_latency_improved_is_applied():
    w = np.random.default_rng(9).standard_normal((64, 64)).astype(np.float32)
    config = LowRankConfig(rank=8, latency_check=True)
    report = FactorizePass(config, latency_probe=lambda m, n, r, rows: (2.0, 1.0))(matmul_model(w))
    assert len(report.changes) == 1


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "g (float[4, 8] x) => (float[8, 8] y) { y = MatMul(w, x) }",
            "the constant is the left operand (W @ x); only x @ W is factorized",
        ),
        (
            "g (float[4, 8] x) => (float[4, 8] y, float[4, 8] z) "
            "{ y = MatMul(x, w) \n z = MatMul(x, w) }",
            "weight 'w' is shared with another node",
        ),
        (
            "g (float[8, 4] x) => (float[4, 8] y) { y = Gemm <transA = 1> (x, w) }",
            "Gemm with transA=1",
        ),
        (
            "g (float[2, 8, 8] x) => (float[2, 8, 8] y) { y = MatMul(x, w3) }",
            "weight 'w3' is not a 2-D float matrix (shape [2, 8, 8])",
        ),
    ],
)
def test_skip_not_applicable(text: str, reason: str):
    header = '<ir_version: 8, opset_import: ["" : 17]>\n'
    text = text.replace("(float[", "(float[8, 8] w, float[2, 8, 8] w3, float[", 1)
    rng = np.random.default_rng(10)
    inits = {"w": rng.standard_normal((8, 8)), "w3": rng.standard_normal((2, 8, 8))}
    model = model_from_text(header + text, {k: v.astype(np.float32) for k, v in inits.items()})
    assert set(skips(model, LowRankConfig(rank=1)).values()) == {reason}


def test_skip_excluded_and_missing_statistics():
    w = np.random.default_rng(11).standard_normal((16, 16)).astype(np.float32)
    assert skips(matmul_model(w), LowRankConfig(rank=2, exclude=("MatMul(y)",))) == {
        "MatMul(y)": "excluded by --exclude"
    }
    assert skips(matmul_model(w), LowRankConfig(rank=2, method="svd-llm")) == {
        "MatMul(y)": "no input statistics for svd-llm (input 'x')"
    }


def test_layer_ranks_replay_a_plan():
    rng = np.random.default_rng(12)
    weights = {"w1": rng.standard_normal((64, 64)), "w2": rng.standard_normal((64, 128))}
    model = model_from_text(TWO_LAYERS, {k: v.astype(np.float32) for k, v in weights.items()})
    outcome = lowrank_model(model, LowRankConfig(layer_ranks={"MatMul(h)": (5,)}))
    assert [(layer.node, layer.ranks) for layer in outcome.layers] == [("MatMul(h)", [5])]
    assert [s.reason for s in outcome.factorize.skips] == [
        "no rank given for this layer in layer_ranks"
    ]
