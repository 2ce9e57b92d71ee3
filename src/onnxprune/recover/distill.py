"""Distillation: the original model (onnxruntime) teaches the optimized one (torch replay).

Teacher: the original model in onnxruntime; its outputs on each (possibly augmented) feed are
computed once and cached. Student: the optimized model as a :class:`GraphReplay` whose
weight initializers are trained with Adam; nothing else of it changes.

Loss, averaged over the student's float outputs that the teacher also has:

* class scores (:func:`onnxprune.output_kinds.class_score_outputs`): ``T^2 * KL(softmax(t/T)
  || softmax(s/T))`` over the last axis, T the temperature; outputs that are already
  probabilities (rows >= 0 summing to 1) are compared through their logarithms; logits add
  ``logit_mse`` times the normalised squared error below (KL ignores a shift of a row);
* anything else: the normalised squared error ``sum((s - t)^2) / sum(t^2)`` (1 / SQNR);
* optionally intermediate tensors that exist in both graphs under the same name and shape,
  the same normalised error, weighted ``match_weight`` in total.

Block-wise mode (``blockwise``): the same student and teacher, trained one segment at a
time on the teacher's intermediate tensors (:mod:`onnxprune.recover.blockwise`).

Weights that are exactly zero in the student (a sparsity mask) get no gradient and are zeroed
again after each step; int8 weights of a QDQ model train through their fixed scales (see
:mod:`onnxprune.recover.replay`).

Data: unlabeled feeds only. The last ``holdout`` share of them (whole feeds) is never trained
on: the held-out loss picks the best step (early stopping), and the final decision compares
the student and the trained model against the teacher on those feeds with the package's one
comparator (:func:`onnxprune.fidelity.compare`, onnxruntime): the trained weights are kept
only if held-out fidelity improves, else the input student is returned unchanged.

Learning rate: ``lr``, or with ``lr_search`` (``--lr auto``) the best of a few candidates:
each is tried for ``lr_trial_steps`` steps from the same starting weights on the same batch
sequence, and the one with the lowest held-out loss after its trial is used for the run, which
restarts from the starting weights (a tie goes to the smaller rate). The held-out feeds thus
choose the rate as well as the best step; the report lists every trial.

Reproducible: seeded (torch, numpy), a fixed torch thread count, deterministic algorithms;
the same inputs, options and seed give the same bytes. A ``time_budget`` that ends the run
early makes the step count, and so the result, depend on the machine (the report says so).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from onnxprune.errors import UsageError
from onnxprune.fidelity import FidelityResult, ModelLike, compare
from onnxprune.intermediates import session_with_outputs
from onnxprune.io import load
from onnxprune.output_kinds import class_score_outputs
from onnxprune.passes._match import name_of
from onnxprune.progress import Progress
from onnxprune.recover.allocator import retained_heap
from onnxprune.recover.replay import GraphReplay, ReplayError

__all__ = ["DistillOptions", "DistillResult", "distill"]

Feed = Mapping[str, np.ndarray]
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclasses.dataclass
class DistillOptions:
    """Budget, optimiser and data options of :func:`distill`."""

    steps: int = 200
    time_budget: float | None = None
    budget_clock: str = "wall"  # or "cpu": the process's CPU seconds (fair on a shared machine)
    lr: float = 1e-4
    #: candidate learning rates tried before the run (empty: ``lr`` is used as given)
    lr_search: tuple[float, ...] = ()
    lr_trial_steps: int = 20
    batch_size: int = 8
    temperature: float = 2.0
    logit_mse: float = 0.1  # weight of the squared-error term added to KL for logits
    holdout: float = 0.25
    eval_every: int = 20
    patience: int = 5
    augment: bool = False
    match: Sequence[str] | str | None = None  # names, or "auto": same name and shape
    match_weight: float = 0.5
    seed: int = 0
    threads: int = 2
    trainable: Sequence[str] | None = None
    progress: bool | None = None
    #: train segment by segment on the teacher's intermediate tensors
    #: (:mod:`onnxprune.recover.blockwise`); ``steps`` and ``eval_every`` count per segment
    blockwise: bool = False
    #: block-wise: a segment ends at the first cut after this many layers with trained
    #: weights (3: an inverted-residual block; cut after every layer, the zoo's int8
    #: MobileNetV2 traded error in channels the next depthwise conv ignores for error in
    #: ones it reads: every segment improved, the model lost 1.9 dB)
    block_layers: int = 3


@dataclasses.dataclass
class DistillResult:
    """The kept model, the held-out evidence for keeping it, and what was trained."""

    model: ir.Model
    kept: bool
    reason: str
    steps: int
    best_step: int
    seconds: float
    cpu_seconds: float
    held_out: str
    before: FidelityResult
    after: FidelityResult | None
    trainable: int
    parameters: int
    frozen_note: str | None
    matched: list[str]
    held_losses: list[tuple[int, float]]
    reproducible: bool
    options: DistillOptions
    #: the learning rate used (None: block-wise, each segment's own in ``segments``), and
    #: ``(rate, held-out loss after its trial)`` when searched
    lr: float | None = 0.0
    lr_trials: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    #: block-wise mode: what each segment's training did
    segments: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: "end-to-end", "block-wise", or the end-to-end fallback and why
    mode: str = "end-to-end"

    def to_dict(self) -> dict[str, Any]:
        options = dataclasses.asdict(self.options)
        options["match"] = list(self.options.match) if self.options.match else None
        return {
            "kept": self.kept,
            "reason": self.reason,
            "steps": self.steps,
            "best_step": self.best_step,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "held_out": self.held_out,
            "before": self.before.outputs,
            "after": None if self.after is None else self.after.outputs,
            "trainable_initializers": self.trainable,
            "trained_elements": self.parameters,
            "frozen": self.frozen_note,
            "matched_intermediates": self.matched,
            "held_losses": [[s, v] for s, v in self.held_losses],
            "lr": self.lr,
            "lr_trials": [[r, v] for r, v in self.lr_trials],
            "segments": self.segments,
            "mode": self.mode,
            "reproducible": self.reproducible,
            "options": options,
        }

    def summary(self) -> str:
        lines = [
            f"distillation: {self.steps} steps in {self.seconds:.1f} s ({self.cpu_seconds:.0f} "
            f"CPU s), best held-out loss at "
            f"step {self.best_step}; {self.trainable} initializers ({self.parameters} values) "
            "trained",
            f"  {self.reason}",
        ]
        if self.lr_trials:
            tried = ", ".join(f"{r:.0e} {v:.4g}" for r, v in self.lr_trials)
            lines.append(
                f"  learning rate {self.lr:.0e}, the lowest held-out loss after "
                f"{self.options.lr_trial_steps} steps of each ({tried})"
            )
        for name, metrics in self.before.outputs.items():
            after = self.after.outputs.get(name, {}) if self.after is not None else {}
            lines.append(f"  {name}: {_brief(metrics)} -> {_brief(after) if after else 'n/a'}")
        if self.mode.startswith("end-to-end ("):
            lines.append(f"  {self.mode}")
        if self.segments:
            better = sum(s["best_step"] > 0 for s in self.segments)
            lines.append(
                f"  block-wise: {len(self.segments)} segments, {better} with a lower held-out "
                "loss at their cut after training"
            )
        if self.frozen_note:
            lines.append(f"  {self.frozen_note}")
        if not self.reproducible:
            lines.append("  the time budget ended the run: the step count depends on the machine")
        return "\n".join(lines)


def _brief(metrics: Mapping[str, float | None]) -> str:
    parts = []
    for key in ("top1_agreement", "cosine", "sqnr_db"):
        value = metrics.get(key)
        if value is not None:
            parts.append(f"{key} {value:.4f}" if key != "sqnr_db" else f"sqnr {value:.2f} dB")
    return ", ".join(parts)


# ---------------------------------------------------------------- data


def _image_axes(array: np.ndarray) -> tuple[int, int] | None:
    """(height axis, width axis) of an NCHW/NHWC image batch, else None."""
    if array.ndim != 4 or array.dtype not in _FLOATS:
        return None
    if array.shape[1] in (1, 3) and array.shape[3] > 4:
        return 2, 3
    if array.shape[3] in (1, 3) and array.shape[1] > 4:
        return 1, 2
    return None


def _augment(feed: Feed, key: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Flip (key[0]) and shift by (key[1], key[2]) pixels, edges replicated."""
    flip, dy, dx = key
    out = {}
    for name, array in feed.items():
        axes = _image_axes(array)
        if axes is None or key == (0, 0, 0):
            out[name] = array
            continue
        h, w = axes
        image = np.flip(array, axis=w) if flip else array
        pad = [(0, 0)] * image.ndim
        pad[h], pad[w] = (abs(dy), abs(dy)), (abs(dx), abs(dx))
        padded = np.pad(image, pad, mode="edge")
        index = [slice(None)] * image.ndim
        index[h] = slice(abs(dy) + dy, abs(dy) + dy + image.shape[h])
        index[w] = slice(abs(dx) + dx, abs(dx) + dx + image.shape[w])
        out[name] = np.ascontiguousarray(padded[tuple(index)])
    return out


