"""Output and layer-by-layer verification of a candidate model against a reference.

Public API: :func:`verify` returning a :class:`VerifyResult` (``to_dict()`` is the
``onnxprune.verify/1`` JSON), :func:`verify_markdown`.
"""

from onnxprune.verification.core import AGGREGATION, VERIFY_SCHEMA, VerifyResult, verify
from onnxprune.verification.layers import LayerMetrics, LayerReport, compare_layers
from onnxprune.verification.report import verify_markdown

__all__ = [
    "AGGREGATION",
    "VERIFY_SCHEMA",
    "LayerMetrics",
    "LayerReport",
    "VerifyResult",
    "compare_layers",
    "verify",
    "verify_markdown",
]
