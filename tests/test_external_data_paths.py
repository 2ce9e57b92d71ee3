"""External data always resolves against the model's own folder, through the validated file.

Every command is run on a model stored as ``model.onnx`` + ``model.onnx.data`` (the torch
dynamo exporter's layout) from another current folder that holds a decoy
``model.onnx.data`` with different weights, and must give exactly what it gives on the same
model with inline weights. Also: tensors of model-local functions, data files swapped after
validation, recorded checksums, and a few refusals that must name what they refuse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import ModelLoadError, UnsafeExternalDataError
from onnxprune.runtime import make_session, run_model


def _cnn(seed: int) -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu-GAP-Gemm on [N, 3, 8, 8]; ``seed`` picks the weights."""
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    inits = [
        numpy_helper.from_array(weight(8, 3, 3, 3), "c1.w"),
        numpy_helper.from_array(weight(8), "c1.b"),
        numpy_helper.from_array(weight(8, 8, 3, 3), "c2.w"),
        numpy_helper.from_array(weight(8), "c2.b"),
        numpy_helper.from_array(weight(10, 8), "fc.w"),
        numpy_helper.from_array(weight(10), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["a"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ra"], name="relu1"),
        helper.make_node("Conv", ["ra", "c2.w", "c2.b"], ["b"], name="conv2", pads=[1] * 4),
        helper.make_node("Relu", ["b"], ["rb"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["rb"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _save_external(proto: onnx.ModelProto, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    return path


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model with external data, the same model inline, a decoy folder and data."""
    root = tmp_path_factory.mktemp("paths")
    inline = root / "inline"
    inline.mkdir()
    onnx.save(_cnn(0), str(inline / "model.onnx"))
    decoy = root / "decoy"
    _save_external(_cnn(1), decoy)
    calib = root / "calib.npz"
    rng = np.random.default_rng(5)
    np.savez(calib, x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    recipe = root / "recipe.yaml"
    recipe.write_text("steps:\n  - canonicalize: {}\n  - prune: {ratio: 0.25}\n")
    return {
        "external": _save_external(_cnn(0), root / "external"),
        "inline": inline / "model.onnx",
        "decoy": decoy,
        "calib": calib,
        "recipe": recipe,
        "root": root,
    }


#: command -> its arguments after the model (``OUT`` is the output folder, ``CALIB`` data).
COMMANDS = {
    "canonicalize": ["-o", "OUT/m.onnx"],
    "prune": ["-o", "OUT/m.onnx", "--ratio", "0.25"],
    "prune-calib": ["-o", "OUT/m.onnx", "--ratio", "0.25", "--criterion", "activation"],
    "sparsify": ["-o", "OUT/m.onnx", "--sparsity", "0.5"],
    "sparsify-wanda": ["-o", "OUT/m.onnx", "--sparsity", "0.5", "--method", "wanda", "--update"],
    "lowrank": ["-o", "OUT/m.onnx", "--rank", "4"],
    "lowrank-aware": ["-o", "OUT/m.onnx", "--rank", "4", "--activation-aware"],
    "quantize": ["-o", "OUT/m.onnx"],
    "optimize": ["-o", "OUT/m.onnx", "--recipe", "RECIPE", "--bench-seconds", "0"],
    "sensitivity": ["-o", "OUT/s.json", "--ratios", "0.25,0.5"],
}
#: Commands that read calibration data.
CALIB = {"prune-calib", "sparsify-wanda", "lowrank-aware", "quantize", "optimize", "sensitivity"}


def _run(command: str, model: Path, out: Path, layout: dict[str, Path], cwd: Path) -> int:
    out.mkdir()
    args = [
        a.replace("OUT", str(out)).replace("RECIPE", str(layout["recipe"]))
        for a in COMMANDS[command]
    ]
    if command in CALIB:
        args += ["--calib", str(layout["calib"])]
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return main([command.split("-", maxsplit=1)[0], str(model), *args])
    finally:
        os.chdir(previous)


def _feeds(layout: dict[str, Path]) -> dict[str, np.ndarray]:
    with np.load(layout["calib"]) as data:
        return {"x": data["x"][:4]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_reads_the_models_own_data_from_another_folder(
    layout: dict[str, Path], tmp_path: Path, command: str
):
    reference = _run(command, layout["inline"], tmp_path / "inline", layout, tmp_path)
    external = _run(command, layout["external"], tmp_path / "external", layout, layout["decoy"])
    assert (reference, external) == (0, 0)
    if command == "sensitivity":
        want = json.loads((tmp_path / "inline" / "s.json").read_text())
        got = json.loads((tmp_path / "external" / "s.json").read_text())
        assert got["groups"] == want["groups"]
        return
    feeds = _feeds(layout)
    want = run_model(tmp_path / "inline" / "m.onnx", feeds)
    got = run_model(tmp_path / "external" / "m.onnx", feeds)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=f"{command}: output {name}")


def test_verify_and_bench_from_another_folder(layout: dict[str, Path], tmp_path: Path, capsys):
    previous = os.getcwd()
    os.chdir(layout["decoy"])
    try:
        report = tmp_path / "v.json"
        args = [str(layout["external"]), str(layout["inline"]), "--calib", str(layout["calib"])]
        verified = main(["verify", *args, "--json", str(report)])
        benched = main(["bench", str(layout["external"]), "--runs", "3", "--dim", "N=1"])
    finally:
        os.chdir(previous)
    capsys.readouterr()
    assert (verified, benched) == (0, 0)
    outputs = json.loads(report.read_text())["outputs"]
    assert outputs["y"]["max_abs_error"] == 0


def test_in_memory_model_session_ignores_current_folder(layout, monkeypatch):
    from onnxprune.io.pinned import copy_model, inline_proto

    monkeypatch.chdir(layout["decoy"])
    model = onnxprune.load(layout["external"])
    feeds = _feeds(layout)
    want = run_model(layout["inline"], feeds)["y"]
    np.testing.assert_array_equal(run_model(model, feeds)["y"], want)
    np.testing.assert_array_equal(run_model(copy_model(model), feeds)["y"], want)
    assert not any(
        t.data_location == TensorProto.EXTERNAL for t in inline_proto(model).graph.initializer
    )


def test_large_in_memory_model_goes_through_a_private_file(layout, monkeypatch):
    import onnxprune.runtime

    monkeypatch.setattr(onnxprune.runtime, "_INLINE_LIMIT", 0)
    monkeypatch.chdir(layout["decoy"])
    feeds = _feeds(layout)
    got = run_model(onnxprune.load(layout["external"]), feeds)["y"]
    np.testing.assert_array_equal(got, run_model(layout["inline"], feeds)["y"])


def test_proto_with_external_data_never_reaches_onnxruntime(layout, monkeypatch):
    monkeypatch.chdir(layout["decoy"])
    proto = onnx.load(str(layout["external"]), load_external_data=False)
    with pytest.raises(ValueError, match=r"c1\.w"):
        make_session(proto)


@pytest.mark.torch
def test_dynamo_export_quantize_and_sparsify_from_another_folder(tmp_path: Path, layout):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    ).eval()
    folder = tmp_path / "export"
    folder.mkdir()
    path = folder / "model.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(path), dynamo=True, external_data=True)
    if not (folder / "model.onnx.data").exists():
        pytest.skip("this torch version wrote no external data file")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "model.onnx.data").write_bytes(
        os.urandom((folder / "model.onnx.data").stat().st_size)
    )
    calib = tmp_path / "calib.npz"
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    np.savez(calib, **{name: np.random.default_rng(0).standard_normal((8, 3, 8, 8), np.float32)})
    previous = os.getcwd()
    os.chdir(tmp_path / "cwd")
    try:
        quantized = main(
            ["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib)]
        )
        sparse = main(["sparsify", str(path), "-o", str(tmp_path / "s.onnx"), "--sparsity", "0.5"])
    finally:
        os.chdir(previous)
    assert (quantized, sparse) == (0, 0)
    feeds = {name: np.random.default_rng(1).standard_normal((1, 3, 8, 8), np.float32)}
    want = net(torch.from_numpy(feeds[name])).detach().numpy()
    got = run_model(tmp_path / "q.onnx", feeds)
    cosine = float(np.dot(want.ravel(), next(iter(got.values())).ravel()))
    cosine /= float(np.linalg.norm(want) * np.linalg.norm(next(iter(got.values()))))
    assert cosine > 0.99


# ----------------------------------------------------------------- model-local functions


def _function_model(folder: Path, weight: np.ndarray, location: str = "fw.bin") -> Path:
    """y = x @ W where W is a ``Constant(value=external)`` inside a model-local function."""
    const = helper.make_node("Constant", [], ["w"], name="const_w")
    tensor = numpy_helper.from_array(weight, "fw")
    (folder / location).write_bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    const.attribute.append(helper.make_attribute("value", tensor))
    function = helper.make_function(
        "local",
        "MulW",
        ["x"],
        ["y"],
        [const, helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("MulW", ["x"], ["y"], domain="local", name="call")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, weight.shape[1]])],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[function],
        ir_version=10,
    )
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def test_function_constant_reads_the_model_folder(tmp_path: Path, monkeypatch):
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    folder = tmp_path / "model"
    folder.mkdir()
    path = _function_model(folder, weight)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "fw.bin").write_bytes((-weight).tobytes())
    monkeypatch.chdir(decoy)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(run_model(onnxprune.load(path), {"x": x})["y"], x @ weight)


def test_function_constant_written_inline_not_by_input_location(tmp_path: Path):
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    folder = tmp_path / "model"
    folder.mkdir()
    path = _function_model(folder, weight)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for external in (False, True):
        out = onnxprune.save(
            onnxprune.load(path), out_dir / f"o{external}.onnx", external_data=external
        )
        proto = onnx.load(str(out), load_external_data=False)
        constant = proto.functions[0].node[0].attribute[0].t
        assert constant.data_location != TensorProto.EXTERNAL
        x = np.ones((2, 4), np.float32)
        np.testing.assert_array_equal(run_model(out, {"x": x})["y"], x @ weight)


# -------------------------------------------------------- the validated file is the file read


def _external_weight_model(folder: Path, weight: np.ndarray) -> Path:
    from conftest import write_external

    folder.mkdir()
    return write_external(folder, weight)


def test_file_swapped_for_link_after_validation_is_not_read(tmp_path: Path, weight):
    path = _external_weight_model(tmp_path / "m", weight)
    model = onnxprune.load(path)
    other = tmp_path / "other.bin"
    other.write_bytes((weight + 1).tobytes())
    data = path.parent / "w.bin"
    data.unlink()
    data.symlink_to(other)
    tensor = model.graph.initializers["w"].const_value
    np.testing.assert_array_equal(tensor.numpy(), weight)
    x = np.ones((1, weight.shape[0]), np.float32)
    np.testing.assert_allclose(run_model(model, {"x": x})["y"], x @ weight, rtol=1e-5)


def test_file_swapped_between_check_and_open_is_refused(tmp_path: Path, weight, monkeypatch):
    from onnxprune.io import external

    path = _external_weight_model(tmp_path / "m", weight)
    other = tmp_path / "other.bin"
    other.write_bytes((weight + 1).tobytes())
    checked = external._check_file

    def check_then_swap(name, location, base_dir, parts):
        result = checked(name, location, base_dir, parts)
        data = base_dir.joinpath(*parts)
        data.unlink()
        data.symlink_to(other)
        return result

    monkeypatch.setattr(external, "_check_file", check_then_swap)
    with pytest.raises(UnsafeExternalDataError, match=r"tensor 'w'.*symbolic link"):
        onnxprune.load(path)


def test_file_replaced_between_check_and_open_is_refused(tmp_path: Path, weight, monkeypatch):
    from onnxprune.io import external

    path = _external_weight_model(tmp_path / "m", weight)
    checked = external._check_file

    def check_then_replace(name, location, base_dir, parts):
        result = checked(name, location, base_dir, parts)
        data = base_dir.joinpath(*parts)
        data.rename(data.with_name("old.bin"))  # keeps the inode in use
        data.write_bytes((weight + 1).tobytes())
        return result

    monkeypatch.setattr(external, "_check_file", check_then_replace)
    with pytest.raises(UnsafeExternalDataError, match=r"tensor 'w'.*replaced"):
        onnxprune.load(path)


# ---------------------------------------------------------------- checksums and refusals


def _with_checksum(folder: Path, weight: np.ndarray, checksum: str) -> Path:
    path = _external_weight_model(folder, weight)
    proto = onnx.load(str(path), load_external_data=False)
    proto.graph.initializer[0].external_data.add(key="checksum", value=checksum)
    path.write_bytes(proto.SerializeToString())
    return path


def test_matching_checksum_loads(tmp_path: Path, weight):
    import hashlib

    digest = hashlib.sha1(weight.tobytes()).hexdigest()
    model = onnxprune.load(_with_checksum(tmp_path / "m", weight, digest))
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), weight)


def test_wrong_checksum_is_refused_naming_the_tensor(tmp_path: Path, weight, capsys):
    path = _with_checksum(tmp_path / "m", weight, "0" * 40)
    with pytest.raises(UnsafeExternalDataError, match=r"tensor 'w'.*checksum"):
        onnxprune.load(path)
    out = tmp_path / "o.onnx"
    assert main(["canonicalize", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tensor 'w'" in err and "checksum" in err
    assert not out.exists()


def test_sparse_constant_refusal_names_the_tensor(tmp_path: Path, capsys):
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sp_values")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "sp_indices")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    const = helper.make_node("Constant", [], ["c"], name="sparse_const", sparse_value=sparse)
    graph = helper.make_graph(
        [const, helper.make_node("Add", ["x", "c"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = tmp_path / "sparse.onnx"
    path.write_bytes(proto.SerializeToString())
    out = tmp_path / "o.onnx"
    code = main(["canonicalize", str(path), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'sparse_const'" in err and "'sp_values'" in err and "sparse" in err
    assert not out.exists()


def _nested_if(depth: int) -> onnx.ModelProto:
    """``depth`` If nodes, each in the then-branch of the one above."""
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    leaf = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="leaf")], "leaf", [], [out]
    )
    body = leaf
    for level in range(depth):
        node = helper.make_node(
            "If", ["cond"], ["y"], name=f"if{level}", then_branch=body, else_branch=leaf
        )
        body = helper.make_graph([node], f"level{level}", [], [out])
    graph = helper.make_graph(
        list(body.node),
        "g",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [out],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_deep_if_nesting_is_named_not_corrupt(tmp_path: Path):
    path = tmp_path / "deep.onnx"
    path.write_bytes(_nested_if(32).SerializeToString())
    with pytest.raises(ModelLoadError) as info:
        onnxprune.load(path)
    message = str(info.value)
    assert "corrupt" not in message
    assert "nest" in message


def test_moderate_if_nesting_still_loads(tmp_path: Path):
    path = tmp_path / "ok.onnx"
    path.write_bytes(_nested_if(8).SerializeToString())
    model = onnxprune.load(path)
    assert isinstance(model, ir.Model)
