"""Folding linear chains: exact merges, cost-based refusals, LoRA, merge-back."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from onnxprune.lowrank import FoldLinearPass
from onnxprune.testing import assert_same_outputs, model_from_text, random_feeds

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def build(text: str, shapes: dict[str, tuple[int, ...]], seed: int = 0):
    rng = np.random.default_rng(seed)
    inits = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    return model_from_text(HEADER + text, inits), model_from_text(HEADER + text, inits)


def fold(model):
    report = FoldLinearPass()(model)
    return report, Counter(n.op_type for n in model.graph)


def check(reference, model):
    assert_same_outputs(reference, model, random_feeds(reference), rtol=1e-5, atol=1e-5)


def test_matmul_chain_merges_when_cheaper():
    model, reference = build(
        "g (float[2, 3, 16] x, float[16, 32] a, float[32, 12] b) => (float[2, 3, 12] y) "
        "{ h = MatMul(x, a) \n y = MatMul(h, b) }",
        {"a": (16, 32), "b": (32, 12)},
    )
    report, ops = fold(model)
    assert ops == Counter({"MatMul": 1})
    assert [c.what for c in report.changes] == ["MatMul chain [16,32]x[32,12] -> [16,12]"]
    assert [tuple(v.const_value.shape) for v in model.graph.initializers.values()] == [(16, 12)]
    check(reference, model)


@pytest.mark.parametrize("bias_shape", [(32,), (1, 1, 32), ()])
def test_matmul_add_matmul(bias_shape):
    bias_type = f"float[{', '.join(map(str, bias_shape))}]" if bias_shape else "float"
    model, reference = build(
        f"g (float[2, 3, 16] x, float[16, 32] a, {bias_type} c, float[32, 12] b) "
        "=> (float[2, 3, 12] y) { h = MatMul(x, a) \n hb = Add(h, c) \n y = MatMul(hb, b) }",
        {"a": (16, 32), "c": bias_shape, "b": (32, 12)},
    )
    _, ops = fold(model)
    assert ops == Counter({"MatMul": 1, "Add": 1})
    check(reference, model)


def test_matmul_chain_refused_when_merge_costs_more():
    model, _ = build(
        "g (float[4, 64] x, float[64, 8] a, float[8, 64] b) => (float[4, 64] y) "
        "{ h = MatMul(x, a) \n y = MatMul(h, b) }",
        {"a": (64, 8), "b": (8, 64)},
    )
    report, ops = fold(model)
    assert ops == Counter({"MatMul": 2})
    assert [s.reason for s in report.skips] == [
        "merged MatMul costs more MACs than the chain: 4096 > 1024 per row/position (rank 8)"
    ]


@pytest.mark.parametrize("trans", [(0, 0), (1, 1), (0, 1)])
def test_gemm_chain(trans):
    t1, t2 = trans
    b1 = (32, 16) if t1 else (16, 32)
    b2 = (12, 32) if t2 else (32, 12)
    model, reference = build(
        "g (float[5, 16] x, float[B1] w1, float[32] c1, float[B2] w2, float[12] c2) "
        "=> (float[5, 12] y) {"
        f" h = Gemm <transB = {t1}, alpha = 0.5, beta = 2.0> (x, w1, c1) \n"
        f" y = Gemm <transB = {t2}, alpha = 1.5, beta = 0.25> (h, w2, c2) }}".replace(
            "B1", f"{b1[0]}, {b1[1]}"
        ).replace("B2", f"{b2[0]}, {b2[1]}"),
        {"w1": b1, "c1": (32,), "w2": b2, "c2": (12,)},
    )
    report, ops = fold(model)
    assert ops == Counter({"Gemm": 1})
    assert [c.what for c in report.changes] == ["Gemm chain [16,32]x[32,12] -> [16,12]"]
    check(reference, model)


def test_gemm_chain_refused_when_merge_costs_more():
    model, _ = build(
        "g (float[5, 64] x, float[64, 4] w1, float[4, 64] w2) => (float[5, 64] y) "
        "{ h = Gemm(x, w1) \n y = Gemm(h, w2) }",
        {"w1": (64, 4), "w2": (4, 64)},
    )
    report, _ = fold(model)
    assert [s.reason for s in report.skips] == [
        "merged Gemm costs more MACs than the chain: 4096 > 512 per row/position (rank 4)"
    ]


def test_conv_1x1_chain_with_bias_pads_and_strides():
    model, reference = build(
        "g (float[2, 6, 9, 9] x, float[10, 6, 1, 1] w1, float[10] b1, float[4, 10, 1, 1] w2, "
        "float[4] b2) => (float[2, 4, ?, ?] y) {"
        " h = Conv <pads = [1, 0, 2, 1], strides = [2, 1]> (x, w1, b1) \n"
        " y = Conv <strides = [1, 2]> (h, w2, b2) }",
        {"w1": (10, 6, 1, 1), "b1": (10,), "w2": (4, 10, 1, 1), "b2": (4,)},
    )
    report, ops = fold(model)
    assert ops == Counter({"Conv": 1})
    assert [c.what for c in report.changes] == ["1x1 Conv chain 6->10->4 -> 6->4"]
    conv = next(iter(model.graph))
    assert list(conv.attributes["strides"].value) == [2, 2]
    check(reference, model)


def test_conv_chain_refusals():
    text = (
        "g (float[1, 16, 5, 5] x, float[4, 16, 1, 1] w1, float[16, 4, 1, 1] w2) "
        "=> (float[1, 16, ?, ?] y) { h = Conv(x, w1) \n y = Conv <PADS> (h, w2) }"
    )
    shapes = {"w1": (4, 16, 1, 1), "w2": (16, 4, 1, 1)}
    model, _ = build(text.replace("<PADS>", ""), shapes)
    report, _ = fold(model)
    assert [s.reason for s in report.skips] == [
        "merged Conv costs more MACs than the chain: 256 > 128 per row/position (4 mid channels)"
    ]
    model, _ = build(text.replace("PADS", "pads = [1, 1, 1, 1]"), shapes)
    report, _ = fold(model)
    assert [s.reason for s in report.skips] == [
        "second 1x1 conv is padded (its padding would see no bias)"
    ]


@pytest.mark.parametrize("scale_at", ["after", "between", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_folds_into_base_weight(scale_at: str, bias: bool):
    lora = {
        "after": "u = MatMul(x, la) \n v = MatMul(u, lb) \n d = Mul(v, s)",
        "between": "u = MatMul(x, la) \n us = Mul(s, u) \n d = MatMul(us, lb)",
        "none": "u = MatMul(x, la) \n d = MatMul(u, lb)",
    }[scale_at]
    base = "p0 = MatMul(x, w) \n p = Add(p0, c)" if bias else "p = MatMul(x, w)"
    model, reference = build(
        "g (float[2, 3, 24] x, float[24, 20] w, float[20] c, float[24, 4] la, float[4, 20] lb, "
        f"float s) => (float[2, 3, 20] y) {{ {base} \n {lora} \n y = Add(p, d) }}",
        {"w": (24, 20), "c": (20,), "la": (24, 4), "lb": (4, 20), "s": ()},
    )
    report, ops = fold(model)
    assert ops == (Counter({"MatMul": 1, "Add": 1}) if bias else Counter({"MatMul": 1}))
    assert len(report.changes) == 1 and report.changes[0].what.startswith("LoRA rank 4 folded")
    assert {"la", "lb"}.isdisjoint(model.graph.initializers)
    assert ("s" in model.graph.initializers) == (scale_at == "none")  # unused from the start
    check(reference, model)


def test_fold_is_idempotent():
    model, _ = build(
        "g (float[2, 16] x, float[16, 32] a, float[32, 12] b) => (float[2, 12] y) "
        "{ h = MatMul(x, a) \n y = MatMul(h, b) }",
        {"a": (16, 32), "b": (32, 12)},
    )
    fold(model)
    report, _ = fold(model)
    assert report.changes == []
