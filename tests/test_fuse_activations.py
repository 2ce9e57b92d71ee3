"""FuseActivationsPass: structure, report, onnxruntime numerics, idempotence, checker."""

from __future__ import annotations

import math

import onnx
import onnx_ir as ir
import pytest

from onnxprune.passes.base import PassReport
from onnxprune.passes.fuse_activations import FuseActivationsPass
from onnxprune.testing import assert_same_outputs, model_from_text, random_feeds

SQRT2 = f"{math.sqrt(2.0):.9f}"
INV_SQRT2 = f"{1.0 / math.sqrt(2.0):.9f}"
SIXTH = f"{1.0 / 6.0:.9f}"


def _model(body: str, opset: int, outputs: str = "float[2,8] y") -> ir.Model:
    text = (
        f'<ir_version: 10, opset_import: ["" : {opset}]>\n'
        f"g (float[2,8] x) => ({outputs}) {{\n{body}\n}}"
    )
    return model_from_text(text)


def _ops(model: ir.Model) -> list[tuple[str, str]]:
    return [(node.domain, node.op_type) for node in model.graph]


def _run(
    model: ir.Model, rtol: float = 1e-5, atol: float = 1e-5, contrib_ops: bool = True
) -> PassReport:
    """Fuse; check the checker, numerics against the original, and idempotence."""
    reference = ir.serde.serialize_model(model)
    feeds = random_feeds(model)
    feeds["x"] *= 4.0  # cover the saturated ends of HardSwish and the GELU tails
    report = FuseActivationsPass(contrib_ops=contrib_ops)(model)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert_same_outputs(reference, model, feeds, rtol=rtol, atol=atol)
    again = FuseActivationsPass(contrib_ops=contrib_ops)(model)
    assert not again.changes
    return report


def _const(name: str, value: float | str) -> str:
    return f"  {name} = Constant<value_float={value}>()\n"


# --- HardSwish -----------------------------------------------------------------------------

HARDSIGMOID = f"  h = HardSigmoid<alpha={SIXTH}, beta=0.5>(x)\n"
RELU6 = (
    _const("three", 3.0)
    + _const("zero", 0.0)
    + _const("six", 6.0)
    + "  p = Add({add})\n  r = Clip(p, zero, six)\n"
)
HARDSWISH_FORMS = {
    "hardsigmoid_xh": HARDSIGMOID + "  [out] y = Mul(x, h)",
    "hardsigmoid_hx": HARDSIGMOID + "  [out] y = Mul(h, x)",
    "relu6_x_mul_div": RELU6.format(add="x, three") + "  q = Div(r, six)\n  [out] y = Mul(x, q)",
    "relu6_mul_x_sixth": RELU6.format(add="three, x")
    + _const("sixth", SIXTH)
    + "  q = Mul(sixth, r)\n  [out] y = Mul(q, x)",
    "relu6_div_outer": RELU6.format(add="x, three") + "  m = Mul(r, x)\n  [out] y = Div(m, six)",
    "relu6_mul_outer": RELU6.format(add="x, three")
    + _const("sixth", SIXTH)
    + "  m = Mul(x, r)\n  [out] y = Mul(m, sixth)",
}


@pytest.mark.parametrize("form", sorted(HARDSWISH_FORMS))
def test_hardswish(form: str) -> None:
    model = _model(HARDSWISH_FORMS[form], 14)
    report = _run(model)
    fused = [op for op in _ops(model) if op[1] != "Constant"]
    assert fused == [("", "HardSwish")]
    assert [(c.node, c.what.split(" -> ")[1]) for c in report.changes] == [("out", "HardSwish")]
    assert model.graph.outputs[0].name == "y"
    assert not any(n.op_type == "Constant" for n in model.graph)  # dead constants dropped


def test_hardswish_clip_attributes_opset_14_only() -> None:
    body = (
        _const("three", 3.0)
        + _const("six", 6.0)
        + "  p = Add(x, three)\n  r = Clip<min=0.0, max=6.0>(p)\n"
        + "  m = Mul(x, r)\n  [out] y = Div(m, six)"
    )
    # Clip with attributes is opset < 11, where HardSwish does not exist yet.
    report = FuseActivationsPass()(_model(body, 10))
    assert [(s.node, s.reason) for s in report.skips] == [
        ("out", "HardSwish: HardSwish needs opset >= 14 (model has 10)")
    ]


def test_hardswish_skip_old_opset() -> None:
    model = _model(HARDSWISH_FORMS["hardsigmoid_xh"], 13)
    report = _run(model)
    assert not report.changes
    assert [(s.node, s.reason) for s in report.skips] == [
        ("out", "HardSwish: HardSwish needs opset >= 14 (model has 13)")
    ]


