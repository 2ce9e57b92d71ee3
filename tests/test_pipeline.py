"""canonicalize(): fixed order to a fixed point, report, skipped and unknown passes."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxprune.passes as passes_pkg
from onnxprune.errors import UsageError
from onnxprune.passes import pipeline
from onnxprune.passes.base import Pass, PassReport
from onnxprune.passes.pipeline import PASS_NAMES, canonicalize
from onnxprune.runtime import make_session, run_model
from onnxprune.testing import model_from_text, random_feeds

LOCAL = [n for n in PASS_NAMES if n not in {"fold-batchnorm", "fold-affine", "fuse-activations"}]


def exporter_model() -> ir.Model:
    """Exporter-style graph: Identity, Dropout, torch flatten, Cast no-op, duplicate biases."""
    rng = np.random.default_rng(0)
    bias = rng.standard_normal(4).astype(np.float32)
    return model_from_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,4,5] x, float[60,4] w, float[4] b1, float[4] b2) => (float[N,4] y) {
          i = Identity(x)
          d = Dropout(i)
          s = Shape(d)
          k = Constant<value = int64 {0}>()
          n = Gather<axis=0>(s, k)
          ax = Constant<value = int64[1] {0}>()
          nu = Unsqueeze(n, ax)
          m1 = Constant<value = int64[1] {-1}>()
          t = Concat<axis=0>(nu, m1)
          f = Reshape(d, t)
          m = MatMul(f, w)
          a = Add(m, b1)
          r = Relu(a)
          c = Cast<to = 1>(r)
          y = Add(c, b2)
        }""",
        {"w": rng.standard_normal((60, 4)).astype(np.float32), "b1": bias, "b2": bias.copy()},
    )


def test_exporter_graph_becomes_minimal() -> None:
    model = exporter_model()
    original = ir.serde.serialize_model(model)
    report = canonicalize(model, passes=LOCAL)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in model.graph] == ["Reshape", "MatMul", "Add", "Relu", "Add"]
    assert {name: v.shape.numpy() for name, v in model.graph.initializers.items()} == {
        "w": (60, 4),
        "b1": (4,),
        "t_const": (2,),
    }
    np.testing.assert_array_equal(model.graph.initializers["t_const"].const_value.numpy(), [0, -1])
    out = model.graph.outputs[0]
    assert (out.name, out.dtype, str(out.shape)) == ("y", ir.DataType.FLOAT, "[N,4]")
    for batch in (1, 3):
        feeds = random_feeds(model, seed=batch, dims={"N": batch})
        np.testing.assert_array_equal(run_model(proto, feeds)["y"], run_model(original, feeds)["y"])
    assert report.converged and len(report.rounds) == 2
    by_pass = report.changes_by_pass()
    assert [c["what"] for c in by_pass["deduplicate-initializers"]] == [
        "duplicate of 'b1'; readers now use it"
    ]
    assert sorted(c["what"] for c in by_pass["eliminate-noops"]) == [
        "removed Cast to the same dtype FLOAT",
        "removed Dropout (inference)",
        "removed Identity",
    ]
    assert len(by_pass["remove-dead-nodes"]) == 4  # Shape, Gather, Unsqueeze, Concat
    assert report.before["nodes"] == 15 and report.after["nodes"] == 5


def test_second_run_changes_nothing() -> None:
    model = exporter_model()
    canonicalize(model)
    again = canonicalize(model)
    assert not again.modified
    assert again.converged and len(again.rounds) == 1


def test_default_pipeline_keeps_numerics() -> None:
    model = exporter_model()
    original = ir.serde.serialize_model(model)
    report = canonicalize(model)
    assert report.converged
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = random_feeds(model, dims={"N": 2})
    np.testing.assert_allclose(
        run_model(proto, feeds)["y"], run_model(original, feeds)["y"], rtol=1e-6, atol=1e-6
    )


