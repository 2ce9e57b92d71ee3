"""Tiny models for pruning tests, one builder per topology (weights from a seeded rng)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

from onnxprune.testing import model_from_text

HEADER = '<ir_version: 10, opset_import: ["" : 18]>'


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32) * 0.5


def conv_chain(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    text = f"""{HEADER}
g (float[1,3,8,8] x, float[16,3,3,3] w1, float[16] b1, float[16,16,3,3] w2, float[16] b2,
   float[4,16,1,1] w3) => (float[1,4,8,8] y) {{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, w2, b2)
  r2 = Relu (c2)
  y = Conv (r2, w3)
}}"""
    return model_from_text(
        text,
        {
            "w1": _w(rng, 16, 3, 3, 3),
            "b1": _w(rng, 16),
            "w2": _w(rng, 16, 16, 3, 3),
            "b2": _w(rng, 16),
            "w3": _w(rng, 4, 16, 1, 1),
        },
    )


def residual_bn(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    text = f"""{HEADER}
g (float[2,3,6,6] x, float[16,3,3,3] w0, float[16,16,3,3] w1, float[16] s, float[16] b,
   float[16] m, float[16] v, float[16,16,1,1] w2, float[16] b2, float[5,16,1,1] w3)
  => (float[2,5,6,6] y) {{
  h = Conv <pads=[1,1,1,1]> (x, w0)
  a = Relu (h)
  c = Conv <pads=[1,1,1,1]> (a, w1)
  n = BatchNormalization (c, s, b, m, v)
  r = Relu (n)
  d = Conv (r, w2, b2)
  sum = Add (d, h)
  o = Relu (sum)
  y = Conv (o, w3)
}}"""
    return model_from_text(
        text,
        {
            "w0": _w(rng, 16, 3, 3, 3),
            "w1": _w(rng, 16, 16, 3, 3),
            "s": _w(rng, 16) + 1,
            "b": _w(rng, 16),
            "m": _w(rng, 16),
            "v": np.abs(_w(rng, 16)) + 0.5,
            "w2": _w(rng, 16, 16, 1, 1),
            "b2": _w(rng, 16),
            "w3": _w(rng, 5, 16, 1, 1),
        },
    )


def concat_split(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    text = f"""{HEADER}
g (float[1,3,8,8] x, float[8,3,1,1] wa, float[16,3,3,3] wb, float[24,24,1,1] wc,
   int64[2] sizes, float[4,8,1,1] wd, float[4,16,1,1] we) => (float[1,4,8,8] y) {{
  a = Conv (x, wa)
  ra = Relu (a)
  b = Conv <pads=[1,1,1,1]> (x, wb)
  rb = Relu (b)
  cat = Concat <axis=1> (ra, rb)
  c = Conv (cat, wc)
  rc = Relu (c)
  p, q = Split <axis=1> (rc, sizes)
  dp = Conv (p, wd)
  dq = Conv (q, we)
  y = Add (dp, dq)
}}"""
    return model_from_text(
        text,
        {
            "wa": _w(rng, 8, 3, 1, 1),
            "wb": _w(rng, 16, 3, 3, 3),
            "wc": _w(rng, 24, 24, 1, 1),
            "sizes": np.array([8, 16], np.int64),
            "wd": _w(rng, 4, 8, 1, 1),
            "we": _w(rng, 4, 16, 1, 1),
        },
    )


def depthwise_se(seed: int = 0) -> ir.Model:
    """Expand 1x1 -> depthwise 3x3 (multiplier 2) -> squeeze-excitation gate -> project."""
    rng = np.random.default_rng(seed)
    text = f"""{HEADER}
