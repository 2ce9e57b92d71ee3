"""Exactness oracle: channels zeroed first, then removed, must not change the outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxprune.prune import PruneOptions, analyze, apply_removal, decide_plan, zero_units
from onnxprune.runtime import run_model
from onnxprune.testing import random_feeds
from prune_models import BUILDERS


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _prune_zeroed(model: ir.Model, ratio: float, round_to: int = 1):
    """Return (zeroed original, pruned) for the plan chosen at ``ratio``."""
    analysis = analyze(model)
    plan, _ = decide_plan(model, analysis, PruneOptions(ratio=ratio, round_to=round_to))
    removed = plan.removed_roots(analysis)
    assert removed, "the plan removes nothing"
    zeroed = _copy(model)
    zero_units(zeroed, analyze(zeroed), plan.removed_roots(analyze(zeroed)))
    pruned = _copy(zeroed)
    info = apply_removal(pruned, analyze(pruned), plan.removed_roots(analyze(pruned)))
    return zeroed, pruned, plan, info


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_zeroed_channels_prune_exactly(name: str, ratio: float):
    model = BUILDERS[name]()
    zeroed, pruned, _plan, _ = _prune_zeroed(model, ratio)
    proto = ir.serde.serialize_model(pruned)
    onnx.checker.check_model(proto, full_check=True)
    feeds = random_feeds(model, seed=1, dims={"batch": 2, "seq": 5})
    ref = run_model(zeroed, feeds)
    got = run_model(pruned, feeds)
    for key in ref:
        assert got[key].shape == ref[key].shape
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-5, err_msg=key)
    # Fewer parameters, and the original (unzeroed) outputs actually differ from the
    # zeroed ones: the test would notice channels that were silently kept.
    before = sum(v.const_value.size for v in model.graph.initializers.values())
    after = sum(v.const_value.size for v in pruned.graph.initializers.values())
    assert after < before
    orig = run_model(model, feeds)
    assert any(not np.allclose(orig[k], ref[k], atol=1e-5) for k in orig)


def test_attention_prunes_whole_heads_and_rewrites_shapes():
    model = BUILDERS["attention_ffn"]()
    analysis = analyze(model)
    heads = next(g for g in analysis.prunable if ("wq", 1) in g.initializers)
    assert heads.size == 4  # one unit per head, coupled across Q, K, V and the output
    assert {("wk", 1), ("wv", 1), ("wo", 0), ("bq", 0)} <= set(heads.initializers)
    ffn = next(g for g in analysis.prunable if ("w1", 1) in g.initializers)
    assert ffn.size == 48 and ("w2", 0) in ffn.initializers
    hidden = next(g for g in analysis.reported if ("wq", 0) in g.initializers)
    assert hidden.blocked is not None
    assert any("LayerNormalization normalizes over this axis" in s.reason for s in hidden.reasons)
    _, pruned, _, _ = _prune_zeroed(model, 0.5)
    inits = pruned.graph.initializers
    assert inits["wq"].const_value.shape == (32, 16)
    assert inits["wo"].const_value.shape == (16, 32)
    split = next(n for n in pruned.graph if n.op_type == "Reshape").inputs[1]
    assert split.const_value.numpy().tolist() == [0, 0, 2, 8]
    merge = [n for n in pruned.graph if n.op_type == "Reshape"][-1].inputs[1]
    assert merge.const_value.numpy().tolist() == [0, 0, 16]


def test_depthwise_group_attribute_follows_kept_channels():
    _, pruned, _, _ = _prune_zeroed(BUILDERS["depthwise_se"](), 0.5)
    dw = next(n for n in pruned.graph if n.op_type == "Conv" and n.attributes.get("group"))
    assert dw.attributes["group"].value == 8
    assert dw.inputs[1].const_value.shape == (16, 1, 3, 3)


def test_group_norm_prunes_whole_groups():
    model = BUILDERS["group_norm"]()
    group = next(g for g in analyze(model).prunable if ("w1", 0) in g.initializers)
    assert group.size == 4  # 16 channels in 4 groups: a unit is a whole group
    _, pruned, _, _ = _prune_zeroed(model, 0.5)
    gn = next(n for n in pruned.graph if n.op_type == "GroupNormalization")
    assert gn.attributes["num_groups"].value == 2
    assert gn.inputs[1].const_value.shape == (8,)


def test_concat_branches_are_separate_groups_and_split_sizes_follow():
    model = BUILDERS["concat_split"]()
    analysis = analyze(model)
    anchors = {g.id for g in analysis.prunable}
    assert {"wa:0", "wb:0"} <= anchors
    _, pruned, _, _ = _prune_zeroed(model, 0.5)
    split = next(n for n in pruned.graph if n.op_type == "Split")
    sizes = split.inputs[1].const_value.numpy().tolist()
    assert sum(sizes) == pruned.graph.initializers["wc"].const_value.shape[0]


def test_flatten_into_classifier_removes_blocks_of_features():
    _, pruned, _, _info = _prune_zeroed(BUILDERS["flatten_classifier"](), 0.5)
    fc1 = pruned.graph.initializers["fc1"].const_value
    w2 = pruned.graph.initializers["w2"].const_value
    # each conv channel owns 2x2 = 4 flattened features
    assert fc1.shape[1] == w2.shape[0] * 4
    assert fc1.shape[0] == 16


def test_round_to_and_never_zero_channels():
    model = BUILDERS["conv_chain"]()
    analysis = analyze(model)
    plan, _ = decide_plan(model, analysis, PruneOptions(ratio=0.5, round_to=8))
    assert all(len(k) % 8 == 0 for k in plan.keep.values())
    plan, _ = decide_plan(model, analysis, PruneOptions(ratio=0.99, max_ratio=0.999))
    assert all(len(k) >= 1 for k in plan.keep.values())


def test_second_run_with_same_plan_is_rejected_cleanly():
    model = BUILDERS["conv_chain"]()
    analysis = analyze(model)
    plan, _ = decide_plan(model, analysis, PruneOptions(ratio=0.5, round_to=1))
    apply_removal(model, analysis, plan.removed_roots(analysis))
    from onnxprune.errors import UsageError

    with pytest.raises(UsageError, match="has 16 channels, the model 8"):
        plan.removed_roots(analyze(model))


MLP = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[batch, 6] x, float[12, 6] w1, float[12] b1, float[3, 12] w2, float[3] b2)
  => (float[batch, 3] y) {
  h = Gemm <transB=1> (x, w1, b1)
  r = Relu (h)
  y = Gemm <transB=1> (r, w2, b2)
}
"""