def _max_shift(feed: Feed) -> int:
    for array in feed.values():
        axes = _image_axes(array)
        if axes is not None:
            return max(1, array.shape[axes[1]] // 28)
    return 0


def stack_feeds(feeds: Sequence[Feed]) -> dict[str, np.ndarray]:
    """The feeds' arrays joined on axis 0, by name."""
    return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}


# ---------------------------------------------------------------- loss


class _Loss:
    """The distillation loss of one (micro)batch; see the module docstring."""

    def __init__(
        self,
        names: Sequence[str],
        scores: frozenset[str],
        probabilities: frozenset[str],
        matched: Sequence[str],
        options: DistillOptions,
        *,
        logits: Mapping[str, str] | None = None,
    ) -> None:
        self.names = list(names)
        self.logits = dict(logits or {})
        self.scores = scores
        self.probabilities = probabilities
        self.matched = list(matched)
        self.options = options

    def __call__(self, student: Mapping[str, torch.Tensor], teacher: Feed) -> torch.Tensor:
        terms = [
            self._term(n, student[self.logits.get(n, n)], teacher[n], n in self.logits)
            for n in self.names
        ]
        loss = torch.stack(terms).mean()
        if self.matched:
            inner = [_nmse(student[n], torch.from_numpy(teacher[n])) for n in self.matched]
            loss = loss + self.options.match_weight * torch.stack(inner).mean()
        return loss

    def _term(
        self, name: str, s: torch.Tensor, t_array: np.ndarray, from_logits: bool = False
    ) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(t_array, dtype=np.float32))
        s = s.to(torch.float32)
        if name not in self.scores or s.dim() == 0 or s.shape[-1] < 2:
            return _nmse(s, t)
        extra = torch.zeros(())
        if name in self.probabilities:
            # log p from the Softmax's input where the graph has one: log of a saturated
            # probability clamps and passes no gradient.
            s = torch.log_softmax(s, dim=-1) if from_logits else torch.log(s.clamp_min(1e-8))
            t = torch.log(t.clamp_min(1e-8))
        elif self.options.logit_mse:
            extra = self.options.logit_mse * _nmse(s, t)
        temp = self.options.temperature
        s_log = torch.log_softmax(s.reshape(-1, s.shape[-1]) / temp, dim=-1)
        t_log = torch.log_softmax(t.reshape(-1, t.shape[-1]) / temp, dim=-1)
        kl = (t_log.exp() * (t_log - s_log)).sum(dim=-1).mean()
        return kl * temp * temp + extra


