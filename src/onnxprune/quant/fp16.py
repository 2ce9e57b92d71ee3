"""float16 conversion (``--dtype fp16``): weights and compute in float16, float32 I/O.

* Float32 initializers, Constant tensors and ``Cast(to=FLOAT)`` targets become float16.
* Graph inputs and outputs stay float32: a Cast to float16 follows each float input and a
  Cast to float32 precedes each float output, so callers need no change.
* Nodes whose calibration activations (any float input or output) exceed the float16 range
  (``|x| > 65504``) stay float32, with Casts around them; so do their private initializers.
* Resize's ``roi``/``scales`` inputs stay float32 (the spec requires float scales).

onnxruntime's CPU provider runs float16 nodes it has no kernel for by inserting Casts itself;
the speedup is therefore a GPU matter, the size halves everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxprune.errors import UsageError
from onnxprune.intermediates import iter_intermediates
from onnxprune.quant.calibrate import Calibrator
from onnxprune.quant.core import copy_model
from onnxprune.registry.options import option

__all__ = ["FP16_MAX", "Fp16Config", "Fp16Report", "convert", "convert_in_place", "fp16_apply"]

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
_FLOAT = ir.DataType.FLOAT
_HALF = ir.DataType.FLOAT16
_FP32_INPUTS = {"Resize": (1, 2)}


def _overflowing_nodes(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> set[str]:
    names = [v.name for node in model.graph for v in node.outputs if v.name]
    calibrator = Calibrator(names, "minmax")
    for values in iter_intermediates(model, names, feeds):
        calibrator.update({k: v for k, v in values.items() if v.dtype == np.float32})
    big = {
        name for name, s in calibrator.stats.items() if s.count and max(-s.min, s.max) > FP16_MAX
    }
    kept = set()
    for node in model.graph:
        touched = {v.name for v in node.outputs if v is not None}
        touched |= {v.name for v in node.inputs if v is not None}
        if touched & big:
            kept.add(node.name or "")
    return kept


def _cast(value: ir.Value, to: ir.DataType, name: str) -> ir.Node:
    out = ir.val(name, to, value.shape)
    return ir.node("Cast", [value], {"to": to}, outputs=[out], name=f"{name}_Cast")


def _redirect(value: ir.Value, cast: ir.Node) -> None:
    """Make every reader of ``value`` except ``cast`` read ``cast``'s output."""
    for use in [u for u in value.uses() if u.node is not cast]:
        use.node.replace_input_with(use.idx, cast.outputs[0])


def _convert_constants(model: ir.Model, kept: set[str]) -> None:
    for name, value in list(model.graph.initializers.items()):
        if value.const_value is None or value.dtype != _FLOAT:
            continue
        users = [u.node for u in value.uses()]
        if users and all(
            u.name in kept or u.inputs.index(value) in _FP32_INPUTS.get(u.op_type, ())
            for u in users
        ):
            continue
        array = value.const_value.numpy().astype(np.float16)
        value.const_value = ir.tensor(array, name=name)
        value.dtype = _HALF
    for node in model.graph:
        if node.name in kept:
            continue
        if node.op_type == "Cast" and node.attributes.get_int("to") == _FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", _HALF)
        if node.op_type in ("Constant", "ConstantOfShape"):
            attr = node.attributes.get("value")
            if attr is not None and attr.value.dtype == _FLOAT:
                half = attr.value.numpy().astype(np.float16)
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(half))
        for value in node.outputs:
            if value.dtype == _FLOAT:
                value.dtype = _HALF


def _guard_kept(model: ir.Model, kept: set[str]) -> None:
    """Casts around float32 islands (kept nodes, Resize scales)."""
    graph = model.graph
    for node in list(graph):
        fp32_inputs = _FP32_INPUTS.get(node.op_type, ())
        for index, value in enumerate(node.inputs):
            if value is None or (value.const_value is not None and value.producer() is None):
                continue
            if node.name in kept or index in fp32_inputs:
                cast = _cast(value, _FLOAT, f"{node.name}_input{index}_fp32")
                graph.insert_before(node, cast)
                node.replace_input_with(index, cast.outputs[0])
        if node.name not in kept:
            continue
        for value in node.outputs:
            if value.dtype not in (_FLOAT, _HALF, None):
                continue
            value.dtype = _FLOAT
            cast = _cast(value, _HALF, f"{value.name}_fp16")
            _redirect(value, cast)
            graph.insert_after(node, cast)


def _keep_io_fp32(model: ir.Model) -> None:
    graph = model.graph
    first = next(iter(graph))
    for value in graph.inputs:
        if value.dtype != _FLOAT:
            continue
        cast = _cast(value, _HALF, f"{value.name}_fp16")
        _redirect(value, cast)
        graph.insert_before(first, cast)
    for index, value in enumerate(graph.outputs):
        if value.dtype != _HALF:
            continue
        name = value.name or f"output{index}"
        value.name = f"{name}_fp16"
        cast = _cast(value, _FLOAT, name)
        graph.append(cast)
        graph.outputs[index] = cast.outputs[0]


def convert(
    model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]]
) -> tuple[ir.Model, dict[str, object]]:
    """A float16 copy of ``model`` (float32 I/O) and a summary naming the float32 nodes."""
    result = copy_model(model)
    return result, convert_in_place(result, feeds)


def convert_in_place(
    model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], keep: Sequence[str] = ()
) -> dict[str, Any]:
    """Convert ``model`` to float16 in place (float32 I/O); ``keep`` names nodes left in
    float32 besides those whose values overflow float16 on ``feeds``."""
    kept = _overflowing_nodes(model, feeds) | set(keep)
    _convert_constants(model, kept)
    _guard_kept(model, kept)
    _keep_io_fp32(model)
    logger.info("fp16: %d node(s) kept in float32", len(kept))
    return {"kept_fp32": sorted(kept), "io": "float32"}


@dataclasses.dataclass(frozen=True)
class Fp16Config:
    """Options of ``onnxprune fp16``."""

    keep: tuple[str, ...] = option((), help="nodes kept in float32", metavar="NODE")
    calib_samples: int = option(
        16, help="feeds searched for float16 overflow (|x| > 65504)", metavar="N"
    )


@dataclasses.dataclass
class Fp16Report:
    """What :func:`fp16_apply` did."""

    kept_fp32: list[str]
    converted_nodes: int
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        kept = ", ".join(self.kept_fp32[:5]) + (" ..." if len(self.kept_fp32) > 5 else "")
        return (
            f"fp16: {self.converted_nodes} node(s) in float16, {len(self.kept_fp32)} kept in "
            f"float32{': ' + kept if kept else ''} (overflow searched on {self.samples} feeds); "
            "inputs and outputs stay float32"
        )


def fp16_apply(model: ir.Model, config: Fp16Config, data: Any) -> Fp16Report:
    """Transform ``fp16``: weights and compute in float16, float32 I/O (see the module
    docstring); overflow is searched on the fit feeds (or synthetic ones without --calib)."""
    feeds = data.fit_feeds(config.calib_samples) or data.synthetic
    names = {node.name for node in model.graph}
    for name in config.keep:
        if name not in names:
            raise UsageError(f"--keep {name!r}: no node of that name in the model")
    before = sum(1 for _ in model.graph)
    kept = list(convert_in_place(model, feeds, config.keep)["kept_fp32"])
    return Fp16Report(kept, before - len(kept), len(feeds))
