"""Block-wise distillation: cut points, segment replay, and recovery of a damaged student
segment by segment (masks kept, only initializer values changed, deterministic)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from onnxprune.recover import GraphReplay  # noqa: E402
from onnxprune.recover.blockwise import cut_points  # noqa: E402
from onnxprune.recover.distill import DistillOptions, distill  # noqa: E402
from onnxprune.recover.replay import ReplayError  # noqa: E402
from onnxprune.sparsity.storage import store_bitmask  # noqa: E402
from onnxprune.testing import model_from_text  # noqa: E402
from test_recover_distill import _cnn, _damaged, _feeds, _init, _structure, _weights  # noqa: E402

OPTIONS = DistillOptions(
    steps=60,
    lr=3e-3,
    batch_size=8,
    eval_every=10,
    patience=10,
    threads=1,
    blockwise=True,
    block_layers=1,
)


def _residual() -> ir.Model:
    rng = np.random.default_rng(0)
    text = """<ir_version: 10, opset_import: ["" : 18]>
g (float[1,4,6,6] x, float[4,4,3,3] wa, float[4,4,3,3] wb) => (float[1,4,6,6] o) {
  a = Conv <pads=[1,1,1,1]> (x, wa)
  r = Relu (a)
  b = Conv <pads=[1,1,1,1]> (r, wb)
  s = Add (b, r)
  o = Relu (s)
}"""
    shapes = {"wa": (4, 4, 3, 3), "wb": (4, 4, 3, 3)}
    return model_from_text(
        text, {k: (rng.standard_normal(v) * 0.3).astype(np.float32) for k, v in shapes.items()}
    )


def test_cut_points_are_the_tensors_every_path_passes_through() -> None:
    # b is not a cut (r is still needed by the Add); the output o is not a cut
    assert cut_points(_residual()) == [("a",), ("r",), ("s",)]
    assert cut_points(_cnn(_weights(0))) == [("c1",), ("r1",), ("c2",), ("r2",), ("g",), ("f",)]


def _masked(weights: dict[str, np.ndarray], late: bool = False) -> ir.Model:
    """Two token layers that each add the same additive mask built from an input once (as
    a transformer's attention mask): the mask stays live through both layers. ``late``:
    the second layer rebuilds it from ``m`` (same function, other side values live)."""
    second = (
        "keep2 = Sub (one, m)\n  bias2 = Mul (keep2, big)" if late else "bias2 = Identity (bias)"
    )
    text = f"""<ir_version: 10, opset_import: ["" : 18]>
g (float[N,6,4] x, float[N,6] mask, int64[1] axis, float one, float big, float[4,4] w1,
   float[4,4] w2, float[4,3] w3) => (float[N,6,3] o) {{
  m = Unsqueeze (mask, axis)
  keep = Sub (one, m)
  bias = Mul (keep, big)
  h1 = MatMul (x, w1)
  a1 = Add (h1, bias)
  r1 = Relu (a1)
  {second}
  h2 = MatMul (r1, w2)
  a2 = Add (h2, bias2)
  r2 = Relu (a2)
  o = MatMul (r2, w3)
}}"""
    constants = {
        "axis": np.array([2], np.int64),
        "one": np.array(1.0, np.float32),
        "big": np.array(-3.0, np.float32),
    }
    return model_from_text(text, {**constants, **weights})


def _masked_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"w1": (4, 4), "w2": (4, 4), "w3": (4, 3)}
    return {k: (rng.standard_normal(v) * 0.6).astype(np.float32) for k, v in shapes.items()}


def _masked_feeds(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    feeds = []
    for _ in range(count):
        mask = np.ones((1, 6), np.float32)
        mask[0, int(rng.integers(3, 7)) :] = 0.0
        feeds.append({"x": rng.standard_normal((1, 6, 4)).astype(np.float32), "mask": mask})
    return feeds


def test_a_side_value_live_through_the_layers_rides_along_the_cuts() -> None:
    """Without side values the mask would leave no cut at all (the whole model one segment);
    each hidden state is a cut that carries the mask, and only the hidden state is matched."""
    teacher = _masked(_masked_weights(0))
    assert cut_points(teacher) == [
        ("h1", "bias"),
        ("a1", "bias"),
        ("r1", "bias2"),  # the later point: the Identity's output is the side value there
        ("h2", "bias2"),
        ("a2",),
        ("r2",),
    ]
    damaged = _masked_weights(0)
    noise = np.random.default_rng(9).standard_normal((4, 4)).astype(np.float32)
    damaged["w1"] = damaged["w1"] + noise * np.float32(0.4)
    half = (np.arange(16) % 2).reshape(4, 4).astype(np.float32)  # the bitmask case's zeros
    options = dataclasses.replace(OPTIONS, steps=300, lr=1e-2, eval_every=20)
    # The student's side values differ from the teacher's where it rebuilds the mask: each
    # model carries its own along; the cuts are matched by their value.
    for late, bitmask, ends in (
        (False, False, [["h1", "bias"], ["h2", "bias2"], ["o"]]),
        (True, False, [["h1", "bias", "m"], ["h2", "bias2"], ["o"]]),
        # w1 decoded from its bitmask storage (sparsify's): computed, still a weight
        (False, True, [["h1", "bias"], ["h2", "bias2"], ["o"]]),
    ):
        student, reference = _masked(damaged, late=late), teacher
        if bitmask:  # a half-sparse teacher; the student's zeros stay where they are
            reference = _masked({**_masked_weights(0), "w1": _masked_weights(0)["w1"] * half})
            student = _masked({**damaged, "w1": damaged["w1"] * half})
            (stored,) = store_bitmask(student, ["w1"])
            assert stored.format == "bitmask"
            assert cut_points(student) == cut_points(teacher)
        result = distill(student, reference, _masked_feeds(40), options)
        assert result.mode == "block-wise"
        assert [s["end"] for s in result.segments] == ends
        assert result.kept, result.reason
        assert result.after is not None
        before, after = result.before.outputs["o"], result.after.outputs["o"]
        assert after["sqnr_db"] > before["sqnr_db"] + 6.0, (before, after)
        first = result.segments[0]
        assert first["best_step"] > 0 and first["held_after"] < 0.5 * first["held_before"]


def test_a_segment_replays_exactly_what_the_whole_graph_computes() -> None:
    replay = GraphReplay(_residual(), trainable=[])
    x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
    with torch.no_grad():
        full = replay({"x": x}, ["r", "s", "o"])
        part = replay.forward_from({"r": full["r"]}, ["o"])
    torch.testing.assert_close(part["o"], full["o"], rtol=0, atol=0)
    with pytest.raises(ReplayError, match="not given"):
        replay.forward_from({"b": full["r"]}, ["s"])  # the Add needs r too, and x is not given


def test_blockwise_recovers_a_damaged_student_and_keeps_masks() -> None:
    teacher = _cnn(_weights(0))
    student = _cnn(_damaged(_weights(0)))
    result = distill(student, teacher, _feeds(), OPTIONS)
    assert result.kept, result.reason
    assert result.after is not None
    before, after = result.before.outputs["logits"], result.after.outputs["logits"]
    assert after["sqnr_db"] > before["sqnr_db"] + 6.0, (before, after)
    # every segment with weights trained on its own cut; held-out losses only fall
    # cuts before an activation move past it: r1, not c1
    assert [s["end"] for s in result.segments] == [["r1"], ["r2"], ["logits"]]
    for segment in result.segments:  # every segment's training lowered its held-out loss
        assert segment["best_step"] > 0
        assert segment["held_after"] < segment["held_before"]
    assert result.segments[0]["held_after"] < 0.5 * result.segments[0]["held_before"]
    w2 = _init(result.model, "w2")
    assert not w2[:, 2:4].any()
    assert _structure(result.model) == _structure(student)


def test_a_segment_already_close_to_the_teacher_is_not_trained() -> None:
    """conv1 left exact: its segment's error is 0 at r1, so it takes no step (and no share
    of a time budget); the damaged layers after it are trained."""
    teacher = _cnn(_weights(0))
    damaged = _damaged(_weights(0))
    damaged["w1"], damaged["b1"] = _weights(0)["w1"], _weights(0)["b1"]
    result = distill(_cnn(damaged), teacher, _feeds(), OPTIONS)
    first, second = result.segments[0], result.segments[1]
    assert first["end"] == ["r1"] and first["held_before"] < 1e-9
    assert first["steps"] == 0 and first["held_after"] == first["held_before"]
    assert first["params"] == 8 * 3 * 3 * 3 + 8  # what it holds, though not trained
    assert second["steps"] > 0 and second["held_after"] < second["held_before"]
    assert result.kept
    np.testing.assert_array_equal(_init(result.model, "w1"), _weights(0)["w1"])


def test_blockwise_is_deterministic() -> None:
    teacher, feeds = _cnn(_weights(0)), _feeds(24)
    options = DistillOptions(
        steps=12, lr=3e-3, batch_size=4, eval_every=4, threads=1, blockwise=True, block_layers=1
    )
    runs = [distill(_cnn(_damaged(_weights(0))), teacher, feeds, options) for _ in range(2)]
    assert runs[0].kept
    first, second = (ir.to_proto(r.model).SerializeToString() for r in runs)
    assert first == second


def test_blockwise_rate_search_is_per_segment_and_within_the_budget() -> None:
    teacher, feeds = _cnn(_weights(0)), _feeds(24)
    common = {"steps": 8, "batch_size": 4, "eval_every": 4, "threads": 1}
    options = DistillOptions(blockwise=True, block_layers=1, lr_search=(1e-7, 3e-3), **common)
    result = distill(_cnn(_damaged(_weights(0))), teacher, feeds, options)
    assert result.lr is None  # no single rate: each segment reports its own
    assert [s["lr"] for s in result.segments] == [3e-3] * 3
    assert result.reproducible
    spent = dataclasses.replace(options, time_budget=1e-9)
    result = distill(_cnn(_damaged(_weights(0))), teacher, feeds, spent)
    assert all(s["lr"] == spent.lr and s["stopped_by_budget"] for s in result.segments)
    assert not result.reproducible


def test_segments_hold_at_least_block_layers_layers() -> None:
    """With the default (3 layers a segment) the 3-layer CNN is one segment; with 2, the
    first segment runs to the first cut after conv2."""
    teacher = _cnn(_weights(0))
    feeds = _feeds(16)
    for layers, ends in ((3, [["logits"]]), (2, [["r2"], ["logits"]])):
        options = dataclasses.replace(OPTIONS, steps=4, block_layers=layers)
        result = distill(_cnn(_damaged(_weights(0))), teacher, feeds, options)
        assert [s["end"] for s in result.segments] == ends


def test_a_node_without_replay_falls_back_to_end_to_end() -> None:
    """Segments cannot run through a node onnxruntime computes: the run is end-to-end (with
    the upstream weights frozen, as there) and says why."""
    teacher = _cnn(_weights(0), middle="LpNormalization")
    student = _cnn(_damaged(_weights(0)), middle="LpNormalization")
    result = distill(student, teacher, _feeds(), OPTIONS)
    assert result.mode.startswith("end-to-end (block-wise needs every node")
    assert not result.segments
    assert result.kept
    assert "block-wise needs every node" in result.summary()
    np.testing.assert_array_equal(_init(result.model, "w1"), _init(student, "w1"))


def test_a_fixed_batch_graph_runs_feed_by_feed() -> None:
    """A Reshape to a fixed batch of 1 cannot take stacked feeds: block-wise runs them one at
    a time and still recovers the damaged student."""
    from onnx import helper, numpy_helper

    def fixed(weights: dict[str, np.ndarray]) -> ir.Model:
        proto = ir.to_proto(_cnn(weights))
        flatten = next(n for n in proto.graph.node if n.op_type == "Flatten")
        index = list(proto.graph.node).index(flatten)
        proto.graph.node.remove(flatten)
        proto.graph.node.insert(index, helper.make_node("Reshape", ["g", "shape"], ["f"]))
        proto.graph.initializer.append(numpy_helper.from_array(np.array([1, 8]), "shape"))
        return ir.from_proto(proto)

    result = distill(fixed(_damaged(_weights(0))), fixed(_weights(0)), _feeds(), OPTIONS)
    assert result.kept, result.reason
    assert result.after is not None
    before, after = result.before.outputs["logits"], result.after.outputs["logits"]
    assert after["sqnr_db"] > before["sqnr_db"] + 6.0


def test_an_output_after_the_last_weight_joins_the_last_segment() -> None:
    """logits -> Softmax -> probs: the cut at logits leaves nothing to train after it; that
    tail joins the segment before (it used to crash Adam with no parameters)."""
    from onnx import helper

    def with_softmax(weights: dict[str, np.ndarray]) -> ir.Model:
        proto = ir.to_proto(_cnn(weights))
        proto.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
        del proto.graph.output[:]
        proto.graph.output.append(helper.make_tensor_value_info("probs", 1, ["N", 5]))
        return ir.from_proto(proto)

    teacher, student = with_softmax(_weights(0)), with_softmax(_damaged(_weights(0)))
    result = distill(student, teacher, _feeds(), OPTIONS)
    assert [s["end"] for s in result.segments] == [["r1"], ["r2"], ["probs"]]
    assert result.kept, result.reason


def test_stacking_is_refused_where_the_batch_is_not_axis_0() -> None:
    """Sequence-first internals (``[S, N, H]``, softmax over S): stacked feeds would mix, so
    segments run feed by feed; stacked and single runs agree on a batch-first model."""
    from onnxprune.recover.blockwise import Segment, _batchable

    rng = np.random.default_rng(0)
    text = """<ir_version: 10, opset_import: ["" : 18]>
g (float[1,4,8] x, float[8,8] w1, float[8,8] w2) => (float[1,4,8] y) {
  t = Transpose <perm = [1, 0, 2]> (x)
  a = MatMul (t, w1)
  s = Softmax <axis = 0> (a)
  b = MatMul (s, w2)
  y = Transpose <perm = [1, 0, 2]> (b)
}"""
    weights = {k: rng.standard_normal((8, 8)).astype(np.float32) for k in ("w1", "w2")}
    replay = GraphReplay(model_from_text(text, weights), trainable=["w1", "w2"])
    feeds = [{"x": rng.standard_normal((1, 4, 8)).astype(np.float32)} for _ in range(2)]
    parts = [Segment(["x"], ["a"], ["w1"], False), Segment(["a"], ["y"], ["w2"], True)]
    assert not _batchable(replay, replay, parts, feeds)
    cnn = GraphReplay(_cnn(_weights(0)))
    cnn_parts = [Segment(["x"], ["r1"], ["w1", "b1"], False), Segment(["r1"], ["logits"], [], True)]
    assert _batchable(cnn, cnn, cnn_parts, [{"x": f["x"]} for f in _feeds(2)])
