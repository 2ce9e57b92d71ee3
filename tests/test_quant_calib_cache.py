"""Calibration cache: a re-run with other exclusions skips calibration and gives the same bytes;
other data or another model miss; opt-out writes nothing; a corrupt entry is recalibrated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxprune.cli import main
from onnxprune.quant import quantize_file
from onnxprune.quant.calib_cache import default_dir
from onnxprune.quant.testing import conv_net, image_calib, write, write_calib

OPTIONS = {"bias_correction": "off", "equalize": "off", "smooth": "off", "method": "minmax"}


def _run(model: Path, calib: Path, out: Path, cache: Path | bool, **kwargs: object) -> str:
    result = quantize_file(model, out, calib=calib, calib_cache=cache, **OPTIONS, **kwargs)
    return result.details.calibration_cache["calibrate"]


def test_rerun_with_other_exclusions_hits_and_matches_a_fresh_run(tmp_path: Path) -> None:
    model = write(conv_net(), tmp_path)
    calib = image_calib(tmp_path)
    cache = tmp_path / "cache"
    assert _run(model, calib, tmp_path / "a.onnx", cache) == "miss"
    assert len(list(cache.glob("*.npz"))) == 1
    excluded = {"exclude": ["Conv_2"]}
    assert _run(model, calib, tmp_path / "b.onnx", cache, **excluded) == "hit"
    again = quantize_file(model, tmp_path / "b2.onnx", calib=calib, calib_cache=cache, **OPTIONS)
    assert "calibration cache: calibrate hit" in again.summary()
    assert _run(model, calib, tmp_path / "c.onnx", False, **excluded) == "off"
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()
    # mean-minmax needs no histogram either: it shares minmax's entry (per-feed extremes
    # are stored with it) and gives the bytes of an uncached run.
    mean = {**OPTIONS, "method": "mean-minmax"}
    done = quantize_file(model, tmp_path / "m.onnx", calib=calib, calib_cache=cache, **mean)
    assert done.details.calibration_cache["calibrate"] == "hit"
    quantize_file(model, tmp_path / "m2.onnx", calib=calib, calib_cache=False, **mean)
    assert (tmp_path / "m.onnx").read_bytes() == (tmp_path / "m2.onnx").read_bytes()
    assert (tmp_path / "m.onnx").read_bytes() != (tmp_path / "a.onnx").read_bytes()
    # Histogram methods are another entry (minmax keeps no histograms), reused across them.
    hist = {**OPTIONS, "method": "percentile"}
    assert quantize_file(model, tmp_path / "d.onnx", calib=calib, calib_cache=cache, **hist)
    assert len(list(cache.glob("*.npz"))) == 2
    mse = {**OPTIONS, "method": "mse"}
    done = quantize_file(model, tmp_path / "e.onnx", calib=calib, calib_cache=cache, **mse)
    assert done.details.calibration_cache["calibrate"] == "hit"
    quantize_file(model, tmp_path / "f.onnx", calib=calib, calib_cache=False, **mse)
    assert (tmp_path / "e.onnx").read_bytes() == (tmp_path / "f.onnx").read_bytes()


def test_other_data_or_model_misses(tmp_path: Path) -> None:
    model = write(conv_net(), tmp_path)
    calib = image_calib(tmp_path)
    cache = tmp_path / "cache"
    assert _run(model, calib, tmp_path / "a.onnx", cache) == "miss"
    x = np.load(calib)["x"].copy()
    x[3, 0, 0, 0, 0] += 1e-3  # one value of one feed
    other = write_calib(tmp_path, "other.npz", x=x)
    assert _run(model, other, tmp_path / "b.onnx", cache) == "miss"
    model2 = write(conv_net(seed=1), tmp_path, "model2.onnx")
    assert _run(model2, calib, tmp_path / "c.onnx", cache) == "miss"
    assert len(list(cache.glob("*.npz"))) == 3


def test_corrupt_entry_is_recalibrated_and_rewritten(tmp_path: Path) -> None:
    model = write(conv_net(), tmp_path)
    calib = image_calib(tmp_path)
    cache = tmp_path / "cache"
    _run(model, calib, tmp_path / "a.onnx", cache)
    (entry,) = cache.glob("*.npz")
    entry.write_bytes(b"not an npz")
    assert _run(model, calib, tmp_path / "b.onnx", cache) == "miss"
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert _run(model, calib, tmp_path / "c.onnx", cache) == "hit"


def test_cli_uses_the_cache_dir_and_opts_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path / "root"))
    assert default_dir() == tmp_path / "root" / "calibration"
    model = write(conv_net(), tmp_path)
    calib = image_calib(tmp_path)
    args = ["quantize", str(model), "--calib", str(calib), "--equalize", "off"]
    assert main([*args, "-o", str(tmp_path / "a.onnx"), "--no-calib-cache"]) == 0
    assert not default_dir().exists()
    assert main([*args, "-o", str(tmp_path / "b.onnx")]) == 0
    assert len(list(default_dir().glob("*.npz"))) == 1
