"""Tests for onnxprune.analysis: shapes, MAC/parameter counts, inspect reports.

Oracles are textbook numbers worked out by hand in each test (and ResNet-50 / MobileNetV2
from their papers and torchvision's parameter counts), not numbers read back from the code.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxprune.analysis import (
    SCHEMA,
    conv_output_spatial,
    count_costs,
    format_count,
    infer_shapes,
    inspect_model,
)
from onnxprune.errors import UsageError
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text, random_feeds

HEADER = '<ir_version: 10, opset_import: ["" : 18]>'


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _single_conv(x_shape: str, w_shape: tuple[int, ...], attrs: str) -> ir.Model:
    """One Conv. Its output is declared rank 0 (``float y``), which shape inference cannot
    override, so counting must take the output size from the Conv attributes."""
    return model_from_text(
        f"""{HEADER}
        g (float[{x_shape}] x, float[{",".join(map(str, w_shape))}] w) => (float y) {{
            y = Conv <{attrs}> (x, w)
        }}""",
        {"w": _rand(*w_shape)},
    )


# --- Conv family -------------------------------------------------------------------------


def test_conv_textbook_stem() -> None:
    model = model_from_text(
        f"""{HEADER}
        g (float[1,3,224,224] x, float[64,3,7,7] w, float[64] b) => (float[1,64,112,112] y) {{
            y = Conv <strides=[2,2], pads=[3,3,3,3]> (x, w, b)
        }}""",
        {"w": _rand(64, 3, 7, 7), "b": _rand(64)},
    )
    cost = count_costs(model)
    # 64 * 112 * 112 output pixels, each 3 * 7 * 7 multiply-adds; the bias add is not a MAC.
    assert cost.total_macs == 64 * 112 * 112 * 3 * 49 == 118_013_952
    assert cost.nodes[0].params == 64 * 3 * 49 + 64
    assert cost.nodes[0].output_shape == (1, 64, 112, 112)
    assert cost.uncounted == [] and cost.assumed_dims == {}


@pytest.mark.parametrize(
    ("w_shape", "attrs", "expected"),
    [
        # grouped: C_in 8 in 4 groups -> 2 input channels per output, 10x10 out
        ((16, 2, 3, 3), "group=4, pads=[1,1,1,1]", 16 * 100 * 2 * 9),
        # depthwise, stride 2: 5x5 out, one input channel per output
        ((8, 1, 3, 3), "group=8, strides=[2,2], pads=[1,1,1,1]", 8 * 25 * 9),
        # dilation 2, no pad: extent 5 -> 6x6 out
        ((4, 8, 3, 3), "dilations=[2,2]", 4 * 36 * 8 * 9),
        # SAME_UPPER stride 3: ceil(10 / 3) = 4
        ((4, 8, 3, 3), 'auto_pad="SAME_UPPER", strides=[3,3]', 4 * 16 * 8 * 9),
    ],
)
def test_conv_variants(w_shape: tuple[int, ...], attrs: str, expected: int) -> None:
    model = _single_conv("1,8,10,10", w_shape, attrs)
    assert count_costs(model).total_macs == expected


@pytest.mark.parametrize(
    ("kwargs", "attrs"),
    [
        ({"strides": [2, 3], "pads": [1, 0, 2, 1]}, "strides=[2,3], pads=[1,0,2,1]"),
        ({"dilations": [2, 1], "strides": [1, 2]}, "dilations=[2,1], strides=[1,2]"),
        ({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, 'auto_pad="SAME_LOWER", strides=[2,2]'),
        ({"auto_pad": "VALID", "strides": [3, 2]}, 'auto_pad="VALID", strides=[3,2]'),
    ],
)
def test_conv_output_spatial_matches_onnxruntime(kwargs: dict, attrs: str) -> None:
    model = _single_conv("1,2,11,9", (3, 2, 3, 4), attrs)
    (got,) = run_model(model, random_feeds(model)).values()
    assert conv_output_spatial((11, 9), (3, 4), **kwargs) == got.shape[2:]


def test_conv_transpose() -> None:
    model = model_from_text(
        f"""{HEADER}
        g (float[1,8,5,5] x, float[8,2,3,3] w) => (float y) {{
            y = ConvTranspose <group=2, strides=[2,2]> (x, w)
        }}""",
        {"w": _rand(8, 2, 3, 3)},
    )
    # every input pixel (8 * 5 * 5) scatters C_out/group (2) x 3 x 3 products
    assert count_costs(model).total_macs == 8 * 25 * 2 * 9


# --- Gemm / MatMul / Einsum --------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "attrs"),
    [("4,32", "16,32", "transB=1"), ("32,4", "32,16", "transA=1"), ("4,32", "32,16", "")],
)
def test_gemm(a: str, b: str, attrs: str) -> None:
    model = model_from_text(
        f"""{HEADER}
        g (float[{a}] a, float[{b}] w, float[16] c) => (float y) {{
            y = Gemm <{attrs or "alpha=1.0"}> (a, w, c)
        }}""",
        {"w": _rand(*map(int, b.split(","))), "c": _rand(16)},
    )
    cost = count_costs(model)
    assert cost.total_macs == 4 * 32 * 16
    assert cost.nodes[0].params == 32 * 16 + 16


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("2,1,5,6", "3,6,7", 2 * 3 * 5 * 6 * 7),  # broadcast batch [2,1] x [3] -> [2,3]
        ("6", "6,7", 6 * 7),  # 1-D left operand is a row vector
        ("4,5,6", "6", 4 * 5 * 6),  # 1-D right operand is a column vector
    ],
)
def test_matmul_broadcast(a: str, b: str, expected: int) -> None:
    model = model_from_text(
        f"{HEADER} g (float[{a}] a, float[{b}] b) => (float y) {{ y = MatMul(a, b) }}"
    )
    assert count_costs(model).total_macs == expected


def test_einsum_two_operands() -> None:
    model = model_from_text(
        f"""{HEADER}
        g (float[2,3,4] a, float[2,4,5] b, float[7,2,4] c) => (float y, float z, float t) {{
            y = Einsum <equation="bij,bjk->bik"> (a, b)
            z = Einsum <equation="...ij,...jk"> (a, b)
            t = Einsum <equation="bij->bji"> (a)
        }}"""
    )
    costs = [n.macs for n in count_costs(model).nodes]
    assert costs == [2 * 3 * 4 * 5, 2 * 3 * 4 * 5, 0]


def _attention(heads: int = 4, dim: int = 64) -> ir.Model:
    """Self-attention whose head split takes its target shape from Shape arithmetic."""
    head = dim // heads
    text = f"""{HEADER}
    g (float[batch,seq,{dim}] x, float[{dim},{dim}] wq, float[{dim},{dim}] wk,
       float[{dim},{dim}] wv, int64[2] hd) => (float[batch,{heads},seq,{head}] out) {{
        bs = Shape <start=0, end=2> (x)
        target = Concat <axis=0> (bs, hd)
        q0 = MatMul(x, wq)
        k0 = MatMul(x, wk)
        v0 = MatMul(x, wv)
        q1 = Reshape(q0, target)
        k1 = Reshape(k0, target)
        v1 = Reshape(v0, target)
        q = Transpose <perm=[0,2,1,3]> (q1)
        kt = Transpose <perm=[0,2,3,1]> (k1)
        v = Transpose <perm=[0,2,1,3]> (v1)
        scores = MatMul(q, kt)
        probs = Softmax <axis=-1> (scores)
        out = MatMul(probs, v)
    }}"""
    weights = {name: _rand(dim, dim, seed=i) for i, name in enumerate(("wq", "wk", "wv"))}
    return model_from_text(text, {**weights, "hd": np.array([heads, head], np.int64)})


def test_attention_matmuls_with_data_propagation() -> None:
    cost = count_costs(_attention(), dims={"batch": 2, "seq": 10})
    assert cost.uncounted == []  # Reshape targets resolved through Shape -> Concat
    macs = [n.macs for n in cost.nodes if n.macs]
    projections = [2 * 10 * 64 * 64] * 3
    assert macs == [*projections, 2 * 4 * 10 * 16 * 10, 2 * 4 * 10 * 10 * 16]
    assert cost.dims == {"batch": 2, "seq": 10} and cost.assumed_dims == {}
    # the int64 head-shape initializer is not a weight; the total still counts it
    assert sum(n.params for n in cost.nodes) == 3 * 64 * 64
    assert cost.total_params == 3 * 64 * 64 + 2


# --- Symbolic dims, unknown shapes, immutability -----------------------------------------


def test_symbolic_dims_kept_bound_and_assumed() -> None:
    model = _attention()
    symbolic = infer_shapes(model)
    shapes = {v.name: v.shape for n in symbolic.graph for v in n.outputs}
    assert str(shapes["scores"]) == "[batch,4,seq,seq]"
    assert str(shapes["q0"]) == "[batch,seq,64]"

    assumed = count_costs(model)
    assert assumed.assumed_dims == {"batch": 1, "seq": 1}
    bound = count_costs(model, dims={"batch": 3, "seq": 1})
    assert bound.total_macs == 3 * assumed.total_macs
    partly = count_costs(model, dims={"seq": 8})
    assert partly.assumed_dims == {"batch": 1} and partly.dims == {"seq": 8}


def test_unnamed_dims_are_assumed_and_reported() -> None:
    model = model_from_text(
        f"""{HEADER}
        g (float[?,8] a, float[8,4] w) => (float[?,4] y) {{ y = MatMul(a, w) }}""",
        {"w": _rand(8, 4)},
    )
    cost = count_costs(model, default_dim=5)
    assert cost.assumed_dims == {"a[0]": 5}
    assert cost.total_macs == 5 * 8 * 4


def test_infer_shapes_does_not_modify_the_model() -> None:
    model = _attention()
    before = ir.to_onnx_text(model)
    inputs = [v.name for v in model.graph.inputs]
    inits = list(model.graph.initializers)
    result = infer_shapes(model, {"x": [2, 5, 64]}, dims={"batch": 2})
    assert result is not model
    assert [v.name for v in model.graph.inputs] == inputs
    assert list(model.graph.initializers) == inits
    assert model.graph.node(0).outputs[0].shape is None
    assert ir.to_onnx_text(model) == before
    # the result shares the tensors, it does not copy them
    assert result.graph.initializers["wq"].const_value is model.graph.initializers["wq"].const_value
    assert str(result.graph.outputs[0].shape) == "[2,4,5,16]"


def test_overrides_reject_unknown_inputs() -> None:
    with pytest.raises(UsageError, match="unknown inputs \\['nope'\\]"):
        infer_shapes(_attention(), {"nope": [1]})


def test_unknown_shapes_and_unmodelled_ops_are_uncounted() -> None:
    model = model_from_text(
        """<ir_version: 10, opset_import: ["" : 18, "com.example" : 1]>
        g (float[2,8] a, float[8,4] w, float[4,4] v) => (float y, float z) {
            h = com.example.Mystery(a)
            y = MatMul(h, w)
            z = com.example.Mystery(a)
        }""",
        {"w": _rand(8, 4)},
    )
    cost = count_costs(model)
    reasons = {n.index: n.reason for n in cost.uncounted}
    assert reasons == {
        0: "op of domain 'com.example' is not modelled",
        1: "shape of 'h' is unknown",
        2: "op of domain 'com.example' is not modelled",
    }
    assert cost.total_macs == 0
    assert cost.nodes[1].params == 32


def test_shared_initializer_counted_once_in_total() -> None:
    model = model_from_text(
        f"""{HEADER}
        g (float[2,8] a, float[8,8] w) => (float y) {{ h = MatMul(a, w)  y = MatMul(h, w) }}""",
        {"w": _rand(8, 8)},
    )
    cost = count_costs(model)
    assert [n.params for n in cost.nodes] == [64, 64]
    assert cost.total_params == 64
    assert cost.total_macs == 2 * (2 * 8 * 8)


# --- Reference CNNs built with onnx.helper, weights as lazy external data ----------------


class _Net:
    """Builds a CNN as ONNX. Weights are external tensors in a file that does not exist, so
    any attempt to read weight bytes fails; BN is a frozen per-channel scale and shift."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []
        self.offset = 0

    def _name(self, prefix: str) -> str:
        return f"{prefix}{len(self.nodes)}_{len(self.weights)}"

    def weight(self, *shape: int) -> str:
        tensor = onnx.TensorProto(name=self._name("w"), data_type=onnx.TensorProto.FLOAT)
        tensor.dims.extend(shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        length = 4 * math.prod(shape)
        for key, value in (("location", "absent.bin"), ("offset", self.offset), ("length", length)):
            tensor.external_data.add(key=key, value=str(value))
        self.offset += length
        self.weights.append(tensor)
        return tensor.name

    def op(self, op_type: str, *inputs: str, **attrs: object) -> str:
        out = self._name("t")
        self.nodes.append(onnx.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def conv_bn(self, x: str, cin: int, cout: int, k: int, s: int = 1, *, g: int = 1) -> str:
        pad = [k // 2] * 4
        y = self.op("Conv", x, self.weight(cout, cin // g, k, k), strides=[s, s], pads=pad, group=g)
        y = self.op("Mul", y, self.weight(cout, 1, 1))
        return self.op("Add", y, self.weight(cout, 1, 1))

    def head(self, x: str, channels: int) -> str:
        x = self.op("Flatten", self.op("GlobalAveragePool", x))
        return self.op("Gemm", x, self.weight(1000, channels), self.weight(1000), transB=1)

    def model(self, out: str) -> ir.Model:
        graph = onnx.helper.make_graph(
            self.nodes,
            "net",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 224, 224])],
            [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, ["N", 1000])],
            self.weights,
        )
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
        return ir.serde.deserialize_model(proto)


def _resnet50() -> ir.Model:
    net = _Net()
    x = net.op("Relu", net.conv_bn("x", 3, 64, 7, 2))
    x = net.op("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for block in range(blocks):
            s = stride if block == 0 else 1
            y = net.op("Relu", net.conv_bn(x, cin, width, 1))
            y = net.op("Relu", net.conv_bn(y, width, width, 3, s))  # v1.5: stride on the 3x3
            y = net.conv_bn(y, width, 4 * width, 1)
            skip = net.conv_bn(x, cin, 4 * width, 1, s) if block == 0 else x
            x, cin = net.op("Relu", net.op("Add", y, skip)), 4 * width
    return net.model(net.head(x, 2048))


def _mobilenet_v2() -> ir.Model:
    net = _Net()
    x, cin = net.op("Relu", net.conv_bn("x", 3, 32, 3, 2)), 32
    settings = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
    for t, c, n, s in (*settings, (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            stride, hidden = (s if i == 0 else 1), cin * t
            y = net.op("Relu", net.conv_bn(x, cin, hidden, 1)) if t != 1 else x
            y = net.op("Relu", net.conv_bn(y, hidden, hidden, 3, stride, g=hidden))
            y = net.conv_bn(y, hidden, c, 1)
            x, cin = (net.op("Add", x, y) if stride == 1 and cin == c else y), c
    x = net.op("Relu", net.conv_bn(x, 320, 1280, 1))
    return net.model(net.head(x, 1280))


def test_resnet50_textbook_numbers() -> None:
    model = _resnet50()
    report = inspect_model(model, dims={"N": 1}, top=5)
    # He et al. 2016: 3.8e9 FLOPs for v1; v1.5 (torchvision) is 4.09e9 multiply-adds.
    assert report.total_macs == pytest.approx(4.09e9, rel=0.02)
    assert report.total_params == 25_557_032  # torchvision resnet50: sum(p.numel())
    assert report.uncounted == [] and report.assumed_dims == {}
    assert report.op_histogram["Conv"] == 53
    assert report.inputs[0].shape == ("N", 3, 224, 224)
    assert report.nodes[0].output_shape == ("N", 64, 112, 112)
    assert report.top[0].macs == max(n.macs or 0 for n in report.nodes)
    assert len(report.top) == 5


def test_mobilenet_v2_textbook_numbers() -> None:
    cost = count_costs(_mobilenet_v2())
    assert 0.300e9 <= cost.total_macs <= 0.315e9  # Sandler et al. 2018: 300M multiply-adds
    assert cost.total_params == 3_504_872  # torchvision mobilenet_v2: sum(p.numel())
    assert cost.assumed_dims == {"N": 1}
    assert cost.uncounted == []
    first_depthwise = cost.nodes[4]  # stem Conv, Mul, Add, Relu, then the block's 3x3
    assert first_depthwise.macs == 32 * 112 * 112 * 9 and first_depthwise.params == 32 * 9


# --- Reports ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [(4_110_000_000, "4.11 G"), (25_557_032, "25.56 M"), (9408, "9.41 K"), (512, "512"), (0, "0")],
)
def test_format_count(value: int, text: str) -> None:
    assert format_count(value) == text


def test_report_dict_and_tables() -> None:
    report = inspect_model(_attention(), dims={"batch": 2}, top=2)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema"] == SCHEMA == "onnxprune.inspect/1"
    assert data["inputs"][0] == {"name": "x", "dtype": "float", "shape": ["batch", "seq", 64]}
    assert data["dims"] == {"batch": 2} and data["assumed_dims"] == {"seq": 1}
    assert data["opset_imports"] == {"": 18}
    assert data["op_histogram"]["MatMul"] == 5 and data["uncounted"] == []
    assert data["total_macs"] == 3 * 2 * 64 * 64 + 2 * (2 * 4 * 16)
    assert [n["macs"] for n in data["top"]] == [2 * 64 * 64] * 2
    assert data["nodes"][2]["output_shape"] == ["batch", "seq", 64]  # symbolic kept
    assert data["file_size"] is None

    text = report.to_text()
    assert "24.83 K (24832)" in text
    assert "batch=2, seq=1 (assumed)" in text
    markdown = report.to_markdown()
    assert "| 1 | <MatMul#2> | MatMul | 8.19 K | 4.10 K | 33.0% | [batch,seq,64] |" in markdown


def test_report_lists_uncounted_nodes() -> None:
    model = model_from_text(
        f"""{HEADER}
        g (float[5,2,4] x, float[1,32,4] w, float[1,32,8] r) => (float y) {{
            y = LSTM <hidden_size=8> (x, w, r)
        }}""",
        {"w": _rand(1, 32, 4), "r": _rand(1, 32, 8)},
    )
    report = inspect_model(model)
    assert [(n.op_type, n.reason) for n in report.uncounted] == [
        ("LSTM", "MACs of LSTM are not modelled")
    ]
    assert report.to_dict()["uncounted"][0]["reason"] == "MACs of LSTM are not modelled"
    assert "uncounted: <LSTM#0> (LSTM): MACs of LSTM are not modelled" in report.to_text()
    assert "| <LSTM#0> | LSTM | MACs of LSTM are not modelled |" in report.to_markdown()


def test_file_size_counts_each_external_file_once(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    ir.save(_attention(), path, external_data="weights.bin", size_threshold_bytes=0)
    loaded = ir.load(path)
    report = inspect_model(loaded, path=path)
    sizes = report.file_size
    assert sizes is not None
    assert sizes.model_bytes == path.stat().st_size
    assert sizes.external_files == ("weights.bin",)
    assert sizes.external_bytes == (tmp_path / "weights.bin").stat().st_size >= 3 * 64 * 64 * 4
    assert report.to_dict()["file_size"]["total_bytes"] == sizes.total_bytes
    # The external int64 head shape (16 bytes) is read so the Reshapes resolve; weights are not.
    assert report.total_macs == count_costs(_attention()).total_macs
    assert report.assumed_dims == {"batch": 1, "seq": 1}

    (tmp_path / "weights.bin").unlink()  # lazy tensors: analysis still works, file reported
    report = inspect_model(ir.load(path), path=path)
    assert report.file_size is not None and report.file_size.missing_files == ("weights.bin",)
    assert report.file_size.external_bytes == 0
    # The head-shape constant cannot be read now: the Reshape dims it would have resolved are
    # assumed (and reported) instead of silently guessed.
    assert set(report.assumed_dims) > {"batch", "seq"}


def _torch_resnet50(torch: Any) -> Any:
    """torchvision-style ResNet-50 (v1.5), defined here so the test needs only torch."""
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                *(nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()),
                nn.Conv2d(width, width, 3, stride, 1, bias=False),
                *(nn.BatchNorm2d(width), nn.ReLU()),
                *(nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)),
            )
            self.skip = nn.Identity()
            if stride != 1 or cin != 4 * width:
                down = nn.Conv2d(cin, 4 * width, 1, stride, bias=False)
                self.skip = nn.Sequential(down, nn.BatchNorm2d(4 * width))

        def forward(self, x: Any) -> Any:
            return torch.relu(self.body(x) + self.skip(x))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    layers.append(nn.MaxPool2d(3, 2, 1))
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for block in range(blocks):
            layers.append(Bottleneck(cin, width, stride if block == 0 else 1))
            cin = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers).eval()


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_exported_resnet50() -> None:
    """A real exporter's graph (BN folded, dynamic batch) gives the textbook numbers too."""
    torch = pytest.importorskip("torch")
    net = _torch_resnet50(torch)
    assert sum(p.numel() for p in net.parameters()) == 25_557_032
    buffer = io.BytesIO()
    # The TorchScript exporter takes ~1 s here; the dynamo one ~15 s.
    torch.onnx.export(
        net,
        (torch.randn(1, 3, 224, 224),),
        buffer,
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    model = ir.serde.deserialize_model(onnx.load_from_string(buffer.getvalue()))
    report = inspect_model(model, dims={"batch": 2})
    assert report.inputs[0].shape == ("batch", 3, 224, 224)
    assert report.total_macs == 2 * 4_089_184_256  # same convs as the helper-built graph
    assert report.uncounted == [] and report.assumed_dims == {}
    # BN is folded into conv biases and identical (zero) biases are shared: close to torch's.
    assert report.total_params == pytest.approx(25.56e6, rel=0.005)


def test_shapes_flow_through_fused_contrib_activations() -> None:
    """Our activation fusions write com.microsoft Gelu/QuickGelu; onnx's shape inference
    does not know them, which once left every later MatMul uncounted (and unprunable)."""
    import onnx_ir as ir

    from onnxprune.analysis.macs import count_costs

    text = """
    <ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[batch, 16, 8] x, float[8, 32] w1, float[32, 8] w2) => (float[batch, 16, 8] y) {
      h = MatMul (x, w1)
      a = com.microsoft.Gelu (h)
      q = com.microsoft.QuickGelu <alpha=1.0> (a)
      y = MatMul (q, w2)
    }
    """
    rng = np.random.default_rng(0)
    model = model_from_text(
        text,
        {
            "w1": rng.standard_normal((8, 32)).astype(np.float32),
            "w2": rng.standard_normal((32, 8)).astype(np.float32),
        },
    )
    costs = count_costs(model, dims={"batch": 1})
    assert not costs.uncounted
    assert costs.total_macs == 2 * 16 * 8 * 32
    assert isinstance(model, ir.Model)


# --- issue 14 item 24: symbolic input dims --------------------------------------------------


def _symbolic_mlp() -> ir.Model:
    return model_from_text(
        f"""{HEADER}
        g (float[batch,C] x, int64[batch,seq] ids, float[16,8] w) => (float[batch,8] y,
           int64[batch,seq] z) {{
            [mm] y = MatMul (x, w)
            z = Identity (ids)
        }}""",
        {"w": _rand(16, 8)},
    )


def test_channel_dim_is_derived_from_the_weight_not_bound_to_one() -> None:
    cost = count_costs(_symbolic_mlp())
    assert cost.total_macs == 16 * 8  # C=16 from the MatMul weight; batch=1
    assert cost.assumed_dims == {"batch": 1, "C": 16, "seq": 1}
    assert cost.dim_sources == {
        "batch": "leading (batch) axis",
        "C": "reduction axis of MatMul 'mm'",
        "seq": None,
    }


def test_inspect_says_which_dims_it_chose(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from onnxprune.cli import main

    path = tmp_path / "m.onnx"
    ir.save(_symbolic_mlp(), path)
    assert main(["inspect", str(path)]) == 0
    captured = capsys.readouterr()
    assert "C=16 (derived: reduction axis of MatMul 'mm')" in captured.out
    assert "batch=1 (assumed: leading (batch) axis)" in captured.out
    (notice,) = captured.err.splitlines()
    assert notice == (
        "onnxprune inspect: note: symbolic dims not given, using batch=1 (leading (batch) "
        "axis), C=16 (reduction axis of MatMul 'mm'), seq=1 (assumed: nothing in the graph "
        "fixes it); set them with --dim NAME=SIZE"
    )
    assert main(["inspect", str(path), "--dim", "batch=2", "--dim", "seq=4"]) == 0
    assert "seq=1" not in capsys.readouterr().err
