"""Bad models and bad data: every command refuses them in one line (exit 2) naming the
culprit, or handles them; nothing silently wrong, no traceback (issue 14, items 8-13, 19,
21-23 and the silero-vad abort)."""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.failures import EscapingFormatter, one_line, runtime_failure

COMMANDS = (
    "canonicalize",
    "prune",
    "sparsify",
    "lowrank",
    "quantize",
    "verify",
    "inspect",
    "bench",
)
REWRITING = ("canonicalize", "prune", "sparsify", "lowrank", "quantize")


# --- models ---------------------------------------------------------------------------------


def mlp(dtype: type = np.float32, hidden: int = 32, in_dims: list | None = None) -> onnx.ModelProto:
    """y = relu(x @ w1 + b1) @ w2, x [batch, 16], y [batch, 8]."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["y"], name="mm2"),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, hidden)).astype(dtype), "w1"),
        numpy_helper.from_array(rng.standard_normal(hidden).astype(dtype), "b1"),
        numpy_helper.from_array(rng.standard_normal((hidden, 8)).astype(dtype), "w2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", elem, in_dims or ["batch", 16])],
        [helper.make_tensor_value_info("y", elem, ["batch", 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _short_raw(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-8]


def _short_float_data(m: onnx.ModelProto) -> None:
    tensor = m.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.float_data.extend([1.0] * 5)


def _huge_dims(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].dims[0] = 2**62


def _negative_dim(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].dims[0] = -3


def _missing_attribute(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Concat", ["y", "y"], ["z"], name="cat"))
    m.graph.output[0].name = "z"


def _custom_domain(m: onnx.ModelProto) -> None:
    m.graph.node[2].op_type = "FancyRelu"
    m.graph.node[2].domain = "com.acme"
    m.opset_import.append(helper.make_opsetid("com.acme", 1))


def _duplicate_node_names(m: onnx.ModelProto) -> None:
    m.graph.node[1].name = "mm1"


def _duplicate_initializer(m: onnx.ModelProto) -> None:
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((16, 32), np.float32), "w1"))


def _bfloat16_input(m: onnx.ModelProto) -> None:
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.BFLOAT16
    m.graph.node.insert(0, helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
    m.graph.node[1].input[0] = "xf"


def _external(m: onnx.ModelProto, entries: dict[str, str]) -> None:
    tensor = m.graph.initializer[2]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": "w.bin", **entries}.items():
        tensor.external_data.add(key=key, value=value)


#: (break the model, text the one-line error must contain)
STRUCTURAL: dict[str, tuple[Callable[[onnx.ModelProto], None], str]] = {
    "inline data too short": (_short_raw, "tensor 'w1': holds 2040 bytes"),
    "typed data too short": (_short_float_data, "tensor 'w1': holds 5 float_data entries"),
    "dims overflow int64": (_huge_dims, "tensor 'w1': dims [4611686018427387904, 32]"),
    "negative dim": (_negative_dim, "tensor 'w1' has a negative dim -3"),
    "missing required attribute": (_missing_attribute, "node 'cat' (Concat) lacks its required"),
    "custom domain": (_custom_domain, "node 'relu' (com.acme:FancyRelu) is a custom operator"),
    "duplicate node names": (_duplicate_node_names, "two nodes are named 'mm1'"),
    "duplicate initializer": (_duplicate_initializer, "initializer 'w1' is defined more than once"),
    "bfloat16 input": (_bfloat16_input, "graph input 'x' is bfloat16"),
    "unknown external key": (
        lambda m: _external(m, {"bogus": "1"}),
        "tensor 'w2': unknown external-data key 'bogus'",
    ),
    "offset with underscore": (
        lambda m: _external(m, {"offset": "1_6"}),
        "tensor 'w2': external data offset '1_6' is not a plain",
    ),
}


def _write(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> str:
    path = folder / name
    path.write_bytes(model.SerializeToString())
    (folder / "w.bin").write_bytes(np.zeros(32 * 8, np.float32).tobytes())
    return str(path)


def _calib(folder: Path, dtype: type = np.float32, nan: str = "", name: str = "x") -> str:
    x = np.random.default_rng(1).standard_normal((16, 16)).astype(dtype)
    if nan == "one":
        x[3, 2] = np.nan
    elif nan == "all":
        x[:] = np.nan
    path = folder / f"calib{nan}.npz"
    np.savez(path, **{name: x})
    return str(path)


def _argv(command: str, model: str, folder: Path, calib: str) -> list[str]:
    out = str(folder / "out.onnx")
    return {
        "canonicalize": ["canonicalize", model, "-o", out],
        "prune": ["prune", model, "-o", out, "--ratio", "0.25"],
        "sparsify": ["sparsify", model, "-o", out, "--sparsity", "0.5"],
        "lowrank": ["lowrank", model, "-o", out, "--rank", "4"],
        "quantize": ["quantize", model, "-o", out, "--calib", calib],
        "verify": ["verify", model, model, "--calib", calib],
        "inspect": ["inspect", model],
        "bench": ["bench", model, "--runs", "2", "--warmup", "1", "--dim", "batch=1"],
    }[command]


def _refused(argv: list[str], capsys, expected: str, folder: Path) -> str:
    """Run the CLI: exit 2, one stderr line containing ``expected``, no output file."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    assert not (folder / "out.onnx").exists()
    return err


