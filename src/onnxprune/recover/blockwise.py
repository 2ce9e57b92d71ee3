"""Block-wise distillation: train the student one segment at a time on the teacher's tensors.

End-to-end distillation learns from the outputs alone, a few numbers per sample for a
classifier; a pruned network has millions of weights, so a few hundred unlabeled samples
fit the training samples and little else. Block-wise distillation (as in BRECQ's block
reconstruction) supervises every segment with the teacher's whole intermediate tensor, many
values per sample:

* **Cuts** (:func:`cut_points`): tensors that every path from the graph inputs to the outputs
  passes through (after their producer, no other computed value is still needed) but *side
  values* that depend on no weight (a transformer's attention mask built from an input,
  shapes, positions: without them no tensor of a transformer is a cut), present in both
  graphs with the same shape on a feed (a pruned residual stream with fewer channels is
  not a cut; its segment runs on to the next one), and not read only by an activation (the
  tensor after it is the cut). The cuts split the student into segments;
  a segment without a trainable weight joins the next one. Side values are carried from
  segment to segment (each model its own) and never matched.
* **Segment k** is trained with Adam to minimise ``||f_k(x_s) - y_t||^2 / ||y_t||^2``, where
  ``x_s`` is the *student's* tensor at the previous cut (carrying every earlier segment's
  training and error) and ``y_t`` the *teacher's* tensor at the segment's cut (the asymmetric
  target of GPTQ-style sequential reconstruction); the last segment uses the distillation
  loss of the outputs (KL for class scores). Both sides are replayed in torch segment by
  segment (:meth:`GraphReplay.forward_from`): each feed's values at the current cut are kept,
  one cut at a time.
* The held-out feeds pick each segment's best step (early stopping, patience) and, with
  ``lr_search``, its learning rate; a segment whose held-out loss never falls keeps its
  weights; a segment whose held-out error at its cut is already below :data:`CLOSE_ENOUGH`
  is not trained (its share of a time budget goes to the later ones). The final keep
  decision is :func:`onnxprune.recover.distill.distill`'s: held-out fidelity of the whole
  model in onnxruntime.

Memory: each feed's student tensor at the current cut, and the teacher's at the current cut
and at the segment's end (while the segment trains).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from onnxprune.errors import UsageError
from onnxprune.passes._match import name_of
from onnxprune.progress import Progress
from onnxprune.recover.distill import search_rate, shuffled_batches, stack_feeds
from onnxprune.recover.replay import GraphReplay, ReplayError

__all__ = ["Segment", "cut_points", "segments"]

Values = dict[str, np.ndarray]


_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


#: Ops whose outputs are integers whatever their input (a shape, an index).
_INTEGER_OPS = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})


def _heavy_values(model: ir.Model, constant: set[str]) -> set[str]:
    """Computed float values that depend on a weight (a float constant of rank >= 2): the
    data stream. Everything else (an attention mask made from an input, a shape, a position
    index) is a *side* value a segment can take along without being trained on."""
    graph = model.graph
    floats = {
        name: v.const_value
        for name, v in graph.initializers.items()
        if v.const_value is not None and v.const_value.dtype in _FLOAT_TYPES
    }
    weights = {name for name, t in floats.items() if len(t.shape) >= 2}
    # computed from a float array of the model: a weight decoded from its bitmask storage
    arrays = {name for name, t in floats.items() if t.size > 1}
    heavy: set[str] = set()
    for node in graph:
        if node.op_type in _INTEGER_OPS:
            continue
        names = [v.name for v in node.inputs if v is not None]
        if all(n in constant for n in names):
            if any(n in weights or n in arrays for n in names):
                weights.update(v.name for v in node.outputs if v.name)
        elif any(n in heavy or n in weights for n in names):
            heavy.update(
                v.name
                for v in node.outputs
                if v.name and v.name not in constant and v.dtype in (*_FLOAT_TYPES, None)
            )
    return heavy


def cut_points(model: ir.Model) -> list[tuple[str, ...]]:
    """Points where one computed value that depends on a weight is, with side values that do
    not (:func:`_heavy_values`), all that later nodes or the outputs still need, in graph
    order: ``(value, *sides)`` with the sides sorted. In a transformer the attention mask
    built from an input stays live through every layer; each layer's hidden state is a cut
    with the mask as its side value."""
    graph = model.graph
    constant = set(graph.initializers)
    nodes = list(graph)
    for node in nodes:
        if all(v is None or v.name in constant for v in node.inputs) and not any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        ):
            constant.update(v.name for v in node.outputs if v.name)
    heavy = _heavy_values(model, constant)
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for v in node.inputs:
            if v is not None and v.name and v.name not in constant:
                last[v.name] = index
    outputs = {name_of(v) for v in graph.outputs}
    end = len(nodes)
    for name in outputs:
        last[name] = end
    live = {name_of(v) for v in graph.inputs if name_of(v) in last}
    cuts: list[tuple[str, ...]] = []
    for index, node in enumerate(nodes):
        live -= {name_of(v) for v in node.inputs if v is not None and last.get(name_of(v)) == index}
        live |= {
            name_of(v)
            for v in node.outputs
            if name_of(v) not in constant and last.get(name_of(v), -1) > index
        }
        main = live & heavy if len(live) > 1 else live
        if len(main) == 1 and not main & outputs:
            (name,) = main
            if cuts and cuts[-1][0] == name:  # side values computed meanwhile: the later
                cuts.pop()  # point has them all
            cuts.append((name, *sorted(live - main)))
    return cuts


#: Elementwise nonlinearities: a cut right before one is moved past it.
ACTIVATIONS = frozenset(
    {"Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
     "Elu", "Selu", "Celu", "Softplus", "Gelu", "Mish", "ThresholdedRelu"}
)  # fmt: skip


def _before_activation(value: ir.Value) -> bool:
    """Whether every use of ``value`` is an activation: matching the tensor before it would
    spend the segment on values the activation discards (the zoo's int8 MobileNetV2: cut
    before a ReLU6, a segment went from 4.3 to 16.0 dB there while the clipped tensor that
    the next layer reads fell from 20.2 to 12.9 dB)."""
    uses = list(value.uses())
    return bool(uses) and all(u.node.op_type in ACTIVATIONS for u in uses)


@dataclasses.dataclass
class Segment:
    """Student nodes from ``start`` (tensor names) to ``end``; the weights trained there."""

    start: list[str]
    end: list[str]
    params: list[str]
    last: bool
    #: the teacher's tensors at the same cuts (its side values may differ): None, the same
    teacher_start: list[str] | None = None
    teacher_end: list[str] | None = None

    @property
    def t_start(self) -> list[str]:
        return self.start if self.teacher_start is None else self.teacher_start

    @property
    def t_end(self) -> list[str]:
        return self.end if self.teacher_end is None else self.teacher_end

    @property
    def targets(self) -> list[str]:
        """What the segment is trained to match: the outputs (last), else the cut's value
        (its side values are carried along, not matched)."""
        return list(self.end) if self.last else self.end[:1]


#: A segment whose held-out normalised squared error at its end is below this (40 dB) is
#: not trained: the zoo's MobileNetV2 sparsified to 50 % spent 288 of 600 s on its first
#: four segments (errors 1e-6 to 2e-5) and left one step for each of the late ones.
CLOSE_ENOUGH = 1e-4

#: Ops that count as a layer for ``min_layers``.
LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def segments(
    student: GraphReplay,
    teacher: GraphReplay,
    cuts: Sequence[Sequence[str]],
    outputs: Sequence[str],
    min_layers: int = 1,
    *,
    teacher_cuts: Mapping[str, Sequence[str]] | None = None,
) -> list[Segment]:
    """Split at ``cuts`` (valid in both replays; ``teacher_cuts`` maps a cut's value to the
    teacher's cut there where its side values differ): a segment ends at the first cut
    after it holds ``min_layers`` layers with a trainable weight; what is left joins the
    last one."""
    found: list[Segment] = []
    memo: dict[str, bool] = {}
    trained = set(student._key)
    start, t_start = list(student.input_names), list(teacher.input_names)
    bounds = [(list(c), list((teacher_cuts or {}).get(c[0], c))) for c in cuts]
    bounds.append((list(outputs), list(outputs)))
    for index, (end, t_end) in enumerate(bounds):
        last = index == len(bounds) - 1
        try:
            plan = student.segment_plan(start, end)
            teacher.segment_plan(t_start, t_end)
        except ReplayError:
            continue  # not a cut of the teacher, or through a node run in onnxruntime
        used = {n for step in plan for n in step.inputs}
        params = [n for n in student._key if n in used]
        layers = sum(
            step.op_type in LAYERS
            and any(n and _weight_of(student, n, trained, memo) for n in step.inputs)
            for step in plan
        )
        if (params and layers >= min_layers) or last:
            found.append(Segment(start, end, params, last, t_start, t_end))
            start, t_start = end, t_end
    if len(found) > 1 and not found[-1].params:  # nothing to train after the last cut
        tail, prev = found.pop(), found[-1]
        found[-1] = Segment(prev.start, tail.end, prev.params, True, prev.t_start, tail.t_end)
    if not found or not found[-1].last or not any(part.params for part in found):
        raise UsageError("block-wise distillation could not split the model into segments")
    return found


def _weight_of(
    replay: GraphReplay, name: str, params: Collection[str], memo: dict[str, bool]
) -> bool:
    """Whether ``name`` is computed from trained weights and constants alone (a
    DequantizeLinear of an int8 weight, a weight decoded from its bitmask storage)."""
    if name in params:
        return True
    if name not in memo:
        memo[name] = False  # a cycle or a graph input reads as "not a weight"
        producer = replay._producers.get(name)
        inputs = [n for n in producer.inputs if n] if producer is not None else []
        known = [n for n in inputs if n not in replay._constants_env]
        memo[name] = bool(known) and all(_weight_of(replay, n, params, memo) for n in known)
    return memo[name]


@dataclasses.dataclass
class SegmentRun:
    """What one segment's training did (for the report)."""

    end: list[str]
    params: int
    steps: int
    best_step: int
    held_before: float
    held_after: float
    lr: float
    seconds: float
    #: the time budget ended this segment's training (the result depends on the machine)
    stopped_by_budget: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["held_before"] = round(self.held_before, 6)
        data["held_after"] = round(self.held_after, 6)
        data["seconds"] = round(self.seconds, 2)
        return data


def _stack(items: Sequence[Values]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(a) for n, a in stack_feeds(items).items()}


def _stackable(items: Sequence[Values]) -> bool:
    first = items[0]
    return all(v.ndim > 0 and all(i[n].shape == v.shape for i in items) for n, v in first.items())


def _chunks(count: int, size: int) -> Iterator[list[int]]:
    for begin in range(0, count, size):
        yield list(range(begin, min(count, begin + size)))


def propagate(
    replay: GraphReplay,
    values: Sequence[Values],
    end: Sequence[str],
    batch: int,
) -> list[Values]:
    """Each feed's tensors at ``end`` from its tensors at the segment's start (no gradient);
    ``batch`` feeds a forward where they stack on axis 0 (``batch`` 1: one at a time)."""
    result: list[Values] = []
    names = list(values[0])
    with torch.no_grad():
        if batch > 1 and _stackable(values):
            for chunk in _chunks(len(values), batch):
                out = replay.forward_from(_stack([values[i] for i in chunk]), end)
                split = {n: torch.chunk(out[n], len(chunk)) for n in end}
                if any(len(v) != len(chunk) for v in split.values()):
                    raise ReplayError(f"the tensors at {end[0]!r} do not split by feed", end[0])
                result += [{n: split[n][k].numpy().copy() for n in end} for k in range(len(chunk))]
            return result
        for item in values:
            out = replay.forward_from({n: torch.from_numpy(item[n]) for n in names}, end)
            result.append({n: out[n].numpy().copy() for n in end})
    return result


def train_segment(  # noqa: PLR0917 (one private call site)
    replay: GraphReplay,
    segment: Segment,
    data: tuple[list[Values], list[Values], list[Values], list[Values]],
    loss_fn: Any,
    options: Any,
    budget: float | None,
    clock: Any,
    stack: bool = True,
) -> SegmentRun:
    """Adam on the segment's weights; the best held-out state is loaded at the end."""
    fit_in, fit_out, held_in, held_out = data
    start_time = clock()
    keys = [replay._key[n] for n in segment.params]
    params = [replay.params[k] for k in keys]
    stackable = stack and _stackable(fit_in) and _stackable(fit_out)
    batch = max(1, options.batch_size)

    def loss_of(inputs: Sequence[Values], targets: Sequence[Values]) -> torch.Tensor:
        names = loss_fn.student_names
        if stackable:
            return loss_fn(replay.forward_from(_stack(inputs), names), stack_feeds(targets))
        terms = [
            loss_fn(replay.forward_from({n: torch.from_numpy(v) for n, v in i.items()}, names), t)
            for i, t in zip(inputs, targets, strict=True)
        ]
        return torch.stack(terms).mean()

    def held_loss() -> float:
        with torch.no_grad():
            losses = [
                loss_of([held_in[i] for i in c], [held_out[i] for i in c])
                for c in _chunks(len(held_in), batch)
            ]
            return float(np.mean([v.item() for v in losses]))

    def state() -> dict[str, torch.Tensor]:
        return {k: replay.params[k].detach().clone() for k in keys}

    def step(optimizer: torch.optim.Optimizer, indices: list[int]) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of([fit_in[i] for i in indices], [fit_out[i] for i in indices])
        loss.backward()
        replay.mask_gradients()
        optimizer.step()
        replay.apply_masks()

    before = held_loss()
    best, best_state, best_step = before, state(), 0
    if not params or (not segment.last and before < CLOSE_ENOUGH):
        size = sum(p.numel() for p in params)
        return SegmentRun(segment.end, size, 0, 0, before, before, 0.0, clock() - start_time)

    def out_of_time() -> bool:
        return budget is not None and clock() - start_time >= budget

    def trial(rate: float) -> float:
        replay.load(best_state)
        optimizer = torch.optim.Adam(params, lr=rate)
        order = shuffled_batches(len(fit_in), batch, np.random.default_rng(options.seed))
        for _ in range(options.lr_trial_steps):
            step(optimizer, next(order))
        return held_loss()

    lr, searched = options.lr, True
    if options.lr_search:
        chosen, trials = search_rate(options.lr_search, trial, out_of_time)
        searched = len(trials) == len(options.lr_search)
        lr = options.lr if chosen is None else chosen
        replay.load(best_state)
    optimizer = torch.optim.Adam(params, lr=lr)
    order = shuffled_batches(len(fit_in), batch, np.random.default_rng(options.seed))
    stale, done, stopped = 0, 0, not searched
    for index in range(1, options.steps + 1):
        step(optimizer, next(order))
        done = index
        stop = out_of_time()
        if index % options.eval_every == 0 or index == options.steps or stop:
            current = held_loss()
            if current < best:
                best, best_state, best_step, stale = current, state(), index, 0
            else:
                stale += 1
            if stale >= options.patience:
                break
        if stop:
            stopped = stopped or index < options.steps
            break
    replay.load(best_state)
    return SegmentRun(
        segment.end, sum(p.numel() for p in params), done, best_step, before, best, lr,
        clock() - start_time, stopped,
    )  # fmt: skip


def train_blockwise(  # noqa: PLR0917 (one private call site)
    replay: GraphReplay,
    teacher: GraphReplay,
    fit: Sequence[Mapping[str, np.ndarray]],
    held: Sequence[Mapping[str, np.ndarray]],
    outputs: Sequence[str],
    make_loss: Any,
    options: Any,
    clock: Any,
) -> list[SegmentRun]:
    """Train every segment in order; returns what each did."""
    teacher_cuts = {c[0]: c for c in cut_points(teacher.model)}
    cuts = [c for c in cut_points(replay.model) if c[0] in teacher_cuts]
    probe = {n: np.asarray(fit[0][n]) for n in replay.input_names}
    mains = [c[0] for c in cuts]
    with torch.no_grad():
        s_probe = replay(probe, mains) if cuts else {}
        t_probe = teacher(probe, mains) if cuts else {}
    values = {v.name: v for node in replay.model.graph for v in node.outputs if v.name}
    cuts = [
        c
        for c in cuts
        if s_probe[c[0]].is_floating_point()
        and tuple(s_probe[c[0]].shape) == tuple(t_probe[c[0]].shape)
        and not _before_activation(values[c[0]])
    ]
    parts = segments(
        replay, teacher, cuts, outputs, options.block_layers, teacher_cuts=teacher_cuts
    )
    inputs = [{n: np.asarray(f[n]) for n in replay.input_names} for f in (*fit, *held)]
    student_at, teacher_at = inputs, inputs
    count = len(fit)
    runs: list[SegmentRun] = []
    start = clock()
    stack = _batchable(replay, teacher, parts, inputs[:2])
    batch = max(8, options.batch_size) if stack else 1
    costs = segment_costs(replay, parts, inputs[: max(1, options.batch_size)], stack)
    with Progress(len(parts), "block-wise", enabled=options.progress) as bar:
        for index, part in enumerate(parts):
            loss_fn = make_loss(part)
            # the teacher's whole state at a cut (its value and side values) carries on
            ends = loss_fn.target_names if part.last else part.t_end
            teacher_end = propagate(teacher, teacher_at, ends, batch)
            budget = None
            if options.time_budget is not None:
                left = options.time_budget - (clock() - start)
                budget = max(0.0, left * costs[index] / sum(costs[index:]))
            data = (
                student_at[:count],
                teacher_end[:count],
                student_at[count:],
                teacher_end[count:],
            )
            runs.append(train_segment(replay, part, data, loss_fn, options, budget, clock, stack))
            bar.update(note=f"held-out {runs[-1].held_before:.3g} -> {runs[-1].held_after:.3g}")
            if part.last:
                break
            student_at = propagate(replay, student_at, part.end, batch)
            teacher_at = teacher_end
    return runs


def segment_costs(
    replay: GraphReplay, parts: Sequence[Segment], sample: Sequence[Values], stack: bool
) -> list[float]:
    """Seconds of one no-gradient forward of each segment on ``sample``: a time budget is
    shared in proportion (a segment at full resolution costs many at the end)."""
    costs = []
    values = list(sample)
    for part in parts:
        begin = time.perf_counter()
        values = propagate(replay, values, part.end, len(values) if stack else 1)
        costs.append(max(time.perf_counter() - begin, 1e-6))
    return costs


def _batchable(
    student: GraphReplay, teacher: GraphReplay, parts: Sequence[Segment], sample: Sequence[Values]
) -> bool:
    """Whether feeds stacked on axis 0 give, at every segment's end in both models, the
    feeds' own tensors stacked on axis 0 (not so for a Reshape to a fixed batch of 1, or a
    sequence-first layout whose batch is another axis)."""
    if len(sample) < 2 or not _stackable(sample):
        return False
    try:
        for replay in (student, teacher):
            one, many = list(sample), list(sample)
            for part in parts:
                end = part.end if replay is student else part.t_end
                one = propagate(replay, one, end, 1)
                many = propagate(replay, many, end, len(many))
                for a, b in zip(one, many, strict=True):
                    if any(not np.allclose(a[n], b[n], rtol=1e-4, atol=1e-5) for n in a):
                        return False
    except (ReplayError, RuntimeError, ValueError):
        return False
    return True


def elapsed_clock(budget_clock: str) -> Any:
    """A function returning seconds on the chosen clock (wall or this process's CPU)."""
    if budget_clock == "cpu":
        return time.process_time
    return time.perf_counter
