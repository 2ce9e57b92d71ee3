"""``onnxprune.optimize``: run a recipe under an accuracy budget, then verify and measure.

After each step the candidate is verified against the *input* model on held-out
calibration samples. When the budget is missed, a step that has an amount is retried at
half the strength (at most ``max_tries`` runs); a step that still misses it is skipped and
the report says why. The final model is benchmarked against the input, interleaved, on the
chosen provider; a model measured slower (the paired 95% interval of the latency ratio lies
above 1) is not written. A final model outside the budget is not written either (exit 1).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from onnxprune.analysis.inspect import disk_bytes
from onnxprune.analysis.macs import count_costs
from onnxprune.bench import benchmark
from onnxprune.bundled import default_calibration, default_model, default_test_set
from onnxprune.calib import load_calibration
from onnxprune.errors import BudgetError, SaveError, UsageError
from onnxprune.fidelity import FidelityResult, compare, overfit_note
from onnxprune.io import load, save, source_files
from onnxprune.optimize.data import accuracy, has_labels, split_calibration
from onnxprune.optimize.recipe import Recipe, Step, load_recipe, preset
from onnxprune.optimize.report import ModelStats, OptimizeReport, StepRecord
from onnxprune.optimize.steps import BACKOFF_STEPS, StepRun, StepSkippedError, run_step
from onnxprune.progress import progress_enabled
from onnxprune.tolerance import Tolerance, parse_tolerance
from onnxprune.verification import VerifyResult, verify

__all__ = ["DEFAULT_PRESET", "optimize"]

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "cpu-fast"
_NO_BUDGET = "cosine>=-1"
#: A result counts as slower when its latency ratio's 95% interval lies above 1 and the
#: ratio itself exceeds this (3%: below that, shared machines disagree run to run).
_SLOWER = 1.03


def _stats(path: Path, dims: Mapping[str, int]) -> ModelStats:
    """MACs, parameters and size on disk (the size ``inspect`` reports for the same file)."""
    costs = count_costs(load(path), dims=dims)
    return ModelStats(int(costs.total_macs), int(costs.total_params), disk_bytes(path))


class _StepProgress:
    """One line per step try and per final phase on stderr, when it is a terminal (as
    :class:`~onnxprune.progress.Progress`): what runs now, and how long each took."""

    def __init__(self, total: int, *, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = progress_enabled(self.stream)
        self._label = ""
        self._start = time.perf_counter()

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"optimize: {text}\n")
            self.stream.flush()

    def start(self, index: int, name: str, tries: int, strength: float) -> None:
        """A step try begins."""
        self._label = f"step {index}/{self.total} {name}"
        detail = f" (try {tries}, strength {strength:.2f})" if tries > 1 else ""
        self.phase(f"{self._label}{detail}")

    def phase(self, text: str) -> None:
        """Something long begins (a step try, the latency measurement, the final check)."""
        self._start = time.perf_counter()
        self._write(f"{text} ...")

    def done(self, outcome: str) -> None:
        """The step try ended with ``outcome``."""
        self._write(f"{self._label}: {outcome} ({time.perf_counter() - self._start:.1f} s)")


@dataclasses.dataclass
class _Context:
    """What every step try and the final phases of one optimize run share."""

    fit: Path | None
    holdout: Path | None
    dims: dict[str, int]
    budget: str | None
    tolerance: Tolerance
    input: Path
    max_tries: int
    threads: int
    seconds: float
    progress: _StepProgress
    #: ``distill``: a lossy step that misses the budget is distilled before it is made
    #: milder; ``none``: backed off at once.
    recover: str = "none"
    recover_budget: float | None = None


def _resolve(recipe: str | os.PathLike[str] | Recipe | None, preset_name: str | None) -> Recipe:
    if recipe is not None and preset_name is not None:
        raise UsageError("give --recipe or --preset, not both")
    if isinstance(recipe, Recipe):
        return recipe
    if recipe is not None:
        return load_recipe(recipe)
    return preset(preset_name or DEFAULT_PRESET)


def _run_with_backoff(
    step: Step, src: Path, work: Path, index: int, ctx: _Context
) -> tuple[Path | None, StepRecord]:
    """Run ``step`` (milder after each budget miss); the record carries its seconds."""
    start = time.perf_counter()
    produced, record = _tries(step, src, work, index, ctx)
    record.seconds = time.perf_counter() - start
    return produced, record


def _tries(
    step: Step, src: Path, work: Path, index: int, ctx: _Context
) -> tuple[Path | None, StepRecord]:
    strength, tries = 1.0, 0
    reason = ""
    while tries < ctx.max_tries:
        tries += 1
        dst = work / f"step{index}_{step.name}_{tries}.onnx"
        run = StepRun(ctx.fit, ctx.dims, strength, ctx.budget)
        ctx.progress.start(index, step.name, tries, strength)
        try:
            result = run_step(step.name, src, dst, step.options, run)
        except StepSkippedError as exc:
            ctx.progress.done("skipped")
            return None, StepRecord(
                step.name, dict(step.options), "skipped", strength, tries, str(exc)
            )
        except BudgetError as exc:
            reason = str(exc)
        else:
            note = getattr(result, "target_note", None) or ""
            if ctx.holdout is None:  # no data: only exact steps run, each checked itself
                ctx.progress.done("applied")
                return dst, StepRecord(
                    step.name, dict(step.options), "applied", strength, tries, note
                )
            check = verify(ctx.input, dst, ctx.holdout, tolerance=ctx.tolerance)
            if check.passed:
                ctx.progress.done("applied")
                return dst, StepRecord(
                    step.name, dict(step.options), "applied", strength, tries, note, check.outputs
                )
            reason = f"budget missed: {check.failure_message()}"
            if ctx.recover in ("distill", "blockwise") and step.name in BACKOFF_STEPS:
                distilled = _distilled(dst, ctx)
                if distilled is not None:
                    path, outputs = distilled
                    ctx.progress.done("applied after distillation")
                    recovered = f"{reason}; met after distillation from the input"
                    return path, StepRecord(
                        step.name, dict(step.options), "applied", strength, tries,
                        "; ".join(x for x in (note, recovered) if x), outputs,
                    )  # fmt: skip
                reason += "; distillation did not meet it"
        ctx.progress.done("budget missed")
        if step.name not in BACKOFF_STEPS or tries >= ctx.max_tries:
            break
        strength /= 2
    return None, StepRecord(step.name, dict(step.options), "skipped", strength, tries, reason)


def _distilled(
    candidate: Path, ctx: _Context
) -> tuple[Path, dict[str, dict[str, float | None]]] | None:
    """``candidate`` distilled from the input on the fit data (weights only), when that
    meets the budget on the held-out data: its path and fidelity, else None."""
    if ctx.fit is None or ctx.holdout is None:
        return None
    from onnxprune.recover.api import recover_file
    from onnxprune.recover.distill import DistillOptions

    out = candidate.with_name(candidate.stem + "_distilled.onnx")
    ctx.progress.phase(f"distilling {candidate.name} from the input")
    recover_file(
        candidate,
        ctx.input,
        out,
        ctx.fit,
        options=DistillOptions(
            time_budget=ctx.recover_budget, blockwise=ctx.recover == "blockwise"
        ),
    )
    check = verify(ctx.input, out, ctx.holdout, tolerance=ctx.tolerance)
    return (out, check.outputs) if check.passed else None


def _measure(
    report: OptimizeReport, src: Path, states: list[tuple[int, Path]], ctx: _Context
) -> tuple[int, Path]:
    """Benchmark the input and every applied state in one interleaved run; return the
    fastest state (the last one unless a later step made the model slower)."""
    feeds: dict[str, Any] = (
        {"calib": ctx.holdout} if ctx.holdout is not None else {"dims": ctx.dims}
    )
    result = benchmark(
        [src, *(path for _, path in states)],
        provider=report.provider,
        threads=ctx.threads,
        seconds=ctx.seconds,
        warmup=5,
        show_progress=False,
        **feeds,
    )
    first, *rest = result.models
    best = min(range(len(rest)), key=lambda i: rest[i].latency_ms.median)
    if rest[best].latency_ms.median > rest[-1].latency_ms.median / _SLOWER:
        best = len(rest) - 1  # within 3% of the last state: keep every step
    # Prefer the last state (most steps applied) when it is not measurably slower.
    last = len(rest) - 1
    last_ratio = rest[last].paired_ratio_to_first
    best_ratio = rest[best].paired_ratio_to_first
    if last_ratio is not None and best_ratio is not None and last_ratio.low <= best_ratio.high:
        best = last
    chosen = rest[best]
    ratio = chosen.paired_ratio_to_first
    report.latency_ms = (first.latency_ms.median, chosen.latency_ms.median)
    if ratio is not None:
        report.latency_ratio = (ratio.ratio, ratio.low, ratio.high)
    kept = rest[best].latency_ms.median
    kept_name = report.steps[states[best][0]].name
    for position, (index, _) in enumerate(states[best + 1 :], best + 1):
        record = report.steps[index]
        record.status = "dropped"
        median = rest[position].latency_ms.median
        record.reason = _dropped_reason(
            report.provider, median, kept, kept_name, first_dropped=position == best + 1
        )
    return states[best]


def _dropped_reason(
    provider: str, median: float, kept: float, kept_name: str, *, first_dropped: bool
) -> str:
    """Why a step was dropped: its model measured against the kept state (the state before
    the first dropped step), never against the input."""
    times = f"{median:.3f} ms vs {kept:.3f} ms, {median / kept:.2f}x the latency"
    if first_dropped:
        return f"made the model slower on {provider} than the state before it ({times})"
    return (
        f"dropped with the earlier dropped step: the model after it is slower on {provider} "
        f"than the state after {kept_name!r} ({times})"
    )


def _overfit(src: Path, current: Path, fit: Path, final: VerifyResult) -> str | None:
    """The overfitting line: the result on (up to as many) fit samples vs on held-out ones."""
    data = load_calibration(fit, load(src))
    feeds = list(data.feeds(range(min(len(data), final.samples))))
    on_fit = compare(src, current, feeds, data=f"fit samples of {fit}")
    held = FidelityResult(final.calibration, final.samples, True, final.outputs, final.worst_feed)
    return overfit_note(on_fit, held)


def optimize(
    model: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    *,
    recipe: str | os.PathLike[str] | Recipe | None = None,
    preset_name: str | None = None,
    calib: str | os.PathLike[str] | None = None,
    budget: str | None = None,
    provider: str | None = None,
    eval_set: str | os.PathLike[str] | None = None,
    dims: Mapping[str, int] | None = None,
    max_tries: int = 3,
    threads: int = 2,
    bench_seconds: float = 10.0,
    recover: str = "none",
    recover_budget: float | None = None,
) -> OptimizeReport:
    """Optimize ``model`` (default: the bundled digits CNN) into ``output``.

    Raises:
        BudgetError: the budget cannot be met, or the result is slower than the input;
            nothing is written (exit code 1).
        UsageError, ModelLoadError, CalibrationError: bad options or input (exit code 2).

    ``recover="distill"`` (or ``"blockwise"``, segment by segment on the input's
    intermediate tensors) distils a pruned, sparsified or factorized model from the input
    (on the fit part of ``calib``; needs torch) when it misses the budget, before the step
    is retried milder; ``recover_budget`` bounds each distillation in seconds.
    """
    bundled = model is None
    src = Path(model) if model is not None else default_model()
    calib = calib if calib is not None else (default_calibration() if bundled else None)
    eval_set = eval_set if eval_set is not None else (default_test_set() if bundled else None)
    dest = Path(output) if output is not None else Path(f"{src.stem}.optimized.onnx")
    plan = _resolve(recipe, preset_name)
    budget = budget if budget is not None else plan.budget
    tolerance = parse_tolerance(budget) if budget else parse_tolerance(_NO_BUDGET)
    provider = provider or plan.provider or "cpu"
    bound = dict(dims or {})
    inputs = source_files(load(src))  # validate the input before any work
    if not dest.absolute().parent.is_dir():
        raise SaveError(f"cannot write {dest}: folder {dest.absolute().parent} does not exist")
    report = OptimizeReport(
        str(src),
        None,
        plan.to_dict(),
        budget,
        provider,
        [],
        _stats(src, bound),
        _stats(src, bound),
    )
    with tempfile.TemporaryDirectory(prefix="onnxprune-opt-") as tmp:
        work = Path(tmp)
        fit = holdout = None
        if calib is not None:
            fit, holdout = split_calibration(Path(calib), work)
        elif any(s.name != "canonicalize" for s in plan.steps) or budget:
            raise UsageError("--calib is required to verify the budget of this recipe")
        ctx = _Context(
            fit=fit,
            holdout=holdout,
            dims=bound,
            budget=budget,
            tolerance=tolerance,
            input=src,
            max_tries=max_tries,
            threads=threads,
            seconds=bench_seconds,
            progress=_StepProgress(len(plan.steps)),
            recover=recover,
            recover_budget=recover_budget,
        )
        current = src
        states: list[tuple[int, Path]] = []  # (step index in report.steps, model after it)
        for index, step in enumerate(plan.steps, 1):
            produced, record = _run_with_backoff(step, current, work, index, ctx)
            report.steps.append(record)
            if produced is not None:
                current = produced
                states.append((len(report.steps) - 1, produced))
        if states and bench_seconds > 0:
            ctx.progress.phase(f"measuring latency ({bench_seconds:g} s)")
            _, current = _measure(report, src, states, ctx)
        final_data = eval_set if eval_set is not None else holdout
        if final_data is not None:
            # The final judgement is on --eval data when given (never used by any step),
            # else on the held-out part of --calib.
            ctx.progress.phase("final check on held-out data")
            final_check = verify(src, current, final_data, tolerance=tolerance)
            report.fidelity = final_check.outputs
            report.fidelity_data = (
                f"--eval {eval_set} ({final_check.samples} samples)"
                if eval_set is not None
                else f"held-out calibration samples ({final_check.samples}; not used by any step)"
            )
            if fit is not None:
                report.overfit = _overfit(src, current, fit, final_check)
            if not final_check.passed:
                report.message = f"budget {budget!r} not met: {final_check.failure_message()}"
                raise BudgetError(report.message + "; nothing written")
        report.after = _stats(current, bound)
        ratio = report.latency_ratio
        if ratio is not None and ratio[1] > 1.0 and ratio[0] > _SLOWER:
            report.message = (
                f"the optimized model is slower than the input on {provider} "
                f"(latency ratio {ratio[0]:.2f}); nothing written"
            )
            raise BudgetError(report.message)
        if eval_set is not None and has_labels(eval_set):
            report.accuracy = (accuracy(src, eval_set), accuracy(current, eval_set))
        # ``current`` is a temporary file: protect the user's input, not it.
        written = save(load(current), dest, protect=inputs)
        report.output = str(written)
        report.written = True
        # The size of the file written (what ``inspect`` reports), not of the temporary one.
        report.after = dataclasses.replace(report.after, file_bytes=disk_bytes(written))
        applied = [s for s in report.steps if s.status == "applied"]
        names = ", ".join(s.name for s in applied) or "none"
        report.message = f"wrote {written} (steps applied: {names})"
        report.message += "".join(f"; {s.name}: {s.reason}" for s in applied if s.reason)
        if bench_seconds <= 0:
            report.message += "; latency not measured (--bench-seconds 0)"
    return report
