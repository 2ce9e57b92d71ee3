"""Store sparse weights compactly in standard ONNX, reconstructed exactly at session load.

Measured on onnxruntime 1.31 (``benchmarks/sparsity.py`` repeats it, see
:func:`compare_formats`):

* ``sparse_initializer`` (``SparseTensorProto``) loads in onnxruntime, but the ONNX standard
  requires int64 indices: 8 index bytes + 4 value bytes per nonzero float32, i.e. *larger*
  than dense below ~67 % sparsity (int32 indices load in ORT but fail ``onnx.checker``).
  onnx-ir also cannot represent it.
* **bitmask** (chosen): a weight ``w`` with ``n`` elements of which ``z`` are kept is stored
  as ``bits = packbits(keep)`` (``ceil(n/8)`` bytes, most significant bit first) and
  ``values = w[keep] ++ [0]`` (``z + 1`` elements). Size ``n/8 + 4z`` bytes for float32:
  53 % of dense at 50 % sparsity, including 2:4. Reconstruction, opset >= 11 only::

      b    = BitShift_right(BitShift_left(Reshape(bits, [-1, 1]), [0..7]), 7)   # uint8
      keep = Cast<bool>(Slice(Reshape(b, [-1]), 0, n))
      rank = CumSum(Cast<int32>(keep), exclusive=1)     # rank of each kept entry
      w    = Reshape(Gather(values, Where(keep, rank, z)), shape)   # values[z] = +0.0

  Every op only moves bits, so ``w`` equals the masked dense weight bit for bit (``keep``
  is "bits not all zero", so a kept ``-0.0`` survives; a float ``Where`` would not: ORT's
  turns ``-0.0`` into ``+0.0``, hence the selection on int32 slots). With onnxruntime's
  default graph optimizations the subgraph is constant-folded at session load; with
  optimizations off it runs at every inference (same values; MatMul may then skip weight
  pre-packing, which can change float rounding against a pre-packed dense weight).

A weight is stored as bitmask only when that is smaller than dense.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.errors import BudgetError
from onnxprune.io.pinned import copy_model, inline_proto
from onnxprune.passes._match import const_numpy
from onnxprune.runtime import make_session

__all__ = [
    "MIN_OPSET",
    "StoredWeight",
    "bitmask_bytes",
    "check_exact",
    "compare_formats",
    "store_bitmask",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 11
_PREFIX = "onnxprune.sparse"


@dataclasses.dataclass(frozen=True)
class StoredWeight:
    """How one weight was stored: ``format`` is ``bitmask`` or ``dense`` (with the reason)."""

    weight: str
    format: str
    dense_bytes: int
    stored_bytes: int
    reason: str = ""


def bitmask_bytes(size: int, kept: int, itemsize: int) -> int:
    """Bytes of the bitmask form: ``ceil(size / 8) + (kept + 1) * itemsize``."""
    return math.ceil(size / 8) + (kept + 1) * itemsize


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _reconstruction(graph: ir.Graph, weight: ir.Value, keep: np.ndarray) -> list[ir.Node]:
    """Nodes computing ``weight`` from new ``bits``/``values`` initializers."""
    array = const_numpy(weight)
    name = str(weight.name)
    bits = _const(graph, f"{name}.bits", np.packbits(keep.ravel()))
    values = _const(
        graph, f"{name}.values", np.append(array.ravel()[keep.ravel()], 0).astype(array.dtype)
    )
    shifts = _const(graph, f"{_PREFIX}.shifts", np.arange(8, dtype=np.uint8))
    seven = _const(graph, f"{_PREFIX}.seven", np.array(7, dtype=np.uint8))
    column = _const(graph, f"{_PREFIX}.column", np.array([-1, 1], dtype=np.int64))
    flat = _const(graph, f"{_PREFIX}.flat", np.array([-1], dtype=np.int64))
    zero_i = _const(graph, f"{_PREFIX}.zero_i64", np.array([0], dtype=np.int64))
    axis = _const(graph, f"{_PREFIX}.axis0", np.array(0, dtype=np.int32))
    size = _const(graph, f"{name}.size", np.array([array.size], dtype=np.int64))
    shape = _const(graph, f"{name}.shape", np.array(array.shape, dtype=np.int64))
    pad = _const(graph, f"{name}.pad", np.array(int(keep.sum()), dtype=np.int32))

    def node(op: str, inputs: Sequence[ir.Value], step: str, **attrs: Any) -> ir.Node:
        out = ir.Value(name=f"{name}.{step}")
        return ir.node(op, list(inputs), attrs, outputs=[out], name=f"{name}/unpack/{step}")

    n1 = node("Reshape", [bits, column], "col")
    n2 = node("BitShift", [n1.outputs[0], shifts], "shl", direction="LEFT")
    n3 = node("BitShift", [n2.outputs[0], seven], "shr", direction="RIGHT")
    n4 = node("Reshape", [n3.outputs[0], flat], "flat")
    n5 = node("Slice", [n4.outputs[0], zero_i, size], "trim")
    n6 = node("Cast", [n5.outputs[0]], "keep", to=ir.DataType.BOOL)
    n7 = node("Cast", [n6.outputs[0]], "keep_i32", to=ir.DataType.INT32)
    n8 = node("CumSum", [n7.outputs[0], axis], "index", exclusive=1)
    n9 = node("Where", [n6.outputs[0], n8.outputs[0], pad], "slot")
    n10 = node("Gather", [values, n9.outputs[0]], "dense", axis=0)
    n11 = node("Reshape", [n10.outputs[0], shape], "weight")
    return [n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11]


def store_bitmask(model: ir.Model, weights: Sequence[str]) -> list[StoredWeight]:
    """Replace each named (already masked) initializer by its bitmask form when smaller.

    The reconstructed value keeps the weight's name, so the graph reads as before.
    """
    graph = model.graph
    opset = model.opset_imports.get("", 0)
    records = []
    for name in weights:
        value = graph.initializers[name]
        array = const_numpy(value)
        keep = array.reshape(-1).view(f"u{array.itemsize}") != 0
        dense = int(array.nbytes)
        packed = bitmask_bytes(array.size, int(keep.sum()), array.itemsize)
        if opset < MIN_OPSET:
            records.append(StoredWeight(name, "dense", dense, dense, f"opset {opset} < 11"))
            continue
        if packed >= dense:
            records.append(StoredWeight(name, "dense", dense, dense, "bitmask not smaller"))
            continue
        nodes = _reconstruction(graph, value, keep)
        first_user = min((use.node for use in value.uses()), key=lambda n: list(graph).index(n))
        graph.insert_before(first_user, nodes)
        value.replace_all_uses_with(nodes[-1].outputs[0])
        graph.initializers.pop(name)
        nodes[-1].outputs[0].name = name
        records.append(StoredWeight(name, "bitmask", dense, packed))
    return records


def _run_all(
    model: Any, feeds: Sequence[Mapping[str, np.ndarray]], optimize: bool, extra: Sequence[str] = ()
) -> list[list[np.ndarray]]:
    if extra:
        proto = inline_proto(model) if isinstance(model, ir.Model) else model
        proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra)
        model = proto
    session = make_session(model, optimize=optimize)
    return [session.run(None, dict(feed)) for feed in feeds]


def check_exact(
    masked: ir.Model,
    stored: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[str],
) -> float:
    """Assert the stored model equals the masked dense model exactly; returns 0.0.

    Checks (1) every reconstructed weight equals the masked initializer bit for bit
    (optimizations off, so the subgraph really runs) and (2) outputs are identical with
    onnxruntime's default optimizations (the subgraph folded at load).

    Raises:
        BudgetError: naming the first weight or output that differs.
    """
    got = _run_all(stored, feeds[:1], optimize=False, extra=weights)[0]
    n_out = len(got) - len(weights)
    for name, array in zip(weights, got[n_out:], strict=True):
        want = const_numpy(masked.graph.initializers[name])
        if array.tobytes() != np.ascontiguousarray(want).tobytes():
            raise BudgetError(f"stored weight {name!r} does not reconstruct exactly")
    ref = _run_all(masked, feeds, optimize=True)
    out = _run_all(stored, feeds, optimize=True)
    for i, (a, b) in enumerate(zip(ref, out, strict=True)):
        for j, (x, y) in enumerate(zip(a, b, strict=True)):
            if x.shape != y.shape or x.tobytes() != y.tobytes():
                raise BudgetError(f"stored model output {j} differs on feed {i}")
    return 0.0


def _sparse_initializer_proto(model: ir.Model, weights: Sequence[str]) -> onnx.ModelProto:
    """The masked model with ``weights`` as standard ``sparse_initializer`` (int64 indices)."""
    proto = inline_proto(model)
    proto.ir_version = min(proto.ir_version, 10)
    dense = {t.name: t for t in proto.graph.initializer}
    for name in weights:
        array = onnx.numpy_helper.to_array(dense[name])
        index = np.flatnonzero(array.ravel())
        values = onnx.numpy_helper.from_array(array.ravel()[index], name)
        sparse = onnx.helper.make_sparse_tensor(
            values, onnx.numpy_helper.from_array(index.astype(np.int64), ""), array.shape
        )
        proto.graph.sparse_initializer.append(sparse)
        proto.graph.initializer.remove(dense[name])
    return proto


def _load_seconds(data: bytes, optimize: bool, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter_ns()
        make_session(onnx.load_from_string(data), optimize=optimize)
        best = min(best, (time.perf_counter_ns() - start) / 1e9)
    return best


def compare_formats(
    masked: ir.Model, weights: Sequence[str], *, repeat: int = 3
) -> dict[str, dict[str, Any]]:
    """Serialized size and best-of-``repeat`` session-load time of each storage format.

    Returns ``{format: {"bytes", "load_s_optimized", "load_s_unoptimized", "loads"}}``
    for ``dense``, ``sparse_initializer`` and ``bitmask``; ``loads`` is False with an
    ``error`` when onnxruntime refuses the file.
    """
    stored = copy_model(masked)
    store_bitmask(stored, weights)
    forms = {
        "dense": inline_proto(masked).SerializeToString(),
        "sparse_initializer": _sparse_initializer_proto(masked, weights).SerializeToString(),
        "bitmask": inline_proto(stored).SerializeToString(),
    }
    result: dict[str, dict[str, Any]] = {}
    for form, data in forms.items():
        entry: dict[str, Any] = {"bytes": len(data), "loads": True}
        try:
            entry["load_s_optimized"] = _load_seconds(data, True, repeat)
            entry["load_s_unoptimized"] = _load_seconds(data, False, repeat)
        except Exception as exc:
            entry.update(loads=False, error=str(exc).splitlines()[0][:200])
        result[form] = entry
    return result
