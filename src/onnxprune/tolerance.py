"""Tolerance expressions over fidelity metrics: ``METRIC>=VALUE,METRIC<=VALUE``.

Used by ``verify --tolerance`` and by later commands' ``--budget``. Grammar::

    expression := clause ("," clause)*
    clause     := METRIC OP VALUE
    OP         := ">=" | "<="
    VALUE      := a float ("inf" and "-inf" allowed)

``METRIC`` is one of :data:`onnxprune.metrics.METRIC_NAMES`. Whitespace around tokens is
ignored. A metric may appear more than once (``sqnr_db>=20,sqnr_db<=200``).

A clause holds for a measured value ``v`` when ``v OP VALUE``; NaN never holds. A metric that
does not apply to an output (``top1_agreement`` of a non-classifier output is ``None``) is
recorded as not applicable rather than as a violation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Mapping

from onnxprune.errors import UsageError
from onnxprune.metrics import HIGHER_IS_BETTER, METRIC_NAMES

__all__ = ["DEFAULT_TOLERANCE", "Criterion", "Tolerance", "Violation", "parse_tolerance"]

#: Default for ``verify`` and ``optimize``: outputs must point in the same direction as the
#: reference's to within ~8 degrees, and class scores (rank >= 2 float outputs, last axis > 1)
#: and integer labels must pick the same class on at least 98% of rows. Cosine alone passed a
#: Keras CNN whose top-1 agreement was 0.38: logits dominated by a shared offset keep a high
#: cosine while the argmax moves. Top-1 does not apply to other outputs.
DEFAULT_TOLERANCE = "cosine>=0.99,top1_agreement>=0.98"

logger = logging.getLogger(__name__)

_CLAUSE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*(\S+)\s*$")


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One clause: ``metric op threshold``."""

    metric: str
    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        """Whether ``value`` satisfies the clause (NaN never does)."""
        if math.isnan(value):
            return False
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclasses.dataclass(frozen=True)
class Violation:
    """A clause that a measured value broke, for one output (or tensor)."""

    output: str
    criterion: Criterion
    value: float

    def message(self) -> str:
        """``output 'y': cosine 0.9412 < 0.99 (tolerance cosine>=0.99)``."""
        broken = "<" if self.criterion.op == ">=" else ">"
        return (
            f"output {self.output!r}: {self.criterion.metric} {self.value:.6g} {broken} "
            f"{self.criterion.threshold:g} (tolerance {self.criterion})"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "output": self.output,
            "metric": self.criterion.metric,
            "op": self.criterion.op,
            "threshold": self.criterion.threshold,
            "value": self.value,
        }


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A parsed tolerance expression (all clauses must hold)."""

    criteria: tuple[Criterion, ...]

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.criteria)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics the expression constrains, in order of first mention."""
        return tuple(dict.fromkeys(c.metric for c in self.criteria))

    def violations(
        self, metrics_by_output: Mapping[str, Mapping[str, float | None]]
    ) -> list[Violation]:
        """Every (output, clause) pair that does not hold, in output then clause order.

        Metrics that are ``None`` for an output (not applicable) are skipped.
        """
        found = []
        for output, metrics in metrics_by_output.items():
            for criterion in self.criteria:
                value = metrics.get(criterion.metric)
                if value is None:
                    continue
                if not criterion.holds(float(value)):
                    found.append(Violation(output, criterion, float(value)))
        return found

    def not_applicable(
        self, metrics_by_output: Mapping[str, Mapping[str, float | None]]
    ) -> list[tuple[str, str]]:
        """``(output, metric)`` pairs the expression names but which do not apply."""
        return [
            (output, metric)
            for output, metrics in metrics_by_output.items()
            for metric in self.metrics
            if metrics.get(metric) is None
        ]


def _parse_value(text: str, clause: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"tolerance clause {clause.strip()!r}: {text!r} is not a number") from None
    if math.isnan(value):
        raise UsageError(f"tolerance clause {clause.strip()!r}: NaN is not a threshold")
    return value


def _parse_clause(clause: str) -> Criterion:
    match = _CLAUSE.match(clause)
    if match is None:
        raise UsageError(
            f"bad tolerance clause {clause.strip()!r}: expected METRIC>=VALUE or METRIC<=VALUE "
            f"(e.g. cosine>=0.99,max_abs_error<=0.05)"
        )
    metric, op, text = match.groups()
    if metric not in METRIC_NAMES:
        raise UsageError(
            f"unknown metric {metric!r} in tolerance clause {clause.strip()!r}; "
            f"known metrics: {', '.join(METRIC_NAMES)}"
        )
    return Criterion(metric, op, _parse_value(text, clause))


def parse_tolerance(expression: str | Tolerance | Iterable[Criterion]) -> Tolerance:
    """Parse ``METRIC>=VALUE,METRIC<=VALUE``.

    Args:
        expression: The text; a :class:`Tolerance` or criteria are returned as a Tolerance.

    Returns:
        The parsed tolerance.

    Raises:
        UsageError: empty expression, bad clause syntax, unknown metric or non-numeric value;
            the message quotes the clause.
    """
    if isinstance(expression, Tolerance):
        return expression
    if not isinstance(expression, str):
        return Tolerance(tuple(expression))
    clauses = expression.split(",")
    if not expression.strip() or any(not c.strip() for c in clauses):
        raise UsageError(
            f"bad tolerance expression {expression!r}: empty clause; expected "
            "METRIC>=VALUE[,METRIC<=VALUE...]"
        )
    tolerance = Tolerance(tuple(_parse_clause(c) for c in clauses))
    for criterion in tolerance.criteria:
        # Bounding a metric from its "bad" side is legal (e.g. a sanity range) but usually a typo.
        if (criterion.op == ">=") != (criterion.metric in HIGHER_IS_BETTER):
            logger.warning(
                "tolerance clause %s bounds %s from its bad side", criterion, criterion.metric
            )
    return tolerance
