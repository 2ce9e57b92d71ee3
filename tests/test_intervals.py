"""95 % intervals of held-out fidelity (onnxprune.intervals)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.fidelity import compare
from onnxprune.intervals import fidelity_intervals, wilson


@pytest.mark.parametrize(
    ("agree", "total", "low", "high"),
    # Textbook Wilson score intervals (z = 1.96).
    [
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (12, 16, 0.5050, 0.8982),
    ],
)
def test_wilson_matches_published_values(agree, total, low, high):
    got = wilson(agree, total)
    assert got == pytest.approx((low, high), abs=5e-4)


def _pairs(noise: float, feeds: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    refs = [rng.standard_normal((1, 10)).astype(np.float32) for _ in range(feeds)]
    cands = [r + noise * rng.standard_normal(r.shape).astype(np.float32) for r in refs]
    return refs, cands


def test_bootstrap_interval_holds_the_pooled_value_and_shrinks_with_samples():
    refs, cands = _pairs(0.3)
    pooled_sqnr = 10 * np.log10(
        sum(float(np.sum(r.astype(np.float64) ** 2)) for r in refs)
        / sum(
            float(np.sum((c.astype(np.float64) - r) ** 2)) for r, c in zip(refs, cands, strict=True)
        )
    )
    spans = fidelity_intervals(refs, cands, top1_agreement=None)
    low, high = spans["sqnr_db"]
    assert low < pooled_sqnr < high and high - low > 0.1
    assert spans == fidelity_intervals(refs, cands, top1_agreement=None)  # seeded
    many = fidelity_intervals(*_pairs(0.3, feeds=400), top1_agreement=None)
    assert many["sqnr_db"][1] - many["sqnr_db"][0] < (high - low) / 2
    assert "top1_agreement" not in spans


def test_exact_candidate_has_no_sqnr_interval_and_cosine_one():
    refs, _ = _pairs(0.0)
    spans = fidelity_intervals(refs, refs, top1_agreement=1.0)
    assert "sqnr_db" not in spans
    assert spans["cosine"] == pytest.approx([1.0, 1.0])
    assert spans["top1_agreement"][0] == pytest.approx(wilson(24, 24)[0])


def test_compare_reports_the_intervals_in_its_summary(tmp_path):
    from onnxprune.quant.testing import matmul_net, write

    rng = np.random.default_rng(0)
    path = write(matmul_net(rng.standard_normal((6, 5)).astype(np.float32)), tmp_path)
    feeds = [{"x": rng.standard_normal((1, 3, 6)).astype(np.float32)} for _ in range(8)]
    result = compare(path, path, feeds, data="eight samples")
    assert set(result.intervals["y"]) >= {"cosine"}
    assert "cosine 1.000000 [1.0000, 1.0000]" in result.summary()[0]


def test_all_zero_outputs_keep_cosine_one_in_the_interval():
    zeros = [np.zeros((1, 4), np.float32) for _ in range(5)]
    assert fidelity_intervals(zeros, zeros, top1_agreement=None)["cosine"] == [1.0, 1.0]


def test_rows_of_one_sample_are_resampled_together():
    """Four samples of 128 token rows, two agreeing fully and two never: Wilson over 512 rows
    would claim [0.46, 0.54]; over samples the interval is as wide as four samples allow."""
    rng = np.random.default_rng(0)
    refs = [rng.standard_normal((128, 5)).astype(np.float32) for _ in range(4)]
    cands = [r.copy() if i < 2 else -r for i, r in enumerate(refs)]
    spans = fidelity_intervals(refs, cands, top1_agreement=0.5)
    low, high = spans["top1_agreement"]
    assert low <= 0.25 and high >= 0.75
