"""Nothing overwritten, nothing half written (issue 14, items 1-3 and 14-18).

One rule for every write: no output may resolve to an input file, an input model's data
file or another output of the same run; it is refused before any work, exit 2, one line
naming both paths, nothing written. A run's outputs are published together or not at all,
also when it fails late, is interrupted or gets SIGTERM. Bad option values and unreadable
data files are one line, exit 2, never a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.bundled import digits_calibration, digits_model
from onnxprune.cli import main
from onnxprune.errors import SaveError


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    """Temporary or backup files a run left behind."""
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or ".bak-" in p.name)


def _one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder with the digits CNN (m.onnx), its calibration (c.npz) and a sub folder."""
    shutil.copy(digits_model(), tmp_path / "m.onnx")
    shutil.copy(digits_calibration(), tmp_path / "c.npz")
    (tmp_path / "sub").mkdir()
    return tmp_path


@pytest.fixture
def external(tmp_path: Path) -> Path:
    """The digits CNN saved with its weights in ``ext/m.onnx.data``; returns ``ext/m.onnx``."""
    folder = tmp_path / "ext"
    folder.mkdir()
    proto = onnx.load(str(digits_model()))
    path = folder / "m.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="m.onnx.data")
    shutil.copy(digits_calibration(), folder / "c.npz")
    return path


# -- items 1 and 2: -o resolving to the input or its data file -------------------------


def test_quantize_output_equal_to_input_is_refused(work: Path, capsys):
    model = work / "m.onnx"
    before = _sha(model)
    assert main(["quantize", str(model), "-o", str(model), "--calib", str(work / "c.npz")]) == 2
    _one_line_error(capsys.readouterr().err, "-o", "input model", str(model))
    assert _sha(model) == before
    assert _leftovers(work) == []


def test_quantize_output_equal_to_input_data_file_is_refused(external: Path, capsys):
    data = external.with_name("m.onnx.data")
    before = {p: _sha(p) for p in (external, data)}
    calib = str(external.with_name("c.npz"))
    assert main(["quantize", str(external), "-o", str(data), "--calib", calib]) == 2
    _one_line_error(capsys.readouterr().err, "data file of the input model", str(data))
    assert {p: _sha(p) for p in before} == before
    assert _leftovers(external.parent) == []


def test_quantize_api_protects_the_input_it_rebuilt(work: Path):
    """The quantized model is a new graph; the save must still know the input's files."""
    from onnxprune.quant import quantize_file

    model = work / "m.onnx"
    before = _sha(model)
    with pytest.raises(SaveError, match="input model"):
        quantize_file(model, work / "sub" / ".." / "m.onnx", calib=work / "c.npz")
    assert _sha(model) == before


@pytest.mark.parametrize("spelling", ["m.onnx", "sub/../m.onnx", "./sub/../m.onnx", "link.onnx"])
def test_optimize_output_resolving_to_input_is_refused(work: Path, capsys, spelling: str):
    model = work / "m.onnx"
    (work / "link.onnx").symlink_to(model)
    before = _sha(model)
    argv = ["optimize", str(model), "-o", str(work / spelling), "--calib", str(work / "c.npz")]
    assert main([*argv, "--preset", "cpu-int8", "--bench-seconds", "0"]) == 2
    _one_line_error(capsys.readouterr().err, "-o", "input model", str(model))
    assert _sha(model) == before
    assert _leftovers(work) == []


def test_optimize_api_protects_the_input_not_its_temporary_copy(work: Path):
    from onnxprune.optimize import optimize

    model = work / "m.onnx"
    before = _sha(model)
    with pytest.raises(SaveError, match="input model"):
        optimize(
            model,
            work / "sub" / ".." / "m.onnx",
            preset_name="cpu-int8",
            calib=work / "c.npz",
            bench_seconds=0,
        )
    assert _sha(model) == before


# -- item 3: every side output, against every input and every other output ------------

SideCase = tuple[str, Callable[[Path], list[str]], str]

