"""Dims that symbolic shape inference leaves unknown, read from runs of the model.

onnx's inference loses track of dims computed at run time: torchscript exports of BERT-like
models build their attention mask with ``Equal``/``Where``/``Expand`` and their head
reshapes from ``Shape``/``Gather`` arithmetic, and inference answers with fresh symbols
(``unk__15`` for the mask's head axis, which is 1; ``unk__22`` for a head axis of 12; a new
symbol for each reshape of the sequence axis). Channel analysis then cannot tell a broadcast
from a coupled axis, nor match a reshape's axes, and blocks the heads.

Where such dims exist (symbols that are not the graph inputs' own, or unknown dims), the
model runs three times in onnxruntime on zero-filled inputs whose symbolic dims take
different values (the ``k``-th input symbol is ``p, q, 8q + 1`` for ``(p, q) = PRIMES[k]``:
small primes, then a size large enough that strided downsampling by up to 32 cannot make a
moving dim look fixed), and each such dim is rewritten from what it measured:

* the same size in all runs: that static size (it does not follow the inputs' sizes);
* an input symbol's values: that symbol (``seq`` again, wherever inference lost it);
* anything else: one symbol per triple of sizes (``dim_24_36_300`` for ``batch * 12``), so
  dims that change alike are equal again.

Static dims from inference are never changed, and nothing happens when every symbolic dim is
an input's own (a CNN with a dynamic batch). If the model cannot run on zeros (an input used
as a shape or an index that must be positive), the symbolic shapes are kept as they are.
A size that depends on input *values* rather than sizes reads as what zeros give: 0 for
NonZero, Range or TopK bounds (no channel space: the axis stays blocked), but 1 for, say,
``Unique`` of zeros, which would look like a broadcast axis; exports of the models pruned
here do not size channel axes that way. If the runs fail, the analysis goes on with the
symbolic shapes (logged at info level: attention heads of such an export stay blocked).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

__all__ = ["PRIMES", "refine_symbolic_dims"]

logger = logging.getLogger(__name__)

Dims = tuple[int | str | None, ...]

#: The first two sizes an input symbol takes (distinct primes); the third is ``8 * q + 1``.
PRIMES = ((2, 3), (5, 7), (11, 13), (17, 19), (23, 29), (31, 37))


def _sizes(k: int) -> tuple[int, int, int]:
    p, q = PRIMES[k]
    return (p, q, 8 * q + 1)


def _input_symbols(model: ir.Model, shapes: Mapping[str, Dims]) -> list[str] | None:
    """The graph inputs' symbols in order; None when an input dim is unknown."""
    found: list[str] = []
    for value in model.graph.inputs:
        if value.name is None or value.name in model.graph.initializers:
            continue
        for dim in shapes.get(value.name, ()):
            if dim is None:
                return None
            if isinstance(dim, str) and dim not in found:
                found.append(dim)
    return found


def _feeds(
    model: ir.Model, shapes: Mapping[str, Dims], symbols: list[str]
) -> list[dict[str, np.ndarray]]:
    feeds: list[dict[str, np.ndarray]] = [{}, {}, {}]
    for value in model.graph.inputs:
        name = value.name
        if name is None or name in model.graph.initializers:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        for run, feed in enumerate(feeds):
            bound = [
                _sizes(symbols.index(d))[run] if isinstance(d, str) else int(d or 0)
                for d in shapes[name]
            ]
            feed[name] = np.zeros(bound, dtype=dtype)
    return feeds


def refine_symbolic_dims(model: ir.Model, shapes: Mapping[str, Dims]) -> dict[str, Dims]:
    """``shapes`` with run-time-computed symbolic dims measured (see the module docstring)."""
    result = dict(shapes)
    symbols = _input_symbols(model, shapes)
    if symbols is None or len(symbols) > len(PRIMES):
        return result
    known = set(symbols)
    outputs = {v.name for node in model.graph for v in node.outputs if v is not None and v.name}
    wanted = [
        name
        for name, dims in shapes.items()
        if name in outputs
        and any(d is None or (isinstance(d, str) and d not in known) for d in dims)
    ]
    if not wanted:
        return result
    from onnxprune.intermediates import session_with_outputs

    try:
        with session_with_outputs(model, wanted) as session:
            runs = [
                dict(zip(wanted, (np.shape(o) for o in session.run(wanted, feed)), strict=True))
                for feed in _feeds(model, shapes, symbols)
            ]
    except Exception as error:  # any failure keeps the symbolic shapes
        logger.info("run-time shapes not measured, symbolic ones kept: %s", error)
        return result
    by_sizes: dict[tuple[int, ...], str] = {_sizes(k): s for k, s in enumerate(symbols)}
    for name in wanted:
        measured, old = [run[name] for run in runs], shapes[name]
        if any(len(m) != len(old) for m in measured):
            continue
        new: list[int | str | None] = []
        for axis, dim in enumerate(old):
            sizes = tuple(int(m[axis]) for m in measured)
            if isinstance(dim, int):
                new.append(dim)
            elif len(set(sizes)) == 1:
                new.append(sizes[0])
            else:
                new.append(by_sizes.get(sizes) or "dim_" + "_".join(map(str, sizes)))
        result[name] = tuple(new)
    return result
