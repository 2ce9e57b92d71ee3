"""float16 conversion: float32 I/O, nodes with activations beyond the fp16 range stay fp32."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.quant import quantize_file
from onnxprune.quant.testing import write, write_calib
from onnxprune.testing import model_from_text


def test_overflowing_node_stays_float32_and_io_stays_float32(tmp_path):
    rng = np.random.default_rng(0)
    # Canonicalize folds the scalar Mul into the MatMul weights, so the MatMul output itself
    # exceeds 65504: the MatMul and the Tanh reading it must stay float32.
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,8] x, float[8,8] w, float[1] big) => (float[N,8] y) {
        h = MatMul (x, w)
        b = Mul (h, big)
        y = Tanh (b)
    }
    """
    weights = {
        "w": rng.standard_normal((8, 8)).astype(np.float32),
        "big": np.array([1e5], np.float32),
    }
    calib = write_calib(tmp_path, x=rng.standard_normal((4, 1, 8)).astype(np.float32))
    out = tmp_path / "h.onnx"
    model_path = write(model_from_text(text, weights), tmp_path)
    result = quantize_file(model_path, out, calib=calib, dtype="fp16")
    kept = set(result.details.fp16["kept_fp32"])
    assert result.worst["cosine"] > 0.9999
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert {n.op_type for n in proto.graph.node if n.name in kept} >= {"MatMul", "Tanh"}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # The kept MatMul's weight (scaled by 1e5 by the folding) stays float32.
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in proto.graph.initializer)


def test_fp16_model_halves_the_weights(tmp_path):
    rng = np.random.default_rng(1)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,64] x, float[64,64] w) => (float[N,64] y) {
        h = MatMul (x, w)
        y = Relu (h)
    }
    """
    model = model_from_text(text, {"w": rng.standard_normal((64, 64)).astype(np.float32)})
    calib = write_calib(tmp_path, x=rng.standard_normal((4, 1, 64)).astype(np.float32))
    result = quantize_file(write(model, tmp_path), tmp_path / "h.onnx", calib=calib, dtype="fp16")
    assert result.details.fp16["kept_fp32"] == []
    assert result.worst["sqnr_db"] > 50
    proto = onnx.load(str(tmp_path / "h.onnx"))
    assert proto.graph.initializer[0].data_type == onnx.TensorProto.FLOAT16
