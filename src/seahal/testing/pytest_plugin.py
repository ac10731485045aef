"""pytest plugin: the conformance suite as one test per (op, kernel, case) of a backend.

A vendor points it at their backend::

    pytest -p seahal.testing.pytest_plugin --pyargs seahal.testing.suite --seahal-backend mychip

Options: ``--seahal-backend NAME`` (required by the suite), ``--seahal-ops a,b`` (default all),
``--seahal-kernel NAME`` (one kernel of the backend), ``--seahal-device DEV`` (default the
backend's device type), ``--seahal-interpret`` (Triton interpreter on CPU tensors). The suite
module :mod:`seahal.testing.suite` holds two tests, parametrised here: ``test_case`` (every fixed
case; unsupported cases are skipped with the reason) and ``test_property`` (hypothesis draws cases;
100 per kernel with hypothesis' default profile, 10 with ``--hypothesis-profile seahal-quick``).
"""

from __future__ import annotations

import pytest
from hypothesis import settings

from .cases import cases_for
from . import triton_interpreter
from .conformance import ReferenceCache, targets


QUICK_PROFILE = "seahal-quick"
"""A hypothesis profile with 10 examples per kernel: ``--hypothesis-profile seahal-quick``. Registered
at import: hypothesis loads the chosen profile when pytest configures, before our hooks run."""
settings.register_profile(QUICK_PROFILE, max_examples=10)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("seahal", "seahal backend conformance")
    group.addoption("--seahal-backend", metavar="NAME", help="backend whose kernels the conformance suite tests")
    group.addoption("--seahal-ops", metavar="OPS", help="comma-separated ops to test (default: all)")
    group.addoption("--seahal-kernel", metavar="NAME", help="only this kernel name of the backend")
    group.addoption("--seahal-device", metavar="DEVICE", help="device to run on (default: the backend's device type)")
    group.addoption("--seahal-interpret", action="store_true", help="Triton interpreter on CPU tensors")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--seahal-interpret"):
        triton_interpreter.enable()
        fix = triton_interpreter.bf16_dot_fix()
        fix.__enter__()
        config.add_cleanup(lambda: fix.__exit__(None, None, None))


def _targets(config: pytest.Config):
    backend = config.getoption("--seahal-backend")
    if not backend:
        raise pytest.UsageError("the seahal conformance suite needs --seahal-backend NAME")
    ops = config.getoption("--seahal-ops")
    return targets(
        backend,
        [op.strip() for op in ops.split(",") if op.strip()] if ops else None,
        config.getoption("--seahal-device"),
        config.getoption("--seahal-kernel"),
        interpret=config.getoption("--seahal-interpret"),
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``seahal_case`` by (target, case) and ``seahal_target`` by target."""
    wanted = {"seahal_case", "seahal_target"} & set(metafunc.fixturenames)
    if not wanted:
        return
    found = _targets(metafunc.config)
    if "seahal_case" in wanted:
        params = [
            pytest.param((target, case), id=f"{target.op}/{target.label}/{case.name}")
            for target in found
            if target.kernel is not None
            for case in cases_for(target.op)
        ]
        params += [
            pytest.param((target, None), id=f"{target.op}/{target.label}", marks=_skip(target.unavailable))
            for target in found
            if target.kernel is None
        ]
        metafunc.parametrize("seahal_case", params)
    if "seahal_target" in wanted:
        params = [
            pytest.param(t, id=f"{t.op}/{t.label}", marks=_skip(t.unavailable) if t.unavailable else ())
            for t in found
        ]
        metafunc.parametrize("seahal_target", params)


def _skip(reason: str | None) -> pytest.MarkDecorator:
    return pytest.mark.skip(reason=reason or "")


@pytest.fixture(scope="session")
def seahal_reference() -> ReferenceCache:
    """Reference results shared by every kernel tested in the session."""
    return ReferenceCache()
