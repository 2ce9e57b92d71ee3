"""Per-layer latency probe: is the factored chain actually faster than the dense layer here?

Fewer MACs do not always mean less time (two small GEMMs, or a 1x1 -> kxk -> 1x1 conv chain,
have more overhead and worse cache use than one big op). The probe builds two standalone
one-layer models at the layer's real input shape, runs them interleaved in onnxruntime
(graph optimizations on, fixed threads, deterministic input) and compares medians of
``time.perf_counter_ns`` (:func:`time_models`, shared by linear and conv layers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxprune.runtime import make_session

__all__ = [
    "SPEEDUP_MARGIN",
    "ConvLatencyProbe",
    "LatencyProbe",
    "conv_probe_models",
    "measure_conv",
    "measure_linear",
    "time_models",
]

#: ``(m, n, rank, rows) -> (dense_ms, factored_ms)``.
LatencyProbe = Callable[[int, int, int, int], tuple[float, float]]
#: ``(dense model, factored model) -> (dense_ms, factored_ms)``; both take input ``x``.
ConvLatencyProbe = Callable[[onnx.ModelProto, onnx.ModelProto], tuple[float, float]]
#: A conv rewrite is kept only when measured at least this much faster (a 5% margin covers
#: timing noise; a tie keeps the original, which is exact).
SPEEDUP_MARGIN = 0.05


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
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def time_models(
    models: Sequence[onnx.ModelProto],
    feed: dict[str, np.ndarray],
    *,
    threads: int = 1,
    repeats: int = 30,
    budget_s: float = 0.0,
) -> list[float]:
    """Median ms of each model on ``feed``: one warm-up run each, then interleaved runs.

    Runs ``repeats`` rounds, or more (up to 10x) while the rounds so far took less than
    ``budget_s`` seconds in all, so that very fast layers get enough samples.
    """
    sessions = [make_session(m, optimize=True, intra_op_threads=threads) for m in models]
    for sess in sessions:  # warm-up
        sess.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    total_ns = 0
    rounds = 0
    while rounds < repeats or (total_ns < budget_s * 1e9 and rounds < 10 * repeats):
        for index, sess in enumerate(sessions):
            start = time.perf_counter_ns()
            sess.run(None, feed)
            elapsed = time.perf_counter_ns() - start
            times[index].append(elapsed / 1e6)
            total_ns += elapsed
        rounds += 1
    return [float(np.median(t)) for t in times]


def measure_linear(
    m: int, n: int, rank: int, rows: int, *, threads: int = 1, repeats: int = 30
) -> tuple[float, float]:
    """Median ms of ``[rows, m] @ [m, n]`` and of ``@ [m, rank] @ [rank, n]``, interleaved."""
    models = [_chain_model(m, n, r, rows) for r in (None, rank)]
    feed = {"x": np.random.default_rng(1).standard_normal((rows, m)).astype(np.float32)}
    dense, factored = time_models(models, feed, threads=threads, repeats=repeats)
    return dense, factored


def _conv_model(
    x_shape: Sequence[int], convs: Sequence[tuple[np.ndarray, dict]], bias: np.ndarray | None
) -> onnx.ModelProto:
    """``x -> Conv -> ... -> y``; ``convs`` are ``(weight, attributes)``, bias on the last."""
    inits, nodes, current = [], [], "x"
    dtype = onnx.helper.np_dtype_to_tensor_dtype(convs[0][0].dtype)
    for index, (w, attrs) in enumerate(convs):
        names = [current, f"w{index}"]
        inits.append(onnx.numpy_helper.from_array(w, f"w{index}"))
        if index == len(convs) - 1 and bias is not None:
            inits.append(onnx.numpy_helper.from_array(bias, "b"))
            names.append("b")
        out = "y" if index == len(convs) - 1 else f"h{index}"
        kernel: dict[str, Any] = {"kernel_shape": list(w.shape[2:])}
        nodes.append(helper.make_node("Conv", names, [out], **kernel, **attrs))
        current = out
    graph = helper.make_graph(
        nodes,
        "conv_probe",
        [helper.make_tensor_value_info("x", dtype, list(x_shape))],
        [helper.make_tensor_value_info("y", dtype, None)],
        inits,
    )
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def conv_probe_models(
    dense: tuple[np.ndarray, dict],
    factored: Sequence[tuple[np.ndarray, dict]],
    bias: np.ndarray | None,
    x_shape: Sequence[int],
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Standalone models of one conv and of its factored chain, input ``x`` of ``x_shape``.

    ``dense`` and each ``factored`` entry are ``(weight, attributes)`` with the layer's real
    weights (the timing does not depend on them, but the models then compute the layer).
    """
    return _conv_model(x_shape, [dense], bias), _conv_model(x_shape, factored, bias)


def measure_conv(
    dense: onnx.ModelProto,
    factored: onnx.ModelProto,
    *,
    threads: int = 1,
    repeats: int = 20,
    budget_s: float = 0.2,
) -> tuple[float, float]:
    """Median ms of the two models of :func:`conv_probe_models`, interleaved."""
    dims = dense.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value for d in dims]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(dense.graph.input[0].type.tensor_type.elem_type)
    feed = {"x": np.random.default_rng(1).standard_normal(shape).astype(dtype)}
    dense_ms, factored_ms = time_models(
        [dense, factored], feed, threads=threads, repeats=repeats, budget_s=budget_s
    )
    return dense_ms, factored_ms