SIDE_OUTPUTS: list[SideCase] = [
    (
        "canonicalize --report = MODEL",
        lambda w: ["canonicalize", f"{w}/m.onnx", "-o", f"{w}/o.onnx", "--report", f"{w}/m.onnx"],
        "m.onnx",
    ),
    (
        "canonicalize --report = -o",
        lambda w: ["canonicalize", f"{w}/m.onnx", "-o", f"{w}/o.onnx", "--report", f"{w}/o.onnx"],
        "o.onnx",
    ),
    (
        "canonicalize --report = --calib",
        lambda w: [
            *("canonicalize", f"{w}/m.onnx", "-o", f"{w}/o.onnx"),
            *("--calib", f"{w}/c.npz", "--report", f"{w}/c.npz"),
        ],
        "c.npz",
    ),
    (
        "prune --save-plan = MODEL",
        lambda w: [
            *("prune", f"{w}/m.onnx", "-o", f"{w}/o.onnx", "--ratio", "0.5"),
            *("--save-plan", f"{w}/sub/../m.onnx"),
        ],
        "m.onnx",
    ),
    (
        "prune --save-plan = --report",
        lambda w: [
            *("prune", f"{w}/m.onnx", "-o", f"{w}/o.onnx", "--ratio", "0.5"),
            *("--report", f"{w}/r.json", "--save-plan", f"{w}/r.json"),
        ],
        "r.json",
    ),
    (
        "prune --report = --eval",
        lambda w: [
            *("prune", f"{w}/m.onnx", "-o", f"{w}/o.onnx", "--ratio", "0.5"),
            *("--calib", f"{w}/c.npz", "--eval", f"{w}/c.npz", "--report", f"{w}/c.npz"),
        ],
        "c.npz",
    ),
    (
        "quantize --report = -o's data file",
        lambda w: [
            *("quantize", f"{w}/m.onnx", "-o", f"{w}/o.onnx", "--calib", f"{w}/c.npz"),
            *("--report", f"{w}/o.onnx.data"),
        ],
        "o.onnx",
    ),
    (
        "bench --json = MODEL",
        lambda w: ["bench", f"{w}/m.onnx", "--runs", "3", "--json", f"{w}/m.onnx"],
        "m.onnx",
    ),
    (
        "bench --markdown = MODEL",
        lambda w: ["bench", f"{w}/m.onnx", "--runs", "3", "--markdown", f"{w}/link.onnx"],
        "m.onnx",
    ),
    (
        "bench --markdown = --json",
        lambda w: [
            *("bench", f"{w}/m.onnx", "--runs", "3"),
            *("--json", f"{w}/r.txt", "--markdown", f"{w}/r.txt"),
        ],
        "r.txt",
    ),
    (
        "verify --json = CANDIDATE",
        lambda w: [
            *("verify", f"{w}/m.onnx", f"{w}/m2.onnx", "--calib", f"{w}/c.npz"),
            *("--json", f"{w}/m2.onnx"),
        ],
        "m2.onnx",
    ),
    (
        "verify --markdown = --calib (hard link)",
        lambda w: [
            *("verify", f"{w}/m.onnx", f"{w}/m2.onnx", "--calib", f"{w}/c.npz"),
            *("--markdown", f"{w}/hard.npz"),
        ],
        "c.npz",
    ),
    (
        "sensitivity -o = MODEL",
        lambda w: ["sensitivity", f"{w}/m.onnx", "--calib", f"{w}/c.npz", "-o", f"{w}/m.onnx"],
        "m.onnx",
    ),
    (
        "sparsify --report = MODEL",
        lambda w: [
            *("sparsify", f"{w}/m.onnx", "-o", f"{w}/o.onnx", "--sparsity", "0.5"),
            *("--report", f"{w}/m.onnx"),
        ],
        "m.onnx",
    ),
    (
        "lowrank --report = -o",
        lambda w: [
            *("lowrank", f"{w}/m.onnx", "-o", f"{w}/o.onnx", "--rank", "4"),
            *("--report", f"{w}/o.onnx"),
        ],
        "o.onnx",
    ),
    (
        "optimize --report = MODEL",
        lambda w: [
            *("optimize", f"{w}/m.onnx", "-o", f"{w}/o.onnx", "--calib", f"{w}/c.npz"),
            *("--bench-seconds", "0", "--report", f"{w}/m.onnx"),
        ],
        "m.onnx",
    ),
]


