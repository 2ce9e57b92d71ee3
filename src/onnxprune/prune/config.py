"""``PruneConfig``: the options of ``onnxprune prune``, declared once.

The CLI flags and the recipe step keys are generated from these fields
(:mod:`onnxprune.registry.options`); :func:`resolve` turns a config into the
:class:`~onnxprune.prune.core.PruneOptions` the algorithm takes, reading the files it names
(a saved plan, saved per-group ratios) and refusing bad ones with a message naming them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from onnxprune.errors import UsageError
from onnxprune.prune.allocate import RATIOS_SCHEMA
from onnxprune.prune.core import PruneOptions
from onnxprune.prune.plan import PruningPlan
from onnxprune.registry.options import option

__all__ = ["LATENCY_SECONDS", "LatencyTarget", "PruneConfig", "Resolved", "resolve"]

Criterion = Literal[
    "auto", "l1", "l2", "bn", "activation", "apoz", "reconstruction", "wanda", "flap", "obs"
]
Allocation = Literal["auto", "measured", "measured-refit", "uniform"]

#: Kept channels are a multiple of this unless a saved allocation says otherwise.
DEFAULT_ROUND_TO = 8


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """What to prune, how much, and how to recover.

    Exactly one of ``ratio``, ``target_macs``, ``target_params`` and ``plan`` gives the
    amount (or only per-group ratios, ``layer_ratio`` / ``layer_ratios``). With calibration
    data the data-driven choices are the defaults: ``criterion="auto"`` ranks units by their
    consumers' output change, ``allocation="auto"`` spreads a MACs target by measured
    per-group error (each cut refit in closed form before it is measured, as the refit that
    follows will), ``reconstruct=None`` refits the next layers where that helps held-out
    feeds.
    """

    ratio: float | None = option(None, help="fraction of channels removed per group", metavar="R")
    target_macs: float | None = option(None, help="fraction of MACs kept", metavar="F")
    target_params: float | None = option(None, help="fraction of params kept", metavar="F")
    target_latency: float | None = option(
        None,
        help="fraction of the input's latency measured on this machine (onnxruntime CPU, "
        "--latency-threads): the MACs fraction is searched by bisection on measured "
        "candidates; depends on the machine",
        metavar="F",
    )
    plan: str | None = option(
        None, help="replay a pruning plan (written by --save-plan)", metavar="P.json"
    )
    layer_ratio: Mapping[str, float] = option(
        default_factory=dict,
        help="ratio for one group (id from the report) or layer (node name); repeatable",
        metavar="GROUP=R",
    )
    layer_ratios: str | None = option(
        None,
        help="per-group ratios from `onnxprune sensitivity --allocate F --save-ratios R.json`",
        metavar="R.json",
    )
    max_ratio: float = option(0.9, help="cap per group", metavar="R")
    criterion: Criterion = option(
        "auto", help="unit importance; auto: reconstruction with --calib, else l2"
    )
    allocation: Allocation = option(
        "auto",
        help="how --target-macs is spread over groups; measured: each group cut alone on "
        "calibration feeds, fragile ones cut less; measured-refit: each cut also refit in "
        "closed form before it is measured (the error left after the refit); auto: "
        "measured-refit with --calib and the refit, measured without the refit, else uniform",
    )
    reconstruct: bool | None = option(
        None,
        help="ridge refit of the layers after each cut, kept where it helps held-out feeds "
        "(default: on with --calib)",
    )
    iterative: int = option(1, help="prune in K steps", metavar="K")
    round_to: int | None = option(
        None, help="kept channels are a multiple of N (default 8)", metavar="N"
    )
    exclude: tuple[str, ...] = option((), help="nodes whose groups are never cut", metavar="NODE")
    latency_threads: int = option(
        1, help="intra-op threads of the --target-latency measurements (match deployment)"
    )
    dims: Mapping[str, int] = option(
        help="symbolic dimension values (the shared --dim option)", default_factory=dict, cli=False
    )


#: Seconds each --target-latency candidate is timed against the input (interleaved).
LATENCY_SECONDS = 3.0


@dataclasses.dataclass(frozen=True)
class LatencyTarget:
    """``--target-latency``: the fraction and how candidates are timed."""

    fraction: float
    threads: int
    calib: str | None = None

    def measure(
        self,
        reference: str | os.PathLike[str],
        candidate: str | os.PathLike[str],
        dims: Mapping[str, int] | None,
    ) -> float:
        """Latency of ``candidate`` over ``reference`` from one interleaved run: the median of
        the per-round ratios (the ratio of medians when there is no paired estimate)."""
        from onnxprune.bench import benchmark

        feeds: dict[str, Any] = {"calib": self.calib} if self.calib else {"dims": dict(dims or {})}
        result = benchmark(
            [reference, candidate],
            threads=self.threads,
            seconds=LATENCY_SECONDS,
            warmup=3,
            show_progress=False,
            **feeds,
        )
        first, second = result.models
        paired = second.paired_ratio_to_first  # per-round ratios: robust to load drifting
        if paired is not None:
            return float(paired.ratio)
        return second.latency_ms.median / first.latency_ms.median


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A config made concrete: the algorithm's options and the file-level switches."""

    options: PruneOptions
    reconstruct: bool | None
    iterative: int
    dims: dict[str, int]
    latency: LatencyTarget | None = None


