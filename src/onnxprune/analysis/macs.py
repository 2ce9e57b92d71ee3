"""Per-node multiply-accumulate (MAC) and parameter counts.

Convention (the textbook one, as in the ResNet and MobileNet papers):

* 1 MAC = one multiply followed by one add. FLOPs are roughly ``2 * MACs``.
* Counted: ``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul`` (batched and broadcast,
  so attention's ``Q @ K^T`` and ``attn @ V`` count), two-operand ``Einsum``, and their
  integer / QLinear forms (``ConvInteger``, ``QLinearConv``, ``MatMulInteger``,
  ``QLinearMatMul``).
* Not counted (0 MACs by convention): bias adds, BatchNormalization, activations, pooling,
  normalisation, elementwise ops and data movement.
* Formulas, with shapes after symbolic dims are bound::

      Conv           N * C_out * prod(out_spatial) * (C_in / group) * prod(kernel)
      ConvTranspose  N * C_in * prod(in_spatial) * (C_out / group) * prod(kernel)
      Gemm           M * K * N                        (transA / transB respected)
      MatMul         prod(broadcast batch dims) * M * K * N
      Einsum         product of the sizes of all distinct indices (two operands)

* Heavy ops whose cost is not modelled (RNNs, fused attention, control flow, model-local
  function calls, ops of non-standard domains) are *uncounted*, with a reason, never
  guessed. So is a counted op whose input shapes are unknown.

Parameters of a node are the elements of its initializer inputs, except integer index or
shape tensors (``int32``/``int64``: Reshape targets, axes, indices). The model total is the
number of elements of all initializers, each counted once even when shared.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import onnx_ir as ir

from onnxprune.analysis.dims import dim_key, input_dim_defaults
from onnxprune.analysis.shapes import infer_shapes, shape_tuple

__all__ = [
    "ModelCost",
    "NodeCost",
    "conv_output_spatial",
    "count_costs",
    "node_params",
    "total_params",
]

logger = logging.getLogger(__name__)

_INDEX_DTYPES = frozenset({ir.DataType.INT32, ir.DataType.INT64})

#: Ops with real arithmetic whose cost this module does not model.
_NOT_MODELLED = frozenset({"LSTM", "GRU", "RNN", "Attention"})
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """Cost of one node of the main graph.

    Attributes:
        index: Position of the node in the graph (topological order).
        name: Node name, or ``"<op_type>#<index>"`` when the node has none.
        op_type: The node's op type (``domain::op`` outside the default domain).
        macs: Multiply-accumulates, or ``None`` when uncounted.
        params: Elements of the node's weight initializers.
        output_shape: Shape of the first output as inferred with the bound dims.
        reason: Why the node is uncounted; ``None`` when counted.
    """

    index: int
    name: str
    op_type: str
    macs: int | None
    params: int
    output_shape: tuple[int | str | None, ...] | None
    reason: str | None = None


@dataclasses.dataclass
class ModelCost:
    """Costs of all nodes of a model's main graph.

    Attributes:
        nodes: One entry per node, in graph order.
        total_macs: Sum of the counted nodes' MACs.
        total_params: Elements of all initializers, shared ones counted once.
        dims: Symbolic dims the caller bound, name -> value.
        assumed_dims: Symbolic or unknown dims that were not bound and were assumed,
            name (or ``"value[axis]"`` for an unnamed dim) -> assumed value.
        dim_sources: For the assumed dims of graph inputs, where the value comes from
            (:mod:`onnxprune.analysis.dims`: a leading batch axis, a size a consumer's
            weight fixes, or ``None`` when nothing in the graph fixes it).
    """

    nodes: list[NodeCost]
    total_macs: int
    total_params: int
    dims: dict[str, int]
    assumed_dims: dict[str, int]
    dim_sources: dict[str, str | None] = dataclasses.field(default_factory=dict)

    @property
    def uncounted(self) -> list[NodeCost]:
        """Nodes whose MACs could not be counted."""
        return [n for n in self.nodes if n.macs is None]


def total_params(model: ir.Model) -> int:
    """Elements of all initializers of all graphs, each initializer counted once."""
    seen: set[int] = set()
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if id(value) in seen:
                continue
            seen.add(id(value))
            total += _num_elements(value)
    return total


def node_params(node: ir.Node) -> int:
    """Elements of the initializer inputs of ``node`` that are weights (not index tensors)."""
    total = 0
    for value in node.inputs:
        if value is None or not value.is_initializer():
            continue
        dtype = value.const_value.dtype if value.const_value is not None else value.dtype
        if dtype in _INDEX_DTYPES:
            continue
        total += _num_elements(value)
    return total


def count_costs(
    model: ir.Model,
    *,
    dims: Mapping[str, int] | None = None,
    default_dim: int = 1,
) -> ModelCost:
    """Count MACs and parameters of every node of ``model``'s main graph.

    Shapes are inferred on a copy with the symbolic dims of the graph inputs bound: first
    from ``dims``, then to the size a consumer's weight fixes
    (:func:`~onnxprune.analysis.dims.input_dim_defaults`), the rest to ``default_dim``
    (all recorded in ``assumed_dims``, with their source in ``dim_sources``). The caller's
    model is not modified and no weight bytes are read.

    Args:
        model: The model.
        dims: Values for symbolic dims, e.g. ``{"batch": 1, "seq": 128}``.
        default_dim: Value assumed for symbolic or unknown dims not in ``dims``.

    Returns:
        Per-node costs, totals and the dims that were bound or assumed.
    """
    bound = {k: int(v) for k, v in (dims or {}).items()}
    sources: dict[str, str | None] = {}
    assumed, overrides = _bind_inputs(model, bound, default_dim, sources)
    inferred = infer_shapes(model, overrides, dims={**bound, **assumed})
    resolver = _DimResolver({**bound, **assumed}, default_dim, assumed)
    functions = {(f.domain, f.name, f.overload) for f in model.functions.values()}
    nodes = [
        _node_cost(index, node, resolver, functions) for index, node in enumerate(inferred.graph)
    ]
    total = sum(n.macs for n in nodes if n.macs is not None)
    logger.debug("counted %d nodes, %d MACs", len(nodes), total)
    return ModelCost(
        nodes=nodes,
        total_macs=total,
        total_params=total_params(model),
        dims=bound,
        assumed_dims=dict(assumed),
        dim_sources=sources,
    )


def _bind_inputs(
    model: ir.Model, bound: Mapping[str, int], default_dim: int, sources: dict[str, str | None]
) -> tuple[dict[str, int], dict[str, list[int | str]]]:
    """Assume sizes for the graph inputs' symbolic dims that are not bound.

    A leading (batch) dim gets ``default_dim``; another one the size a consumer's weight
    fixes, else ``default_dim``; ``sources`` receives where each came from. Returns the
    assumed dims and shape overrides for inputs with unnamed dims, which are recorded as
    ``"input[axis]"``.
    """
    defaults = input_dim_defaults(model)
    assumed: dict[str, int] = {}
    overrides: dict[str, list[int | str]] = {}
    for value in model.graph.inputs:
        shape: list[int | str] = []
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, int):
                shape.append(dim)
                continue
            key = dim_key(str(value.name), axis, dim.value)
            if key not in bound and key not in assumed:
                known = defaults.get(key)
                derived = known is not None and not known.is_batch
                assumed[key] = known.value if known is not None and derived else default_dim
                sources[key] = known.source if known is not None else None
            size = bound[key] if key in bound else assumed[key]
            shape.append(dim.value if dim.value is not None else size)
        if value.shape is not None and any(d is None for d in shape_tuple(value.shape) or ()):
            overrides[str(value.name)] = shape
    return assumed, overrides


def _node_cost(
    index: int,
    node: ir.Node,
    resolver: _DimResolver,
    functions: set[tuple[str, str, str]],
) -> NodeCost:
    macs: int | None
    reason: str | None = None
    try:
        macs = _node_macs(node, resolver, functions)
    except _UncountedError as error:
        macs, reason = None, str(error)
    op_type = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
    output = node.outputs[0] if node.outputs else None
    return NodeCost(
        index=index,
        name=node.name or f"<{node.op_type}#{index}>",
        op_type=op_type,
        macs=macs,
        params=node_params(node),
        output_shape=shape_tuple(output.shape) if output is not None else None,
        reason=reason,
    )


def _node_macs(node: ir.Node, resolver: _DimResolver, functions: set[tuple[str, str, str]]) -> int:
    """MACs of one node; raises ``_UncountedError`` where the cost is not known."""
    if (node.domain, node.op_type, node.overload) in functions:
        raise _UncountedError(f"call to model-local function {node.domain}::{node.op_type}")
    if node.domain not in ("", "ai.onnx"):
        raise _UncountedError(f"op of domain {node.domain!r} is not modelled")
    if node.op_type in _CONTROL_FLOW:
        raise _UncountedError(f"control flow: {node.op_type} subgraphs are not counted")
    if node.op_type in _NOT_MODELLED:
        raise _UncountedError(f"MACs of {node.op_type} are not modelled")
    handler = _HANDLERS.get(node.op_type)
    if handler is None:
        return 0
    return handler(node, resolver)


def _num_elements(value: ir.Value) -> int:
    tensor = value.const_value
    if tensor is not None:
        return int(math.prod(tensor.shape.numpy()))
    if value.shape is not None and all(isinstance(d, int) for d in value.shape):
        return int(math.prod(value.shape.numpy()))
    return 0


class _UncountedError(Exception):
    """A node's MACs cannot be counted; the message is the reason."""


