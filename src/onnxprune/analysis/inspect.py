"""``inspect_model``: what is in a model and where its compute goes.

The report lists the model's interface (inputs and outputs with symbolic dims kept), opsets,
producer, an op-type histogram, MACs and parameters per node and in total (conventions in
:mod:`onnxprune.analysis.macs`), the heaviest layers, the symbolic dims that were bound or
assumed, the nodes that could not be counted and why, and the size on disk of the model
file plus its external data files. Nothing is modified and no weight bytes are read.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxprune.analysis.dims import BATCH_SOURCE, DimDefault, dims_notice
from onnxprune.analysis.macs import ModelCost, NodeCost, count_costs
from onnxprune.analysis.shapes import infer_shapes, shape_tuple
from onnxprune.io import load

__all__ = [
    "SCHEMA",
    "FileSizes",
    "InspectReport",
    "TensorInfo",
    "disk_bytes",
    "file_sizes",
    "format_bytes",
    "format_count",
    "inspect_model",
]

logger = logging.getLogger(__name__)

#: Version tag of :meth:`InspectReport.to_dict`; bumped on incompatible changes.
SCHEMA = "onnxprune.inspect/1"

_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def format_count(value: float) -> str:
    """Human-readable count with SI units: ``4_110_000_000 -> "4.11 G"``, ``512 -> "512"``."""
    for scale, unit in _UNITS:
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:g}"


def format_bytes(value: int) -> str:
    """Bytes with SI units, as every command prints a file size: ``33_090_000 -> "33.09 MB"``."""
    return f"{format_count(value)}B"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, element type, shape (symbolic dims as names)."""

    name: str
    dtype: str | None
    shape: tuple[int | str | None, ...] | None


@dataclasses.dataclass(frozen=True)
class FileSizes:
    """Bytes on disk of the model file and of the external data files it references.

    Attributes:
        model_bytes: Size of the ``.onnx`` file.
        external_bytes: Sizes of the referenced external files, each file counted once.
        external_files: Referenced files that exist, relative to the model's folder.
        missing_files: Referenced files that do not exist.
    """

    model_bytes: int
    external_bytes: int
    external_files: tuple[str, ...] = ()
    missing_files: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.external_bytes