g (float[1,4,8,8] x, float[16,4,1,1] we, float[16] be, float[32,1,3,3] wd, float[32] bd,
   float[8,32,1,1] ws1, float[8] bs1, float[32,8,1,1] ws2, float[32] bs2, float[6,32,1,1] wp)
  => (float[1,6,8,8] y) {{
  e = Conv (x, we, be)
  re = Clip (e)
  d = Conv <group=16, pads=[1,1,1,1]> (re, wd, bd)
  rd = Relu (d)
  pool = GlobalAveragePool (rd)
  s1 = Conv (pool, ws1, bs1)
  rs1 = Relu (s1)
  s2 = Conv (rs1, ws2, bs2)
  gate = Sigmoid (s2)
  scaled = Mul (rd, gate)
  y = Conv (scaled, wp)
}}"""
    return model_from_text(
        text,
        {
            "we": _w(rng, 16, 4, 1, 1),
            "be": _w(rng, 16),
            "wd": _w(rng, 32, 1, 3, 3),
            "bd": _w(rng, 32),
            "ws1": _w(rng, 8, 32, 1, 1),
            "bs1": _w(rng, 8),
            "ws2": _w(rng, 32, 8, 1, 1),
            "bs2": _w(rng, 32),
            "wp": _w(rng, 6, 32, 1, 1),
        },
    )


def flatten_classifier(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    text = f"""{HEADER}
g (float[batch,1,6,6] x, float[8,1,3,3] w1, float[8] b1, float[16,8,3,3] w2, float[16] b2,
   int64[2] shape, float[32,64] fc1, float[32] fb1, float[10,32] fc2, float[10] fb2)
  => (float[batch,10] y) {{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,1,1,1], strides=[3,3]> (r1, w2, b2)
  r2 = Relu (c2)
  f = Reshape (r2, shape)
  h = Gemm <transB=1> (f, fc1, fb1)
  rh = Relu (h)
  y = Gemm <transB=1> (rh, fc2, fb2)
}}"""
    return model_from_text(
        text,
        {
            "w1": _w(rng, 8, 1, 3, 3),
            "b1": _w(rng, 8),
            "w2": _w(rng, 16, 8, 3, 3),
            "b2": _w(rng, 16),
            "shape": np.array([0, -1], np.int64),
            "fc1": _w(rng, 32, 64),
            "fb1": _w(rng, 32),
            "fc2": _w(rng, 10, 32),
            "fb2": _w(rng, 10),
        },
    )


def attention_ffn(seed: int = 0, heads: int = 4, head_dim: int = 8, ffn: int = 48) -> ir.Model:
    """One transformer block: multi-head attention (MatMul/Reshape/Transpose) and a GELU FFN."""
    rng = np.random.default_rng(seed)
    d = heads * head_dim
    text = f"""{HEADER}