def _nmse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(torch.float32)
    return ((s.to(torch.float32) - t) ** 2).sum() / (t**2).sum().clamp_min(1e-12)


def _softmax_input(model: ir.Model, name: str) -> str | None:
    """The input of the last-axis Softmax that produces output ``name`` (through Identity)."""
    value = next((v for v in model.graph.outputs if v.name == name), None)
    node = value.producer() if value is not None else None
    while node is not None and node.op_type == "Identity" and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Softmax" or node.inputs[0] is None:
        return None
    opset = model.opset_imports.get("", 1)
    axis = node.attributes.get_int("axis", -1 if opset >= 13 else 1)
    shape = node.inputs[0].shape
    rank = len(shape) if shape is not None else None
    if (axis == -1 and opset >= 13) or (rank is not None and axis == rank - 1):
        return node.inputs[0].name
    return None


def _is_probabilities(arrays: Sequence[np.ndarray]) -> bool:
    for a in arrays:
        if a.ndim == 0 or a.shape[-1] < 2 or a.min() < 0:
            return False
        if not np.allclose(a.sum(axis=-1), 1.0, atol=1e-3):
            return False
    return True


# ---------------------------------------------------------------- the teacher


#: Bytes of teacher outputs kept between steps; the least recently used go first. With
#: augmentation and matched intermediates the (feed, augmentation) pairs are unbounded: an
#: unbounded cache ran a 24 GB machine out of memory on MobileNetV2.
TEACHER_CACHE_BYTES = 2 << 30