@dataclasses.dataclass
class InspectReport:
    """Result of :func:`inspect_model`; ``to_dict`` is the stable JSON form."""

    producer: str
    ir_version: int
    opset_imports: dict[str, int]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    op_histogram: dict[str, int]
    total_macs: int
    total_params: int
    nodes: list[NodeCost]
    top: list[NodeCost]
    dims: dict[str, int]
    assumed_dims: dict[str, int]
    file_size: FileSizes | None = None
    dim_sources: dict[str, str | None] = dataclasses.field(default_factory=dict)

    def dims_notice(self) -> str | None:
        """The one-line notice about input dims that were not given (see ``dim_sources``)."""
        used = {
            k: DimDefault(self.assumed_dims[k], src)
            for k, src in self.dim_sources.items()
            if src is not None and k in self.assumed_dims
        }
        unresolved = [k for k, src in self.dim_sources.items() if src is None]
        return dims_notice(used, unresolved)

    @property
    def uncounted(self) -> list[NodeCost]:
        """Nodes whose MACs are unknown, each with its reason."""
        return [n for n in self.nodes if n.macs is None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, tagged ``"schema": "onnxprune.inspect/1"``."""
        data = dataclasses.asdict(self)
        data["uncounted"] = [
            {"name": n.name, "op_type": n.op_type, "reason": n.reason} for n in self.uncounted
        ]
        if self.file_size is not None:
            data["file_size"]["total_bytes"] = self.file_size.total_bytes
        return {"schema": SCHEMA, **data}

    def to_markdown(self) -> str:
        """Totals, the top layers by MACs and the uncounted nodes as Markdown tables."""
        lines = [f"- {key}: {value}" for key, value in self._summary()]
        lines += ["", "| # | layer | op | MACs | params | share | output shape |"]
        lines.append("|---:|---|---|---:|---:|---:|---|")
        lines += ["| " + " | ".join(row) + " |" for row in self._top_rows()]
        if self.uncounted:
            lines += ["", "| uncounted | op | reason |", "|---|---|---|"]
            lines += [f"| {n.name} | {n.op_type} | {n.reason} |" for n in self.uncounted]
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        """The same content as :meth:`to_markdown` as an aligned plain-text table."""
        width = max(len(key) for key, _ in self._summary())
        lines = [f"{key:<{width}}  {value}" for key, value in self._summary()]
        rows: list[tuple[str, ...]] = [
            ("#", "layer", "op", "MACs", "params", "share", "output shape")
        ]
        rows += self._top_rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines.append("")
        for row in rows:
            cells = [
                cell.rjust(w) if i in (0, 3, 4, 5) else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
        lines += [f"uncounted: {n.name} ({n.op_type}): {n.reason}" for n in self.uncounted]
        return "\n".join(lines) + "\n"

    def _summary(self) -> list[tuple[str, str]]:
        def describe(info: TensorInfo) -> str:
            shape = "?" if info.shape is None else _shape_str(info.shape)
            return f"{info.name}: {info.dtype or '?'}{shape}"

        opsets = ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted(self.opset_imports.items()))
        items = [
            ("producer", self.producer or "?"),
            ("opsets", opsets),
            ("inputs", "; ".join(describe(i) for i in self.inputs)),
            ("outputs", "; ".join(describe(o) for o in self.outputs)),
            ("nodes", f"{len(self.nodes)} ({len(self.op_histogram)} op types)"),
            ("MACs", f"{format_count(self.total_macs)} ({self.total_macs})"),
            ("params", f"{format_count(self.total_params)} ({self.total_params})"),
        ]
        bound = {**self.dims, **self.assumed_dims}
        if bound:
            marks = {k: f" ({_dim_source(self.dim_sources.get(k))})" for k in self.assumed_dims}
            items.append(
                ("dims", ", ".join(f"{k}={v}{marks.get(k, '')}" for k, v in bound.items()))
            )
        if self.uncounted:
            items.append(("uncounted nodes", str(len(self.uncounted))))
        if self.file_size is not None:
            items.append(("size on disk", format_bytes(self.file_size.total_bytes)))
        return items

    def _top_rows(self) -> list[tuple[str, ...]]:
        rows: list[tuple[str, ...]] = []
        for rank, node in enumerate(self.top, start=1):
            macs = node.macs or 0
            share = f"{100.0 * macs / self.total_macs:.1f}%" if self.total_macs else "-"
            rows.append(
                (
                    str(rank),
                    node.name,
                    node.op_type,
                    format_count(macs),
                    format_count(node.params),
                    share,
                    _shape_str(node.output_shape),
                )
            )
        return rows


def inspect_model(
    model: ir.Model,
    *,
    path: str | Path | None = None,
    dims: Mapping[str, int] | None = None,
    top: int = 10,
) -> InspectReport:
    """Analyse ``model`` without modifying it or reading its weight bytes.

    Args:
        model: The model.
        path: The model's file; when given, the report includes the size on disk of the file
            and of the external data files its initializers reference (each counted once).
        dims: Values for symbolic dims used for counting, e.g. ``{"batch": 1}``. Unbound
            symbolic dims are assumed to be 1 and listed in ``assumed_dims``.
        top: How many of the heaviest layers (by MACs) to list in ``top``.

    Returns:
        The report. Shapes in ``inputs``, ``outputs`` and per-node ``output_shape`` keep
        their symbolic dims; MACs use the bound ones.
    """
    symbolic = infer_shapes(model)
    cost: ModelCost = count_costs(model, dims=dims)
    nodes = [
        dataclasses.replace(c, output_shape=shape_tuple(n.outputs[0].shape) if n.outputs else None)
        for c, n in zip(cost.nodes, symbolic.graph, strict=True)
    ]
    heavy = sorted((n for n in nodes if n.macs), key=lambda n: (-(n.macs or 0), n.index))
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    return InspectReport(
        producer=producer,
        ir_version=model.ir_version,
        opset_imports=dict(sorted(model.opset_imports.items())),
        inputs=[_tensor_info(v) for v in model.graph.inputs],
        outputs=[_tensor_info(v) for v in model.graph.outputs],
        op_histogram=dict(collections.Counter(n.op_type for n in nodes).most_common()),
        total_macs=cost.total_macs,
        total_params=cost.total_params,
        nodes=nodes,
        top=heavy[: max(top, 0)],
        dims=cost.dims,
        assumed_dims=cost.assumed_dims,
        dim_sources=cost.dim_sources,
        file_size=file_sizes(model, path) if path is not None else None,
    )


def file_sizes(model: ir.Model, path: str | Path) -> FileSizes:
    """Size of the model file plus the external data files its initializers reference.

    Locations are resolved against the model's folder; each file is counted once however
    many tensors it holds. Only file metadata is read.
    """
    folder = Path(path).parent
    seen: dict[Path, str] = {}
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                location = str(tensor.location)
                seen.setdefault((folder / location).resolve(), location)
    present = {p: loc for p, loc in seen.items() if p.is_file()}
    missing = sorted(loc for p, loc in seen.items() if p not in present)
    if missing:
        logger.warning("external data files not found next to %s: %s", path, missing)
    return FileSizes(
        model_bytes=Path(path).stat().st_size,
        external_bytes=sum(p.stat().st_size for p in present),
        external_files=tuple(sorted(present.values())),
        missing_files=tuple(missing),
    )


def disk_bytes(path: str | os.PathLike[str]) -> int:
    """The size of a model as every command reports it: the ``.onnx`` file plus each
    external data file its tensors reference, counted once (:func:`file_sizes`)."""
    return file_sizes(load(path), Path(path)).total_bytes


def _dim_source(source: str | None) -> str:
    """How the text report marks an assumed dim."""
    if source is None:
        return "assumed"
    return f"assumed: {source}" if source == BATCH_SOURCE else f"derived: {source}"


def _tensor_info(value: ir.Value) -> TensorInfo:
    dtype = value.dtype.name.lower() if value.dtype is not None else None
    return TensorInfo(name=value.name or "", dtype=dtype, shape=shape_tuple(value.shape))


def _shape_str(shape: tuple[int | str | None, ...] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"
