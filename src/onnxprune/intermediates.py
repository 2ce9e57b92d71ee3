"""Run a model with intermediate tensors exposed as outputs, streaming over feeds.

The model is saved (atomically, via :func:`onnxprune.io.save`) into a temporary folder with
the requested values added as graph outputs, and the in-memory model is restored at once.
Feeds are processed one at a time, so memory is bounded by one feed's intermediates; callers
that need many tensors on large models request them in chunks, which :func:`budget_chunks`
sizes from a probe run so that one chunk of one feed stays under a byte budget (a small model
then takes one pass over the feeds instead of one per fixed-size chunk).

:func:`iter_intermediates` is the usual entry point; :func:`session_with_outputs` gives the
onnxruntime session itself, for callers that run several models in lockstep.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxprune.io import save
from onnxprune.runtime import make_session

__all__ = ["DEFAULT_BUDGET", "budget_chunks", "iter_intermediates", "session_with_outputs"]

DEFAULT_BUDGET = 512 * 2**20
_PROBE_CHUNK = 64


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs if v.name is not None}
    for node in model.graph:
        for value in node.outputs:
            if value is not None and value.name:
                values[value.name] = value
    return values


@contextlib.contextmanager
def session_with_outputs(
    model: ir.Model, names: Sequence[str], *, threads: int = 1, optimize: bool = False
) -> Iterator[ort.InferenceSession]:
    """A session for a temporary copy of ``model`` whose graph also outputs ``names``.

    ``names`` are node outputs or graph inputs; graph inputs are not added as outputs (the
    caller has them in its feeds). The in-memory model is restored before this yields.
    ``optimize`` turns onnxruntime's graph optimizations on (the kernels users get; an
    exposed tensor is never fused away).

    Raises:
        KeyError: a name is neither a node output nor a graph input.
    """
    values = _values_by_name(model)
    missing = [n for n in names if n not in values]
    if missing:
        raise KeyError(f"no tensor named {missing[0]!r} in the model")
    present = {v.name for v in model.graph.outputs}
    inputs = {v.name for v in model.graph.inputs}
    added = [values[n] for n in dict.fromkeys(names) if n not in present and n not in inputs]
    with tempfile.TemporaryDirectory(prefix="onnxprune-act-") as folder:
        model.graph.outputs.extend(added)
        try:
            path = save(model, Path(folder) / "model.onnx")
        finally:
            for value in added:
                model.graph.outputs.remove(value)
        session = make_session(path, intra_op_threads=threads, optimize=optimize)
        try:
            yield session
        finally:
            del session  # release the model file before the folder is removed


def iter_intermediates(
    model: ir.Model,
    names: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    threads: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{name: array}`` for ``names`` (node outputs or graph inputs) per feed."""
    inputs = {v.name for v in model.graph.inputs}
    run_names = [n for n in names if n not in inputs]
    with session_with_outputs(model, names, threads=threads) as session:
        for feed in feeds:
            outputs = session.run(run_names, dict(feed)) if run_names else []
            result = dict(zip(run_names, outputs, strict=True))
            for name in names:
                if name in inputs:
                    result[name] = np.asarray(feed[name])
            yield result


def _elements(feed: Mapping[str, np.ndarray]) -> int:
    return sum(int(np.asarray(a).size) for a in feed.values())


def budget_chunks(
    model: ir.Model,
    names: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    budget: int = DEFAULT_BUDGET,
) -> list[list[str]]:
    """Split ``names`` into consecutive chunks whose tensors for one feed fit ``budget`` bytes.

    Sizes come from running the largest feed (by input elements; with feeds of varying shape,
    e.g. token lengths, the activations grow with the inputs), in chunks of 64 names, the
    probe's own memory bound. A tensor larger than the budget gets a chunk of its own.
    """
    if not names or not feeds:
        return [list(names)] if names else []
    probe = max(feeds, key=_elements)
    sizes: dict[str, int] = {}
    for start in range(0, len(names), _PROBE_CHUNK):
        chunk = names[start : start + _PROBE_CHUNK]
        for values in iter_intermediates(model, chunk, [probe]):
            sizes.update({n: int(a.nbytes) for n, a in values.items()})
    chunks: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = sizes.get(name, 0)
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks
