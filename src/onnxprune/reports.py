"""Typed report records shared by the capabilities: one :class:`Change`, one :class:`Skip`,
and the JSON view of a report dataclass (:func:`report_dict`).

A report is a small dataclass per concern. Its JSON (:func:`report_dict`) leaves out the
fields that are None (a step that did not get that far) unless their metadata is
:data:`KEEP_NONE`; :func:`key` writes a field under another JSON key (``"from"``), and
:data:`FLATTEN` merges a nested record into its parent's JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = [
    "FLATTEN",
    "KEEP_NONE",
    "Change",
    "Record",
    "Skip",
    "key",
    "report_dict",
    "to_json_value",
]

KEEP_NONE: Mapping[str, bool] = {"keep_none": True}
FLATTEN: Mapping[str, bool] = {"flatten": True}


def key(name: str) -> Mapping[str, str]:
    """Field metadata: the field's JSON key is ``name``."""
    return {"key": name}


class Record:
    """Base of the report dataclasses: ``to_dict`` is :func:`report_dict` of their fields."""

    def to_dict(self) -> dict[str, Any]:
        return report_dict(self)


@dataclasses.dataclass(frozen=True)
class Change(Record):
    """One node a transform changed: what it did and, where there is one, by how much."""

    node: str
    what: str
    amount: float | None = None


@dataclasses.dataclass(frozen=True, order=True)
class Skip:
    """One node a transform left alone, and why (ordered by node, then reason)."""

    node: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "reason": self.reason}


def report_dict(record: Any) -> dict[str, Any]:
    """The JSON-ready dict of a report dataclass (see the module docstring)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if value is None and not field.metadata.get("keep_none"):
            continue
        converted = to_json_value(value)
        if field.metadata.get("flatten") and isinstance(converted, dict):
            out.update(converted)
        else:
            out[field.metadata.get("key", field.name)] = converted
    return out


def to_json_value(value: Any) -> Any:
    """Dataclasses (through their ``to_dict`` where they have one, else every field),
    mappings and sequences converted recursively; anything else as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return to_dict() if callable(to_dict) else dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {k: to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    return value
