"""Per-layer latency probe: is ``x @ A @ B`` actually faster than ``x @ W`` here?

Fewer MACs do not always mean less time (two small GEMMs have more overhead and worse
cache use than one). The probe builds two one-layer models at the layer's real row count,
runs them interleaved in onnxruntime (graph optimizations on, fixed threads) and compares
medians of ``time.perf_counter_ns``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from onnxprune.runtime import make_session

__all__ = ["LatencyProbe", "measure_linear"]

#: ``(m, n, rank, rows) -> (dense_ms, factored_ms)``.
LatencyProbe = Callable[[int, int, int, int], tuple[float, float]]


def _chain_model(m: int, n: int, rank: int | None, rows: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    shapes = [(m, n)] if rank is None else [(m, rank), (rank, n)]
    inits, nodes, current = [], [], "x"
    for index, shape in enumerate(shapes):
        name = f"w{index}"
        inits.append(
            onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        )
        out = "y" if index == len(shapes) - 1 else f"h{index}"
        nodes.append(helper.make_node("MatMul", [current, name], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [rows, m])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [rows, n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def measure_linear(
    m: int, n: int, rank: int, rows: int, *, threads: int = 1, repeats: int = 30
) -> tuple[float, float]:
    """Median ms of ``[rows, m] @ [m, n]`` and of ``@ [m, rank] @ [rank, n]``, interleaved."""
    sessions = [
        make_session(_chain_model(m, n, r, rows), optimize=True, intra_op_threads=threads)
        for r in (None, rank)
    ]
    feed = {"x": np.random.default_rng(1).standard_normal((rows, m)).astype(np.float32)}
    times: list[list[float]] = [[], []]
    for sess in sessions:  # warm-up
        sess.run(None, feed)
    for _ in range(repeats):
        for index, sess in enumerate(sessions):
            start = time.perf_counter_ns()
            sess.run(None, feed)
            times[index].append((time.perf_counter_ns() - start) / 1e6)
    return float(np.median(times[0])), float(np.median(times[1]))
