"""Small shared helpers for pattern-matching passes on ``onnx_ir`` graphs.

Everything here is graph plumbing with no op-specific math: reading constants, asking who
consumes a value, writing a rewritten constant back, and replacing a value while keeping
the graph's output names stable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    from onnx_ir._core import Usage  # not re-exported by onnx_ir; for annotations only

__all__ = [
    "add_initializer",
    "attr",
    "channel_vector",
    "const_array",
    "const_array_of",
    "const_numpy",
    "const_shape",
    "drop_if_unused",
    "exclusive_const_reason",
    "fresh_name",
    "input_rank",
    "is_private_to",
    "known_shape",
    "label",
    "name_of",
    "opset_version",
    "replace_value",
    "required",
    "scalar_const",
    "sole_consumer",
    "uses_of",
    "write_const_input",
]


def opset_version(model: ir.Model, domain: str = "") -> int:
    """The model's opset version for ``domain`` (0 when the domain is not imported)."""
    return model.opset_imports.get(domain, 0)


def label(node: ir.Node) -> str:
    """A readable name for reports: the node name, else ``op_type(first output)``."""
    if node.name:
        return node.name
    first = node.outputs[0].name if node.outputs else None
    return f"{node.op_type}({first})"


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """The Python value of attribute ``name`` of ``node``, or ``default`` when absent.

    Typed ``Any`` like ``ir.Attr.value``: the type depends on the attribute (int, float,
    ints, a tensor...) and callers convert it with ``int()``, ``float()``, ``list()``.
    """
    attribute = node.attributes.get(name)
    if attribute is None:
        return default
    return attribute.value


def name_of(value: ir.Value | None) -> str:
    """The name of a value the caller knows is present: a required input or an output.

    Typed helper for onnx_ir's ``Value | None`` inputs and ``str | None`` names: a graph
    names every value that joins it, and a required input is never missing from a valid
    node, so either failing is a bug (it used to fail as ``None.name`` or later on).
    """
    assert value is not None, "required input is missing"
    assert value.name is not None, "graph value has no name"
    return value.name


def required(value: ir.Value | None) -> ir.Value:
    """A node input the op requires (never missing from a valid node), typed as present."""
    assert value is not None, "required input is missing"
    return value


def const_numpy(value: ir.Value | None) -> np.ndarray:
    """The initializer content of a value the caller knows is a constant initializer.

    Typed form of ``value.const_value.numpy()`` for callers that checked (or whose pattern
    guarantees) that the value is present and constant.
    """
    assert value is not None, "required input is missing"
    assert value.const_value is not None, f"{value.name!r} is not a constant"
    return value.const_value.numpy()


def const_shape(value: ir.Value | None) -> tuple[int, ...]:
    """The (static) shape of a value the caller knows is a constant initializer."""
    assert value is not None, "required input is missing"
    assert value.const_value is not None, f"{value.name!r} is not a constant"
    return tuple(value.const_value.shape.numpy())