def test_report_dict_and_summary() -> None:
    model = exporter_model()
    report = canonicalize(model, skip=["deduplicate-initializers"])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["skipped"] == ["deduplicate-initializers"]
    assert "deduplicate-initializers" not in data["passes"]
    assert data["iterations"] == len(report.rounds) and data["converged"] is True
    # The last round sees the final graph: the Shape chain is gone, nothing left to skip.
    assert data["skips"]["fold-constants"] == []
    summary = report.summary()
    assert summary.splitlines()[0] == f"canonicalize: {len(report.rounds)} round(s), converged"
    assert "  eliminate-noops: 3 change(s), 0 skip(s)" in summary
    assert "  deduplicate-initializers: skipped on request" in summary
    assert data["summary"] == summary
    assert len(model.graph.initializers) == 4  # b2 kept: dedup skipped


def test_unknown_pass_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"unknown pass 'fold-everything'; passes: fold-constants"):
        canonicalize(exporter_model(), skip=["fold-everything"])
    with pytest.raises(UsageError, match="max_iterations must be >= 1, got 0"):
        canonicalize(exporter_model(), max_iterations=0)


class _AlwaysChanges(Pass):
    name = "always"

    def run(self, model: ir.Model, report: PassReport) -> None:
        report.change("g", "pretend")


def test_iteration_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(pipeline._PASSES, "topological-sort", _AlwaysChanges)
    report = canonicalize(exporter_model(), passes=["topological-sort"], max_iterations=3)
    assert not report.converged and len(report.rounds) == 3
    assert "did NOT converge" in report.summary()
    counts = collections.Counter(c["what"] for c in report.changes_by_pass()["topological-sort"])
    assert counts == {"pretend": 3}


_CHAIN = {
    "identity": "{o} = Identity({i})",
    "dropout": "{o} = Dropout({i})",
    "cast": "{o} = Cast<to = 1>({i})",
    "flatten": "{o}_s = Shape({i})\n {o}_k = Constant<value = int64 {{0}}>()\n"
    " {o}_n = Gather<axis=0>({o}_s, {o}_k)\n {o}_a = Constant<value = int64[1] {{0}}>()\n"
    " {o}_u = Unsqueeze({o}_n, {o}_a)\n {o}_m = Constant<value = int64[1] {{-1}}>()\n"
    " {o}_t = Concat<axis=0>({o}_u, {o}_m)\n {o} = Reshape({i}, {o}_t)",
    "add_const": "{o}_c = Constant<value = float[3] {{1, 2, 3}}>()\n"
    " {o}_d = Mul({o}_c, {o}_c)\n {o} = Add({i}, {o}_d)",
    "relu": "{o} = Relu({i})",
}


@settings(max_examples=20, deadline=None)
@given(st.lists(st.sampled_from(sorted(_CHAIN)), min_size=1, max_size=5))
def test_random_chains_canonicalize_exactly(chain: list[str]) -> None:
    lines, prev = [], "x"
    for k, op in enumerate(chain):
        out = "y" if k == len(chain) - 1 else f"v{k}"
        lines.append(_CHAIN[op].format(o=out, i=prev))
        prev = out
    model = model_from_text(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N,3] x) => (float[N,3] y) {\n" + "\n".join(lines) + "\n}"
    )
    original = ir.serde.serialize_model(model)
    report = canonicalize(model, passes=LOCAL)
    assert report.converged
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = random_feeds(model, dims={"N": 2})
    np.testing.assert_array_equal(run_model(proto, feeds)["y"], run_model(original, feeds)["y"])
    counts = collections.Counter(n.op_type for n in model.graph)
    # Every no-op and constant subexpression is gone; a flatten on [N,3] is a no-op Reshape.
    real = chain.count("relu") + chain.count("add_const")
    assert sum(counts.values()) == max(real, 1)
    assert set(counts) <= {"Relu", "Add", "Identity"}
    assert len(model.graph.initializers) <= 1
    assert not canonicalize(model, passes=LOCAL).modified


