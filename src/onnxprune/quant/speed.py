"""Speed check: the written int8 model timed against its float input on this machine.

int8 is not always faster. On a small model the Quantize/Dequantize at the edges and the
layout changes of the int8 kernels cost more than the narrower arithmetic saves (the zoo's
32x32 digits CNN: 0.09 ms in float, 1.2x slower in int8 on a 2-core AVX2 machine without
VNNI, whatever layers are kept in float); on a larger one it depends on the CPU's int8
instructions. Fidelity numbers alone would let a user ship a slower model without knowing,
so the quantize report measures it: both files in onnxruntime on the CPU provider, all
optimizations on (as deployed), interleaved rounds on the first calibration sample for about
``seconds``; the ratio is the median of the per-round ``output / input`` latencies with its
bootstrap interval (:mod:`onnxprune.bench.stats`). A slower result is a warning in the
summary. The written model does not depend on the measurement (same input and seed, same
bytes); only the report does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ["SpeedCheck", "speed_check"]


@dataclasses.dataclass(frozen=True)
class SpeedCheck:
    """Output latency over input latency on this machine (< 1: the output is faster)."""

    threads: int
    rounds: int
    input_ms: float
    output_ms: float
    ratio: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """slower / faster where the paired ratio's interval excludes 1 and the two models'
        median latencies point the same way; else no clear difference (on a 0.07 ms model
        the per-round ratios said 3 % faster while the medians said 6 % slower)."""
        if self.low > 1.0 and self.output_ms >= self.input_ms:
            return "slower"
        if self.high < 1.0 and self.output_ms <= self.input_ms:
            return "faster"
        return "no clear difference"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "verdict": self.verdict}

    def summary(self) -> str:
        speed = 1.0 / self.ratio if self.ratio > 0 else float("inf")
        line = (
            f"speed on this machine (onnxruntime CPU, {self.threads} threads, {self.rounds} "
            f"interleaved rounds): median input {self.input_ms:.3g} ms, output "
            f"{self.output_ms:.3g} ms; per-round latency ratio {self.ratio:.3f} "
            f"[{self.low:.3f}, {self.high:.3f}], {speed:.2f}x the input's speed: {self.verdict}"
        )
        if self.verdict == "slower":
            line += (
                "\nwarning: the quantized model is slower than the float input on this machine; "
                "int8 pays off on larger layers and CPUs with VNNI/AMX: time it where it will "
                "run (`onnxprune bench`) before deploying it"
            )
        return line


def speed_check(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    *,
    calib: str | os.PathLike[str] | None,
    seconds: float,
    threads: int | None = None,
) -> SpeedCheck:
    """Time ``candidate`` against ``reference`` interleaved for about ``seconds``."""
    from onnxprune.bench import benchmark

    result = benchmark(
        [reference, candidate],
        threads=threads,
        calib=calib,
        seconds=seconds,
        warmup=3,
        show_progress=False,
    )
    first, second = result.models
    paired = second.paired_ratio_to_first or second.ratio_to_first
    assert paired is not None  # two models: the second always has a ratio to the first
    return SpeedCheck(
        threads=result.settings.intra_op_threads,
        rounds=result.settings.rounds,
        input_ms=first.latency_ms.median,
        output_ms=second.latency_ms.median,
        ratio=float(paired.ratio),
        low=float(paired.low),
        high=float(paired.high),
    )
