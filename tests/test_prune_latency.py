"""``prune --target-latency``: the bisection on measured latency, and its wiring into prune.

Timing is replaced by a deterministic stand-in (a function of the candidate's MACs), so the
tests check the search and the plumbing, not the machine; the real measurement is the bench
module's, tested there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.analysis import count_costs
from onnxprune.cli import main
from onnxprune.io import load
from onnxprune.prune.api import prune_file
from onnxprune.prune.config import LatencyTarget, PruneConfig
from onnxprune.prune.latency import MAX_PROBES, TOLERANCE, search_macs_for_latency
from prune_models import conv_chain


def test_bisection_finds_the_largest_fraction_meeting_the_target():
    search = search_macs_for_latency(0.6, lambda t: 0.2 + 0.8 * t)  # 0.6 at t = 0.5
    assert search.reached and 0.5 - TOLERANCE <= search.macs_fraction <= 0.5
    assert 0.2 + 0.8 * search.macs_fraction <= 0.6
    assert len(search.probes) <= MAX_PROBES and search.probes[0][0] == 0.6


def test_a_target_below_what_pruning_reaches_says_so():
    search = search_macs_for_latency(0.5, lambda t: 0.9)  # fixed costs dominate
    assert not search.reached
    assert search.macs_fraction == min(t for t, _ in search.probes)
    assert "not reached" in search.summary()


def test_when_every_candidate_is_fast_enough_it_prunes_less():
    search = search_macs_for_latency(0.8, lambda t: 0.5 * t)  # 0.8 at t = 1.6: never slower
    assert search.reached and search.macs_fraction > 0.95
    assert all(0.5 * t <= 0.8 for t, _ in search.probes)


def _macs(path: str | Path) -> int:
    return int(count_costs(load(path)).total_macs)


@pytest.fixture
def latency_by_macs(monkeypatch) -> list[float]:
    """Latency ratio = 0.1 + 0.9 x the candidate's MACs fraction (fixed overhead + work)."""
    seen: list[float] = []

    def fake(self, reference, candidate, dims):
        ratio = 0.1 + 0.9 * _macs(candidate) / _macs(reference)
        seen.append(ratio)
        return ratio

    monkeypatch.setattr(LatencyTarget, "measure", fake)
    return seen


def test_prune_meets_a_latency_target_and_reports_the_search(tmp_path: Path, latency_by_macs):
    model_path = tmp_path / "m.onnx"
    ir.save(conv_chain(), model_path)
    out = tmp_path / "o.onnx"
    config = PruneConfig(target_latency=0.7, round_to=1)
    result = prune_file(model_path, out, config)
    (step,) = result.steps
    assert step.latency is not None and step.latency.reached
    chosen = step.latency.macs_fraction
    # the written model is the one the search measured, and it meets the target
    ratio = 0.1 + 0.9 * _macs(out) / _macs(model_path)
    assert ratio <= 0.7 + 1e-9
    assert {fraction for fraction, _ in step.latency.probes} >= {0.7, chosen}
    assert any("--target-latency 0.70" in note for note in step.notes)
    # the same plan as --target-macs at the chosen fraction
    again = tmp_path / "again.onnx"
    prune_file(model_path, again, PruneConfig(target_macs=chosen, round_to=1))
    assert _macs(again) == _macs(out)


def test_cli_flags_and_refusals(tmp_path: Path, capsys, latency_by_macs):
    model_path = tmp_path / "m.onnx"
    ir.save(conv_chain(), model_path)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    common = ["prune", str(model_path), "-o", str(out), "--round-to", "1"]
    assert main([*common, "--target-latency", "0.7", "--report", str(report)]) == 0
    assert "--target-latency 0.70: pruned to" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["steps"][0]["latency"]["target_latency"] == 0.7
    assert np.isfinite(data["steps"][0]["latency"]["macs_fraction"])
    for extra, message in (
        (["--target-latency", "0.7", "--ratio", "0.5"], "give only one of"),
        (["--target-latency", "1.5"], "--target-latency 1.5: must be in (0, 1)"),
        (["--target-latency", "0.7", "--iterative", "2"], "cannot be combined with --iterative"),
    ):
        bad = tmp_path / "bad.onnx"
        argv = ["prune", str(model_path), "-o", str(bad), *extra]
        assert main(argv) == 2
        assert message in capsys.readouterr().err and not bad.exists()
