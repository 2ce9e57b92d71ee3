"""Stage inputs from cut models equal those of the full models, weights changing on the way."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.intermediates import iter_intermediates
from onnxprune.io.pinned import copy_model
from onnxprune.sparsity import find_layers
from onnxprune.sparsity.prune import stages
from onnxprune.sparsity.sequential import StageInputs
from onnxprune.testing import model_from_text, set_initializer

RESIDUAL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,6,6] x, float[8,4,3,3] w1, float[8,8,1,1] w2, float[6,8,3,3] w3, float[6,5] w4)
    => (float[1,5] y) {
    a = Conv<pads = [1, 1, 1, 1]>(x, w1)
    r = Relu(a)
    b = Conv(r, w2)
    s = Add(b, r)
    t = Relu(s)
    c = Conv<pads = [1, 1, 1, 1]>(t, w3)
    p = GlobalAveragePool(c)
    f = Flatten(p)
    y = MatMul(f, w4)
}
"""


def residual_model() -> ir.Model:
    rng = np.random.default_rng(0)
    shapes = {"w1": (8, 4, 3, 3), "w2": (8, 8, 1, 1), "w3": (6, 8, 3, 3), "w4": (6, 5)}
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    return model_from_text(RESIDUAL, weights)


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_stage_inputs_equal_full_model_runs_as_weights_change(budget: int) -> None:
    model = residual_model()
    reference = copy_model(model)
    layers, _ = find_layers(model)
    groups = stages(model, layers)
    assert [[x.weight for x in g] for g in groups] == [["w1"], ["w2"], ["w3"], ["w4"]]
    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(5)]
    runner = StageInputs(model, reference, groups, lambda: iter(data), budget=budget)
    for step, group in enumerate(groups):
        names = [x.activation for x in group]
        got = list(runner.pairs(step))
        want_mine = list(iter_intermediates(model, names, data))
        want_ref = list(iter_intermediates(reference, names, data))
        assert len(got) == len(data)
        # From the second stage on the sparsified side has moved away from the dense one.
        moved = any(not np.allclose(m[n], r[n]) for m, r in got for n in names)
        assert moved == (step > 0)
        for (mine, ref), wm, wr in zip(got, want_mine, want_ref, strict=True):
            for name in names:
                np.testing.assert_allclose(mine[name], wm[name], rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(ref[name], wr[name], rtol=1e-5, atol=1e-5)
        for layer in group:  # "prune": change the stage's weights in place
            w = model.graph.initializers[layer.weight].const_value.numpy()
            set_initializer(model, layer.weight, np.where(np.abs(w) > 0.5, w, 0).astype(w.dtype))
        runner.pruned(step)
    if budget:
        assert runner.peak_bytes > 0


BRANCHED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x, bool c, float[4,6] w1, float[6,3] w2) => (float[2,3] y) {
    h = MatMul(x, w1)
    r = Relu(h)
    t = If(c) <
        then_branch = g1 () => (float[2,6] o1) { o1 = Identity(r) },
        else_branch = g2 () => (float[2,6] o2) { o2 = Neg(r) }
    >
    y = MatMul(t, w2)
}
"""


def test_stage_inputs_through_a_subgraph_reading_an_outer_value() -> None:
    """The second stage's input comes out of an If whose branches read the first stage's
    output: the cut model must carry that outer-scope read."""
    rng = np.random.default_rng(2)
    weights = {"w1": rng.standard_normal((4, 6)), "w2": rng.standard_normal((6, 3))}
    model = model_from_text(BRANCHED, {k: v.astype(np.float32) for k, v in weights.items()})
    reference = copy_model(model)
    layers, _ = find_layers(model)
    groups = stages(model, layers)
    assert [[x.weight for x in g] for g in groups] == [["w1"], ["w2"]]
    data = [
        {"x": rng.standard_normal((2, 4)).astype(np.float32), "c": np.array(i % 2 == 0)}
        for i in range(4)
    ]
    runner = StageInputs(model, reference, groups, lambda: iter(data))
    list(runner.pairs(0))
    set_initializer(model, "w1", np.zeros((4, 6), np.float32))
    runner.pruned(0)
    for (mine, ref), want, want_ref in zip(
        runner.pairs(1),
        iter_intermediates(model, ["t"], data),
        iter_intermediates(reference, ["t"], data),
        strict=True,
    ):
        np.testing.assert_allclose(mine["t"], want["t"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ref["t"], want_ref["t"], rtol=1e-6, atol=1e-6)
        assert not mine["t"].any() and ref["t"].any()
