"""The one JSON writer of every report: strict JSON (no NaN/Infinity), sorted keys, atomic."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from onnxprune.io.atomic import write_text_atomic

__all__ = ["json_safe", "json_text", "write_json"]


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON data: non-finite floats become ``"inf"``/``"-inf"``/``"nan"``
    (JSON has no such numbers, and strict parsers reject ``Infinity``), numpy scalars become
    Python numbers, tuples lists, keys strings (recursively)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def json_text(payload: Any) -> str:
    """``payload`` as indented JSON with sorted keys (reruns give identical bytes)."""
    return json.dumps(json_safe(payload), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as :func:`json_text`, atomically."""
    write_text_atomic(path, json_text(payload))
