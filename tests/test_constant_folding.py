"""FoldConstantsPass: structure, report, onnxruntime numerics, idempotence, checker."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxprune.passes.base import PassReport
from onnxprune.passes.cleanup import RemoveDeadNodesPass, RemoveUnusedInitializersPass
from onnxprune.passes.constant_folding import FoldConstantsPass
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text, random_feeds

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def op_counts(model: ir.Model) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph))


def check_pass(
    model: ir.Model, dims: dict[str, int] | None = None, **kwargs: object
) -> tuple[PassReport, ir.Model]:
    """Run the pass; assert exact numerics, idempotence and the checker; return the report."""
    original = ir.serde.serialize_model(model)
    report = FoldConstantsPass(**kwargs)(model)  # type: ignore[arg-type]
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = random_feeds(model, dims=dims)
    ref, got = run_model(original, feeds), run_model(proto, feeds)
    assert list(ref) == list(got)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name])
    again = FoldConstantsPass(**kwargs)(model)  # type: ignore[arg-type]
    assert again.changes == []
    return report, model


def changes(report: PassReport) -> list[tuple[str, str]]:
    return [(c.node, c.what) for c in report.changes]


def skips(report: PassReport) -> list[tuple[str, str]]:
    return [(s.node, s.reason) for s in report.skips]


def test_arith_on_initializers_and_constants_folds() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[2,3] x, float[3] a) => (float[2,3] y) {
          b = Constant<value = float[3] {1, 2, 3}>()
          s = Add(a, b)
          t = Mul(s, s)
          y = Add(x, t)
        }""",
        {"a": np.array([0.5, -1.0, 2.0], np.float32)},
    )
    report, model = check_pass(model)
    assert changes(report) == [
        ("Constant(b)", "Constant lifted to initializer"),
        ("Add(s)", "folded Add to constant of shape [3]"),
        ("Mul(t)", "folded Mul to constant of shape [3]"),
    ]
    assert skips(report) == []
    assert op_counts(model) == {"Add": 1}
    np.testing.assert_array_equal(
        model.graph.initializers["t"].const_value.numpy(), np.array([2.25, 1.0, 25.0], np.float32)
    )


def test_static_shape_chain_makes_reshape_target_constant() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[2,3,4] x) => (float[2,12] y) {
          s = Shape(x)
          i = Constant<value = int64[1] {1}>()
          j = Constant<value = int64[1] {2}>()
          a = Gather<axis=0>(s, i)
          b = Gather<axis=0>(s, j)
          p = Mul(a, b)
          s0 = Slice(s, z, i)
          z = Constant<value = int64[1] {0}>()
          t = Concat<axis=0>(s0, p)
          y = Reshape(x, t)
        }""".replace(
            "          s0 = Slice(s, z, i)\n          z = Constant<value = int64[1] {0}>()\n",
            "          z = Constant<value = int64[1] {0}>()\n          s0 = Slice(s, z, i)\n",
        )
    )
    report, model = check_pass(model)
    assert ("Shape(s)", "folded static shape computation to [2, 3, 4]") in changes(report)
    assert ("Concat(t)", "folded Concat to constant of shape [2]") in changes(report)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    target = reshape.inputs[1]
    assert target.is_initializer()
    np.testing.assert_array_equal(target.const_value.numpy(), [2, 12])
    assert op_counts(model) == {"Reshape": 1}


def torch_flatten_text(batch: str = "N") -> str:
    return (
        HEADER
        + f"""
        g (float[{batch},3,4,5] x) => (float[{batch},60] y) {{
          s = Shape(x)
          i0 = Constant<value = int64 {{0}}>()
          n = Gather<axis=0>(s, i0)
          ax = Constant<value = int64[1] {{0}}>()
          nu = Unsqueeze(n, ax)
          m1 = Constant<value = int64[1] {{-1}}>()
          t = Concat<axis=0>(nu, m1)
          y = Reshape(x, t)
        }}"""
    )


def test_torch_flatten_with_symbolic_batch_becomes_zero_minus_one() -> None:
    model = model_from_text(torch_flatten_text())
    report, model = check_pass(model, dims={"N": 3})
    assert ("Reshape(y)", "Reshape target made constant [0, -1] (symbolic dims copied by 0)") in (
        changes(report)
    )
    assert skips(report) == [("Shape(s)", "'x' has symbolic dims at [0]; Shape is not constant")]
    RemoveDeadNodesPass()(model)
    RemoveUnusedInitializersPass()(model)
    assert op_counts(model) == {"Reshape": 1}
    assert [v.name for v in model.graph.initializers.values()] == ["t_const"]


def test_partial_shape_gather_of_static_dim_folds() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[N,3,H] x) => (int64[1] c, int64[2] nh) {
          s = Shape(x)
          i = Constant<value = int64[1] {1}>()
          c = Gather<axis=0>(s, i)
          k = Constant<value = int64[2] {0, 2}>()
          nh = Gather<axis=0>(s, k)
        }"""
    )
    report, model = check_pass(model, dims={"N": 2, "H": 5})
    assert ("Gather(c)", "folded static shape computation to [3]") in changes(report)
    assert ("Shape(s)", "'x' has symbolic dims at [0, 2]; Shape is not constant") in skips(report)
    # c is a graph output: it is kept as a Constant node with the same name.
    producer = model.graph.outputs[0].producer()
    assert producer is not None and producer.op_type == "Constant"
    assert model.graph.outputs[0].name == "c"
    assert op_counts(model) == {"Shape": 1, "Gather": 1, "Constant": 1}


