"""Pass infrastructure: a pass rewrites an ``ir.Model`` in place and returns a report.

A pass is a small class with a ``name`` and a ``call(model) -> PassReport`` method. The
report records every change and every skip as the shared :class:`~onnxprune.reports.Change`
(node, what changed) and :class:`~onnxprune.reports.Skip` (node, reason) records: "not
applicable here" is a recorded skip, never an exception and never silence. Passes are
idempotent: running one twice changes nothing the second time.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import onnx_ir as ir

from onnxprune.reports import Change, Record, Skip

__all__ = ["Change", "Pass", "PassReport", "Skip", "graph_stats"]


@dataclasses.dataclass
class PassReport(Record):
    """What a pass did: changes, skips, and graph statistics before and after."""

    name: str
    changes: list[Change] = dataclasses.field(default_factory=list)
    skips: list[Skip] = dataclasses.field(default_factory=list)
    before: dict[str, int] = dataclasses.field(default_factory=dict)
    after: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return bool(self.changes)

    def change(self, node: str, what: str) -> None:
        self.changes.append(Change(node, what))

    def skip(self, node: str, reason: str) -> None:
        self.skips.append(Skip(node, reason))


def graph_stats(model: ir.Model) -> dict[str, int]:
    """Node and initializer counts of the main graph (cheap; no tensor data is read)."""
    graph = model.graph
    n_init_bytes = 0
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            n_init_bytes += tensor.nbytes
    return {
        "nodes": len(graph),
        "initializers": len(graph.initializers),
        "initializer_bytes": n_init_bytes,
    }


class Pass(abc.ABC):
    """Base class of onnxprune passes. Subclasses implement :meth:`run`."""

    name: ClassVar[str] = "pass"

    def __call__(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name, before=graph_stats(model))
        self.run(model, report)
        report.after = graph_stats(model)
        return report

    @abc.abstractmethod
    def run(self, model: ir.Model, report: PassReport) -> None:
        """Rewrite ``model`` in place, recording changes and skips in ``report``."""