# --- items 8, 9: malformed models -----------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", sorted(STRUCTURAL))
def test_malformed_models_are_refused_in_one_line_by_every_command(tmp_path, capsys, case, command):
    breaker, expected = STRUCTURAL[case]
    model = mlp()
    breaker(model)
    path = _write(model, tmp_path)
    _refused(_argv(command, path, tmp_path, _calib(tmp_path)), capsys, expected, tmp_path)


def test_shape_error_found_by_onnxruntime_is_one_line_naming_the_node(tmp_path, capsys):
    """What no up-front check catches still ends in one line from onnxruntime, exit 2."""
    model = mlp()
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.ones((15, 32), np.float32), "w1")
    )
    path = _write(model, tmp_path)
    for command in ("canonicalize", "verify", "bench"):
        err = _refused(
            _argv(command, path, tmp_path, _calib(tmp_path)), capsys, "onnxruntime", tmp_path
        )
        assert "mm1" in err and "[ONNXRuntimeError]" not in err


@pytest.mark.parametrize("command", ["canonicalize", "prune", "sparsify", "lowrank"])
def test_symbolic_channel_dim_is_not_silently_bound_to_one(tmp_path, capsys, command):
    path = _write(mlp(in_dims=["batch", "C"]), tmp_path)
    argv = _argv(command, path, tmp_path, "")
    err = _refused(argv, capsys, "symbolic dims bound to 1 by default (C=1)", tmp_path)
    assert "--dim" in err and "mm1" in err


# --- items 11, 13, 22: what a rewrite must not touch ----------------------------------------


def _initializer_as_input(m: onnx.ModelProto) -> None:
    m.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [16, 32]))


def _initializer_as_output(m: onnx.ModelProto) -> None:
    m.graph.output.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [32, 8]))


def _nan_weights(m: onnx.ModelProto) -> None:
    array = numpy_helper.to_array(m.graph.initializer[0]).copy()
    array[0, :3] = np.nan
    array[1, 0] = np.inf
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(array, "w1"))


REWRITE_REFUSALS = {
    "initializer is a graph input": (
        _initializer_as_input,
        "initializer 'w1' is also a graph input",
    ),
    "initializer is a graph output": (
        _initializer_as_output,
        "initializer 'w2' is also a graph output",
    ),
    "NaN and Inf weights": (_nan_weights, "initializer 'w1' holds 3 NaN and 1 Inf values"),
}