def test_symbolic_target_not_of_reshaped_tensor_is_skipped() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[N,6] x, float[M,2] w) => (float[N,2,3] y) {
          s = Shape(w)
          i = Constant<value = int64[1] {0}>()
          m = Gather<axis=0>(s, i)
          r = Constant<value = int64[1] {3}>()
          q = Constant<value = int64[1] {-1}>()
          t = Concat<axis=0>(q, m, r)
          y = Reshape(x, t)
        }"""
    )
    report, _ = check_pass(model, dims={"N": 2, "M": 2})
    assert ("Reshape(y)", "target element 1 is symbolic dim 0 of 'w'; not made constant") in (
        skips(report)
    )


def test_allowzero_without_literal_zero_is_relaxed() -> None:
    model = model_from_text(
        torch_flatten_text().replace("Reshape(x, t)", "Reshape<allowzero=1>(x, t)")
    )
    report, model = check_pass(model, dims={"N": 2})
    assert (
        "Reshape(y)",
        "Reshape target made constant [0, -1] (symbolic dims copied by 0); "
        "allowzero=1 set to 0 (the target had no literal 0)",
    ) in changes(report)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert reshape.attributes["allowzero"].as_int() == 0


def test_allowzero_with_literal_zero_is_skipped() -> None:
    model = model_from_text(
        torch_flatten_text()
        .replace("{-1}>()", "{0}>()")
        .replace("Reshape(x, t)", "Reshape<allowzero=1>(x, t)")
    )
    report = FoldConstantsPass()(model)
    assert (
        "Reshape(y)",
        "allowzero=1 and the target has a literal 0; not made constant",
    ) in skips(report)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert not reshape.inputs[1].is_initializer()


def test_single_foreign_symbolic_dim_becomes_minus_one() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[N,6] x, float[M,2] w) => (float[M,3] y) {
          s = Shape(w)
          i = Constant<value = int64[1] {0}>()
          m = Gather<axis=0>(s, i)
          r = Constant<value = int64[1] {3}>()
          t = Concat<axis=0>(m, r)
          y = Reshape(x, t)
        }"""
    )
    report, model = check_pass(model, dims={"N": 2, "M": 4})
    assert ("Reshape(y)", "Reshape target made constant [-1, 3] (symbolic dims copied by 0)") in (
        changes(report)
    )


@pytest.mark.parametrize(
    ("limit", "expect_fold"),
    [({}, True), ({"growth_floor_elements": 10}, False), ({"max_elements": 10}, False)],
)
def test_constant_of_shape_size_limits(limit: dict[str, int], expect_fold: bool) -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[4,8] x) => (float[4,8] y) {
          shp = Constant<value = int64[2] {4, 8}>()
          z = ConstantOfShape<value = float[1] {1.5}>(shp)
          y = Add(x, z)
        }"""
    )
    report, model = check_pass(model, **limit)
    folded = ("ConstantOfShape(z)", "folded ConstantOfShape to constant of shape [4, 8]")
    assert (folded in changes(report)) is expect_fold
    if expect_fold:
        assert "ConstantOfShape" not in op_counts(model)
        return
    reason = (
        "result would grow constants from 16 to 128 bytes (> 2x)"
        if "growth_floor_elements" in limit
        else "result would have 32 elements (> 10) and be bigger than its inputs (128 > 16 bytes)"
    )
    assert skips(report) == [("ConstantOfShape(z)", reason)]
    assert op_counts(model) == {"ConstantOfShape": 1, "Add": 1}


def test_large_expand_is_not_materialised() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[1000,2000] x) => (float[1000,2000] y) {
          one = Constant<value = float[1] {2}>()
          shp = Constant<value = int64[2] {1000, 2000}>()
          e = Expand(one, shp)
          y = Mul(x, e)
        }"""
    )
    report = FoldConstantsPass()(model)
    assert skips(report) == [
        (
            "Expand(e)",
            "result would have 2000000 elements (> 1000000) and be bigger than its inputs "
            "(8000000 > 20 bytes)",
        )
    ]
    assert op_counts(model) == {"Expand": 1, "Mul": 1}


