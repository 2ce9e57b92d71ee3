"""What op rules see and record: the channel graph, constants, and rewrites to apply later."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxprune.prune.channels import ChannelGraph, Dims, SpaceKey

__all__ = [
    "AttrRewrite",
    "RuleContext",
    "ShapeConstant",
    "ShapeEntry",
    "ShapeRewrite",
    "SliceRewrite",
]


@dataclasses.dataclass(frozen=True, eq=False)
class AttrRewrite:
    """After pruning, set ``node.attr = kept(space) // divisor`` (Conv group, GroupNorm)."""

    node: ir.Node
    attr: str
    space: SpaceKey
    divisor: int = 1


@dataclasses.dataclass(frozen=True, eq=False)
class ShapeRewrite:
    """After pruning, set entry ``index`` of the constant input ``input_index`` of ``node`` to
    ``kept(space) * multiplier`` (Reshape targets, Split sizes, Expand shapes)."""

    node: ir.Node
    input_index: int
    index: int
    space: SpaceKey
    multiplier: int = 1


@dataclasses.dataclass(frozen=True, eq=False)
class SliceRewrite:
    """After pruning, shift a Slice's start/end on a channel axis to the kept indices."""

    node: ir.Node
    position: int  # index into the starts/ends/axes vectors
    source: SpaceKey
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class ShapeConstant:
    """A constant entry of a runtime shape vector and where it sits: element ``index`` of
    input ``input_index`` of ``node`` (the Concat that put it in), so it can be rewritten.
    Equal (and hashed) by that place: the node compares by identity."""

    value: int
    node: ir.Node
    input_index: int
    index: int


#: An entry of a runtime shape vector: ``(value, axis)`` for a size read by a Shape op, a
#: constant, or None when unknown (see :mod:`onnxprune.prune.shape_flow`).
ShapeEntry = SpaceKey | ShapeConstant | None


class RuleContext:
    """Shared state while rules run over the graph."""

    def __init__(self, graph: ChannelGraph, model: ir.Model) -> None:
        self.graph = graph
        self.model = model
        self.attr_rewrites: list[AttrRewrite] = []
        self.shape_rewrites: list[ShapeRewrite] = []
        self.slice_rewrites: list[SliceRewrite] = []
        self.touched: set[SpaceKey] = set()
        #: where each entry of a runtime shape vector comes from
        self.shape_sources: dict[str, list[ShapeEntry]] = {}
        #: (size source, axis it sizes, node): checked once every rule has run
        #: (:func:`onnxprune.prune.shape_flow.check_links`); a source is an axis read by a
        #: Shape op or a constant
        self.size_links: list[tuple[SpaceKey | ShapeConstant, SpaceKey, str]] = []
        #: constants of shape vectors that also reach a use pruning does not rewrite
        self.poisoned: set[ShapeConstant] = set()
        self.node_name = ""

    # Relations made through the context are recorded as "touched", so the driver can
    # block every axis a rule did not account for.
    def unite(
        self, a: SpaceKey, b: SpaceKey, *, offset: int = 0, block: int = 1, partial: bool = False
    ) -> bool:
        self.touch(a)
        self.touch(b)
        return self.graph.unite(a, b, self.node_name, offset=offset, block=block, partial=partial)

    def block(self, value: str, axis: int, reason: str) -> None:
        self.touch((value, axis))
        self.graph.block(value, axis, self.node_name, reason)

    def block_all(self, value: str, reason: str) -> None:
        for axis in range(self.rank(value) or 0):
            self.block(value, axis, reason)

    def touch(self, key: SpaceKey) -> None:
        """Account for an axis without relating or blocking it."""
        rank = self.graph.rank(key[0])
        if rank:
            self.touched.add((key[0], key[1] % rank))

    def rank(self, value: str) -> int | None:
        return self.graph.rank(value)

    def dims(self, value: str) -> Dims | None:
        return self.graph.shapes.get(value)

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        """The value's constant array if it is an initializer (not a graph input)."""
        if value is None or value.const_value is None or value.is_graph_input():
            return None
        return value.const_value.numpy()

    def const_ints(self, value: ir.Value | None) -> list[int] | None:
        array = self.const(value)
        if array is None or array.dtype.kind not in "iu":
            return None
        return [int(v) for v in array.reshape(-1)]