def _ratio_table(data: object, path: str) -> dict[str, float]:
    """The ``layer_ratios`` mapping of a saved allocation, each a finite ratio."""
    table = data.get("layer_ratios") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise UsageError(f"--layer-ratios {path}: no 'layer_ratios' mapping of group to ratio")
    ratios = {}
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise UsageError(
                f"--layer-ratios {path}: ratio of {key!r} is {value!r}, expected a number in [0, 1)"
            )
        ratios[str(key)] = float(value)
    return ratios


def _saved_ratios(path: str | None, round_to: int | None) -> tuple[dict[str, float], int]:
    """Layer ratios and rounding from a saved allocation (or none)."""
    if path is None:
        return {}, round_to if round_to is not None else DEFAULT_ROUND_TO
    try:
        with open(path, encoding="utf-8") as handle:
            data: Any = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read --layer-ratios {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != RATIOS_SCHEMA:
        raise UsageError(
            f"--layer-ratios {path}: not a saved allocation (onnxprune.layer_ratios/1)"
        )
    saved = data.get("round_to", DEFAULT_ROUND_TO)
    if isinstance(saved, bool) or not isinstance(saved, int) or saved < 1:
        raise UsageError(f"--layer-ratios {path}: round_to {saved!r} is not a positive integer")
    if round_to is not None and round_to != saved:
        raise UsageError(
            f"--round-to {round_to} differs from the allocation's round_to {saved} in {path}"
        )
    return _ratio_table(data, path), saved


def resolve(config: PruneConfig, calib: str | os.PathLike[str] | None = None) -> Resolved:
    """The :class:`PruneOptions` and file-level switches ``config`` describes (``calib``: the
    data --target-latency candidates are timed on)."""
    latency = None
    if config.target_latency is not None:
        others = [config.ratio, config.target_macs, config.target_params, config.plan]
        if any(v is not None for v in others):
            raise UsageError(
                "give only one of --ratio, --target-macs, --target-params, --target-latency, --plan"
            )
        if not 0 < config.target_latency < 1:
            raise UsageError(f"--target-latency {config.target_latency}: must be in (0, 1)")
        if config.latency_threads < 1:
            raise UsageError(f"--latency-threads {config.latency_threads}: must be >= 1")
        latency = LatencyTarget(
            config.target_latency, config.latency_threads, None if calib is None else str(calib)
        )
    saved, round_to = _saved_ratios(config.layer_ratios, config.round_to)
    options = PruneOptions(
        ratio=config.ratio,
        layer_ratios={**saved, **dict(config.layer_ratio)},
        target_macs=config.target_macs,
        target_params=config.target_params,
        plan=PruningPlan.load(config.plan) if config.plan else None,
        max_ratio=config.max_ratio,
        round_to=round_to,
        criterion=config.criterion,
        exclude=tuple(config.exclude),
        allocation=config.allocation,
    )
    return Resolved(options, config.reconstruct, config.iterative, dict(config.dims), latency)
