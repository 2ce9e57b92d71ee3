"""Conv latency check: standalone probe models and the 'no speedup' skip (no real timing)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.lowrank import LowRankConfig, lowrank_model
from onnxprune.runtime import make_session
from onnxprune.testing import model_from_text

NET = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 6, 12, 10] x, float[16, 6, 3, 3] w, float[16] b)
    => (float[N, 16, ?, ?] z, float[N, 6, 12, 10] h, float[N, 16, ?, ?] y) {{
    h = Relu (x)
    y = Conv <{attrs}> (h, w, b)
    z = Relu (y)
}}
"""
ATTRS = "pads = [1, 0, 1, 2], strides = [2, 1], dilations = [1, 2]"


def net(attrs: str = ATTRS) -> ir.Model:
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((16, 6, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(16).astype(np.float32),
    }
    return model_from_text(NET.format(attrs=attrs), weights)


def run(model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = make_session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feed), strict=True))


class Recorder:
    """A conv probe returning fixed timings and keeping the models it was given."""

    def __init__(self, dense_ms: float, factored_ms: float) -> None:
        self.times = (dense_ms, factored_ms)
        self.models: list[tuple] = []

    def __call__(self, dense, factored):
        self.models.append((dense, factored))
        return self.times


@pytest.mark.parametrize(
    ("times", "applied"), [((0.98, 1.03), False), ((1.0, 0.96), False), ((1.0, 0.5), True)]
)
def test_conv_latency_skip(times, applied):
    model = net()
    probe = Recorder(*times)
    config = LowRankConfig(rank=4, conv="tucker", conv_latency_check=True, dims={"N": 3})
    outcome = lowrank_model(model, config, conv_probe=probe)
    assert len(probe.models) == 1
    ops = [n.op_type for n in model.graph]
    if applied:
        assert ops == ["Relu", "Conv", "Conv", "Conv", "Relu"]
        assert outcome.layers[0].latency_ms == [1.0, 0.5]
        return
    assert ops == ["Relu", "Conv", "Relu"]
    assert outcome.layers == []
    dense_ms, factored_ms = times
    reasons = {s.node: s.reason for s in outcome.factorize.skips}
    assert reasons == {
        "Conv(y)": f"measured {factored_ms:.3g} ms factorized vs {dense_ms:.3g} ms original: "
        "no speedup (needs 5% faster, input 3x6x12x10)"
    }


def test_conv_latency_check_switches():
    probe = Recorder(1.0, 2.0)
    model = net()
    config = LowRankConfig(rank=4, conv="tucker", conv_latency_check=False)
    lowrank_model(model, config, conv_probe=probe)
    assert probe.models == []
    assert [n.op_type for n in model.graph].count("Conv") == 3
    # --latency-check (all layers) turns the conv check on as well
    model = net()
    config = LowRankConfig(rank=4, conv="tucker", conv_latency_check=False, latency_check=True)
    lowrank_model(model, config, conv_probe=probe)
    assert len(probe.models) == 1
    assert [n.op_type for n in model.graph].count("Conv") == 1
    # on by default for convs
    model = net()
    lowrank_model(model, LowRankConfig(rank=4, conv="tucker"), conv_probe=probe)
    assert len(probe.models) == 2
    assert [n.op_type for n in model.graph].count("Conv") == 1


@pytest.mark.parametrize("kind", ["spatial", "tucker", "separable"])
@pytest.mark.parametrize("attrs", [ATTRS, 'auto_pad = "VALID", strides = [1, 2]'])
def test_probe_models_match_the_layer(kind, attrs):
    """Probe models compute the layer: original vs the full model, chain vs the rewrite."""
    original, rewritten = net(attrs), net(attrs)
    probe = Recorder(2.0, 1.0)  # factored "faster": the rewrite is applied
    config = LowRankConfig(rank=2, conv=kind, conv_latency_check=True, dims={"N": 3})
    lowrank_model(rewritten, config, conv_probe=probe)
    assert [n.op_type for n in rewritten.graph].count("Conv") >= 2
    ((dense, factored),) = probe.models
    shape = [d.dim_value for d in dense.graph.input[0].type.tensor_type.shape.dim]
    assert shape == [3, 6, 12, 10]
    x = np.random.default_rng(1).standard_normal((3, 6, 12, 10)).astype(np.float32)
    before, after = run(ir.to_proto(original), {"x": x}), run(ir.to_proto(rewritten), {"x": x})
    np.testing.assert_allclose(before["h"], after["h"])
    layer_in = {"x": before["h"]}
    np.testing.assert_allclose(run(dense, layer_in)["y"], before["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(factored, layer_in)["y"], after["y"], rtol=1e-5, atol=1e-5)


def test_real_probes_run():
    """The default timers build valid sessions (no assertion on the times themselves)."""
    from onnxprune.lowrank.conv import conv_candidate
    from onnxprune.lowrank.latency import measure_conv, measure_linear

    conv = next(n for n in net().graph if n.op_type == "Conv")
    cand = conv_candidate(conv, "tucker")
    assert not isinstance(cand, str)
    dense, factored = cand.probe_models((4, 4), [1, 6, 12, 10])
    times = measure_conv(dense, factored, repeats=2, budget_s=0.0)
    assert all(t > 0 for t in times)
    assert all(t > 0 for t in measure_linear(16, 8, 4, 3, repeats=2))
