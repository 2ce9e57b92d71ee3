"""Least-squares recovery (prune --reconstruct): the number of passes over the model is
bounded, whatever the number of consumers, and the normal equations cost one product per
fold, whatever the number of feeds (issue 14 item 27: DenseNet-121)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.prune import recover, ridge
from onnxprune.prune.api import prune_file
from onnxprune.prune.core import PruneOptions
from prune_models import deep_chain


def test_refit_chunks_bound_passes_and_memory() -> None:
    assert recover.refit_chunks([1] * 5, passes=8) == [[0], [1], [2], [3], [4]]
    chunks = recover.refit_chunks([1] * 20, passes=8)
    assert len(chunks) == 7 and [i for c in chunks for i in c] == list(range(20))
    assert recover.refit_chunks([6, 6, 6, 20, 1], passes=1, budget=12) == [
        [0, 1],
        [2],
        [3],
        [4],
    ]


def test_refit_passes_do_not_grow_with_the_number_of_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """39 consumers: once one pass over every feed per consumer (40 passes), now at most
    ``MAX_PASSES`` + the teacher's pass; every refit still helps."""
    model_path, calib = tmp_path / "deep.onnx", tmp_path / "calib.npz"
    ir.save(deep_chain(40), model_path)
    x = np.random.default_rng(1).standard_normal((12, 1, 3, 6, 6)).astype(np.float32)
    np.savez(calib, x=x)
    passes = []
    original = recover.iter_intermediates

    def counting(model, names, feeds, **kwargs):
        passes.append(len(names))
        return original(model, names, feeds, **kwargs)

    monkeypatch.setattr(recover, "iter_intermediates", counting)
    products = []
    add = ridge.Folds.add

    def counting_add(self, fold, design, target):
        products.append(len(design))
        return add(self, fold, design, target)

    monkeypatch.setattr(ridge.Folds, "add", counting_add)
    options = PruneOptions(ratio=0.5, round_to=1)
    result = prune_file(model_path, tmp_path / "out.onnx", options, calib=calib, reconstruct=True)
    refits = result.refits[0]
    assert len(refits) == 39
    assert len(passes) <= recover.MAX_PASSES + 1 < len(refits), passes
    # one K x K product per consumer and fold, not one per feed (12 feeds, 5 folds)
    assert len(products) <= ridge.MAX_FOLDS * len(refits) < 12 * len(refits)
    assert all(r.error_after <= r.error_before for r in refits)
    assert sum(r.error_after < r.error_before for r in refits) >= 20


def test_cross_validation_decomposes_once_per_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chosen strength is applied with one solve (same solution as its eigen path), so
    a consumer costs one eigendecomposition per fold, not one more."""
    rng = np.random.default_rng(0)
    folds = ridge.Folds.zeros(5, 40, 5)
    for fold in range(5):
        design = rng.standard_normal((60, 40))
        folds.add(fold, design, design[:, :5] * 0.5 + 0.3 * rng.standard_normal((60, 5)))
    s0 = np.full((40, 5), 0.01)
    calls = []
    eigh = np.linalg.eigh

    def counting(matrix, *args, **kwargs):
        calls.append(matrix.shape)
        return eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(ridge.np.linalg, "eigh", counting)
    chosen = ridge.cross_validated_refit(folds, s0)
    assert np.isfinite(chosen.strength) and len(calls) == 5
    r, _ = ridge._error_terms(folds, s0)
    p = ridge._scales(folds.gram.sum(0), float(folds.rows.sum()))
    index = [g for g in ridge.GRID if np.isfinite(g)].index(chosen.strength)
    path = ridge._path(folds.gram.sum(0), r.sum(0), p, float(folds.rows.sum()))
    np.testing.assert_allclose(chosen.solution, s0 + path[index], rtol=1e-9, atol=1e-12)