@pytest.mark.parametrize("command", REWRITING)
@pytest.mark.parametrize("case", sorted(REWRITE_REFUSALS))
def test_rewrites_refuse_overridable_and_non_finite_weights(tmp_path, capsys, case, command):
    breaker, expected = REWRITE_REFUSALS[case]
    model = mlp()
    breaker(model)
    path = _write(model, tmp_path)
    _refused(_argv(command, path, tmp_path, _calib(tmp_path)), capsys, expected, tmp_path)


def test_lowrank_activation_aware_refuses_nan_weights_without_linalg_error(tmp_path, capsys):
    model = mlp()
    _nan_weights(model)
    path = _write(model, tmp_path)
    argv = [*_argv("lowrank", path, tmp_path, ""), "--activation-aware", "--calib"]
    _refused([*argv, _calib(tmp_path)], capsys, "holds 3 NaN and 1 Inf", tmp_path)


def test_lowrank_activation_aware_refuses_non_finite_activations(tmp_path, capsys):
    """Finite weights and data, but a layer input overflows to inf: named, not a NaN model."""
    model = mlp()
    model.graph.node.insert(0, helper.make_node("Mul", ["x", "k"], ["xs"], name="scale"))
    model.graph.node[1].input[0] = "xs"
    model.graph.initializer.append(numpy_helper.from_array(np.float32(3e38), "k"))
    path = _write(model, tmp_path)
    argv = [*_argv("lowrank", path, tmp_path, ""), "--activation-aware", "--calib"]
    _refused([*argv, _calib(tmp_path)], capsys, "non-finite values", tmp_path)


@pytest.mark.parametrize(
    ("nan", "commands"),
    [("one", ("quantize", "prune")), ("all", ("canonicalize", "prune", "sparsify", "quantize"))],
)
def test_nan_in_calibration_data_is_refused_naming_input_and_sample(
    tmp_path, capsys, nan, commands
):
    path = _write(mlp(), tmp_path)
    calib = _calib(tmp_path, nan=nan)
    sample = 3 if nan == "one" else 0
    for command in commands:
        argv = _argv(command, path, tmp_path, calib)
        if "--calib" not in argv:
            argv += ["--calib", calib]
        err = _refused(argv, capsys, "calibration input 'x' holds", tmp_path)
        assert f"first in sample {sample} of" in err and "collapsed" not in err


def test_zero_size_weights_are_left_alone(tmp_path, capsys):
    path = _write(mlp(hidden=0), tmp_path)
    calib = _calib(tmp_path)
    out = str(tmp_path / "out.onnx")
    for argv in (
        ["lowrank", path, "-o", out, "--rank", "4", "--activation-aware", "--calib", calib],
        ["quantize", path, "-o", out, "--calib", calib],
        ["verify", path, path, "--calib", calib],
    ):
        assert main(argv) == 0, capsys.readouterr().err


def test_zero_size_output_is_compared(tmp_path, capsys):
    model = mlp()
    model.graph.initializer[2].CopyFrom(
        numpy_helper.from_array(np.zeros((32, 0), np.float32), "w2")
    )
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 0
    path = _write(model, tmp_path)
    calib = _calib(tmp_path)
    for command in ("prune", "quantize", "verify"):
        assert main(_argv(command, path, tmp_path, calib)) == 0, capsys.readouterr().err


# --- item 10: float16 and float64 models ----------------------------------------------------


@pytest.mark.parametrize(("dtype", "name"), [(np.float16, "float16"), (np.float64, "double")])
def test_quantize_refuses_non_float32_models_naming_the_dtype(tmp_path, capsys, dtype, name):
    path = _write(mlp(dtype), tmp_path)
    argv = _argv("quantize", path, tmp_path, _calib(tmp_path, dtype))
    _refused(
        argv, capsys, f"quantize needs a float32 model, but graph input 'x' is {name}", tmp_path
    )


