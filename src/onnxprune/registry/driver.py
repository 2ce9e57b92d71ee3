"""The file-level driver, written once for every transform with an in-memory ``apply``.

``run_file`` loads the model (never modifying the file), refuses models no transform may
rewrite, validates the options against the model, prepares the data (an ``exact`` transform
checks on all of ``--calib``; a ``lossy`` one fits on the fit part and is measured on
``--eval`` or the held-out part, :mod:`onnxprune.heldout`), applies the transform, checks or
measures the written temporary file, publishes it atomically (nothing is written when the
check fails), and returns one :class:`FileResult`: the transform's own report inside an
envelope with sizes, parameters and MACs before and after.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxprune.analysis import count_costs, total_params
from onnxprune.analysis.inspect import disk_bytes
from onnxprune.calib import load_calibration, model_input_specs
from onnxprune.check import EquivalenceResult, check_equivalent, check_feeds
from onnxprune.heldout import DataSplit, FidelityReport, measure, split_data
from onnxprune.io import load, save
from onnxprune.io.validate import refuse_unrewritable
from onnxprune.registry.transform import Details, Transform

__all__ = ["FileResult", "run_file"]


@dataclasses.dataclass
class FileResult:
    """The report of one transform run on a file (the envelope around its own details)."""

    transform: str
    input: str
    output: str
    config: dict[str, Any]
    details: Details
    input_bytes: int
    output_bytes: int
    params: tuple[int, int]
    macs: tuple[int, int]
    check: EquivalenceResult | None = None
    fidelity: FidelityReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": f"onnxprune.{self.transform}/2",
            "input": self.input,
            "output": self.output,
            "config": self.config,
            self.transform: self.details.to_dict(),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "params": {"before": self.params[0], "after": self.params[1]},
            "macs": {"before": self.macs[0], "after": self.macs[1]},
            "check": self.check.to_dict() if self.check else None,
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
        }

    def summary(self) -> str:
        lines = [self.details.summary()]
        if self.check is not None:
            worst = max(
                (m["max_abs_error"] or 0.0 for m in self.check.outputs.values()), default=0.0
            )
            lines.append(f"checked on {self.check.samples} feeds: max abs error {worst:.3g}")
        if self.fidelity is not None:
            lines.extend(self.fidelity.summary())
        lines.append(
            f"params {self.params[0]} -> {self.params[1]}, MACs {self.macs[0]} -> {self.macs[1]}"
        )
        lines.append(f"wrote {self.output} ({self.input_bytes} -> {self.output_bytes} bytes)")
        return "\n".join(lines)


def _with_dims(config: Any, dims: Mapping[str, int]) -> Any:
    names = {field.name for field in dataclasses.fields(config)}
    if "dims" in names and dims:
        return dataclasses.replace(config, dims=dict(dims))
    return config


def run_file(
    transform: Transform,
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    config: Any = None,
    *,
    calib: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    dims: Mapping[str, int] | None = None,
) -> Any:
    """Run ``transform`` on ``model_path`` and write ``output_path`` (see the module docstring);
    ``dims`` default to the config's ``dims`` field where it has one.

    Raises:
        UsageError, CalibrationError, ModelLoadError: bad options, data or model (nothing
            written).
        BudgetError: an exact transform changed the outputs (nothing written).
    """
    config = transform.config() if config is None else config
    dims = dict(dims or getattr(config, "dims", None) or {})
    config = _with_dims(config, dims)
    if transform.run_file is not None:
        return transform.run_file(model_path, output_path, config, calib=calib, eval_data=eval_data)
    assert transform.apply is not None
    model = load(model_path)
    refuse_unrewritable(model, str(model_path))
    if transform.validate is not None:
        transform.validate(model, config, calib is not None)
    input_bytes = disk_bytes(model_path)
    params_before = total_params(model)
    macs_before = count_costs(model, dims=dims).total_macs
    if transform.fidelity == "exact":
        calibration = load_calibration(calib, model) if calib is not None else None
        feeds = check_feeds(model_input_specs(model), calibration, dims, model=model_path)
        split = DataSplit(calibration, calibration, "the check feeds", "none", list(feeds))
    else:
        split = split_data(model, calib, eval_data, dims=dims)
    details = transform.apply(model, config, split)
    checked: list[EquivalenceResult] = []
    measured: list[FidelityReport] = []

    def before_commit(tmp_path: Path) -> None:
        if transform.fidelity == "exact":
            checked.append(check_equivalent(model_path, tmp_path, feeds))
        else:
            measured.append(measure(model_path, tmp_path, split))

    dest = save(model, output_path, before_commit=before_commit)
    return FileResult(
        transform=transform.name,
        input=str(model_path),
        output=str(dest),
        config=_config_dict(config),
        details=details,
        input_bytes=input_bytes,
        output_bytes=disk_bytes(dest),
        params=(params_before, total_params(model)),
        macs=(macs_before, count_costs(model, dims=dims).total_macs),
        check=checked[0] if checked else None,
        fidelity=measured[0] if measured else None,
    )


def _config_dict(config: Any) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def apply_model(transform: Transform, model: ir.Model, config: Any, split: DataSplit) -> Details:
    """Apply ``transform`` to an in-memory model (what recipes and the Python API call)."""
    assert transform.apply is not None
    return transform.apply(model, config, split)
