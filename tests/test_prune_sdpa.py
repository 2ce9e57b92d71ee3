"""Head pruning of attention as torch's dynamo exporter writes ``scaled_dot_product_attention``
with dynamic batch and sequence axes (issue 17 item 4; HF BERT/MiniLM exports look like this).

The keys are reshaped ``(batch, heads, seq, d) -> (batch*heads, seq, d)`` with a target read
from their own ``Shape``, transposed, and split back. The head axis then lives in a symbolic
``batch*heads`` axis (a periodic channel space) and its size travels through a runtime
shape vector (followed by :mod:`onnxprune.prune.shape_flow`). A head whose weights are zero
contributes nothing, so removing it must leave the outputs unchanged for any batch and
sequence length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxprune.io import load
from onnxprune.io.pinned import copy_model
from onnxprune.prune import PruneOptions, analyze, prune_model
from onnxprune.runtime import run_model

EMBED, HEADS, DEAD = 16, 4, 1


def _export(path: Path) -> ir.Model:
    torch = pytest.importorskip("torch")

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(EMBED, EMBED) for _ in range(4))

        def forward(self, x, mask):
            b, s, _ = x.shape

            def split(t):
                return t.view(b, s, -1, EMBED // HEADS).transpose(1, 2)

            keep = mask[:, None, None, :].to(torch.bool)
            y = torch.nn.functional.scaled_dot_product_attention(
                split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=keep
            )
            return self.o(y.transpose(1, 2).reshape(b, s, -1))

    torch.manual_seed(0)
    module = Attention().eval()
    width = EMBED // HEADS
    dead = slice(DEAD * width, (DEAD + 1) * width)
    with torch.no_grad():
        for layer in (module.q, module.k, module.v):
            layer.weight[dead] = 0
            layer.bias[dead] = 0
        module.o.weight[:, dead] = 0
    x, mask = torch.randn(2, 5, EMBED), torch.ones(2, 5, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dims = {0: batch, 1: seq}
    torch.onnx.export(module, (x, mask), str(path), dynamo=True, dynamic_shapes=(dims, dims))
    return load(path)


def test_dynamo_sdpa_head_is_removed_exactly(tmp_path: Path):
    model = _export(tmp_path / "sdpa.onnx")
    assert any(n.op_type == "Shape" for n in model.graph)  # the pattern this test is about
    heads = [g for g in analyze(model).prunable if g.size == HEADS]
    assert len(heads) == 1, [(g.id, g.size, g.blocked) for g in analyze(model).groups]
    reference = copy_model(model)
    report = prune_model(model, PruneOptions(layer_ratios={heads[0].id: 0.25}, round_to=1))
    width = EMBED // HEADS  # a head's first column on the anchor axis names it in the plan
    assert report.plan.keep[heads[0].id] == [h * width for h in range(HEADS) if h != DEAD]
    kept = EMBED - width
    shapes = [tuple(v.const_value.shape) for v in model.graph.initializers.values()]
    assert shapes.count((EMBED, kept)) == 3 and shapes.count((kept, EMBED)) == 1  # q, k, v; o
    rng = np.random.default_rng(1)
    for batch, seq in ((1, 5), (2, 7), (3, 3)):
        mask = np.ones((batch, seq), np.int64)
        mask[0, -1] = 0
        feed = {"x": rng.standard_normal((batch, seq, EMBED), np.float32), "mask": mask}
        want, got = run_model(reference, feed), run_model(model, feed)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)


def _shape_read_model(use: str) -> ir.Model:
    """x (b, 8) @ W1 -> h; Shape(h)[1] either reshapes another tensor back to h's width or
    scales h (arithmetic on the size); h @ W2 -> y."""
    rng = np.random.default_rng(0)
    inits = [
        helper.make_tensor("W1", TensorProto.FLOAT, [8, 8], rng.standard_normal(64).tolist()),
        helper.make_tensor("W2", TensorProto.FLOAT, [8, 3], rng.standard_normal(24).tolist()),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("two", TensorProto.INT64, [1], [2]),
        helper.make_tensor("minus", TensorProto.INT64, [1], [-1]),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Shape", ["h"], ["hs"]),
        helper.make_node("Slice", ["hs", "one", "two"], ["width"]),
    ]
    if use == "reshape":
        nodes += [
            helper.make_node("Concat", ["minus", "width"], ["target"], axis=0),
            helper.make_node("Reshape", ["h", "target"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["y"]),
        ]
    else:
        nodes += [
            helper.make_node("Cast", ["width"], ["wf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["h", "wf"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def test_shape_read_into_a_reshape_target_does_not_block():
    model = _shape_read_model("reshape")
    group = analyze(model).group("W1:1")
    assert group.blocked is None, group.blocked
    reference = copy_model(model)
    prune_model(model, PruneOptions(layer_ratios={"W1:1": 0.25}, round_to=1))
    assert model.graph.initializers["W1"].const_value.shape == (8, 6)
    feed = {"x": np.random.default_rng(2).standard_normal((4, 8), np.float32)}
    got, want = run_model(model, feed)["y"], run_model(reference, feed)["y"]
    assert got.shape == want.shape and not np.allclose(got, want)  # pruned, and it runs


def test_shape_read_into_arithmetic_blocks_with_the_node():
    group = analyze(_shape_read_model("mul")).group("W1:1")
    assert group.blocked is not None
    assert "Mul computes with the size of this axis" in group.blocked.reason


def _computed_target_model() -> ir.Model:
    """x (b, s, 8) @ W1 -> h, viewed as (b, s, 2 heads, 4) with a target concatenated from
    Shape(h)[:2] and the constants (2, 4), back to (b, s, 8) the same way, @ W2 -> y: how
    torchscript writes ``view(b, s, heads, d)`` with dynamic axes."""
    rng = np.random.default_rng(0)
    inits = [
        helper.make_tensor("W1", TensorProto.FLOAT, [8, 8], rng.standard_normal(64).tolist()),
        helper.make_tensor("W2", TensorProto.FLOAT, [8, 3], rng.standard_normal(24).tolist()),
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("two", TensorProto.INT64, [1], [2]),
        helper.make_tensor("heads", TensorProto.INT64, [2], [2, 4]),
        helper.make_tensor("width", TensorProto.INT64, [1], [8]),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Shape", ["h"], ["hs"]),
        helper.make_node("Slice", ["hs", "zero", "two"], ["bs"]),
        helper.make_node("Concat", ["bs", "heads"], ["split"], axis=0),
        helper.make_node("Reshape", ["h", "split"], ["per_head"]),
        helper.make_node("Relu", ["per_head"], ["act"]),
        helper.make_node("Concat", ["bs", "width"], ["merge"], axis=0),
        helper.make_node("Reshape", ["act", "merge"], ["back"]),
        helper.make_node("MatMul", ["back", "W2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 3])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def test_constants_in_a_computed_target_follow_the_cut():
    model = _computed_target_model()
    w1 = model.graph.initializers["W1"].const_value.numpy().copy()
    w1[:, 4:] = 0  # head 1 is dead: removing it must not change y
    model.graph.initializers["W1"].const_value = ir.tensor(w1, name="W1")
    groups = [g for g in analyze(model).prunable if "W1" in {k for k, _ in g.initializers}]
    assert len(groups) == 1 and groups[0].size == 2, [(g.id, g.blocked) for g in groups]
    reference = copy_model(model)
    prune_model(model, PruneOptions(layer_ratios={groups[0].id: 0.5}, round_to=1))
    assert model.graph.initializers["W1"].const_value.shape == (8, 4)
    rng = np.random.default_rng(3)
    for batch, seq in ((1, 2), (3, 5)):
        feed = {"x": rng.standard_normal((batch, seq, 8), np.float32)}
        np.testing.assert_allclose(
            run_model(model, feed)["y"], run_model(reference, feed)["y"], rtol=1e-5, atol=1e-6
        )


def test_a_target_computed_by_arithmetic_blocks_the_axes_it_sizes():
    model = _computed_target_model()
    node = next(n for n in model.graph if n.op_type == "Reshape")
    # Route the split target through an Add of zero: its entries are no longer followed.
    zeros = ir.Value(name="zeros4", const_value=ir.tensor(np.zeros(4, np.int64), name="zeros4"))
    model.graph.register_initializer(zeros)
    add = ir.node("Add", inputs=[node.inputs[1], zeros])
    model.graph.insert_before(node, add)
    node.replace_input_with(1, add.outputs[0])
    # An exporter's recorded shape: the reshape still maps the head axis, only the target
    # is opaque (without this check the cut would leave the target's 2 in place).
    node.outputs[0].shape = ir.Shape(["b", "s", 2, 4])
    node.outputs[0].dtype = ir.DataType.FLOAT
    group = analyze(model).group("W1:1")
    assert group.blocked is not None and "computed at run time" in group.blocked.reason
