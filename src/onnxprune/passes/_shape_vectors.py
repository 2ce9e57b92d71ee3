"""Shape vectors known element by element, for folding partly symbolic shape computations.

Exporters compute shapes at run time: ``Shape(x) -> Gather -> Unsqueeze -> Concat -> Reshape``.
When ``x`` has a symbolic dim (the batch) the ``Shape`` is not constant, so plain constant
folding stops at the first node, although the elements picked downstream are often static
(``Gather(Shape(x), 1)``) or are the symbolic dim of the very tensor being reshaped. This
module follows such 0-D/1-D integer tensors through ``Shape``/``Size``/``Gather``/``Slice``/
``Concat``/``Unsqueeze``/``Squeeze``/``Cast``/``Identity``, keeping each element either as an
``int`` or as a :class:`DimRef` (dim ``i`` of value ``v``). A vector whose elements are all
ints can be folded; :func:`resolve_reshape_elems` turns a ``Reshape`` target that still holds
``DimRef`` s into a constant where that is exact.

It also holds :func:`constant_array`, the one definition of "this value is a constant" that
both the tracking here and the constant-folding pass use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import required

__all__ = [
    "DEFAULT_DOMAINS",
    "DimRef",
    "Elem",
    "ShapeVector",
    "constant_array",
    "propagate",
    "resolve_reshape_elems",
]

DEFAULT_DOMAINS = ("", "ai.onnx")
_MAX_VECTOR = 64  # integer constants up to this size take part in shape-vector tracking


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant data, or None when it is not a constant.

    Initializers that are also graph inputs are not constants: a caller may feed them.
    """
    if value is None or value.is_graph_input():
        return None
    if value.is_initializer() and value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is None or producer.op_type != "Constant" or producer.domain not in DEFAULT_DOMAINS:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


@dataclasses.dataclass(frozen=True, eq=False)
class DimRef:
    """Element of a shape vector that is dim ``index`` of ``value`` (not statically known)."""

    value: ir.Value
    index: int


Elem = int | DimRef


@dataclasses.dataclass(frozen=True)
class ShapeVector:
    """A 0-D or 1-D integer tensor known element by element."""

    elems: tuple[Elem, ...]
    scalar: bool = False

    @property
    def static(self) -> bool:
        return all(isinstance(e, int) for e in self.elems)


def propagate(node: ir.Node, vectors: dict[ir.Value, ShapeVector]) -> ShapeVector | None:
    """The shape vector of ``node``'s first output, when it can be tracked.

    Args:
        node: The node to look at (default domain).
        vectors: Vectors tracked so far for non-constant values; constants are read directly.
    """
    op = node.op_type
    if op == "Shape":
        elems = _shape_elems(required(node.inputs[0]))
        if elems is None:
            return None
        start_attr, end_attr = node.attributes.get("start"), node.attributes.get("end")
        start = start_attr.as_int() if start_attr is not None else 0
        end = end_attr.as_int() if end_attr is not None else len(elems)
        return ShapeVector(elems[slice(start, end)])
    if op == "Size":
        elems = _shape_elems(required(node.inputs[0]))
        if elems is None or not all(isinstance(e, int) for e in elems):
            return None
        return ShapeVector((math.prod(cast("tuple[int, ...]", elems)),), scalar=True)
    vecs = [_vector_of(v, vectors) for v in node.inputs]
    if not vecs or vecs[0] is None:
        return None
    data = vecs[0]
    if op in {"Identity", "Cast"}:
        to = node.attributes.get("to")
        if to is not None and not ir.DataType(to.as_int()).is_integer():
            return None
        return data
    if op == "Gather":
        return _gather(node, data)
    if op == "Unsqueeze":
        ok = data.scalar and _axes(node, 1) in ([0], [-1])
        return ShapeVector(data.elems) if ok else None
    if op == "Squeeze":
        ok = not data.scalar and len(data.elems) == 1 and _axes(node, 1) in (None, [0], [-1])
        return ShapeVector(data.elems, scalar=True) if ok else None
    if op == "Concat":
        parts = [v for v in vecs if v is not None and not v.scalar]
        if len(parts) != len(vecs):
            return None
        return ShapeVector(tuple(e for v in parts for e in v.elems))
    if op == "Slice":
        return _slice(node, data)
    return None


