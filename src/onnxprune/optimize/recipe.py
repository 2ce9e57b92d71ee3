"""Recipes: which steps ``onnxprune optimize`` runs, in which order, with which options.

A recipe is YAML (or JSON)::

    budget: "top1_agreement>=0.99"     # optional; --budget overrides
    provider: cpu                       # optional; --provider overrides
    steps:
      - canonicalize: {}
      - prune: {target_macs: 0.7, reconstruct: true}
      - quantize: {method: percentile}

Every step name and option is validated against the step's own option list; an unknown
step or key is an error that names it. Presets are recipes shipped with onnxprune.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from onnxprune import registry
from onnxprune.errors import UsageError
from onnxprune.registry.options import config_from_mapping, field_specs
from onnxprune.tolerance import DEFAULT_TOLERANCE

__all__ = [
    "PRESETS",
    "Recipe",
    "Step",
    "load_recipe",
    "preset",
    "step_names",
    "step_options",
]


def step_options(name: str) -> tuple[str, ...]:
    """The option keys of recipe step ``name``: its transform's config fields."""
    return tuple(s.name for s in field_specs(registry.get(name).config) if s.cli)


def step_names() -> tuple[str, ...]:
    return registry.names()


_TOP_KEYS = {"budget", "provider", "steps", "description"}


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]
    budget: str | None = None
    provider: str | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "budget": self.budget,
            "provider": self.provider,
            "steps": [{s.name: dict(s.options)} for s in self.steps],
        }


def _parse_step(index: int, entry: Any) -> Step:
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise UsageError(f"recipe step {index + 1}: expected one 'name: {{options}}' mapping")
    ((name, options),) = entry.items()
    if name not in step_names():
        raise UsageError(
            f"recipe step {index + 1}: unknown step {name!r}; steps: {', '.join(step_names())}"
        )
    options = options or {}
    if not isinstance(options, Mapping):
        raise UsageError(f"recipe step {name!r}: options must be a mapping")
    # the transform's config validates the options (unknown keys, types, choices)
    config_from_mapping(registry.get(name).config, options, f"recipe step {name!r}")
    return Step(name, dict(options))


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping (from YAML/JSON) into a :class:`Recipe`."""
    if not isinstance(data, Mapping):
        raise UsageError(f"{source}: a recipe is a mapping with a 'steps' list")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise UsageError(
            f"{source}: unknown key {unknown[0]!r}; keys: {', '.join(sorted(_TOP_KEYS))}"
        )
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise UsageError(f"{source}: 'steps' must be a non-empty list")
    return Recipe(
        steps=tuple(_parse_step(i, e) for i, e in enumerate(steps)),
        budget=data.get("budget"),
        provider=data.get("provider"),
        description=str(data.get("description", "")),
    )


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read a YAML or JSON recipe file."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        if str(path).endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:  # e.g. a !!python/object tag: refused, never run
                raise ValueError((str(exc).splitlines() or [type(exc).__name__])[0]) from None
    except (ValueError, ImportError) as exc:
        reason = " ".join(str(exc).split())
        raise UsageError(f"recipe {path}: cannot parse: {reason}") from None
    return parse_recipe(data, str(path))


#: Budgets of the CPU presets: the default tolerance (cosine and, for class scores and labels,
#: top-1 agreement), judged on held-out samples.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-int8": {
        "description": "canonicalize, then static int8 QDQ for the onnxruntime CPU provider",
        "provider": "cpu",
        "budget": DEFAULT_TOLERANCE,
        "steps": [{"canonicalize": {}}, {"quantize": {"method": "percentile"}}],
    },
    "cpu-fast": {
        "description": "canonicalize, prune to 70% of the MACs with recovery, then int8",
        "provider": "cpu",
        "budget": DEFAULT_TOLERANCE,
        "steps": [
            {"canonicalize": {}},
            {"prune": {"target_macs": 0.7, "reconstruct": True}},
            {"quantize": {"method": "percentile"}},
        ],
    },
    "cpu-prune": {
        "description": "canonicalize, then prune to 70% of the MACs with recovery (float)",
        "provider": "cpu",
        "budget": DEFAULT_TOLERANCE,
        "steps": [
            {"canonicalize": {}},
            {"prune": {"target_macs": 0.7, "reconstruct": True}},
        ],
    },
    "gpu-fp16": {
        "description": "canonicalize, then float16 weights and compute",
        "provider": "cuda",
        "steps": [{"canonicalize": {}}, {"quantize": {"dtype": "fp16"}}],
    },
    "tensorrt-int8": {
        "description": "canonicalize, then int8 QDQ with symmetric activations for TensorRT",
        "provider": "tensorrt",
        "steps": [{"canonicalize": {}}, {"quantize": {"target": "tensorrt"}}],
    },
}


def preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return parse_recipe(PRESETS[name], f"preset {name}")
