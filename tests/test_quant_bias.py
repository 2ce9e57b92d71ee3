"""Bias correction: the mean int8 error per output channel is absorbed by the bias."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.cli import main
from onnxprune.io import load
from onnxprune.passes import pipeline
from onnxprune.quant import bias, quantize_file, segments
from onnxprune.quant.core import QuantOptions, StaticQuantizer, copy_model
from onnxprune.quant.prepare import ensure_opset, name_nodes
from onnxprune.quant.testing import write, write_calib
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text


def _biased(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Weights that all round *down* in int8: per row a peak 1.0 (scale 1/127), then a zero
    (the peak's u8s8 pair partner, so no int16 pair saturates), then (k + 0.45) / 127."""
    w = (rng.integers(5, 60, (rows, cols)) + 0.45) / 127.0
    w[:, 0], w[:, 1] = 1.0, 0.0
    return w.astype(np.float32)


def _net(seed: int = 0):
    """Conv 1x1 (8->8) + Relu -> GlobalAveragePool -> Flatten -> Gemm (8->4)."""
    rng = np.random.default_rng(seed)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,8,4,4] x, float[8,8,1,1] w1, float[8] b1, float[4,8] wg, float[4] bg)
      => (float[N,4] y) {
        c = Conv (x, w1, b1)
        r = Relu (c)
        p = GlobalAveragePool (r)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, wg, bg)
    }
    """
    weights = {
        "w1": _biased(8, 8, rng).reshape(8, 8, 1, 1),
        "b1": np.full(8, 0.2, np.float32),
        "wg": _biased(4, 8, rng),
        "bg": np.zeros(4, np.float32),
    }
    return model_from_text(text, weights)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.uniform(0.5, 1.5, (24, 1, 8, 4, 4)).astype(np.float32)
    return write(_net(), tmp_path), write_calib(tmp_path, x=x), x


def _quantize(files, tmp_path, mode: str, name: str = "q.onnx"):
    model, calib, _ = files
    out = tmp_path / name
    # Nearest rounding: the weights are built so that every one of them rounds down.
    return quantize_file(
        model, out, calib=calib, u8s8="none", bias_correction=mode, rounding="nearest"
    ), out


def _errors(model_path, quantized_path, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean error per output channel and output SQNR (dB), int8 kernels (optimizations on)."""
    ref = np.concatenate([run_model(model_path, {"x": s})["y"] for s in x])
    got = np.concatenate([run_model(quantized_path, {"x": s}, optimize=True)["y"] for s in x])
    err = got.astype(np.float64) - ref
    return err.mean(axis=0), float(10 * np.log10(np.sum(ref**2) / np.sum(err**2)))


def test_correction_removes_the_mean_error_and_improves_sqnr(files, tmp_path):
    _, off_path = _quantize(files, tmp_path, "off", "off.onnx")
    result, on_path = _quantize(files, tmp_path, "on", "on.onnx")
    mean_off, sqnr_off = _errors(files[0], off_path, files[2])
    mean_on, sqnr_on = _errors(files[0], on_path, files[2])
    # Every weight rounds down and every input is positive: a clear negative offset.
    assert np.all(mean_off < 0) and np.min(np.abs(mean_off)) > 0.01
    assert np.max(np.abs(mean_on)) < 0.01 * np.min(np.abs(mean_off))
    assert sqnr_on > sqnr_off + 20
    info = result.details.bias_correction
    assert info is not None and info.correction is not None
    assert info.applied and info.reason == "on"
    assert info.correction.corrected == ["Conv_0", "Gemm_4"] and info.correction.skipped == []
    assert info.sqnr_db_with > info.sqnr_db_without
    payload = info.to_dict()
    assert payload["corrected"] == ["Conv_0", "Gemm_4"] and payload["skipped"] == []
    assert payload["largest_offsets"].keys() == {"Conv_0", "Gemm_4"}


