"""Default sizes for the symbolic dims of a model's inputs, when the user gives none.

Polygraphy's rule, made safe for channels:

* the leading axis of an input is a batch axis: its symbolic dim defaults to 1;
* any other symbolic dim is *derived* from the graph where a consumer of the input fixes
  it (a Conv's input channels from its weight, a MatMul/Gemm reduction axis from its
  weight, a normalization's channels from its scale, a broadcast against a constant);
* the rest (sequence length, image height and width) get no default: callers refuse or
  flag them, naming the dim, instead of silently binding a channel or feature axis to 1.

Once the inputs are bound, every other shape of the graph follows from shape inference
(:func:`onnxprune.analysis.shapes.infer_shapes`). Only weight *shapes* are read, never
weight bytes. :func:`dims_notice` is the one-line notice commands print about the defaults
they used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

__all__ = [
    "BATCH_SOURCE",
    "DimDefault",
    "dim_key",
    "dims_notice",
    "feed_dims",
    "input_dim_defaults",
]


#: ``DimDefault.source`` of a leading-axis (batch) default.
BATCH_SOURCE = "leading (batch) axis"


@dataclasses.dataclass(frozen=True)
class DimDefault:
    """A default for one symbolic dim: its value and where it comes from."""

    value: int
    source: str

    @property
    def is_batch(self) -> bool:
        """True for the leading-axis default (1), as opposed to a derived size."""
        return self.source == BATCH_SOURCE


#: Ops whose first output has the shape of their first input (followed when deriving).
_SAME_SHAPE = frozenset(
    {
        "Identity", "Cast", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu",
        "Gelu", "HardSigmoid", "HardSwish", "Softplus", "Neg", "Abs", "Sqrt", "Exp", "Erf",
        "Dropout", "Softmax", "LogSoftmax",
    }
)  # fmt: skip
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu"})


def dim_key(input_name: str, axis: int, dim: str | None) -> str:
    """How a symbolic dim is named: its name, or ``"input[axis]"`` for an unnamed one."""
    return dim if dim not in (None, "", "?") else f"{input_name}[{axis}]"


def input_dim_defaults(model: ir.Model) -> dict[str, DimDefault]:
    """Defaults for the symbolic dims of ``model``'s graph inputs, keyed by :func:`dim_key`.

    A dim on the leading axis of any input is a batch dim (1); another one gets the size a
    consumer's weight fixes, else no entry.
    """
    initializers = set(model.graph.initializers)
    inputs = [v for v in model.graph.inputs if v.name not in initializers and v.shape]
    defaults: dict[str, DimDefault] = {}
    for value in inputs:
        shape = value.shape
        assert shape  # ``inputs`` keeps only values with a non-empty shape
        first = shape[0]
        if not isinstance(first, int):
            defaults[dim_key(str(value.name), 0, first.value)] = DimDefault(1, BATCH_SOURCE)
    for value in inputs:
        for axis, dim in enumerate(value.shape or ()):
            key = dim_key(str(value.name), axis, None if isinstance(dim, int) else dim.value)
            if axis == 0 or isinstance(dim, int) or key in defaults:
                continue
            derived = _derive(value, axis, len(value.shape or ()), set())
            if derived is not None:
                defaults[key] = derived
    return defaults


def feed_dims(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, int]:
    """Sizes of the graph inputs' symbolic dims as the feeds give them (keys: :func:`dim_key`).

    The leading (batch) axis is left unbound (it defaults to 1). A dim whose size differs
    between feeds (sequence length) gets the median size, rounded down; a dim no feed holds
    is left out. Costs counted with these dims are those of the data the model is pruned
    for, not of the exporter's annotations.
    """
    sizes: dict[str, list[int]] = {}
    initializers = set(model.graph.initializers)
    for value in model.graph.inputs:
        if value.name in initializers or value.shape is None:
            continue
        for axis, dim in enumerate(value.shape):
            if axis == 0 or isinstance(dim, int):
                continue
            key = dim_key(str(value.name), axis, dim.value)
            for feed in feeds:
                array = feed.get(str(value.name))
                if array is not None and np.ndim(array) == len(value.shape):
                    sizes.setdefault(key, []).append(int(np.shape(array)[axis]))
    return {key: int(np.sort(found)[(len(found) - 1) // 2]) for key, found in sizes.items()}


def dims_notice(used: Mapping[str, DimDefault], unresolved: Iterable[str] = ()) -> str | None:
    """The one-line notice about defaulted (and, for inspect, assumed) dims, or ``None``."""
    parts = [f"{key}={d.value} ({d.source})" for key, d in used.items()]
    parts += [f"{key}=1 (assumed: nothing in the graph fixes it)" for key in unresolved]
    if not parts:
        return None
    return "symbolic dims not given, using " + ", ".join(parts) + "; set them with --dim NAME=SIZE"


def _const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """Static shape of a constant (initializer) input, else ``None``."""
    if value is None or value.const_value is None:
        return None
    return tuple(int(d) for d in value.const_value.shape.numpy())


def _label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def _derive(value: ir.Value, axis: int, rank: int, seen: set[int]) -> DimDefault | None:
    """The size a consumer of ``value`` (followed through same-shape ops) fixes for ``axis``."""
    if id(value) in seen:
        return None
    seen.add(id(value))
    for node, index in value.uses():
        if node.op_type in _SAME_SHAPE and index == 0 and node.outputs:
            found = _derive(node.outputs[0], axis, rank, seen)
        else:
            rule = _RULES.get(node.op_type)
            found = rule(node, index, axis, rank) if rule else None
        if found is not None:
            return found
    return None


def _conv(node: ir.Node, index: int, axis: int, rank: int) -> DimDefault | None:
    w = _const_shape(node.inputs[1] if len(node.inputs) > 1 else None)
    if index != 0 or axis != 1 or w is None or len(w) < 3:
        return None
    group = node.attributes.get_int("group", 1)
    channels = w[0] if node.op_type == "ConvTranspose" else w[1] * group
    return DimDefault(channels, f"input channels of {_label(node)}")


def _norm(node: ir.Node, index: int, axis: int, rank: int) -> DimDefault | None:
    scale = _const_shape(node.inputs[1] if len(node.inputs) > 1 else None)
    if index != 0 or axis != 1 or scale is None or len(scale) != 1:
        return None
    return DimDefault(scale[0], f"channels of {_label(node)}")


def _layer_norm(node: ir.Node, index: int, axis: int, rank: int) -> DimDefault | None:
    scale = _const_shape(node.inputs[1] if len(node.inputs) > 1 else None)
    start = node.attributes.get_int("axis", -1) % rank
    if index != 0 or scale is None or axis < start or len(scale) != rank - start:
        return None
    return DimDefault(scale[axis - start], f"normalized axis of {_label(node)}")


def _matmul(node: ir.Node, index: int, axis: int, rank: int) -> DimDefault | None:
    other = _const_shape(node.inputs[1 - index] if len(node.inputs) == 2 else None)
    if other is None or rank < 1:
        return None
    if index == 0 and axis == rank - 1:
        size = other[0] if len(other) == 1 else other[-2] if len(other) >= 2 else None
    elif index == 1 and rank >= 2 and axis == rank - 2 and len(other) >= 1:
        size = other[-1]
    else:
        size = None
    return None if size is None else DimDefault(size, f"reduction axis of {_label(node)}")


def _gemm(node: ir.Node, index: int, axis: int, rank: int) -> DimDefault | None:
    b = _const_shape(node.inputs[1] if len(node.inputs) > 1 else None)
    if index != 0 or rank != 2 or b is None or len(b) != 2:
        return None
    k_axis = 0 if node.attributes.get_int("transA", 0) else 1
    if axis != k_axis:
        return None
    size = b[1] if node.attributes.get_int("transB", 0) else b[0]
    return DimDefault(size, f"reduction axis of {_label(node)}")


def _broadcast(node: ir.Node, index: int, axis: int, rank: int) -> DimDefault | None:
    if len(node.inputs) != 2 or index > 1:
        return None
    other = _const_shape(node.inputs[1 - index])
    offset = axis - (rank - len(other)) if other is not None else -1
    if other is None or offset < 0 or other[offset] <= 1:
        return None
    return DimDefault(other[offset], f"broadcast against a constant in {_label(node)}")


_Rule = Callable[[ir.Node, int, int, int], DimDefault | None]
_RULES: dict[str, _Rule] = {
    "Conv": _conv,
    "ConvTranspose": _conv,
    "BatchNormalization": _norm,
    "InstanceNormalization": _norm,
    "LayerNormalization": _layer_norm,
    "MatMul": _matmul,
    "Gemm": _gemm,
    **dict.fromkeys(_BINARY, _broadcast),
}
