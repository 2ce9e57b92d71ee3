"""Conv factorizations: spatial SVD, Tucker-2, depthwise-separable; exact at full rank."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from onnxprune.lowrank import FactorizePass, LowRankConfig, lowrank_model
from onnxprune.lowrank.conv import conv_candidate
from onnxprune.testing import assert_same_outputs, model_from_text, random_feeds

CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, {c}, 11, 13] x, float[{o}, {cg}, {kh}, {kw}] w, float[{o}] b)
    => (float[2, {o}, ?, ?] y) {{
    y = Conv <{attrs}> (x, w, b)
}}
"""


@pytest.fixture(autouse=True)
def _factored_is_faster(monkeypatch):
    """The conv latency check is on by default; keep these tests free of real timing."""
    monkeypatch.setattr(
        "onnxprune.lowrank.factorize.measure_conv", lambda dense, factored, **kw: (2.0, 1.0)
    )


GEOMETRIES = [
    "pads = [1, 1, 1, 1]",
    "pads = [0, 2, 1, 0], strides = [2, 1]",
    "pads = [2, 1, 2, 1], dilations = [2, 3]",
    "pads = [1, 0, 0, 1], strides = [2, 3], dilations = [1, 2]",
    'auto_pad = "VALID", strides = [1, 2]',
]


def conv_model(o: int, c: int, kh: int, kw: int, attrs: str, *, seed: int = 0, group: int = 1):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((o, c // group, kh, kw)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    attrs = f"{attrs}, group = {group}" if group != 1 else attrs
    text = CONV.format(o=o, c=c, cg=c // group, kh=kh, kw=kw, attrs=attrs)
    return model_from_text(text, {"w": w, "b": b}), model_from_text(text, {"w": w, "b": b})


@pytest.mark.parametrize("kind", ["spatial", "tucker", "separable"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_full_rank_is_exact(kind: str, geometry: str):
    model, reference = conv_model(6, 5, 3, 3, geometry)
    node = next(iter(model.graph))
    cand = conv_candidate(node, kind)
    assert not isinstance(cand, str), cand
    cand.apply(model.graph, cand.full)
    expected = {"spatial": 2, "tucker": 3, "separable": 2}[kind]
    assert Counter(n.op_type for n in model.graph) == Counter({"Conv": expected})
    assert_same_outputs(reference, model, random_feeds(reference), rtol=1e-5, atol=1e-5)


def test_full_rank_is_exact_non_square_kernel():
    for kind in ("spatial", "tucker", "separable"):
        model, reference = conv_model(4, 7, 2, 5, "pads = [1, 2, 0, 2], strides = [1, 2]", seed=1)
        cand = conv_candidate(next(iter(model.graph)), kind)
        cand.apply(model.graph, cand.full)
        assert_same_outputs(reference, model, random_feeds(reference), rtol=1e-5, atol=1e-5)


def test_structure_at_low_rank():
    model, _ = conv_model(32, 32, 3, 3, "pads = [1, 1, 1, 1]")
    lowrank_model(model, LowRankConfig(rank=8, conv="tucker"))
    shapes = [tuple(v.const_value.shape) for v in model.graph.initializers.values()]
    assert sorted(shapes) == sorted([(32,), (8, 32, 1, 1), (8, 8, 3, 3), (32, 8, 1, 1)])
    core = list(model.graph)[1]
    assert list(core.attributes["pads"].value) == [1, 1, 1, 1]

    model, _ = conv_model(32, 16, 3, 3, "pads = [1, 1, 1, 1], strides = [2, 2]")
    lowrank_model(model, LowRankConfig(rank=2, conv="separable"))
    depthwise, pointwise = list(model.graph)
    assert depthwise.attributes["group"].value == 16
    assert list(depthwise.attributes["strides"].value) == [2, 2]
    assert tuple(depthwise.inputs[1].const_value.shape) == (32, 1, 3, 3)
    assert tuple(pointwise.inputs[1].const_value.shape) == (32, 32, 1, 1)
    assert pointwise.inputs[2].name == "b"


def test_spatial_exact_for_rank_one_kernels():
    """A kernel that is a sum of r separable (column x row) filters factors exactly at r."""
    rng = np.random.default_rng(2)
    model, _ = conv_model(8, 4, 3, 3, "pads = [1, 1, 1, 1]")
    cols, rows = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 8, 3))
    w = np.einsum("tci,toj->ocij", cols, rows).astype(np.float32)
    b = np.zeros(8, np.float32)
    text = CONV.format(o=8, c=4, cg=4, kh=3, kw=3, attrs="pads = [1, 1, 1, 1]")
    model, reference = (model_from_text(text, {"w": w, "b": b}) for _ in range(2))
    outcome = lowrank_model(model, LowRankConfig(energy=1.0, conv="spatial", round_to=1))
    assert outcome.layers[0].ranks == [2]
    assert_same_outputs(reference, model, random_feeds(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "shape", "attrs", "reason"),
    [
        ("spatial", (3, 1), "", "kernel 3x1 is already separable in space"),
        (
            "tucker",
            (1, 1),
            "",
            "1x1 kernel: Tucker-2 needs a spatial kernel (plain SVD applies to 1x1)",
        ),
        ("separable", (1, 1), "", "1x1 kernel has no spatial part to make depthwise"),
        (
            "tucker",
            (3, 3),
            'auto_pad = "SAME_UPPER"',
            "auto_pad=SAME_UPPER (run canonicalize or export with explicit pads)",
        ),
    ],
)
def test_conv_skip_reasons(kind, shape, attrs, reason):
    model, _ = conv_model(8, 8, *shape, attrs or "strides = [1, 1]")
    report = FactorizePass(LowRankConfig(rank=2, conv=kind))(model)
    assert [s.reason for s in report.skips] == [reason]


def test_grouped_and_saves_no_work_skips():
    model, _ = conv_model(8, 8, 3, 3, "pads = [1, 1, 1, 1]", group=2)
    report = FactorizePass(LowRankConfig(rank=2, conv="tucker"))(model)
    assert [s.reason for s in report.skips] == ["grouped conv (group=2)"]
    model, _ = conv_model(4, 4, 3, 3, "pads = [1, 1, 1, 1]")
    report = FactorizePass(LowRankConfig(rank=4, conv="tucker"))(model)
    assert [s.reason for s in report.skips] == [
        "rank [4, 4] saves no work: factored 176 params > 0.9 x dense 144"
    ]


def test_conv_weight_or_bias_not_constant():
    text = CONV.format(o=4, c=4, cg=4, kh=3, kw=3, attrs="strides = [1, 1]")
    rng = np.random.default_rng(3)
    model = model_from_text(text, {"b": rng.standard_normal(4).astype(np.float32)})
    report = FactorizePass(LowRankConfig(rank=2, conv="tucker"))(model)
    assert [s.reason for s in report.skips] == ["weight is not a constant"]
    model = model_from_text(text, {"w": rng.standard_normal((4, 4, 3, 3)).astype(np.float32)})
    report = FactorizePass(LowRankConfig(rank=2, conv="tucker"))(model)
    assert [s.reason for s in report.skips] == ["bias is not a constant"]
