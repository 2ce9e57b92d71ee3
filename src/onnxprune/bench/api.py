"""``onnxprune.benchmark``: interleaved latency benchmark of one or more models.

The first model is the reference: every later model gets its latency ratio
``median_i / median_0`` with a paired bootstrap 95% interval, and, when it runs on the same
feed and has the same outputs, its fidelity to the reference (:mod:`onnxprune.metrics`) on
that feed, so speed and accuracy of variants can be plotted together.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxprune.analysis.dims import DimDefault, dims_notice, input_dim_defaults
from onnxprune.bench.inputs import bench_feed, samples_per_run
from onnxprune.bench.runner import MemoryStats, Prepared, Runner, measure, prepare
from onnxprune.bench.stats import (
    BOOTSTRAP_METHOD,
    PAIRED_METHOD,
    LatencyStats,
    RatioCI,
    latency_stats,
    median_ratio_ci,
    paired_ratio_ci,
)
from onnxprune.bench.system import SystemInfo, system_info, usable_cpus
from onnxprune.calib import load_calibration, model_input_specs
from onnxprune.errors import UsageError
from onnxprune.fidelity import metrics_of
from onnxprune.io import load
from onnxprune.runtime import resolve_provider

__all__ = ["BENCH_SCHEMA", "BenchResult", "BenchSettings", "ModelResult", "benchmark"]

BENCH_SCHEMA = "onnxprune.bench/1"
_DEFAULT_RUNS = 100


@dataclasses.dataclass
class ModelResult:
    """Measurements of one model (latencies in ms, throughput in samples/s)."""

    path: str
    label: str
    inputs: dict[str, dict[str, Any]]
    samples_per_run: int
    session_create_ms: float
    latency_ms: LatencyStats
    throughput_per_s: float
    memory: MemoryStats
    ratio_to_first: RatioCI | None
    paired_ratio_to_first: RatioCI | None
    fidelity_to_first: dict[str, dict[str, float | None]] | None
    fidelity_note: str | None
    latencies_ms: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "label": self.label,
            "inputs": self.inputs,
            "samples_per_run": self.samples_per_run,
            "session_create_ms": self.session_create_ms,
            "latency_ms": self.latency_ms.to_dict(),
            "throughput_per_s": self.throughput_per_s,
            "memory": self.memory.to_dict(),
            "ratio_to_first": None
            if self.ratio_to_first is None
            else self.ratio_to_first.to_dict(),
            "paired_ratio_to_first": None
            if self.paired_ratio_to_first is None
            else self.paired_ratio_to_first.to_dict(),
            "fidelity_to_first": self.fidelity_to_first,
            "fidelity_note": self.fidelity_note,
            "latencies_ms": self.latencies_ms,
        }


@dataclasses.dataclass
class BenchSettings:
    """How the benchmark ran."""

    provider: str
    provider_options: dict[str, Any]
    execution: str
    graph_optimization: str
    intra_op_threads: int
    inter_op_threads: int
    warmup: int
    runs: int | None
    seconds: float | None
    rounds: int
    batch: int | None
    input_source: str
    seed: int
    shuffle: bool
    block: int = 1
    #: Symbolic input dims the user did not give and their defaults: name -> value, source.
    default_dims: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dims_notice(self) -> str | None:
        """The one-line notice about :attr:`default_dims`, or ``None``."""
        used = {
            k: DimDefault(int(d["value"]), str(d["source"])) for k, d in self.default_dims.items()
        }
        return dims_notice(used)


@dataclasses.dataclass
class BenchResult:
    """Everything :func:`benchmark` measured; ``to_dict`` is the ``onnxprune.bench/1`` JSON."""

    models: list[ModelResult]
    settings: BenchSettings
    system: SystemInfo

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": BENCH_SCHEMA,
            "method": {
                "timer": "time.perf_counter_ns around one run call",
                "interleaving": (
                    f"rounds of {self.settings.block} consecutive run(s) per model (a block's "
                    "median is the round's latency), order "
                    + ("shuffled per round (seeded)" if self.settings.shuffle else "fixed")
                ),
                "ratio": "median_i / median_0 (first model is the reference)",
                "ratio_ci": BOOTSTRAP_METHOD,
                "paired_ratio": "median over rounds of candidate_k / reference_k",
                "paired_ratio_ci": PAIRED_METHOD,
                "fidelity": "onnxprune.metrics of each model's outputs against the first "
                "model's on the same feed",
            },
            "settings": self.settings.to_dict(),
            "system": self.system.to_dict(),
            "models": [m.to_dict() for m in self.models],
        }


def _labels(paths: Sequence[str]) -> list[str]:
    labels: list[str] = []
    seen: dict[str, int] = {}
    for path in paths:
        name = Path(path).name
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return labels


def _fidelity(
    reference: tuple[Runner, dict[str, np.ndarray]], candidate: Runner
) -> tuple[dict[str, dict[str, float | None]] | None, str | None]:
    ref_runner, ref_out = reference
    if set(ref_runner.feed) != set(candidate.feed) or any(
        ref_runner.feed[k].shape != candidate.feed[k].shape
        or not np.array_equal(ref_runner.feed[k], candidate.feed[k])
        for k in ref_runner.feed
    ):
        return None, "not compared: the models were fed different inputs"
    if set(ref_out) != set(candidate.output_names):
        return None, "not compared: the models have different output names"
    cand_out = candidate.outputs()
    shapes = [n for n in ref_out if ref_out[n].shape != cand_out[n].shape]
    if shapes:
        return None, f"not compared: output {shapes[0]!r} has a different shape"
    return {n: metrics_of(ref_out[n], cand_out[n], pooled=False) for n in ref_out}, None


def _check_count(runs: int | None, seconds: float | None, warmup: int) -> None:
    if runs is not None and seconds is not None:
        raise UsageError("give either runs or seconds, not both")
    if runs is not None and runs < 1:
        raise UsageError(f"--runs {runs}: must be at least 1")
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"--seconds {seconds}: must be a positive number of seconds")
    if warmup < 0:
        raise UsageError(f"--warmup {warmup}: must be >= 0")


def benchmark(
    models: Sequence[str | os.PathLike[str]],
    *,
    provider: str = "cpu",
    provider_options: Mapping[str, Any] | None = None,
    threads: int | None = None,
    batch: int | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
    calib: str | os.PathLike[str] | None = None,
    warmup: int = 10,
    runs: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    shuffle: bool = True,
    show_progress: bool | None = None,
    block: int = 1,
) -> BenchResult:
    """Benchmark ``models`` interleaved; the first is the reference for ratios.

    Args:
        models: Model paths (the same path may repeat, e.g. to measure noise).
        provider: ``cpu``, ``cuda``, ``tensorrt`` or a full provider name.
        provider_options: Options passed to that provider.
        threads: Intra-op threads (default: CPUs this process may run on).
        batch: Binds the first (batch) axis of every input.
        shapes: ``{input name: shape}`` overrides for generated inputs.
        dims: Symbolic dimension bindings for generated inputs.
        calib: Calibration data; its first sample(s) are the feed.
        warmup: Untimed runs per model before measuring.
        runs: Measured rounds (default 100 when ``seconds`` is not given).
        seconds: Measure for about this long instead of a fixed number of rounds.
        seed: Seed of the generated inputs, the round order and the bootstrap.
        shuffle: Shuffle the model order within each round.
        block: Consecutive runs per model per round (median recorded); 1 alternates single
            runs, larger blocks measure the warm steady state of large models.
        show_progress: Force the progress bar on/off (default: when stderr is a terminal).

    Raises:
        UsageError: no models, unknown provider (listing available ones), unbound symbolic
            dimension, bad counts.
        ModelLoadError, CalibrationError: unreadable models or data.
    """
    if not models:
        raise UsageError("no models to benchmark")
    _check_count(runs, seconds, warmup)
    if block < 1:
        raise UsageError(f"--block {block}: must be >= 1")
    if runs is None and seconds is None:
        runs = _DEFAULT_RUNS
    resolved = resolve_provider(provider)
    threads = threads if threads is not None else (usable_cpus() or 1)
    if threads < 0:
        raise UsageError(f"--threads {threads}: must be >= 0 (0 lets onnxruntime choose)")
    paths = [str(m) for m in models]
    feeds = []
    used: dict[str, DimDefault] = {}
    for path in paths:
        # Only the input specs are needed; the session below reads the file itself.
        model = load(path)
        data = load_calibration(calib, model) if calib is not None else None
        feeds.append(
            bench_feed(
                model_input_specs(model),
                calib=data,
                batch=batch,
                shapes=shapes,
                dims=dims,
                seed=seed,
                defaults=input_dim_defaults(model),
                used=used,
            )
        )
        del model, data
    prepared = prepare(
        paths, feeds, provider=resolved, provider_options=provider_options, threads=threads
    )
    latencies = measure(
        prepared,
        warmup=warmup,
        runs=runs,
        seconds=seconds,
        seed=seed,
        shuffle=shuffle,
        show_progress=show_progress,
        block=block,
    )
    settings = BenchSettings(
        provider=resolved,
        provider_options=dict(provider_options or {}),
        execution="session.run" if resolved == "CPUExecutionProvider" else "io_binding (device)",
        graph_optimization="ORT_ENABLE_ALL",
        intra_op_threads=threads,
        inter_op_threads=1,
        warmup=warmup,
        runs=runs,
        seconds=seconds,
        rounds=len(latencies[0]),
        batch=batch,
        input_source=f"calibration {calib} (first sample(s))"
        if calib is not None
        else f"synthetic (onnxprune.feeds, seed {seed})",
        seed=seed,
        shuffle=shuffle,
        block=block,
        default_dims={k: dataclasses.asdict(d) for k, d in used.items()},
    )
    results = _results(paths, feeds, prepared, latencies, batch=batch, seed=seed)
    return BenchResult(results, settings, system_info())


def _results(
    paths: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    prepared: Prepared,
    latencies: Sequence[Sequence[float]],
    *,
    batch: int | None,
    seed: int,
) -> list[ModelResult]:
    reference = (prepared.runners[0], prepared.runners[0].outputs())
    results = []
    for i, (path, label) in enumerate(zip(paths, _labels(paths), strict=True)):
        stats = latency_stats(latencies[i])
        per_run = samples_per_run(feeds[i], batch)
        ratio = paired = fidelity = note = None
        if i > 0:
            ratio = median_ratio_ci(latencies[0], latencies[i], seed=seed)
            paired = paired_ratio_ci(latencies[0], latencies[i], seed=seed)
            fidelity, note = _fidelity(reference, prepared.runners[i])
        results.append(
            ModelResult(
                path=path,
                label=label,
                inputs={
                    k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds[i].items()
                },
                samples_per_run=per_run,
                session_create_ms=prepared.create_ms[i],
                latency_ms=stats,
                throughput_per_s=per_run / (stats.median / 1e3),
                memory=prepared.memory[i],
                ratio_to_first=ratio,
                paired_ratio_to_first=paired,
                fidelity_to_first=fidelity,
                fidelity_note=note,
                latencies_ms=list(latencies[i]),
            )
        )
    return results
