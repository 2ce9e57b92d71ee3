"""The ``sparsify`` report: per-layer sparsity and storage, what speeds up (the driver's
envelope adds sizes and fidelity)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from onnxprune.reporting import json_safe
from onnxprune.reports import Skip

__all__ = ["SPEEDUP_NOTE", "LayerResult", "SparsifyReport"]

SPEEDUP_NOTE = {
    "onnxruntime_cpu": "no speed-up: ORT CPU kernels (Conv/Gemm/MatMul) are dense and do the "
    "same work on zeros; sparsity here is a file-size feature (bitmask storage, reconstructed "
    "exactly at session load).",
    "tensorrt": "2:4 weights (pattern 2:4, groups of 4 consecutive input channels) can run "
    "on sparse tensor cores (Ampere and newer) with the TensorRT execution provider option "
    "trt_sparsity_enable=1; TensorRT decides per layer whether the sparse kernel is faster. "
    "Unstructured sparsity does not speed up there either.",
    "storage": "with onnxruntime graph optimizations enabled (the default) the bitmask "
    "reconstruction is constant-folded once at session load; with them disabled it runs "
    "at every inference.",
}


@dataclasses.dataclass
class LayerResult:
    """One prunable weight: what was done to it and how it is stored."""

    node: str
    op: str
    weight: str
    shape: list[int]
    params: int
    target: float
    zeros: int = 0
    pattern: str = "unstructured"
    scores: str = "magnitude"
    updated: bool = False
    damp: float | None = None  # the OBS dampening used (None: no update)
    damping: dict[str, float] = dataclasses.field(default_factory=dict)  # held-out error by damp
    storage: str = "dense"
    dense_bytes: int = 0
    stored_bytes: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["sparsity"] = self.sparsity
        return data


@dataclasses.dataclass
class SparsifyReport:
    """What :func:`~onnxprune.sparsity.api.sparsify_apply` did (the ``sparsify`` key of the
    driver's report).

    ``skipped`` is one :class:`~onnxprune.reports.Skip` per layer left dense, by node name;
    the JSON writes it as ``{node: reason}``.
    """

    layers: list[LayerResult]
    skipped: list[Skip]
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stored_vs_masked_max_abs_error: float = 0.0

    @property
    def overall_sparsity(self) -> float:
        total = sum(layer.params for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "layers": [layer.to_dict() for layer in self.layers],
                "skipped": {s.node: s.reason for s in self.skipped},
                "overall_sparsity": self.overall_sparsity,
                "stored_vs_masked_max_abs_error": self.stored_vs_masked_max_abs_error,
                "steps": self.steps,
                "speedup": SPEEDUP_NOTE,
            }
        )

    def summary(self) -> str:
        text = (
            f"pruned {len(self.layers)} layers to {self.overall_sparsity:.1%} overall "
            f"({len(self.skipped)} skipped); stored model equals the masked model exactly\n"
        )
        counts = collections.Counter(
            "no update" if layer.damp is None else f"{layer.damp:g}"
            for layer in self.layers
            if layer.damping and layer.zeros
        )
        if counts:
            spread = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            text += f"OBS dampening chosen on held-out calibration feeds per layer ({spread})\n"
        return text + f"speed: {SPEEDUP_NOTE['onnxruntime_cpu']}"
