"""Cleanup passes: dead nodes, unused/duplicate initializers, topological sort."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.passes.base import Pass, PassReport
from onnxprune.passes.cleanup import (
    DeduplicateInitializersPass,
    RemoveDeadNodesPass,
    RemoveUnusedInitializersPass,
    TopologicalSortPass,
)
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text, random_feeds

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def op_counts(model: ir.Model) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph))


def run_checked(pass_: Pass, model: ir.Model) -> PassReport:
    """Run ``pass_``; assert bit-exact outputs, idempotence and the checker."""
    original = ir.serde.serialize_model(model)
    report = pass_(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = random_feeds(model)
    ref, got = run_model(original, feeds), run_model(proto, feeds)
    assert list(ref) == list(got)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name])
    assert pass_(model).changes == []
    return report


def changes(report: PassReport) -> list[tuple[str, str]]:
    return [(c.node, c.what) for c in report.changes]


def skips(report: PassReport) -> list[tuple[str, str]]:
    return [(s.node, s.reason) for s in report.skips]


def test_dead_chain_removed_live_kept() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[2,3] x) => (float[2,3] y) {
          d1 = Neg(x)
          d2 = Exp(d1)
          y = Relu(x)
          d3 = Add(d2, y)
        }"""
    )
    report = run_checked(RemoveDeadNodesPass(), model)
    assert changes(report) == [
        ("Neg(d1)", "removed dead Neg"),
        ("Exp(d2)", "removed dead Exp"),
        ("Add(d3)", "removed dead Add"),
    ]
    assert op_counts(model) == {"Relu": 1}
    assert report.before["nodes"] == 4 and report.after["nodes"] == 1


def test_values_read_inside_subgraph_keep_their_producers() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[2] x, bool c) => (float[2] y) {
          n = Neg(x)
          dead = Exp(x)
          y = If(c) <
            then_branch = t () => (float[2] a) { a = Identity(n) },
            else_branch = e () => (float[2] b) { b = Abs(n) }
          >
        }"""
    )
    report = RemoveDeadNodesPass()(model)
    assert changes(report) == [("Exp(dead)", "removed dead Exp")]
    assert op_counts(model) == {"Neg": 1, "If": 1}
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_dead_if_reading_dead_value_is_removed() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[2] x, bool c) => (float[2] y) {
          n = Neg(x)
          z = If(c) <
            then_branch = t () => (float[2] a) { a = Identity(n) },
            else_branch = e () => (float[2] b) { b = Abs(n) }
          >
          y = Relu(x)
        }"""
    )
    report = run_checked(RemoveDeadNodesPass(), model)
    assert changes(report) == [("Neg(n)", "removed dead Neg"), ("If(z)", "removed dead If")]
    assert op_counts(model) == {"Relu": 1}