class _DimResolver:
    """Turns value shapes into ints: bound dims first, else assume ``default`` and record it."""

    def __init__(self, bound: Mapping[str, int], default: int, assumed: dict[str, int]) -> None:
        self._bound = bound
        self._default = default
        self._assumed = assumed

    def input(self, node: ir.Node, index: int) -> tuple[int, ...]:
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None:
            raise _UncountedError(f"input {index} is missing")
        return self.resolve(value)

    def output(self, node: ir.Node) -> tuple[int, ...] | None:
        """Resolved shape of the first output, or ``None`` if its shape is unknown."""
        try:
            return self.resolve(node.outputs[0])
        except _UncountedError:
            return None

    def resolve(self, value: ir.Value) -> tuple[int, ...]:
        if value.shape is None:
            raise _UncountedError(f"shape of {value.name!r} is unknown")
        dims = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                dims.append(dim)
                continue
            key = dim.value if dim.value is not None else f"{value.name}[{axis}]"
            if key in self._bound:
                dims.append(self._bound[key])
            else:
                dims.append(self._assumed.setdefault(key, self._default))
        return tuple(dims)


def conv_output_spatial(
    in_spatial: Sequence[int],
    kernel: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    auto_pad: str = "NOTSET",
) -> tuple[int, ...]:
    """Spatial output size of a Conv, as the ONNX spec defines it.

    Args:
        in_spatial: Input spatial dims (without N, C).
        kernel: Kernel spatial dims.
        strides: Per-axis strides (default 1).
        pads: ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]`` (default 0).
        dilations: Per-axis dilations (default 1).
        auto_pad: ``NOTSET``, ``SAME_UPPER``, ``SAME_LOWER`` or ``VALID``.
    """
    rank = len(in_spatial)
    strides = strides or [1] * rank
    dilations = dilations or [1] * rank
    pads = pads or [0] * (2 * rank)
    out = []
    for axis in range(rank):
        extent = dilations[axis] * (kernel[axis] - 1) + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-in_spatial[axis] // strides[axis]))
        elif auto_pad == "VALID":
            out.append((in_spatial[axis] - extent) // strides[axis] + 1)
        else:
            padded = in_spatial[axis] + pads[axis] + pads[axis + rank]
            out.append((padded - extent) // strides[axis] + 1)
    return tuple(out)


def _conv_macs(node: ir.Node, res: _DimResolver, x_index: int, w_index: int) -> int:
    w = res.input(node, w_index)
    if len(w) < 3:
        raise _UncountedError(f"weight rank {len(w)} < 3")
    y = res.output(node)
    if y is None or len(y) != len(w):
        # Inference gave no output shape: compute it from the attributes.
        x = res.input(node, x_index)
        attrs = node.attributes
        spatial = conv_output_spatial(
            x[2:],
            attrs.get_ints("kernel_shape") or w[2:],
            strides=attrs.get_ints("strides"),
            pads=attrs.get_ints("pads"),
            dilations=attrs.get_ints("dilations"),
            auto_pad=attrs.get_string("auto_pad", "NOTSET"),
        )
        y = (x[0], w[0], *spatial)
    # prod(y) = N * C_out * prod(out_spatial); prod(w[1:]) = (C_in / group) * prod(kernel)
    return math.prod(y) * math.prod(w[1:])


def _conv_transpose_macs(node: ir.Node, res: _DimResolver, x_index: int, w_index: int) -> int:
    x = res.input(node, x_index)
    w = res.input(node, w_index)
    if len(w) < 3:
        raise _UncountedError(f"weight rank {len(w)} < 3")
    # Every input pixel scatters a (C_out / group) x kernel block: W is [C_in, C_out/g, k...].
    return math.prod(x) * math.prod(w[1:])


def _gemm_macs(node: ir.Node, res: _DimResolver, a_index: int, b_index: int) -> int:
    a = res.input(node, a_index)
    b = res.input(node, b_index)
    if len(a) != 2 or len(b) != 2:
        raise _UncountedError(f"Gemm operands of rank {len(a)} and {len(b)}")
    trans_a = node.attributes.get_int("transA", 0)
    trans_b = node.attributes.get_int("transB", 0)
    m, k = (a[1], a[0]) if trans_a else a
    n = b[0] if trans_b else b[1]
    return m * k * n


def _broadcast(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """Numpy broadcast of two shapes; raises ``_UncountedError`` if they are incompatible."""
    rank = max(len(a), len(b))
    a = (1,) * (rank - len(a)) + tuple(a)
    b = (1,) * (rank - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and 1 not in (x, y):
            raise _UncountedError(f"shapes {a} and {b} do not broadcast")
        out.append(max(x, y) if 0 not in (x, y) else 0)
    return tuple(out)


def _matmul_macs(node: ir.Node, res: _DimResolver, a_index: int, b_index: int) -> int:
    a = res.input(node, a_index)
    b = res.input(node, b_index)
    if not a or not b:
        raise _UncountedError("MatMul of a scalar")
    a = (1, *a) if len(a) == 1 else a  # numpy promotion of 1-D operands
    b = (*b, 1) if len(b) == 1 else b
    batch = _broadcast(a[:-2], b[:-2])
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


def _einsum_macs(node: ir.Node, res: _DimResolver) -> int:
    equation = node.attributes.get_string("equation", "").replace(" ", "")
    operands = equation.partition("->")[0].split(",")
    if len(operands) == 1:
        return 0  # transpose / reduction / trace: no multiplies
    if len(operands) != 2 or len(node.inputs) != 2:
        raise _UncountedError(f"Einsum with {len(operands)} operands is not modelled")
    sizes: dict[str, int] = {}
    batch: tuple[int, ...] = ()
    for index, letters in enumerate(operands):
        shape = res.input(node, index)
        before, ellipsis, after = letters.partition("...")
        if len(before) + len(after) > len(shape):
            raise _UncountedError(f"Einsum operand {index} has rank {len(shape)} < {letters!r}")
        tail = len(shape) - len(after)
        if ellipsis:
            batch = _broadcast(batch, shape[len(before) : tail])
        for letter, dim in zip(before + after, shape[: len(before)] + shape[tail:], strict=True):
            sizes[letter] = max(sizes.get(letter, 1), dim)
    # Each output element needs prod(contracted sizes) MACs: prod of all index sizes.
    return math.prod(sizes.values()) * math.prod(batch)


def _by_index(func: Callable[..., int], *indices: int) -> Callable[[ir.Node, _DimResolver], int]:
    """Adapt a handler that takes (node, resolver, *input indices)."""

    def handler(node: ir.Node, resolver: _DimResolver) -> int:
        return func(node, resolver, *indices)

    return handler


_HANDLERS: Mapping[str, Callable[[ir.Node, _DimResolver], int]] = {
    "Conv": _by_index(_conv_macs, 0, 1),
    "ConvInteger": _by_index(_conv_macs, 0, 1),
    "QLinearConv": _by_index(_conv_macs, 0, 3),
    "ConvTranspose": _by_index(_conv_transpose_macs, 0, 1),
    "Gemm": _by_index(_gemm_macs, 0, 1),
    "MatMul": _by_index(_matmul_macs, 0, 1),
    "MatMulInteger": _by_index(_matmul_macs, 0, 1),
    "QLinearMatMul": _by_index(_matmul_macs, 0, 3),
    "Einsum": _einsum_macs,
}