def test_hardsigmoid_wrong_alpha() -> None:
    model = _model("  h = HardSigmoid(x)\n  [out] y = Mul(x, h)", 14)
    report = _run(model)
    assert not report.changes
    assert [s.reason for s in report.skips] == ["HardSigmoid alpha=0.2, beta=0.5 is not (1/6, 1/2)"]


# --- Swish ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["x, s", "s, x"])
def test_swish_quickgelu(order: str) -> None:
    model = _model(f"  s = Sigmoid(x)\n  [out] y = Mul({order})", 17)
    report = _run(model)
    assert _ops(model) == [("com.microsoft", "QuickGelu")]
    assert model.opset_imports["com.microsoft"] == 1
    assert next(iter(model.graph)).attributes["alpha"].value == pytest.approx(1.0)
    assert report.changes[0].what == "Sigmoid+Mul -> QuickGelu"


def test_swish_without_contrib_ops() -> None:
    model = _model("  s = Sigmoid(x)\n  [out] y = Mul(x, s)", 17)
    report = _run(model, contrib_ops=False)
    assert [s.reason for s in report.skips] == [
        "Swish: Swish needs opset >= 24 or contrib ops (model has 17)"
    ]
    model = _model("  s = Sigmoid(x)\n  [out] y = Mul(x, s)", 24)
    _run(model, contrib_ops=False)
    assert _ops(model) == [("", "Swish")]


# --- GELU ----------------------------------------------------------------------------------

ERF = "{scale}  e = Erf(d)\n  one = Constant<value_float=1.0>()\n  a = Add({add})\n"
DIV = _const("k", SQRT2) + "  d = Div(x, k)\n"
MUL = _const("k", INV_SQRT2) + "  d = Mul(k, x)\n"
HALF = _const("half", 0.5) + _const("two", 2.0)
GELU_FORMS = {
    "half_x_times_e": "  hx = Mul(half, x)\n  [out] y = Mul(hx, a)",
    "x_e_times_half": "  m = Mul(x, a)\n  [out] y = Mul(m, half)",
    "x_e_div_two": "  m = Mul(a, x)\n  [out] y = Div(m, two)",
    "x_times_e_half": "  eh = Mul(a, half)\n  [out] y = Mul(x, eh)",
}


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("scale", ["div", "mul"])
@pytest.mark.parametrize("form", sorted(GELU_FORMS))
def test_gelu(form: str, scale: str, opset: int) -> None:
    add = "e, one" if scale == "div" else "one, e"
    body = ERF.format(scale=DIV if scale == "div" else MUL, add=add) + HALF + GELU_FORMS[form]
    model = _model(body, opset)
    report = _run(model)
    fused = [op for op in _ops(model) if op[1] != "Constant"]
    assert fused == [("" if opset >= 20 else "com.microsoft", "Gelu")]
    assert [c.node for c in report.changes] == ["out"]


def test_gelu_exporter_constants() -> None:
    body = (
        _const("k", 1.4142)
        + "  d = Div(x, k)\n  e = Erf(d)\n"
        + _const("one", 1.0)
        + "  a = Add(e, one)\n"
        + HALF
        + GELU_FORMS["x_e_times_half"]
    )
    model = _model(body, 20)
    _run(model, rtol=1e-4, atol=1e-4)  # 1.4142 is sqrt(2) to 1.4e-5 relative
    assert [op for op in _ops(model) if op[1] != "Constant"] == [("", "Gelu")]


def test_gelu_without_contrib_ops_old_opset() -> None:
    body = ERF.format(scale=DIV, add="e, one") + HALF + GELU_FORMS["x_e_times_half"]
    report = _run(_model(body, 17), contrib_ops=False)
    assert [s.reason for s in report.skips] == [
        "Gelu: Gelu needs opset >= 20 or contrib ops (model has 17)"
    ]


# --- intermediates that must stay ---------------------------------------------------------


def test_skip_intermediate_with_other_consumer() -> None:
    model = _model(
        "  s = Sigmoid(x)\n  [out] y = Mul(x, s)\n  z = Neg(s)", 17, "float[2,8] y, float[2,8] z"
    )
    report = _run(model)
    assert not report.changes
    assert [s.reason for s in report.skips] == [
        "Swish: intermediate 's' has consumers outside the pattern"
    ]


def test_skip_intermediate_graph_output() -> None:
    body = ERF.format(scale=DIV, add="e, one") + HALF + GELU_FORMS["x_e_times_half"]
    model = _model(body, 20, "float[2,8] y, float[2,8] e")
    report = _run(model)
    assert not report.changes
    assert [s.reason for s in report.skips] == ["Gelu: intermediate 'e' is a graph output"]


def test_no_match_leaves_graph_alone() -> None:
    model = _model("  s = Sigmoid(x)\n  t = Tanh(x)\n  [out] y = Mul(t, s)", 17)
    report = _run(model)
    assert not report.changes
    assert not report.skips
    assert len(model.graph) == 3
