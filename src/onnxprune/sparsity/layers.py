"""Find the prunable weights of a model and view each one as a matrix ``W[rows, K]``.

Every supported weight is viewed as a 2-D matrix whose columns index the *reduction* axis
(the inputs summed into one output) and whose rows index outputs:

* ``Gemm`` (``Y = A B``): ``B[K, N]`` -> ``W = B^T`` (``transB=1``: ``B[N, K]`` -> ``W = B``);
* ``MatMul`` with a constant 2-D right operand ``B[K, N]`` -> ``W = B^T``;
* ``Conv`` ``w[O, C/g, kh, kw]`` -> ``W[O, kh*kw*C/g]`` with column index
  ``(i*kw + j) * C/g + c``: consecutive columns are consecutive *input channels* at one
  kernel position, the grouping sparse tensor cores use for N:M on convolutions;
* ``ConvTranspose`` ``w[C, O/g, kh, kw]`` -> ``W[O/g*kh*kw, C]`` (each input channel ``c`` is
  multiplied by ``w[c, :, :, :]``, so ``C`` is the reduction axis).

A candidate is skipped, with the reason recorded, when its weight is not a float
initializer, is shared by several nodes (pruning it for one would prune it for all),
is a graph output, or sits in an unsupported position (constant left operand, batched
MatMul weight). Biases and normalization parameters are never candidates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import const_shape
from onnxprune.reports import Skip

__all__ = ["PRUNABLE_OPS", "WeightLayer", "find_layers"]

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16})


@dataclasses.dataclass(frozen=True)
class WeightLayer:
    """A prunable weight and how to view it as ``W[rows, K]`` (see the module docstring)."""

    node: str
    op: str
    weight: str
    activation: str
    shape: tuple[int, ...]
    attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def group(self) -> int:
        return int(self.attrs.get("group", 1))

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight tensor as ``W[rows, K]`` (a copy)."""
        if self.op == "Conv":
            return np.ascontiguousarray(w.transpose(0, *range(2, w.ndim), 1)).reshape(
                w.shape[0], -1
            )
        if self.op == "ConvTranspose":
            return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
        if self.op == "Gemm" and self.attrs.get("transB", 0):
            return np.array(w)
        return np.ascontiguousarray(w.T)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_matrix`: the weight tensor with the original shape."""
        if self.op == "Conv":
            moved = (self.shape[0], *self.shape[2:], self.shape[1])
            back = matrix.reshape(moved)
            return np.ascontiguousarray(back.transpose(0, -1, *range(1, len(self.shape) - 1)))
        if self.op == "ConvTranspose":
            return np.ascontiguousarray(matrix.T).reshape(self.shape)
        if self.op == "Gemm" and self.attrs.get("transB", 0):
            return np.array(matrix)
        return np.ascontiguousarray(matrix.T)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape of :meth:`to_matrix`: ``(rows, K)``."""
        if self.op == "Conv":
            return (self.shape[0], self.size // self.shape[0])
        if self.op == "ConvTranspose":
            return (self.size // self.shape[0], self.shape[0])
        if self.op == "Gemm" and self.attrs.get("transB", 0):
            return (self.shape[0], self.shape[1])
        return (self.shape[1], self.shape[0])

    @property
    def channel_run(self) -> int:
        """Consecutive ``W`` columns that are consecutive input channels (N:M needs M | it)."""
        return self.shape[1] if self.op == "Conv" else self.matrix_shape[1]


def _attrs(node: ir.Node) -> dict[str, Any]:
    return {name: attr.value for name, attr in node.attributes.items()}


def _weight_index(node: ir.Node) -> int | str:
    """Input index of the weight, or a reason why this node has no prunable weight."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return 1
    attrs = _attrs(node)
    inputs = node.inputs
    if node.op_type == "MatMul":
        if len(inputs) > 0 and inputs[0] is not None and inputs[0].const_value is not None:
            return "constant left operand (weight first) is not supported"
        return 1
    if attrs.get("transA", 0) and node.op_type == "Gemm":
        return "Gemm with transA=1 is not supported"
    return 1


def _check_weight(node: ir.Node, value: ir.Value | None, graph: ir.Graph) -> str | None:
    """A reason to skip ``value`` as the weight of ``node``, or None if it is prunable."""
    if value is None or value.const_value is None or not value.is_initializer():
        return "weight is not a constant initializer"
    if value.const_value.dtype not in _FLOAT_TYPES:
        return f"weight dtype {value.const_value.dtype} is not float"
    if value.is_graph_output() or value in graph.inputs:
        return "weight is a graph input or output"
    users = {use.node for use in value.uses()}
    if len(users) > 1:
        names = sorted(str(u.name) for u in users)
        return f"weight is shared by {len(users)} nodes ({', '.join(names)}); skipped"
    shape = tuple(value.const_value.shape.numpy())
    if node.op_type in ("MatMul", "Gemm") and len(shape) != 2:
        return f"weight has rank {len(shape)}; only 2-D MatMul/Gemm weights are supported"
    if node.op_type in ("Conv", "ConvTranspose") and len(shape) < 3:
        return f"weight has rank {len(shape)}"
    return None


def find_layers(model: ir.Model) -> tuple[list[WeightLayer], list[Skip]]:
    """Prunable layers of the main graph (in graph order) and skipped nodes with reasons.

    Node names must be unique for ``--exclude``/``--layer-sparsity`` to address them; an
    unnamed node is addressed by its weight name.
    """
    layers: list[WeightLayer] = []
    skipped: list[Skip] = []
    graph = model.graph
    for node in graph:
        if node.op_type not in PRUNABLE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        index = _weight_index(node)
        value = node.inputs[index] if isinstance(index, int) and len(node.inputs) > 1 else None
        name = str(node.name or (value.name if value is not None else f"{node.op_type}?"))
        reason = index if isinstance(index, str) else _check_weight(node, value, graph)
        activation = node.inputs[0]
        if reason is None and activation is None:
            reason = "node has no data input"
        if reason is not None or value is None or activation is None:
            skipped.append(Skip(name, str(reason)))
            continue
        shape = const_shape(value)
        layers.append(
            WeightLayer(
                name, node.op_type, str(value.name), str(activation.name), shape, _attrs(node)
            )
        )
    return layers, skipped