class _Teacher:
    """Teacher outputs (and matched intermediates) per (feed, augmentation), computed once
    and kept while they fit in ``budget`` bytes (least recently used evicted; a recomputed
    entry is the same, onnxruntime being deterministic on one machine)."""

    def __init__(
        self, session: Any, names: Sequence[str], budget: int = TEACHER_CACHE_BYTES
    ) -> None:
        self.session = session
        self.names = list(names)
        self.budget = budget
        self.bytes = 0
        self.cache: collections.OrderedDict[tuple[int, tuple[int, int, int]], dict] = (
            collections.OrderedDict()
        )

    def __call__(self, index: int, key: tuple[int, int, int], feed: Feed) -> dict[str, np.ndarray]:
        cached = self.cache.get((index, key))
        if cached is not None:
            self.cache.move_to_end((index, key))
            return cached
        values = self.session.run(self.names, dict(feed))
        cached = {n: np.asarray(v) for n, v in zip(self.names, values, strict=True)}
        self.cache[(index, key)] = cached
        self.bytes += sum(v.nbytes for v in cached.values())
        while self.bytes > self.budget and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.bytes -= sum(v.nbytes for v in old.values())
        return cached


def _matched_names(
    student: ir.Model, teacher: ir.Model, match: Sequence[str] | str | None, outputs: set[str]
) -> list[str]:
    """Candidates: named node outputs of both graphs ("auto": all that are not outputs and
    not known to differ in dtype or shape); shapes are then checked on a feed."""
    if not match:
        return []

    def values(model: ir.Model) -> dict[str, ir.Value]:
        return {v.name: v for node in model.graph for v in node.outputs if v.name}

    s_values, t_values = values(student), values(teacher)
    if isinstance(match, str) and match == "auto":
        names = []
        for name, value in s_values.items():
            other = t_values.get(name)
            if other is None or name in outputs:
                continue
            if _may_match(value, other):
                names.append(name)
        return sorted(names)
    names = [match] if isinstance(match, str) else list(match)
    for name in names:
        if name not in s_values or name not in t_values:
            raise UsageError(f"intermediate {name!r} is not a tensor of both models")
    return names


def _may_match(a: ir.Value, b: ir.Value) -> bool:
    """Not known to differ: float (or unknown) dtypes, equal shapes where both are known."""
    if any(v.dtype not in (None, ir.DataType.FLOAT) for v in (a, b)):
        return False
    return a.shape is None or b.shape is None or list(a.shape) == list(b.shape)


def _same_shapes(
    replay: GraphReplay, names: Sequence[str], feed: Feed, teacher: Mapping[str, np.ndarray]
) -> list[str]:
    """The matched names whose student and teacher tensors agree in shape on ``feed``."""
    if not names:
        return []
    with torch.no_grad():
        student = replay(feed, names)
    return [
        n
        for n in names
        if tuple(student[n].shape) == teacher[n].shape and student[n].is_floating_point()
    ]


# ---------------------------------------------------------------- main loop


def _build_replay(student: ir.Model, options: DistillOptions, probe: Feed) -> GraphReplay:
    """A replay that runs ``probe``; a node whose rule fails becomes external (and says so)."""
    external: set[str] = set()
    for _ in range(64):
        replay = GraphReplay(student, trainable=options.trainable, external=external)
        try:
            with torch.no_grad():
                replay(probe)
        except ReplayError as exc:
            if exc.node in external:
                raise
            external.add(exc.node)
            continue
        return replay
    raise UsageError("too many nodes cannot be replayed")


def _batchable(replay: GraphReplay, feeds: Sequence[Feed], single: Mapping[str, Any]) -> bool:
    """Whether feeds can be concatenated on axis 0 into one forward."""
    if len(feeds) < 2:
        return False
    try:
        with torch.no_grad():
            out = replay(stack_feeds(feeds[:2]))
    except (ReplayError, RuntimeError, ValueError):
        return False
    return all(
        out[n].dim() > 0 and out[n].shape[0] == 2 * single[n].shape[0] for n in replay.output_names
    )