def test_auto_keeps_it_when_sqnr_improves_and_report_records_it(files, tmp_path):
    result, _ = _quantize(files, tmp_path, "auto")
    info = result.details.bias_correction
    assert info is not None
    assert info.mode == "auto" and info.applied
    # quantize holds out the last 6 of the 24 feeds for its report; bias correction fits on
    # three quarters of the other 18 and is judged on the rest.
    shrunk = "" if info.evidence is None else f"; offsets shrunk as if from {info.evidence} "
    assert info.reason == "auto: held-out SQNR improved" + (shrunk and shrunk + "independent feeds")
    assert (info.fit_feeds, info.judged_on_feeds) == (14, 4)
    assert result.fidelity.held_out.samples == 6
    assert info.sqnr_db_with > info.sqnr_db_without
    # Every shrinkage strength was fitted and judged; the best held-out one was kept.
    assert info.candidates_sqnr_db is not None
    assert set(info.candidates_sqnr_db) == {"4", "16", "all"}
    chosen = "all" if info.evidence is None else str(info.evidence)
    assert info.candidates_sqnr_db[chosen] == max(info.candidates_sqnr_db.values())
    assert info.candidates_sqnr_db[chosen] == pytest.approx(info.sqnr_db_with)


def test_offsets_within_their_noise_are_shrunk():
    # Per channel and feed, the (sum, count) of the masked error. Channel 0: a clear offset
    # (0.5 in every feed, tiny spread); channel 1: zero-mean noise whose sample mean is a
    # small 0.05 (standard error ~0.3); channel 2 seen in one feed only (noise unknown).
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(12)
    noise = noise - noise.mean() + 0.05
    sums = bias._FeedSums()
    for i in range(12):
        means = np.array([0.5 + 1e-3 * noise[i], noise[i], 0.7])
        counts = np.array([10, 10, 10 if i == 0 else 0])
        sums.add(means * counts, counts)
    offset = sums.offset()
    assert offset[0] == pytest.approx(0.5, rel=1e-4)
    assert offset[1] == 0.0
    assert offset[2] == pytest.approx(0.7)


def test_evidence_caps_the_feeds_counted_as_independent():
    # One channel, 100 feeds whose means alternate 1 +- 2 (mean 1, spread ~2): counting
    # every feed, se^2 = var / 100 ~ 0.04 and the offset is kept at ~0.96; counted as 4
    # feeds, se^2 = var / 4 ~ 1.01 > mu^2 and it is dropped; as 16, kept at 1 - var / 16.
    sums = bias._FeedSums()
    for i in range(100):
        mean = 1.0 + (2.0 if i % 2 else -2.0)
        sums.add(np.array([mean * 10]), np.array([10]))
    var = 4.0 * 100 / 99  # sample variance of the per-feed means
    assert sums.offset()[0] == pytest.approx(1.0 - var / 100)
    assert sums.offset(16)[0] == pytest.approx(1.0 - var / 16)
    assert sums.offset(4)[0] == 0.0
    assert sums.offset(1000)[0] == sums.offset()[0]  # a cap above the feeds changes nothing


def test_off_is_the_uncorrected_model_byte_for_byte(files, tmp_path):
    result, out = _quantize(files, tmp_path, "off")
    report = result.details.bias_correction
    assert report is not None
    assert report.to_dict() == {"mode": "off", "applied": False, "reason": "off"}
    # The path before bias correction existed: canonicalize, calibrate, build, save.
    model = load(files[0])
    pipeline.canonicalize(model)
    name_nodes(model)
    model, _ = ensure_opset(model)
    quantizer = StaticQuantizer(model, QuantOptions())
    # Calibrated on the fit samples: the last quarter (6 of 24) is held out for the report.
    quantizer.calibrate([{"x": s} for s in files[2][:18]])
    built, _ = quantizer.build((), "none")
    expected = write(built, tmp_path, "expected.onnx")
    assert out.read_bytes() == expected.read_bytes()