g (float[batch,seq,{d}] x, float[{d},{d}] wq, float[{d}] bq, float[{d},{d}] wk, float[{d}] bk,
   float[{d},{d}] wv, float[{d}] bv, float[{d},{d}] wo, float[{d}] bo, int64[4] split,
   int64[3] merge, float scale, float[{d},{ffn}] w1, float[{ffn}] b1, float[{ffn},{d}] w2,
   float[{d}] b2, float[{d}] gamma, float[{d}] beta) => (float[batch,seq,{d}] y) {{
  q0 = MatMul (x, wq)
  q1 = Add (q0, bq)
  q2 = Reshape (q1, split)
  q = Transpose <perm=[0,2,1,3]> (q2)
  k0 = MatMul (x, wk)
  k1 = Add (k0, bk)
  k2 = Reshape (k1, split)
  kt = Transpose <perm=[0,2,3,1]> (k2)
  v0 = MatMul (x, wv)
  v1 = Add (v0, bv)
  v2 = Reshape (v1, split)
  v = Transpose <perm=[0,2,1,3]> (v2)
  s0 = MatMul (q, kt)
  s = Mul (s0, scale)
  p = Softmax <axis=-1> (s)
  ctx0 = MatMul (p, v)
  ctx1 = Transpose <perm=[0,2,1,3]> (ctx0)
  ctx = Reshape (ctx1, merge)
  o0 = MatMul (ctx, wo)
  o = Add (o0, bo)
  res = Add (o, x)
  ln = LayerNormalization <axis=-1> (res, gamma, beta)
  f0 = MatMul (ln, w1)
  f1 = Add (f0, b1)
  f2 = Gelu (f1)
  f3 = MatMul (f2, w2)
  f4 = Add (f3, b2)
  y = Add (f4, ln)
}}"""
    text = text.replace('opset_import: ["" : 18]', 'opset_import: ["" : 20]')
    return model_from_text(
        text,
        {
            "wq": _w(rng, d, d),
            "bq": _w(rng, d),
            "wk": _w(rng, d, d),
            "bk": _w(rng, d),
            "wv": _w(rng, d, d),
            "bv": _w(rng, d),
            "wo": _w(rng, d, d),
            "bo": _w(rng, d),
            "split": np.array([0, 0, heads, head_dim], np.int64),
            "merge": np.array([0, 0, d], np.int64),
            "scale": np.array(head_dim**-0.5, np.float32),
            "w1": _w(rng, d, ffn),
            "b1": _w(rng, ffn),
            "w2": _w(rng, ffn, d),
            "b2": _w(rng, d),
            "gamma": _w(rng, d) + 1,
            "beta": _w(rng, d),
        },
    )


def group_norm(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    text = f"""{HEADER}
g (float[1,3,4,4] x, float[16,3,1,1] w1, float[16] gs, float[16] gb, float[5,16,1,1] w2)
  => (float[1,5,4,4] y) {{
  c = Conv (x, w1)
  n = GroupNormalization <num_groups=4, epsilon=0.00001> (c, gs, gb)
  r = Relu (n)
  y = Conv (r, w2)
}}"""
    text = text.replace('opset_import: ["" : 18]', 'opset_import: ["" : 21]')
    return model_from_text(
        text,
        {
            "w1": _w(rng, 16, 3, 1, 1),
            "gs": _w(rng, 16) + 1,
            "gb": _w(rng, 16),
            "w2": _w(rng, 5, 16, 1, 1),
        },
    )


BUILDERS = {
    "conv_chain": conv_chain,
    "residual_bn": residual_bn,
    "concat_split": concat_split,
    "depthwise_se": depthwise_se,
    "flatten_classifier": flatten_classifier,
    "attention_ffn": attention_ffn,
    "group_norm": group_norm,
}


def qdq_conv(seed: int = 0) -> ir.Model:
    """Conv weights stored int8 with per-channel DequantizeLinear (an already quantized model)."""
    rng = np.random.default_rng(seed)
    w1 = rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8)
    w2 = rng.integers(-127, 128, (4, 8, 1, 1)).astype(np.int8)
    text = f"""{HEADER}
g (float[1,3,6,6] x, int8[8,3,3,3] q1, float[8] s1, float[8] b1, int8[4,8,1,1] q2, float[4] s2)
  => (float[1,4,6,6] y) {{
  w1 = DequantizeLinear <axis=0> (q1, s1)
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r1 = Relu (c1)
  w2 = DequantizeLinear <axis=0> (q2, s2)
  y = Conv (r1, w2)
}}"""
    return model_from_text(
        text,
        {
            "q1": w1,
            "s1": np.abs(_w(rng, 8)) / 100 + 1e-3,
            "b1": _w(rng, 8),
            "q2": w2,
            "s2": np.abs(_w(rng, 4)) / 100 + 1e-3,
        },
    )


BUILDERS["qdq_conv"] = qdq_conv


def deep_chain(layers: int = 20, width: int = 16, seed: int = 0) -> ir.Model:
    """``layers`` 1x1 convs (ReLU between them) from 3 to ``width`` channels and back to 4:
    every inner conv is a consumer of the channels its predecessor loses."""
    rng = np.random.default_rng(seed)
    widths = [3] + [width] * (layers - 1) + [4]
    pairs = list(enumerate(itertools.pairwise(widths)))
    params = ", ".join(f"float[{o},{i},1,1] w{k}" for k, (i, o) in pairs)
    body = ["a0 = Identity (x)"]
    for k in range(layers):
        body.append(f"c{k} = Conv (a{k}, w{k})")
        body.append(f"a{k + 1} = Relu (c{k})" if k < layers - 1 else f"y = Identity (c{k})")
    text = f"""{HEADER}
g (float[1,3,6,6] x, {params}) => (float[1,4,6,6] y) {{
  {chr(10).join(body)}
}}"""
    weights = {f"w{k}": _w(rng, o, i, 1, 1) for k, (i, o) in pairs}
    return model_from_text(text, weights)
