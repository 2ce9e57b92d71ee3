"""Streaming calibration statistics: equal to one batch, NaN/Inf handling, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxprune.errors import CalibrationError, UsageError
from onnxprune.quant.calibrate import HIST_BINS, METHODS, Calibrator, TensorStats, select_range
from onnxprune.quant.params import activation_qparams


def _batches(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Growing magnitudes force the histogram range to widen several times while streaming.
    return [rng.standard_normal(500).astype(np.float32) * 2.0**k for k in range(-3, 5)]


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_streaming_equals_batch(method):
    batches = _batches()
    streamed = TensorStats("t", with_histogram=method != "minmax")
    for batch in batches:
        streamed.update(batch)
    whole = TensorStats("t", with_histogram=method != "minmax")
    whole.update(np.concatenate(batches))
    assert (streamed.min, streamed.max) == (whole.min, whole.max)
    lo_s, hi_s = select_range(streamed, method)
    lo_w, hi_w = select_range(whole, method)
    width = whole.bin_width
    assert abs(lo_s - lo_w) <= width and abs(hi_s - hi_w) <= width
    if method == "minmax":
        assert (lo_s, hi_s) == (
            float(np.concatenate(batches).min()),
            float(np.concatenate(batches).max()),
        )


def test_histogram_widening_is_exact():
    batches = _batches(1)
    streamed = TensorStats("t", with_histogram=True)
    for batch in batches:
        streamed.update(batch)
    whole = TensorStats("t", with_histogram=True)
    whole.update(np.concatenate(batches))
    assert streamed.edge == whole.edge
    np.testing.assert_array_equal(streamed.hist, whole.hist)
    assert streamed.hist.sum() == sum(b.size for b in batches)
    assert streamed.hist.size == HIST_BINS


def test_percentile_clips_outliers():
    x = np.concatenate([np.linspace(-1, 1, 100_000), [1000.0]]).astype(np.float32)
    stats = TensorStats("t", with_histogram=True)
    stats.update(x)
    lo, hi = select_range(stats, "percentile", 99.9)
    assert hi < 2.0 and lo >= -1.0 - stats.bin_width
    assert select_range(stats, "minmax") == (-1.0, 1000.0)


def test_nan_and_inf_are_counted_and_ignored():
    x = np.array([1.0, -2.0, np.nan, np.inf, -np.inf, 0.5], np.float32)
    stats = TensorStats("mask", with_histogram=True)
    stats.update(x)
    assert (stats.nan, stats.inf, stats.count) == (1, 2, 3)
    lo, hi = select_range(stats, "entropy")
    assert math.isfinite(lo) and math.isfinite(hi)
    assert (stats.min, stats.max) == (-2.0, 1.0)


def test_all_nan_tensor_is_refused_by_name():
    calibrator = Calibrator(["good", "bad"], "percentile")
    calibrator.update({"good": np.ones(4, np.float32), "bad": np.full(4, np.nan, np.float32)})
    with pytest.raises(CalibrationError, match=r"tensor 'bad': no finite value .*4 NaN"):
        calibrator.ranges()


def test_unknown_method_is_refused():
    with pytest.raises(UsageError, match=r"unknown calibration method 'kl'.*minmax"):
        Calibrator(["t"], "kl")


def test_minus_inf_mask_gives_finite_scale():
    calibrator = Calibrator(["mask"], "entropy")
    mask = np.zeros((4, 16), np.float32)
    mask[:, 12:] = -np.inf
    calibrator.update({"mask": mask + np.linspace(-1, 1, 16, dtype=np.float32)})
    lo, hi = calibrator.ranges()["mask"]
    params = activation_qparams(lo, hi)
    assert np.isfinite(params.scale) and params.scale > 0 and math.isfinite(lo)


def test_chunking_by_byte_budget_gives_the_same_ranges(tmp_path, monkeypatch):
    # One chunk (one pass over the feeds) for a small model; with a 1-byte budget every
    # tensor is its own chunk (one pass each). The statistics must not depend on it.
    from onnxprune.intermediates import budget_chunks
    from onnxprune.quant import core
    from onnxprune.quant.testing import conv_net

    model = conv_net()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(5)]
    names = core.StaticQuantizer(model, core.QuantOptions()).full_plan.activations
    assert len(names) > 3
    assert budget_chunks(model, names, feeds) == [names]
    assert budget_chunks(model, names, feeds, budget=1) == [[n] for n in names]
    ranges = {}
    for budget in (core.CHUNK_BUDGET, 1):
        monkeypatch.setattr(core, "CHUNK_BUDGET", budget)
        quantizer = core.StaticQuantizer(model, core.QuantOptions(method="entropy"))
        quantizer.calibrate(feeds)
        ranges[budget] = quantizer.ranges
    assert ranges[1] == ranges[core.CHUNK_BUDGET]


def test_budget_probe_uses_the_largest_feed():
    # Feeds of varying shape: sizes are measured on the largest one, so a budget that fits
    # the small feed's tensors but not the large one's splits the names.
    from onnxprune.intermediates import budget_chunks
    from onnxprune.quant.testing import matmul_net

    model = matmul_net(np.ones((4, 4), np.float32))
    small = {"x": np.ones((1, 2, 4), np.float32)}
    large = {"x": np.ones((1, 64, 4), np.float32)}
    names = ["x", "y"]
    budget = 64 * 4 * 4 + 8  # room for one large tensor (x or y), for both small ones
    assert budget_chunks(model, names, [small]) == [names]
    assert budget_chunks(model, names, [small], budget=budget) == [names]
    assert budget_chunks(model, names, [small, large], budget=budget) == [["x"], ["y"]]


def test_auto_calibration_gives_every_method_from_one_pass():
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal(500).astype(np.float32) * (1 + i) for i in range(4)]
    batches[2][7] = 60.0  # an outlier that the clipping methods treat differently
    auto = Calibrator(["t"], "auto")
    for batch in batches:
        auto.update({"t": batch})
    for method in METHODS:
        single = Calibrator(["t"], method)
        for batch in batches:
            single.update({"t": batch})
        assert auto.ranges(method=method) == single.ranges(), method


def test_mean_minmax_averages_each_feeds_extremes():
    # Feed f holds [-f, 2f]: the range is the mean of those extremes. One outlier feed moves
    # it by its excess over the number of feeds, where minmax takes all of it.
    feeds = [np.array([-f, 0.5, 2.0 * f], np.float32) for f in (1.0, 2.0, 3.0)]
    calibrator = Calibrator(["t"], "mean-minmax")
    for feed in feeds:
        calibrator.update({"t": feed})
    stats = calibrator.stats["t"]
    assert stats.hist is None  # no histogram needed
    assert stats.feeds == 3
    assert calibrator.ranges()["t"] == pytest.approx((-2.0, 4.0))
    calibrator.update({"t": np.array([0.0, 404.0], np.float32)})
    lo, hi = calibrator.ranges()["t"]
    assert (lo, hi) == pytest.approx(((-6.0 + 0.0) / 4, (12.0 + 404.0) / 4))
    assert select_range(stats, "minmax") == (-3.0, 404.0)


def test_mean_minmax_ignores_non_finite_values_and_empty_feeds():
    calibrator = Calibrator(["t"], "mean-minmax")
    calibrator.update({"t": np.array([np.nan, -1.0, 3.0, np.inf], np.float32)})
    calibrator.update({"t": np.array([np.nan], np.float32)})  # no finite value: not a feed
    calibrator.update({"t": np.array([-3.0, 1.0], np.float32)})
    assert calibrator.stats["t"].feeds == 2
    assert calibrator.ranges()["t"] == pytest.approx((-2.0, 2.0))