def test_pass_names_run_order_and_package_exports() -> None:
    assert PASS_NAMES == (
        "fold-constants",
        "eliminate-noops",
        "fold-pad",
        "reduce-mean-to-pool",
        "fold-batchnorm",
        "fuse-activations",
        "fold-affine",
        "remove-dead-nodes",
        "remove-unused-initializers",
        "deduplicate-initializers",
        "topological-sort",
    )
    exported = {
        getattr(passes_pkg, n).name
        for n in passes_pkg.__all__
        if isinstance(getattr(passes_pkg, n), type)
        and issubclass(getattr(passes_pkg, n), Pass)
        and getattr(passes_pkg, n) is not Pass
    }
    assert exported == set(PASS_NAMES)


def residual_block_model() -> ir.Model:
    """Torchscript-style embedding + residual block: Add + Add + LayerNorm.

    The position embedding's length comes from ``Range(0, Shape(x)[1])``, which onnxruntime
    cannot infer, so it leaves Add + Add + LayerNormalization alone. ONNX data-propagating
    inference names that dim (``unk__0``) on every tensor downstream; saved as value_info, it
    lets onnxruntime fuse SkipLayerNormalization, a kernel measured several times slower on CPU.
    """
    rng = np.random.default_rng(0)
    return model_from_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[B,S,8] x, float[16,8] pos, float[8,8] w, float[8] b, float[8] gamma,
           float[8] beta) => (float[B,S,8] y) {
          s = Shape(x)
          i0 = Constant<value = int64 {0}>()
          i1 = Constant<value = int64 {1}>()
          n = Gather<axis=0>(s, i1)
          p = Range(i0, n, i1)
          e = Gather<axis=0>(pos, p)
          h = Add(x, e)
          m = MatMul(h, w)
          a = Add(m, b)
          k = Add(a, h)
          y = LayerNormalization<axis=-1>(k, gamma, beta)
        }""",
        {
            "pos": rng.standard_normal((16, 8)).astype(np.float32),
            "w": rng.standard_normal((8, 8)).astype(np.float32),
            "b": rng.standard_normal(8).astype(np.float32),
            "gamma": rng.uniform(0.5, 1.5, 8).astype(np.float32),
            "beta": rng.standard_normal(8).astype(np.float32),
        },
    )


def _intermediate_value_info(proto: onnx.ModelProto) -> set[str]:
    produced = {o for n in proto.graph.node for o in n.output}
    return {v.name for v in proto.graph.value_info if v.name in produced}


def _ort_optimized_ops(proto: onnx.ModelProto, tmp_path) -> collections.Counter[str]:
    path = tmp_path / "optimized.onnx"
    make_session(proto, optimize=True, optimized_model_path=str(path))
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def test_inferred_shapes_are_not_saved(tmp_path) -> None:
    model = residual_block_model()
    original = ir.serde.serialize_model(model)
    report = canonicalize(model)
    proto = ir.serde.serialize_model(model)
    assert report.changes_by_pass()["fold-constants"]  # Constants lifted to initializers
    assert report.annotations_restored > 0
    assert f"inferred shape annotations dropped: {report.annotations_restored}" in report.summary()
    assert _intermediate_value_info(proto) == set()
    # So onnxruntime makes the same fusion decisions on both: no SkipLayerNormalization.
    before, after = _ort_optimized_ops(original, tmp_path), _ort_optimized_ops(proto, tmp_path)
    assert before["SkipLayerNormalization"] == after["SkipLayerNormalization"] == 0
    assert after["LayerNormalization"] == before["LayerNormalization"] == 1
    feeds = random_feeds(model, dims={"B": 2, "S": 3})
    np.testing.assert_allclose(
        run_model(proto, feeds)["y"], run_model(original, feeds)["y"], rtol=1e-5, atol=1e-5
    )


def test_declared_value_info_is_kept() -> None:
    model = residual_block_model()
    declared = model.graph.node(-2).outputs[0]  # k = Add(a, x)
    declared.shape, declared.type = ir.Shape(["B", "S", 8]), ir.TensorType(ir.DataType.FLOAT)
    canonicalize(model)
    proto = ir.serde.serialize_model(model)
    assert _intermediate_value_info(proto) == {"k"}
    (info,) = [v for v in proto.graph.value_info if v.name == "k"]
    assert [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim] == ["B", "S", 8]
