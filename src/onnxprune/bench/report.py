"""Benchmark reports: versioned JSON, a Markdown table and a PNG plot, written atomically.

JSON cannot hold infinities, so non-finite floats (an SQNR of identical outputs is +inf)
are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"``.

Plots need matplotlib (the optional ``plot`` extra); it is imported only when a plot is
asked for, with the non-interactive Agg backend.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import TYPE_CHECKING, Any

from onnxprune.errors import UsageError
from onnxprune.io.atomic import write_bytes_atomic

if TYPE_CHECKING:
    from onnxprune.bench.api import BenchResult, ModelResult
    from onnxprune.bench.stats import RatioCI

__all__ = [
    "bench_markdown",
    "import_pyplot",
    "plot_bench",
]


def _fmt(value: float | None, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return format(value, spec)


def _fidelity_summary(model: ModelResult) -> tuple[float | None, float | None]:
    """Worst cosine and SQNR over the outputs, or Nones when not compared."""
    if not model.fidelity_to_first:
        return None, None
    cos = [m["cosine"] for m in model.fidelity_to_first.values() if m["cosine"] is not None]
    sqnr = [m["sqnr_db"] for m in model.fidelity_to_first.values() if m["sqnr_db"] is not None]
    return (min(cos) if cos else None), (min(sqnr) if sqnr else None)


def _ratio_text(ratio: RatioCI | None) -> str:
    if ratio is None:
        return "1 (reference)"
    return f"{ratio.ratio:.3f} [{ratio.low:.3f}, {ratio.high:.3f}]"


def bench_markdown(result: BenchResult) -> str:
    """A Markdown report: settings, system and one table row per model."""
    s, sysinfo = result.settings, result.system
    isa = ", ".join(k for k, v in sysinfo.isa.items() if v) or "none detected"
    lines = [
        "# onnxprune bench",
        "",
        f"- CPU: {sysinfo.cpu_model} ({sysinfo.usable_cpus} usable of "
        f"{sysinfo.logical_cpus} logical CPUs); ISA: {isa}",
        f"- GPU: {', '.join(sysinfo.gpus) or 'none'}",
        f"- onnxruntime {sysinfo.onnxruntime}, {s.provider}"
        f"{' ' + json.dumps(s.provider_options) if s.provider_options else ''}, "
        f"{s.graph_optimization}, {s.execution}",
        f"- threads: intra-op {s.intra_op_threads}, inter-op {s.inter_op_threads}; "
        f"warm-up {s.warmup}/model; {s.rounds} interleaved rounds"
        f"{' (shuffled)' if s.shuffle else ''}",
        f"- inputs: {s.input_source}",
        "",
        "| model | median ms | p90 ms | p99 ms | mean ± std ms | samples/s | create ms "
        "| RSS Δ MiB | ratio [95% CI] | paired ratio [95% CI] | cosine | SQNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result.models:
        lat = m.latency_ms
        rss = m.memory.session_rss_delta_bytes
        cos, sqnr = _fidelity_summary(m)
        lines.append(
            f"| {m.label} | {lat.median:.3f} | {lat.p90:.3f} | {lat.p99:.3f} "
            f"| {lat.mean:.3f} ± {lat.std:.3f} | {m.throughput_per_s:.1f} "
            f"| {m.session_create_ms:.0f} | {_fmt(None if rss is None else rss / 2**20, '.1f')} "
            f"| {_ratio_text(m.ratio_to_first)} | {_ratio_text(m.paired_ratio_to_first)} "
            f"| {_fmt(cos, '.6f')} | {_fmt(sqnr, '.1f')} |"
        )
    lines += [
        "",
        "Ratio: median latency / first model's median. Paired ratio: median over rounds of "
        "the per-round ratio. Intervals: bootstrap over paired rounds (see "
        "benchmarks/README.md). Cosine/SQNR: worst output against the first model on the "
        "same feed.",
    ]
    return "\n".join(lines) + "\n"


def import_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a UsageError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "plots need matplotlib: pip install 'onnxprune[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def plot_bench(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """PNG: median latency per model with p10-p90 error bars; plus fidelity vs latency.

    The second panel (worst-output SQNR against the first model versus median latency) is
    drawn when at least one later model was compared. Infinite SQNR (identical outputs) is
    drawn at the top of the axis and labelled.
    """
    plt = import_pyplot()
    models = result.models
    sqnrs = [_fidelity_summary(m)[1] for m in models[1:]]
    with_fidelity = any(v is not None for v in sqnrs)
    fig, axes = plt.subplots(1, 2 if with_fidelity else 1, figsize=(11 if with_fidelity else 6, 4))
    ax = axes[0] if with_fidelity else axes
    medians = [m.latency_ms.median for m in models]
    yerr = [
        [m.latency_ms.median - m.latency_ms.p10 for m in models],
        [m.latency_ms.p90 - m.latency_ms.median for m in models],
    ]
    ax.bar(range(len(models)), medians, yerr=yerr, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(models)), [m.label for m in models], rotation=20, ha="right")
    ax.set_ylabel("latency ms (median, p10-p90)")
    ax.set_title(f"{result.settings.provider}, {result.settings.intra_op_threads} threads")
    if with_fidelity:
        _plot_fidelity(axes[1], models, sqnrs)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def _plot_fidelity(ax: Any, models: list[ModelResult], sqnrs: list[float | None]) -> None:
    finite = [v for v in sqnrs if v is not None and math.isfinite(v)]
    top = (max(finite) + 10) if finite else 100.0
    for model, sqnr in zip(models[1:], sqnrs, strict=True):
        if sqnr is None:
            continue
        y = sqnr if math.isfinite(sqnr) else top
        ax.scatter(model.latency_ms.median, y, color="tab:orange")
        note = "" if math.isfinite(sqnr) else " (identical)"
        ax.annotate(model.label + note, (model.latency_ms.median, y), fontsize=8)
    ax.axvline(models[0].latency_ms.median, color="gray", linestyle="--", label=models[0].label)
    ax.set_xlabel("median latency ms")
    ax.set_ylabel("worst-output SQNR dB vs first model")
    ax.legend(fontsize=8)
