"""Fidelity and placement analysis of a quantized model.

* :func:`compare_outputs`: run the float and the quantized model on the same feeds and compute
  :func:`onnxprune.metrics.output_metrics` per output over all feeds together (rows of the
  last axis are concatenated, so varying token lengths work).
* :func:`layer_sqnr`: SQNR ``10 log10(sum x^2 / sum (x_q - x)^2)`` of every quantized node's
  output (the quantized model keeps the float names), worst first.
* :func:`int8_mac_share`: onnxruntime writes the graph it actually runs
  (``SessionOptions.optimized_model_filepath``); a Conv/ConvTranspose/Gemm/MatMul counts as
  int8 when its quantized weight (``W_quantized``) feeds an integer kernel there (QLinearConv,
  QGemm, MatMulIntegerToFloat, ...), or, for activation x activation MatMuls, when an integer
  kernel carries its node name (onnxruntime keeps it, adding ``_token_N`` suffixes).
  The share is ``int8 MACs / all Conv+Gemm+MatMul MACs``; the same optimized graph is
  searched for float islands between int8 kernels (:mod:`onnxprune.quant.islands`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.analysis import count_costs
from onnxprune.intermediates import iter_intermediates
from onnxprune.metrics import output_metrics, rows
from onnxprune.quant.islands import find_islands
from onnxprune.quant.placement import PRIMARY_OPS
from onnxprune.quant.prepare import INT8_OPS
from onnxprune.runtime import make_session

__all__ = [
    "INT8_OPS",
    "compare_outputs",
    "converted_mac_share",
    "int8_mac_share",
    "is_collapsed",
    "layer_sqnr",
    "reference_outputs",
]


def _rows(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    return rows(a) if a.ndim >= 2 else a.reshape(-1, 1)


def reference_outputs(
    model: str | Path | ir.Model,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    optimize: bool = True,
    threads: int = 0,
) -> dict[str, list[np.ndarray]]:
    """``{output: [rows per feed]}`` of ``model``, computed once and compared many times."""
    session = make_session(model, optimize=optimize, intra_op_threads=threads)
    names = [o.name for o in session.get_outputs()]
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name, r in zip(names, session.run(names, dict(feed)), strict=True):
            collected[name].append(_rows(r))
    return collected


def compare_outputs(
    reference: str | Path | ir.Model | Mapping[str, list[np.ndarray]],
    candidate: str | Path | ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    optimize: bool = True,
    threads: int = 0,
) -> dict[str, dict[str, float | None]]:
    """Metrics per output of ``candidate`` against ``reference`` over all ``feeds``.

    ``reference`` is a model or the result of :func:`reference_outputs` on the same feeds.
    """
    if not isinstance(reference, Mapping):
        reference = reference_outputs(reference, feeds, optimize=optimize, threads=threads)
    cand = make_session(candidate, optimize=optimize, intra_op_threads=threads)
    names = list(reference)
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name, c in zip(names, cand.run(names, dict(feed)), strict=True):
            collected[name].append(_rows(c))
    result = {}
    for name in names:
        r = np.concatenate(reference[name][: len(collected[name])])
        c = np.concatenate(collected[name])
        metrics: dict[str, float | None] = dict(output_metrics(r, c))
        metrics["constant_output"] = float(bool(c.size > 1 and np.all(c == c.flat[0])))
        metrics["reference_constant"] = float(bool(r.size > 1 and np.all(r == r.flat[0])))
        result[name] = metrics
    return result


def is_collapsed(metrics: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """Reasons an output collapsed: SQNR < 0 dB, NaN, or constant where the reference is not."""
    reasons = []
    for name, m in metrics.items():
        sqnr = m.get("sqnr_db")
        if sqnr is None or math.isnan(sqnr) or sqnr < 0:
            reasons.append(f"output {name!r}: SQNR {sqnr} dB < 0 (quantization noise > signal)")
        if m.get("constant_output") and not m.get("reference_constant"):
            reasons.append(f"output {name!r} is constant over all feeds")
    return reasons


def layer_sqnr(
    reference: ir.Model,
    candidate: ir.Model,
    names: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
) -> dict[str, float]:
    """``{tensor: SQNR dB}`` of the candidate's tensors against the reference's, worst first."""
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    ref_iter = iter_intermediates(reference, names, feeds)
    cand_iter = iter_intermediates(candidate, names, feeds)
    for ref_vals, cand_vals in zip(ref_iter, cand_iter, strict=True):
        for name in names:
            r = ref_vals[name].astype(np.float64)
            c = cand_vals[name].astype(np.float64)
            finite = np.isfinite(r) & np.isfinite(c)
            signal[name] += float(np.sum(r[finite] ** 2))
            noise[name] += float(np.sum((c[finite] - r[finite]) ** 2))
    result = {}
    for name in names:
        if noise[name] == 0:
            result[name] = math.inf
        elif signal[name] == 0:
            result[name] = -math.inf
        else:
            result[name] = 10 * math.log10(signal[name] / noise[name])
    return dict(sorted(result.items(), key=lambda kv: kv[1]))


def _runs_int8(node: ir.Node, int8_inputs: set[str], int8_names: Sequence[str]) -> bool:
    """The node's quantized weight feeds an integer kernel, or one is named after it."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    producer = weight.producer() if weight is not None else None
    if producer is not None and producer.op_type == "DequantizeLinear":
        source = producer.inputs[0]
        if source is not None and source.name in int8_inputs:
            return True
    name = node.name or ""
    return bool(name) and any(n == name or n.startswith(name + "_") for n in int8_names)


