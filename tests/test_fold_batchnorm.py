"""FoldBatchNormPass: structure, report, onnxruntime numerics, idempotence, checker."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxprune.passes.base import PassReport
from onnxprune.passes.fold_batchnorm import FoldBatchNormPass
from onnxprune.testing import assert_same_outputs, model_from_text, random_feeds

HEADER = '<ir_version: 10, opset_import: ["" : {opset}]>\n'
BN_INPUTS = "float[{c}] g, float[{c}] be, float[{c}] mu, float[{c}] v"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _bn_params(c: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = _rng(seed)
    return {
        "g": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "be": rng.standard_normal(c).astype(np.float32),
        "mu": rng.standard_normal(c).astype(np.float32),
        "v": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def _randn(*shape: int, seed: int = 2) -> np.ndarray:
    return _rng(seed).standard_normal(shape).astype(np.float32)


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _run(model: ir.Model, rtol: float = 1e-5, atol: float = 1e-5) -> PassReport:
    """Fold, then check the checker, numerics against the original, and idempotence."""
    reference = ir.serde.serialize_model(model)
    feeds = random_feeds(model)
    report = FoldBatchNormPass()(model)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert_same_outputs(reference, model, feeds, rtol=rtol, atol=atol)
    again = FoldBatchNormPass()(model)
    assert not again.changes
    assert again.skips == report.skips
    return report


def _conv_model(c_in: int, c_out: int, group: int, bias: bool, opset: int = 17) -> ir.Model:
    bias_in = f", float[{c_out}] b" if bias else ""
    text = HEADER.format(opset=opset) + (
        f"g (float[1,{c_in},6,6] x, float[{c_out},{c_in // group},3,3] w{bias_in}, "
        + BN_INPUTS.format(c=c_out)
        + f") => (float[1,{c_out},6,6] y) {{\n"
        f"  [conv] c = Conv<group={group}, pads=[1,1,1,1]>(x, w{', b' if bias else ''})\n"
        "  [bn] y = BatchNormalization<epsilon=0.001>(c, g, be, mu, v)\n}"
    )
    inits = {"w": _randn(c_out, c_in // group, 3, 3), **_bn_params(c_out)}
    if bias:
        inits["b"] = _randn(c_out, seed=3)
    return model_from_text(text, inits)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("c_in", "c_out", "group"), [(3, 4, 1), (4, 6, 2), (4, 4, 4)])
def test_conv(c_in: int, c_out: int, group: int, bias: bool) -> None:
    model = _conv_model(c_in, c_out, group, bias)
    report = _run(model)
    assert _ops(model) == ["Conv"]
    conv = next(iter(model.graph))
    assert len(conv.inputs) == 3
    assert conv.inputs[2].const_value.shape == (c_out,)
    assert conv.inputs[1].const_value.shape == (c_out, c_in // group, 3, 3)
    assert [(c.node, c.what) for c in report.changes] == [("conv", "folded bn")]
    assert set(model.graph.initializers) == {"w", "b" if bias else "conv_bias"}
    assert model.graph.outputs[0].name == "y"
    assert model.graph.outputs[0].producer() is conv


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(group: int, bias: bool) -> None:
    c_in, per = 4, 3
    c_out = per * group
    b_in = f", float[{c_out}] b" if bias else ""
    text = HEADER.format(opset=17) + (
        f"g (float[1,{c_in},5,5] x, float[{c_in},{per},3,3] w{b_in}, "
        + BN_INPUTS.format(c=c_out)
        + f") => (float[1,{c_out},9,9] y) {{\n"
        f"  [ct] c = ConvTranspose<group={group}, strides=[2,2], pads=[1,1,1,1]>"
        f"(x, w{', b' if bias else ''})\n"
        "  [bn] y = BatchNormalization(c, g, be, mu, v)\n}"
    )
    inits = {"w": _randn(c_in, per, 3, 3), **_bn_params(c_out)}
    if bias:
        inits["b"] = _randn(c_out, seed=3)
    model = model_from_text(text, inits)
    report = _run(model)
    assert _ops(model) == ["ConvTranspose"]
    assert next(iter(model.graph)).inputs[2].const_value.shape == (c_out,)
    assert len(report.changes) == 1


@pytest.mark.parametrize("c_shape", [None, (5,), (3, 1), (3, 5)])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm(trans_b: int, c_shape: tuple[int, ...] | None) -> None:
    w_shape = (5, 4) if trans_b else (4, 5)
    c_decl = "" if c_shape is None else f", float[{','.join(map(str, c_shape))}] cc"
    text = HEADER.format(opset=17) + (
        f"g (float[3,4] x, float[{w_shape[0]},{w_shape[1]}] w{c_decl}, "
        + BN_INPUTS.format(c=5)
        + ") => (float[3,5] y) {\n"
        f"  [gemm] c = Gemm<transB={trans_b}, alpha=0.5, beta=2.0>"
        f"(x, w{', cc' if c_shape else ''})\n"
        "  [bn] y = BatchNormalization(c, g, be, mu, v)\n}"
    )
    inits = {"w": _randn(*w_shape), **_bn_params(5)}
    if c_shape is not None:
        inits["cc"] = _randn(*c_shape, seed=4)
    model = model_from_text(text, inits)
    report = _run(model)
    assert _ops(model) == ["Gemm"]
    gemm = next(iter(model.graph))
    assert gemm.inputs[1].const_value.shape == w_shape
    assert len(gemm.inputs) == 3
    assert len(report.changes) == 1


def test_matmul_gets_bias_add() -> None:
    text = HEADER.format(opset=17) + (
        "g (float[3,4] x, float[4,5] w, " + BN_INPUTS.format(c=5) + ") => (float[3,5] y) {\n"
        "  [mm] c = MatMul(x, w)\n  [bn] y = BatchNormalization(c, g, be, mu, v)\n}"
    )
    model = model_from_text(text, {"w": _randn(4, 5), **_bn_params(5)})
    report = _run(model)
    assert _ops(model) == ["MatMul", "Add"]
    assert model.graph.initializers["mm_bias"].const_value.shape == (5,)
    assert report.changes[0].node == "mm"


def test_matmul_with_bias_add() -> None:
    text = HEADER.format(opset=17) + (
        "g (float[3,4] x, float[4,5] w, float[5] b, "
        + BN_INPUTS.format(c=5)
        + ") => (float[3,5] y) {\n"
        "  [mm] m = MatMul(x, w)\n  [add] c = Add(b, m)\n"
        "  [bn] y = BatchNormalization(c, g, be, mu, v)\n}"
    )
    model = model_from_text(text, {"w": _randn(4, 5), "b": _randn(5, seed=3), **_bn_params(5)})
    _run(model)
    assert _ops(model) == ["MatMul", "Add"]
    assert set(model.graph.initializers) == {"w", "b"}


def test_constant_node_weight_becomes_initializer() -> None:
    w = _randn(4, 3, 1, 1)
    text = HEADER.format(opset=17) + (
        "g (float[1,3,4,4] x, " + BN_INPUTS.format(c=4) + ") => (float[1,4,4,4] y) {\n"
        "  w = Constant<value = float[4,3,1,1] {"
        + ",".join(f"{v:.6f}" for v in w.ravel())
        + "}>()\n  [conv] c = Conv(x, w)\n  [bn] y = BatchNormalization(c, g, be, mu, v)\n}"
    )
    model = model_from_text(text, _bn_params(4))
    _run(model)
    assert _ops(model) == ["Conv"]
    assert set(model.graph.initializers) == {"conv_weight", "conv_bias"}


def _skip_reasons(text: str, inits: dict[str, np.ndarray], run: bool = True) -> list[str]:
    model = model_from_text(text, inits)
    before = _ops(model)
    report = _run(model) if run else FoldBatchNormPass()(model)
    assert _ops(model) == before
    assert not report.changes
    return [s.reason for s in report.skips]


def _conv_bn_text(body: str, outputs: str = "float[1,4,4,4] y", extra: str = "") -> str:
    return HEADER.format(opset=17) + (
        f"g (float[1,3,4,4] x, float[4,3,1,1] w{extra}, "
        + BN_INPUTS.format(c=4)
        + f") => ({outputs}) {{\n{body}\n}}"
    )


CONV_INITS = {"w": _randn(4, 3, 1, 1), **_bn_params(4)}


def test_skip_matmul_rank3() -> None:
    text = HEADER.format(opset=17) + (
        "g (float[2,3,4] x, float[4,3] w, " + BN_INPUTS.format(c=3) + ") => (float[2,3,3] y) {\n"
        "  [mm] c = MatMul(x, w)\n  [bn] y = BatchNormalization(c, g, be, mu, v)\n}"
    )
    reasons = _skip_reasons(text, {"w": _randn(4, 3), **_bn_params(3)})
    assert reasons == ["MatMul output has rank 3: BN channel axis 1 is not the weight's N axis"]


def test_skip_matmul_unknown_rank() -> None:
    model = model_from_text(
        HEADER.format(opset=17)
        + "g (float[3,4] x, float[4,5] w, "
        + BN_INPUTS.format(c=5)
        + ") => (float[3,5] y) {\n  [mm] c = MatMul(x, w)\n"
        "  [bn] y = BatchNormalization(c, g, be, mu, v)\n}",
        {"w": _randn(4, 5), **_bn_params(5)},
    )
    model.graph.inputs[0].shape = None
    report = FoldBatchNormPass()(model)
    assert [s.reason for s in report.skips] == [
        "MatMul output rank is unknown: BN axis 1 may not be the weight's N axis"
    ]


@pytest.mark.parametrize(
    ("body", "outputs", "reason"),
    [
        (
            "  [conv] c = Conv(x, w)\n  [r] r = Relu(c)\n"
            "  [bn] y = BatchNormalization(c, g, be, mu, v)",
            "float[1,4,4,4] y, float[1,4,4,4] r",
            "output of conv has other consumers",
        ),
        (
            "  [conv] c = Conv(x, w)\n  [bn] y = BatchNormalization(c, g, be, mu, v)",
            "float[1,4,4,4] y, float[1,4,4,4] c",
            "output of conv is a graph output",
        ),
        (
            "  [conv] c = Conv(x, w)\n  [conv2] c2 = Conv(x, w)\n"
            "  [bn] y = BatchNormalization(c, g, be, mu, v)",
            "float[1,4,4,4] y, float[1,4,4,4] c2",
            "weight 'w' is shared with another node",
        ),
        (
            "  [conv] c = Conv(x, w)\n  [r] r = Relu(c)\n"
            "  [bn] y = BatchNormalization(r, g, be, mu, v)",
            "float[1,4,4,4] y",
            "input comes from Relu, not a foldable layer",
        ),
    ],
)
def test_skip_reasons(body: str, outputs: str, reason: str) -> None:
    assert _skip_reasons(_conv_bn_text(body, outputs), CONV_INITS) == [reason]


def test_skip_input_is_graph_input() -> None:
    text = HEADER.format(opset=17) + (
        "g (float[1,4,4,4] x, " + BN_INPUTS.format(c=4) + ") => (float[1,4,4,4] y) {\n"
        "  [bn] y = BatchNormalization(x, g, be, mu, v)\n}"
    )
    assert _skip_reasons(text, _bn_params(4)) == ["input is not produced by a node"]


def test_skip_weight_not_constant() -> None:
    text = _conv_bn_text("  [conv] c = Conv(x, w)\n  [bn] y = BatchNormalization(c, g, be, mu, v)")
    inits = _bn_params(4)
    assert _skip_reasons(text, inits) == ["weight 'w' is not a constant initializer"]


def test_skip_bn_params_not_constant() -> None:
    text = _conv_bn_text("  [conv] c = Conv(x, w)\n  [bn] y = BatchNormalization(c, g, be, mu, v)")
    inits = {k: v for k, v in CONV_INITS.items() if k != "g"}
    assert _skip_reasons(text, inits) == ["BatchNormalization parameters are not constant"]


def test_skip_training_mode() -> None:
    text = HEADER.format(opset=15) + (
        "g (float[1,3,4,4] x, float[4,3,1,1] w, "
        + BN_INPUTS.format(c=4)
        + ") => (float[1,4,4,4] y, float[4] rm, float[4] rv) {\n"
        "  [conv] c = Conv(x, w)\n"
        "  [bn] y, rm, rv = BatchNormalization<training_mode=1>(c, g, be, mu, v)\n}"
    )
    reasons = _skip_reasons(text, CONV_INITS, run=False)
    assert reasons == ["training-mode BatchNormalization (more than one output)"]


def test_skip_spatial_zero() -> None:
    text = HEADER.format(opset=7) + (
        "g (float[1,3,4,4] x, float[4,3,1,1] w, "
        + BN_INPUTS.format(c=4)
        + ") => (float[1,4,4,4] y) {\n"
        "  [conv] c = Conv(x, w)\n  [bn] y = BatchNormalization<spatial=0>(c, g, be, mu, v)\n}"
    )
    reasons = _skip_reasons(text, CONV_INITS, run=False)
    assert reasons == ["BatchNormalization with spatial=0 normalizes per element, not per channel"]


def test_skip_channel_mismatch() -> None:
    # An inconsistent model (never run): the pass must refuse rather than broadcast.
    text = _conv_bn_text(
        "  [conv] c = Conv(x, w)\n  [bn] y = BatchNormalization(c, g, be, mu, v)"
    ).replace(BN_INPUTS.format(c=4), BN_INPUTS.format(c=2))
    inits = {"w": _randn(4, 3, 1, 1), **_bn_params(2)}
    reasons = _skip_reasons(text, inits, run=False)
    assert reasons == ["layer has 4 output channels, BN has 2"]


def test_numeric_check_can_fail() -> None:
    model = _conv_model(3, 4, 1, bias=True)
    reference = ir.serde.serialize_model(model)
    FoldBatchNormPass()(model)
    bias = model.graph.initializers["b"]
    bias.const_value = ir.tensor(bias.const_value.numpy() + np.float32(1e-3), name="b")
    with pytest.raises(AssertionError):
        assert_same_outputs(reference, model, random_feeds(model))
