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
   element by element (:mod:`onnxprune.passes._shape_vectors`); ``Gather(Shape(x), 1)`` folds
   even when ``x`` has a symbolic batch dim.
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

import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxprune.passes._match import fresh_name
from onnxprune.passes._match import label as node_label
from onnxprune.passes._shape_vectors import (
    DEFAULT_DOMAINS,
    DimRef,
    ShapeVector,
    constant_array,
    propagate,
    resolve_reshape_elems,
)
from onnxprune.passes.base import Pass, PassReport
from onnxprune.runtime import make_session

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
    session = make_session(model)
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
        vectors: dict[ir.Value, ShapeVector] = {}
        for node in list(model.graph):
            self._visit(node, vectors, opset, report)

    def _visit(
        self, node: ir.Node, vectors: dict[ir.Value, ShapeVector], opset: int, report: PassReport
    ) -> None:
        label = node_label(node)
        if node.domain not in DEFAULT_DOMAINS:
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
        vec = propagate(node, vectors)
        if vec is not None and vec.static:
            dtype = _vector_dtype(node)
            ints = [int(e) for e in vec.elems if isinstance(e, int)]  # all of them: static
            array = np.array(ints, dtype=dtype.numpy())
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
        self, node: ir.Node, vectors: dict[ir.Value, ShapeVector], report: PassReport
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
        elems, unresolved = resolve_reshape_elems(node.inputs[0], vec.elems)
        if len(unresolved) == 1 and -1 not in literals:
            unresolved.pop()  # the single unknown element is what -1 infers
        if unresolved:
            ref = vec.elems[unresolved[0]]
            assert isinstance(ref, DimRef)
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
            name=fresh_name(graph, f"{target.name}_const"),
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
            shape=ir.Shape(tensor.shape.numpy()),
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