def int8_mac_share(
    quantized: ir.Model, *, dims: Mapping[str, int] | None = None, threads: int = 1
) -> dict[str, object]:
    """Share of Conv/Gemm/MatMul MACs onnxruntime runs in integer kernels (see module doc)."""
    costs = {c.name: c.macs or 0 for c in count_costs(quantized, dims=dims).nodes}
    with tempfile.TemporaryDirectory(prefix="onnxprune-ortopt-") as folder:
        optimized = Path(folder) / "optimized.onnx"
        make_session(
            quantized, optimize=True, intra_op_threads=threads, optimized_model_path=str(optimized)
        )
        proto = onnx.load(str(optimized), load_external_data=False)
    int8_inputs = {i for n in proto.graph.node if n.op_type in INT8_OPS for i in n.input}
    int8_names = [n.name for n in proto.graph.node if n.op_type in INT8_OPS]
    int8_macs, total = 0, 0
    float_nodes: list[dict[str, str | int]] = []
    for node in quantized.graph:
        if node.op_type not in PRIMARY_OPS:
            continue
        macs = costs.get(node.name or "", 0)
        total += macs
        if _runs_int8(node, int8_inputs, int8_names):
            int8_macs += macs
        else:
            float_nodes.append({"node": node.name or "", "op_type": node.op_type, "macs": macs})
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    integer_ops = {*INT8_OPS, *(op for op in counts if op.startswith("QLinear"))}
    return {
        "islands": find_islands(proto, sorted(integer_ops)),
        "int8_mac_share": int8_macs / total if total else 0.0,
        "int8_macs": int8_macs,
        "total_macs": total,
        "float_nodes": sorted(float_nodes, key=lambda d: -int(d["macs"]))[:10],
        "optimized_op_counts": dict(sorted(counts.items())),
    }


def converted_mac_share(
    reference: ir.Model, nodes: Sequence[str], *, dims: Mapping[str, int] | None = None
) -> dict[str, object]:
    """Share of the float model's Conv/Gemm/MatMul MACs in ``nodes`` (rewritten to integer
    ops by construction, as in dynamic mode where the float node no longer exists)."""
    chosen = set(nodes)
    costs = [c for c in count_costs(reference, dims=dims).nodes if c.op_type in PRIMARY_OPS]
    total = sum(c.macs or 0 for c in costs)
    int8 = sum(c.macs or 0 for c in costs if c.name in chosen)
    return {
        "int8_mac_share": int8 / total if total else 0.0,
        "int8_macs": int8,
        "total_macs": total,
    }
