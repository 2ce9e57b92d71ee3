"""Session setup and the interleaved timing loop.

Every session is created first (creation time and RSS growth recorded), each is warmed up,
then the measured loop runs *rounds*: one single run of every model per round, in an order
shuffled per round by a seeded generator. Machine drift (frequency scaling, a noisy
neighbour) therefore hits every model alike, and round ``k`` of each model can be paired for
the ratio's bootstrap (:mod:`onnxprune.bench.stats`).

On CPU a run is ``session.run(None, feed)``. On CUDA/TensorRT the inputs are copied to the
device once (``OrtValue.ortvalue_from_numpy(x, "cuda", 0)``) and bound with IO binding, and
outputs are bound to the device, so a run times the model and not host-device copies.
Only the run itself is inside ``time.perf_counter_ns``; RSS probes and progress updates are
outside it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxprune.bench.system import gpu_memory_used_mib
from onnxprune.progress import Progress
from onnxprune.runtime import make_session

__all__ = ["MemoryStats", "Prepared", "Runner", "measure", "prepare"]

logger = logging.getLogger(__name__)

_DEVICE_PROVIDERS = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def _rss_probe() -> Callable[[], int] | None:
    try:
        import psutil
    except ImportError:
        logger.info("psutil is not installed: memory is not recorded")
        return None
    process = psutil.Process()
    return lambda: int(process.memory_info().rss)


@dataclasses.dataclass
class MemoryStats:
    """Memory of one model: RSS growth at session creation, peak RSS seen after its runs.

    RSS is process-wide, so ``peak_rss_bytes`` includes every session alive in the process;
    ``session_rss_delta_bytes`` is the clean per-model number. GPU numbers are device-wide
    ``nvidia-smi`` readings (MiB) when a GPU provider is used.
    """

    session_rss_delta_bytes: int | None = None
    peak_rss_bytes: int | None = None
    gpu_session_delta_mib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Runner:
    """One model's session bound to its feed; calling it runs the model once."""

    def __init__(self, session: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> None:
        self.session = session
        self.feed = dict(feed)
        self.output_names = [o.name for o in session.get_outputs()]
        device = _DEVICE_PROVIDERS.get(session.get_providers()[0])
        self._binding = None
        if device is not None:
            binding = session.io_binding()
            # Keep the device copies alive as long as the binding.
            self._device_inputs = {
                name: ort.OrtValue.ortvalue_from_numpy(array, device, 0)
                for name, array in self.feed.items()
            }
            for name, value in self._device_inputs.items():
                binding.bind_ortvalue_input(name, value)
            for name in self.output_names:
                binding.bind_output(name, device)
            self._binding = binding

    def __call__(self) -> None:
        if self._binding is None:
            self.session.run(None, self.feed)
        else:
            # Run(IOBinding) synchronizes the bound outputs before returning.
            self.session.run_with_iobinding(self._binding)

    def outputs(self) -> dict[str, np.ndarray]:
        """Run once and return the outputs on the host."""
        if self._binding is None:
            return dict(zip(self.output_names, self.session.run(None, self.feed), strict=True))
        self.session.run_with_iobinding(self._binding)
        host = self._binding.copy_outputs_to_cpu()
        return dict(zip(self.output_names, host, strict=True))


@dataclasses.dataclass
class Prepared:
    """Sessions created and ready to time."""

    runners: list[Runner]
    create_ms: list[float]
    memory: list[MemoryStats]


def prepare(
    paths: Sequence[str | os.PathLike[str]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    provider: str,
    provider_options: Mapping[str, Any] | None,
    threads: int,
) -> Prepared:
    """Create every session (ORT_ENABLE_ALL, ``threads`` intra-op, 1 inter-op thread)."""
    probe = _rss_probe()
    runners, create_ms, memory = [], [], []
    for path, feed in zip(paths, feeds, strict=True):
        rss_before = probe() if probe else None
        gpu_before = gpu_memory_used_mib() if provider.lower() != "cpu" else None
        start = time.perf_counter_ns()
        session = make_session(
            path,
            provider=provider,
            provider_options=provider_options,
            optimize=True,
            intra_op_threads=threads,
            inter_op_threads=1,
        )
        create_ms.append((time.perf_counter_ns() - start) / 1e6)
        runners.append(Runner(session, feed))
        stats = MemoryStats()
        if probe and rss_before is not None:
            stats.session_rss_delta_bytes = probe() - rss_before
        if gpu_before is not None:
            gpu_after = gpu_memory_used_mib()
            stats.gpu_session_delta_mib = None if gpu_after is None else gpu_after - gpu_before
        memory.append(stats)
        logger.info("session for %s created in %.1f ms", path, create_ms[-1])
    return Prepared(runners, create_ms, memory)


def _warm_up(runners: Sequence[Runner], warmup: int, progress: Progress) -> None:
    for runner in runners:
        for _ in range(warmup):
            runner()
            progress.update()


def measure(
    prepared: Prepared,
    *,
    warmup: int,
    runs: int | None,
    seconds: float | None,
    seed: int = 0,
    shuffle: bool = True,
    min_rounds: int = 5,
    show_progress: bool | None = None,
    block: int = 1,
) -> list[list[float]]:
    """Warm up, then time interleaved rounds; latencies in ms per model, one per round.

    Stops after ``runs`` rounds, or once ``seconds`` of measuring have elapsed (checked after
    each round, never fewer than ``min_rounds``). Updates ``prepared.memory`` peak RSS.
    With ``block > 1`` each model runs ``block`` times in a row within a round and the
    round's latency is the median of the block: single runs alternating between large
    models start each run with the other model's weights in cache, while a deployed model
    runs warm; blocks keep the pairing and measure the warm steady state.
    """
    runners = prepared.runners
    rng = np.random.default_rng(seed)
    probe = _rss_probe()
    total = len(runners) * (warmup + runs) if runs is not None else None
    latencies: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    with Progress(total, "bench", enabled=show_progress) as bar:
        _warm_up(runners, warmup, bar)
        deadline = None if seconds is None else time.perf_counter_ns() + int(seconds * 1e9)
        rounds = 0
        while True:
            if shuffle:
                rng.shuffle(order)
            for i in order:
                times = []
                for _ in range(block):
                    start = time.perf_counter_ns()
                    runners[i]()
                    times.append((time.perf_counter_ns() - start) / 1e6)
                latencies[i].append(float(np.median(times)))
                if probe:
                    rss = probe()
                    peak = prepared.memory[i].peak_rss_bytes
                    prepared.memory[i].peak_rss_bytes = rss if peak is None else max(peak, rss)
                bar.update()
            rounds += 1
            if runs is not None and rounds >= runs:
                break
            if deadline is not None and rounds >= min_rounds and time.perf_counter_ns() >= deadline:
                break
    return latencies