def _score(result: FidelityResult, names: Sequence[str]) -> tuple[float, float]:
    """(mean top-1 agreement, mean SQNR) over ``names``: the keep decision compares these."""
    top1 = [result.outputs[n].get("top1_agreement") for n in names]
    sqnr = [result.outputs[n].get("sqnr_db") for n in names]
    top = [v for v in top1 if v is not None]
    db = [min(v, 200.0) for v in sqnr if v is not None and not math.isnan(v)]
    return (float(np.mean(top)) if top else 0.0, float(np.mean(db)) if db else 0.0)


#: An equal top-1 agreement with an SQNR gain below this (dB) is not an improvement: on the
#: zoo's int8 MobileNetV2, distillation kept on 18.26 -> 18.26 dB held out measured 18.54
#: -> 18.23 dB on the evaluation photos.
KEEP_MIN_GAIN_DB = 0.1


def _improves(old: tuple[float, float], new: tuple[float, float]) -> bool:
    """Whether ``new`` (top-1, SQNR dB) beats ``old``: a higher top-1 agreement, or the same
    one with at least :data:`KEEP_MIN_GAIN_DB` more SQNR."""
    if new[0] != old[0]:
        return new[0] > old[0]
    return new[1] >= old[1] + KEEP_MIN_GAIN_DB


@dataclasses.dataclass
class _Run:
    steps: int = 0
    best_step: int = 0
    best_loss: float = math.inf
    reproducible: bool = True
    held_losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    lr: float | None = 0.0
    lr_trials: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    segments: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class _SegmentLoss:
    """Block-wise loss: the distillation loss on the last segment's outputs, else the
    normalised squared error of the segment's end tensors."""

    def __init__(self, end: Sequence[str], last: _Loss | None, out_names: Sequence[str]) -> None:
        self.last = last
        self.target_names = list(last.names) if last is not None else list(end)
        self.student_names = list(out_names) if last is not None else list(end)

    def __call__(self, student: Mapping[str, torch.Tensor], teacher: Feed) -> torch.Tensor:
        if self.last is not None:
            return self.last(student, teacher)
        terms = [_nmse(student[n], torch.from_numpy(teacher[n])) for n in self.target_names]
        return torch.stack(terms).mean()


def _train_blockwise(  # noqa: PLR0917 (one private call site)
    replay: GraphReplay,
    teacher: ir.Model,
    fit: Sequence[Feed],
    held: Sequence[Feed],
    loss_fn: _Loss,
    options: DistillOptions,
) -> _Run:
    from onnxprune.recover import blockwise

    t_replay = GraphReplay(teacher, trainable=[])
    names = loss_fn.names
    out_names = names + sorted(set(loss_fn.logits.values()) - set(names))

    def make_loss(part: blockwise.Segment) -> _SegmentLoss:
        return _SegmentLoss(part.targets, loss_fn if part.last else None, out_names)

    clock = blockwise.elapsed_clock(options.budget_clock)
    runs = blockwise.train_blockwise(replay, t_replay, fit, held, names, make_loss, options, clock)
    # each segment searched its own rate (in ``segments``) where a search was asked for
    run = _Run(lr=None if options.lr_search else options.lr)
    run.steps = sum(r.steps for r in runs)
    run.best_step = sum(r.best_step for r in runs)
    run.best_loss = runs[-1].held_after
    run.segments = [r.to_dict() for r in runs]
    run.reproducible = not any(r.stopped_by_budget for r in runs)
    return run


