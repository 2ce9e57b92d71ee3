"""``--scope measured``: per-layer sparsity from each layer's measured sensitivity."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.runtime import make_session
from onnxprune.sparsity import SparsifyConfig, apply_sparsity, find_layers
from onnxprune.sparsity.activations import collect_stats
from onnxprune.sparsity.allocate import (
    LEVELS,
    PROBE_DAMP,
    allocate_sparsity,
    measure_curves,
)
from onnxprune.sparsity.masks import select_layer
from onnxprune.sparsity.sparsegpt import obs_update
from onnxprune.sparsity.wanda import wanda_scores
from onnxprune.testing import model_from_text
from test_sparsity import weights

# A wide layer whose weights are mostly tiny next to a narrow one whose every weight
# matters (and a layer three quarters near zero): the same fraction costs them very
# different amounts.
TWO = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8] x, float[8,4] narrow, float[4,64] spread, float[64,6] wide) => (float[N,6] y) {
    a = MatMul(x, narrow)
    b = MatMul(a, spread)
    y = MatMul(b, wide)
}
"""


def _two() -> object:
    rng = np.random.default_rng(0)
    spread = np.tile(np.eye(4), (1, 16)) + rng.standard_normal((4, 64)) * 1e-3  # b ~ a x16
    return model_from_text(
        TWO,
        {
            "narrow": rng.standard_normal((8, 4)).astype(np.float32),
            "spread": spread.astype(np.float32),
            # most of its weights are tiny: half of them can go at little cost
            "wide": (
                rng.standard_normal((64, 6)) * np.where(rng.random((64, 6)) < 0.7, 0.005, 0.2)
            ).astype(np.float32),
        },
    )


def _feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(count)]


def test_greedy_takes_the_cheapest_weights_first_and_stops_at_the_target() -> None:
    sizes = {"cheap": 100, "dear": 100}
    curves = {"cheap": [0.001 * (i + 1) for i in range(len(LEVELS))], "dear": [1.0] * len(LEVELS)}
    targets, nsr = allocate_sparsity(sizes, curves, 0.25)
    assert targets == {"cheap": 0.5, "dear": 0.0}
    assert nsr == pytest.approx(0.002)
    # 60 of 200 weights: the step 0.5 -> 0.625 is taken only as far as needed
    targets, _ = allocate_sparsity(sizes, curves, 0.3)
    assert targets["cheap"] == pytest.approx(0.6) and targets["dear"] == 0.0
    # a curve that falls is made non-decreasing: its later levels cost what the worst did
    targets, _ = allocate_sparsity({"a": 100}, {"a": [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]}, 0.5)
    assert targets == {"a": 0.5}


def test_curves_are_the_error_of_each_layer_sparsified_alone() -> None:
    """Oracle: the same layer sparsified in a copy of the model, run by its own session."""
    model = _two()
    before = {k: v.copy() for k, v in weights(model).items()}
    layers, _ = find_layers(model)
    data = _feeds(6, 1)
    curves, samples = measure_curves(model, layers, iter(data))
    assert samples == 6
    assert {k: v.tobytes() for k, v in weights(model).items()} == {
        k: v.tobytes() for k, v in before.items()
    }  # the model itself is not changed
    dense = make_session(model)
    ref = [dense.run(None, f)[0].astype(np.float64) for f in data]
    for layer in layers:
        for level, measured in zip(LEVELS, curves[layer.node], strict=True):
            copy = _two()
            config = SparsifyConfig(sparsity=level, exclude=())
            only = [x for x in find_layers(copy)[0] if x.node == layer.node]
            apply_sparsity(copy, only, config)
            got = [make_session(copy).run(None, f)[0] for f in data]
            nsr = sum(np.sum((g - r) ** 2) for g, r in zip(got, ref, strict=True)) / sum(
                np.sum(r**2) for r in ref
            )
            assert measured == pytest.approx(nsr, rel=1e-5, abs=1e-12)
    # the wide layer tolerates what the narrow one does not
    assert curves["wide"][1] < curves["narrow"][1]


