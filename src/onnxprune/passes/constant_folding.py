"""Constant folding: evaluate nodes whose inputs are all constants.

Rewrites, in graph order (one sweep reaches a fixed point because the graph is topologically
sorted, so a folded result is seen by every later consumer):

1. ``Constant`` nodes become initializers of the same name (unless they produce a graph output,
   which stays a ``Constant`` node so the output keeps its name).
2. A node whose inputs are all constants (initializers that are not graph inputs, or
   ``Constant`` outputs) is evaluated in onnxruntime on a one-node model and its outputs become
   initializers named after them. A folded graph output becomes a ``Constant`` node instead.
3. Static shape computations: ``Shape``/``Size`` of a tensor whose shape is statically known
   (after ONNX shape inference), and the shape vectors flowing through
   ``Gather``/``Slice``/``Concat``/``Unsqueeze``/``Squeeze``/``Cast``/``Identity`` are tracked
   element by element; ``Gather(Shape(x), 1)`` folds even when ``x`` has a symbolic batch dim.
4. A ``Reshape`` target still depending on symbolic dims is made constant where the symbolic
   element ``i`` is dim ``i`` of the reshaped tensor itself (``allowzero=0``): it becomes ``0``
   ("copy this dim"). That turns the exporter flatten ``Reshape(x, Concat(Unsqueeze(Gather(
   Shape(x), 0)), [-1]))`` into ``Reshape(x, [0, -1])``; the dead chain is left to dead-node
   removal.

Skipped, with a reason: nondeterministic ops, ops in non-default domains, nodes with subgraphs
(If/Loop/Scan bodies are left alone), results that would blow up the file (see
:class:`FoldConstantsPass`), nodes onnxruntime cannot evaluate, ``Shape``/``Size`` of tensors
with symbolic or unknown dims, and ``Reshape`` targets that cannot be made constant.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import ShapeInferencePass

from onnxprune.passes.base import Pass, PassReport

__all__ = [
    "NONDETERMINISTIC_OPS",
    "FoldConstantsPass",
    "constant_array",
    "infer_shapes",
    "node_label",
]

logger = logging.getLogger(__name__)

NONDETERMINISTIC_OPS = frozenset(
    {
        "Bernoulli",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)
_DEFAULT_DOMAINS = ("", "ai.onnx")
_MAX_VECTOR = 64  # integer constants up to this size take part in shape-vector tracking


def node_label(node: ir.Node) -> str:
    """A readable, stable name for reports: the node name, else ``Op(first output)``."""
    if node.name:
        return node.name
    first = node.outputs[0].name if node.outputs else ""
    return f"{node.op_type}({first})"


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant data, or None when it is not a constant.

    Initializers that are also graph inputs are not constants: a caller may feed them.
    """
    if value is None or value.is_graph_input():
        return None
    if value.is_initializer() and value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if (
        producer is None
        or producer.op_type != "Constant"
        or producer.domain not in _DEFAULT_DOMAINS
    ):
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


@dataclasses.dataclass(frozen=True, eq=False)
class _DimRef:
    """Element of a shape vector that is dim ``index`` of ``value`` (not statically known)."""

    value: ir.Value
    index: int


_Elem = int | _DimRef


@dataclasses.dataclass(frozen=True)
class _Vec:
    """A 0-D or 1-D integer tensor known element by element."""

    elems: tuple[_Elem, ...]
    scalar: bool = False

    @property
    def static(self) -> bool:
        return all(isinstance(e, int) for e in self.elems)


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


def _shape_elems(value: ir.Value) -> tuple[_Elem, ...] | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else _DimRef(value, i) for i, d in enumerate(value.shape))


def _vector_of(value: ir.Value | None, vectors: dict[ir.Value, _Vec]) -> _Vec | None:
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
    return _Vec(tuple(int(v) for v in array.reshape(-1)), scalar=array.ndim == 0)


def _propagate(node: ir.Node, vectors: dict[ir.Value, _Vec]) -> _Vec | None:
    """The shape vector of ``node``'s first output, when it can be tracked."""
    op = node.op_type
    if op == "Shape":
        elems = _shape_elems(node.inputs[0])
        if elems is None:
            return None
        start_attr, end_attr = node.attributes.get("start"), node.attributes.get("end")
        start = start_attr.as_int() if start_attr is not None else 0
        end = end_attr.as_int() if end_attr is not None else len(elems)
        return _Vec(elems[slice(start, end)])
    if op == "Size":
        elems = _shape_elems(node.inputs[0])
        if elems is None or not all(isinstance(e, int) for e in elems):
            return None
        return _Vec((math.prod(elems),), scalar=True)  # type: ignore[arg-type]
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
        return _Vec(data.elems) if data.scalar and _axes(node, 1) in ([0], [-1]) else None
    if op == "Squeeze":
        ok = not data.scalar and len(data.elems) == 1 and _axes(node, 1) in (None, [0], [-1])
        return _Vec(data.elems, scalar=True) if ok else None
    if op == "Concat":
        if any(v is None or v.scalar for v in vecs):
            return None
        return _Vec(tuple(e for v in vecs for e in v.elems))  # type: ignore[union-attr]
    if op == "Slice":
        return _slice(node, data)
    return None


