"""Cross-layer equalization: exact in float, equal ranges per pair, better per-tensor int8."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.quant.core import copy_model
from onnxprune.quant.equalize import consumer_ranges, equalize, producer_ranges
from onnxprune.quant.report import EqualizeReport
from onnxprune.runtime import run_model

# (input channels, output channels, group, kernel) per Conv.
_Layer = tuple[int, int, int, int]
_DW_CHAIN: list[_Layer] = [(3, 8, 1, 3), (8, 8, 8, 3), (8, 4, 1, 1)]


def _weights(layer: _Layer, rng: np.random.Generator, skew: bool) -> np.ndarray:
    """Conv weights ``[cout, cin / group, k, k]``; ``skew`` scales each output channel by
    ``10 ** uniform(-2, 2)`` (the per-channel imbalance CLE removes)."""
    cin, cout, group, k = layer
    w = rng.standard_normal((cout, cin // group, k, k))
    if skew:
        w *= 10.0 ** rng.uniform(-2, 2, (cout, 1, 1, 1))
    return w.astype(np.float32)


def _activation(op: str | None, i: int, src: str, inits: list[onnx.TensorProto]) -> onnx.NodeProto:
    """The node ``a{i} = op(src)``; constants it needs are appended to ``inits``."""
    out = f"a{i}"
    if op == "LeakyRelu":
        return helper.make_node(op, [src], [out], name=f"act{i}", alpha=0.1)
    if op == "PRelu":
        inits.append(numpy_helper.from_array(np.array([0.2], np.float32), f"slope{i}"))
        return helper.make_node(op, [src, f"slope{i}"], [out], name=f"act{i}")
    if op == "Clip":
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), f"lo{i}"))
        inits.append(numpy_helper.from_array(np.array(6.0, np.float32), f"hi{i}"))
        return helper.make_node(op, [src, f"lo{i}", f"hi{i}"], [out], name=f"act{i}")
    assert op is not None
    return helper.make_node(op, [src], [out], name=f"act{i}")


def _net(
    layers: Sequence[_Layer],
    acts: Sequence[str | None],
    *,
    seed: int = 0,
    skew: bool = True,
    extra_outputs: Sequence[str] = (),
) -> ir.Model:
    """``x -> Conv0 -> act0 -> Conv1 -> act1 -> ... -> y`` (biases on every Conv, pads keep
    the 8x8 size). ``extra_outputs`` are intermediate names also made graph outputs."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    src = "x"
    for i, layer in enumerate(layers):
        _, cout, group, k = layer
        inits.append(numpy_helper.from_array(_weights(layer, rng, skew), f"w{i}"))
        bias = rng.standard_normal(cout).astype(np.float32)
        inits.append(numpy_helper.from_array(bias, f"b{i}"))
        out = "y" if i == len(layers) - 1 else f"c{i}"
        pads = [k // 2] * 4
        nodes.append(
            helper.make_node(
                "Conv", [src, f"w{i}", f"b{i}"], [out], name=f"conv{i}", group=group, pads=pads
            )
        )
        src = out
        if i < len(acts) and acts[i] is not None and out != "y":
            nodes.append(_activation(acts[i], i, out, inits))
            src = f"a{i}"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, layers[0][0], 8, 8])
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra_outputs]
    graph = helper.make_graph(nodes, "g", [x], outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def _input(scale: float = 1.0, seed: int = 1, channels: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": (scale * rng.standard_normal((2, channels, 8, 8))).astype(np.float32)}


def _assert_same(reference: ir.Model, candidate: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    """Outputs equal within rtol 1e-5 and an atol of 1e-5 of the output's scale."""
    ref = run_model(reference, feeds)
    got = run_model(candidate, feeds)
    for name, expected in ref.items():
        atol = 1e-5 * float(np.max(np.abs(expected)))
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=atol, err_msg=name)


def _array(model: ir.Model, name: str) -> np.ndarray:
    value = model.graph.initializers[name].const_value
    assert value is not None
    return value.numpy()


def _pair_ranges(model: ir.Model, a: int, b: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    return producer_ranges(_array(model, f"w{a}")), consumer_ranges(_array(model, f"w{b}"), group)


def _bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


@pytest.mark.parametrize("act", ["Relu", "LeakyRelu", "PRelu", None])
def test_depthwise_chain_is_exact_and_equalized(act):
    model = _net(_DW_CHAIN, [act, act])
    equalized = copy_model(model)
    report = equalize(equalized, max_iterations=100, tolerance=1e-7)
    assert [(p["producer"], p["consumer"], p["activation"]) for p in report["pairs"]] == [
        ("conv0", "conv1", act),
        ("conv1", "conv2", act),
    ]
    assert report["skipped"] == [] and report["relaxed_clips"] == []
    assert report["converged"] and report["iterations"] < 100
    _assert_same(model, equalized, _input())
    for a, group in ((0, 8), (1, 1)):
        r1, r2 = _pair_ranges(equalized, a, a + 1, group)
        np.testing.assert_allclose(r1, r2, rtol=1e-5)
        assert _array(equalized, f"w{a}").dtype == np.float32
    first = report["pairs"][0]
    assert first["consumer_spread_after"] < first["consumer_spread_before"]


@pytest.mark.parametrize("act", ["Relu", None])
def test_single_pair_has_equal_ranges_at_the_geometric_mean(act):
    model = _net(_DW_CHAIN[:2], [act])
    before = _pair_ranges(model, 0, 1, 8)
    equalized = copy_model(model)
    report = equalize(equalized)
    assert report["iterations"] == 2 and report["converged"]
    r1, r2 = _pair_ranges(equalized, 0, 1, 8)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    np.testing.assert_allclose(r1, np.sqrt(before[0] * before[1]), rtol=1e-5)
    pair = report["pairs"][0]
    assert pair["producer_spread_after"] == pytest.approx(pair["consumer_spread_after"], 1e-5)
    _assert_same(model, equalized, _input())


@pytest.mark.parametrize(
    ("layers", "b_group"),
    [
        ([(3, 8, 1, 3), (8, 6, 2, 3)], 2),  # grouped B, not depthwise (cin_g = 4)
        ([(4, 8, 4, 3), (8, 4, 1, 1)], 1),  # grouped A
        ([(4, 8, 2, 3), (8, 4, 4, 3)], 4),  # both grouped
    ],
)
def test_grouped_convs_are_exact(layers, b_group):
    model = _net(layers, ["Relu"])
    equalized = copy_model(model)
    report = equalize(equalized)
    assert len(report["pairs"]) == 1 and report["pairs"][0]["channels"] == 8
    _assert_same(model, equalized, _input(channels=layers[0][0]))
    r1, r2 = _pair_ranges(equalized, 0, 1, b_group)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)


def test_clip_skip_leaves_the_model_alone():
    model = _net(_DW_CHAIN[:2], ["Clip"])
    original = _bytes(model)
    report = equalize(model, clip="skip")
    assert report["pairs"] == [] and report["relaxed_clips"] == []
    assert report["skipped"] == [
        {
            "producer": "conv0",
            "consumer": "conv1",
            "reason": "Clip is not positive homogeneous (clip='skip')",
        }
    ]
    assert _bytes(model) == original


def test_clip_relax_sets_the_documented_max_and_is_exact_below_it():
    model = _net(_DW_CHAIN[:2], ["Clip"])
    equalized = copy_model(model)
    report = equalize(equalized, clip="relax")
    # S_i = r1_before / r1_after; the new bound is M = max_i 6 / S_i.
    scale = producer_ranges(_array(model, "w0")) / producer_ranges(_array(equalized, "w0"))
    expected = float(np.max(6.0 / scale))
    assert report["relaxed_clips"] == [
        {
            "node": "act0",
            "producer": "conv0",
            "max_before": 6.0,
            "max_after": pytest.approx(expected, rel=1e-6),
        }
    ]
    assert float(_array(equalized, "hi0")) == report["relaxed_clips"][0]["max_after"]
    assert expected > 6.0 and _array(equalized, "lo0") == 0.0
    # Small inputs: no pre-activation reaches 6 (the same net with Relu agrees), so the
    # relaxed Clip is exact there.
    small = _input(scale=0.02)
    relu = _net(_DW_CHAIN[:2], ["Relu"])
    np.testing.assert_array_equal(run_model(relu, small)["y"], run_model(model, small)["y"])
    _assert_same(model, equalized, small)
    # Large inputs do reach 6: there the relaxed model clips later than the original.
    large = _input(scale=100.0)
    assert not np.allclose(run_model(relu, large)["y"], run_model(model, large)["y"])


def _rewire(model: ir.Model, node: str, index: int, value: str) -> None:
    """Make input ``index`` of ``node`` read the value (or initializer) named ``value``."""
    values = {v.name: v for n in model.graph for v in n.outputs}
    values.update(model.graph.initializers)
    target = next(n for n in model.graph if n.name == node)
    target.replace_input_with(index, values[value])


def _branched() -> ir.Model:
    """conv0's output also feeds a second Relu that is a graph output."""
    model = _net(_DW_CHAIN[:2], ["Relu"])
    c0 = next(n for n in model.graph if n.name == "conv0").outputs[0]
    out = ir.val("side", ir.DataType.FLOAT, c0.shape)
    model.graph.append(ir.node("Relu", [c0], outputs=[out], name="side_relu"))
    model.graph.outputs.append(out)
    return model


def _shared_weight() -> ir.Model:
    """conv0 and conv1 (8 -> 8 each) read the same weight initializer."""
    model = _net([(8, 8, 1, 3), (8, 8, 1, 3)], ["Relu"])
    _rewire(model, "conv1", 1, "w0")
    model.graph.initializers.pop("w1")
    return model


@pytest.mark.parametrize(
    ("build", "consumer", "reason"),
    [
        (_branched, None, "output of A 'c0' has 2 consumers"),
        (
            lambda: _net(_DW_CHAIN[:2], ["Relu"], extra_outputs=["c0"]),
            "conv1",
            "output of A 'c0' is a graph output",
        ),
        (
            lambda: _net(_DW_CHAIN[:2], ["Relu"], extra_outputs=["a0"]),
            "conv1",
            "output of the activation 'a0' is a graph output",
        ),
        (_shared_weight, "conv1", "A's weight 'w0' is shared with another node"),
        (
            lambda: _net(_DW_CHAIN[:2], ["Sigmoid"]),
            "conv1",
            "activation Sigmoid is not positive homogeneous",
        ),
    ],
)
def test_skips_leave_the_model_unchanged(build, consumer, reason):
    model = build()
    original = _bytes(model)
    report = equalize(model)
    assert report["pairs"] == [] and report["iterations"] == 0
    assert report["skipped"] == [{"producer": "conv0", "consumer": consumer, "reason": reason}]
    assert _bytes(model) == original


def test_chain_iteration_converges_to_equal_ranges_in_every_pair():
    layers: list[_Layer] = [(3, 8, 1, 3), (8, 8, 8, 3), (8, 8, 1, 1), (8, 4, 1, 3)]
    model = _net(layers, ["Relu", "Relu", "Relu"], seed=3)
    equalized = copy_model(model)
    report = equalize(equalized, max_iterations=200, tolerance=1e-6)
    assert len(report["pairs"]) == 3
    assert report["converged"] and 2 < report["iterations"] < 200
    for a, group in ((0, 8), (1, 1), (2, 1)):
        r1, r2 = _pair_ranges(equalized, a, a + 1, group)
        np.testing.assert_allclose(r1 / r2, 1.0, rtol=1e-3)
    _assert_same(model, equalized, _input())


def test_stops_at_max_iterations_without_converging():
    model = _net(_DW_CHAIN, ["Relu", "Relu"], seed=3)
    report = equalize(model, max_iterations=1, tolerance=1e-12)
    assert report["iterations"] == 1 and not report["converged"]


def _fake_quantize(model: ir.Model) -> ir.Model:
    """A copy with every Conv weight rounded to per-tensor symmetric int8 and back."""
    quantized = copy_model(model)
    for node in quantized.graph:
        weight = node.inputs[1] if node.op_type == "Conv" else None
        if weight is None or weight.const_value is None:
            continue
        w = weight.const_value.numpy().astype(np.float64)
        scale = np.abs(w).max() / 127.0
        array = (np.round(w / scale) * scale).astype(np.float32)
        weight.const_value = ir.tensor(array, name=weight.name)
    return quantized


def _relative_error(reference: ir.Model, candidate: ir.Model, feeds: dict) -> float:
    ref = run_model(reference, feeds)["y"].astype(np.float64)
    got = run_model(candidate, feeds)["y"].astype(np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _folded_bn_net(seed: int) -> ir.Model:
    """Conv -> Relu -> depthwise -> Relu -> pointwise whose depthwise channels are scaled by
    ``c_i = 10 ** uniform(-2, 2)`` and the pointwise's input columns by ``1 / c_i`` (what
    folding a BatchNorm leaves): the same function, but per-tensor int8 of the depthwise
    weights rounds its small channels away."""
    rng = np.random.default_rng(seed)
    model = _net(_DW_CHAIN, ["Relu", "Relu"], seed=seed, skew=False)
    c = 10.0 ** rng.uniform(-2, 2, 8)
    skewed = {
        "w1": _array(model, "w1") * c[:, None, None, None],
        "b1": _array(model, "b1") * c,
        "w2": _array(model, "w2") / c[None, :, None, None],
    }
    for name, array in skewed.items():
        model.graph.initializers[name].const_value = ir.tensor(array.astype(np.float32), name=name)
    return model


def test_equalization_reduces_per_tensor_int8_error():
    model = _folded_bn_net(seed=5)
    equalized = copy_model(model)
    equalize(equalized)
    feeds = _input()
    plain = _relative_error(model, _fake_quantize(model), feeds)
    cle = _relative_error(model, _fake_quantize(equalized), feeds)
    # Measured (relative L2 output error): plain 0.657, equalized 0.0100 (ratio 0.015;
    # seeds 0-7 give ratios 0.009-0.015).
    assert plain > 0.3
    assert cle < 0.1 * plain


def test_same_bytes_twice():
    model = _net(_DW_CHAIN, ["Relu", "Clip"])
    first, second = copy_model(model), copy_model(model)
    report_a, report_b = equalize(first), equalize(second)
    assert _bytes(first) == _bytes(second)
    assert json.dumps(report_a, sort_keys=True) == json.dumps(report_b, sort_keys=True)
    assert report_a["relaxed_clips"][0]["node"] == "act1"


def test_bad_clip_mode_is_refused():
    with pytest.raises(ValueError, match="clip must be one of"):
        equalize(_net(_DW_CHAIN[:2], ["Relu"]), clip="maybe")


def test_shared_clip_max_gets_a_bound_of_its_own():
    # torch exports share one ReLU6 bound constant between all Clips: each relaxed Clip
    # gets a bound of its own, and no initializer is left unread.
    model = _net(_DW_CHAIN, ["Clip", "Clip"], skew=False)
    _rewire(model, "act1", 2, "hi0")
    del model.graph.initializers["hi1"]
    for name in ("b0", "b1"):  # so that small inputs stay below the bound
        model.graph.initializers[name].const_value = ir.tensor(np.zeros(8, np.float32), name=name)
    equalized = copy_model(model)
    report = equalize(equalized)
    assert [e["node"] for e in report["relaxed_clips"]] == ["act0", "act1"]
    assert not report["skipped"]
    bounds = {}
    for node in equalized.graph:
        if node.op_type == "Clip":
            bound = node.inputs[2]
            assert bound is not None and len(bound.uses()) == 1
            bounds[node.name] = float(bound.const_value.numpy())
    assert bounds == {e["node"]: pytest.approx(e["max_after"]) for e in report["relaxed_clips"]}
    assert all(v.uses() for v in equalized.graph.initializers.values())
    small = _input(scale=0.02)  # no pre-activation reaches 6: Relu agrees with the Clips
    pre = run_model(_with_outputs(model, ["c0", "c1"]), small)
    assert max(float(pre["c0"].max()), float(pre["c1"].max())) < 6.0
    _assert_same(model, equalized, small)


def _with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    copy = copy_model(model)
    values = {v.name: v for n in copy.graph for v in n.outputs}
    copy.graph.outputs.extend(values[n] for n in names)
    return copy


def _quantize(tmp_path, model: ir.Model, equalize_mode: str, **options) -> dict:
    from onnxprune.io import save
    from onnxprune.quant import quantize_file
    from onnxprune.quant.testing import write_calib

    path = save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    calib = write_calib(tmp_path, x=rng.standard_normal((8, 2, 3, 8, 8)).astype(np.float32))
    out = tmp_path / f"q_{equalize_mode}.onnx"
    result = quantize_file(path, out, calib=calib, equalize=equalize_mode, **options)
    # The equalization decision is made on the fit samples: compare with those metrics.
    fit_sqnr = min(float(m["sqnr_db"]) for m in result.metrics.values())
    assert result.details.equalize is not None
    return result.details.equalize.to_dict() | {"sqnr": fit_sqnr}


def test_quantize_auto_equalizes_a_skewed_depthwise_net_and_gains(tmp_path):
    model = _folded_bn_net(seed=5)
    options = {"per_channel": False, "u8s8": "none", "bias_correction": "off"}
    auto = _quantize(tmp_path, model, "auto", **options)
    off = _quantize(tmp_path, model, "off", **options)
    assert auto["applied"] and auto["reason"] == "auto: output SQNR improved"
    assert auto["pairs"] == 2 and off == {"mode": "off", "applied": False, "reason": "off"} | {
        "sqnr": off["sqnr"]
    }
    # The report's with/without are the two measured candidates; the written model is the
    # better one (measured here: about 8 dB without, 30 dB with).
    assert auto["sqnr_db_without"] == pytest.approx(off["sqnr"], abs=1e-6)
    assert auto["sqnr"] == pytest.approx(auto["sqnr_db_with"], abs=1e-6)
    assert auto["sqnr_db_with"] > auto["sqnr_db_without"] + 10.0


def test_quantize_auto_leaves_plain_conv_chains_alone(tmp_path):
    model = _net([(3, 8, 1, 3), (8, 8, 1, 3), (8, 4, 1, 1)], ["Relu", "Relu"])
    details = _quantize_conv_net(tmp_path, model)
    assert details.applied is False
    assert details.reason == "auto: no grouped or depthwise convolution pair"


def _quantize_conv_net(tmp_path, model: ir.Model) -> EqualizeReport:
    from onnxprune.io import save
    from onnxprune.quant import quantize_file
    from onnxprune.quant.testing import write_calib

    path = save(model, tmp_path / "c.onnx")
    rng = np.random.default_rng(3)
    calib = write_calib(tmp_path, x=rng.standard_normal((4, 2, 3, 8, 8)).astype(np.float32))
    result = quantize_file(path, tmp_path / "q.onnx", calib=calib, bias_correction="off")
    assert result.details.equalize is not None
    return result.details.equalize


def test_quantize_refuses_a_bad_equalize_mode(tmp_path, capsys):
    from onnxprune.cli import main
    from onnxprune.io import save
    from onnxprune.quant.testing import write_calib

    path = save(_net(_DW_CHAIN, ["Relu", "Relu"]), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    calib = write_calib(tmp_path, x=np.zeros((2, 2, 3, 8, 8), np.float32))
    args = ["quantize", str(path), "-o", str(out), "--calib", str(calib), "--equalize", "x"]
    with pytest.raises(SystemExit) as exit_info:  # refused by the flag parser
        main(args)
    assert exit_info.value.code == 2
    assert "argument --equalize: invalid choice: 'x'" in capsys.readouterr().err
    assert not out.exists()
    assert not out.exists()
