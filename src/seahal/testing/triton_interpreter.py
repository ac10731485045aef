"""Running Triton kernels on CPU tensors (``TRITON_INTERPRET=1``) for conformance without a GPU.

Two facts make this more than setting a variable: Triton reads ``TRITON_INTERPRET`` when it is
imported (and when each kernel is decorated), so it must be set first; and the interpreter's dot
misreads bf16 operands (seen in Triton 3.6 and 3.9: bf16 tensors are held as uint16 and
``create_dot`` hands the raw bits to numpy), which :func:`bf16_dot_fix` corrects for the duration
of a run. Neither touches the GPU path.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import os
import subprocess
import sys
import warnings
from collections.abc import Iterable, Iterator
from types import ModuleType

from seahal.backends.cuda import MIN_TRITON, triton_too_old
from seahal.hal.registry import Availability


def enable() -> None:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors. Must precede importing triton."""
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        warnings.warn(
            "triton was imported before TRITON_INTERPRET=1 was set; the interpreter may be inactive",
            RuntimeWarning,
            stacklevel=2,
        )


def availability() -> Availability:
    """Under the interpreter a backend's Triton kernels need Triton, not the backend's device (whose
    probe would report no GPU). No chip: capability chips are not checked."""
    if importlib.util.find_spec("triton") is None:
        return Availability(False, "the Triton interpreter needs triton: pip install triton")
    if too_old := triton_too_old():
        return Availability(False, too_old)
    return Availability(True, "Triton interpreter on CPU tensors")


def require_triton() -> ModuleType:
    """In a test: triton, or a skip where it is missing or older than the kernels need
    (:data:`seahal.backends.cuda.MIN_TRITON`)."""
    import pytest

    return pytest.importorskip("triton", minversion=MIN_TRITON)


@contextlib.contextmanager
def bf16_dot_fix() -> Iterator[None]:
    """Make the interpreter's ``tl.dot`` widen bf16 operands to fp32 (exactly) instead of
    multiplying their raw bits. A no-op context where triton is missing."""
    if importlib.util.find_spec("triton") is None:
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def as_fp32(handle):
        if handle.dtype.scalar.name != "bf16":
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return original(self, as_fp32(a), as_fp32(b), d, *args)

    builder.create_dot = create_dot
    try:
        yield
    finally:
        builder.create_dot = original


@dataclasses.dataclass(frozen=True)
class InterpreterRun:
    """What a test file's re-run under the interpreter (:func:`rerun_test_file`) ended with."""

    returncode: int
    summary: str
    """pytest's last line, e.g. ``40 passed, 2 skipped in 31.2s``."""
    report: str
    """The ends of its output, for an assertion message."""

    def passed(self, skipped: int | None = None) -> bool:
        """Whether every test that ran passed (and, if given, exactly ``skipped`` were skipped)."""
        clean = self.returncode == 0 and " passed" in self.summary and "failed" not in self.summary
        return clean and (skipped is None or f" {skipped} skipped" in self.summary)


