"""``onnxprune bench``: reports, inputs, refusals, statistics. No assertion depends on speed."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxprune.bench import (
    BENCH_SCHEMA,
    benchmark,
    latency_stats,
    median_ratio_ci,
    paired_ratio_ci,
)
from onnxprune.bench.system import cpu_info
from onnxprune.cli import main
from onnxprune.errors import UsageError
from onnxprune.io.atomic import write_bytes_atomic
from onnxprune.progress import Progress
from onnxprune.testing import model_from_text

MLP_TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
mlp (float[N, 16] x, float[16, 8] w) => (float[N, 8] y) {
    [mm] h = MatMul (x, w)
    [relu] y = Relu (h)
}
"""


def _mlp(path: Path, seed: int = 0) -> Path:
    w = np.random.default_rng(seed).standard_normal((16, 8)).astype(np.float32)
    model = model_from_text(MLP_TEXT, {"w": w})
    write_bytes_atomic(path, ir.serde.serialize_model(model).SerializeToString())
    return path


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    return _mlp(tmp_path / "mlp.onnx")


FAST = ["--runs", "5", "--warmup", "1", "--threads", "1"]


def test_cli_writes_json_markdown_and_plot(mlp: Path, tmp_path: Path, capsys) -> None:
    other = _mlp(tmp_path / "other.onnx", seed=1)
    out, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    code = main(
        [
            "bench",
            str(mlp),
            str(other),
            "--batch",
            "3",
            *FAST,
            "--json",
            str(out),
            "--markdown",
            str(md),
            "--plot",
            str(png),
        ]
    )
    assert code == 0
    assert "| mlp.onnx |" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["schema"] == BENCH_SCHEMA
    settings = report["settings"]
    assert settings["provider"] == "CPUExecutionProvider"
    assert settings["graph_optimization"] == "ORT_ENABLE_ALL"
    assert (settings["intra_op_threads"], settings["rounds"], settings["warmup"]) == (1, 5, 1)
    assert report["system"]["onnxruntime"] == ort.__version__
    assert set(report["system"]["isa"]) >= {"avx2", "avx512", "avx512_vnni", "amx"}
    first, second = report["models"]
    assert first["inputs"] == {"x": {"shape": [3, 16], "dtype": "float32"}}
    assert first["samples_per_run"] == 3
    assert len(first["latencies_ms"]) == 5 and first["latency_ms"]["runs"] == 5
    lat = first["latency_ms"]
    assert lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert first["throughput_per_s"] == pytest.approx(3 / (lat["median"] / 1e3))
    assert first["ratio_to_first"] is None
    ratio = second["ratio_to_first"]
    assert ratio["low"] <= ratio["ratio"] <= ratio["high"]
    paired = second["paired_ratio_to_first"]
    assert paired["low"] <= paired["ratio"] <= paired["high"]
    per_round = np.array(second["latencies_ms"]) / np.array(first["latencies_ms"])
    assert paired["ratio"] == pytest.approx(float(np.median(per_round)))
    assert ratio["ratio"] == pytest.approx(
        second["latency_ms"]["median"] / first["latency_ms"]["median"]
    )
    # Different weights on the same feed: compared, and not identical.
    assert second["fidelity_to_first"]["y"]["cosine"] < 0.99
    assert "ratio [95% CI]" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_model_twice_is_identical_in_fidelity(mlp: Path) -> None:
    result = benchmark([mlp, mlp], runs=3, warmup=0, threads=1, dims={"N": 2})
    assert [m.label for m in result.models] == ["mlp.onnx", "mlp.onnx#2"]
    fidelity = result.models[1].fidelity_to_first
    assert fidelity is not None and fidelity["y"]["max_abs_error"] == 0.0
    assert result.settings.rounds == 3


def test_shape_option_and_calibration_feed(mlp: Path, tmp_path: Path) -> None:
    result = benchmark([mlp], shapes={"x": (5, 16)}, runs=2, warmup=0, threads=1)
    assert result.models[0].inputs["x"]["shape"] == [5, 16]
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((4, 1, 16), np.float32))
    result = benchmark([mlp], calib=calib, batch=6, runs=2, warmup=0, threads=1)
    assert result.models[0].inputs["x"]["shape"] == [6, 16]  # 4 samples cycled to 6
    assert result.settings.input_source.startswith("calibration")


