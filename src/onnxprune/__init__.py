"""onnxprune: framework-agnostic ONNX graph optimizer."""

from onnxprune.bench import BenchResult, benchmark
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
from onnxprune.verification import VerifyResult, verify

__version__ = "0.1.0"

__all__ = [
    "BenchResult",
    "BudgetError",
    "CalibrationError",
    "ModelLoadError",
    "OnnxPruneError",
    "SaveError",
    "UnsafeExternalDataError",
    "UsageError",
    "VerifyResult",
    "__version__",
    "benchmark",
    "load",
    "save",
    "verify",
]