def test_same_bytes_twice(files, tmp_path):
    _, first = _quantize(files, tmp_path, "on", "a.onnx")
    _, second = _quantize(files, tmp_path, "on", "b.onnx")
    assert first.read_bytes() == second.read_bytes()


def test_bad_mode_is_refused(files, tmp_path, capsys):
    out = tmp_path / "bad.onnx"
    args = ["quantize", str(files[0]), "-o", str(out), "--calib", str(files[1])]
    with pytest.raises(SystemExit) as exit_info:  # refused by the flag parser
        main([*args, "--bias-correction", "maybe"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --bias-correction: invalid choice: 'maybe'" in err and not out.exists()


def _residual_net(seed: int = 0):
    """Conv 3x3 + Relu -> Conv 1x1 + Relu -> Conv 1x1 -> Add (residual) -> Conv 1x1 + Relu
    -> GlobalAveragePool -> Flatten -> Gemm: cut tensors and a skip connection."""
    rng = np.random.default_rng(seed)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,6,6] x, float[4,4,3,3] w1, float[4] b1, float[4,4,1,1] w2, float[4] b2,
       float[4,4,1,1] w3, float[4] b3, float[4,4,1,1] w4, float[4] b4, float[3,4] wg,
       float[3] bg) => (float[1,3] y) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu (c1)
        c2 = Conv (r1, w2, b2)
        r2 = Relu (c2)
        c3 = Conv (r2, w3, b3)
        s = Add (r1, c3)
        c4 = Conv (s, w4, b4)
        r4 = Relu (c4)
        p = GlobalAveragePool (r4)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, wg, bg)
    }
    """
    weights = {
        "w1": _biased(4, 36, rng).reshape(4, 4, 3, 3) / 4,
        "b1": np.full(4, 0.1, np.float32),
        "wg": _biased(3, 4, rng),
        "bg": np.zeros(3, np.float32),
    }
    for i in (2, 3, 4):
        weights[f"w{i}"] = _biased(4, 4, rng).reshape(4, 4, 1, 1)
        weights[f"b{i}"] = np.full(4, 0.05 * i, np.float32)
    return model_from_text(text, weights)


def _built(model, feeds):
    pipeline.canonicalize(model)
    name_nodes(model)
    model, _ = ensure_opset(model)
    quantizer = StaticQuantizer(model, QuantOptions())
    quantizer.calibrate(feeds)
    built, _ = quantizer.build((), "none")
    return model, built, quantizer.plan(()).nodes


def _biases(model) -> dict[str, np.ndarray]:
    return {n: v.const_value.numpy() for n, v in model.graph.initializers.items() if "b" in n}


def _feeds(make, count: int, seed: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (1, 8, 4, 4) if make is _net else (1, 4, 6, 6)
    return [{"x": rng.uniform(0.5, 1.5, shape).astype(np.float32)} for _ in range(count)]


# 1 keeps nothing (every cut model starts at the graph input); 3000 bytes keeps int8 tensors
# of 6 feeds (864 bytes each) but no float one (3456 bytes): those are recomputed.
@pytest.mark.parametrize("budget", [bias.CACHE_BYTES, 3000, 1])
@pytest.mark.parametrize("make", [_net, _residual_net])
def test_truncated_measurement_equals_the_full_model_path(make, budget, monkeypatch):
    """Cut models (float and quantized, cached cut tensors within one budget, evictions)
    measure the same offsets as the full quantized and float models run per layer."""
    monkeypatch.setattr(bias, "CACHE_BYTES", budget)
    feeds = _feeds(make, 6)
    model, built, nodes = _built(make(), feeds)
    full, cut = copy_model(built), copy_model(built)
    expected = bias.correct_biases(model, full, nodes, feeds, truncate=False)
    got = bias.correct_biases(model, cut, nodes, feeds)
    assert got.corrected == expected.corrected and len(got.corrected) >= 2
    assert got.skipped == expected.skipped
    assert got.largest_offsets.keys() == expected.largest_offsets.keys()
    for node, offset in expected.largest_offsets.items():
        np.testing.assert_allclose(got.largest_offsets[node], offset, rtol=1e-6, atol=1e-9)
    want = _biases(full)
    for name, value in _biases(cut).items():  # int32 biases: equal, or 1 step off on a tie
        np.testing.assert_allclose(
            value, want[name], rtol=0, atol=1 if value.dtype.kind == "i" else 1e-6
        )


def test_truncated_measurement_is_deterministic():
    feeds = _feeds(_residual_net, 4, seed=4)
    model, built, nodes = _built(_residual_net(), feeds)
    first, second = copy_model(built), copy_model(built)
    a = bias.correct_biases(model, first, nodes, feeds)
    b = bias.correct_biases(model, second, nodes, feeds)
    assert a == b
    for name, value in _biases(first).items():
        np.testing.assert_array_equal(value, _biases(second)[name])


@pytest.mark.parametrize("budget", [bias.CACHE_BYTES, 3000])
def test_variants_in_one_pass_equal_separate_corrections(budget, monkeypatch):
    """Several strengths corrected in one pass (the float side run once for all copies,
    one cache for all) give each copy exactly the biases of its own correct_biases run."""
    monkeypatch.setattr(bias, "CACHE_BYTES", budget)
    feeds = _feeds(_residual_net, 8, seed=6)
    model, built, nodes = _built(_residual_net(), feeds)
    strengths = (2, None)
    alone = [copy_model(built) for _ in strengths]
    records = [
        bias.correct_biases(model, m, nodes, feeds, evidence=e)
        for m, e in zip(alone, strengths, strict=True)
    ]
    together = [copy_model(built) for _ in strengths]
    got = bias.correct_bias_variants(model, together, nodes, feeds, strengths)
    assert got == records
    assert records[0].largest_offsets != records[1].largest_offsets  # the strengths differ
    for one, other in zip(alone, together, strict=True):
        for name, value in _biases(one).items():
            np.testing.assert_array_equal(_biases(other)[name], value)


class _Recorder:
    """Records, per step and model, the cut tensors read and the nodes run; the cache's
    bytes after every feed."""

    def __init__(self, monkeypatch):
        self.cuts: list[tuple[int, list[str], int]] = []
        self.held: list[int] = []
        step_run, store = segments.step_run, segments.Cache.store

        def recording_step_run(side, step, cache):
            stop = cache.names(side.key)
            missing = [t for t in dict.fromkeys(side.targets[step]) if t not in stop]
            nodes, cuts = side.ancestors(missing, stop) if missing else ([], [])
            self.cuts.append((side.key, cuts, len(nodes)))
            return step_run(side, step, cache)

        def recording_store(cache, feed, produced):
            store(cache, feed, produced)
            self.held.append(cache.held())

        monkeypatch.setattr(segments, "step_run", recording_step_run)  # via paired_outputs
        monkeypatch.setattr(segments.Cache, "store", recording_store)


def test_cut_models_reuse_cached_tensors(monkeypatch):
    """Both models start, per layer, from cached tensors computed for earlier layers: the
    int8 outputs of fused kernels (quantized) and float tensors (reference)."""
    feeds = _feeds(_residual_net, 2, seed=5)
    model, built, nodes = _built(_residual_net(), feeds)
    recorder = _Recorder(monkeypatch)
    bias.correct_biases(model, copy_model(built), nodes, feeds)
    ref = [r for r in recorder.cuts if r[0] == segments.FLOAT]
    quant = [r for r in recorder.cuts if r[0] == segments.QUANT]
    assert len(ref) == len(quant) == 5  # 4 Conv + Gemm
    assert ref[0][1] == [] and quant[0][1] == []
    # Each float layer after the first runs only its own nodes from cached tensors (the
    # Gemm also the Relu, GlobalAveragePool and Flatten before it).
    assert all(cuts for _, cuts, _ in ref[1:])
    assert [n for _, _, n in ref] == [2, 2, 1, 3, 5]
    assert all(q[1] and q[1][0].endswith("_quantized") for q in quant[1:])


def test_cache_stays_within_its_budget(monkeypatch):
    """One budget for the float and the int8 tensors of all feeds; evicted tensors are
    recomputed (the cut models start further back)."""
    monkeypatch.setattr(bias, "CACHE_BYTES", 3000)
    feeds = _feeds(_residual_net, 6)
    model, built, nodes = _built(_residual_net(), feeds)
    recorder = _Recorder(monkeypatch)
    bias.correct_biases(model, copy_model(built), nodes, feeds)
    assert recorder.held and max(recorder.held) <= 3000
    assert any(cuts for _, cuts, _ in recorder.cuts)


def test_float_cuts_keep_onnxruntime_kernels():
    """No float cut in front of a layout-sensitive op (GlobalAveragePool, reached through
    Relu), nor at an Add input a hidden Conv could be fused with."""
    feeds = _feeds(_residual_net, 1)
    model, _, _ = _built(_residual_net(), feeds)
    cuts = segments.float_cuts(model, {"c1", "r1", "c2", "r2", "c3", "c4", "r4", "y"})
    assert {"r1", "r2", "c3", "s"} <= cuts
    assert "r4" not in cuts and "c4" not in cuts  # -> Relu -> GlobalAveragePool
    assert "r1" not in segments.float_cuts(model, {"r1"})  # Add(r1, c3), c3 not exposed


def test_feeds_of_other_shapes_and_saved_cut_models(monkeypatch):
    """Feeds of different batch sizes (cut inputs take the declared, symbolic shapes) and
    cut models saved with external data (as those over the in-memory limit) measure the
    same offsets as the full-model path."""
    monkeypatch.setattr(segments, "_IN_MEMORY_BYTES", -1)
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.uniform(0.5, 1.5, (n, 8, 4, 4)).astype(np.float32)} for n in (1, 3, 2, 1)]
    model, built, nodes = _built(_net(), feeds)
    full, cut = copy_model(built), copy_model(built)
    expected = bias.correct_biases(model, full, nodes, feeds, truncate=False)
    got = bias.correct_biases(model, cut, nodes, feeds)
    assert got.corrected == expected.corrected == ["Conv_0", "Gemm_4"]
    for node, offset in expected.largest_offsets.items():
        np.testing.assert_allclose(got.largest_offsets[node], offset, rtol=1e-6, atol=1e-9)
    want = _biases(full)
    for name, value in _biases(cut).items():
        np.testing.assert_allclose(value, want[name], rtol=0, atol=1)


def test_mask_is_on_the_float_value_not_the_noisy_quantized_one():
    # Zero-mean +-1 errors around float values at both bounds of a uint8 readout (scale 1,
    # zero point 0): at 254 the +1 error reaches 255 (= qmax), at 1 the -1 error reaches 0
    # (= qmin). Masking on the quantized value drops exactly those, so the mean would be
    # -1/3 and +1/3; masked on the float value every pair is kept and the mean is 0.
    readout = bias._Readout(scale=1.0, zero=0, qmin=0, qmax=255)
    y = np.array([[254.0, 254.0, 100.0, 100.0, 1.0, 1.0]], np.float32).reshape(1, 6, 1)
    y = np.repeat(y, 2, axis=2)  # two channels on the last axis
    q = np.array([[255, 253, 101, 99, 2, 0]], np.uint8).reshape(1, 6, 1)
    q = np.repeat(q, 2, axis=2)
    total, count = bias._masked_error(y, None, q, readout, axis=-1)
    np.testing.assert_array_equal(count, [6, 6])
    np.testing.assert_array_equal(total, [0.0, 0.0])
    # A float value outside the representable range (clipping, not rounding) is left out.
    y[0, 0, :] = 300.0
    total, count = bias._masked_error(y, None, q, readout, axis=-1)
    np.testing.assert_array_equal(count, [5, 5])
    np.testing.assert_array_equal(total, [-1.0, -1.0])
