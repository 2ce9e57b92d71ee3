"""A pruning plan: the decision (group -> kept channel positions) as reviewable data.

The plan is JSON (schema ``onnxprune.plan/1``). A group is named by its anchor axis
(``initializer:axis``, the first weight axis in the group) and a unit by its position on
that axis, so a plan replays onto the same model with ``--plan`` and a size mismatch or an
unknown group is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from onnxprune.errors import UsageError
from onnxprune.prune.analysis import Analysis

__all__ = ["PruningPlan"]

SCHEMA = "onnxprune.plan/1"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclasses.dataclass
class PruningPlan:
    """Kept unit positions per group id (groups not listed are left alone)."""

    keep: dict[str, list[int]]
    sizes: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "groups": {
                gid: {"size": self.sizes[gid], "keep": sorted(self.keep[gid])}
                for gid in sorted(self.keep)
            },
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> PruningPlan:
        """Validate a plan's JSON: every group a ``{"size": int, "keep": [int, ...]}``."""
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != SCHEMA:
            raise UsageError(f"{source}: not a pruning plan (schema {schema!r})")
        groups = data.get("groups", {})
        if not isinstance(groups, dict):
            raise UsageError(f"{source}: 'groups' must map group ids to {{size, keep}}")
        keep, sizes = {}, {}
        for gid, entry in groups.items():
            if not (
                isinstance(entry, dict)
                and _is_count(entry.get("size"))
                and isinstance(entry.get("keep"), list)
                and all(_is_count(p) for p in entry["keep"])
            ):
                raise UsageError(
                    f'{source}: group {gid!r} must be {{"size": N, "keep": [positions]}} '
                    "with non-negative integers"
                )
            keep[gid] = list(entry["keep"])
            sizes[gid] = entry["size"]
        return cls(keep, sizes)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PruningPlan:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read plan {path}: {exc}") from None
        return cls.from_dict(data, str(path))

    def removed_roots(self, analysis: Analysis) -> list[int]:
        """Resolve the plan against a fresh analysis of the model."""
        by_id = {g.id: g for g in analysis.groups}
        removed = []
        for gid, kept in sorted(self.keep.items()):
            group = by_id.get(gid)
            if group is None:
                raise UsageError(f"plan group {gid!r} does not exist in this model")
            if group.blocked is not None:
                raise UsageError(f"plan group {gid!r} is blocked: {group.blocked.reason}")
            if group.size != self.sizes[gid]:
                raise UsageError(
                    f"plan group {gid!r} has {self.sizes[gid]} channels, the model {group.size}"
                )
            if not kept:
                raise UsageError(f"plan group {gid!r} keeps no channel")
            positions = {u.position(group.anchor): u for u in group.units}
            unknown = sorted(set(kept) - set(positions))
            if unknown:
                raise UsageError(f"plan group {gid!r}: no channel at position {unknown[0]}")
            keep = set(kept)
            removed += [u.root for p, u in sorted(positions.items()) if p not in keep]
        return removed