def test_seconds_mode_runs_at_least_min_rounds(mlp: Path) -> None:
    result = benchmark([mlp], seconds=0.01, warmup=0, threads=1, dims={"N": 1})
    assert result.settings.rounds >= 5
    assert result.settings.runs is None and result.settings.seconds == 0.01


def test_unknown_provider_lists_available(mlp: Path, capsys) -> None:
    code = main(["bench", str(mlp), "--provider", "npu", "--batch", "1", *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxprune bench: error: execution provider 'npu' is not available")
    assert "available: " in err and "CPUExecutionProvider" in err


def test_symbolic_batch_defaults_to_one_with_a_notice(mlp: Path, tmp_path: Path, capsys) -> None:
    """Issue 14 item 24: no --dim needed for a batch axis (Polygraphy's default), said once."""
    report = tmp_path / "r.json"
    assert main(["bench", str(mlp), str(mlp), *FAST, "--json", str(report)]) == 0
    err = capsys.readouterr().err
    assert err.count("symbolic dims not given") == 1, err
    assert "N=1 (leading (batch) axis)" in err and "--dim NAME=SIZE" in err, err
    assert json.loads(report.read_text())["models"][0]["inputs"]["x"]["shape"] == [1, 16]
    assert main(["bench", str(mlp), *FAST, "--dim", "N=3"]) == 0
    assert "symbolic dims not given" not in capsys.readouterr().err


SYMBOLIC_CNN = """
<ir_version: 10, opset_import: ["" : 17]>
cnn (float[N, C, H, 6] x, float[4, 3, 3, 3] w, float[4] s) => (float[N, 4, 8] y) {
    [conv] c = Conv <pads = [1, 1, 1, 1]> (x, w)
    [bn] b = BatchNormalization (c, s, s, s, s)
    [mean] y = ReduceMean <axes = [3], keepdims = 0> (b)
}
"""


def test_channel_dims_are_derived_and_unknown_dims_named(tmp_path: Path, capsys) -> None:
    """A channel axis is never bound to 1: it is read from the Conv weight; a dim nothing
    fixes (height) is refused by name."""
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((4, 3, 3, 3)), "s": np.ones(4)}
    model = model_from_text(SYMBOLIC_CNN, {k: v.astype(np.float32) for k, v in arrays.items()})
    path = tmp_path / "cnn.onnx"
    write_bytes_atomic(path, ir.serde.serialize_model(model).SerializeToString())
    assert main(["bench", str(path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "input 'x' axis 2 has symbolic dimension 'H'" in err and err.count("\n") == 1, err
    report = tmp_path / "r.json"
    assert main(["bench", str(path), *FAST, "--dim", "H=8", "--json", str(report)]) == 0
    err = capsys.readouterr().err
    assert "N=1 (leading (batch) axis), C=3 (input channels of Conv 'conv')" in err, err
    assert json.loads(report.read_text())["models"][0]["inputs"]["x"]["shape"] == [1, 3, 8, 6]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shape", "x=1,16"], "--shape 'x=1,16': expected NAME:DIMS"),
        (["--shape", "z:1x16"], "--shape names 'z', which is not a model input (inputs: x)"),
        (["--shape", "x:1x16x2"], "--shape for input 'x': rank 3 given"),
        (["--shape", "x:1x15"], "--shape for input 'x': [1, 15] does not fit the model input"),
        (["--batch", "0"], "--batch 0: must be positive"),
        (["--batch", "1", "--provider-option", "novalue"], "--provider-option 'novalue'"),
    ],
)
def test_bad_inputs_are_usage_errors(mlp: Path, capsys, args: list[str], message: str) -> None:
    code = main(["bench", str(mlp), *FAST, *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_calib_with_dims_is_refused(mlp: Path, tmp_path: Path) -> None:
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((2, 1, 16), np.float32))
    with pytest.raises(UsageError, match="cannot be combined with --calib"):
        benchmark([mlp], calib=calib, dims={"N": 1}, runs=1, warmup=0)


def test_runs_and_seconds_are_exclusive(mlp: Path) -> None:
    with pytest.raises(UsageError, match="either runs or seconds"):
        benchmark([mlp], runs=3, seconds=1.0)


def test_plot_without_matplotlib_is_clear(mlp: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["bench", str(mlp), "--batch", "1", *FAST, "--plot", "x.png"])
    assert code == 2
    assert "plots need matplotlib: pip install 'onnxprune[plot]'" in capsys.readouterr().err


def test_latency_stats_known_values() -> None:
    stats = latency_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (stats.median, stats.mean, stats.min, stats.max) == (3.0, 3.0, 1.0, 5.0)
    assert stats.std == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1))
    assert stats.p90 == pytest.approx(4.6)


def test_ratio_ci_exact_cases() -> None:
    ref = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95]
    same = median_ratio_ci(ref, ref)
    assert (same.ratio, same.low, same.high) == (1.0, 1.0, 1.0)
    double = median_ratio_ci(ref, [2 * x for x in ref])
    assert (double.ratio, double.low, double.high) == pytest.approx((2.0, 2.0, 2.0))
    paired = paired_ratio_ci(ref, [2 * x for x in ref])
    assert (paired.ratio, paired.low, paired.high) == pytest.approx((2.0, 2.0, 2.0))


