"""Weight sparsity: magnitude / Wanda scores, OBS (SparseGPT) update, N:M, compact storage.

Public API: :func:`sparsify_file` (``onnxprune sparsify`` through the file driver) with a
:class:`SparsifyConfig`, its in-memory transform :func:`sparsify_apply` (reporting a
:class:`SparsifyReport`), and the algorithm :func:`apply_sparsity`.
"""

from onnxprune.sparsity.api import sparsify_apply, sparsify_file, validate_config
from onnxprune.sparsity.layers import WeightLayer, find_layers
from onnxprune.sparsity.prune import PATTERNS, SparsifyConfig, apply_sparsity
from onnxprune.sparsity.report import LayerResult, SparsifyReport

__all__ = [
    "PATTERNS",
    "LayerResult",
    "SparsifyConfig",
    "SparsifyReport",
    "WeightLayer",
    "apply_sparsity",
    "find_layers",
    "sparsify_apply",
    "sparsify_file",
    "validate_config",
]
