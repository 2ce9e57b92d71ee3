"""Which samples a lossy command fits on and which it reports fidelity on.

A fidelity number measured on the samples a step was fitted on (a least-squares refit, bias
correction, an OBS update, whitening) says little about data the model has not seen. So
every lossy command splits its data the same way:

* ``--eval PATH`` given: fit on all of ``--calib``, report on ``PATH`` (an ``.npz`` may carry
  a ``label`` array, which is ignored here);
* otherwise, with ``--calib``: the **last quarter** of the samples (at least one; whole files
  of a folder) is held out, never interleaved with the fit samples, and the fit uses the rest.
  One sample cannot be split: it is used for both, and the description says so;
* without any data: synthetic feeds, and the description says the numbers are not a
  fidelity measurement on real inputs.

:func:`measure` then reports on the held-out samples, and also on as many fit samples, so a
fitted step that does much better on its own data than on held-out data is flagged in one
line (:func:`onnxprune.fidelity.overfit_note`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.calib import CalibrationData, load_calibration, model_input_specs
from onnxprune.check import default_dims, probe_default_dims
from onnxprune.feeds import synthetic_feeds
from onnxprune.fidelity import FidelityResult, ModelLike, compare, overfit_note

__all__ = ["DataSplit", "FidelityReport", "measure", "split_data"]

#: Share of the calibration samples held out when no ``--eval`` is given.
HOLDOUT_FRACTION = 0.25


@dataclasses.dataclass
class DataSplit:
    """Fit samples (``None`` without data) and the samples fidelity is reported on."""

    fit: CalibrationData | None
    held: CalibrationData | None
    held_description: str
    fit_description: str
    synthetic: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)

    def held_feeds(self, limit: int | None = None) -> list[dict[str, np.ndarray]]:
        """The report's feeds (synthetic ones when there is no data)."""
        if self.held is None:
            return self.synthetic
        count = len(self.held) if limit is None else min(limit, len(self.held))
        return list(self.held.feeds(range(count)))

    def fit_feeds(self, limit: int | None = None) -> list[dict[str, np.ndarray]]:
        if self.fit is None:
            return []
        count = len(self.fit) if limit is None else min(limit, len(self.fit))
        return list(self.fit.feeds(range(count)))


def split_data(
    model: ir.Model,
    calib: str | os.PathLike[str] | CalibrationData | None,
    eval_data: str | os.PathLike[str] | None = None,
    *,
    dims: Mapping[str, int] | None = None,
    synthetic_count: int = 4,
) -> DataSplit:
    """Split ``calib`` (or use ``eval_data``) as the module docstring says; validates both."""
    data = calib
    if calib is not None and not isinstance(calib, CalibrationData):
        data = load_calibration(calib, model)
    assert data is None or isinstance(data, CalibrationData)
    if eval_data is not None:
        held = load_calibration(eval_data, model, ignore=("label",))
        return DataSplit(
            data,
            held,
            f"--eval {eval_data} ({len(held)} samples, none used for fitting)",
            f"all {len(data)} samples of {data.source}" if data is not None else "none",
        )
    if data is None:
        specs = model_input_specs(model)
        bound, guessed = default_dims(specs, dims)
        feeds = synthetic_feeds(specs, bound, count=synthetic_count, seed=0)
        if feeds:
            probe_default_dims(model, feeds[0], guessed)
        return DataSplit(
            None,
            None,
            f"{len(feeds)} synthetic random samples (no --calib/--eval): not a measurement "
            "on real inputs",
            "none",
            feeds,
        )
    total = len(data)
    if total < 2:
        return DataSplit(
            data,
            data,
            f"the only sample of {data.source}, which was also used for fitting (optimistic; "
            "give --eval or more samples)",
            f"the only sample of {data.source}",
        )
    held_count = max(1, int(total * HOLDOUT_FRACTION))
    cut = total - held_count
    unit = "files" if data._arrays is None else "samples"
    return DataSplit(
        data.subset(0, cut),
        data.subset(cut, total),
        f"held-out {unit} {cut}-{total - 1} of {data.source} (the last {held_count} of "
        f"{total}; fitting used {unit} 0-{cut - 1})",
        f"{unit} 0-{cut - 1} of {data.source}",
    )


@dataclasses.dataclass
class FidelityReport:
    """Held-out fidelity, the same metrics on fit samples, and the overfitting line."""

    held_out: FidelityResult
    fit: FidelityResult | None
    overfit: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.held_out.data,
            "samples": self.held_out.samples,
            "graph_optimizations": self.held_out.graph_optimizations,
            "outputs": self.held_out.outputs,
            "worst_feed": self.held_out.worst_feed,
            "intervals": self.held_out.intervals,
            "fit_samples": None if self.fit is None else self.fit.to_dict(),
            "overfit": self.overfit,
        }

    def summary(self) -> list[str]:
        lines = [f"fidelity on {self.held_out.data}:"]
        lines += ["  " + line for line in self.held_out.summary()]
        if self.overfit:
            lines.append(f"warning: {self.overfit}")
        return lines


def measure(
    reference: ModelLike,
    candidate: ModelLike,
    split: DataSplit,
    *,
    fit_samples: int = 64,
    eval_samples: int | None = None,
    provider: str = "cpu",
) -> FidelityReport:
    """Held-out fidelity of ``candidate`` (and on fit samples, to flag overfitting)."""
    held = compare(
        reference,
        candidate,
        split.held_feeds(eval_samples),
        data=split.held_description,
        provider=provider,
    )
    fit = None
    fit_feeds = split.fit_feeds(min(fit_samples, held.samples))
    if fit_feeds and split.held is not split.fit:
        fit = compare(
            reference, candidate, fit_feeds, data=split.fit_description, provider=provider
        )
    return FidelityReport(held, fit, overfit_note(fit, held) if fit is not None else None)
