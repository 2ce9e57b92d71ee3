"""Run a model step by step, each step cut to the nodes its targets depend on.

The sequential bias correction (:mod:`onnxprune.quant.bias`) measures one layer per step on
both the float reference and the quantized model. Running the full models per layer costs
``O(layers^2)``; instead each step runs a *cut model*: the nodes its target tensors depend
on, back to tensors cached at earlier steps (fed as graph inputs). A :class:`Side` is one
model with its per-step targets and the tensors where it may be cut; a :class:`Cache` keeps
the tensors later steps read, for every feed, within one byte budget (those read soonest are
kept, the others recomputed from further back: always exact).

Cutting must not change which onnxruntime kernels run, or the values would differ from the
full model's:

* the quantized model is only cut at int8 ``QuantizeLinear`` outputs read only by
  ``DequantizeLinear`` nodes (:func:`int8_outputs`): the outputs of the fused int8 kernels,
  so the cut model fuses the same way;
* the float model is not cut where onnxruntime's blocked (NCHWc) layout would change the
  summation order of a pooling op downstream, nor at inputs of an Add a Conv could fuse
  with (:func:`float_cuts`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxprune.io.pinned import in_memory
from onnxprune.quant.rewrite import values_by_name
from onnxprune.runtime import make_session

__all__ = [
    "FLOAT",
    "QUANT",
    "Cache",
    "Key",
    "Run",
    "Side",
    "downstream",
    "float_cuts",
    "int8_outputs",
    "node_reads",
    "paired_outputs",
    "shared_outputs",
    "step_run",
]

# Cut models are handed to onnxruntime in memory up to this many bytes of initializers
# (protobuf's 2 GB limit); larger ones are saved with external data first.
_IN_MEMORY_BYTES = 1 << 30

FLOAT, QUANT = 0, 1
Key = tuple[int, str]


def node_reads(node: ir.Node) -> list[ir.Value]:
    """The values ``node`` reads, those read by its subgraphs included."""
    reads = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            graphs = attr.value if attr.type == ir.AttributeType.GRAPHS else [attr.value]
            for sub in graphs:
                reads.extend(
                    v
                    for n in ir.traversal.RecursiveGraphIterator(sub)
                    for v in n.inputs
                    if v is not None
                )
    return reads


def downstream(value: ir.Value) -> set[str]:
    """Names of the values computed from ``value``."""
    stack, seen, names = [value], set(), set()
    while stack:
        for use in stack.pop().uses():
            if id(use.node) not in seen:
                seen.add(id(use.node))
                for out in use.node.outputs:
                    names.add(out.name or "")
                    stack.append(out)
    return names


def int8_outputs(model: ir.Model) -> set[str]:
    """QuantizeLinear outputs read only by DequantizeLinear nodes: the int8 outputs of
    onnxruntime's fused kernels, where the quantized model can be cut without changing its
    fusions."""
    names = set()
    for node in model.graph:
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        out = node.outputs[0]
        uses = list(out.uses())
        if uses and all(u.node.op_type == "DequantizeLinear" for u in uses):
            names.add(out.name or "")
    return names


# Float ops that onnxruntime runs in its blocked (NCHWc) layout when their input is blocked
# (the output of a Conv, which is blocked whatever its input, or of one of these ops): a
# cut tensor enters a cut model in the plain layout, so the ops downstream of it up to the
# next Conv run plain. The ops below sum in another order when plain: no tensor from which
# one of them is reached through layout-keeping ops is cut.
_LAYOUT_SENSITIVE = frozenset(
    {"AveragePool", "GlobalAveragePool", "LpPool", "GlobalLpPool", "BatchNormalization"}
    | {"Resize", "Upsample"}
)
_LAYOUT_KEEPING = _LAYOUT_SENSITIVE | frozenset(
    {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Relu", "Clip", "Sigmoid", "Tanh"}
    | {"LeakyRelu", "HardSigmoid", "HardSwish", "MaxPool", "GlobalMaxPool", "Concat"}
    | {"Identity", "Dropout"}
)


def float_cuts(model: ir.Model, exposed: set[str]) -> set[str]:
    """Float tensors where the reference model can be cut with the same rounding.

    Not those that reach a :data:`_LAYOUT_SENSITIVE` op through :data:`_LAYOUT_KEEPING`
    ones, nor the inputs of an Add/Sum that onnxruntime could fuse with a Conv producing
    another of its inputs (a Conv output not exposed anyway): cutting there would change
    the kernels that run.
    """
    sensitive: set[str] = set()
    for node in reversed(list(model.graph)):
        if node.op_type in _LAYOUT_SENSITIVE or (
            node.op_type in _LAYOUT_KEEPING and any(o.name in sensitive for o in node.outputs)
        ):
            sensitive.update(v.name or "" for v in node.inputs if v is not None)

    def fusable(node: ir.Node) -> bool:
        return node.op_type in ("Add", "Sum") and any(
            v is not None
            and v.name not in exposed
            and (p := v.producer()) is not None
            and p.op_type == "Conv"
            for v in node.inputs
        )

    return {
        out.name
        for node in model.graph
        for out in node.outputs
        if out.name
        and out.name not in sensitive
        and not any(fusable(use.node) for use in out.uses())
    }


@dataclasses.dataclass
class Side:
    """One model (the float reference or the quantized one) cut, per layer, to the nodes its
    targets depend on back to cached tensors (see the module docstring).

    Nodes and initializers are serialized when a cut model needs them (the corrected biases
    are read from ``model`` itself); nothing else of the model is copied.
    """

    key: int
    model: ir.Model
    targets: list[tuple[str, ...]]
    cuttable: set[str] | None  # None: any tensor
    exposed: set[str]  # graph outputs whenever computed (as in the full-model path)
    values: dict[str, ir.Value]
    index: dict[int, int]
    template: onnx.ModelProto
    nodes: dict[int, onnx.NodeProto] = dataclasses.field(default_factory=dict)
    # All feeds of the same shapes: cut inputs take the cached arrays' shapes (concrete, as
    # onnxruntime infers them in the full model); else the model's declared shapes.
    fixed_shapes: bool = True

    @classmethod
    def build(
        cls,
        key: int,
        model: ir.Model,
        targets: list[tuple[str, ...]],
        cuttable: set[str] | None,
        exposed: set[str],
    ) -> Side:
        empty = ir.Model(
            ir.Graph([], [], nodes=[], opset_imports=model.graph.opset_imports),
            ir_version=model.ir_version,
            producer_name=model.producer_name,
            functions=list(model.functions.values()),
        )
        template = ir.serde.serialize_model(empty)
        index = {id(node): i for i, node in enumerate(model.graph)}
        values = values_by_name(model.graph)
        return cls(key, model, targets, cuttable, exposed, values, index, template)

    def can_cut(self, name: str) -> bool:
        return self.cuttable is None or name in self.cuttable

    def ancestors(self, targets: Sequence[str], stop: set[str]) -> tuple[list[ir.Node], list[str]]:
        """The nodes ``targets`` depend on back to the ``stop`` tensors (graph order), and the
        stop tensors read."""
        stack = [self.values[t] for t in targets]
        seen: set[int] = set()
        visited = set(targets)
        keep: list[ir.Node] = []
        cuts: list[str] = []
        while stack:
            value = stack.pop()
            if value.name in stop:
                cuts.append(value.name or "")
                continue
            node = value.producer()
            if node is None or id(node) not in self.index or id(node) in seen:
                continue
            seen.add(id(node))
            keep.append(node)
            for read in node_reads(node):
                if read.name not in visited:
                    visited.add(read.name or "")
                    stack.append(read)
        keep.sort(key=lambda n: self.index[id(n)])
        return keep, sorted(cuts)

    def plan_uses(self, invalidated: Sequence[set[str]] = ()) -> dict[str, list[int]]:
        """Per cuttable tensor, the steps reading it from the cache, were nothing evicted.

        Every cuttable tensor computed is cached, and those in ``invalidated[step]`` are
        dropped after the step (the tensors downstream of a corrected bias).
        """
        cached: set[str] = set()
        uses: dict[str, list[int]] = {}
        for step, targets in enumerate(self.targets):
            for t in targets:
                if t in cached:
                    uses.setdefault(t, []).append(step)
            missing = [t for t in dict.fromkeys(targets) if t not in cached]
            nodes, cuts = self.ancestors(missing, cached) if missing else ([], [])
            for cut in cuts:
                uses.setdefault(cut, []).append(step)
            cached.update(
                o.name or "" for n in nodes for o in n.outputs if o.name and self.can_cut(o.name)
            )
            if step < len(invalidated):
                cached -= invalidated[step]
        return uses

    def _node(self, node: ir.Node) -> onnx.NodeProto:
        position = self.index[id(node)]
        if position not in self.nodes:
            self.nodes[position] = ir.serde.serialize_node(node)
        return self.nodes[position]

    def proto(
        self,
        nodes: Sequence[ir.Node],
        cuts: Mapping[str, np.ndarray],
        outputs: Sequence[str],
    ) -> tuple[onnx.ModelProto, int]:
        """The model of ``nodes``, its inputs the graph inputs it reads and the ``cuts`` (typed
        like the arrays given), outputs ``outputs``; and its initializers' bytes."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.template)
        g = proto.graph
        g.node.extend(self._node(n) for n in nodes)
        produced = {o.name for n in nodes for o in n.outputs}
        read = dict.fromkeys(v.name for n in nodes for v in node_reads(n))
        initializers = self.model.graph.initializers
        size = 0
        graph_inputs = {v.name for v in self.model.graph.inputs}
        for name in read:
            value = initializers.get(name or "")
            if value is not None and value.const_value is not None and name not in cuts:
                size += value.const_value.nbytes
                g.initializer.append(ir.serde.serialize_tensor(in_memory(value.const_value)))
            elif name in graph_inputs and name not in cuts:
                g.input.append(ir.serde.serialize_value(self.values[name or ""]))
        # With control flow, concrete cut shapes let onnxruntime fold If conditions that the
        # full model only knows at run time and inline a branch (a different graph; on
        # silero-vad its QDQ propagation then aborts the process): keep the declared shapes.
        fixed = self.fixed_shapes and not any(_has_subgraph(n) for n in nodes)
        for cut, array in cuts.items():
            elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            shape = array.shape if fixed else _declared(self.values[cut], array)
            g.input.append(onnx.helper.make_tensor_value_info(cut, elem, shape))
        for out in outputs:
            g.output.append(ir.serde.serialize_value(self.values[out]))
        g.value_info.extend(
            ir.serde.serialize_value(self.values[name])
            for name in produced
            if name and name not in outputs and self.values[name].type is not None
        )
        return proto, size


def _has_subgraph(node: ir.Node) -> bool:
    return any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for attr in node.attributes.values()
    )


def _declared(value: ir.Value, array: np.ndarray) -> list[int | str | None]:
    """``value``'s declared shape (symbolic dimensions kept), else ``array``'s rank."""
    if value.shape is None or len(value.shape) != array.ndim:
        return [None] * array.ndim
    return [d if isinstance(d, int) else d.value for d in value.shape]


@contextlib.contextmanager
def segment_session(proto: onnx.ModelProto, size: int) -> Iterator[ort.InferenceSession]:
    """A session (optimizations on) of ``proto``, handed over in memory when it is small
    enough for protobuf (2 GB), else saved with external data."""
    if size <= _IN_MEMORY_BYTES:
        session = make_session(proto, optimize=True)
        try:
            yield session
        finally:
            del session
        return
    with tempfile.TemporaryDirectory(prefix="onnxprune-bias-") as folder:
        path = Path(folder) / "model.onnx"
        onnx.save_model(proto, path, save_as_external_data=True, location="model.data")
        session = make_session(path, optimize=True)
        try:
            yield session
        finally:
            del session  # release the file before the folder is removed


@dataclasses.dataclass
class Cache:
    """The tensors kept between steps, per feed, both models together, within ``budget``
    bytes. A tensor is kept while a later step reads it (``uses``, from the plan of both
    models); when they do not all fit, those read soonest are kept, the others are
    recomputed from further back when needed."""

    budget: int
    uses: dict[Key, list[int]]
    count: int
    arrays: dict[Key, list[np.ndarray | None]] = dataclasses.field(default_factory=dict)
    nbytes: dict[Key, int] = dataclasses.field(default_factory=dict)
    peak: int = 0
    _admitted: list[Key] = dataclasses.field(default_factory=list)
    _releasing: set[Key] = dataclasses.field(default_factory=set)
    _inputs: set[Key] = dataclasses.field(default_factory=set)
    _step: int = 0
    _held: int = 0  # bytes of the arrays held now (kept up to date, not summed per feed)

    def next_use(self, key: Key, step: int) -> int | None:
        return next((s for s in self.uses.get(key, ()) if s > step), None)

    def names(self, side: int) -> set[str]:
        return {name for k, name in self.arrays if k == side}

    def get(self, key: Key, feed: int) -> np.ndarray:
        array = self.arrays[key][feed]
        assert array is not None
        return array

    def begin(self, step: int, inputs: set[Key]) -> None:
        """Start ``step``, which reads the cached ``inputs``."""
        self._step, self._inputs = step, inputs
        self._admitted, self._releasing = [], set()

    def admit(self, produced: Mapping[Key, np.ndarray]) -> None:
        """Choose, on the first feed's values, the tensors kept after this step among the
        cached ones and ``produced`` (sizes scaled to all feeds)."""
        sizes = dict(self.nbytes)
        sizes.update(
            (k, a.nbytes * self.count) for k, a in produced.items() if k not in self.arrays
        )
        wanted = []
        for key, size in sizes.items():
            use = self.next_use(key, self._step)
            if use is not None:
                wanted.append((use, key, size))
        kept, total = set(), 0
        for _, key, size in sorted(wanted):
            if total + size <= self.budget:
                kept.add(key)
                total += size
        for key in list(self.arrays):
            if key not in kept:
                if key in self._inputs:
                    self._releasing.add(key)
                else:
                    self._drop(key)
        self._admitted = [k for k in produced if k in kept and k not in self.arrays]
        for key in self._admitted:
            self.arrays[key], self.nbytes[key] = [], 0

    def store(self, feed: int, produced: Mapping[Key, np.ndarray]) -> None:
        """Keep the admitted tensors of ``feed`` and release the inputs no longer needed."""
        for key in self._admitted:
            self.arrays[key].append(np.array(produced[key]))  # own copy, see Cache
            self.nbytes[key] += produced[key].nbytes
            self._held += produced[key].nbytes
        for key in self._releasing:
            released = self.arrays[key][feed]
            if released is not None:
                self._held -= released.nbytes
            self.arrays[key][feed] = None
        self.peak = max(self.peak, self._held)

    def end(self) -> None:
        """Finish the step: drop the released tensors; beyond the budget (feeds of other
        shapes than the first), those read last."""
        for key in self._releasing:
            self._drop(key)
        self._releasing = set()
        order = sorted(self.arrays, key=lambda k: (self.next_use(k, self._step) or 0, k))
        while self.held() > self.budget and order:
            self._drop(order.pop())

    def held(self) -> int:
        return self._held

    def invalidate(self, side: int, names: set[str]) -> None:
        for key in [k for k in self.arrays if k[0] == side and k[1] in names]:
            self._drop(key)

    def _drop(self, key: Key) -> None:
        self._held -= sum(a.nbytes for a in self.arrays[key] if a is not None)
        del self.arrays[key], self.nbytes[key]