def resolve_reshape_elems(
    data: ir.Value | None, elems: Sequence[Elem]
) -> tuple[list[int], list[int]]:
    """Replace dim ``i`` of the reshaped tensor at position ``i`` by 0; list what is left.

    Args:
        data: The tensor being reshaped.
        elems: The target shape vector.

    Returns:
        The target with resolved elements as ints (unresolved ones as -1), and the positions
        left unresolved.
    """
    out: list[int] = []
    unresolved: list[int] = []
    shape = data.shape if data is not None else None
    for i, elem in enumerate(elems):
        if isinstance(elem, int):
            out.append(elem)
            continue
        same = elem.value is data
        if not same and shape is not None and i < len(shape) and elem.index == i:
            theirs_shape = elem.value.shape
            assert theirs_shape is not None  # a DimRef is made from a value with a shape
            mine, theirs = shape[i], theirs_shape[elem.index]
            same = isinstance(mine, ir.SymbolicDim) and mine.value is not None and mine == theirs
        if same and elem.index == i:
            out.append(0)
        else:
            out.append(-1)
            unresolved.append(i)
    return out, unresolved


def _int_list(value: ir.Value | None) -> list[int] | None:
    array = constant_array(value)
    if array is None or not np.issubdtype(array.dtype, np.integer):
        return None
    return [int(v) for v in array.reshape(-1)]


def _axes(node: ir.Node, input_index: int) -> list[int] | None:
    """Axes from the ``axes`` attribute (old opsets) or the given input; None if absent."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return list(attr.as_ints())
    if len(node.inputs) > input_index and node.inputs[input_index] is not None:
        return _int_list(node.inputs[input_index])
    return None


def _shape_elems(value: ir.Value) -> tuple[Elem, ...] | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else DimRef(value, i) for i, d in enumerate(value.shape))


def _vector_of(value: ir.Value | None, vectors: dict[ir.Value, ShapeVector]) -> ShapeVector | None:
    if value is None:
        return None
    if value in vectors:
        return vectors[value]
    if value.dtype is not None and not value.dtype.is_integer():
        return None
    if value.shape is not None and (len(value.shape) > 1 or not value.shape.is_static()):
        return None
    array = constant_array(value)
    if array is None or not np.issubdtype(array.dtype, np.integer):
        return None
    if array.ndim > 1 or array.size > _MAX_VECTOR:
        return None
    return ShapeVector(tuple(int(v) for v in array.reshape(-1)), scalar=array.ndim == 0)


def _gather(node: ir.Node, data: ShapeVector) -> ShapeVector | None:
    axis = node.attributes.get("axis")
    if data.scalar or (axis is not None and axis.as_int() not in (0, -1)):
        return None
    indices = constant_array(node.inputs[1])
    if indices is None or indices.ndim > 1:
        return None
    n = len(data.elems)
    picked = []
    for i in indices.reshape(-1).tolist():
        if not -n <= i < n:
            return None
        picked.append(data.elems[i])
    return ShapeVector(tuple(picked), scalar=indices.ndim == 0)


def _slice(node: ir.Node, data: ShapeVector) -> ShapeVector | None:
    if data.scalar or len(node.inputs) < 3:
        return None
    starts, ends = _int_list(node.inputs[1]), _int_list(node.inputs[2])
    axes = _int_list(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else [0]
    steps = _int_list(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else [1]
    if starts is None or ends is None or axes not in ([0], [-1]) or steps is None:
        return None
    if len(starts) != 1 or len(ends) != 1 or len(steps) != 1 or steps[0] == 0:
        return None
    return ShapeVector(data.elems[slice(starts[0], ends[0], steps[0])])
