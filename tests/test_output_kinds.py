"""Which outputs are class scores: top-1 agreement is reported (and defaulted) only for them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.fidelity import compare
from onnxprune.io.atomic import write_bytes_atomic
from onnxprune.output_kinds import class_score_outputs
from onnxprune.testing import model_from_text
from onnxprune.verification import verify

HEADER = '<ir_version: 10, opset_import: ["" : 17]>\n'


def _model(body: str, out: str = "y", weights: dict | None = None) -> ir.Model:
    rng = np.random.default_rng(0)
    init = weights or {
        "w": rng.standard_normal((8, 6)).astype(np.float32),
        "b": rng.standard_normal(6).astype(np.float32),
    }
    text = HEADER + (
        f"m (float[N, 8] x, float[8, 6] w, float[6] b) => (float[N, 6] {out}) {{\n{body}\n}}"
    )
    return model_from_text(text, init)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[mm] h = MatMul (x, w)\n[add] y = Add (h, b)", True),  # linear head + bias
        ("[g] y = Gemm (x, w, b)", True),
        ("[mm] h = MatMul (x, w)\n[sm] y = Softmax <axis = 1> (h)", True),
        ("[mm] h = MatMul (x, w)\n[r] f = Reshape (h, s)\n[i] y = Identity (f)", True),
        # an L2-normalised embedding: MatMul, then a Div by the row norm
        (
            "[mm] h = MatMul (x, w)\n[n] nrm = ReduceL2 <axes = [1], keepdims = 1> (h)\n"
            "[d] y = Div (h, nrm)",
            False,
        ),
        ("[mm] h = MatMul (x, w)\n[t] y = Tanh (h)", False),  # a pooler output
        # a residual Add of two computed tensors is not a bias
        ("[mm] h = MatMul (x, w)\n[mm2] g = MatMul (x, w)\n[add] y = Add (h, g)", False),
    ],
)
def test_graph_decides_class_scores(body: str, expected: bool):
    extra = (
        "\n[cs] s = Constant <value = int64[2] {-1, 6}> ()"
        "\n[c1] one = Constant <value = int64[1] {1}> ()"
    )
    model = _model(extra + "\n" + body)
    assert (class_score_outputs(model) == {"y"}) is expected


def test_names_override_the_graph():
    embedding = _model("[g] embedding = Gemm (x, w, b)", out="embedding")
    assert class_score_outputs(embedding) == frozenset()
    assert class_score_outputs(_model("[g] x2 = Gemm (x, w, b)\n[t] logits = Tanh (x2)",
                                      out="logits")) == {"logits"}  # fmt: skip


def _write(model: ir.Model, path: Path) -> Path:
    write_bytes_atomic(path, ir.serde.serialize_model(model).SerializeToString())
    return path


def test_embeddings_get_no_top1_and_pass_the_default_tolerance(tmp_path: Path):
    """An embedding whose largest coordinate moves is still the same embedding."""
    body = (
        "[g] e = Gemm (x, w, b)\n[c1] one = Constant <value = int64[1] {1}> ()\n"
        "[n] nrm = ReduceL2 <axes = [1], keepdims = 1> (e)\n[d] y = Div (e, nrm)"
    )
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    b = np.zeros(6, np.float32)
    text = HEADER + (
        "m (float[N, 8] x, float[8, 6] w, float[6] b) => (float[N, 6] y) {\n" + body + "\n}"
    )
    ref = _write(model_from_text(text, {"w": w, "b": b}),
                 tmp_path / "a.onnx")  # fmt: skip
    noisy = w + 0.02 * rng.standard_normal(w.shape).astype(np.float32)
    cand = _write(model_from_text(text, {"w": noisy, "b": b}),
                  tmp_path / "b.onnx")  # fmt: skip
    data = tmp_path / "x.npz"
    np.savez(data, x=rng.standard_normal((64, 1, 8)).astype(np.float32))
    feeds = [{"x": x} for x in np.load(data)["x"]]
    result = compare(ref, cand, feeds)
    assert result.outputs["y"]["top1_agreement"] is None
    assert result.outputs["y"]["cosine"] > 0.99
    assert verify(ref, cand, data).passed
