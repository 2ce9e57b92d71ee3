"""File-level API: what the CLI commands call (load, rewrite, check, save atomically)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxprune.analysis.inspect import disk_bytes
from onnxprune.calib import load_calibration, model_input_specs
from onnxprune.check import EquivalenceResult, check_equivalent, check_feeds
from onnxprune.errors import UsageError
from onnxprune.io import load, save
from onnxprune.io.validate import refuse_unrewritable
from onnxprune.passes import pipeline

__all__ = ["CanonicalizeResult", "canonicalize_file"]


@dataclasses.dataclass
class CanonicalizeResult:
    """Report of :func:`canonicalize_file`."""

    input: str
    output: str
    passes: dict[str, Any]
    check: EquivalenceResult
    input_bytes: int
    output_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "onnxprune.canonicalize/1",
            "input": self.input,
            "output": self.output,
            "passes": self.passes,
            "check": self.check.to_dict(),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
        }

    def summary(self) -> str:
        worst = max((m["max_abs_error"] or 0.0 for m in self.check.outputs.values()), default=0.0)
        return (
            f"{self.passes.get('summary', '')}\n"
            f"checked on {self.check.samples} feeds: max abs error {worst:.3g}\n"
            f"wrote {self.output} ({self.input_bytes} -> {self.output_bytes} bytes)"
        )


def canonicalize_file(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    calib: str | os.PathLike[str] | None = None,
    dims: Mapping[str, int] | None = None,
    skip: Sequence[str] = (),
) -> CanonicalizeResult:
    """Canonicalize ``model_path`` into ``output_path``; the input file is never modified.

    The rewritten model is checked against the original in onnxruntime (graph optimizations
    off) before it is published; a mismatch raises BudgetError and nothing is written.
    """
    unknown = [name for name in skip if name not in pipeline.PASS_NAMES]
    if unknown:
        raise UsageError(f"unknown pass {unknown[0]!r}; passes: {', '.join(pipeline.PASS_NAMES)}")
    model = load(model_path)
    refuse_unrewritable(model, str(model_path))
    input_bytes = disk_bytes(model_path)
    calibration = load_calibration(calib, model) if calib is not None else None
    feeds = check_feeds(model_input_specs(model), calibration, dims, model=model_path)
    report = pipeline.canonicalize(model, skip=skip)
    checked: list[EquivalenceResult] = []

    def verify(tmp_path: Path) -> None:
        checked.append(check_equivalent(model_path, tmp_path, feeds))

    dest = save(model, output_path, before_commit=verify)
    return CanonicalizeResult(
        input=str(model_path),
        output=str(dest),
        passes=report.to_dict(),
        check=checked[0],
        input_bytes=input_bytes,
        output_bytes=disk_bytes(dest),
    )
