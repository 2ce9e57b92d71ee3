"""One runner per recipe step: a file-to-file call of that capability's public API.

``strength`` in (0, 1] scales how aggressive a step is, for the budget guard's back-off:
a pruning ratio ``r`` becomes ``r * strength``; a kept fraction ``t`` (MACs, parameters,
spectral energy) becomes ``1 - (1 - t) * strength``; a sparsity ``s`` becomes
``s * strength``. Steps that are exact (canonicalize) or that meet the budget themselves
(quantize keeps harmful layers in float until it holds) run at full strength only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
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


def _quantize(src: Path, dst: Path, opts: Mapping[str, Any], run: StepRun) -> Any:
    from onnxprune.quant.api import quantize_file

    if run.calib is None:
        raise _NoBackoffError("quantize needs --calib")
    return quantize_file(
        src,
        dst,
        calib=run.calib,
        method=opts.get("method", "auto"),
        per_channel=bool(opts.get("per_channel", True)),
        mode=opts.get("mode", "static"),
        target=opts.get("target", "cpu"),
        dtype=opts.get("dtype", "int8"),
        exclude=tuple(opts.get("exclude", ())),
        budget=run.budget,
        bias_correction=opts.get("bias_correction", "auto"),
        equalize=opts.get("equalize", "auto"),
        refine=opts.get("refine", "off"),
    )


class _NoBackoffError(Exception):
    """The step cannot run at this strength (recorded as a skip)."""


_RUNNERS: dict[str, Callable[[Path, Path, Mapping[str, Any], StepRun], Any]] = {
    "quantize": _quantize,
}


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
    return run_file(transform, src, dst, config, calib=run.calib, dims=run.dims)


def run_step(name: str, src: Path, dst: Path, opts: Mapping[str, Any], run: StepRun) -> Any:
    """Run one step; raises ``StepSkippedError`` when it cannot run at ``run.strength``."""
    try:
        if name in _RUNNERS:
            return _RUNNERS[name](src, dst, opts, run)
        return _run_registered(name, src, dst, opts, run)
    except _NoBackoffError as exc:
        raise StepSkippedError(str(exc)) from None


class StepSkippedError(Exception):
    """A step that was not applied, with the reason."""
