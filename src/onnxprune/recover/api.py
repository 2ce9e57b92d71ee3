"""``recover_file``: distil an optimized model from its original, file to file.

Data follow the package's held-out convention (:mod:`onnxprune.heldout`): with ``--eval``
the distillation uses all of ``--calib`` and the report is on the eval data; without it the
last quarter of ``--calib`` is held out from distillation entirely and reported on. Inside
the fit samples, :func:`onnxprune.recover.distill.distill` holds out its own last share for
early stopping and for deciding whether to keep the trained weights.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from onnxprune.errors import UsageError
from onnxprune.heldout import FidelityReport, measure, split_data
from onnxprune.io import load, save
from onnxprune.recover.distill import DistillOptions, DistillResult, distill

__all__ = ["RecoverResult", "recover_file"]


@dataclasses.dataclass
class RecoverResult:
    student: str
    teacher: str
    output: str
    distillation: DistillResult
    before: FidelityReport
    fidelity: FidelityReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "student": self.student,
            "teacher": self.teacher,
            "output": self.output,
            "distillation": self.distillation.to_dict(),
            "fidelity_before": self.before.to_dict(),
            "fidelity": self.fidelity.to_dict(),
        }

    def summary(self) -> str:
        lines = [self.distillation.summary(), "before recovery:"]
        lines += ["  " + line for line in self.before.summary()]
        lines.append("after recovery:")
        lines += ["  " + line for line in self.fidelity.summary()]
        lines.append(f"wrote {self.output}")
        return "\n".join(lines)


def _check_io(student: Any, teacher: Any) -> None:
    s_inputs = {v.name for v in student.graph.inputs if v.name not in student.graph.initializers}
    t_inputs = {v.name for v in teacher.graph.inputs if v.name not in teacher.graph.initializers}
    if s_inputs != t_inputs:
        raise UsageError(
            f"the student's inputs {sorted(s_inputs)} differ from the teacher's {sorted(t_inputs)}"
        )
    t_outputs = {v.name for v in teacher.graph.outputs}
    missing = [v.name for v in student.graph.outputs if v.name not in t_outputs]
    if missing:
        raise UsageError(f"the student's output {missing[0]!r} is not an output of the teacher")


def recover_file(
    student_path: str | os.PathLike[str],
    teacher_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    calib: str | os.PathLike[str],
    *,
    eval_data: str | os.PathLike[str] | None = None,
    options: DistillOptions | None = None,
) -> RecoverResult:
    """Distil ``student_path`` from ``teacher_path`` and write the result to ``output_path``.

    The output is written even when the trained weights were not kept (it is then the
    student's weights unchanged; the report says so).

    Raises:
        UsageError, CalibrationError: mismatched models or bad data (nothing written).
    """
    student = load(student_path)
    teacher = load(teacher_path)
    _check_io(student, teacher)
    split = split_data(student, calib, eval_data)
    feeds = split.fit_feeds()
    result = distill(student, teacher, feeds, options)
    before = measure(teacher_path, student_path, split)
    reports: list[FidelityReport] = []

    def measure_written(path: Path) -> None:
        reports.append(measure(teacher_path, path, split))

    dest = save(result.model, output_path, before_commit=measure_written, protect=[teacher_path])
    return RecoverResult(
        str(student_path), str(teacher_path), str(dest), result, before, reports[0]
    )
