"""One runner per recipe step: a file-to-file call of that capability's public API.

``strength`` in (0, 1] scales how aggressive a step is, for the budget guard's back-off:
a pruning ratio ``r`` becomes ``r * strength``; a kept fraction ``t`` (MACs, parameters,
spectral energy) becomes ``1 - (1 - t) * strength``; a sparsity ``s`` becomes
``s * strength``. Steps that are exact (canonicalize) or that meet the budget themselves
(quantize keeps harmful layers in float until it holds) run at full strength only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnxprune import registry
from onnxprune.registry.driver import run_file
from onnxprune.registry.options import config_from_mapping

__all__ = ["BACKOFF_STEPS", "StepRun", "StepSkippedError", "run_step"]


@dataclasses.dataclass(frozen=True)
class StepRun:
    """Context of one step run: fitting data, dims, back-off strength, budget."""

    calib: Path | None
    dims: Mapping[str, int]
    strength: float = 1.0
    budget: str | None = None


#: Steps whose amount can be reduced when the budget is missed.
BACKOFF_STEPS = frozenset({"prune", "lowrank", "sparsify"})


def _kept(value: float | None, strength: float) -> float | None:
    return None if value is None else 1 - (1 - value) * strength


class _NoBackoffError(Exception):
    """The step cannot run at this strength (recorded as a skip)."""


def _weaken(name: str, config: Any, strength: float) -> Any:
    """``config`` made milder by ``strength`` (see the module docstring)."""
    if strength >= 1:
        return config
    if name == "sparsify":
        if config.pattern != "unstructured":
            raise _NoBackoffError("an N:M pattern cannot be made milder")
        return dataclasses.replace(config, sparsity=config.sparsity * strength)
    if name == "prune":
        ratio = config.ratio
        return dataclasses.replace(
            config,
            ratio=None if ratio is None else ratio * strength,
            target_macs=_kept(config.target_macs, strength),
            target_params=_kept(config.target_params, strength),
            target_latency=_kept(config.target_latency, strength),
            layer_ratio={k: v * strength for k, v in config.layer_ratio.items()},
        )
    if name == "lowrank":
        rank = config.rank
        return dataclasses.replace(
            config,
            rank=None if rank is None else max(1, round(rank / strength)),
            energy=_kept(config.energy, strength),
            target_params=_kept(config.target_params, strength),
            target_macs=_kept(config.target_macs, strength),
        )
    return config


def _run_registered(name: str, src: Path, dst: Path, opts: Mapping[str, Any], run: StepRun) -> Any:
    """A registered transform: its config from the step's options, through the one driver."""
    transform = registry.get(name)
    config = config_from_mapping(transform.config, opts, f"recipe step {name!r}")
    if transform.from_cli is not None:
        config = transform.from_cli(config)
    config = _weaken(name, config, run.strength)
    if name == "quantize":
        if run.calib is None:
            raise _NoBackoffError("quantize needs --calib")
        if config.budget is None:  # quantize meets the recipe's budget itself (float layers)
            config = dataclasses.replace(config, budget=run.budget)
    return run_file(transform, src, dst, config, calib=run.calib, dims=run.dims)


def run_step(name: str, src: Path, dst: Path, opts: Mapping[str, Any], run: StepRun) -> Any:
    """Run one step; raises ``StepSkippedError`` when it cannot run at ``run.strength``."""
    try:
        return _run_registered(name, src, dst, opts, run)
    except _NoBackoffError as exc:
        raise StepSkippedError(str(exc)) from None


class StepSkippedError(Exception):
    """A step that was not applied, with the reason."""