def distill(
    student: ir.Model,
    teacher: ModelLike,
    feeds: Sequence[Feed],
    options: DistillOptions | None = None,
) -> DistillResult:
    """Train ``student``'s weights to match ``teacher`` on ``feeds``; see the module docstring.

    Raises:
        UsageError: fewer than two feeds, or no float output shared by both models.
    """
    options = options or DistillOptions()
    if options.budget_clock not in ("wall", "cpu"):
        raise UsageError(f"budget clock {options.budget_clock!r}: expected wall or cpu")
    if options.blockwise and (options.match or options.augment):
        raise UsageError("match and augment apply to end-to-end distillation, not block-wise")
    if not all(r > 0 for r in (options.lr, *options.lr_search)) or options.lr_trial_steps < 1:
        raise UsageError("learning rates and the trial step count must be positive")
    teacher_model = teacher if isinstance(teacher, ir.Model) else load(teacher)
    if len(feeds) < 2:
        raise UsageError("distillation needs at least 2 calibration samples (1 is held out)")
    t_outputs = {v.name for v in teacher_model.graph.outputs}
    names = [name_of(v) for v in student.graph.outputs if v.name in t_outputs]
    if not names:
        raise UsageError("the student has none of the teacher's outputs")
    held_count = max(1, int(len(feeds) * options.holdout))
    fit, held = list(feeds[:-held_count]), list(feeds[-held_count:])
    scores = class_score_outputs(teacher_model)
    matched = _matched_names(student, teacher_model, options.match, set(names))
    start, start_cpu = time.perf_counter_ns(), time.process_time()
    with (
        _Deterministic(options),
        retained_heap(),
        session_with_outputs(teacher_model, names + matched, threads=options.threads) as session,
    ):
        teacher_run = _Teacher(session, names + matched)
        replay = _build_replay(student, options, fit[0])
        first = teacher_run(0, (0, 0, 0), fit[0])
        float_names = [n for n in names if first[n].dtype in _FLOATS]
        if not float_names:
            raise UsageError("no float output to distill (integer outputs carry no gradient)")
        probs = frozenset(n for n in float_names if n in scores and _is_probabilities([first[n]]))
        matched = _same_shapes(replay, matched, fit[0], first)
        logits = {n: src for n in probs if (src := _softmax_input(student, n)) is not None}
        loss_fn = _Loss(float_names, scores, probs, matched, options, logits=logits)
        mode = "block-wise" if options.blockwise else "end-to-end"
        if options.blockwise and replay.external_nodes:
            mode = "end-to-end (block-wise needs every node replayed in torch)"
        if mode == "block-wise":
            run = _train_blockwise(replay, teacher_model, fit, held, loss_fn, options)
        else:
            run = _train(replay, fit, held, teacher_run, loss_fn, options, start)
    seconds = (time.perf_counter_ns() - start) / 1e9
    held_text = f"the last {len(held)} of {len(feeds)} calibration samples (never trained on)"
    before = compare(teacher_model, student, held, data=held_text, class_scores=scores)
    params = sum(p.numel() for p in replay.params.values())
    common: dict[str, Any] = dict(  # noqa: C408
        steps=run.steps,
        best_step=run.best_step,
        seconds=seconds,
        cpu_seconds=time.process_time() - start_cpu,
        held_out=held_text,
        before=before,
        trainable=len(replay.trainable),
        parameters=params,
        frozen_note=replay.frozen_note,
        matched=matched,
        held_losses=run.held_losses,
        reproducible=run.reproducible,
        options=options,
        lr=run.lr,
        lr_trials=run.lr_trials,
        segments=run.segments,
        mode=mode,
    )
    if run.best_step == 0:
        reason = "kept the input: no step lowered the held-out loss"
        return DistillResult(student, False, reason, after=None, **common)
    candidate = replay.export()
    after = compare(teacher_model, candidate, held, data=held_text, class_scores=scores)
    if _improves(_score(before, names), _score(after, names)):
        reason = "kept the distilled weights: held-out fidelity improved"
        return DistillResult(candidate, True, reason, after=after, **common)
    reason = "kept the input: the distilled weights did not improve held-out fidelity"
    return DistillResult(student, False, reason, after=after, **common)


class _Deterministic:
    """Seeds, a fixed thread count and deterministic kernels; restored on exit."""

    def __init__(self, options: DistillOptions) -> None:
        self.options = options

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        self.flag = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(max(1, self.options.threads))
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(self.options.seed)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.flag)


def _elapsed(options: DistillOptions, start_ns: int, start_cpu: float) -> float:
    if options.budget_clock == "cpu":
        return time.process_time() - start_cpu
    return (time.perf_counter_ns() - start_ns) / 1e9


def search_rate(
    rates: Sequence[float], trial: Callable[[float], float], out_of_time: Callable[[], bool]
) -> tuple[float | None, list[tuple[float, float]]]:
    """The rate whose ``trial`` (a few steps from the same start, then the held-out loss) is
    lowest, smaller rates first and kept on ties, with ``(rate, loss)`` per trial run. No
    trial starts once ``out_of_time()``: the time budget covers the search; None when no
    trial ran."""
    trials: list[tuple[float, float]] = []
    for rate in sorted(rates):
        if out_of_time():
            break
        trials.append((rate, trial(rate)))
    best = min(trials, key=lambda t: t[1])[0] if trials else None
    return best, trials


