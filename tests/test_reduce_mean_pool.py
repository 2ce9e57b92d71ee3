"""ReduceMeanToPoolPass: spatial ReduceMean (attribute or input axes) becomes GlobalAveragePool."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxprune.passes.base import PassReport
from onnxprune.passes.reduce_mean_pool import ReduceMeanToPoolPass
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text, random_feeds


def build(opset: int, body: str, x: str = "float[2,3,5,4]", y: str = "float[2,3,1,1]") -> ir.Model:
    return model_from_text(
        f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
        f"g ({x} x) => ({y} y) {{\n  r = Relu (x)\n  {body}\n}}"
    )


def run_checked(model: ir.Model) -> PassReport:
    original = ir.serde.serialize_model(model)
    report = ReduceMeanToPoolPass()(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = random_feeds(model, seed=2)
    ref, got = run_model(original, feeds), run_model(proto, feeds)
    for name in ref:
        assert got[name].shape == ref[name].shape
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, atol=1e-6)
    assert ReduceMeanToPoolPass()(model).changes == []
    return report


def ops(model: ir.Model) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph))


@pytest.mark.parametrize(
    ("opset", "body", "x", "y"),
    [
        (13, "y = ReduceMean <axes = [2, 3]> (r)", "float[2,3,5,4]", "float[2,3,1,1]"),
        (13, "y = ReduceMean <axes = [-1, -2]> (r)", "float[2,3,5,4]", "float[2,3,1,1]"),
        (
            18,
            "a = Constant <value = int64[2] {-1, -2}> ()\n  y = ReduceMean <keepdims = 1> (r, a)",
            "float[2,3,5,4]",
            "float[2,3,1,1]",
        ),
        (13, "y = ReduceMean <axes = [2]> (r)", "float[2,3,7]", "float[2,3,1]"),
        (13, "y = ReduceMean <axes = [2, 3, 4]> (r)", "float[1,2,3,4,5]", "float[1,2,1,1,1]"),
    ],
)
def test_spatial_mean_becomes_global_average_pool(opset: int, body: str, x: str, y: str) -> None:
    model = build(opset, body, x, y)
    report = run_checked(model)
    counts = ops(model)
    counts.pop("Constant", None)  # opset 18's axes: dead now, remove-dead-nodes takes it
    assert counts == {"Relu": 1, "GlobalAveragePool": 1}
    assert [o.name for o in model.graph.outputs] == ["y"]
    assert len(report.changes) == 1 and "GlobalAveragePool" in report.changes[0].what


@pytest.mark.parametrize(
    ("body", "y", "reason"),
    [
        ("y = ReduceMean <axes = [2, 3], keepdims = 0> (r)", "float[2,3]", "keepdims=0"),
        ("y = ReduceMean <axes = [1, 2, 3]> (r)", "float[2,1,1,1]", None),  # not spatial only
        ("y = ReduceMean <axes = [1]> (r)", "float[2,1,5,4]", None),
    ],
)
def test_other_reductions_are_left_alone(body: str, y: str, reason: str | None) -> None:
    model = build(13, body, y=y)
    report = run_checked(model)
    assert ops(model) == {"Relu": 1, "ReduceMean": 1}
    assert report.changes == []
    skips = [s.reason for s in report.skips]
    assert skips == ([] if reason is None else [f"{reason} (the spatial dims are dropped)"])
