"""Static int8 on a masked attention block whose scores hold -inf (padding masks).

The additive mask is ``Where(mask == 0, -inf, 0)``: the masked scores are -inf, the exported
pattern of ``masked_fill(-inf)``. Every scale must be finite, the quantized model must keep
the padded positions out of the softmax, and its outputs must stay close to fp32 on samples
of varying length. (Calibration of a tensor holding -inf is tested in
``test_quant_calibrate.py``.)
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.quant import quantize_file
from onnxprune.quant.testing import write
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text

_D = 16


def _attention(seed: int = 0):
    rng = np.random.default_rng(seed)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,S,{_D}] x, float[1,S] mask, float[{_D},{_D}] wq, float[{_D},{_D}] wk,
       float[{_D},{_D}] wv, float[{_D},{_D}] wo, float[1] zero, float[1] ninf,
       float[1] scale, int64[1] axes) => (float[1,S,{_D}] y) {{
        q = MatMul (x, wq)
        k = MatMul (x, wk)
        v = MatMul (x, wv)
        kt = Transpose <perm = [0, 2, 1]> (k)
        raw = MatMul (q, kt)
        scores = Mul (raw, scale)
        pad = Equal (mask, zero)
        add = Where (pad, ninf, zero)
        add3 = Unsqueeze (add, axes)
        masked = Add (scores, add3)
        probs = Softmax <axis = -1> (masked)
        ctx = MatMul (probs, v)
        y = MatMul (ctx, wo)
    }}
    """
    weights = {f"w{n}": rng.standard_normal((_D, _D)).astype(np.float32) * 0.3 for n in "qkvo"}
    weights |= {
        "zero": np.zeros(1, np.float32),
        "ninf": np.array([-np.inf], np.float32),
        "scale": np.array([_D**-0.5], np.float32),
        "axes": np.array([1], np.int64),
    }
    return model_from_text(text, weights)


def _sample(rng: np.random.Generator, length: int, padded: int) -> dict[str, np.ndarray]:
    mask = np.ones((1, length), np.float32)
    mask[0, length - padded :] = 0
    return {"x": rng.standard_normal((1, length, _D)).astype(np.float32), "mask": mask}


def test_minus_inf_mask_quantizes_with_finite_scales_and_close_outputs(tmp_path):
    model_path = write(_attention(), tmp_path)
    rng = np.random.default_rng(1)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, length in enumerate((6, 9, 12, 7, 10, 8)):
        np.savez(calib / f"s{i}.npz", **_sample(rng, length, padded=length // 3))
    out = tmp_path / "q.onnx"
    result = quantize_file(model_path, out, calib=calib, smooth="off")
    proto = onnx.load(str(out))
    scales = [
        onnx.numpy_helper.to_array(t)
        for t in proto.graph.initializer
        if t.name.endswith("_scale") and t.data_type == onnx.TensorProto.FLOAT
    ]
    assert scales and all(np.all(np.isfinite(s)) and np.all(s > 0) for s in scales)
    # The masked scores stay float: the mask input of the Add is not quantized, so a Q/DQ
    # pair there would only add round trips (onnxruntime's quantizer puts one there and
    # its range becomes infinite). The softmax output (the -inf turned into exact zeros)
    # and every MatMul are int8.
    skipped = {s["op_type"] for s in result.details.plan["skipped"]}
    assert {"Add", "Softmax"} <= skipped
    assert {"probs_scale", "ctx_scale", "q_scale", "v_scale", "kt_scale"} <= {
        t.name for t in proto.graph.initializer
    }
    assert result.worst["sqnr_db"] > 20.0
    for length, padded in ((11, 3), (5, 0), (13, 6)):
        feed = _sample(rng, length, padded)
        ref = run_model(model_path, feed)["y"]
        got = run_model(out, feed, optimize=True)["y"]
        assert np.all(np.isfinite(got))
        cos = float(ref.ravel() @ got.ravel() / np.linalg.norm(ref) / np.linalg.norm(got))
        assert cos > 0.99, (length, padded, cos)
