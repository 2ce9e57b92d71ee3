"""Weight sparsity: magnitude / Wanda scores, OBS (SparseGPT) update, N:M, compact storage.

Public API: :func:`sparsify_file` (what ``onnxprune sparsify`` calls) with a
:class:`SparsifyConfig`, returning a :class:`SparsifyResult` (``to_dict()`` is the
``onnxprune.sparsify/1`` JSON); the in-memory algorithm :func:`apply_sparsity`.
"""

from onnxprune.sparsity.api import sparsify_file, validate_config
from onnxprune.sparsity.layers import WeightLayer, find_layers
from onnxprune.sparsity.prune import PATTERNS, SparsifyConfig, apply_sparsity
from onnxprune.sparsity.report import SCHEMA, LayerResult, SparsifyResult

__all__ = [
    "PATTERNS",
    "SCHEMA",
    "LayerResult",
    "SparsifyConfig",
    "SparsifyResult",
    "WeightLayer",
    "apply_sparsity",
    "find_layers",
    "sparsify_file",
    "validate_config",
]
