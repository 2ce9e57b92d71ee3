"""Model analysis: shape inference, MAC and parameter counts, and ``inspect`` reports."""

from onnxprune.analysis.inspect import (
    SCHEMA,
    FileSizes,
    InspectReport,
    TensorInfo,
    file_sizes,
    format_count,
    inspect_model,
)
from onnxprune.analysis.macs import (
    ModelCost,
    NodeCost,
    conv_output_spatial,
    count_costs,
    node_params,
    total_params,
)
from onnxprune.analysis.shapes import infer_shapes, shape_tuple

__all__ = [
    "SCHEMA",
    "FileSizes",
    "InspectReport",
    "ModelCost",
    "NodeCost",
    "TensorInfo",
    "conv_output_spatial",
    "count_costs",
    "file_sizes",
    "format_count",
    "infer_shapes",
    "inspect_model",
    "node_params",
    "shape_tuple",
    "total_params",
]
