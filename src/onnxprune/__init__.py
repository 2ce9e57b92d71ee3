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


def __getattr__(name: str) -> object:
    """The transforms' public functions and configs, imported on first use (keeps
    ``import onnxprune`` light)."""
    lazy = {
        "canonicalize_file": "onnxprune.api",
        "fp16_file": "onnxprune.api",
        "prune_file": "onnxprune.prune.api",
        "quantize_file": "onnxprune.quant.api",
        "lowrank_file": "onnxprune.lowrank.api",
        "sparsify_file": "onnxprune.sparsity.api",
        "optimize": "onnxprune.optimize.api",
        "inspect_model": "onnxprune.analysis.inspect",
        "CanonicalizeConfig": "onnxprune.passes.pipeline",
        "Fp16Config": "onnxprune.quant.fp16",
        "LowRankConfig": "onnxprune.lowrank.config",
        "SparsifyConfig": "onnxprune.sparsity.prune",
        "PruneConfig": "onnxprune.prune.config",
        "PruneOptions": "onnxprune.prune.core",
        "QuantizeConfig": "onnxprune.quant.config",
    }
    if name not in lazy:
        raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(lazy[name]), name)


__all__ = [
    "BenchResult",
    "BudgetError",
    "CalibrationError",
    "CanonicalizeConfig",
    "Fp16Config",
    "LowRankConfig",
    "ModelLoadError",
    "OnnxPruneError",
    "PruneConfig",
    "PruneOptions",
    "QuantizeConfig",
    "SaveError",
    "SparsifyConfig",
    "UnsafeExternalDataError",
    "UsageError",
    "VerifyResult",
    "__version__",
    "benchmark",
    "canonicalize_file",
    "fp16_file",
    "inspect_model",
    "load",
    "lowrank_file",
    "optimize",
    "prune_file",
    "quantize_file",
    "save",
    "sparsify_file",
    "verify",
]
