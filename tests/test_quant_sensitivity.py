"""Sensitivity ranking: an ill-conditioned layer (its output feeds a near-cancelling difference)
ranks above a benign one; --budget keeps layers float in that order and reports the ranking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxprune.errors import BudgetError
from onnxprune.quant import quantize_file
from onnxprune.quant.analysis import reference_outputs
from onnxprune.quant.calibrate import METHODS
from onnxprune.quant.core import QuantOptions, StaticQuantizer
from onnxprune.quant.prepare import name_nodes
from onnxprune.quant.sensitivity import rank_sensitivity
from onnxprune.quant.testing import write, write_calib
from onnxprune.quant.vnni import needs_u8s8_remedy
from onnxprune.testing import model_from_text


def cancelling_model():
    """h = x @ A; y = h @ B = x1 exactly (B subtracts two nearly equal columns of h);
    z = x @ C is well conditioned. Quantizing h (A's output, B's input) wrecks y."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,2] x, float[2,2] a, float[2,1] b, float[2,3] c) => (float[N,1] y, float[N,3] z) {
      h = MatMul (x, a)
      y = MatMul (h, b)
      z = MatMul (x, c)
    }"""
    weights = {
        "a": np.array([[1.0, 1.0], [0.0, 0.01]], np.float32),
        "b": np.array([[-100.0], [100.0]], np.float32),
        "c": np.array([[1.0, 0.5, -0.3], [0.2, 1.0, 0.7]], np.float32),
    }
    model = model_from_text(text, weights)
    name_nodes(model)
    return model


def feeds_for(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 4, 2)).astype(np.float32)


def test_ill_conditioned_layers_rank_first() -> None:
    model = cancelling_model()
    x = feeds_for(8)
    feeds = [{"x": s} for s in x]
    quantizer = StaticQuantizer(model, QuantOptions(embeddings=False))
    quantizer.calibrate(feeds)
    nodes = quantizer.plan().nodes
    assert sorted(nodes) == ["MatMul_0", "MatMul_1", "MatMul_2"]
    # 7-bit weights where AVX2's u8s8 pairs would saturate (x @ c's weights are near 127).
    remedy = "reduce-range" if needs_u8s8_remedy() else "none"
    ranking = rank_sensitivity(
        lambda kept: quantizer.build(kept, remedy)[0],
        nodes,
        reference_outputs(model, feeds),
        feeds,
    )
    order = [r["node"] for r in ranking]
    sqnr = {r["node"]: float(r["sqnr_db"]) for r in ranking}
    assert order[-1] == "MatMul_2"  # z = x @ c alone: only x is rounded, y stays accurate
    assert max(sqnr["MatMul_0"], sqnr["MatMul_1"]) < 20.0
    assert sqnr["MatMul_2"] > 30.0


def test_budget_keeps_the_sensitive_layers_float_and_reports_the_ranking(tmp_path: Path) -> None:
    model = write(cancelling_model(), tmp_path)
    calib = write_calib(tmp_path, x=feeds_for(16))
    out = tmp_path / "q.onnx"
    # On AVX2 without VNNI the remedy is fixed to 7-bit weights: measured on the worst
    # output (y, wrecked by the cancellation whatever the remedy) auto picks "none", and
    # z = x @ c then saturates in int16 too.
    result = quantize_file(
        model,
        out,
        calib=calib,
        budget="sqnr_db>=30",
        bias_correction="off",
        smooth="off",
        u8s8="reduce-range" if needs_u8s8_remedy() else "auto",
    )
    kept = result.details.kept_float
    ranking = [r["node"] for r in result.details.sensitivity]
    assert kept == ranking[: len(kept)]
    assert "MatMul_2" not in kept
    assert "most sensitive layers" in result.summary()
    assert result.fidelity.held_out.outputs["y"]["sqnr_db"] >= 30


def test_budget_tries_the_other_range_methods_before_refusing(tmp_path: Path) -> None:
    # With every layer quantized y is wrecked whatever the ranges, and mean-minmax (which
    # clips x) scores best there; keeping h's layers float fixes y but leaves z's clipped
    # input, so the budget is only met after going back to an unclipped method.
    model = write(cancelling_model(), tmp_path)
    calib = write_calib(tmp_path, x=feeds_for(16))
    result = quantize_file(
        model,
        tmp_path / "q.onnx",
        calib=calib,
        budget="sqnr_db>=30",
        bias_correction="off",
        smooth="off",
        u8s8="reduce-range",  # fixed: the remedy auto picks differs by CPU (VNNI or not)
    )
    assert result.details.method is not None
    assert result.details.method.chosen == "mean-minmax"
    assert result.details.budget is not None
    used = result.details.budget.budget_range_method
    assert used not in (None, "mean-minmax")
    assert result.details.range_method == used
    assert f"range method {used} used instead" in result.summary()
    assert min(m["sqnr_db"] for m in result.fidelity.held_out.outputs.values()) >= 30
    with pytest.raises(BudgetError, match="range methods tried: ") as refused:
        quantize_file(model, tmp_path / "r.onnx", calib=calib, budget="sqnr_db>=200", smooth="off")
    tried = str(refused.value).rpartition("range methods tried: ")[2].rstrip(")").split(", ")
    assert sorted(tried) == sorted(METHODS)
    assert not (tmp_path / "r.onnx").exists()


def test_unreachable_budget_writes_nothing(tmp_path: Path) -> None:
    model = write(cancelling_model(), tmp_path)
    calib = write_calib(tmp_path, x=feeds_for(16))
    out = tmp_path / "q.onnx"
    with pytest.raises(BudgetError, match="cannot be met"):
        quantize_file(model, out, calib=calib, budget="sqnr_db>=200", smooth="off")
    assert not out.exists()
