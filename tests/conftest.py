"""Shared fixtures: a registry that tests may fill with fake backends and plugins; a guard that
no test leaves ``TRITON_INTERPRET`` changed for the tests after it; the Triton-interpreter re-runs
of the selected test files started in the background as the session begins."""

from __future__ import annotations

import importlib.util
import os

# Before anything loads torch's OpenMP runtime, which reads this once: idle OpenMP threads sleep
# instead of spinning. The session runs its tests beside the interpreter re-runs and the
# conformance subprocesses, each with a thread pool, on CI's two cores, where spinning threads
# took the cores the others needed (pytest on a 2-core machine, 2026-11-28: 950 s spinning, 747 s
# passive, the same 1300 tests). A value the caller set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from seahal.hal.registry import REGISTRY
from seahal.testing import triton_interpreter


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every ``test_under_interpreter`` last (in file order): each waits for its file's re-run
    (:func:`pytest_collection_finish`), so this process runs all its own tests meanwhile."""
    items.sort(key=lambda item: item.name == "test_under_interpreter")


LONGEST_RERUNS = ("test_cuda_decode_graph.py", "test_cuda_moe_experts.py", "test_cuda_compress.py",
                  "test_cuda_indexer.py", "test_cuda_sparse_attention.py")
"""The interpreter re-runs that take longest, longest first (a 2-core machine, 2026-11-28: 252, 251,
96, 73 and 68 s alone; the other eight 10-45 s). Started first, they take the core the session
leaves idle from its start, and the short ones fill both cores at its end; in file order the
moe_experts re-run (251 s) began seventh, late enough to run alone after everything else."""


def _longest_first(path: str) -> int:
    name = os.path.basename(path)
    return LONGEST_RERUNS.index(name) if name in LONGEST_RERUNS else len(LONGEST_RERUNS)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the interpreter re-run of every file whose ``test_under_interpreter`` was selected,
    :data:`LONGEST_RERUNS` first, then in the order the session collects them, at a lower priority
    than this process, which runs the other tests meanwhile (on a 2-core machine the 13 re-runs
    take about 940 s one after another, the rest of the session about 630 s). Not in a
    pytest-xdist worker: every worker collects every file, and the one that runs a file's test
    re-runs it then."""
    files = list(dict.fromkeys(str(item.path) for item in session.items if item.name == "test_under_interpreter"))
    files.sort(key=_longest_first)  # a stable sort: the rest keep the session's order
    if files and importlib.util.find_spec("triton") is not None and "PYTEST_XDIST_WORKER" not in os.environ:
        triton_interpreter.start_reruns(files)


def pytest_sessionfinish(session: pytest.Session) -> None:
    triton_interpreter.stop_reruns()


@pytest.fixture(autouse=True)
def _interpreter_flag_unchanged():
    """Fail a test that leaves ``TRITON_INTERPRET`` other than it found it: Triton reads it when
    a kernel module is imported, so a leaked value changes what later tests run (code such as
    ``seahal conformance --interpret`` sets it in its own process)."""
    before = os.environ.get("TRITON_INTERPRET")
    yield
    after = os.environ.get("TRITON_INTERPRET")
    assert after == before, f"the test left TRITON_INTERPRET={after!r} (it was {before!r})"


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