def shuffled_batches(count: int, size: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless shuffled epochs of ``count`` indices, cut into batches of ``size``."""
    while True:
        order = rng.permutation(count).tolist()
        for begin in range(0, count, size):
            yield order[begin : begin + size]


def _train(  # noqa: PLR0917 (one private call site)
    replay: GraphReplay,
    fit: Sequence[Feed],
    held: Sequence[Feed],
    teacher: _Teacher,
    loss_fn: _Loss,
    options: DistillOptions,
    start_ns: int,
) -> _Run:
    rng = np.random.default_rng(options.seed)
    start_cpu = time.process_time()
    targets_names = loss_fn.names + loss_fn.matched
    out_names = targets_names + sorted(set(loss_fn.logits.values()) - set(targets_names))
    single = replay(fit[0])
    batchable = _batchable(replay, fit, single)
    shift = _max_shift(fit[0]) if options.augment else 0

    def forward_loss(items: Sequence[tuple[int, tuple[int, int, int], Feed]]) -> torch.Tensor:
        targets = [teacher(index, key, feed) for index, key, feed in items]
        if batchable:
            student = replay(stack_feeds([f for _, _, f in items]), out_names)
            joined = {n: np.concatenate([t[n] for t in targets], axis=0) for n in targets_names}
            return loss_fn(student, joined)
        losses = [
            loss_fn(replay(f, out_names), t) for (_, _, f), t in zip(items, targets, strict=True)
        ]
        return torch.stack(losses).mean()

    held_items = [(len(fit) + i, (0, 0, 0), f) for i, f in enumerate(held)]

    def held_loss() -> float:
        with torch.no_grad():
            chunks = [
                held_items[i : i + options.batch_size]
                for i in range(0, len(held_items), options.batch_size)
            ]
            return float(np.mean([forward_loss(c).item() for c in chunks]))

    def step_once(optimizer: torch.optim.Optimizer, batches: Iterator[list[int]]) -> float:
        items = []
        for index in next(batches):
            key = (0, 0, 0)
            if options.augment:
                flip = int(rng.integers(2))
                dy, dx = (int(v) for v in rng.integers(-shift, shift + 1, 2))
                key = (flip, dy, dx)
            items.append((index, key, _augment(fit[index], key)))
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss(items)
        loss.backward()
        replay.mask_gradients()
        optimizer.step()
        replay.apply_masks()
        return float(loss.item())

    run = _Run(lr=options.lr)
    run.best_loss = held_loss()
    run.held_losses.append((0, run.best_loss))
    best_state = replay.state()
    params = list(replay.params.values())
    if not params or options.steps <= 0:
        return run

    rate = options.lr

    def out_of_time() -> bool:
        return (
            options.time_budget is not None
            and _elapsed(options, start_ns, start_cpu) >= options.time_budget
        )

    if options.lr_search:

        def trial(lr: float) -> float:
            nonlocal rng  # same start, same batches for every rate
            replay.load(best_state)
            rng = np.random.default_rng(options.seed)
            optimizer = torch.optim.Adam(params, lr=lr)
            batches = shuffled_batches(len(fit), max(1, options.batch_size), rng)
            for _ in range(options.lr_trial_steps):
                step_once(optimizer, batches)
            return held_loss()

        chosen, run.lr_trials = search_rate(options.lr_search, trial, out_of_time)
        rate = run.lr = options.lr if chosen is None else chosen
        run.reproducible = len(run.lr_trials) == len(options.lr_search)
        replay.load(best_state)
        rng = np.random.default_rng(options.seed)
    optimizer = torch.optim.Adam(params, lr=rate)
    batches = shuffled_batches(len(fit), max(1, options.batch_size), rng)
    stale = 0
    with Progress(options.steps, "distill", enabled=options.progress) as bar:
        for step in range(1, options.steps + 1):
            loss = step_once(optimizer, batches)
            run.steps = step
            stop = out_of_time()
            bar.update(note=f"loss {loss:.4g}")
            if step % options.eval_every == 0 or step == options.steps or stop:
                current = held_loss()
                run.held_losses.append((step, current))
                if current < run.best_loss:
                    run.best_loss, run.best_step, stale = current, step, 0
                    best_state = replay.state()
                else:
                    stale += 1
                if stale >= options.patience and not stop:
                    break
            if stop:
                run.reproducible = run.reproducible and step == options.steps
                break
    replay.load(best_state)
    return run