def _gather(node: ir.Node, data: _Vec) -> _Vec | None:
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
    return _Vec(tuple(picked), scalar=indices.ndim == 0)


def _slice(node: ir.Node, data: _Vec) -> _Vec | None:
    if data.scalar or len(node.inputs) < 3:
        return None
    starts, ends = _int_list(node.inputs[1]), _int_list(node.inputs[2])
    axes = _int_list(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else [0]
    steps = _int_list(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else [1]
    if starts is None or ends is None or axes not in ([0], [-1]) or steps is None:
        return None
    if len(starts) != 1 or len(ends) != 1 or len(steps) != 1 or steps[0] == 0:
        return None
    return _Vec(data.elems[slice(starts[0], ends[0], steps[0])])


def _evaluate(node: ir.Node, arrays: Sequence[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Run ``node`` alone in onnxruntime on the given input arrays."""
    proto = ir.serde.serialize_node(node)
    feeds, graph_inputs = {}, []
    for i, array in enumerate(arrays):
        if array is None:
            proto.input[i] = ""
            continue
        name = f"in{i}"
        proto.input[i] = name
        feeds[name] = array
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        graph_inputs.append(onnx.helper.make_tensor_value_info(name, elem_type, array.shape))
    outputs = []
    for i, out in enumerate(node.outputs):
        if out.name:
            proto.output[i] = f"out{i}"
            outputs.append(onnx.helper.make_empty_tensor_value_info(f"out{i}"))
    graph = onnx.helper.make_graph([proto], "fold", graph_inputs, outputs)
    opsets = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(
        graph, opset_imports=opsets, ir_version=onnx.helper.find_min_ir_version_for(opsets)
    )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    return [np.asarray(r) for r in session.run(None, feeds)]


def _estimate_elements(node: ir.Node, arrays: Sequence[np.ndarray | None]) -> int | None:
    """Output element count known before evaluation (for ops that can blow up), else None."""
    shape = node.outputs[0].shape
    if shape is not None and shape.is_static():
        return math.prod(shape.numpy())
    try:
        if node.op_type == "ConstantOfShape" and arrays[0] is not None:
            return math.prod(int(v) for v in arrays[0])
        if node.op_type == "Expand" and arrays[0] is not None and arrays[1] is not None:
            return math.prod(np.broadcast_shapes(arrays[0].shape, tuple(int(v) for v in arrays[1])))
        if node.op_type == "Tile" and arrays[0] is not None and arrays[1] is not None:
            return arrays[0].size * math.prod(int(v) for v in arrays[1])
    except ValueError:
        return None
    return None


class FoldConstantsPass(Pass):
    """Fold constant subexpressions and static shape computations into initializers.

    A result is not folded when it would make the model file bigger for little gain: when it
    has more than ``max_elements`` elements and more bytes than its inputs, or when it has more
    than ``growth_floor_elements`` elements and more than ``max_growth`` times the input bytes
    (a broadcast, ``Expand``, ``Tile`` or ``ConstantOfShape`` materialised).

    Args:
        max_elements: Largest result (elements) that may be bigger than its inputs.
        max_growth: Largest ratio of result bytes to input bytes for non-tiny results.
        growth_floor_elements: Results up to this many elements are never refused for growth.
        infer_shapes: Run ONNX shape inference first (graph output shapes are kept as declared).
    """

    name = "fold-constants"

    def __init__(
        self,
        *,
        max_elements: int = 1_000_000,
        max_growth: float = 2.0,
        growth_floor_elements: int = 4096,
        infer_shapes: bool = True,
    ) -> None:
        self.max_elements = max_elements
        self.max_growth = max_growth
        self.growth_floor_elements = growth_floor_elements
        self.infer_shapes = infer_shapes

    def run(self, model: ir.Model, report: PassReport) -> None:
        if self.infer_shapes:
            infer_shapes(model)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        vectors: dict[ir.Value, _Vec] = {}
        for node in list(model.graph):
            self._visit(node, vectors, opset, report)

    def _visit(
        self, node: ir.Node, vectors: dict[ir.Value, _Vec], opset: int, report: PassReport
    ) -> None:
        label = node_label(node)
        if node.domain not in _DEFAULT_DOMAINS:
            if _all_constant(node):
                report.skip(label, f"op in non-default domain {node.domain!r} is not evaluated")
            return
        if any(a.type in _GRAPH_ATTRS for a in node.attributes.values()):
            report.skip(label, f"{node.op_type} has subgraphs; subgraph bodies are left alone")
            return
        if node.op_type == "Constant":
            self._lift_constant(node, report)
            return
        if _all_constant(node):
            self._fold(node, opset, report)
            return
        if node.op_type == "Reshape":
            self._constant_reshape_target(node, vectors, report)
        vec = _propagate(node, vectors)
        if vec is not None and vec.static:
            dtype = _vector_dtype(node)
            array = np.array([int(e) for e in vec.elems], dtype=dtype.numpy())  # type: ignore[arg-type]
            array = array.reshape(()) if vec.scalar else array
            _replace_outputs(node, [ir.tensor(array)])
            report.change(label, f"folded static shape computation to {array.tolist()}")
        elif vec is not None:
            vectors[node.outputs[0]] = vec
        if node.op_type in {"Shape", "Size"} and (vec is None or not vec.static):
            report.skip(label, _shape_skip_reason(node))

    def _lift_constant(self, node: ir.Node, report: PassReport) -> None:
        label = node_label(node)
        tensor = ir.convenience.get_const_tensor(node.outputs[0])
        if tensor is None:
            report.skip(label, "Constant has no dense value (sparse_value); kept")
        elif node.outputs[0].is_graph_output():
            report.skip(label, "Constant produces a graph output; kept as a node")
        else:
            _replace_outputs(node, [tensor])
            report.change(label, "Constant lifted to initializer")

    def _fold(self, node: ir.Node, opset: int, report: PassReport) -> None:
        label = node_label(node)
        if node.op_type in NONDETERMINISTIC_OPS or _dropout_in_training(node):
            report.skip(label, f"{node.op_type} is nondeterministic")
            return
        arrays = [constant_array(v) for v in node.inputs]
        in_bytes = sum(a.nbytes for a in arrays if a is not None)
        estimate = _estimate_elements(node, arrays)
        if estimate is not None:
            itemsize = node.outputs[0].dtype.itemsize if node.outputs[0].dtype else 4
            reason = self._too_big(estimate, int(estimate * itemsize), in_bytes)
            if reason:
                report.skip(label, reason)
                return
        try:
            results = _evaluate(node, arrays, opset)
        except Exception as exc:  # onnxruntime raises many types; a failed fold is a skip
            logger.debug("cannot evaluate %s", label, exc_info=exc)
            report.skip(label, f"onnxruntime could not evaluate it: {str(exc).splitlines()[0]}")
            return
        total = sum(r.size for r in results)
        reason = self._too_big(total, sum(r.nbytes for r in results), in_bytes)
        if reason:
            report.skip(label, reason)
            return
        _replace_outputs(node, [ir.tensor(r) for r in results])
        shapes = ", ".join(str(list(r.shape)) for r in results)
        report.change(label, f"folded {node.op_type} to constant of shape {shapes}")

    def _too_big(self, elements: int, out_bytes: int, in_bytes: int) -> str | None:
        if elements > self.max_elements and out_bytes > in_bytes:
            return (
                f"result would have {elements} elements (> {self.max_elements}) "
                f"and be bigger than its inputs ({out_bytes} > {in_bytes} bytes)"
            )
        if elements > self.growth_floor_elements and out_bytes > self.max_growth * in_bytes:
            return (
                f"result would grow constants from {in_bytes} to {out_bytes} bytes "
                f"(> {self.max_growth:g}x)"
            )
        return None

    def _constant_reshape_target(
        self, node: ir.Node, vectors: dict[ir.Value, _Vec], report: PassReport
    ) -> None:
        target = node.inputs[1] if len(node.inputs) > 1 else None
        vec = vectors.get(target) if target is not None else None
        if vec is None or vec.static or vec.scalar or target is None:
            return
        label = node_label(node)
        literals = [e for e in vec.elems if isinstance(e, int)]
        allowzero = node.attributes.get("allowzero")
        relax = allowzero is not None and allowzero.as_int() == 1
        if relax and 0 in literals:
            # A literal 0 means "zero" under allowzero=1, so the 0 copy cannot be used.
            report.skip(label, "allowzero=1 and the target has a literal 0; not made constant")
            return
        elems, unresolved = _resolve_reshape_elems(node.inputs[0], vec.elems)
        if len(unresolved) == 1 and -1 not in literals:
            unresolved.pop()  # the single unknown element is what -1 infers
        if unresolved:
            ref = vec.elems[unresolved[0]]
            assert isinstance(ref, _DimRef)
            report.skip(
                label,
                f"target element {unresolved[0]} is symbolic dim {ref.index} of "
                f"{ref.value.name!r}; not made constant",
            )
            return
        array = np.array(elems, dtype=np.int64)
        graph = node.graph
        assert graph is not None
        value = ir.Value(
            name=_unique_name(graph, f"{target.name}_const"),
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.INT64),
            const_value=ir.tensor(array),
        )
        graph.register_initializer(value)
        node.replace_input_with(1, value)
        what = f"Reshape target made constant {elems} (symbolic dims copied by 0)"
        if relax:
            # Without a literal 0 in the original target allowzero=1 changed nothing; the new
            # target relies on the 0 copy, so allowzero must be 0.
            node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
            what += "; allowzero=1 set to 0 (the target had no literal 0)"
        report.change(label, what)


_GRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def _all_constant(node: ir.Node) -> bool:
    return all(v is None or constant_array(v) is not None for v in node.inputs)


def _dropout_in_training(node: ir.Node) -> bool:
    if node.op_type != "Dropout" or len(node.inputs) < 3 or node.inputs[2] is None:
        return False
    mode = constant_array(node.inputs[2])
    return mode is None or bool(mode)


def _vector_dtype(node: ir.Node) -> ir.DataType:
    to = node.attributes.get("to")
    if node.op_type == "Cast" and to is not None:
        return ir.DataType(to.as_int())
    return node.outputs[0].dtype or ir.DataType.INT64


def _shape_skip_reason(node: ir.Node) -> str:
    source = node.inputs[0]
    if source is None or source.shape is None:
        return f"shape of {source.name if source else ''!r} is unknown; not constant"
    symbolic = [i for i, d in enumerate(source.shape) if not isinstance(d, int)]
    return f"{source.name!r} has symbolic dims at {symbolic}; {node.op_type} is not constant"


def _resolve_reshape_elems(
    data: ir.Value | None, elems: Sequence[_Elem]
) -> tuple[list[int], list[int]]:
    """Replace dim ``i`` of the reshaped tensor at position ``i`` by 0; list what is left."""
    out: list[int] = []
    unresolved: list[int] = []
    shape = data.shape if data is not None else None
    for i, elem in enumerate(elems):
        if isinstance(elem, int):
            out.append(elem)
            continue
        same = elem.value is data
        if not same and shape is not None and i < len(shape) and elem.index == i:
            mine, theirs = shape[i], elem.value.shape[elem.index]  # type: ignore[index]
            same = isinstance(mine, ir.SymbolicDim) and mine.value is not None and mine == theirs
        if same and elem.index == i:
            out.append(0)
        else:
            out.append(-1)
            unresolved.append(i)
    return out, unresolved


def _unique_name(graph: ir.Graph, base: str) -> str:
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    taken |= {v.name for n in graph for v in n.outputs}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _replace_outputs(node: ir.Node, tensors: Sequence[ir.TensorProtocol]) -> None:
    """Replace ``node`` by constants: initializers, or a Constant node for graph outputs."""
    graph = node.graph
    assert graph is not None
    renames: list[tuple[ir.Value, str]] = []
    for out, tensor in zip(node.outputs, tensors, strict=False):
        if out.is_graph_output():
            name = node.name or f"{out.name}_const"
            const = ir.Node("", "Constant", [], [ir.AttrTensor("value", tensor)], name=name)
            new = const.outputs[0]
            out_name, out.name = out.name, None
            new.name, new.shape, new.type = out_name, out.shape, out.type
            graph.insert_before(node, const)
            ir.convenience.replace_all_uses_with(out, new, replace_graph_outputs=True)
            continue
        if not out.uses():
            continue
        new = ir.Value(
            shape=ir.Shape(tensor.shape),
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
        ir.convenience.replace_all_uses_with(out, new)
        renames.append((new, out.name or ""))
    graph.remove(node, safe=True)
    for new, name in renames:
        new.name = name
        graph.register_initializer(new)


def infer_shapes(model: ir.Model) -> None:
    """ONNX shape inference on intermediate values; graph outputs keep their declared types."""
    kept = [(v, v.shape, v.type) for v in model.graph.outputs]
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    for value, shape, type_ in kept:
        value.shape, value.type = shape, type_
