"""The transform registry: API fields, CLI flags and recipe keys are one set per capability;
the generated ``fp16`` command runs through the one driver."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune import registry
from onnxprune.cli import build_parser, main
from onnxprune.errors import UsageError
from onnxprune.optimize.recipe import parse_recipe, step_options
from onnxprune.quant.testing import write, write_calib
from onnxprune.registry.cli import SHARED_DESTS
from onnxprune.runtime import run_model
from onnxprune.testing import model_from_text

GENERATED = [t.name for t in registry.transforms() if t.command == "generated"]
#: Flags of a transform's own command module that are not config fields (side outputs and
#: what runs after the transform).
OWN_FLAGS = {"prune": {"save_plan", "recover", "recover_budget"}}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("name", registry.names())
def test_api_fields_cli_flags_and_recipe_keys_are_one_set(name):
    transform = registry.get(name)
    fields = {s.name for s in registry.field_specs(transform.config) if s.cli}
    dests = {a.dest for a in _subparser(name)._actions if a.dest != "help"} - SHARED_DESTS
    assert dests - OWN_FLAGS.get(name, set()) == fields
    assert set(step_options(name)) == fields
    for spec in registry.field_specs(transform.config):
        assert spec.help, f"{name}.{spec.name} has no help text"


def test_generated_commands_include_the_known_ones():
    assert {"canonicalize", "sparsify", "lowrank", "fp16"} <= set(GENERATED)
    assert {"prune", "quantize"} <= set(registry.names())


def test_quantize_flags_keep_their_spellings():
    args = _subparser("quantize").parse_args(
        ["m.onnx", "-o", "o.onnx", "--calib", "c.npz", "--per-tensor", "--no-calib-cache"]
    )
    config = registry.config_from_namespace(registry.get("quantize").config, args)
    assert config.per_channel is False and config.calib_cache is False
    assert config.method == "auto" and config.refine == "off"
    with pytest.raises(UsageError, match="'fast' is not one of auto, minmax"):
        parse_recipe({"steps": [{"quantize": {"method": "fast"}}]})


def test_prune_recipe_step_takes_the_config_fields():
    recipe = parse_recipe(
        {"steps": [{"prune": {"target_macs": 0.7, "allocation": "uniform", "exclude": ["a"]}}]}
    )
    assert recipe.steps[0].options["allocation"] == "uniform"
    with pytest.raises(UsageError, match="'magnitude' is not one of auto, l1, l2"):
        parse_recipe({"steps": [{"prune": {"criterion": "magnitude"}}]})
    with pytest.raises(UsageError, match="unknown option 'target_mac'"):
        parse_recipe({"steps": [{"prune": {"target_mac": 0.7}}]})


def test_cli_aliases_write_the_same_field():
    args = _subparser("lowrank").parse_args(["m.onnx", "-o", "o.onnx", "--activation-aware"])
    config = registry.config_from_namespace(registry.get("lowrank").config, args)
    assert config.method == "svd-llm"
    args = _subparser("sparsify").parse_args(["m.onnx", "-o", "o.onnx", "--one-shot"])
    assert registry.config_from_namespace(registry.get("sparsify").config, args).sequential is False


def test_recipe_step_options_are_checked_against_the_config():
    recipe = parse_recipe({"steps": [{"sparsify": {"sparsity": 0.5, "exclude": ["a"]}}]})
    assert recipe.steps[0].options == {"sparsity": 0.5, "exclude": ["a"]}
    with pytest.raises(UsageError, match="unknown option 'sparsty'"):
        parse_recipe({"steps": [{"sparsify": {"sparsty": 0.5}}]})
    with pytest.raises(UsageError, match="'diagonal' is not one of unstructured, 2:4"):
        parse_recipe({"steps": [{"sparsify": {"pattern": "diagonal"}}]})
    with pytest.raises(UsageError, match=r"expected int, got 2\.5"):
        parse_recipe({"steps": [{"lowrank": {"rank": 2.5}}]})


_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8] x, float[8,16] w, float[16] b) => (float[N,16] y) {
    h = MatMul (x, w)
    z = Add (h, b)
    y = Relu (z)
}
"""


def test_fp16_command_converts_weights_keeps_io_and_is_deterministic(tmp_path, capsys):
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((8, 16)).astype(np.float32),
        "b": rng.standard_normal(16).astype(np.float32),
    }
    model_path = write(model_from_text(_TEXT, weights), tmp_path)
    before = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    calib = write_calib(tmp_path, x=rng.standard_normal((8, 1, 8)).astype(np.float32))
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    report = tmp_path / "r.json"
    argv = ["fp16", str(model_path), "--calib", str(calib), "--report", str(report)]
    assert main([*argv, "-o", str(outs[0])]) == 0
    assert main([*argv, "-o", str(outs[1])]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert hashlib.sha256(Path(model_path).read_bytes()).hexdigest() == before
    proto = onnx.load(str(outs[0]))
    onnx.checker.check_model(proto)
    dtypes = {init.name: init.data_type for init in proto.graph.initializer}
    assert dtypes["w"] == onnx.TensorProto.FLOAT16
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = rng.standard_normal((3, 8)).astype(np.float32)
    ref = run_model(str(model_path), {"x": x})["y"]
    got = run_model(str(outs[0]), {"x": x})["y"]
    # float16 weights and compute: relative error within a few fp16 ulps (2^-10) of the scale
    assert np.max(np.abs(got - ref)) <= 8 * 2**-10 * np.max(np.abs(ref))
    data = json.loads(report.read_text())
    assert data["schema"] == "onnxprune.fp16/2"
    assert data["fp16"]["kept_fp32"] == []
    assert data["fidelity"]["outputs"]["y"]["cosine"] > 0.9999


def test_fp16_unknown_keep_node_is_refused_and_writes_nothing(tmp_path, capsys):
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((8, 16)).astype(np.float32),
        "b": rng.standard_normal(16).astype(np.float32),
    }
    model_path = write(model_from_text(_TEXT, weights), tmp_path)
    out = tmp_path / "o.onnx"
    assert main(["fp16", str(model_path), "-o", str(out), "--keep", "nope"]) == 2
    assert "--keep 'nope': no node of that name" in capsys.readouterr().err
    assert not out.exists()


def test_public_api_exports_every_transform():
    import onnxprune

    for name in onnxprune.__all__:
        assert getattr(onnxprune, name) is not None, name
    assert onnxprune.sparsify_file.__module__ == "onnxprune.sparsity.api"
