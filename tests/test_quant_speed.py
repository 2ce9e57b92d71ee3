"""The quantize report's speed check: the written model timed against its input."""

from __future__ import annotations

import json

import pytest

from onnxprune.cli import main
from onnxprune.errors import UsageError
from onnxprune.quant import quantize_file
from onnxprune.quant.speed import SpeedCheck
from onnxprune.quant.testing import conv_net, image_calib, write


def _check(ratio: float, low: float, high: float, output_ms: float | None = None) -> SpeedCheck:
    return SpeedCheck(2, 100, 1.0, ratio if output_ms is None else output_ms, ratio, low, high)


def test_verdict_follows_the_interval_and_only_slower_warns():
    slower, faster, unclear = _check(1.2, 1.1, 1.3), _check(0.5, 0.45, 0.55), _check(1.0, 0.9, 1.1)
    assert (slower.verdict, faster.verdict, unclear.verdict) == (
        "slower",
        "faster",
        "no clear difference",
    )
    assert "warning: the quantized model is slower" in slower.summary()
    assert "2.00x the input's speed" in faster.summary()
    assert "warning" not in faster.summary() and "warning" not in unclear.summary()
    # The per-round ratios say faster, the medians slower: no verdict either way.
    split = _check(0.97, 0.957, 0.988, output_ms=1.06)
    assert split.verdict == "no clear difference"
    assert split.summary().endswith("no clear difference")


def test_cli_times_the_output_and_the_bytes_do_not_depend_on_it(tmp_path):
    model = write(conv_net(), tmp_path)
    calib = image_calib(tmp_path)
    timed, untimed, report = tmp_path / "t.onnx", tmp_path / "u.onnx", tmp_path / "r.json"
    args = ["quantize", str(model), "--calib", str(calib), "--u8s8", "none"]
    assert main([*args, "-o", str(timed), "--speed-check", "0.3", "--report", str(report)]) == 0
    assert main([*args, "-o", str(untimed), "--speed-check", "0"]) == 0
    assert timed.read_bytes() == untimed.read_bytes()
    speed = json.loads(report.read_text())["speed"]
    assert speed["rounds"] >= 3 and speed["input_ms"] > 0 and speed["output_ms"] > 0
    assert speed["low"] <= speed["ratio"] <= speed["high"]
    assert speed["verdict"] in ("slower", "faster", "no clear difference")


def test_not_timed_when_off_or_not_int8_for_the_cpu(tmp_path):
    model = write(conv_net(), tmp_path)
    calib = image_calib(tmp_path)
    off = quantize_file(model, tmp_path / "a.onnx", calib=calib, u8s8="none")
    fp16 = quantize_file(model, tmp_path / "b.onnx", calib=calib, dtype="fp16", speed_check=1)
    assert off.speed is None and fp16.speed is None
    with pytest.raises(UsageError, match="--speed-check"):
        quantize_file(model, tmp_path / "c.onnx", calib=calib, speed_check=-1)
    assert not (tmp_path / "c.onnx").exists()