def test_bias_compensation_is_exact_for_constant_channels():
    """Channels whose weights are zero but bias is not carry relu(b): folding that constant
    into the next bias makes their removal exact."""
    from onnxprune.prune.core import prune_model
    from onnxprune.testing import model_from_text

    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((12, 6)).astype(np.float32)
    w1[::2] = 0.0  # even hidden units: exactly relu(b1), and the l2 criterion drops them
    arrays = {
        "w1": w1,
        "b1": np.abs(rng.standard_normal(12)).astype(np.float32),
        "w2": rng.standard_normal((3, 12)).astype(np.float32),
        "b2": rng.standard_normal(3).astype(np.float32),
    }
    reference = model_from_text(MLP, arrays)
    feeds = {"x": rng.standard_normal((5, 6)).astype(np.float32)}
    expected = run_model(reference, feeds)["y"]
    for compensate, matches in ((True, True), (False, False)):
        pruned = _copy(reference)
        report = prune_model(pruned, PruneOptions(ratio=0.5, round_to=1, compensate=compensate))
        assert pruned.graph.initializers["w1"].const_value.shape == (6, 6)
        got = run_model(pruned, feeds)["y"]
        assert np.allclose(got, expected, atol=1e-5) == matches
        assert bool(report.notes) == compensate
