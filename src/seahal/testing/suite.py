"""The conformance suite as pytest tests; parametrised by :mod:`seahal.testing.pytest_plugin`.

    pytest -p seahal.testing.pytest_plugin --pyargs seahal.testing.suite --seahal-backend mychip
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from seahal.testing.cases import strategy
from seahal.testing.conformance import run_case


def _explain(result) -> str:
    return f"{result.detail}\n(tolerance: {result.tolerance})" if result.tolerance else result.detail


def test_case(seahal_case, seahal_reference) -> None:
    """One fixed case on one kernel against the float64 CPU reference."""
    target, case = seahal_case
    result = run_case(target, case, seahal_reference)
    if result.status == "unsupported":
        pytest.skip(result.detail)
    assert result.status == "pass", _explain(result)


@settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
)
@given(data=st.data())
def test_property(seahal_target, data) -> None:
    """Hypothesis-drawn cases within the op's contract on one kernel (shrunk on failure)."""
    case = data.draw(strategy(seahal_target.op), label="case")
    result = run_case(seahal_target, case)
    assume(result.status != "unsupported")
    assert result.status == "pass", _explain(result)
