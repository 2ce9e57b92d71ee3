"""Channels read inside If/Loop/Scan bodies (outer-scope captures) are never pruned.

The model: ``x -> conv1 -> relu -> a -> conv2 -> relu -> b -> conv3 -> y``, plus a control
flow node whose body reads ``a`` (a capture, not a node input). ``conv1``'s channels must
stay (the body would crash or change), ``conv2``'s may go.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.prune.analysis import analyze
from onnxprune.runtime import run_model

C = 8


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "w1": (C, 3, 3, 3),
        "w2": (C, C, 3, 3),
        "w3": (4, C, 1, 1),
        "w_in": (4, C, 1, 1),
        "w_else": (4, 3, 1, 1),
    }
    return {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in shapes.items()}


def _reader(name: str, source: str, w: np.ndarray, out: str) -> onnx.GraphProto:
    """A body computing ``flatten(gap(conv(source, w)))`` with the weight inside the body."""
    nodes = [
        helper.make_node("Conv", [source, f"{name}_w"], [f"{name}_c"], name=f"{name}_conv"),
        helper.make_node("GlobalAveragePool", [f"{name}_c"], [f"{name}_p"], name=f"{name}_gap"),
        helper.make_node("Flatten", [f"{name}_p"], [out], name=f"{name}_flat"),
    ]
    return helper.make_graph(
        nodes,
        name,
        [],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, f"{name}_w")],
    )


def _if_node(w: dict[str, np.ndarray], nested: bool) -> list[onnx.NodeProto]:
    then = _reader("then", "a", w["w_in"], "then_out")
    if nested:  # the capture two levels down
        inner = helper.make_node(
            "If", ["cond"], ["then_out"], name="inner_if", then_branch=then, else_branch=then
        )
        then = helper.make_graph(
            [inner], "outer_then", [], [helper.make_tensor_value_info("then_out", 1, None)]
        )
    other = _reader("else", "x", w["w_else"], "else_out")
    return [
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then, else_branch=other)
    ]


def _loop_node(w: dict[str, np.ndarray], nested: bool) -> list[onnx.NodeProto]:
    del nested
    body = _reader("body", "a", w["w_in"], "scan_z")
    body.node.insert(0, helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep"))
    body.input.extend(
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ]
    )
    body.output.insert(0, helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []))
    trip = helper.make_node(
        "Constant", [], ["trip"], name="trip", value=numpy_helper.from_array(np.array(1, np.int64))
    )
    loop = helper.make_node("Loop", ["trip", ""], ["zs"], name="loop", body=body)
    squeeze = helper.make_node(
        "Constant", [], ["ax0"], name="ax0", value=numpy_helper.from_array(np.array([0], np.int64))
    )
    return [trip, loop, squeeze, helper.make_node("Squeeze", ["zs", "ax0"], ["z"], name="sq")]


def _model(kind: str = "If", nested: bool = False) -> onnx.ModelProto:
    w = _weights()
    main_nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["a"], name="relu1"),
        helper.make_node("Conv", ["a", "w2"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["b"], name="relu2"),
        helper.make_node("Conv", ["b", "w3"], ["y"], name="conv3"),
    ]
    control = _if_node(w, nested) if kind == "If" else _loop_node(w, nested)
    graph = helper.make_graph(
        main_nodes + control,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4]),
        ],
        [numpy_helper.from_array(w[k], k) for k in ("w1", "w2", "w3")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


CASES = [("If", False), ("If", True), ("Loop", False)]


@pytest.fixture(params=CASES, ids=["if", "nested-if", "loop"])
def model_path(request, tmp_path: Path) -> Path:
    kind, nested = request.param
    path = tmp_path / "model.onnx"
    path.write_bytes(_model(kind, nested).SerializeToString())
    return path


def _feeds(cond: bool) -> dict[str, np.ndarray]:
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)
    return {"x": x, "cond": np.array(cond)}


def test_capture_blocks_the_group_naming_the_node(model_path: Path):
    analysis = analyze(onnxprune.load(model_path))
    group = analysis.group("w1:0")
    assert group.blocked is not None
    assert group.blocked.node in ("branch", "loop")
    assert "subgraph" in group.blocked.reason and "'a'" in group.blocked.reason
    assert "w2:0" in {g.id for g in analysis.prunable}


def test_pruned_model_still_runs_every_branch(model_path: Path, tmp_path: Path, capsys):
    out = tmp_path / "pruned.onnx"
    assert main(["prune", str(model_path), "-o", str(out), "--ratio", "0.5"]) == 0
    capsys.readouterr()
    pruned = onnx.load(str(out))
    weights = {t.name: t for t in pruned.graph.initializer}
    assert weights["w1"].dims[0] == C
    assert weights["w2"].dims[0] < C
    for cond in (True, False):
        want = run_model(model_path, _feeds(cond))
        got = run_model(out, _feeds(cond))
        # The captured channels are untouched, so the control-flow output is exact.
        np.testing.assert_allclose(got["z"], want["z"], rtol=1e-5, atol=1e-6)


def test_reduce_of_a_value_of_unknown_rank_does_not_crash(tmp_path: Path, capsys):
    """silero-vad: a ReduceMean reads an If output whose rank nothing declares."""
    w = _weights()

    def branch(node: onnx.NodeProto) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)
        return helper.make_graph([node], f"branch_{node.name}", [], [out])

    # The branches' ranks differ (4 and 5), so shape inference leaves z's rank unknown.
    then = branch(helper.make_node("Identity", ["b"], ["z_then"], name="pass"))
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes0")
    unsq = helper.make_node("Unsqueeze", ["b", "axes0"], ["z_else"], name="unsq")
    other = branch(unsq)
    other.initializer.append(axes)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a"], name="relu1"),
        helper.make_node("Conv", ["a", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["b"], name="relu2"),
        helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then, else_branch=other),
        helper.make_node("ReduceMean", ["z"], ["y"], name="mean", axes=[2, 3], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w["w1"], "w1"), numpy_helper.from_array(w["w2"], "w2")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code = main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and code in (0, 2), err
