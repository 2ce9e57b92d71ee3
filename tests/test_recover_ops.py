"""Each replay rule against onnxruntime (graph optimizations off) on random inputs.

A case is one node: float arrays are graph inputs (the dynamic path), other arrays (shapes,
indices, axes) are initializers (the constant-folding path). The replay must match
onnxruntime to float tolerance on every output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxprune.recover import GraphReplay  # noqa: E402
from onnxprune.recover.replay import ReplayError  # noqa: E402
from onnxprune.runtime import make_session  # noqa: E402

RNG = np.random.default_rng(0)


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def pos(*shape: int) -> np.ndarray:
    return (RNG.random(shape) + 0.5).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def scalar(value: Any, dtype: Any = np.float32) -> np.ndarray:
    return np.array(value, dtype=dtype)


def _model(
    op: str, inputs: list[np.ndarray | None], attrs: dict[str, Any], outputs: int, opset: int
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    names, graph_inputs, inits, feeds = [], [], [], {}
    for index, array in enumerate(inputs):
        if array is None:
            names.append("")
            continue
        name = f"in{index}"
        names.append(name)
        if array.dtype == np.float32 and array.ndim > 0:
            graph_inputs.append(helper.make_tensor_value_info(name, 1, list(array.shape)))
            feeds[name] = array
        else:
            inits.append(numpy_helper.from_array(array, name))
    outs = [f"out{i}" for i in range(outputs)]
    node = helper.make_node(op, names, outs, **attrs)
    graph = helper.make_graph(
        [node], "case", graph_inputs, [onnx.ValueInfoProto(name=n) for n in outs], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, feeds


def check(
    op: str,
    inputs: list[np.ndarray | None],
    attrs: dict[str, Any] | None = None,
    *,
    outputs: int = 1,
    opset: int = 18,
    atol: float = 1e-5,
    same_dtype: bool = True,
) -> None:
    model, feeds = _model(op, inputs, attrs or {}, outputs, opset)
    expected = make_session(model).run(None, feeds)
    got = GraphReplay(model, trainable=[])(feeds)
    for name, want in zip(got, expected, strict=True):
        have = got[name].detach().numpy()
        assert have.shape == want.shape, (op, name, have.shape, want.shape)
        # QuantizeLinear's replay keeps integer values in a float tensor (for gradients).
        assert have.dtype == want.dtype or not same_dtype, (op, name, have.dtype, want.dtype)
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=atol, err_msg=f"{op} {name}")


UNARY = ["Relu", "Sigmoid", "Tanh", "Erf", "Neg", "Abs", "Exp", "Floor", "Ceil", "Sign",
         "Softplus", "Softsign", "Identity", "HardSwish", "Sin", "Cos"]  # fmt: skip


@pytest.mark.parametrize("op", UNARY)
def test_unary(op: str) -> None:
    check(op, [f32(2, 3, 4)])


@pytest.mark.parametrize("op", ["Sqrt", "Reciprocal", "Log"])
def test_unary_positive(op: str) -> None:
    check(op, [pos(3, 4)])


@pytest.mark.parametrize(
    ("op", "attrs"),
    [
        ("LeakyRelu", {"alpha": 0.1}),
        ("Elu", {"alpha": 0.7}),
        ("Selu", {}),
        ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
        ("Gelu", {}),
        ("Gelu", {"approximate": "tanh"}),
        ("Softmax", {"axis": 1}),
        ("LogSoftmax", {}),
    ],
)
def test_activation(op: str, attrs: dict[str, Any]) -> None:
    check(op, [f32(2, 5, 3)], attrs, opset=20)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_before_13_flattens(op: str) -> None:
    check(op, [f32(2, 3, 4)], {"axis": 1}, opset=11)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean"])
def test_binary_broadcast(op: str) -> None:
    check(op, [f32(2, 3, 4), pos(3, 1)])


@pytest.mark.parametrize("op", ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"])
def test_compare(op: str) -> None:
    a = np.round(f32(3, 4))
    check(op, [a, np.round(f32(3, 4))])


def test_pow_and_where_and_prelu() -> None:
    check("Pow", [pos(3, 4), scalar(2.0)])
    check("Where", [f32(3, 4) > 0, f32(3, 4), f32(1, 4)])
    check("PRelu", [f32(2, 3, 4, 4), pos(3, 1, 1)])
    check("Clip", [f32(3, 4), scalar(-0.5), scalar(0.5)])
    check("Clip", [f32(3, 4), None, scalar(0.0)])
    check("Clip", [f32(3, 4)], {"min": -0.2, "max": 0.3}, opset=6)
    check("Clip", [np.arange(-6, 6, dtype=np.int64).reshape(3, 4), scalar(-2, np.int64)])


def test_clip_gradient_is_the_in_range_mask() -> None:
    """Constant bounds replay as one fused op: gradient 1 inside (min, max), 0 outside."""
    x = np.array([[-1.0, 0.25, 0.5, 3.0, 5.5, 7.5]], dtype=np.float32)
    model, _ = _model("Clip", [x, scalar(0.0), scalar(6.0)], {}, 1, 18)
    data = torch.tensor(x, requires_grad=True)
    out = GraphReplay(model, trainable=[])({"in0": data})["out0"]
    out.sum().backward()
    assert data.grad is not None
    np.testing.assert_array_equal(data.grad.numpy(), [[0, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(out.detach().numpy(), np.clip(x, 0, 6))


CONV_CASES = [
    {},
    {"pads": [1, 1, 1, 1], "strides": [2, 2]},
    {"pads": [0, 1, 2, 1]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    {"auto_pad": "VALID"},
]


@pytest.mark.parametrize("attrs", CONV_CASES)
def test_conv(attrs: dict[str, Any]) -> None:
    check("Conv", [f32(2, 4, 9, 8), f32(6, 4, 3, 3), f32(6)], attrs)


def test_conv_groups_1d_3d() -> None:
    check("Conv", [f32(1, 4, 7, 7), f32(4, 1, 3, 3)], {"group": 4, "pads": [1, 1, 1, 1]})
    check("Conv", [f32(1, 4, 8, 8), f32(6, 2, 1, 1)], {"group": 2})
    check("Conv", [f32(1, 3, 10), f32(5, 3, 3), f32(5)], {"strides": [2]})
    check("Conv", [f32(1, 2, 4, 5, 5), f32(3, 2, 2, 2, 2)], {"pads": [1, 0, 1, 0, 1, 0]})


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"strides": [2, 2]},
        {"strides": [2, 2], "pads": [1, 0, 1, 2], "output_padding": [1, 1]},
        {"strides": [2, 2], "output_shape": [10, 11]},
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
        {"group": 2, "dilations": [2, 1]},
    ],
)
def test_conv_transpose(attrs: dict[str, Any]) -> None:
    check(
        "ConvTranspose", [f32(1, 4, 5, 5), f32(4, 3, 3, 3), f32(3 * attrs.get("group", 1))], attrs
    )


@pytest.mark.parametrize(
    "attrs",
    [{}, {"transA": 1}, {"transB": 1, "alpha": 0.5, "beta": 2.0}, {"transA": 1, "transB": 1}],
)
def test_gemm(attrs: dict[str, Any]) -> None:
    a = f32(4, 3) if attrs.get("transA") else f32(3, 4)
    b = f32(5, 4) if attrs.get("transB") else f32(4, 5)
    check("Gemm", [a, b, f32(5)], attrs)


def test_matmul_and_einsum() -> None:
    check("MatMul", [f32(2, 3, 4, 5), f32(5, 6)])
    check("MatMul", [f32(4), f32(2, 4, 3)])
    check("Einsum", [f32(2, 3, 4), f32(2, 4, 5)], {"equation": "bij,bjk->bik"})


def test_norms() -> None:
    check(
        "BatchNormalization", [f32(2, 3, 4, 4), f32(3), f32(3), f32(3), pos(3)], {"epsilon": 1e-3}
    )
    check("LayerNormalization", [f32(2, 3, 8), f32(8), f32(8)], outputs=3)
    check("LayerNormalization", [f32(2, 3, 8), f32(3, 8)], {"axis": 1})
    check("InstanceNormalization", [f32(2, 3, 5, 5), f32(3), f32(3)])


@pytest.mark.parametrize(
    ("op", "attrs"),
    [
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2]}),
        ("MaxPool", {"kernel_shape": [3, 3], "pads": [1, 0, 1, 2], "ceil_mode": 1}),
        ("MaxPool", {"kernel_shape": [2, 2], "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        ("MaxPool", {"kernel_shape": [2, 2], "dilations": [2, 2]}),
        ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2]}),
        ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
        ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 0, 1, 2], "count_include_pad": 1}),
        ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
        ("GlobalAveragePool", {}),
        ("GlobalMaxPool", {}),
    ],
)
def test_pool(op: str, attrs: dict[str, Any]) -> None:
    check(op, [f32(2, 3, 9, 9)], attrs)


@pytest.mark.parametrize(
    "op",
    [
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceSumSquare",
        "ReduceLogSumExp",
    ],
)
def test_reduce(op: str) -> None:
    check(op, [f32(2, 3, 4), i64(1, -1)], {"keepdims": 0})
    check(op, [f32(2, 3, 4)])
    check(op, [f32(2, 3, 4)], {"axes": [1]}, opset=13 if op != "ReduceSum" else 11)


def test_arg_and_cumsum() -> None:
    x = np.round(f32(3, 4) * 2)
    check("ArgMax", [x], {"axis": 1, "keepdims": 0})
    check("ArgMin", [x], {"axis": 0, "select_last_index": 1})
    check("CumSum", [f32(3, 4), scalar(1, np.int64)], {"exclusive": 1, "reverse": 1})


def test_shape_ops() -> None:
    x = f32(2, 3, 4)
    check("Shape", [x], {"start": 1})
    check("Size", [x])
    check("Reshape", [x, i64(0, -1)])
    check("Reshape", [x, i64(4, 0, 2)])
    check("Flatten", [x], {"axis": 2})
    check("Transpose", [x], {"perm": [2, 0, 1]})
    check("Transpose", [x])
    check("Squeeze", [f32(1, 3, 1, 2), i64(2)])
    check("Squeeze", [f32(1, 3, 1, 2)])
    check("Squeeze", [f32(1, 3, 1, 2)], {"axes": [0]}, opset=11)
    check("Unsqueeze", [x, i64(0, -1)])
    check("Unsqueeze", [x], {"axes": [1]}, opset=11)
    check("Identity", [x])


def test_concat_split_slice() -> None:
    check("Concat", [f32(2, 3), f32(2, 1), f32(2, 2)], {"axis": 1})
    check("Split", [f32(2, 6), i64(1, 2, 3)], {"axis": 1}, outputs=3)
    check("Split", [f32(7, 2)], {"num_outputs": 3}, outputs=3)
    check("Split", [f32(6, 2)], {"split": [2, 4]}, outputs=2, opset=11)
    x = f32(5, 6, 4)
    check("Slice", [x, i64(1, -4), i64(4, 100), i64(0, 1)])
    check("Slice", [x, i64(-1), i64(-100), i64(1), i64(-2)])
    check("Slice", [x, i64(0, 1), i64(5, 4), i64(0, 2), i64(2, 2)])
    check("Slice", [x], {"starts": [1], "ends": [3], "axes": [2]}, opset=9)


def test_gather_family() -> None:
    x = f32(5, 4, 3)
    check("Gather", [x, np.array([[0, -1], [2, 3]], dtype=np.int64)], {"axis": 1})
    check("Gather", [x, scalar(2, np.int64)])
    check("GatherElements", [x, np.array([[[0, 1, -1]]] * 5, dtype=np.int64)], {"axis": 1})
    check("GatherND", [x, np.array([[0, 1], [4, -1]], dtype=np.int64)])
    check("GatherND", [x, np.array([[1], [0], [3], [2], [0]], dtype=np.int64)], {"batch_dims": 1})


def test_expand_tile_pad() -> None:
    check("Expand", [f32(3, 1), i64(2, 3, 4)])
    check("Expand", [f32(3, 4), i64(1, 1)])
    check("Tile", [f32(2, 3), i64(2, 2)])
    x = f32(1, 2, 5, 6)
    check("Pad", [x, i64(0, 0, 1, 2, 0, 0, 2, 1), scalar(0.5)])
    check("Pad", [x, i64(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "reflect"})
    check("Pad", [x, i64(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "edge"})
    check("Pad", [f32(2, 9), i64(3, 2), None, i64(1)], {"mode": "reflect"})
    check("Pad", [x], {"pads": [0, 1, 0, 0, 0, 0, 1, 1], "value": 1.0}, opset=10)


def test_constants() -> None:
    check("ConstantOfShape", [i64(2, 3)], {"value": numpy_helper.from_array(scalar([1.5]))})
    check("ConstantOfShape", [i64(2, 3)])
    check("Range", [scalar(1, np.int64), scalar(10, np.int64), scalar(3, np.int64)])
    check("Range", [scalar(0.5), scalar(2.0), scalar(0.25)])
    check("Constant", [], {"value": numpy_helper.from_array(f32(2, 2))})
    check("Constant", [], {"value_ints": [1, 2]})
    check("Constant", [], {"value_float": 2.5})


@pytest.mark.parametrize("to", [1, 6, 7, 9])
def test_cast(to: int) -> None:
    check("Cast", [np.round(f32(3, 4) * 3)], {"to": to})
    check("CastLike", [f32(3, 4), scalar(1, np.int64)])


@pytest.mark.parametrize("direction", ["LEFT", "RIGHT"])
def test_bit_shift(direction: str) -> None:
    x = RNG.integers(0, 255, (3, 8), dtype=np.uint8)
    check("BitShift", [x, np.arange(8, dtype=np.uint8)], {"direction": direction})


def test_logic() -> None:
    a, b = f32(3, 4) > 0, f32(3, 4) > 0
    model_inputs = [a, b]
    check("And", model_inputs)
    check("Or", model_inputs)
    check("Xor", model_inputs)
    check("Not", [a])
    check("IsNaN", [f32(3)])
    check("IsInf", [f32(3)])
    check("Dropout", [f32(3, 4)])


@pytest.mark.parametrize(
    "attrs",
    [
        {"mode": "nearest"},
        {
            "mode": "nearest",
            "coordinate_transformation_mode": "asymmetric",
            "nearest_mode": "floor",
        },
        {"mode": "nearest", "nearest_mode": "round_prefer_ceil"},
        {"mode": "linear"},
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
        {"mode": "linear", "coordinate_transformation_mode": "asymmetric"},
    ],
)
def test_resize(attrs: dict[str, Any]) -> None:
    x = f32(1, 2, 4, 5)
    check("Resize", [x, None, np.array([1, 1, 2.0, 1.5], np.float32)], attrs)
    check("Resize", [x, None, None, i64(1, 2, 7, 3)], attrs)


def test_quantize_dequantize() -> None:
    x = f32(2, 3, 4) * 3
    scales = np.array([0.01, 0.02, 0.05], np.float32)
    check("QuantizeLinear", [x, scalar(0.02), scalar(128, np.uint8)], same_dtype=False)
    check("QuantizeLinear", [x, scales, np.zeros(3, np.int8)], same_dtype=False)
    q = RNG.integers(-128, 127, (3, 4), dtype=np.int8)
    check("DequantizeLinear", [q, np.array([0.1, 0.2, 0.3], np.float32), np.ones(3, np.int8)],
          {"axis": 0})  # fmt: skip
    check("DequantizeLinear", [RNG.integers(0, 255, (3,), dtype=np.uint8), scalar(0.5)])


def test_quantize_rounds_straight_through() -> None:
    model, feeds = _model("QuantizeLinear", [f32(4), scalar(0.1), scalar(0, np.int8)], {}, 1, 18)
    replay = GraphReplay(model, trainable=[])
    x = torch.tensor(feeds["in0"], requires_grad=True)
    replay({"in0": x})["out0"].sum().backward()
    # d round(x / 0.1) / dx passes as 1 / 0.1 wherever the value is not saturated.
    np.testing.assert_allclose(x.grad.numpy(), np.full(4, 10.0), rtol=1e-6)


def test_unsupported_attribute_names_node() -> None:
    model, feeds = _model("Resize", [f32(1, 1, 2, 2), None, np.array([1, 1, 2, 2], np.float32)],
                          {"mode": "cubic"}, 1, 18)  # fmt: skip
    with pytest.raises(ReplayError, match=r"node 'Resize_0' \(Resize\) cannot be replayed"):
        GraphReplay(model, trainable=[])(feeds)
