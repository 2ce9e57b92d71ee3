"""FoldPadPass: zero Pad folded into Conv/AveragePool pads (every opset form), skips, numerics."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxprune.passes.base import PassReport
from onnxprune.passes.fold_pad import FoldPadPass
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text, random_feeds


def op_counts(model: ir.Model) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph))


def conv_model(
    opset: int, pad: str, consumer: str = "y = Conv(p, w)", outputs: str = "float[2,?,?,?] y"
) -> ir.Model:
    weights = {"w": np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)}
    return model_from_text(
        f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
        f"""g (float[2,3,9,8] x, float[4,3,3,3] w) => ({outputs}) {{
          {pad}
          {consumer}
        }}""",
        weights,
    )


def run_checked(model: ir.Model) -> PassReport:
    """Run the pass; outputs must equal the original's to float rounding; idempotent."""
    original = ir.serde.serialize_model(model)
    report = FoldPadPass()(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = random_feeds(model, seed=1)
    ref, got = run_model(original, feeds), run_model(proto, feeds)
    for name in ref:
        assert got[name].shape == ref[name].shape
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5)
    assert FoldPadPass()(model).changes == []
    return report


def conv_pads(model: ir.Model) -> list[int]:
    node = next(n for n in model.graph if n.op_type in ("Conv", "AveragePool"))
    return list(node.attributes["pads"].as_ints())


PADS_INPUT = (
    "pads = Constant<value = int64[8] {0, 0, 1, 2, 0, 0, 3, 0}>()\n"
    "          z = Constant<value = float {0}>()\n"
)


@pytest.mark.parametrize(
    ("opset", "pad"),
    [
        (10, 'p = Pad<mode = "constant", pads = [0, 0, 1, 2, 0, 0, 3, 0], value = 0.0>(x)'),
        (11, PADS_INPUT + "          p = Pad(x, pads, z)"),
        (13, PADS_INPUT + "          p = Pad(x, pads)"),
        (
            18,
            "pads = Constant<value = int64[4] {1, 2, 3, 0}>()\n"
            "          axes = Constant<value = int64[2] {2, -1}>()\n"
            "          z = Constant<value = float {0}>()\n"
            "          p = Pad(x, pads, z, axes)",
        ),
    ],
)
def test_zero_pad_folds_into_conv(opset: int, pad: str) -> None:
    model = conv_model(opset, pad, "y = Conv<pads = [1, 0, 0, 1]>(p, w)")
    report = run_checked(model)
    assert op_counts(model).get("Pad", 0) == 0
    assert conv_pads(model) == [2, 2, 3, 1]  # own [1, 0 | 0, 1] + Pad's H/W [1, 2 | 3, 0]
    assert len(report.changes) == 1 and "absorbed" in report.changes[0].what


def test_valid_auto_pad_and_two_conv_consumers() -> None:
    model = conv_model(
        13,
        PADS_INPUT + "          p = Pad(x, pads)",
        'a = Conv<auto_pad = "VALID">(p, w)\n          b = Conv<strides = [2, 2]>(p, w)\n'
        "          y = Add(a, a)\n          y2 = Identity(b)",
        "float[2,?,?,?] y, float[2,?,?,?] y2",
    )
    report = run_checked(model)
    assert op_counts(model).get("Pad", 0) == 0
    assert len(report.changes) == 2
    assert all("auto_pad" not in n.attributes for n in model.graph if n.op_type == "Conv")


def test_average_pool_counts_the_folded_zeros() -> None:
    model = conv_model(
        13, PADS_INPUT + "          p = Pad(x, pads)", "y = AveragePool<kernel_shape = [4, 4]>(p)"
    )
    run_checked(model)
    pool = next(n for n in model.graph if n.op_type == "AveragePool")
    assert pool.attributes.get_int("count_include_pad", 0) == 1
    assert conv_pads(model) == [1, 2, 3, 0]


@pytest.mark.parametrize(
    ("pad", "consumer", "reason"),
    [
        (
            PADS_INPUT.replace("{0}", "{0.5}") + "          p = Pad(x, pads, z)",
            "y = Conv(p, w)",
            "pad value 0.5 is not zero",
        ),
        (
            PADS_INPUT + '          p = Pad<mode = "reflect">(x, pads)',
            "y = Conv(p, w)",
            "mode 'reflect' is not constant",
        ),
        (
            PADS_INPUT.replace("{0, 0, 1", "{0, 1, 1") + "          p = Pad(x, pads)",
            "y = AveragePool<kernel_shape = [3, 3]>(p)",
            "pads the batch or channel axis",
        ),
        (
            PADS_INPUT.replace("3, 0}", "-1, 0}") + "          p = Pad(x, pads)",
            "y = Conv(p, w)",
            "negative pads (cropping)",
        ),
        (
            PADS_INPUT + "          p = Pad(x, pads)",
            "m = MaxPool<kernel_shape = [2, 2]>(p)\n          c = Conv(p, w)\n"
            "          y = Conv(m, w)",
            "read by MaxPool MaxPool(m)",
        ),
        (
            PADS_INPUT + "          p = Pad(x, pads)",
            'y = Conv<auto_pad = "SAME_UPPER">(p, w)',
            "Conv(y) has auto_pad SAME_UPPER",
        ),
        (
            PADS_INPUT + "          p = Pad(x, pads)",
            "y = AveragePool<kernel_shape = [3, 3], pads = [1, 1, 1, 1]>(p)",
            "AveragePool(y) excludes its own padding from the average",
        ),
        (
            PADS_INPUT + "          p = Pad(x, pads)",
            "y = AveragePool<kernel_shape = [3, 3]>(p)",
            "AveragePool(y): padding would reach the kernel size (onnxruntime refuses it)",
        ),
    ],
)
def test_not_folded_with_reason(pad: str, consumer: str, reason: str) -> None:
    model = conv_model(13, pad, consumer)
    before = op_counts(model)
    report = run_checked(model)
    assert op_counts(model) == before
    assert [(s.node, s.reason) for s in report.skips] == [("Pad(p)", reason)]
    assert report.changes == []
