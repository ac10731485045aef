"""Shared fixtures: a registry that tests may fill with fake backends and plugins."""

from __future__ import annotations

import pytest

from seahal.hal.registry import REGISTRY


@pytest.fixture
def isolated_registry():
    """The global registry (discovered), restored to its state before the test afterwards.

    Tests may register backends and kernels, reset discovery, or record plugin failures. The
    ``REGISTRY`` object itself is kept (modules imported it by name); its contents are restored in
    place. torch.library ops bound during the test stay defined for the process (a kernel name
    re-registered with another function gets a fresh op name, see ``hal.spec.as_torch_op``).
    """
    REGISTRY.discover()
    backends = dict(REGISTRY.backends)
    kernels = {op: list(ks) for op, ks in REGISTRY.kernels.items()}
    failures = list(REGISTRY.failures)
    discovered = REGISTRY._discovered
    try:
        yield REGISTRY
    finally:
        REGISTRY.backends.clear()
        REGISTRY.backends.update(backends)
        REGISTRY.kernels.clear()
        REGISTRY.kernels.update(kernels)
        REGISTRY.failures[:] = failures
        REGISTRY._discovered = discovered


@pytest.fixture
def empty_registry(isolated_registry):
    """An isolated registry emptied and marked undiscovered: the next lookup rediscovers the
    entry points from scratch (built-ins and whatever plugins are on ``sys.path`` now)."""
    isolated_registry.backends.clear()
    isolated_registry.kernels.clear()
    isolated_registry.failures.clear()
    isolated_registry._discovered = False
    return isolated_registry


def keep_reference_cpu_kernels(registry) -> None:
    """Drop every cpu kernel but the reference, so that expectations about plans do not depend on
    which native fast paths this build has."""
    for kernels in registry.kernels.values():
        kernels[:] = [k for k in kernels if k.backend != "cpu" or k.name == "reference"]


@pytest.fixture
def reference_registry(isolated_registry):
    """An isolated registry whose only cpu kernels are the references."""
    keep_reference_cpu_kernels(isolated_registry)
    return isolated_registry


@pytest.fixture
def reference_only():
    """:func:`keep_reference_cpu_kernels`, for tests that rediscover the registry themselves."""
    return keep_reference_cpu_kernels
