"""Head pruning of torch ``nn.MultiheadAttention`` as both exporters write it (issue 17 item 4).

The packed in-projection ``[E, 3E]`` is viewed as ``(3, E)`` and q, k, v are selected with
Gathers; head ``h`` then owns the same ``E/H`` columns of each of q, k and v and the
matching rows of the out-projection. A head whose weights are zero contributes nothing, so
removing it must leave the outputs unchanged (exactness oracle against the unpruned model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.io import load
from onnxprune.io.pinned import copy_model
from onnxprune.passes.pipeline import canonicalize
from onnxprune.prune import PruneOptions, analyze, prune_model
from onnxprune.runtime import run_model

torch = pytest.importorskip("torch")

EMBED, HEADS, SEQ, DEAD = 16, 4, 6, 2


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
        self.head = torch.nn.Linear(EMBED, 5)

    def forward(self, x):
        y, _ = self.attention(x, x, x, need_weights=False)
        return self.head(y)


def _export(path: Path, dynamo: bool) -> ir.Model:
    torch.manual_seed(0)
    block = _Block().eval()
    width = EMBED // HEADS
    with torch.no_grad():  # head DEAD: zero q, k, v columns and out-projection inputs
        for part in range(3):
            start = part * EMBED + DEAD * width
            block.attention.in_proj_weight[start : start + width] = 0
            block.attention.in_proj_bias[start : start + width] = 0
        block.attention.out_proj.weight[:, DEAD * width : (DEAD + 1) * width] = 0
    x = torch.randn(1, SEQ, EMBED)
    kwargs = {} if dynamo else {"opset_version": 18}
    torch.onnx.export(block, (x,), str(path), dynamo=dynamo, **kwargs)
    model = load(path)
    canonicalize(model)
    return model


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_zeroed_head_is_removed_exactly(tmp_path: Path, dynamo: bool):
    model = _export(tmp_path / "mha.onnx", dynamo)
    heads = [g for g in analyze(model).prunable if g.size == HEADS]
    assert len(heads) == 1, [(g.id, g.size) for g in analyze(model).prunable]
    reference = copy_model(model)
    report = prune_model(model, PruneOptions(layer_ratios={heads[0].id: 0.25}, round_to=1))
    assert len(report.plan.keep[heads[0].id]) == HEADS - 1
    assert DEAD not in report.plan.keep[heads[0].id]
    kept = 3 * (EMBED - EMBED // HEADS)
    shapes = {tuple(v.const_value.shape) for v in model.graph.initializers.values()}
    assert {(EMBED, kept), (kept,)} <= shapes  # packed q, k, v weight and bias
    assert not any(3 * EMBED in shape for shape in shapes)
    rng = np.random.default_rng(1)
    for _ in range(3):
        feed = {model.graph.inputs[0].name: rng.standard_normal((1, SEQ, EMBED), np.float32)}
        want = run_model(reference, feed)
        got = run_model(model, feed)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)
