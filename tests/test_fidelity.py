"""The one comparator (:mod:`onnxprune.fidelity`) and the held-out split (``heldout``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.cli import main
from onnxprune.fidelity import FidelityResult, compare, metrics_of, overfit_note
from onnxprune.heldout import split_data
from onnxprune.io import load
from onnxprune.io.atomic import write_bytes_atomic
from onnxprune.reporting import json_safe
from onnxprune.testing import model_from_text
from onnxprune.tolerance import DEFAULT_TOLERANCE, parse_tolerance
from onnxprune.verification import verify

# Logits = x @ w + offset: a large shared offset keeps the cosine of two very different
# classifiers near 1 while their argmax disagrees.
OFFSET_TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
clf (float[N, 8] x, float[8, 10] w, float[10] b) => (float[N, 10] logits) {
    [mm] h = MatMul (x, w)
    [add] logits = Add (h, b)
}
"""

LABEL_TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
lab (float[N, 8] x, float[8, 10] w) => (int64[N] label) {
    [mm] h = MatMul (x, w)
    [am] label = ArgMax <axis = 1, keepdims = 0> (h)
}
"""


def _write(model: ir.Model, path: Path) -> Path:
    write_bytes_atomic(path, ir.serde.serialize_model(model).SerializeToString())
    return path


def _clf(tmp_path: Path, name: str, seed: int, text: str = OFFSET_TEXT) -> Path:
    rng = np.random.default_rng(seed)
    weights = {"w": rng.standard_normal((8, 10)).astype(np.float32)}
    if "float[10] b" in text:
        weights["b"] = np.full(10, 100.0, np.float32)
    return _write(model_from_text(text, weights), tmp_path / f"{name}.onnx")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "x.npz"
    x = np.random.default_rng(7).standard_normal((40, 1, 8)).astype(np.float32)
    np.savez(path, x=x)
    return path


def test_pooled_and_worst_feed_differ_and_are_exact_for_a_copy(tmp_path: Path, data: Path):
    ref, other = _clf(tmp_path, "ref", 0), _clf(tmp_path, "other", 1)
    feeds = list(np.load(data)["x"][:, None][:, 0])
    feeds = [{"x": f} for f in feeds]
    same = compare(ref, ref, feeds)
    assert same.outputs["logits"]["sqnr_db"] == math.inf
    assert same.outputs["logits"]["top1_agreement"] == 1.0
    diff = compare(ref, other, feeds)
    pooled, worst = diff.outputs["logits"], diff.worst_feed["logits"]
    # Cosine cannot tell the two classifiers apart; top-1 can.
    assert pooled["cosine"] > 0.99 and pooled["top1_agreement"] < 0.5
    assert worst["top1_agreement"] == 0.0  # some feed disagrees
    assert worst["cosine"] <= pooled["cosine"] and worst["max_abs_error"] == pytest.approx(
        pooled["max_abs_error"]
    )
    assert diff.samples == 40 and diff.graph_optimizations is True


def test_default_tolerance_fails_a_classifier_that_cosine_passes(tmp_path: Path, data: Path):
    ref, other = _clf(tmp_path, "ref", 0), _clf(tmp_path, "other", 1)
    result = verify(ref, other, data)
    assert str(result.tolerance) == DEFAULT_TOLERANCE
    assert not result.passed
    assert [v.criterion.metric for v in result.violations] == ["top1_agreement"]
    assert verify(ref, ref, data).passed


def test_integer_labels_are_compared_exactly(tmp_path: Path, data: Path):
    ref, other = _clf(tmp_path, "ref", 0, LABEL_TEXT), _clf(tmp_path, "other", 1, LABEL_TEXT)
    result = verify(ref, other, data)
    metrics = result.outputs["label"]
    labels = [
        np.argmax(np.load(data)["x"][:, 0] @ load(p).graph.initializers["w"].const_value.numpy(), 1)
        for p in (ref, other)
    ]
    assert metrics["top1_agreement"] == pytest.approx(np.mean(labels[0] == labels[1]))
    assert metrics["cosine"] is None and metrics["sqnr_db"] is None
    assert not result.passed
    assert verify(ref, ref, data).outputs["label"]["top1_agreement"] == 1.0


def test_rank1_output_is_one_row_per_feed():
    r = np.array([[0.1, 0.9, 0.0]])
    assert metrics_of(r, np.array([[0.9, 0.1, 0.0]]), pooled=True)["top1_agreement"] == 0.0
    refs = [np.array([0.1, 0.9, 0.0]), np.array([0.8, 0.1, 0.0])]
    cands = [np.array([0.2, 0.7, 0.0]), np.array([0.1, 0.8, 0.0])]
    from onnxprune.fidelity import _pool

    assert metrics_of(_pool(refs), _pool(cands), pooled=True)["top1_agreement"] == 0.5


def test_nan_candidate_never_agrees_and_fails_every_tolerance():
    r = np.eye(4, dtype=np.float32)
    c = r.copy()
    c[0, 0] = np.nan  # argmax would still pick index 0
    metrics = metrics_of(r, c, pooled=True)
    assert metrics["top1_agreement"] == 0.75
    assert math.isnan(metrics["cosine"])
    assert parse_tolerance("cosine>=0.5").violations({"y": metrics})


def test_sequence_of_maps_is_compared_as_rows():
    from onnxprune.fidelity import _as_array

    rows = _as_array([{0: 0.2, 1: 0.8}, {1: 0.3, 0: 0.7}])
    np.testing.assert_array_equal(rows, [[0.2, 0.8], [0.7, 0.3]])


def test_nearest_neighbour_agreement():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((20, 16))
    assert metrics_of(emb, emb * 3.0, pooled=True)["nn_agreement"] == 1.0
    shuffled = metrics_of(emb, rng.standard_normal((20, 16)), pooled=True)["nn_agreement"]
    assert shuffled < 0.5


def test_split_holds_out_the_last_quarter_never_interleaved(tmp_path: Path, data: Path):
    model = load(_clf(tmp_path, "ref", 0))
    split = split_data(model, data)
    fit = np.stack([f["x"] for f in split.fit_feeds()])
    held = np.stack([f["x"] for f in split.held_feeds()])
    x = np.load(data)["x"]
    np.testing.assert_array_equal(fit, x[:30])
    np.testing.assert_array_equal(held, x[30:])
    assert "held-out samples 30-39" in split.held_description
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i in range(5):
        np.savez(folder / f"{i}.npz", x=x[i])
    split = split_data(model, folder)
    assert len(split.fit) == 4 and len(split.held) == 1
    assert "held-out files 4-4" in split.held_description


def test_eval_set_with_labels_is_used_and_labels_ignored(tmp_path: Path, data: Path):
    model = load(_clf(tmp_path, "ref", 0))
    labelled = tmp_path / "eval.npz"
    np.savez(labelled, x=np.ones((3, 1, 8), np.float32), label=np.zeros(3, np.int64))
    split = split_data(model, data, labelled)
    assert len(split.fit) == 40 and len(split.held) == 3
    assert split.held_description.startswith(f"--eval {labelled}")


def test_overfit_note_names_the_gap():
    def result(top1: float) -> FidelityResult:
        metrics = {"top1_agreement": top1, "cosine": 0.99, "sqnr_db": 20.0}
        return FidelityResult("x", 8, True, {"logits": metrics}, {"logits": metrics})

    note = overfit_note(result(0.92), result(0.12))
    assert note is not None and "logits top1_agreement 0.92 on fit samples vs 0.12" in note
    assert overfit_note(result(0.92), result(0.90)) is None


MLP_TEXT = """
    <ir_version: 10, opset_import: ["" : 17]>
    mlp (float[N, 8] x, float[8, 32] w1, float[32, 10] w2) => (float[N, 10] logits) {
        [mm1] h1 = MatMul (x, w1)
        [relu] h2 = Relu (h1)
        [mm2] logits = MatMul (h2, w2)
    }
    """


def _mlp(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    weights = {
        "w1": rng.standard_normal((8, 32)).astype(np.float32),
        "w2": rng.standard_normal((32, 10)).astype(np.float32),
    }
    return _write(model_from_text(MLP_TEXT, weights), tmp_path / "mlp.onnx")


@pytest.mark.parametrize(
    "command",
    [
        ["prune", "--ratio", "0.5", "--reconstruct"],
        ["sparsify", "--sparsity", "0.5", "--update"],
        ["lowrank", "--rank", "4", "--activation-aware"],
        ["quantize"],
    ],
    ids=lambda c: c[0],
)
def test_command_report_equals_verify_on_the_same_eval_data(
    tmp_path: Path, data: Path, command: list[str]
):
    """Every lossy command and verify report the same numbers (one comparator)."""
    src = _mlp(tmp_path)
    rng = np.random.default_rng(4)
    out, report = tmp_path / "pruned.onnx", tmp_path / "r.json"
    eval_path = tmp_path / "eval.npz"
    np.savez(eval_path, x=rng.standard_normal((16, 1, 8)).astype(np.float32))
    code = main([command[0], str(src), "-o", str(out), *command[1:], "--calib", str(data),
                 "--eval", str(eval_path), "--report", str(report)])  # fmt: skip
    assert code == 0
    fidelity = json.loads(report.read_text())["fidelity"]
    assert fidelity["data"].startswith(f"--eval {eval_path}") and fidelity["samples"] == 16
    checked = verify(src, out, eval_path, tolerance="cosine>=-1")
    for metric in ("cosine", "sqnr_db", "top1_agreement", "max_abs_error"):
        assert fidelity["outputs"]["logits"][metric] == json_safe(checked.outputs["logits"][metric])
    assert fidelity["fit_samples"]["samples"] == 16
    assert fidelity["outputs"]["logits"]["cosine"] < 1.0  # lossy: the numbers are not trivial


def test_without_eval_the_report_names_the_held_out_samples(tmp_path: Path, data: Path):
    src = _mlp(tmp_path)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", str(src), "-o", str(out), "--calib", str(data),
                 "--report", str(report)]) == 0  # fmt: skip
    result = json.loads(report.read_text())
    assert result["samples"] == 30  # fitted on the first three quarters
    assert result["fidelity"]["samples"] == 10
    assert "held-out samples 30-39" in result["fidelity"]["data"]


def test_exactness_check_refuses_a_nan_where_the_original_is_finite(tmp_path: Path):
    """canonicalize's exactness check: NaN > bound is False, so NaN must be caught explicitly."""
    from onnxprune.check import check_equivalent
    from onnxprune.errors import BudgetError

    text = """
    <ir_version: 10, opset_import: ["" : 17]>
    m (float[N, 4] x, float[4] s) => (float[N, 4] y) {
        [mul] y = Mul (x, s)
    }
    """
    ref = _write(model_from_text(text, {"s": np.ones(4, np.float32)}), tmp_path / "a.onnx")
    nan = np.array([1, np.nan, 1, 1], np.float32)
    bad = _write(model_from_text(text, {"s": nan}), tmp_path / "b.onnx")
    feeds = [{"x": np.ones((2, 4), np.float32)}]
    with pytest.raises(BudgetError, match="output 'y' changed"):
        check_equivalent(ref, bad, feeds)
    # NaN where the original has NaN too is no change.
    assert check_equivalent(bad, bad, feeds).samples == 1


def test_optimize_reports_on_unlabelled_eval_data(tmp_path: Path, data: Path):
    """optimize --eval takes held-out inputs without labels: fidelity on them, no accuracy."""
    src = _mlp(tmp_path)
    eval_path, report = tmp_path / "eval.npz", tmp_path / "r.json"
    np.savez(eval_path, x=np.random.default_rng(5).standard_normal((12, 1, 8)).astype(np.float32))
    code = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--preset", "cpu-int8",
                 "--calib", str(data), "--eval", str(eval_path), "--bench-seconds", "0",
                 "--budget", "cosine>=0.9", "--report", str(report)])  # fmt: skip
    assert code == 0
    result = json.loads(report.read_text())
    assert result["accuracy"] is None
    assert result["fidelity_data"] == f"--eval {eval_path} (12 samples)"
    checked = verify(src, tmp_path / "o.onnx", eval_path, tolerance="cosine>=-1")
    assert result["fidelity"]["logits"]["cosine"] == checked.outputs["logits"]["cosine"]
