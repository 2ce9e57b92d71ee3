"""What a benchmark ran on: CPU model and ISA flags, cores, onnxruntime, GPU.

Read from ``/proc/cpuinfo`` (Linux) and ``nvidia-smi`` when present; anything that cannot be
read is recorded as ``None`` rather than guessed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = [
    "ISA_FLAGS",
    "SystemInfo",
    "cpu_info",
    "gpu_memory_used_mib",
    "gpu_names",
    "system_info",
    "usable_cpus",
]

logger = logging.getLogger(__name__)

#: ISA features that change which onnxruntime kernels run (int8 GEMM paths especially).
#: Key: name in the report; value: the /proc/cpuinfo flags any of which means "present".
ISA_FLAGS = {
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "avx512_vnni": ("avx512_vnni",),
    "avx_vnni": ("avx_vnni",),
    "amx": ("amx_tile", "amx_int8", "amx_bf16"),
    "neon": ("asimd", "neon"),
}


@dataclasses.dataclass(frozen=True)
class SystemInfo:
    """The machine and software a benchmark ran on."""

    cpu_model: str | None
    isa: dict[str, bool]
    logical_cpus: int | None
    usable_cpus: int | None
    platform: str
    python: str
    numpy: str
    onnxruntime: str
    available_providers: list[str]
    gpus: list[str]

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def cpu_info(cpuinfo: str | None = None) -> tuple[str | None, dict[str, bool]]:
    """CPU model name and ISA flags, parsed from ``/proc/cpuinfo`` text (read if None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    model = None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    if model is None:
        model = platform.processor() or None
    isa = {name: any(f in flags for f in names) for name, names in ISA_FLAGS.items()}
    return model, isa


def gpu_names() -> list[str]:
    """``name (driver X, N MiB)`` of each NVIDIA GPU via nvidia-smi; empty when none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    query = "--query-gpu=name,driver_version,memory.total"
    try:
        out = subprocess.run(
            [exe, query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.info("nvidia-smi failed: %s", exc)
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append(f"{parts[0]} (driver {parts[1]}, {parts[2]})")
        elif line.strip():
            gpus.append(line.strip())
    return gpus


def gpu_memory_used_mib(device: int = 0) -> float | None:
    """Used memory of GPU ``device`` in MiB via nvidia-smi (device-wide), or None."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, f"--id={device}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def usable_cpus() -> int | None:
    """CPUs this process may run on (its affinity mask), or the CPU count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def system_info() -> SystemInfo:
    """Collect :class:`SystemInfo` for this process."""
    model, isa = cpu_info()
    return SystemInfo(
        cpu_model=model,
        isa=isa,
        logical_cpus=os.cpu_count(),
        usable_cpus=usable_cpus(),
        platform=platform.platform(),
        python=platform.python_version(),
        numpy=np.__version__,
        onnxruntime=ort.__version__,
        available_providers=list(ort.get_available_providers()),
        gpus=gpu_names(),
    )
