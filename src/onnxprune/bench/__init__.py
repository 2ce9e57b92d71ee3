"""Latency benchmarking: interleaved runs, bootstrap ratio intervals, reports.

Public API: :func:`benchmark` returning a :class:`BenchResult`; reports via
:func:`bench_markdown`, :func:`plot_bench` and ``BenchResult.to_dict()`` (schema
``onnxprune.bench/1``).
"""

from onnxprune.bench.api import BENCH_SCHEMA, BenchResult, BenchSettings, ModelResult, benchmark
from onnxprune.bench.report import bench_markdown, plot_bench
from onnxprune.bench.stats import (
    LatencyStats,
    RatioCI,
    latency_stats,
    median_ratio_ci,
    paired_ratio_ci,
)
from onnxprune.bench.system import SystemInfo, system_info

__all__ = [
    "BENCH_SCHEMA",
    "BenchResult",
    "BenchSettings",
    "LatencyStats",
    "ModelResult",
    "RatioCI",
    "SystemInfo",
    "bench_markdown",
    "benchmark",
    "latency_stats",
    "median_ratio_ci",
    "paired_ratio_ci",
    "plot_bench",
    "system_info",
]
