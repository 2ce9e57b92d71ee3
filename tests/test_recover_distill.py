"""Distillation on tiny models: it must measurably recover a damaged student, keep sparsity
masks and int8 scales, change initializer values only, and be byte-deterministic."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxprune.errors import UsageError  # noqa: E402
from onnxprune.fidelity import compare  # noqa: E402
from onnxprune.recover import GraphReplay  # noqa: E402
from onnxprune.recover.distill import (  # noqa: E402
    KEEP_MIN_GAIN_DB,
    DistillOptions,
    _augment,
    _improves,
    distill,
)

OPTIONS = DistillOptions(steps=60, lr=3e-3, batch_size=8, eval_every=10, patience=10, threads=1)


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32),
        "b1": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32),
        "b2": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "w3": (rng.standard_normal((8, 5)) * 0.5).astype(np.float32),
        "b3": (rng.standard_normal(5) * 0.1).astype(np.float32),
    }


def _cnn(weights: dict[str, np.ndarray], middle: str | None = None) -> ir.Model:
    """Conv-Relu-[middle op]-Conv-Relu-GlobalAveragePool-Flatten-Gemm -> logits."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
    ]
    source = "r1"
    if middle is not None:
        nodes.append(helper.make_node(middle, ["r1"], ["m1"], name="middle", axis=1))
        source = "m1"
    nodes += [
        helper.make_node("Conv", [source, "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", 1, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", 1, ["N", 5])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ir.from_proto(model)


def _feeds(count: int = 40) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def _damaged(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Noise on every weight and two zeroed input channels of conv2 (a sparsity mask)."""
    rng = np.random.default_rng(3)
    damaged = {
        k: v + (rng.standard_normal(v.shape) * 0.05).astype(np.float32) for k, v in weights.items()
    }
    damaged["w2"][:, 2:4] = 0.0
    return damaged


def _structure(model: ir.Model) -> bytes:
    proto = ir.to_proto(model)
    for tensor in proto.graph.initializer:
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.ClearField("int32_data")
    return proto.SerializeToString(deterministic=True)


def _init(model: ir.Model, name: str) -> np.ndarray:
    value = model.graph.initializers[name].const_value
    assert value is not None
    return np.array(value.numpy())


def test_distillation_recovers_damaged_student_and_keeps_masks() -> None:
    teacher = _cnn(_weights(0))
    student = _cnn(_damaged(_weights(0)))
    before_bytes = ir.to_proto(student).SerializeToString()
    feeds = _feeds()
    result = distill(student, teacher, feeds, OPTIONS)
    assert result.kept, result.reason
    assert result.after is not None
    before, after = result.before.outputs["logits"], result.after.outputs["logits"]
    assert after["sqnr_db"] > before["sqnr_db"] + 6.0, (before, after)
    # The report's numbers are the comparator's on the held-out feeds (the last quarter).
    held = feeds[-10:]
    again = compare(teacher, result.model, held).outputs["logits"]["sqnr_db"]
    assert again == pytest.approx(after["sqnr_db"], abs=1e-6)
    # Sparsity mask: exactly zero before, exactly zero after; other weights did change.
    w2 = _init(result.model, "w2")
    assert not w2[:, 2:4].any()
    assert not np.array_equal(w2, _init(student, "w2"))
    # Only initializer values change: structure, names, dtypes and shapes are the same.
    assert _structure(result.model) == _structure(student)
    for name, value in student.graph.initializers.items():
        out = result.model.graph.initializers[name].const_value
        assert out is not None and value.const_value is not None
        assert (out.dtype, out.shape) == (value.const_value.dtype, value.const_value.shape)
    # The input model is untouched.
    assert ir.to_proto(student).SerializeToString() == before_bytes


def test_same_seed_gives_same_bytes() -> None:
    teacher, feeds = _cnn(_weights(0)), _feeds(24)
    options = DistillOptions(steps=12, lr=3e-3, batch_size=4, eval_every=4, threads=1)
    runs = [distill(_cnn(_damaged(_weights(0))), teacher, feeds, options) for _ in range(2)]
    assert runs[0].kept
    first, second = (ir.to_proto(r.model).SerializeToString() for r in runs)
    assert first == second


def test_perfect_student_is_returned_unchanged() -> None:
    teacher = _cnn(_weights(0))
    student = _cnn(_weights(0))
    options = DistillOptions(steps=6, lr=1e-2, batch_size=4, eval_every=3, threads=1)
    result = distill(student, teacher, _feeds(12), options)
    assert not result.kept
    assert result.model is student
    assert "kept the input" in result.reason


def test_keep_rule_needs_more_than_a_hair_of_sqnr() -> None:
    """Same top-1 agreement: kept only with at least KEEP_MIN_GAIN_DB more SQNR; a higher
    agreement wins, a lower one loses, whatever the SQNR."""
    base = (0.875, 18.26)
    assert not _improves(base, (0.875, 18.26 + KEEP_MIN_GAIN_DB / 10))
    assert _improves(base, (0.875, 18.26 + KEEP_MIN_GAIN_DB))
    assert _improves(base, (0.9, 18.0))
    assert not _improves(base, (0.85, 25.0))


def test_node_without_rule_freezes_upstream_weights() -> None:
    teacher = _cnn(_weights(0), middle="LpNormalization")
    student = _cnn(_damaged(_weights(0)), middle="LpNormalization")
    result = distill(student, teacher, _feeds(), OPTIONS)
    assert result.frozen_note is not None
    assert "middle (LpNormalization)" in result.frozen_note
    assert "2 weight(s) upstream of them frozen" in result.frozen_note
    assert result.kept
    np.testing.assert_array_equal(_init(result.model, "w1"), _init(student, "w1"))
    assert not np.array_equal(_init(result.model, "w3"), _init(student, "w3"))


def _qdq_linear(q: np.ndarray, scale: np.ndarray) -> ir.Model:
    """y = x @ dequantize(q, scale per column) + b, the int8 weight an initializer."""
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1, name="dq"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", 1, ["N", 6])],
        [helper.make_tensor_value_info("y", 1, ["N", 4])],
        [
            numpy_helper.from_array(q, "q"),
            numpy_helper.from_array(scale, "s"),
            numpy_helper.from_array(np.zeros(4, np.int8), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ir.from_proto(model)


def test_int8_weights_train_with_fixed_scales() -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 4)).astype(np.float32)
    teacher = _cnn_free_linear(weight)
    scale = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
    coarse = np.clip(np.round(weight / scale / 8) * 8, -128, 127).astype(np.int8)
    student = _qdq_linear(coarse, scale)
    feeds = [{"x": rng.standard_normal((1, 6)).astype(np.float32)} for _ in range(32)]
    options = DistillOptions(steps=150, lr=1e-2, batch_size=8, eval_every=10, threads=1)
    result = distill(student, teacher, feeds, options)
    assert result.kept, result.reason
    q = _init(result.model, "q")
    assert q.dtype == np.int8
    np.testing.assert_array_equal(_init(result.model, "s"), scale)
    np.testing.assert_array_equal(_init(result.model, "z"), np.zeros(4, np.int8))
    # The integers move toward round(weight / scale), the best int8 weight for this teacher
    # (measured: mean distance 1.67 -> 0.79, held-out SQNR 31.9 -> 34.9 dB).
    best = np.round(weight / scale)
    assert np.abs(q - best).mean() < 0.75 * np.abs(coarse - best).mean()
    assert result.after is not None
    assert result.after.outputs["y"]["sqnr_db"] > result.before.outputs["y"]["sqnr_db"] + 2.0


def _cnn_free_linear(weight: np.ndarray) -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "linear",
        [helper.make_tensor_value_info("x", 1, ["N", 6])],
        [helper.make_tensor_value_info("y", 1, ["N", 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ir.from_proto(model)


def test_replay_gradients_reach_trainable_weights() -> None:
    model = _cnn(_weights(0))
    replay = GraphReplay(model)
    assert sorted(replay.trainable) == ["b1", "b2", "b3", "w1", "w2", "w3"]
    replay(_feeds(1)[0])["logits"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in replay.params.values())


def test_refusals() -> None:
    teacher = _cnn(_weights(0))
    with pytest.raises(UsageError, match="at least 2 calibration samples"):
        distill(_cnn(_weights(1)), teacher, _feeds(1), OPTIONS)
    other = onnx.helper.make_graph(
        [helper.make_node("Relu", ["x"], ["other"])],
        "g",
        [helper.make_tensor_value_info("x", 1, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("other", 1, None)],
    )
    proto = helper.make_model(other, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UsageError, match="none of the teacher's outputs"):
        distill(ir.from_proto(proto), teacher, _feeds(4), OPTIONS)


def test_matched_intermediates_auto() -> None:
    teacher, student = _cnn(_weights(0)), _cnn(_damaged(_weights(0)))
    options = DistillOptions(
        steps=30, lr=3e-3, batch_size=8, eval_every=10, threads=1, match="auto"
    )
    result = distill(student, teacher, _feeds(), options)
    # Same names and shapes in both graphs (shapes checked on a feed: none are annotated).
    assert result.matched == ["c1", "c2", "f", "g", "r1", "r2"]
    assert result.kept


def test_augment_flips_and_shifts_images_only() -> None:
    nchw = np.arange(2 * 3 * 5 * 6, dtype=np.float32).reshape(2, 3, 5, 6)
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
    ids = np.arange(6, dtype=np.int64).reshape(1, 6)
    out = _augment({"a": nchw, "b": nhwc, "ids": ids}, (1, 1, -2))
    flipped = nchw[..., ::-1]
    # out[..., i, j] = flipped[..., clip(i + 1), clip(j - 2)]: edges replicated.
    rows = np.clip(np.arange(5) + 1, 0, 4)
    cols = np.clip(np.arange(6) - 2, 0, 5)
    expected = flipped[:, :, rows][..., cols]
    np.testing.assert_array_equal(out["a"], expected)
    np.testing.assert_array_equal(out["b"], expected.transpose(0, 2, 3, 1))
    assert out["ids"] is ids


def test_time_budget_stops_early_and_says_so() -> None:
    teacher, student = _cnn(_weights(0)), _cnn(_damaged(_weights(0)))
    # patience out of reach: only the clock can end the run (on a fast machine early stopping
    # came first and the run was, correctly, reproducible)
    options = DistillOptions(
        steps=100000, lr=3e-3, batch_size=8, threads=1, time_budget=1.0, patience=10**9
    )
    result = distill(student, teacher, _feeds(), options)
    assert 0 < result.steps < 100000
    assert not result.reproducible
    assert "the time budget ended the run" in result.summary()


def test_teacher_cache_is_bounded_and_recomputes_the_same_values():
    """Augmented (feed, key) pairs are unbounded: the cache keeps at most its byte budget
    (least recently used evicted) and an evicted entry comes back identical."""
    from onnxprune.recover.distill import _Teacher

    class Session:
        runs = 0

        def run(self, names, feed):
            Session.runs += 1
            return [feed["x"] * 2.0]

    teacher = _Teacher(Session(), ["y"], budget=3 * 4 * 8)  # three [8] float32 entries
    feeds = [{"x": np.full(8, i, np.float32)} for i in range(5)]
    first = [teacher(i, (0, 0, 0), f)["y"].copy() for i, f in enumerate(feeds)]
    assert len(teacher.cache) == 3 and teacher.bytes == 3 * 32
    assert Session.runs == 5
    again = teacher(0, (0, 0, 0), feeds[0])["y"]  # evicted: recomputed, same values
    assert Session.runs == 6 and np.array_equal(again, first[0])
    teacher(0, (0, 0, 0), feeds[0])  # now cached
    assert Session.runs == 6


def test_learning_rate_search_picks_the_best_trial_and_restarts_from_the_input() -> None:
    teacher, feeds = _cnn(_weights(0)), _feeds(24)
    common = {"steps": 12, "batch_size": 4, "eval_every": 4, "threads": 1}
    searched = distill(
        _cnn(_damaged(_weights(0))),
        teacher,
        feeds,
        DistillOptions(lr=1e-7, lr_search=(1e-7, 3e-3), lr_trial_steps=6, **common),
    )
    assert [rate for rate, _ in searched.lr_trials] == [1e-7, 3e-3]
    losses = dict(searched.lr_trials)
    assert losses[3e-3] < losses[1e-7]  # a rate of 1e-7 barely moves in 6 steps
    assert searched.lr == 3e-3 and searched.kept
    assert "learning rate 3e-03" in searched.summary()
    # The run restarts from the input weights with the chosen rate and the same batches:
    # the same bytes as a run given that rate directly.
    direct = distill(_cnn(_damaged(_weights(0))), teacher, feeds, DistillOptions(lr=3e-3, **common))
    assert direct.lr == 3e-3 and not direct.lr_trials
    searched_bytes, direct_bytes = (
        ir.to_proto(r.model).SerializeToString() for r in (searched, direct)
    )
    assert searched_bytes == direct_bytes


def test_rate_search_stops_when_the_time_budget_is_spent() -> None:
    from onnxprune.recover.distill import search_rate

    tried: list[float] = []
    losses = {1e-3: 0.5, 1e-4: 0.2, 1e-5: 0.2}

    def trial(rate: float) -> float:
        tried.append(rate)
        return losses[rate]

    # ascending order, ties keep the smaller rate
    assert search_rate((1e-3, 1e-4, 1e-5), trial, lambda: False) == (
        1e-5,
        [(1e-5, 0.2), (1e-4, 0.2), (1e-3, 0.5)],
    )
    tried.clear()
    assert search_rate((1e-3, 1e-4), trial, lambda: len(tried) >= 1) == (1e-4, [(1e-4, 0.2)])
    assert search_rate((1e-3,), trial, lambda: True) == (None, [])
    # Through distill: a budget spent before the search starts runs no trial; the given
    # rate is used and the run says the clock decided.
    result = distill(
        _cnn(_damaged(_weights(0))),
        _cnn(_weights(0)),
        _feeds(24),
        DistillOptions(steps=5, lr=3e-3, lr_search=(1e-4, 3e-3), threads=1, time_budget=1e-9),
    )
    assert result.lr_trials == [] and result.lr == 3e-3
    assert result.steps == 1 and not result.reproducible


def test_retained_heap_is_active_on_glibc_and_a_no_op_elsewhere(monkeypatch) -> None:
    from onnxprune.recover import allocator

    with allocator.retained_heap() as active:
        assert active is (allocator._glibc() is not None)
        block = bytearray(64 << 20)  # served from the heap while active; freed normally
        del block
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    with allocator.retained_heap() as active:
        assert active is False


def test_int8_weights_free_of_u8s8_saturation_stay_free() -> None:
    """A student quantized for AVX2 without VNNI (no adjacent K pair of int8 weights sums past
    128, the quantizer's remedy) keeps that after training, though the teacher's best
    integers break it; an unconstrained student (pairs past 128 already) is not held to it."""
    from onnxprune.quant.vnni import limit_pairs, saturating_channels

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 4)).astype(np.float32)
    teacher = _cnn_free_linear(weight)
    scale = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
    assert saturating_channels(np.round(weight / scale), 1, "MatMul").any()
    coarse = np.clip(np.round(weight / scale / 8) * 8, -128, 127)
    start = limit_pairs(coarse.astype(np.int8), 1, "MatMul")
    assert not saturating_channels(start, 1, "MatMul").any()
    feeds = [{"x": rng.standard_normal((1, 6)).astype(np.float32)} for _ in range(32)]
    options = DistillOptions(steps=150, lr=1e-2, batch_size=8, eval_every=10, threads=1)
    result = distill(_qdq_linear(start, scale), teacher, feeds, options)
    assert result.kept, result.reason
    q = _init(result.model, "q")
    assert not np.array_equal(q, start)
    assert not saturating_channels(q, 1, "MatMul").any()


def test_limit_pairs_changes_only_pairs_past_the_limit() -> None:
    from onnxprune.quant.vnni import limit_pairs, saturating_channels

    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, (8, 6, 3, 3)).astype(np.int8)
    out = limit_pairs(q, 0, "Conv")
    assert saturating_channels(q, 0, "Conv").any()
    assert not saturating_channels(out, 0, "Conv").any()  # both K orders of a Conv
    assert np.all(np.abs(out.astype(int)) <= np.abs(q.astype(int)))  # magnitudes only fall
    np.testing.assert_array_equal(limit_pairs(out, 0, "Conv"), out)  # safe input: unchanged
    # MatMul [K, N]: pairs along K per column; the larger of an excessive pair gives way
    m = np.array([[100, -120], [50, -9], [10, 64], [20, 64]], np.int8)
    expected = np.array([[78, -119], [50, -9], [10, 64], [20, 64]], np.int8)
    np.testing.assert_array_equal(limit_pairs(m, 1, "MatMul"), expected)