@pytest.mark.parametrize(
    ("argv", "clash"), [c[1:] for c in SIDE_OUTPUTS], ids=[c[0] for c in SIDE_OUTPUTS]
)
def test_side_output_clashing_with_an_input_or_output_is_refused(
    work: Path, capsys, argv: Callable[[Path], list[str]], clash: str
):
    shutil.copy(work / "m.onnx", work / "m2.onnx")
    (work / "link.onnx").symlink_to(work / "m.onnx")
    os.link(work / "c.npz", work / "hard.npz")
    before = {p.name: _sha(p) for p in work.iterdir() if p.is_file()}
    assert main(argv(work)) == 2
    _one_line_error(capsys.readouterr().err, "nothing written", clash)
    after = {p.name: _sha(p) for p in work.iterdir() if p.is_file()}
    assert after == before
    assert _leftovers(work) == []


def test_optimize_variants_with_the_same_file_name_are_refused(work: Path, capsys):
    argv = ["optimize", str(work / "m.onnx"), "-o", str(work / "v.onnx")]
    argv += ["--calib", str(work / "c.npz"), "--bench-seconds", "0", "--variants", "0.701,0.704"]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, "v.macs0.70.onnx", "same file")
    assert sorted(p.name for p in work.iterdir()) == ["c.npz", "m.onnx", "sub"]


# -- item 14: an output folder that cannot be written ----------------------------------