def test_random_ops_and_custom_domains_are_skipped() -> None:
    model = model_from_text(
        '<ir_version: 8, opset_import: ["" : 17, "custom" : 1]>\n'
        + """
        g (float[2] x) => (float[2] y, float[2] r) {
          c = Constant<value = float[2] {1, 2}>()
          k = custom.Scale(c)
          r = RandomNormal<shape = [2]>()
          y = Add(x, k)
        }"""
    )
    report = FoldConstantsPass()(model)
    assert skips(report) == [
        ("Scale(k)", "op in non-default domain 'custom' is not evaluated"),
        ("RandomNormal(r)", "RandomNormal is nondeterministic"),
    ]
    assert changes(report) == [("Constant(c)", "Constant lifted to initializer")]
    assert FoldConstantsPass()(model).changes == []


def test_if_node_is_left_alone() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[2] x) => (float[2] y) {
          c = Constant<value = bool {1}>()
          y = If(c) <
            then_branch = t () => (float[2] a) { a = Identity(x) },
            else_branch = e () => (float[2] b) { b = Neg(x) }
          >
        }"""
    )
    report, model = check_pass(model)
    assert skips(report) == [("If(y)", "If has subgraphs; subgraph bodies are left alone")]
    assert op_counts(model) == {"If": 1}


def test_fold_failure_is_a_skip() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[2] x) => (float[2] y) {
          a = Constant<value = float[2] {1, 2}>()
          b = Constant<value = float[3] {1, 2, 3}>()
          c = Add(a, b)
          y = Add(x, c)
        }"""
    )
    report = FoldConstantsPass(infer_shapes=False)(model)
    assert len(report.skips) == 1
    assert report.skips[0].node == "Add(c)"
    assert report.skips[0].reason.startswith("onnxruntime could not evaluate it: ")


def test_initializer_that_is_graph_input_is_not_constant() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[3] x, float[3] a) => (float[3] y) {
          d = Mul(a, a)
          y = Add(x, d)
        }""",
    )
    a = next(v for v in model.graph.inputs if v.name == "a")
    a.const_value = ir.tensor(np.ones(3, np.float32))
    model.graph.register_initializer(a)  # overridable default: still a graph input
    report = FoldConstantsPass()(model)
    assert report.changes == []
    assert op_counts(model) == {"Mul": 1, "Add": 1}


@pytest.mark.parametrize(
    ("body", "op"),
    [
        ("r = Range(s0, s5, s1)\n c = Cast<to = 1>(r)", "Range"),
        ("e = Equal(s0, s1)\n c = Where(e, f2, f3)", "Where"),
        ("q = Size(x)\n c = Cast<to = 1>(q)", "Cast"),
        ("u = Unsqueeze(f2, ax)\n c = Squeeze(u, ax)", "Squeeze"),
    ],
)
def test_simple_constant_ops_fold(body: str, op: str) -> None:
    model = model_from_text(
        HEADER
        + f"""
        g (float[2,3] x) => (float[2,3] y) {{
          s0 = Constant<value = int64 {{0}}>()
          s1 = Constant<value = int64 {{1}}>()
          s5 = Constant<value = int64 {{3}}>()
          f2 = Constant<value = float {{2}}>()
          f3 = Constant<value = float {{3}}>()
          ax = Constant<value = int64[1] {{0}}>()
          {body}
          y = Add(x, c)
        }}"""
    )
    report, model = check_pass(model)
    assert any(node.startswith(f"{op}(") for node, _ in changes(report))
    assert op_counts(model) == {"Add": 1}