def uses_of(value: ir.Value) -> Sequence[Usage]:
    """``value.uses()`` as the indexable tuple onnx_ir returns (typed ``Collection`` there)."""
    return tuple(value.uses())


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant content of ``value`` as numpy, or None when it is not a constant.

    Initializers and ``Constant`` outputs count as constants; an initializer that is also a
    graph input can be overridden at run time and therefore does not.
    """
    if value is None or value.is_graph_input():
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    if tensor is None:
        return None
    return tensor.numpy()


def const_array_of(value: ir.Value | None) -> np.ndarray:
    """:func:`const_array` of a value the caller has already found to be constant."""
    array = const_array(value)
    assert array is not None, "value is not a constant"
    return array


def scalar_const(value: ir.Value | None) -> float | None:
    """The constant as a Python float when it holds exactly one element, else None."""
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def sole_consumer(value: ir.Value) -> ir.Node | None:
    """The one node that uses ``value`` (once), if it has exactly one use and is not an output."""
    uses = uses_of(value)
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def is_private_to(value: ir.Value, node: ir.Node) -> bool:
    """True when ``node`` is the only user of ``value`` and ``value`` is not a graph output."""
    if value.is_graph_output():
        return False
    return all(use.node is node for use in value.uses())


def exclusive_const_reason(value: ir.Value | None, node: ir.Node, role: str) -> str | None:
    """Why the constant input ``value`` of ``node`` cannot be rewritten in place, or None.

    Args:
        value: The input (weight, bias) the caller wants to change.
        node: The node whose input it is.
        role: Word used in the reason ("weight", "bias").
    """
    if value is None:
        return None
    if const_array(value) is None:
        return f"{role} {value.name!r} is not a constant initializer"
    if not is_private_to(value, node):
        return f"{role} {value.name!r} is shared with another node"
    return None


def fresh_name(graph: ir.Graph, base: str) -> str:
    """``base`` itself, or ``base_1``, ``base_2``... whichever is not yet a value name."""
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        taken.update(out.name for out in node.outputs)
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer with a fresh name derived from ``base``."""
    name = fresh_name(graph, base)
    tensor = ir.tensor(np.asarray(array, order="C"), name=name)  # keeps 0-d arrays 0-d
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def write_const_input(
    graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, base: str
) -> None:
    """Make input ``index`` of ``node`` hold ``array``.

    An initializer used only by ``node`` is updated in place (its name is kept); anything else
    (a ``Constant`` output, a missing optional input) becomes a new initializer named from
    ``base``. The caller has checked exclusivity with :func:`exclusive_const_reason`.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    if old is not None and old.is_initializer() and is_private_to(old, node):
        tensor = ir.tensor(np.asarray(array, order="C"), name=old.name)
        old.const_value = tensor
        old.shape = ir.Shape(array.shape)
        old.type = ir.TensorType(tensor.dtype)
        return
    new = add_initializer(graph, base, array)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)
    if old is not None:
        drop_if_unused(graph, old)


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove an initializer or ``Constant`` node whose value nobody uses any more."""
    if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    name = value.name
    if value.is_initializer() and name is not None and name in graph.initializers:
        graph.initializers.pop(name)
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.graph is graph:
        graph.remove(producer, safe=True)


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Redirect every use of ``old`` (graph outputs included) to ``new``; ``new`` takes the name.

    ``new`` must be private to the rewrite (its old consumers are being removed), so giving it
    ``old``'s name keeps downstream and graph-output names stable.
    """
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name = name
    if old.shape is not None:
        new.shape = old.shape
    if old.type is not None:
        new.type = old.type


def channel_vector(
    const: np.ndarray, rank: int | None, axis: int, channels: int
) -> tuple[np.ndarray | None, str | None]:
    """Reduce a constant that broadcasts against a rank-``rank`` tensor to a ``(channels,)`` vector.

    Returns ``(vector, None)`` or ``(None, reason)``. ``axis`` is negative (from the end).
    """
    if rank is None and const.ndim > 1:
        return None, f"constant of shape {list(const.shape)} against an output of unknown rank"
    rank = max(const.ndim, -axis) if rank is None else rank
    if const.ndim > rank:
        return None, f"constant of shape {list(const.shape)} would raise the rank above {rank}"
    shape = (1,) * (rank - const.ndim) + const.shape
    if any(d != 1 for ax, d in enumerate(shape) if ax != rank + axis):
        return None, f"constant of shape {list(const.shape)} varies along a non-channel axis"
    if shape[axis] not in (1, channels):
        return None, f"constant of shape {list(const.shape)} does not match {channels} channels"
    return np.broadcast_to(const.astype(np.float64).reshape(-1), (channels,)).copy(), None


def known_shape(value: ir.Value, depth: int = 8) -> list[int | ir.SymbolicDim] | None:
    """The shape of ``value``: annotated, or propagated through elementwise ops with a constant.

    Exporters often annotate graph inputs only; this follows ``x (op) c`` chains back to a
    value whose shape is known, so a chain such as ``x * s + t`` can be checked.
    """
    if value.shape is not None:
        return list(value.shape)
    node = value.producer()
    if depth == 0 or node is None or node.op_type not in ("Add", "Sub", "Mul", "Div"):
        return None
    if node.domain != "" or len(node.inputs) != 2:
        return None
    a, b = node.inputs[0], node.inputs[1]
    if a is None or b is None:
        return None
    x, c = (b, const_array(a)) if const_array(a) is not None else (a, const_array(b))
    x_shape = known_shape(x, depth - 1)
    if c is None or x_shape is None or c.ndim > len(x_shape):
        return None
    tail = x_shape[len(x_shape) - c.ndim :]
    if any(d not in (1, dim) for d, dim in zip(c.shape, tail, strict=True)):
        return None  # broadcasting changes the shape; not worth following
    return x_shape


def input_rank(x: ir.Value, const: np.ndarray) -> tuple[int | None, str | None]:
    """Rank of ``x`` when ``x (op) const`` keeps the shape of ``x``; else a reason."""
    if const.ndim == 0:
        return None, None
    dims = known_shape(x)
    if dims is None:
        return None, "input shape is unknown: cannot rule out broadcasting by the constant"
    if const.ndim <= len(dims):
        for dim, c in zip(dims[len(dims) - const.ndim :], const.shape, strict=True):
            if c not in (1, dim):
                return None, f"constant of shape {list(const.shape)} broadcasts the input {dims}"
    return len(dims), None