@dataclasses.dataclass
class Run:
    """One step of one side: its cut model's session and where its inputs come from."""

    side: Side
    session: ort.InferenceSession | None
    outputs: list[str]
    cuts: list[str]
    cached: list[str]  # targets read from the cache
    inputs: list[str]  # graph inputs read

    def __call__(
        self, cache: Cache, feed: int, values: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        key = self.side.key
        got = {t: cache.get((key, t), feed) for t in self.cached}
        if self.session is not None:
            inputs = {n: values[n] for n in self.inputs}
            inputs.update((c, cache.get((key, c), feed)) for c in self.cuts)
            got.update(zip(self.outputs, self.session.run(self.outputs, inputs), strict=True))
        return got


@contextlib.contextmanager
def step_run(side: Side, step: int, cache: Cache) -> Iterator[Run]:
    """The cut model of ``side`` computing its targets of ``step`` and the cuttable tensors
    that later steps read."""
    stop = cache.names(side.key)
    targets = list(dict.fromkeys(side.targets[step]))
    cached = [t for t in targets if t in stop]
    missing = [t for t in targets if t not in stop]
    if not missing:
        yield Run(side, None, [], [], cached, [])
        return
    nodes, cuts = side.ancestors(missing, stop)
    later = [
        o.name
        for n in nodes
        for o in n.outputs
        if o.name
        and o.name not in missing
        and side.can_cut(o.name)
        and cache.next_use((side.key, o.name), step) is not None
    ]
    outputs = [*missing, *later]
    exposed = [
        o.name for n in nodes for o in n.outputs if o.name in side.exposed and o.name not in outputs
    ]
    cut_arrays = {c: cache.get((side.key, c), 0) for c in cuts}
    proto, size = side.proto(nodes, cut_arrays, [*outputs, *exposed])
    inputs = [v.name for v in proto.graph.input if v.name not in cuts]
    del nodes, cut_arrays
    with segment_session(proto, size) as session:
        del proto
        yield Run(side, session, outputs, cuts, cached, inputs)


def paired_outputs(
    sides: Sequence[Side],
    step: int,
    cache: Cache,
    feeds: Sequence[Mapping[str, np.ndarray]],
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """``(float outputs, quantized outputs)`` of ``step``'s cut models, feed by feed
    (:func:`shared_outputs` with one quantized side)."""
    for ref, (cand,) in shared_outputs(sides, step, cache, feeds):
        yield ref, cand


def shared_outputs(
    sides: Sequence[Side],
    step: int,
    cache: Cache,
    feeds: Iterable[Mapping[str, np.ndarray]],
) -> Iterator[tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]]:
    """``(float outputs, [outputs of each quantized side])`` of ``step``'s cut models, feed
    by feed: ``sides[0]`` is the float model, run once for all the others (variants of one
    quantized model, e.g. corrected with different settings, each with its own cache key).

    The float cut model runs on a worker thread while the quantized ones run in turn on
    this one; what later steps read is stored in ``cache``. Consume the whole iterator: the
    cache's step ends after the last feed.
    """
    with contextlib.ExitStack() as stack:
        runs = [stack.enter_context(step_run(side, step, cache)) for side in sides]
        cache.begin(step, {(r.side.key, c) for r in runs for c in [*r.cuts, *r.cached]})
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        for i, feed in enumerate(feeds):
            pending = pool.submit(runs[0], cache, i, feed)
            cands = [run(cache, i, feed) for run in runs[1:]]
            ref = pending.result()
            produced: dict[Key, np.ndarray] = {}
            for run, out in zip(runs, [ref, *cands], strict=True):
                produced.update(((run.side.key, n), v) for n, v in out.items())
            if i == 0:
                cache.admit(produced)
            cache.store(i, produced)
            del produced
            yield ref, cands
        cache.end()
