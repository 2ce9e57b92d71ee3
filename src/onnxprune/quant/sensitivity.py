"""End-to-end sensitivity of each quantized layer, the order ``--budget`` keeps layers float.

The harm ranking (:func:`onnxprune.quant.mixed.rank_harm`) measures the noise a layer adds
*at its own output*; how much of it reaches the model's outputs depends on everything
downstream (a depthwise convolution with large BatchNorm-folded weights amplifies it, a
pooled head averages it away). This module measures that directly: for every layer, a model
with only that layer quantized (its weights, its input and output activations; every other
layer float) is run on a few calibration feeds and compared with the float model. The
layer's sensitivity is the relative noise power it causes at the worst output::

    noise = 10^(-SQNR_out / 10)            (SQNR of the worst output, dB)

Noise powers of independent layers add up approximately, so the sum over layers predicts
the fully quantized model's noise, and keeping the most sensitive layers float removes the
most of it (NNCF's accuracy-control loop ranks layers the same way, by the metric change each
one causes). Layers with no effect of their own (a ``Add`` whose inputs are float when it is
the only quantized node) measure ``inf`` dB and rank last.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.progress import Progress
from onnxprune.quant.analysis import compare_outputs

__all__ = ["rank_sensitivity"]

#: Builds a quantized model that keeps the given nodes float.
BuildFn = Callable[[Sequence[str]], ir.Model]


def _worst_sqnr(metrics: Mapping[str, Mapping[str, float | None]]) -> float:
    values = [m.get("sqnr_db") for m in metrics.values()]
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return min(finite) if finite else math.inf


def rank_sensitivity(
    build: BuildFn,
    nodes: Sequence[str],
    reference: Mapping[str, list[np.ndarray]],
    feeds: Sequence[Mapping[str, np.ndarray]],
) -> list[dict[str, float | str]]:
    """``[{node, sqnr_db, noise}]`` for each of ``nodes`` quantized alone, most sensitive first.

    Args:
        build: Builds the quantized model keeping the given nodes float.
        nodes: The quantizable nodes (those ``build`` would quantize).
        reference: The float model's outputs on ``feeds`` (``reference_outputs``).
        feeds: Calibration feeds to measure on.
    """
    ranking: list[dict[str, float | str]] = []
    with Progress(len(nodes), "layer sensitivity") as bar:
        for node in nodes:
            others = [n for n in nodes if n != node]
            metrics = compare_outputs(reference, build(others), feeds)
            sqnr = _worst_sqnr(metrics)
            noise = 0.0 if sqnr == math.inf else 10 ** (-sqnr / 10)
            ranking.append({"node": node, "sqnr_db": sqnr, "noise": noise})
            bar.update()
    ranking.sort(key=lambda r: (-float(r["noise"]), str(r["node"])))
    return ranking
