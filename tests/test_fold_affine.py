"""FoldAffinePass: structure, report, onnxruntime numerics, idempotence, checker."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxprune.passes.base import PassReport
from onnxprune.passes.fold_affine import FoldAffinePass
from onnxprune.testing import assert_same_outputs, model_from_text, random_feeds

HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'


def _randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _run(text: str, inits: dict[str, np.ndarray]) -> tuple[ir.Model, PassReport]:
    """Fold; check the checker, numerics against the original, and idempotence."""
    model = model_from_text(HEADER + text, inits)
    reference = ir.serde.serialize_model(model)
    feeds = random_feeds(model)
    report = FoldAffinePass()(model)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert_same_outputs(reference, model, feeds)
    again = FoldAffinePass()(model)
    assert not again.changes
    assert again.skips == report.skips
    return model, report


def _decl(name: str, shape: tuple[int, ...]) -> str:
    return f"float[{','.join(map(str, shape))}] {name}"


# --- output side ---------------------------------------------------------------------------

AFTER_CASES = {
    "mul_c11": ("Mul(c, k)", (4, 1, 1)),
    "mul_1c11": ("Mul(k, c)", (1, 4, 1, 1)),
    "mul_scalar": ("Mul(c, k)", ()),
    "add_c11": ("Add(k, c)", (4, 1, 1)),
    "sub_x_minus_c": ("Sub(c, k)", (1, 4, 1, 1)),
    "sub_c_minus_x": ("Sub(k, c)", (4, 1, 1)),
    "div": ("Div(c, k)", (4, 1, 1)),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", sorted(AFTER_CASES))
def test_after_conv(case: str, bias: bool) -> None:
    expr, k_shape = AFTER_CASES[case]
    b = ", b" if bias else ""
    text = (
        f"g (float[1,4,5,5] x, float[4,2,3,3] w, float[4] b, {_decl('k', k_shape)}) "
        f"=> (float[1,4,5,5] y) {{\n  [conv] c = Conv<group=2, pads=[1,1,1,1]>(x, w{b})\n"
        f"  [aff] y = {expr}\n}}"
    )
    k = _randn(*k_shape, seed=2) + np.float32(3.0)  # away from zero for Div
    inits = {"w": _randn(4, 2, 3, 3), "k": k}
    if bias:
        inits["b"] = _randn(4, seed=1)
    else:
        text = text.replace(", float[4] b", "")
    model, report = _run(text, inits)
    assert _ops(model) == ["Conv"]
    assert [(c.node, c.what) for c in report.changes] == [("conv", "folded aff (output side)")]
    assert model.graph.outputs[0].name == "y"
    has_bias = bias or case not in ("mul_c11", "mul_1c11", "mul_scalar", "div")
    assert len(next(iter(model.graph)).inputs) == (3 if has_bias else 2)


def test_paddle_chain_to_fixed_point() -> None:
    text = (
        "g (float[1,3,5,5] x, float[4,3,3,3] w, float[1,4,1,1] s, float[1,4,1,1] t) "
        "=> (float[1,4,3,3] y) {\n  [conv] c = Conv(x, w)\n  [mul] m = Mul(c, s)\n"
        "  [add] a = Add(m, t)\n  [act] y = Relu(a)\n}"
    )
    inits = {"w": _randn(4, 3, 3, 3), "s": _randn(1, 4, 1, 1, seed=1), "t": _randn(1, 4, 1, 1)}
    model, report = _run(text, inits)
    assert _ops(model) == ["Conv", "Relu"]
    assert len(report.changes) == 2
    assert set(model.graph.initializers) == {"w", "conv_bias"}


@pytest.mark.parametrize("group", [1, 2])
def test_after_conv_transpose(group: int) -> None:
    text = (
        "g (float[1,4,3,3] x, float[4,3,2,2] w, float[1,6,1,1] s) => (float[1,6,6,6] y) {\n"
        f"  [ct] c = ConvTranspose<group={group}, strides=[2,2]>(x, w)\n  [m] y = Mul(c, s)\n}}"
    )
    if group == 1:
        text = text.replace("float[1,6,", "float[1,3,")
    c_out = 3 * group
    model, report = _run(text, {"w": _randn(4, 3, 2, 2), "s": _randn(1, c_out, 1, 1, seed=1)})
    assert _ops(model) == ["ConvTranspose"]
    assert len(report.changes) == 1


@pytest.mark.parametrize("has_c", [True, False])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_after_gemm(trans_b: int, has_c: bool) -> None:
    w_shape = (5, 4) if trans_b else (4, 5)
    c_in = ", cc" if has_c else ""
    text = (
        f"g (float[3,4] x, {_decl('w', w_shape)}, float[5] cc, float[5] s, float[1,5] t) "
        f"=> (float[3,5] y) {{\n  [gemm] z = Gemm<transB={trans_b}, alpha=0.5, beta=0.25>"
        f"(x, w{c_in})\n  [m] m = Mul(s, z)\n  [a] y = Sub(m, t)\n}}"
    )
    inits = {"w": _randn(*w_shape), "s": _randn(5, seed=1), "t": _randn(1, 5, seed=2)}
    if has_c:
        inits["cc"] = _randn(5, seed=3)
    else:
        text = text.replace(" float[5] cc,", "")
    model, report = _run(text, inits)
    assert _ops(model) == ["Gemm"]
    assert len(report.changes) == 2
    assert next(iter(model.graph)).inputs[1].const_value.shape == w_shape


def test_after_matmul_with_bias_chain() -> None:
    text = (
        "g (float[2,3,4] x, float[4,5] w, float[5] b, float[5] s, float[1,1,5] t) "
        "=> (float[2,3,5] y) {\n  [mm] z = MatMul(x, w)\n  [bias] zb = Add(z, b)\n"
        "  [m] m = Mul(zb, s)\n  [a] y = Add(m, t)\n}"
    )
    inits = {
        "w": _randn(4, 5),
        "b": _randn(5, seed=1),
        "s": _randn(5, seed=2),
        "t": _randn(1, 1, 5),
    }
    model, report = _run(text, inits)
    assert _ops(model) == ["MatMul", "Add"]
    assert len(report.changes) == 2
    assert not report.skips  # the bias Add itself is the canonical form, not a candidate


def test_after_bare_matmul_scale_only() -> None:
    text = (
        "g (float[2,3,4] x, float[4,5] w, float[5] s) => (float[2,3,5] y) {\n"
        "  [mm] z = MatMul(x, w)\n  [m] y = Div(z, s)\n}"
    )
    model, report = _run(text, {"w": _randn(4, 5), "s": _randn(5, seed=2) + np.float32(3)})
    assert _ops(model) == ["MatMul"]
    assert len(report.changes) == 1


# --- input side ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "pads", "folded"),
    [
        ("Mul(x, k)", 1, True),
        ("Mul(x, k)", 0, True),
        ("Add(k, x)", 0, True),
        ("Sub(x, k)", 0, True),
        ("Sub(k, x)", 0, True),
        ("Div(x, k)", 1, True),
        ("Add(x, k)", 1, False),
        ("Sub(k, x)", 1, False),
    ],
)
@pytest.mark.parametrize(("c_out", "group"), [(6, 1), (6, 2), (4, 4)])
def test_before_conv(expr: str, pads: int, folded: bool, c_out: int, group: int) -> None:
    out = 5 + 2 * pads - 2
    text = (
        f"g (float[1,4,5,5] x, float[{c_out},{4 // group},3,3] w, float[{c_out}] b, "
        f"float[4,1,1] k) => (float[1,{c_out},{out},{out}] y) {{\n  [aff] a = {expr}\n"
        f"  [conv] y = Conv<group={group}, pads=[{pads},{pads},{pads},{pads}]>(a, w, b)\n}}"
    )
    inits = {
        "w": _randn(c_out, 4 // group, 3, 3),
        "b": _randn(c_out, seed=1),
        "k": _randn(4, 1, 1, seed=2) + np.float32(3),
    }
    model, report = _run(text, inits)
    if folded:
        assert _ops(model) == ["Conv"]
        assert [(c.node, c.what) for c in report.changes] == [("conv", "folded aff (input side)")]
        assert model.graph.initializers["w"].const_value.shape == (c_out, 4 // group, 3, 3)
    else:
        assert len(model.graph) == 2
        assert [(s.node, s.reason) for s in report.skips] == [
            ("aff", "zero padding: shift t is not exact")
        ]


def test_before_conv_scalar_and_chain() -> None:
    text = (
        "g (float[1,3,5,5] x, float[4,3,3,3] w) => (float[1,4,3,3] y) {\n"
        "  s = Constant<value_float=0.5>()\n  t = Constant<value=float[1,1,1] {-1.5}>()\n"
        "  [m] m = Mul(x, s)\n  [a] a = Add(m, t)\n  [conv] y = Conv(a, w)\n}"
    )
    inits = {"w": _randn(4, 3, 3, 3)}
    model, report = _run(text, inits)
    assert _ops(model) == ["Conv"]
    assert [c.what for c in report.changes] == ["folded a (input side)", "folded m (input side)"]


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (0, 1), (1, 0)])
def test_before_gemm(trans_a: int, trans_b: int) -> None:
    a_shape, k_shape = ((4, 3), (4, 1)) if trans_a else ((3, 4), (4,))
    w_shape = (5, 4) if trans_b else (4, 5)
    text = (
        f"g ({_decl('x', a_shape)}, {_decl('w', w_shape)}, {_decl('k', k_shape)}, float[5] cc)"
        f" => (float[3,5] y) {{\n  [m] m = Mul(x, k)\n  [a] a = Add(m, k)\n"
        f"  [gemm] y = Gemm<transA={trans_a}, transB={trans_b}, alpha=2.0, beta=0.5>(a, w, cc)\n}}"
    )
    inits = {"w": _randn(*w_shape), "k": _randn(*k_shape, seed=1), "cc": _randn(5, seed=2)}
    model, report = _run(text, inits)
    assert _ops(model) == ["Gemm"]
    assert len(report.changes) == 2


def test_before_matmul() -> None:
    text = (
        "g (float[2,3,4] x, float[4,5] w, float[4] s, float[4] t, float[5] b) "
        "=> (float[2,3,5] y) {\n  [m] m = Mul(x, s)\n  [a] a = Add(m, t)\n"
        "  [mm] z = MatMul(a, w)\n  [bias] y = Add(z, b)\n}"
    )
    inits = {"w": _randn(4, 5), "s": _randn(4, seed=1), "t": _randn(4, seed=2), "b": _randn(5)}
    model, _ = _run(text, inits)
    assert _ops(model) == ["MatMul", "Add"]


@pytest.mark.parametrize(
    ("expr", "reason"),
    [
        ("Mul(x, k)", None),
        ("Add(x, k)", "ConvTranspose scatters its input: an input shift t is not exact"),
    ],
)
def test_before_conv_transpose(expr: str, reason: str | None) -> None:
    text = (
        "g (float[1,4,3,3] x, float[4,3,2,2] w, float[1,4,1,1] k) => (float[1,6,6,6] y) {\n"
        f"  [aff] a = {expr}\n  [ct] y = ConvTranspose<group=2, strides=[2,2]>(a, w)\n}}"
    )
    model, report = _run(text, {"w": _randn(4, 3, 2, 2), "k": _randn(1, 4, 1, 1, seed=1)})
    assert [s.reason for s in report.skips] == ([reason] if reason else [])
    assert len(model.graph) == (2 if reason else 1)


# --- refusals ------------------------------------------------------------------------------


def _skips(text: str, inits: dict[str, np.ndarray], run: bool = True) -> list[tuple[str, str]]:
    if run:
        model, report = _run(text, inits)
    else:
        model = model_from_text(HEADER + text, inits)
        report = FoldAffinePass()(model)
    assert not report.changes
    return [(s.node, s.reason) for s in report.skips]


CONV = "g (float[1,3,4,4] x, float[4,3,1,1] w, {k}) => (float[1,4,4,4] y{extra}) {{\n{body}\n}}"
W = {"w": _randn(4, 3, 1, 1)}


@pytest.mark.parametrize(
    ("k_decl", "body", "extra", "expected"),
    [
        (
            "float[1,4,4,4] k",
            "  [conv] c = Conv(x, w)\n  [aff] y = Mul(c, k)",
            "",
            ("aff", "constant of shape [1, 4, 4, 4] varies along a non-channel axis"),
        ),
        (
            "float[1,1,4,1,1] k",
            "  [conv] c = Conv(x, w)\n  [aff] z = Mul(c, k)\n  [sq] y = Squeeze(z, zero)",
            "",
            ("aff", "constant of shape [1, 1, 4, 1, 1] would raise the rank above 4"),
        ),
        (
            "float[4,1,1] k",
            "  [conv] c = Conv(x, w)\n  [aff] y = Div(k, c)",
            "",
            ("aff", "c / x is not affine in x"),
        ),
        (
            "float[4,1,1] k",
            "  [conv] c = Conv(x, w)\n  [aff] y = Mul(c, k)\n  [r] r = Relu(c)",
            ", float[1,4,4,4] r",
            ("aff", "output of conv has other users"),
        ),
        (
            "float[3,1,1] k",
            "  [aff] a = Mul(x, k)\n  [conv] y = Conv(a, w)\n  [r] r = Relu(a)",
            ", float[1,3,4,4] r",
            ("aff", "output feeds other nodes besides conv"),
        ),
        (
            "float[4,1,1] k",
            "  [conv] c = Conv(x, w)\n  [conv2] c2 = Conv(x, w)\n  [aff] y = Mul(c, k)",
            ", float[1,4,4,4] c2",
            ("aff", "conv: weight 'w' is shared with another node"),
        ),
        (
            "float[3,4,1] k",
            "  [aff] a = Mul(x, k)\n  [conv] y = Conv(a, w)",
            "",
            ("aff", "constant of shape [3, 4, 1] varies along a non-channel axis"),
        ),
    ],
)
def test_skip_reasons(k_decl: str, body: str, extra: str, expected: tuple[str, str]) -> None:
    text = CONV.format(k=k_decl, body=body, extra=extra)
    shape = tuple(int(d) for d in k_decl.split("[")[1].split("]", maxsplit=1)[0].split(","))
    inits = {**W, "k": _randn(*shape, seed=1) + np.float32(3)}
    if "Squeeze" in body:
        text = text.replace(") => (", ", int64[1] zero) => (")
        inits["zero"] = np.array([0], dtype=np.int64)
    assert _skips(text, inits) == [expected]


def test_skip_zero_divisor() -> None:
    text = CONV.format(
        k="float[4,1,1] k", body="  [conv] c = Conv(x, w)\n  [aff] y = Div(c, k)", extra=""
    )
    k = np.array([1, 0, 2, 3], dtype=np.float32).reshape(4, 1, 1)
    assert _skips(text, {**W, "k": k}, run=False) == [("aff", "division by a zero constant")]


def test_skip_matmul_shift_without_bias() -> None:
    text = (
        "g (float[2,4] x, float[4,5] w, float[4] t, float[5] t2) => (float[2,5] y) {\n"
        "  [a] a = Add(x, t)\n  [mm] z = MatMul(a, w)\n  [s] y = Sub(t2, z)\n}"
    )
    inits = {"w": _randn(4, 5), "t": _randn(4, seed=1), "t2": _randn(5, seed=2)}
    reason = "MatMul has no bias Add to absorb the shift"
    assert _skips(text, inits) == [("a", reason), ("s", reason)]


def test_skip_unknown_shapes() -> None:
    text = (
        "g (float[2,4] x, float[4,5] w, float[1,4] k, float[1,5] k2) => (float[2,5] y) {\n"
        "  [a] a = Mul(x, k)\n  [mm] z = MatMul(a, w)\n  [m] y = Mul(z, k2)\n}"
    )
    model = model_from_text(
        HEADER + text, {"w": _randn(4, 5), "k": _randn(1, 4), "k2": _randn(1, 5)}
    )
    model.graph.inputs[0].shape = None
    report = FoldAffinePass()(model)
    assert not report.changes
    assert [(s.node, s.reason) for s in report.skips] == [
        ("a", "input shape is unknown: cannot rule out broadcasting by the constant"),
        ("m", "constant of shape [1, 5] against an output of unknown rank"),
    ]


def test_skip_input_broadcast() -> None:
    text = (
        "g (float[1,1,4,4] x, float[4,3,1,1] w, float[1,3,1,1] k) => (float[1,4,4,4] y) {\n"
        "  [aff] a = Mul(x, k)\n  [conv] y = Conv(a, w)\n}"
    )
    inits = {"w": _randn(4, 3, 1, 1), "k": _randn(1, 3, 1, 1)}
    assert _skips(text, inits) == [
        ("aff", "constant of shape [1, 3, 1, 1] broadcasts the input [1, 1, 4, 4]")
    ]


def test_skip_channel_count_mismatch_and_dtype() -> None:
    # Inconsistent models (never run): the pass must refuse, not broadcast or cast.
    text = CONV.format(
        k="float[2,1,1] k", body="  [conv] c = Conv(x, w)\n  [aff] y = Mul(c, k)", extra=""
    )
    skips = _skips(text, {**W, "k": _randn(2, 1, 1)}, run=False)
    assert skips == [("aff", "constant of shape [2, 1, 1] does not match 4 channels")]
    text = CONV.format(
        k="double k", body="  [conv] c = Conv(x, w)\n  [aff] y = Mul(c, k)", extra=""
    )
    skips = _skips(text, {**W, "k": np.float64(2.0)}, run=False)
    assert skips == [("aff", "constant dtype float64 != weight dtype")]
