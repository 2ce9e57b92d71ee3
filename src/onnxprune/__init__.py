"""onnxprune: framework-agnostic ONNX graph optimizer."""

from onnxprune.errors import (
    BudgetError,
    CalibrationError,
    ModelLoadError,
    OnnxPruneError,
    SaveError,
    UnsafeExternalDataError,
    UsageError,
)
from onnxprune.io import load, save

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CalibrationError",
    "ModelLoadError",
    "OnnxPruneError",
    "SaveError",
    "UnsafeExternalDataError",
    "UsageError",
    "__version__",
    "load",
    "save",
]