# --- item 19: names cannot forge lines ------------------------------------------------------


def test_names_with_newlines_cannot_forge_a_second_line(tmp_path, capsys):
    model = mlp()
    forged = "x\nonnxprune quantize: FAKE: all good"
    model.graph.input[0].name = forged
    model.graph.node[0].input[0] = forged
    path = _write(model, tmp_path)
    _refused(_argv("quantize", path, tmp_path, _calib(tmp_path)), capsys, "\\n", tmp_path)


def test_one_line_escapes_control_and_bidi_characters():
    assert one_line("a\nb\r\x1b[31m\u202ec") == "a\\nb\\r\\x1b[31m\\u202ec"
    assert one_line("naïve 名前") == "naïve 名前"
    record = logging.LogRecord("n", logging.WARNING, "f", 1, "tensor %s", ("a\nb",), None)
    assert "\n" not in EscapingFormatter("%(message)s").format(record)


def test_runtime_failure_drops_source_positions():
    class FailError(Exception):
        pass

    text = runtime_failure(
        FailError(
            "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running "
            "MatMul node. Name:'mm1' Status Message: matmul_helper.h:59 Compute MatMul "
            "dimension mismatch"
        )
    )
    assert text == (
        "onnxruntime cannot run the model: node 'mm1' (MatMul) failed: Compute MatMul "
        "dimension mismatch"
    )


# --- item 21: dynamic quantization output passes onnx's full check ---------------------------


def test_dynamic_quantization_passes_the_full_onnx_check(tmp_path, capsys):
    model = onnx.shape_inference.infer_shapes(mlp())
    path = _write(model, tmp_path)
    out = tmp_path / "out.onnx"
    argv = ["quantize", path, "-o", str(out), "--calib", _calib(tmp_path), "--mode", "dynamic"]
    assert main(argv) == 0, capsys.readouterr().err
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


# --- item 23: float16 exactness tolerance ----------------------------------------------------


