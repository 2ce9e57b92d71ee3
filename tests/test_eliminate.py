"""EliminateNoOpsPass: each no-op kind, graph-output naming, skips, numerics, idempotence."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxprune.passes.base import PassReport
from onnxprune.passes.eliminate import EliminateNoOpsPass
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text, random_feeds

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def op_counts(model: ir.Model) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph))


def run_checked(model: ir.Model) -> PassReport:
    """Run the pass; assert bit-exact outputs, kept output signature, idempotence, checker."""
    original = ir.serde.serialize_model(model)
    signature = [(v.name, v.dtype, v.shape) for v in model.graph.outputs]
    report = EliminateNoOpsPass()(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert [(v.name, v.dtype, v.shape) for v in model.graph.outputs] == signature
    feeds = random_feeds(model, dims={"N": 3})
    ref, got = run_model(original, feeds), run_model(proto, feeds)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name])
    again = EliminateNoOpsPass()(model)
    assert again.changes == []
    return report


def changes(report: PassReport) -> list[tuple[str, str]]:
    return [(c.node, c.what) for c in report.changes]


def skips(report: PassReport) -> list[tuple[str, str]]:
    return [(s.node, s.reason) for s in report.skips]


def wrap(x_type: str, body: str, out_type: str | None = None) -> ir.Model:
    """A model ``y = Relu(Op(Relu(x)))``: the no-op sits between two real nodes."""
    return model_from_text(
        HEADER
        + f"""
        g ({x_type} x) => ({out_type or x_type} y) {{
          a = Relu(x)
          {body}
          y = Relu(b)
        }}"""
    )


def test_identity_between_nodes() -> None:
    model = wrap("float[N,3,4]", "b = Identity(a)")
    report = run_checked(model)
    assert changes(report) == [("Identity(b)", "removed Identity")]
    assert op_counts(model) == {"Relu": 2}


@pytest.mark.parametrize(
    ("body", "node", "what"),
    [
        (
            "r = Constant<value = float {0.7}>()\n b = Dropout(a, r)",
            "Dropout(b)",
            "removed Dropout (inference)",
        ),
        (
            "m = Constant<value = bool {0}>()\n r = Constant<value = float {0.7}>()\n"
            " b = Dropout(a, r, m)",
            "Dropout(b)",
            "removed Dropout (inference)",
        ),
        ("b = Cast<to = 1>(a)", "Cast(b)", "removed Cast to the same dtype FLOAT"),
        (
            "t = Constant<value = int64[3] {0, 3, -1}>()\n b = Reshape(a, t)",
            "Reshape(b)",
            "removed Reshape to the same shape [0, 3, -1]",
        ),
        (
            "b = Transpose<perm = [0, 1, 2]>(a)",
            "Transpose(b)",
            "removed Transpose with identity perm [0, 1, 2]",
        ),
        (
            "ax = Constant<value = int64[1] {-1}>()\n u = Unsqueeze(a, ax)\n b = Squeeze(u, ax)",
            "Squeeze(b)",
            "removed Unsqueeze/Squeeze pair on axes [3]",
        ),
        (
            "ax = Constant<value = int64[1] {2}>()\n u = Unsqueeze(a, ax)\n"
            " bx = Constant<value = int64[1] {-2}>()\n b = Squeeze(u, bx)",
            "Squeeze(b)",
            "removed Unsqueeze/Squeeze pair on axes [2]",
        ),
        (
            "t = Constant<value = int64[2] {3, 1}>()\n b = Expand(a, t)",
            "Expand(b)",
            "removed Expand to the same shape (target [3, 1])",
        ),
        (
            "p = Constant<value = int64[6] {0, 0, 0, 0, 0, 0}>()\n b = Pad(a, p)",
            "Pad(b)",
            "removed Pad with all-zero pads",
        ),
        (
            "s = Constant<value = int64[2] {0, -9}>()\n"
            " e = Constant<value = int64[2] {9223372036854775807, 4}>()\n"
            " ax = Constant<value = int64[2] {0, 2}>()\n b = Slice(a, s, e, ax)",
            "Slice(b)",
            "removed Slice covering the whole tensor",
        ),
    ],
)
def test_noop_removed(body: str, node: str, what: str) -> None:
    model = wrap("float[N,3,4]", body)
    report = run_checked(model)
    assert changes(report) == [(node, what)]
    assert skips(report) == []
    assert op_counts(model).get("Relu") == 2
    assert sum(op_counts(model).values()) - 2 == sum(
        1 for n in model.graph if n.op_type == "Constant"
    )


def test_squeeze_then_unsqueeze_pair() -> None:
    model = wrap(
        "float[N,1,4]",
        "ax = Constant<value = int64[1] {1}>()\n u = Squeeze(a, ax)\n b = Unsqueeze(u, ax)",
    )
    report = run_checked(model)
    assert changes(report) == [("Unsqueeze(b)", "removed Squeeze/Unsqueeze pair on axes [1]")]
    assert "Squeeze" not in op_counts(model)


@pytest.mark.parametrize(
    "body",
    [
        "b = Cast<to = 7>(a)",
        "t = Constant<value = int64[2] {0, -1}>()\n b = Reshape(a, t)",
        "b = Transpose<perm = [0, 2, 1]>(a)",
        "t = Constant<value = int64[3] {2, 3, 4}>()\n b = Expand(a, t)",
        "p = Constant<value = int64[6] {0, 0, 1, 0, 0, 0}>()\n b = Pad(a, p)",
        "s = Constant<value = int64[1] {1}>()\n e = Constant<value = int64[1] {4}>()\n"
        " ax = Constant<value = int64[1] {2}>()\n b = Slice(a, s, e, ax)",
        "ax = Constant<value = int64[1] {1}>()\n bx = Constant<value = int64[1] {2}>()\n"
        " u = Unsqueeze(a, ax)\n b = Squeeze(u, bx)",
    ],
)
def test_real_ops_are_untouched(body: str) -> None:
    model = wrap("float[1,3,4]", body, out_type="float")
    before = op_counts(model)
    report = EliminateNoOpsPass()(model)
    assert report.changes == [] and report.skips == []
    assert op_counts(model) == before


@pytest.mark.parametrize(
    ("body", "node", "reason"),
    [
        ("b, mk = Dropout(a)\n z = Not(mk)", "Dropout(b)", "Dropout mask output is used"),
        (
            "m = Constant<value = bool {1}>()\n r = Constant<value = float {0.5}>()\n"
            " b = Dropout(a, r, m)",
            "Dropout(b)",
            "training_mode is true",
        ),
        ("b = Cast<to = 1>(a)", "Cast(b)", "dtype of 'a' is unknown"),
        ("t = Shape(a)\n b = Reshape(a, t)", "Reshape(b)", "Reshape target is not constant"),
        (
            "t = Constant<value = int64[3] {3, 3, 4}>()\n b = Reshape(x, t)",
            "Reshape(b)",
            "cannot prove symbolic dim N equals 3",
        ),
        (
            "t = Constant<value = int64[3] {3, 3, 4}>()\n b = Expand(x, t)",
            "Expand(b)",
            "cannot prove symbolic dim N equals 3",
        ),
        (
            "s = Constant<value = int64[1] {0}>()\n e = Constant<value = int64[1] {1000}>()\n"
            " b = Slice(x, s, e)",
            "Slice(b)",
            "cannot prove slice [0:1000] covers symbolic dim N",
        ),
    ],
)
def test_unprovable_noops_are_skipped(body: str, node: str, reason: str) -> None:
    # No shape inference: ``a`` (a Relu output) has no dtype/shape, ``x`` has [N,3,4].
    model = wrap("float[N,3,4]", body, out_type="float")
    before = op_counts(model)
    report = EliminateNoOpsPass(infer_shapes=False)(model)
    assert changes(report) == []
    assert skips(report) == [(node, reason)]
    assert op_counts(model) == before


def test_graph_output_renames_producer() -> None:
    model = model_from_text(
        HEADER
        + """
        g (float[2,3] x) => (float[2,3] y) {
          a = Relu(x)
          y = Identity(a)
        }"""
    )
    report = run_checked(model)
    assert changes(report) == [
        ("Identity(y)", "removed Identity; producer output 'a' renamed to graph output")
    ]
    assert op_counts(model) == {"Relu": 1}
    assert model.graph.outputs[0].producer().op_type == "Relu"


@pytest.mark.parametrize(
    ("op", "changed"),
    [("Identity", False), ("Cast<to = 1>", True)],
)
def test_graph_input_to_graph_output_keeps_identity(op: str, changed: bool) -> None:
    model = model_from_text(
        HEADER
        + f"""
        g (float[2,3] x) => (float[2,3] y, float[2,3] z) {{
          y = {op}(x)
          z = Relu(x)
        }}"""
    )
    report = run_checked(model)
    reason = "input 'x' is a graph input and output 'y' is a graph output"
    if changed:
        assert changes(report) == [
            ("Cast(y)", f"removed Cast to the same dtype FLOAT; Identity kept ({reason})")
        ]
        assert skips(report) == []
    else:
        assert changes(report) == []
        assert skips(report) == [("Identity(y)", f"{reason}; Identity kept")]
    assert op_counts(model) == {"Identity": 1, "Relu": 1}


def test_identity_of_initializer_graph_output_is_kept() -> None:
    model = model_from_text(
        HEADER
        + "g (float[2] x, float[2] w) => (float[2] y, float[2] z) {\n"
        + " y = Identity(w)\n z = Add(x, w)\n}",
        {"w": np.ones(2, np.float32)},
    )
    report = run_checked(model)
    assert skips(report) == [
        (
            "Identity(y)",
            "input 'w' is an initializer and output 'y' is a graph output; Identity kept",
        )
    ]


_CHAIN_OPS = {
    "identity": "{o} = Identity({i})",
    "cast": "{o} = Cast<to = 1>({i})",
    "transpose": "{o} = Transpose<perm = [0, 1]>({i})",
    "reshape": "{o}_t = Constant<value = int64[2] {{0, -1}}>()\n {o} = Reshape({i}, {o}_t)",
    "pad": "{o}_p = Constant<value = int64[4] {{0, 0, 0, 0}}>()\n {o} = Pad({i}, {o}_p)",
    "relu": "{o} = Relu({i})",
    "neg": "{o} = Neg({i})",
}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(sorted(_CHAIN_OPS)), min_size=1, max_size=6))
def test_random_chains_keep_outputs_and_drop_every_noop(chain: list[str]) -> None:
    lines, prev = [], "x"
    for k, op in enumerate(chain):
        out = "y" if k == len(chain) - 1 else f"v{k}"
        lines.append(_CHAIN_OPS[op].format(o=out, i=prev))
        prev = out
    model = model_from_text(
        HEADER + "g (float[N,3] x) => (float[N,3] y) {\n" + "\n".join(lines) + "\n}"
    )
    run_checked(model)
    real = sum(op in {"relu", "neg"} for op in chain)
    counts = op_counts(model)
    assert counts.get("Relu", 0) + counts.get("Neg", 0) == real
    # Only an Identity kept between graph input and graph output may remain.
    assert sum(counts.values()) - counts.get("Constant", 0) == max(real, 1)
