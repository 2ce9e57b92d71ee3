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

from onnxprune.api import canonicalize_file

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


def _canonicalize(src: Path, dst: Path, opts: Mapping[str, Any], run: StepRun) -> Any:
    return canonicalize_file(src, dst, calib=run.calib, dims=run.dims, skip=opts.get("skip", ()))


def _prune(src: Path, dst: Path, opts: Mapping[str, Any], run: StepRun) -> Any:
    from onnxprune.prune.api import prune_file
    from onnxprune.prune.core import PruneOptions

    ratio = opts.get("ratio")
    options = PruneOptions(
        ratio=None if ratio is None else ratio * run.strength,
        target_macs=_kept(opts.get("target_macs"), run.strength),
        target_params=_kept(opts.get("target_params"), run.strength),
        criterion=opts.get("criterion", "l2"),
        round_to=opts.get("round_to", 8),
        max_ratio=opts.get("max_ratio", 0.9),
        exclude=tuple(opts.get("exclude", ())),
    )
    reconstruct = bool(opts.get("reconstruct", False)) and run.calib is not None
    return prune_file(
        src,
        dst,
        options,
        calib=run.calib,
        reconstruct=reconstruct,
        iterative=opts.get("iterative", 1),
        dims=run.dims,
    )


def _lowrank(src: Path, dst: Path, opts: Mapping[str, Any], run: StepRun) -> Any:
    from onnxprune.lowrank.api import lowrank_file
    from onnxprune.lowrank.config import LowRankConfig

    rank = opts.get("rank")
    config = LowRankConfig(
        rank=None if rank is None else max(1, round(rank / run.strength)),
        energy=_kept(opts.get("energy"), run.strength),
        target_params=_kept(opts.get("target_params"), run.strength),
        method=opts.get("method", "svd"),
        conv=opts.get("conv"),
        fold=bool(opts.get("fold", False)),
        exclude=tuple(opts.get("exclude", ())),
    )
    return lowrank_file(src, dst, config, calib=run.calib)


def _sparsify(src: Path, dst: Path, opts: Mapping[str, Any], run: StepRun) -> Any:
    from onnxprune.sparsity.api import sparsify_file
    from onnxprune.sparsity.prune import SparsifyConfig

    pattern = opts.get("pattern", "unstructured")
    if pattern != "unstructured" and run.strength < 1:
        raise _NoBackoffError("an N:M pattern cannot be made milder")
    config = SparsifyConfig(
        sparsity=opts.get("sparsity", 0.5) * (run.strength if pattern == "unstructured" else 1),
        pattern=pattern,
        scope=opts.get("scope", "layer"),
        method=opts.get("method", "magnitude"),
        update=bool(opts.get("update", False)),
        exclude=tuple(opts.get("exclude", ())),
    )
    return sparsify_file(src, dst, config, calib=run.calib)


def _quantize(src: Path, dst: Path, opts: Mapping[str, Any], run: StepRun) -> Any:
    from onnxprune.quant.api import quantize_file

    if run.calib is None:
        raise _NoBackoffError("quantize needs --calib")
    return quantize_file(
        src,
        dst,
        calib=run.calib,
        method=opts.get("method", "minmax"),
        per_channel=bool(opts.get("per_channel", True)),
        mode=opts.get("mode", "static"),
        target=opts.get("target", "cpu"),
        dtype=opts.get("dtype", "int8"),
        exclude=tuple(opts.get("exclude", ())),
        budget=run.budget,
        bias_correction=opts.get("bias_correction", "auto"),
        equalize=opts.get("equalize", "auto"),
    )


class _NoBackoffError(Exception):
    """The step cannot run at this strength (recorded as a skip)."""


_RUNNERS: dict[str, Callable[[Path, Path, Mapping[str, Any], StepRun], Any]] = {
    "canonicalize": _canonicalize,
    "prune": _prune,
    "lowrank": _lowrank,
    "sparsify": _sparsify,
    "quantize": _quantize,
}


def run_step(name: str, src: Path, dst: Path, opts: Mapping[str, Any], run: StepRun) -> Any:
    """Run one step; raises ``StepSkippedError`` when it cannot run at ``run.strength``."""
    try:
        return _RUNNERS[name](src, dst, opts, run)
    except _NoBackoffError as exc:
        raise StepSkippedError(str(exc)) from None


class StepSkippedError(Exception):
    """A step that was not applied, with the reason."""