def test_unused_initializers_removed_graph_input_default_kept() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[3] x, float[3] w, float[3] u) => (float[3] y) {
          y = Add(x, w)
        }""",
        {"w": np.ones(3, np.float32), "u": np.zeros(3, np.float32)},
    )
    # An overridable default (initializer that is also a graph input), unused.
    d = ir.Value(name="d", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.FLOAT))
    d.const_value = ir.tensor(np.ones(3, np.float32))
    model.graph.inputs.append(d)
    model.graph.register_initializer(d)
    report = RemoveUnusedInitializersPass()(model)
    assert changes(report) == [("u", "removed unused initializer")]
    assert skips(report) == [("d", "unused, but it is a graph input (part of the interface)")]
    assert sorted(model.graph.initializers) == ["d", "w"]
    assert RemoveUnusedInitializersPass()(model).changes == []
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_duplicate_initializers_merged_by_bytes() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 3)).astype(np.float32)
    other = w.copy()
    other[0, 0] += 1.0
    model = model_from_text(
        HEADER
        + """
        g (float[2,3] x, float[3,3] w1, float[3,3] w2, float[3,3] w3, int32[3,3] w4)
          => (float[2,3] y) {
          a = MatMul(x, w1)
          b = MatMul(a, w2)
          c = MatMul(b, w3)
          k = Cast<to = 1>(w4)
          y = MatMul(c, k)
        }""",
        {"w1": w, "w2": w.copy(), "w3": other, "w4": w.view(np.int32)},
    )
    report = run_checked(DeduplicateInitializersPass(), model)
    # Same bytes as w1 but int32: a different tensor, kept.
    assert changes(report) == [("w2", "duplicate of 'w1'; readers now use it")]
    assert skips(report) == []
    assert sorted(model.graph.initializers) == ["w1", "w3", "w4"]
    second = next(n for n in model.graph if n.outputs[0].name == "b")
    assert second.inputs[1].name == "w1"


def test_duplicate_graph_output_initializer_left_alone() -> None:
    model = model_from_text(
        HEADER + "g (float[3] x, float[3] w1, float[3] w2) => (float[3] y, float[3] w2) {\n"
        " y = Add(x, w1)\n}",
        {"w1": np.ones(3, np.float32), "w2": np.ones(3, np.float32)},
    )
    report = DeduplicateInitializersPass()(model)
    assert changes(report) == []
    assert skips(report) == [("w2", "identical to another initializer but is a graph output")]


def test_topological_sort_is_stable_and_reports() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[2] x) => (float[2] y) {
          a = Neg(x)
          b = Abs(x)
          y = Add(a, b)
        }"""
    )
    graph = model.graph
    add = next(n for n in graph if n.op_type == "Add")
    graph.remove(add)
    graph.insert_before(next(iter(graph)), add)  # Add first: not a valid order
    report = TopologicalSortPass()(model)
    assert changes(report) == [("g", "reordered 3 node positions")]
    assert [n.op_type for n in graph] == ["Neg", "Abs", "Add"]
    assert TopologicalSortPass()(model).changes == []
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_dead_nodes_pass_leaves_live_nodes_alone() -> None:
    # Why not onnx-ir's RemoveUnusedNodesPass: it would also drop the unused initializer u and
    # Dropout's unused mask output; here only the dead Neg goes.
    model = model_from_text(
        HEADER
        + """
        g (float[2,3] x, float[3] u) => (float[2,3] y) {
          y, mask = Dropout(x)
          d = Neg(x)
        }""",
        {"u": np.ones(3, np.float32)},
    )
    report = run_checked(RemoveDeadNodesPass(), model)
    assert changes(report) == [("Neg(d)", "removed dead Neg")]
    (dropout,) = model.graph
    assert [v.name for v in dropout.outputs] == ["y", "mask"]
    assert list(model.graph.initializers) == ["u"]


def _reverse(graph: ir.Graph | ir.Function) -> None:
    """Put the nodes of ``graph`` in reverse order (not a valid order when they chain)."""
    nodes = list(graph)
    graph.remove(nodes)
    graph.extend(reversed(nodes))


def test_topological_sort_covers_subgraphs_and_functions() -> None:
    model = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2] x, bool c) => (float[2] y) {
          f = local.f(x)
          y = If(c) <
            then_branch = t () => (float[2] a) { n = Neg(f)  a = Abs(n) },
            else_branch = e () => (float[2] b) { b = Identity(f) }
          >
        }
        <domain: "local", opset_import: ["" : 17]>
        f (i) => (o) {
          t = Abs(i)
          o = Neg(t)
        }"""
    )
    sorted_proto = ir.serde.serialize_model(model)
    then_branch = next(n for n in model.graph if n.op_type == "If").attributes["then_branch"]
    _reverse(then_branch.as_graph())
    _reverse(next(iter(model.functions.values())))
    report = TopologicalSortPass()(model)
    # Two positions in the If branch and two in the function body.
    assert changes(report) == [("g", "reordered 4 node positions")]
    assert ir.serde.serialize_model(model) == sorted_proto
    assert TopologicalSortPass()(model).changes == []
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
