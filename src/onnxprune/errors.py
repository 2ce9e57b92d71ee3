"""Error types. Every error carries the exit code the CLI returns for it.

Exit codes (documented for pipelines): 0 ok, 1 budget or verification failed,
2 usage error or bad input (unreadable model, unsafe external data, bad calibration data).
"""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "CalibrationError",
    "ModelLoadError",
    "OnnxPruneError",
    "SaveError",
    "UnsafeExternalDataError",
    "UsageError",
]


class OnnxPruneError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code: int = 2


class UsageError(OnnxPruneError):
    """Bad command-line usage or bad API arguments."""


class ModelLoadError(OnnxPruneError):
    """The model file is missing, truncated, corrupt, not ONNX, or not runnable."""


class UnsafeExternalDataError(ModelLoadError):
    """An external-data reference points outside the model folder or is inconsistent."""


class SaveError(OnnxPruneError):
    """The model cannot be written where asked (e.g. it would overwrite the input)."""


class CalibrationError(OnnxPruneError):
    """Calibration data does not match the model's inputs."""


class BudgetError(OnnxPruneError):
    """A fidelity budget or verification tolerance was violated."""

    exit_code = 1