def fp16_cnn(seed: int = 0, channels: tuple[int, ...] = (3, 16, 32, 32)) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu blocks in float16, then GlobalAveragePool."""
    rng = np.random.default_rng(seed)
    dtype = np.float16
    nodes, inits, x = [], [], "x"
    for i, (cin, cout) in enumerate(itertools.pairwise(channels)):
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(dtype)
        params = {
            f"w{i}": w,
            f"g{i}": rng.uniform(0.5, 2, cout).astype(dtype),
            f"b{i}": rng.standard_normal(cout).astype(dtype),
            f"m{i}": (rng.standard_normal(cout) * 0.1).astype(dtype),
            f"v{i}": rng.uniform(0.5, 2, cout).astype(dtype),
        }
        inits += [numpy_helper.from_array(a, n) for n, a in params.items()]
        bn_inputs = [f"c{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"]
        nodes += [
            helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
            helper.make_node("BatchNormalization", bn_inputs, [f"n{i}"], name=f"bn{i}"),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"], name="gap"))
    graph = helper.make_graph(
        nodes,
        "cnn16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", channels[0], 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", channels[-1], 1, 1])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_float16_cnn_with_batchnorm_canonicalizes(tmp_path, capsys):
    path = _write(fp16_cnn(), tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["canonicalize", path, "-o", str(out)]) == 0, capsys.readouterr().err
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "BatchNormalization" not in ops


# --- the silero-vad abort: onnxruntime's QDQ propagation and subgraph captures --------------


def _if_graph(name: str, nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, 1, None)])


def fold_net() -> onnx.ModelProto:
    """Conv -> Relu -> If(last dim == 1){Squeeze; an inner If reads it} -> Unsqueeze -> Conv.

    With concrete shapes onnxruntime folds the outer If and inlines its branch; a
    DequantizeLinear -> Squeeze whose output an If captures then aborts its QDQ propagation.
    """
    rng = np.random.default_rng(0)
    inner = helper.make_node(
        "If",
        ["flag"],
        ["inner"],
        name="inner_if",
        then_branch=_if_graph("inner_then", [helper.make_node("Relu", ["sq"], ["it"])], "it"),
        else_branch=_if_graph("inner_else", [helper.make_node("Neg", ["sq"], ["ie"])], "ie"),
    )
    squeeze = helper.make_node("Squeeze", ["r", "last"], ["sq"], name="squeeze")
    then_branch = _if_graph("then", [squeeze, inner], "inner")
    else_branch = _if_graph("else", [helper.make_node("Squeeze", ["r", "last"], ["s2"])], "s2")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 0, 1, 0]),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("Shape", ["r"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "three"], ["n"], name="gather", axis=0),
        helper.make_node("Equal", ["n", "one"], ["cond"], name="equal"),
        helper.make_node(
            "If", ["cond"], ["o"], name="outer_if", then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("Unsqueeze", ["o", "last"], ["u"], name="unsqueeze"),
        helper.make_node("Conv", ["u", "w2", "b2"], ["y"], name="conv2"),
    ]
    arrays = {
        "w1": rng.standard_normal((8, 4, 3, 1)).astype(np.float32),
        "b1": rng.standard_normal(8).astype(np.float32),
        "w2": rng.standard_normal((2, 8, 1, 1)).astype(np.float32),
        "b2": rng.standard_normal(2).astype(np.float32),
        "last": np.array([3], np.int64),
        "three": np.int64(3),
        "one": np.int64(1),
    }
    graph = helper.make_graph(
        nodes,
        "fold",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, "W"]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 1])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def capture_net() -> onnx.ModelProto:
    """Conv -> Relu -> Squeeze whose output only an If branch reads."""
    rng = np.random.default_rng(0)
    branch = helper.make_node(
        "If",
        ["flag"],
        ["y"],
        name="branch",
        then_branch=_if_graph("then", [helper.make_node("Relu", ["sq"], ["t"])], "t"),
        else_branch=_if_graph("else", [helper.make_node("Neg", ["sq"], ["e"])], "e"),
    )
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 0, 1, 0]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Squeeze", ["r", "axes"], ["sq"], name="squeeze"),
        branch,
    ]
    arrays = {
        "w": rng.standard_normal((8, 4, 3, 1)).astype(np.float32),
        "b": rng.standard_normal(8).astype(np.float32),
        "axes": np.array([3], np.int64),
    }
    graph = helper.make_graph(
        nodes,
        "capture",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 1]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _quantize_in_subprocess(model: onnx.ModelProto, folder: Path, *extra: str):
    """Quantize in a child process: an onnxruntime abort must not take pytest down."""
    path = _write(model, folder)
    calib = folder / "c.npz"
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 1, 4, 8, 1)).astype(np.float32)
    np.savez(calib, x=x, flag=np.ones(16, bool))
    out, report = folder / "out.onnx", folder / "r.json"
    argv = ["quantize", path, "-o", str(out), "--calib", str(calib), "--report", str(report)]
    code = f"import sys; from onnxprune.cli import main; sys.exit(main({[*argv, *extra]!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return done, out, report


def test_bias_correction_on_control_flow_does_not_abort_onnxruntime(tmp_path):
    """silero-vad: the cut models of bias correction kept concrete shapes, so onnxruntime
    inlined an If branch and aborted (exit 134) right after cross-layer equalization."""
    done, out, _ = _quantize_in_subprocess(fold_net(), tmp_path, "--bias-correction", "on")
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.exists()


def test_int8_layer_feeding_a_captured_squeeze_is_kept_float(tmp_path):
    done, out, report = _quantize_in_subprocess(capture_net(), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    skipped = json.loads(report.read_text())["details"]["plan"]["skipped"]
    reasons = {s["node"]: s["reason"] for s in skipped}
    assert "QDQ propagation" in reasons["conv"]
    assert out.exists()
