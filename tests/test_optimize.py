"""optimize: recipes, budget guard, the bundled main job, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxprune.cli import main
from onnxprune.errors import UsageError
from onnxprune.optimize.recipe import PRESETS, parse_recipe, preset


def test_main_job_on_bundled_model(tmp_path: Path, capsys):
    out, report = tmp_path / "digits.onnx", tmp_path / "r.json"
    code = main(
        [
            "optimize",
            "-o",
            str(out),
            "--preset",
            "cpu-prune",
            "--bench-seconds",
            "2",
            "--report",
            str(report),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    for row in ("MACs", "parameters", "file size", "latency", "accuracy (held-out)"):
        assert row in text
    data = json.loads(report.read_text())
    assert data["schema"] == "onnxprune.optimize/1" and data["written"]
    assert data["after"]["macs"] < data["before"]["macs"]
    assert [s["status"] for s in data["steps"]] == ["applied", "applied"]
    before, after = data["accuracy"]
    assert before - after <= 0.02
    assert out.is_file()


def test_impossible_budget_exits_1_and_writes_nothing(tmp_path: Path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "budget: cosine>=1.5\nsteps:\n  - canonicalize: {}\n  - prune: {ratio: 0.5}\n"
    )
    out = tmp_path / "o.onnx"
    code = main(["optimize", "-o", str(out), "--recipe", str(recipe), "--bench-seconds", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert "budget 'cosine>=1.5' not met" in err and "nothing written" in err
    assert not out.exists()


def test_step_that_misses_budget_backs_off_then_is_skipped(tmp_path: Path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "budget: sqnr_db>=80\nsteps:\n  - canonicalize: {}\n  - prune: {ratio: 0.8}\n"
    )
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    args = ["optimize", "-o", str(out), "--recipe", str(recipe), "--bench-seconds", "0"]
    code = main([*args, "--report", str(report)])
    capsys.readouterr()
    steps = json.loads(report.read_text())["steps"] if code == 0 else []
    assert code == 0
    assert steps[0]["status"] == "applied"
    # ratio 0.8 misses the budget; milder retries either meet it (pruning only units that
    # are dead on this data is exact) or the step is skipped after three tries
    prune = steps[1]
    assert prune["tries"] >= 2
    if prune["status"] == "skipped":
        assert prune["tries"] == 3 and "budget missed" in prune["reason"]
    else:
        assert prune["status"] == "applied" and prune["strength"] < 1


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("steps:\n  - fold: {}\n", "unknown step 'fold'"),
        ("steps:\n  - prune: {ratios: 0.5}\n", "unknown option 'ratios'"),
        ("steps:\n  - prune: {ratio: fast}\n", "expected float, got 'fast'"),
        ("step:\n  - prune: {}\n", "unknown key 'step'"),
        ("steps: []\n", "'steps' must be a non-empty list"),
    ],
)
def test_recipe_validation_names_the_fault(tmp_path: Path, capsys, recipe, message):
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    out = tmp_path / "o.onnx"
    assert main(["optimize", "-o", str(out), "--recipe", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_budget_metric_is_usage_error(tmp_path: Path, capsys):
    code = main(["optimize", "-o", str(tmp_path / "o.onnx"), "--budget", "accuracy>=0.9"])
    assert code == 2
    assert "accuracy" in capsys.readouterr().err


def test_presets_parse():
    for name in PRESETS:
        assert preset(name).steps[0].name == "canonicalize"
    with pytest.raises(UsageError, match="unknown preset"):
        preset("fastest")
    assert parse_recipe({"steps": [{"prune": {"target_macs": 1}}]}).steps[0].options == {
        "target_macs": 1.0
    }


def test_variants_write_a_manifest(tmp_path: Path, capsys):
    out = tmp_path / "d.onnx"
    args = ["optimize", "-o", str(out), "--preset", "cpu-prune", "--bench-seconds", "1"]
    code = main([*args, "--variants", "0.6,0.3"])
    capsys.readouterr()
    manifest = json.loads((tmp_path / "d.variants.json").read_text())
    assert manifest["schema"] == "onnxprune.variants/1"
    fractions = [v["macs_fraction"] for v in manifest["variants"]]
    assert fractions == [0.6, 0.3]
    written = [v for v in manifest["variants"] if v["written"]]
    assert code == (0 if written else 1)
    for v in written:
        assert Path(v["path"]).is_file()
    macs = [v["macs"] for v in written]
    assert macs == sorted(macs, reverse=True)


def test_missing_output_folder_fails_before_work(tmp_path: Path, capsys):
    assert main(["optimize", "-o", str(tmp_path / "no" / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_default_main_job_runs_every_step_or_says_why(tmp_path: Path, capsys):
    """The README's first command: default preset on the bundled model."""
    out, report = tmp_path / "d.onnx", tmp_path / "r.json"
    code = main(["optimize", "-o", str(out), "--bench-seconds", "2", "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    steps = json.loads(report.read_text())["steps"]
    assert [s["name"] for s in steps] == ["canonicalize", "prune", "quantize"]
    for step in steps:
        assert step["status"] in ("applied", "dropped"), step
        if step["status"] == "dropped":
            assert "made the model slower" in step["reason"]
    assert "file size" in capsys.readouterr().out
