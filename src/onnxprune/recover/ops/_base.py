"""The rule registry and the helpers every rule module shares."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["RULES", "TORCH_DTYPES", "Rule", "has_rule"]

Tensor = torch.Tensor
Rule = Callable[[list[Any], dict[str, Any], int], list[Any]]

#: ONNX TensorProto data type -> torch dtype (the types a replay can hold).
TORCH_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}
_QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767)}

RULES: dict[str, Rule] = {}


def has_rule(op_type: str, domain: str = "") -> bool:
    return domain in ("", "ai.onnx") and op_type in RULES


def _rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(attrs: dict[str, Any], inputs: list[Any], index: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or input ``index`` (newer); None if neither."""
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    return None


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX ``[b1..bn, e1..en]`` -> F.pad's ``[bn, en, ..., b1, e1]``."""
    rank = len(pads) // 2
    out: list[int] = []
    for axis in reversed(range(rank)):
        out += [pads[axis], pads[axis + rank]]
    return out