def test_measured_scope_reaches_the_target_and_spares_the_fragile_layer() -> None:
    fit, held = _feeds(8, 1), _feeds(8, 2)
    errors, zeros = {}, {}
    for scope in ("layer", "measured"):
        model = _two()
        layers, _ = find_layers(model)
        results, steps = apply_sparsity(
            model, layers, SparsifyConfig(sparsity=0.5, scope=scope), lambda: iter(fit)
        )
        zeros[scope] = {r.node: r.zeros / r.params for r in results}
        total = sum(r.zeros for r in results) / sum(r.params for r in results)
        assert total == pytest.approx(0.5, abs=0.01)
        session, dense = make_session(model), make_session(_two())
        errors[scope] = sum(
            float(np.sum((session.run(None, f)[0] - dense.run(None, f)[0]) ** 2)) for f in held
        )
        if scope == "measured":
            assert "measured allocation on 8 calibration feeds" in steps[0]["allocation"]
    # the narrow layer is spared; the near-zero quarters of the other two go first
    assert zeros["measured"] == {"narrow": 0.0, "spread": 0.75, "wide": 0.375}
    assert errors["measured"] < 0.5 * errors["layer"], errors


def test_layers_with_their_own_target_are_not_measured() -> None:
    model = _two()
    layers, _ = find_layers(model)
    own = {"narrow": 0.25, "spread": 0.5}
    config = SparsifyConfig(sparsity=0.5, scope="measured", layer_sparsity=own)
    results, steps = apply_sparsity(model, layers, config, lambda: iter(_feeds(4, 1)))
    by_node = {r.node: r for r in results}
    assert by_node["narrow"].target == 0.25 and by_node["spread"].target == 0.5
    assert by_node["wide"].target == pytest.approx(0.5)  # alone, it carries the target
    assert "1 layers" in steps[0]["allocation"]
    every = SparsifyConfig(sparsity=0.5, scope="measured", layer_sparsity={**own, "wide": 0.1})
    results, steps = apply_sparsity(_two(), layers, every, lambda: iter(_feeds(4, 1)))
    assert [r.target for r in results] == [0.25, 0.5, 0.1] and "allocation" not in steps[0]


def test_updated_probes_are_the_obs_pruned_layer_fitted_on_other_feeds() -> None:
    """Oracle: Wanda mask and OBS update from statistics of the other feeds, applied in a
    copy run by its own session; the update repairs what magnitude probes charge."""
    model = _two()
    layers, _ = find_layers(model)
    probe, other = _feeds(6, 1), _feeds(12, 3)
    curves, _ = measure_curves(model, layers, iter(probe), gram_feeds=iter(other))
    plain, _ = measure_curves(model, layers, iter(probe))
    stats = collect_stats(model, layers, other, gram=True)
    dense = make_session(model)
    ref = [dense.run(None, f)[0].astype(np.float64) for f in probe]
    for layer in layers:
        s = stats[layer.node]
        assert s.gram is not None
        for level, measured in zip(LEVELS, curves[layer.node], strict=True):
            matrix = layer.to_matrix(weights(model)[layer.weight])
            keep = select_layer(wanda_scores(matrix, s.norms), level)
            new, _ = obs_update(matrix, keep, s.gram, s.rows, damp=PROBE_DAMP)
            copy = _two()
            value = copy.graph.initializers[layer.weight]
            value.const_value = ir.tensor(layer.from_matrix(new.astype(np.float32)))
            got = [make_session(copy).run(None, f)[0] for f in probe]
            nsr = sum(np.sum((g - r) ** 2) for g, r in zip(got, ref, strict=True)) / sum(
                np.sum(r**2) for r in ref
            )
            assert measured == pytest.approx(nsr, rel=1e-4, abs=1e-12)
    # "wide" reads 16 copies of 4 values: the update moves pruned weights onto their twins
    # (measured: 0.13 of the magnitude probe's error at 75 %, damped by PROBE_DAMP)
    assert curves["wide"][3] < 0.3 * plain["wide"][3], (curves["wide"], plain["wide"])
