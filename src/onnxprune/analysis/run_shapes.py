"""Dims that symbolic shape inference leaves unknown, read from two runs of the model.

onnx's inference loses track of dims computed at run time: torchscript exports of BERT-like
models build their attention mask with ``Equal``/``Where``/``Expand`` and their head
reshapes from ``Shape``/``Gather`` arithmetic, and inference answers with fresh symbols
(``unk__15`` for the mask's head axis, which is 1; ``unk__22`` for a head axis of 12; a new
symbol for each reshape of the sequence axis). Channel analysis then cannot tell a broadcast
from a coupled axis, nor match a reshape's axes, and blocks the heads.

Where such dims exist (symbols that are not the graph inputs' own, or unknown dims), the
model runs twice in onnxruntime on zero-filled inputs whose symbolic dims take two different
values (the ``k``-th input symbol is ``PRIMES[k][0]`` in the first run and ``PRIMES[k][1]`` in
the second), and each such dim is rewritten from what it measured:

* the same size in both runs: that static size (it does not follow the inputs' sizes);
* an input symbol's two values: that symbol (``seq`` again, wherever inference lost it);
* anything else: one symbol per pair of sizes (``dim_24_36`` for ``batch * 12``), so dims
  that change alike are equal again.

Static dims from inference are never changed, and nothing happens when every symbolic dim is
an input's own (a CNN with a dynamic batch). If the model cannot run on zeros (an input used
as a shape or an index that must be positive), the symbolic shapes are kept as they are.
A size that depends on input *values* rather than sizes (NonZero) would read as static; the
channel rules only use such a size where it is coupled to a channel axis of the same size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

__all__ = ["PRIMES", "refine_symbolic_dims"]

logger = logging.getLogger(__name__)

Dims = tuple[int | str | None, ...]

#: The sizes an input symbol takes in the two runs (distinct primes: unlikely to collide).
PRIMES = ((2, 3), (5, 7), (11, 13), (17, 19), (23, 29), (31, 37))


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
    feeds: list[dict[str, np.ndarray]] = [{}, {}]
    for value in model.graph.inputs:
        name = value.name
        if name is None or name in model.graph.initializers:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        for run, feed in enumerate(feeds):
            bound = [
                PRIMES[symbols.index(d)][run] if isinstance(d, str) else int(d or 0)
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
    except Exception as error:
        logger.debug("run-time shapes not measured: %s", error)
        return result
    by_sizes = {PRIMES[k]: symbol for k, symbol in enumerate(symbols)}
    for name in wanted:
        first, second, old = runs[0][name], runs[1][name], shapes[name]
        if len(first) != len(old) or len(second) != len(old):
            continue
        new: list[int | str | None] = []
        for dim, a, b in zip(old, first, second, strict=True):
            if isinstance(dim, int):
                new.append(dim)
            elif a == b:
                new.append(int(a))
            else:
                new.append(by_sizes.get((int(a), int(b)), f"dim_{a}_{b}"))
        result[name] = tuple(new)
    return result
