"""Learned rounding (AdaRound) of int8 weights with fixed scales: exact oracles.

Every refined weight dequantizes to within one step of the float weight, nothing but the
stored integers changes, the held-out output error drops, the bytes are reproducible, and
without torch ``--refine adaround`` is refused in one line."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.quant import quantize_file
from onnxprune.quant.testing import write, write_calib
from onnxprune.quant.vnni import needs_u8s8_remedy
from onnxprune.runtime import make_session
from onnxprune.testing import model_from_text

pytest.importorskip("torch")

from onnxprune.quant.refine import RefineOptions

_FAST = RefineOptions(iterations=120, rows=1024)


def _net(seed: int = 0):
    """Conv 3x3 (4->16) + Relu -> Conv 1x1 (16->16) + Relu -> Conv 3x3 depthwise -> GAP ->
    Flatten -> Gemm (16->10): a depthwise layer, activations the int8 rounding hurts."""
    rng = np.random.default_rng(seed)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4,12,12] x, float[16,4,3,3] w1, float[16] b1, float[16,16,1,1] w2,
       float[16] b2, float[16,1,3,3] w3, float[16] b3, float[10,16] wg, float[10] bg)
      => (float[N,10] y) {
        c1 = Conv <pads = [1,1,1,1]> (x, w1, b1)
        r1 = Relu (c1)
        c2 = Conv (r1, w2, b2)
        r2 = Relu (c2)
        c3 = Conv <pads = [1,1,1,1], group = 16> (r2, w3, b3)
        p = GlobalAveragePool (c3)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, wg, bg)
    }
    """
    weights = {
        "w1": rng.standard_normal((16, 4, 3, 3)).astype(np.float32) * 0.3,
        "b1": rng.standard_normal(16).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((16, 16, 1, 1)).astype(np.float32) * 0.3,
        "b2": rng.standard_normal(16).astype(np.float32) * 0.1,
        "w3": rng.standard_normal((16, 1, 3, 3)).astype(np.float32) * 0.4,
        "b3": rng.standard_normal(16).astype(np.float32) * 0.1,
        "wg": rng.standard_normal((10, 16)).astype(np.float32),
        "bg": rng.standard_normal(10).astype(np.float32) * 0.1,
    }
    return model_from_text(text, weights), weights


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The float model, calib/eval data, and its int8 model without and with refinement."""
    folder = tmp_path_factory.mktemp("refine")
    model, weights = _net()
    path = write(model, folder)
    rng = np.random.default_rng(3)
    calib = write_calib(folder, x=rng.standard_normal((24, 1, 4, 12, 12)).astype(np.float32))
    held = rng.standard_normal((32, 1, 4, 12, 12)).astype(np.float32)
    evaluation = write_calib(folder, "eval.npz", x=held)
    common = {
        "calib": calib,
        "eval_data": evaluation,
        # 8-bit weights where the CPU's int8 kernels are exact (VNNI), 7-bit where AVX2's
        # u8s8 pairs would saturate (the refinement reads int8 inputs from those kernels).
        "u8s8": "reduce-range" if needs_u8s8_remedy() else "none",
        "rounding": "nearest",
        "bias_correction": "off",
        "equalize": "off",
        "method": "minmax",
        "calib_cache": False,
    }
    plain = quantize_file(path, folder / "plain.onnx", **common)
    refined = quantize_file(
        path, folder / "refined.onnx", refine="adaround", refine_options=_FAST, **common
    )
    return {
        "folder": folder,
        "model": path,
        "weights": weights,
        "held": held,
        "plain": plain,
        "refined": refined,
        "common": common,
    }


def _proto(path) -> onnx.ModelProto:
    return onnx.load(str(path))


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def _run(path, feeds: np.ndarray) -> np.ndarray:
    session = make_session(str(path), optimize=False)
    return np.concatenate([session.run(None, {"x": f})[0] for f in feeds])


def test_refined_weights_within_one_step(built):
    proto = _proto(built["refined"].output)
    arrays = _initializers(proto)
    plain = _initializers(_proto(built["plain"].output))
    changed = 0
    for name, w in built["weights"].items():
        if not name.startswith("w"):
            continue
        q, s = arrays[f"{name}_quantized"], arrays[f"{name}_scale"]
        axis = 0  # Conv, and Gemm with transB = 1
        scale = s.reshape([-1] + [1] * (w.ndim - 1)) if s.ndim else s
        assert axis == 0
        error = np.abs(q.astype(np.float64) * scale - w)
        assert np.all(error <= scale * (1 + 1e-6)), name
        plain_error = np.abs(plain[f"{name}_quantized"].astype(np.float64) * scale - w)
        assert np.all(plain_error <= scale * (0.5 + 1e-6)), name
        changed += int(np.sum(q != plain[f"{name}_quantized"]))
    assert changed > 0  # the rounding was learned, not left as it was


def test_graph_unchanged_but_integers(built):
    plain, refined = _proto(built["plain"].output), _proto(built["refined"].output)
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in plain.graph.node] == [
        (n.op_type, n.name, list(n.input), list(n.output)) for n in refined.graph.node
    ]
    a, b = _initializers(plain), _initializers(refined)
    assert a.keys() == b.keys()
    differ = set()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        if not np.array_equal(a[name], b[name]):
            differ.add(name)
    # Only stored integers: int8 weights and int32 biases; scales and zero points equal.
    assert differ
    assert all(name.endswith("_quantized") for name in differ), differ
    assert all(b[name].dtype in (np.int8, np.int32) for name in differ)


def test_report(built):
    info = built["refined"].details.refine
    assert info.mode == "adaround" and info.applied and info.reason == "adaround"
    assert info.refined >= 1
    assert len(info.layers) + len(info.skipped) == 4  # three Convs and the Gemm
    for layer in info.layers:
        if layer.applied:
            assert layer.held_out_after < layer.held_out_before
    payload = info.to_dict()
    assert len(payload["layers"]) == len(info.layers) and payload["refined"] == info.refined
    assert all(set(s) == {"node", "reason"} for s in payload["skipped"])
    assert "refine" in built["refined"].details.seconds
    assert "learned rounding (AdaRound): applied (adaround)" in built["refined"].summary()
    off = built["plain"].details.refine.to_dict()
    assert off == {"mode": "off", "applied": False, "reason": "off"}


def test_held_out_error_drops(built):
    """On feeds never fitted on, in onnxruntime with its optimizations off."""
    held = built["held"]
    reference = _run(built["model"], held)
    plain = _run(built["plain"].output, held)
    refined = _run(built["refined"].output, held)
    plain_mse = float(np.mean((plain - reference) ** 2))
    refined_mse = float(np.mean((refined - reference) ** 2))
    assert refined_mse < 0.9 * plain_mse, (plain_mse, refined_mse)


def test_same_bytes_twice(built):
    folder = built["folder"]
    again = quantize_file(
        built["model"],
        folder / "again.onnx",
        refine="adaround",
        refine_options=_FAST,
        **built["common"],
    )
    first = (folder / "refined.onnx").read_bytes()
    assert again.output != built["refined"].output
    assert (folder / "again.onnx").read_bytes() == first


def test_auto_keeps_only_a_held_out_gain(built):
    folder = built["folder"]
    result = quantize_file(
        built["model"], folder / "auto.onnx", refine="auto", refine_options=_FAST, **built["common"]
    )
    info = result.details.refine
    assert info.fit_feeds == 18 and info.judged_on_feeds == 6
    assert info.applied == (info.sqnr_db_with > info.sqnr_db_without)


def _without_torch(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )


def test_cli_refuses_adaround_without_torch(built, monkeypatch, capsys):
    _without_torch(monkeypatch)
    out = built["folder"] / "refused.onnx"
    calib = built["common"]["calib"]
    args = ["quantize", str(built["model"]), "-o", str(out), "--calib", str(calib)]
    code = main([*args, "--refine", "adaround"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "onnxprune quantize: error: --refine adaround needs torch: pip install onnxprune[recover]\n"
    )
    assert not out.exists()


def test_auto_without_torch_is_a_note(built, monkeypatch):
    _without_torch(monkeypatch)
    result = quantize_file(
        built["model"], built["folder"] / "note.onnx", refine="auto", **built["common"]
    )
    info = result.details.refine
    assert not info.applied
    assert info.reason == "auto: skipped, torch not installed (pip install onnxprune[recover])"


def test_refine_needs_static_int8(built, capsys):
    out = built["folder"] / "dynamic.onnx"
    calib = built["common"]["calib"]
    args = ["quantize", str(built["model"]), "-o", str(out), "--calib", str(calib)]
    code = main([*args, "--mode", "dynamic", "--refine", "adaround"])
    assert code == 2
    assert "--refine adaround needs static int8" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1]},
        {"pads": [1, 2, 0, 1], "strides": [2, 1], "dilations": [1, 2]},
        {"pads": [0, 0, 0, 0], "strides": [2, 2], "group": 3},
    ],
)
def test_crop_window_is_the_full_conv_cropped(attrs):
    """A step fits a window of the output: the Conv on the input window it reads (padded
    as the full Conv pads) gives exactly that window of the full output."""
    import torch

    from onnxprune.quant.refine import RefineLayer, _Fit, _Weights

    rng = np.random.default_rng(0)
    channels = 1 if attrs.get("group") else 3
    w = rng.standard_normal((6, channels, 3, 3))
    weights = _Weights(
        w, np.round(w).astype(np.int8), np.ones((6, 1, 1, 1)), np.zeros((1, 1, 1, 1)),
        None, None, None, attrs, None,
    )  # fmt: skip
    fit = _Fit(RefineLayer("c", "Conv", "x", "y", "w", None), weights, 17, RefineOptions())
    x = torch.from_numpy(rng.standard_normal((2, 3, 20, 24))).float()
    weight = torch.from_numpy(w).float()
    full = fit.forward(x, weight, None)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        x_window, expected = fit._crop(x, full, 30, generator)
        got = fit.forward(x_window, weight, None, {**attrs, "pads": [0, 0, 0, 0]})
        assert 25 <= got.shape[2] * got.shape[3] <= 60
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_learned_bias_keeps_its_scale(built):
    """With ``learn_bias`` the int32 biases may change too; their scales may not."""
    folder = built["folder"]
    options = RefineOptions(iterations=60, rows=1024, learn_bias=True)
    result = quantize_file(
        built["model"], folder / "bias.onnx", refine="adaround", refine_options=options,
        **built["common"],
    )  # fmt: skip
    a = _initializers(_proto(built["plain"].output))
    b = _initializers(_proto(result.output))
    differ = {n for n in a if not np.array_equal(a[n], b[n])}
    assert differ and all(n.endswith("_quantized") for n in differ), differ
    assert all(b[n].dtype in (np.int8, np.int32) for n in differ)
