"""A family of models at several MAC budgets, for picking a width at run time.

For each fraction ``F`` the recipe runs with its prune step's ``target_macs`` set to ``F``
(a prune step is inserted after canonicalize when the recipe has none). Each variant is
written beside the output (``OUT.macs0.70.onnx``) with a manifest (schema
``onnxprune.variants/1``) giving MACs, parameters, file size, latency against the input on
the chosen provider, fidelity and accuracy per variant: the training-free form of dynamic
width, where a deployment picks the variant that fits the device or the load.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxprune.errors import BudgetError, UsageError
from onnxprune.optimize.api import optimize
from onnxprune.optimize.recipe import Recipe, Step
from onnxprune.reporting import write_json

__all__ = ["manifest_path", "optimize_variants", "variant_path", "with_macs_target"]


def with_macs_target(recipe: Recipe, fraction: float) -> Recipe:
    """The recipe with its prune step aimed at ``fraction`` of the MACs."""
    if not 0 < fraction <= 1:
        raise UsageError(f"--variants {fraction}: a MACs fraction must be in (0, 1]")
    steps = list(recipe.steps)
    index = next((i for i, s in enumerate(steps) if s.name == "prune"), None)
    if index is None:
        at = 1 if steps and steps[0].name == "canonicalize" else 0
        steps.insert(at, Step("prune", {"target_macs": fraction, "reconstruct": True}))
    else:
        options = {
            k: v for k, v in steps[index].options.items() if k not in ("ratio", "target_params")
        }
        steps[index] = Step("prune", {**options, "target_macs": fraction})
    return dataclasses.replace(recipe, steps=tuple(steps))


def variant_path(output: str | os.PathLike[str], fraction: float) -> Path:
    """Where the variant at ``fraction`` of the MACs is written (``OUT.macs0.70.onnx``)."""
    out = Path(output)
    return out.with_name(f"{out.stem}.macs{fraction:.2f}{out.suffix or '.onnx'}")


def manifest_path(output: str | os.PathLike[str]) -> Path:
    """Where the variants manifest is written (``OUT.variants.json``)."""
    out = Path(output)
    return out.with_name(f"{out.stem}.variants.json")


def optimize_variants(
    fractions: Sequence[float], output: str | os.PathLike[str], recipe: Recipe, **kwargs: Any
) -> dict[str, Any]:
    """Run ``optimize`` once per fraction; returns the manifest (also written as JSON)."""
    entries = []
    for fraction in fractions:
        target = variant_path(output, fraction)
        entry: dict[str, Any] = {"macs_fraction": fraction, "path": str(target)}
        try:
            report = optimize(output=target, recipe=with_macs_target(recipe, fraction), **kwargs)
        except BudgetError as exc:
            entry.update(written=False, reason=str(exc))
        else:
            entry.update(
                written=True,
                macs=report.after.macs,
                params=report.after.params,
                file_bytes=report.after.file_bytes,
                latency_ms=report.latency_ms[1] if report.latency_ms else None,
                latency_ratio=report.latency_ratio[0] if report.latency_ratio else None,
                fidelity=report.fidelity,
                accuracy=report.accuracy[1] if report.accuracy else None,
            )
        entries.append(entry)
    manifest = {
        "schema": "onnxprune.variants/1",
        "provider": kwargs.get("provider"),
        "variants": entries,
    }

    write_json(manifest_path(output), manifest)
    return manifest