RERUN_VARIABLE = "SEAHAL_INTERPRETER_RERUN"
"""Set (to 1) only in the processes :func:`rerun_test_file` starts. Not ``TRITON_INTERPRET``
itself: code that runs in the parent's process may set that (``seahal conformance --interpret``
does), and a parent that took it for the re-run would skip every later file's interpreter tests."""
BACKGROUND_TIMEOUT = 1200
"""Seconds a re-run started by :func:`start_reruns` may take: CI's whole budget. A background
re-run runs at lower priority, starved while the session's own tests hold the cores, so its wall
time says little about the file; at 900 s the decode-graph file's re-run (about 6 CPU minutes
alone) was stopped in two of four fresh-clone runs on a 2-core machine (2026-11-28) whose sessions
took 1125-1203 s. Only a hung run should be stopped, and a hung run overruns CI either way."""
BACKGROUND_NICENESS = 10
"""How much lower a background re-run's CPU priority is than its starter's: it takes the cores
the session leaves idle rather than sharing them with its tests."""
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""A background re-run's thread pools (torch's, numpy's BLAS under the interpreter's dot): one
thread each. Pools of a thread a core in two processes at once spin-wait on each other's cores:
the first CI run with a background re-run took 10 CPU minutes for a file that takes 3 alone."""

_BACKGROUND: dict[str, concurrent.futures.Future] = {}
_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_RUNNING: set[subprocess.Popen] = set()


def rerun_test_file(path: str, timeout: float = 600) -> InterpreterRun:
    """Run the pytest file ``path`` again in a fresh interpreter with ``TRITON_INTERPRET=1``; the
    caller asserts on the outcome (``assert run.passed(skipped=...), run.report``).

    Triton reads the variable when it is imported and when each kernel is decorated, so a test file
    whose kernels must run interpreted re-runs itself in a subprocess from one parent test; called
    inside that subprocess, this skips. A run :func:`start_reruns` began is waited for (its
    timeout :data:`BACKGROUND_TIMEOUT`); otherwise the file runs now.
    """
    import pytest

    if os.environ.get(RERUN_VARIABLE) == "1":
        pytest.skip("this is the interpreter run")
    started = _BACKGROUND.pop(os.path.abspath(path), None)
    return started.result() if started is not None else _run_file(os.path.abspath(path), timeout, background=False)


def start_reruns(paths: Iterable[str]) -> None:
    """Begin :func:`rerun_test_file`'s runs of ``paths`` in the background, a core's worth at a
    time (``os.cpu_count()`` runs), while this process goes on: a pytest session runs its other
    tests meanwhile at a higher priority, and once it waits on the re-runs they have every core.
    Nothing inside a re-run."""
    global _EXECUTOR
    if os.environ.get(RERUN_VARIABLE) == "1":
        return
    if _EXECUTOR is None:
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                          thread_name_prefix="interpreter-rerun")
    for path in map(os.path.abspath, paths):
        if path not in _BACKGROUND:
            _BACKGROUND[path] = _EXECUTOR.submit(_run_file, path, BACKGROUND_TIMEOUT, background=True)


def stop_reruns() -> None:
    """Drop the background runs nobody collected: those not begun are cancelled, running ones are
    killed (a session that ends early, e.g. on ``-x``, does not wait for them)."""
    global _EXECUTOR
    for future in _BACKGROUND.values():
        future.cancel()
    for process in list(_RUNNING):
        process.kill()
    if _EXECUTOR is not None:
        _EXECUTOR.shutdown(wait=True)
        _EXECUTOR = None
    _BACKGROUND.clear()


def _run_file(path: str, timeout: float, background: bool) -> InterpreterRun:
    """pytest on ``path`` in a subprocess with ``TRITON_INTERPRET=1`` (and :data:`RERUN_VARIABLE`);
    in the ``background``, on one thread a pool and :data:`BACKGROUND_NICENESS` lower priority."""
    env = {**os.environ, "TRITON_INTERPRET": "1", RERUN_VARIABLE: "1", **(ONE_THREAD if background else {})}
    pytest_main = ["-m", "pytest"]
    if background and hasattr(os, "nice"):  # the child lowers its own priority, then runs pytest
        pytest_main = ["-c", f"import os, sys, pytest; os.nice({BACKGROUND_NICENESS}); sys.exit(pytest.main(sys.argv[1:]))"]
    command = [sys.executable, *pytest_main, path, "-q", "-p", "no:cacheprovider"]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        _RUNNING.add(process)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            stderr += f"\n{path}: the interpreter run took over {timeout} s and was stopped"
        finally:
            _RUNNING.discard(process)
    lines = stdout.strip().splitlines()
    return InterpreterRun(process.returncode, lines[-1] if lines else "", stdout[-6000:] + stderr[-2000:])
