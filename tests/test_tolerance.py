"""Tolerance expressions: parsing, refusals with messages, evaluation over outputs."""

from __future__ import annotations

import math

import pytest

from onnxprune.errors import UsageError
from onnxprune.tolerance import Criterion, parse_tolerance


def test_parse_several_clauses_with_spaces() -> None:
    tol = parse_tolerance(" cosine >= 0.99 , max_abs_error<=1e-3,sqnr_db>=30")
    assert tol.criteria == (
        Criterion("cosine", ">=", 0.99),
        Criterion("max_abs_error", "<=", 1e-3),
        Criterion("sqnr_db", ">=", 30.0),
    )
    assert str(tol) == "cosine>=0.99,max_abs_error<=0.001,sqnr_db>=30"
    assert parse_tolerance(str(tol)) == tol  # round trip
    assert tol.metrics == ("cosine", "max_abs_error", "sqnr_db")


def test_infinite_threshold_is_allowed() -> None:
    assert parse_tolerance("sqnr_db>=inf").criteria[0].threshold == math.inf


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        (
            "cosin>=0.9",
            "unknown metric 'cosin' in tolerance clause 'cosin>=0.9'; known metrics: "
            "top1_agreement, cosine, sqnr_db, max_abs_error, mean_abs_error, max_rel_error",
        ),
        (
            "cosine>0.9",
            "bad tolerance clause 'cosine>0.9': expected METRIC>=VALUE or METRIC<=VALUE",
        ),
        ("cosine>=high", "tolerance clause 'cosine>=high': 'high' is not a number"),
        ("cosine>=nan", "tolerance clause 'cosine>=nan': NaN is not a threshold"),
        ("cosine>=0.9,", "bad tolerance expression 'cosine>=0.9,': empty clause"),
        ("", "bad tolerance expression '': empty clause"),
        ("0.9<=cosine", "bad tolerance clause '0.9<=cosine'"),
    ],
)
def test_refusals_name_the_clause(expression: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_tolerance(expression)
    assert str(info.value).startswith(message)
    assert info.value.exit_code == 2


def test_violations_per_output_and_not_applicable() -> None:
    tol = parse_tolerance("cosine>=0.99,top1_agreement>=0.9,max_abs_error<=0.5")
    metrics = {
        "logits": {"cosine": 0.98, "top1_agreement": 0.95, "max_abs_error": 0.5},
        "boxes": {"cosine": 0.999, "top1_agreement": None, "max_abs_error": 0.7},
    }
    found = tol.violations(metrics)
    assert [(v.output, v.criterion.metric, v.value) for v in found] == [
        ("logits", "cosine", 0.98),
        ("boxes", "max_abs_error", 0.7),
    ]
    assert found[0].message() == "output 'logits': cosine 0.98 < 0.99 (tolerance cosine>=0.99)"
    assert found[1].message() == (
        "output 'boxes': max_abs_error 0.7 > 0.5 (tolerance max_abs_error<=0.5)"
    )
    assert tol.not_applicable(metrics) == [("boxes", "top1_agreement")]


def test_boundary_holds_and_nan_never_holds() -> None:
    crit = Criterion("cosine", ">=", 0.99)
    assert crit.holds(0.99)
    assert not crit.holds(math.nan)
    assert Criterion("max_abs_error", "<=", 0.1).holds(0.1)
    assert parse_tolerance("sqnr_db>=30").violations({"y": {"sqnr_db": math.inf}}) == []


def test_bad_side_bound_warns(caplog: pytest.LogCaptureFixture) -> None:
    parse_tolerance("cosine<=0.5")
    assert "bounds cosine from its bad side" in caplog.text
