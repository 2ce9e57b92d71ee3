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

from onnxprune.analysis.run_shapes import refine_symbolic_dims
from onnxprune.io import load
from onnxprune.io.pinned import copy_model
from onnxprune.passes.pipeline import canonicalize
from onnxprune.prune import PruneOptions, analyze, prune_model
from onnxprune.prune import analysis as analysis_module
from onnxprune.runtime import run_model

EMBED, HEADS, DEAD = 16, 4, 1


def _dead_head_attention(*, expand_mask: bool):
    """q/k/v/o attention through ``scaled_dot_product_attention`` whose head DEAD has zero
    weights; ``expand_mask`` writes the mask and head split as HF BERT's torchscript path
    does (explicit sizes, mask expanded to ``(b, 1, s, s)``), else as its dynamo path."""
    torch = pytest.importorskip("torch")

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(EMBED, EMBED) for _ in range(4))

        def forward(self, x, mask):
            b, s, _ = x.shape
            heads = HEADS if expand_mask else -1

            def split(t):
                return t.view(b, s, heads, EMBED // HEADS).transpose(1, 2)

            keep = mask[:, None, None, :]
            keep = (keep.expand(b, 1, s, s) if expand_mask else keep).to(torch.bool)
            y = torch.nn.functional.scaled_dot_product_attention(
                split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=keep
            )
            return self.o(y.transpose(1, 2).reshape(b, s, EMBED))

    torch.manual_seed(0)
    module = Attention().eval()
    width = EMBED // HEADS
    dead = slice(DEAD * width, (DEAD + 1) * width)
    with torch.no_grad():
        for layer in (module.q, module.k, module.v):
            layer.weight[dead] = 0
            layer.bias[dead] = 0
        module.o.weight[:, dead] = 0
    return module, (torch.randn(2, 5, EMBED), torch.ones(2, 5, dtype=torch.int64))


def _export(path: Path) -> ir.Model:
    torch = pytest.importorskip("torch")
    module, example = _dead_head_attention(expand_mask=False)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dims = {0: batch, 1: seq}
    torch.onnx.export(module, example, str(path), dynamo=True, dynamic_shapes=(dims, dims))
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


def _torchscript_export(path: Path) -> ir.Model:
    """Exported by torchscript with dynamic axes (the way HF Optimum exports BERT): the
    mask's head axis and the head reshapes come out of shape inference as fresh symbols."""
    torch = pytest.importorskip("torch")
    module, example = _dead_head_attention(expand_mask=True)
    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(
        module,
        example,
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x", "mask"],
        output_names=["y"],
        dynamic_axes={"x": axes, "mask": axes, "y": axes},
    )
    model = load(path)
    canonicalize(model)
    return model


def test_torchscript_attention_heads_need_the_measured_dims(tmp_path: Path, monkeypatch):
    model = _torchscript_export(tmp_path / "ts.onnx")
    heads = [g for g in analyze(model).prunable if g.size == HEADS]
    assert len(heads) == 1, [(g.id, g.size, g.blocked) for g in analyze(model).groups]
    reference = copy_model(model)
    prune_model(model, PruneOptions(layer_ratios={heads[0].id: 0.25}, round_to=1))
    rng = np.random.default_rng(4)
    for batch, seq in ((1, 5), (3, 8)):
        mask = np.ones((batch, seq), np.int64)
        mask[-1, -2:] = 0
        feed = {"x": rng.standard_normal((batch, seq, EMBED), np.float32), "mask": mask}
        np.testing.assert_allclose(
            run_model(model, feed)["y"], run_model(reference, feed)["y"], rtol=1e-5, atol=1e-6
        )
    # Without the measured dims the mask's head axis is a symbol of unknown size.
    monkeypatch.setattr(analysis_module, "refine_symbolic_dims", lambda _m, shapes: dict(shapes))
    blocked = analyze(reference).group(heads[0].id).blocked
    assert blocked is not None and "unknown size" in blocked.reason


def test_measured_dims_name_sizes_that_change_alike():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("ReduceProd", ["shape"], ["count"], keepdims=1),
        helper.make_node("Reshape", ["x", "count"], ["flat"]),  # (b*s*4,): a fresh symbol
        helper.make_node("Identity", ["flat"], ["y"]),
    ]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)]
    )
    model = ir.serde.deserialize_model(proto)
    shapes = {"x": ("b", "s", 4), "flat": ("unk__0",), "y": ("unk__1",), "shape": (3,)}
    refined = refine_symbolic_dims(model, shapes)
    # b, s = 2, 5 then 3, 7 then 25, 57: 40, 84 and 5700 elements, one symbol for both.
    assert refined["flat"] == refined["y"] == ("dim_40_84_5700",)
    assert refined["x"] == ("b", "s", 4) and refined["shape"] == (3,)


def _graph(nodes, inputs, outputs, inits) -> ir.Model:
    proto = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _floats(name: str, array: np.ndarray) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, list(array.shape), array.ravel().tolist())


def test_sizes_read_in_another_order_block_the_axes():
    """(B, 5, 6) reshaped to (B, 6, 5) with Gather(Shape(x), [0, 2, 1]) is a view, not a
    transpose: the 6 channels are not the reshape's axis 1 (found by review: it was pruned
    and the outputs changed)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["x"]),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Gather", ["xs", "order"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["yt", "W2"], ["out"]),
    ]
    inits = [
        _floats("W1", rng.standard_normal((4, 6)).astype(np.float32)),
        _floats("W2", rng.standard_normal((6, 3)).astype(np.float32)),
        _ints("order", [0, 2, 1]),
    ]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", 5, 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 5, 3])
    group = analyze(_graph(nodes, [x], [out], inits)).group("W1:1")
    assert group.blocked is not None


def test_a_constant_shared_by_two_targets_blocks_unless_both_are_cut_alike():
    """One Concat(Shape(x)[:2], [2, 4]) target reshapes two independent projections: cutting
    one branch's heads would rewrite the other's target too (found by review)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Slice", ["xs", "zero", "two"], ["bs"]),
        helper.make_node("Concat", ["bs", "heads"], ["split"], axis=0),
        helper.make_node("Concat", ["bs", "width"], ["merge"], axis=0),
    ]
    inits = [_ints("zero", [0]), _ints("two", [2]), _ints("heads", [2, 4]), _ints("width", [8])]
    for i in range(2):
        nodes += [
            helper.make_node("MatMul", ["x", f"Wa{i}"], [f"h{i}"]),
            helper.make_node("Reshape", [f"h{i}", "split"], [f"p{i}"]),
            helper.make_node("Relu", [f"p{i}"], [f"a{i}"]),
            helper.make_node("Reshape", [f"a{i}", "merge"], [f"b{i}"]),
            helper.make_node("MatMul", [f"b{i}", f"Wb{i}"], [f"y{i}"]),
        ]
        inits += [
            _floats(f"Wa{i}", rng.standard_normal((8, 8)).astype(np.float32)),
            _floats(f"Wb{i}", rng.standard_normal((8, 3)).astype(np.float32)),
        ]
    nodes.append(helper.make_node("Add", ["y0", "y1"], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 3])
    analysis = analyze(_graph(nodes, [x], [y], inits))
    for i in range(2):
        group = analysis.group(f"Wa{i}:1")
        assert group.blocked is not None and "constant size" in group.blocked.reason
