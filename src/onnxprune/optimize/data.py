"""Calibration splits and labelled evaluation for ``optimize``.

The calibration data is split deterministically: the last quarter of the samples (at least
one) is held out to check fidelity against the budget; the rest feeds the steps that fit
anything (statistics, refits, ranges). An evaluation set is an ``.npz`` with the model's
inputs (axis 0 = samples) and a ``label`` array; accuracy is top-1 of the first output.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from onnxprune.errors import CalibrationError
from onnxprune.runtime import make_session

__all__ = ["accuracy", "has_labels", "split_calibration"]


def split_calibration(path: Path, folder: Path) -> tuple[Path, Path]:
    """(fit, holdout) calibration paths written under ``folder``."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        cut = max(1, len(files) - max(1, len(files) // 4)) if len(files) > 1 else 1
        fit, hold = folder / "fit", folder / "holdout"
        fit.mkdir()
        hold.mkdir()
        for i, file in enumerate(files):
            target = (fit if i < cut else hold) / file.name
            os.symlink(file.resolve(), target)
        if len(files) == 1:
            os.symlink(files[0].resolve(), hold / files[0].name)
        return fit, hold
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    n = len(next(iter(arrays.values())))
    cut = n - max(1, n // 4) if n > 1 else n
    fit, hold = folder / "fit.npz", folder / "holdout.npz"
    np.savez(fit, **{k: v[:cut] for k, v in arrays.items()})
    np.savez(hold, **{k: v[cut:] if n > 1 else v for k, v in arrays.items()})
    return fit, hold


def has_labels(eval_set: str | os.PathLike[str]) -> bool:
    """Whether ``eval_set`` is an ``.npz`` with a ``label`` array (accuracy is then reported)."""
    path = Path(eval_set)
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            return "label" in data.files
    except (OSError, ValueError):
        return False


def accuracy(model: str | os.PathLike[str], eval_set: str | os.PathLike[str]) -> float:
    """Top-1 accuracy of the model's first output on a labelled ``.npz``."""
    session = make_session(model)
    names = [i.name for i in session.get_inputs()]
    with np.load(eval_set, allow_pickle=False) as data:
        if "label" not in data.files:
            raise CalibrationError(f"evaluation set {eval_set}: no 'label' array")
        missing = [n for n in names if n not in data.files]
        if missing:
            raise CalibrationError(f"evaluation set {eval_set}: no array for input {missing[0]!r}")
        arrays = {n: data[n] for n in names}
        labels = data["label"]
    correct = 0
    output = session.get_outputs()[0].name
    for start in range(0, len(labels), 256):
        feed = {n: a[start : start + 256] for n, a in arrays.items()}
        logits = session.run([output], feed)[0]
        correct += int(
            (logits.reshape(len(logits), -1).argmax(1) == labels[start : start + 256]).sum()
        )
    return correct / max(len(labels), 1)
