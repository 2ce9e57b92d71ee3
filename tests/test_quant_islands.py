"""Float islands in onnxruntime's optimized graph: found, named, and gone once a zero Pad folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxprune.quant import quantize_file
from onnxprune.quant.islands import find_islands
from onnxprune.quant.testing import write, write_calib
from onnxprune.testing import model_from_text


def pad_between_convs(folder: Path, mode: str) -> tuple[Path, Path]:
    """Conv -> Relu -> Pad(mode) -> Conv -> Relu -> GlobalAveragePool, and its calibration."""
    rng = np.random.default_rng(0)
    text = f"""<ir_version: 8, opset_import: ["" : 13]>
    g (float[N,3,8,8] x, float[8,3,3,3] w1, float[8,8,3,3] w2) => (float[N,8,1,1] y) {{
      c1 = Conv <pads = [1,1,1,1]> (x, w1)
      r1 = Relu (c1)
      pads = Constant <value = int64[8] {{0,0,1,1,0,0,1,1}}> ()
      p = Pad <mode = "{mode}"> (r1, pads)
      c2 = Conv (p, w2)
      r2 = Relu (c2)
      y = GlobalAveragePool (r2)
    }}"""
    weights = {
        "w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32),
    }
    model = write(model_from_text(text, weights), folder)
    calib = write_calib(folder, x=rng.standard_normal((8, 1, 3, 8, 8)).astype(np.float32))
    return model, calib


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_quantize_reports_the_pad_island_unless_folded(tmp_path: Path, mode: str) -> None:
    model, calib = pad_between_convs(tmp_path, mode)
    result = quantize_file(model, tmp_path / "q.onnx", calib=calib, bias_correction="off")
    islands = result.details.int8_mac_share["islands"]
    pads = [i for i in islands if i["op_type"] == "Pad"]
    if mode == "reflect":  # no integer Pad kernel for reflect: DQ -> Pad -> Q stays
        assert [i["kind"] for i in pads] == ["float island"]
        assert "float island Pad" in result.summary()
    else:  # folded into the second Conv's pads: both convolutions are QLinearConv
        assert pads == []
        assert result.details.int8_mac_share["int8_mac_share"] == 1.0
        assert "onnxruntime's graph: none" in result.summary()


def test_find_islands_on_a_hand_written_graph() -> None:
    def q(name: str, src: str) -> onnx.NodeProto:
        return helper.make_node("QuantizeLinear", [src, "s", "z"], [name], name=name)

    def dq(name: str, src: str) -> onnx.NodeProto:
        return helper.make_node("DequantizeLinear", [src, "s", "z"], [name], name=name)

    nodes = [
        q("xq", "x"),
        helper.make_node("QLinearConv", ["xq", "s", "z", "wq", "s", "z", "s", "z"], ["c"]),
        dq("cd", "c"),
        helper.make_node("Resize", ["cd", "", "sc"], ["r"], name="resize"),
        q("rq", "r"),
        dq("rd", "rq"),
        q("rq2", "rd"),  # requantize pair: rd read by a QuantizeLinear
        dq("wd", "wq"),  # a constant weight's DQ is no island
        helper.make_node("Mul", ["wd", "wd"], ["m"], name="weight_only"),
        q("mq", "m"),
        dq("y", "rq2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor("wq", onnx.TensorProto.INT8, [1], [1])],
    )
    found = find_islands(helper.make_model(graph), ["QLinearConv"])
    assert found == [
        {"kind": "float island", "node": "resize", "op_type": "Resize"},
        {"kind": "requantize pair", "node": "rd", "op_type": "DequantizeLinear", "tensor": "rd"},
    ]


def test_conv_at_a_graph_output_runs_int8_and_keeps_the_output_name(tmp_path: Path) -> None:
    # A dangling Q/DQ on a graph output left the last Conv float in onnxruntime; the output
    # now reads the DQ (same name), and a GlobalAveragePool output keeps no Q/DQ at all.
    rng = np.random.default_rng(3)
    text = """<ir_version: 8, opset_import: ["" : 13]>
    g (float[N,3,8,8] x, float[8,3,3,3] w1, float[4,8,1,1] w2) => (float[N,4,8,8] y,
                                                                   float[N,8,1,1] g) {
      c1 = Conv <pads = [1,1,1,1]> (x, w1)
      r1 = Relu (c1)
      g = GlobalAveragePool (r1)
      y = Conv (r1, w2)
    }"""
    weights = {
        "w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "w2": rng.standard_normal((4, 8, 1, 1)).astype(np.float32),
    }
    model = write(model_from_text(text, weights), tmp_path)
    calib = write_calib(tmp_path, x=rng.standard_normal((8, 1, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    result = quantize_file(model, out, calib=calib, bias_correction="off")
    share = result.details.int8_mac_share
    assert share["int8_mac_share"] == 1.0
    assert share["islands"] == []
    proto = onnx.load(str(out))
    assert [o.name for o in proto.graph.output] == ["y", "g"]
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    assert producers["y"] == "DequantizeLinear"
    assert producers["g"] == "GlobalAveragePool"
    assert result.fidelity.held_out.outputs["y"]["sqnr_db"] > 25
