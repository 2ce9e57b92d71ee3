"""Channel-level dependency graph: which channels of which tensors must be removed together.

Every static axis of every tensor is a *channel space* ``(value name, axis)`` with one
element per index. Op rules (:mod:`onnxprune.prune.rules`) relate elements of different
spaces: identically (a residual Add: channel i of both inputs and the output), with an
offset (Concat/Split), or in blocks (Flatten into a classifier: channel c of the conv output
is features ``c*HW .. c*HW+HW-1``; an attention head h is hidden dims ``h*d .. h*d+d-1``).
A union-find over elements turns those relations into *units*: sets of (space, index)
elements that are removed together. A unit is prunable when it contains at least one
initializer element (removing it saves weights) and none of its spaces is *blocked* (graph
input or output, an op without a rule, a normalization over that axis, ...).

Working at channel granularity rather than layer granularity is what makes Concat offsets,
depthwise channel multipliers, grouped normalization and attention heads the same problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from onnxprune.reports import Skip

__all__ = ["ChannelGraph", "Dims", "Space", "SpaceKey"]

SpaceKey = tuple[str, int]
# A value's shape: an int per static axis, the symbol's name or None for a dynamic one.
Dims = tuple[int | str | None, ...]


@dataclasses.dataclass(frozen=True)
class Space:
    """A static axis of a tensor: ``size`` elements with ids ``base .. base + size - 1``.

    A *periodic* axis (a symbolic ``batch*heads`` merged by a reshape, see
    :attr:`ChannelGraph.periods`) is a space of the inner size: element ``h`` stands for
    indices ``h, size + h, 2*size + h, ..`` of the tensor.
    """

    value: str
    axis: int
    size: int
    base: int
    is_initializer: bool

    @property
    def key(self) -> SpaceKey:
        return (self.value, self.axis)


class ChannelGraph:
    """Union-find over the channels of all static axes, with blocked spaces and reasons."""

    def __init__(self, shapes: dict[str, Dims], initializers: Iterable[str]):
        self.shapes = shapes
        self.initializers = frozenset(initializers)
        self.spaces: dict[SpaceKey, Space] = {}
        self.blocked: dict[SpaceKey, Skip] = {}
        #: symbolic dims that merge a batch-like axis with a static inner axis of this size
        #: (``(batch, heads) -> batch*heads``): their spaces stand for that inner axis
        self.periods: dict[str, int] = {}
        #: blocks of axes that had no space yet (a symbolic dim whose period a later
        #: reshape registers): applied when the space is created
        self._pending: dict[SpaceKey, Skip] = {}
        self._parent: list[int] = []
        self._roots: np.ndarray | None = None  # root of every element; reset by a union

    # -- spaces -------------------------------------------------------------------------
    def rank(self, value: str) -> int | None:
        shape = self.shapes.get(value)
        return None if shape is None else len(shape)

    def space(self, value: str, axis: int) -> Space | None:
        """The space of ``value``'s ``axis`` (negative axes allowed); None if not static."""
        shape = self.shapes.get(value)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        axis %= len(shape)
        key = (value, axis)
        existing = self.spaces.get(key)
        if existing is not None:
            return existing
        size = shape[axis]
        if isinstance(size, str):
            size = self.periods.get(size)
        if not isinstance(size, int) or size <= 0:
            return None
        created = Space(value, axis, size, len(self._parent), value in self.initializers)
        self._parent.extend(range(created.base, created.base + size))
        self.spaces[key] = created
        if key in self._pending:
            self.blocked.setdefault(key, self._pending.pop(key))
        return created

    def periodic(self, key: SpaceKey) -> bool:
        """Whether the space stands for a symbolic ``batch*inner`` axis (not its real size)."""
        shape = self.shapes.get(key[0])
        return shape is not None and isinstance(shape[key[1]], str)

    def block(self, value: str, axis: int, node: str, reason: str) -> None:
        """Mark a space as not prunable; the first reason recorded wins."""
        space = self.space(value, axis)
        if space is not None:
            self.blocked.setdefault(space.key, Skip(node, reason))
            return
        rank = self.rank(value)
        if rank and -rank <= axis < rank:
            self._pending.setdefault((value, axis % rank), Skip(node, reason))

    def block_all(self, value: str, node: str, reason: str) -> None:
        for axis in range(self.rank(value) or 0):
            self.block(value, axis, node, reason)

    # -- relations ----------------------------------------------------------------------
    def _find(self, x: int) -> int:
        parent = self._parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def find(self, x: int) -> int:
        return self._find(x)

    def roots(self, space: Space) -> np.ndarray:
        """The root of each element of ``space`` (computed once for all spaces until the
        next union: pruning probes ask for every space's roots hundreds of times)."""
        if self._roots is None or len(self._roots) != len(self._parent):
            self._roots = np.array([self._find(x) for x in range(len(self._parent))], np.int64)
        return self._roots[space.base : space.base + space.size]

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._roots = None
            # Deterministic: the smaller id becomes the root.
            if ra < rb:
                self._parent[rb] = ra
            else:
                self._parent[ra] = rb

    def unite(
        self,
        a: tuple[str, int],
        b: tuple[str, int],
        node: str,
        *,
        offset: int = 0,
        block: int = 1,
        partial: bool = False,
    ) -> bool:
        """Relate element ``i`` of space ``a`` to elements ``offset + i*block ..`` of ``b``.

        ``block == 1`` and ``offset == 0`` is the identity relation (equal sizes). With
        ``partial`` it maps ``a`` onto the slice of ``b`` at ``offset`` (Concat/Split); with
        ``block > 1``
        each element of ``a`` owns ``block`` consecutive elements of ``b`` (Flatten,
        head splits, depthwise channel multipliers). When either space is not static, or
        the sizes do not fit, both sides are blocked and False is returned.
        """
        sa, sb = self.space(*a), self.space(*b)
        if sa is None or sb is None:
            for s in (sa, sb):
                if s is not None:
                    self.blocked.setdefault(s.key, Skip(node, "coupled to an axis of unknown size"))
            return False
        fits = offset + sa.size * block <= sb.size if partial else sa.size * block == sb.size
        if not fits:
            reason = f"sizes do not match ({sa.size} x {block} + {offset} vs {sb.size})"
            self.blocked.setdefault(sa.key, Skip(node, reason))
            self.blocked.setdefault(sb.key, Skip(node, reason))
            return False
        for i in range(sa.size):
            start = sb.base + offset + i * block
            for j in range(start, start + block):
                self._union(sa.base + i, j)
        return True

    def unite_within(self, value: str, axis: int, block: int, node: str) -> bool:
        """Make each run of ``block`` consecutive elements of a space one unit (groups)."""
        space = self.space(value, axis)
        if space is None or space.size % block:
            return False
        for start in range(space.base, space.base + space.size, block):
            for j in range(start + 1, start + block):
                self._union(start, j)
        return True