def test_ratio_ci_is_seeded_and_covers_the_true_ratio() -> None:
    rng = np.random.default_rng(7)
    drift = np.linspace(1.0, 1.5, 400)  # slow machine drift hits both alike
    ref = drift * rng.lognormal(0.0, 0.05, 400)
    cand = 1.5 * drift * rng.lognormal(0.0, 0.05, 400)
    a, b = median_ratio_ci(ref, cand, seed=3), median_ratio_ci(ref, cand, seed=3)
    assert a == b
    assert a.low < 1.5 < a.high
    paired = paired_ratio_ci(ref, cand, seed=3)
    assert paired.low < 1.5 < paired.high
    # Per-round ratios cancel the drift, so that interval is the tighter one.
    assert paired.high - paired.low < a.high - a.low
    with pytest.raises(ValueError, match="paired latencies"):
        median_ratio_ci([1.0, 2.0], [1.0])


def test_cpu_info_parses_flags() -> None:
    text = "model name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile\n"
    model, isa = cpu_info(text)
    assert model == "Test CPU 9000"
    assert isa["avx2"] and isa["avx512"] and isa["avx512_vnni"] and isa["amx"]
    assert not isa["avx_vnni"]


def test_progress_is_silent_off_terminal_and_draws_when_forced() -> None:
    quiet = io.StringIO()
    with Progress(10, "bench", stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    with Progress(4, "bench", stream=loud, enabled=True) as bar:
        bar.update(2)
    assert "bench:" in loud.getvalue() and "2/4" in loud.getvalue()
    assert loud.getvalue().endswith("\n")


@pytest.mark.parametrize(("value", "shown"), [("0", False), ("1", True), ("", False)])
def test_progress_environment_switch(monkeypatch, value: str, shown: bool) -> None:
    """ONNXPRUNE_PROGRESS forces bars on or off; unset, a non-terminal stream gets none."""
    monkeypatch.setenv("ONNXPRUNE_PROGRESS", value)
    stream = io.StringIO()
    with Progress(3, "calibrate", stream=stream) as bar:
        bar.update(3, note="loss 0.5")
    assert bar.count == 3
    assert ("3/3" in stream.getvalue()) == shown


@pytest.mark.cuda
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="CUDAExecutionProvider is not available in this onnxruntime build (no GPU)",
)
def test_cuda_uses_io_binding(mlp: Path) -> None:
    result = benchmark([mlp, mlp], provider="cuda", runs=3, warmup=1, dims={"N": 2})
    assert result.settings.provider == "CUDAExecutionProvider"
    assert result.settings.execution == "io_binding (device)"
    assert result.models[1].fidelity_to_first is not None
    assert result.models[1].fidelity_to_first["y"]["cosine"] == pytest.approx(1.0)


def test_block_mode_records_one_latency_per_round_and_says_so(tmp_path, capsys):
    """--block N runs each model N times per round; the JSON states the method."""
    import json as _json

    from onnxprune.testing import model_from_text

    model = model_from_text(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1, 8] x) => (float[1, 8] y) { y = Relu (x) }
        """
    )
    path = tmp_path / "m.onnx"
    import onnx_ir as ir

    ir.save(model, path)
    out = tmp_path / "r.json"
    args = ["bench", str(path), str(path), "--runs", "7", "--warmup", "1", "--block", "3"]
    assert main([*args, "--json", str(out)]) == 0
    data = _json.loads(out.read_text())
    assert data["settings"]["block"] == 3
    assert "3 consecutive run(s) per model" in data["method"]["interleaving"]
    assert all(len(m["latencies_ms"]) == 7 for m in data["models"])
    assert main(["bench", str(path), "--runs", "2", "--block", "0"]) == 2
    assert "--block 0: must be >= 1" in capsys.readouterr().err