def _refuse_temp_files_in(monkeypatch, folder: Path) -> None:
    """Make creating a temporary file or folder in ``folder`` fail as on a read-only mount
    (root ignores permission bits, so chmod cannot show it)."""
    real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

    def refuse(real):
        def wrapper(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == folder.resolve():
                raise PermissionError(errno.EACCES, "Permission denied", str(folder))
            return real(*args, dir=dir, **kwargs)

        return wrapper

    monkeypatch.setattr(tempfile, "mkstemp", refuse(real_mkstemp))
    monkeypatch.setattr(tempfile, "mkdtemp", refuse(real_mkdtemp))


def test_model_into_unwritable_folder_is_one_line(work: Path, capsys, monkeypatch):
    out = work / "sub" / "o.onnx"
    _refuse_temp_files_in(monkeypatch, out.parent)
    assert main(["canonicalize", str(work / "m.onnx"), "-o", str(out)]) == 2
    _one_line_error(capsys.readouterr().err, "Permission denied", str(out))
    assert list(out.parent.iterdir()) == []


def test_report_into_unwritable_folder_is_one_line(work: Path, capsys, monkeypatch):
    out = work / "sub" / "r.json"
    _refuse_temp_files_in(monkeypatch, out.parent)
    argv = ["verify", str(work / "m.onnx"), str(work / "m.onnx"), "--calib", str(work / "c.npz")]
    assert main([*argv, "--json", str(out)]) == 2
    _one_line_error(capsys.readouterr().err, "Permission denied", str(out))
    assert list(out.parent.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores chmod")
def test_read_only_folder_is_refused_before_work(work: Path, capsys):
    folder = work / "sub"
    folder.chmod(0o555)
    try:
        assert main(["canonicalize", str(work / "m.onnx"), "-o", str(folder / "o.onnx")]) == 2
    finally:
        folder.chmod(0o755)
    _one_line_error(capsys.readouterr().err, "not writable")


# -- item 15: all outputs or none ------------------------------------------------------


def test_report_in_missing_folder_is_refused_before_the_model_is_written(work: Path, capsys):
    out = work / "o.onnx"
    argv = ["canonicalize", str(work / "m.onnx"), "-o", str(out)]
    assert main([*argv, "--report", str(work / "missing" / "r.json")]) == 2
    _one_line_error(capsys.readouterr().err, "--report", "does not exist")
    assert not out.exists()


def test_report_that_fails_to_write_takes_the_model_back(work: Path, capsys, monkeypatch):
    """The report fails after the model was published: the model is rolled back, and an
    output that existed before the run gets its old content back."""
    out, report = work / "o.onnx", work / "sub" / "r.json"
    out.write_bytes(b"previous run")
    _refuse_temp_files_in(monkeypatch, report.parent)
    argv = ["canonicalize", str(work / "m.onnx"), "-o", str(out), "--report", str(report)]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, str(report))
    assert out.read_bytes() == b"previous run"
    assert not report.exists()
    assert _leftovers(work) == []


def test_new_model_is_removed_when_the_report_fails(work: Path, capsys, monkeypatch):
    out, report = work / "o.onnx", work / "sub" / "r.json"
    _refuse_temp_files_in(monkeypatch, report.parent)
    argv = ["prune", str(work / "m.onnx"), "-o", str(out), "--ratio", "0.25"]
    assert main([*argv, "--report", str(report)]) == 2
    capsys.readouterr()
    assert not out.exists() and _leftovers(work) == []


def test_every_output_is_written_when_the_run_succeeds(work: Path, capsys):
    out, report, plan = work / "o.onnx", work / "r.json", work / "p.json"
    argv = ["prune", str(work / "m.onnx"), "-o", str(out), "--ratio", "0.25"]
    assert main([*argv, "--report", str(report), "--save-plan", str(plan)]) == 0
    capsys.readouterr()
    assert onnx.load(str(out)).graph.node
    assert json.loads(report.read_text()) and json.loads(plan.read_text())["schema"]
    assert oct(report.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert _leftovers(work) == []


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_failed_verification_keeps_its_reports(work: Path, capsys):
    """Exit 1 is an answer, not a failure to run: the report says why."""
    shutil.copy(work / "m.onnx", work / "m2.onnx")
    report = work / "r.json"
    argv = ["verify", str(work / "m.onnx"), str(work / "m2.onnx"), "--calib", str(work / "c.npz")]
    assert main([*argv, "--tolerance", "cosine>=2", "--json", str(report)]) == 1
    capsys.readouterr()
    assert json.loads(report.read_text())["passed"] is False


# -- item 16: SIGTERM cleans up like Ctrl-C --------------------------------------------

_SIGTERM_SCRIPT = """
import os, signal, sys, time
import onnx_ir as ir
from onnxprune.cli import main

real = ir.save

def save_then_terminated(*args, **kwargs):
    real(*args, **kwargs)  # the temporary model is on disk now
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)

ir.save = save_then_terminated
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_save_leaves_no_temporary_folder(work: Path):
    script = work / "term.py"
    script.write_text(textwrap.dedent(_SIGTERM_SCRIPT))
    out = work / "sub" / "o.onnx"
    proc = subprocess.run(
        [sys.executable, str(script), "canonicalize", str(work / "m.onnx"), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "terminated" in proc.stderr
    assert list(out.parent.iterdir()) == []


# -- item 17: optimize reads --calib/--eval through the shared validator ---------------


def _huge_header_npz(path: Path) -> None:
    """An .npz whose one array's header claims 288 TiB."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (2**20, 2**20, 72)}
    with zipfile.ZipFile(path, "w") as archive, archive.open("input.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)
        member.write(b"\0" * 64)


def _npy_renamed(path: Path) -> None:
    """A plain .npy array named .npz."""
    np.save(path.with_suffix(".npy"), np.zeros((2, 1, 8, 8), np.float32))
    path.with_suffix(".npy").rename(path)


BAD_DATA: dict[str, Callable[[Path], object]] = {
    "empty": np.savez,
    "not a zip": lambda p: p.write_text("hello"),
    "scalar": lambda p: np.savez(p, input=np.float32(1)),
    "npy renamed": _npy_renamed,
    "288 TiB header": _huge_header_npz,
}


def _write_bad(kind: str, path: Path) -> Path:
    BAD_DATA[kind](path)
    return path


@pytest.mark.parametrize("option", ["--calib", "--eval"])
@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_optimize_bad_data_is_one_line(work: Path, capsys, option: str, kind: str):
    bad = _write_bad(kind, work / "bad.npz")
    data = {"--calib": str(work / "c.npz"), option: str(bad)}
    argv = ["optimize", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--bench-seconds", "0"]
    argv += [item for pair in data.items() for item in pair]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, "bad.npz")
    assert not (work / "o.onnx").exists()


def test_optimize_eval_labels_of_the_wrong_length_are_refused_before_work(work: Path, capsys):
    with np.load(work / "c.npz") as data:
        inputs = data["input"]
    np.savez(work / "e.npz", input=inputs[:8], label=np.zeros(5, np.int64))
    argv = ["optimize", str(work / "m.onnx"), "-o", str(work / "o.onnx")]
    argv += ["--calib", str(work / "c.npz"), "--eval", str(work / "e.npz")]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, "--eval", "'label'")


def test_calibration_header_claiming_terabytes_is_refused(work: Path, capsys):
    bad = _write_bad("288 TiB header", work / "bad.npz")
    argv = ["quantize", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--calib", str(bad)]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, "claims shape")


# -- item 18: option values argparse lets through --------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_bench_seconds_must_be_a_positive_number(work: Path, capsys, value: str):
    assert main(["bench", str(work / "m.onnx"), "--seconds", value]) == 2
    _one_line_error(capsys.readouterr().err, "--seconds")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_optimize_bench_seconds_must_be_a_number(work: Path, capsys, value: str):
    argv = ["optimize", str(work / "m.onnx"), "-o", str(work / "o.onnx")]
    assert main([*argv, "--calib", str(work / "c.npz"), "--bench-seconds", value]) == 2
    _one_line_error(capsys.readouterr().err, "--bench-seconds")


def test_inspect_negative_top_is_refused(work: Path, capsys):
    assert main(["inspect", str(work / "m.onnx"), "--top", "-1"]) == 2
    _one_line_error(capsys.readouterr().err, "--top -1")


PLANS = {
    "a list": [1, 2],
    "groups a list": {"schema": "onnxprune.plan/1", "groups": [1]},
    "group a number": {"schema": "onnxprune.plan/1", "groups": {"w:0": 3}},
    "size a string": {"schema": "onnxprune.plan/1", "groups": {"w:0": {"size": "x", "keep": [0]}}},
    "keep missing": {"schema": "onnxprune.plan/1", "groups": {"w:0": {"size": 4}}},
    "keep of floats": {
        "schema": "onnxprune.plan/1",
        "groups": {"w:0": {"size": 4, "keep": [0.5]}},
    },
}


@pytest.mark.parametrize("plan", list(PLANS.values()), ids=list(PLANS))
def test_plan_of_the_wrong_shape_is_one_line(work: Path, capsys, plan: object):
    path = work / "p.json"
    path.write_text(json.dumps(plan))
    argv = ["prune", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--plan", str(path)]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, "p.json")
    assert not (work / "o.onnx").exists()


RATIOS = {
    "no table": {"schema": "onnxprune.layer_ratios/1"},
    "ratio a string": {"schema": "onnxprune.layer_ratios/1", "layer_ratios": {"w:0": "x"}},
    "round_to a string": {
        "schema": "onnxprune.layer_ratios/1",
        "round_to": "8",
        "layer_ratios": {"w:0": 0.5},
    },
}


@pytest.mark.parametrize("ratios", list(RATIOS.values()), ids=list(RATIOS))
def test_layer_ratios_of_the_wrong_shape_are_one_line(work: Path, capsys, ratios: object):
    path = work / "r.json"
    path.write_text(json.dumps(ratios))
    argv = ["prune", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--layer-ratios", str(path)]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, "--layer-ratios")


def test_yaml_recipe_with_a_python_tag_is_refused_without_running_it(work: Path, capsys):
    marker = work / "ran"
    recipe = work / "r.yaml"
    recipe.write_text(f"steps: !!python/object/apply:os.system ['touch {marker}']\n")
    argv = ["optimize", str(work / "m.onnx"), "-o", str(work / "o.onnx")]
    assert main([*argv, "--calib", str(work / "c.npz"), "--recipe", str(recipe)]) == 2
    _one_line_error(capsys.readouterr().err, "r.yaml", "cannot parse")
    assert not marker.exists()
