"""Running Triton kernels on CPU tensors (``TRITON_INTERPRET=1``) for conformance without a GPU.

Two facts make this more than setting a variable: Triton reads ``TRITON_INTERPRET`` when it is
imported (and when each kernel is decorated), so it must be set first; and the interpreter's dot
misreads bf16 operands (seen in Triton 3.6 and 3.9: bf16 tensors are held as uint16 and
``create_dot`` hands the raw bits to numpy), which :func:`bf16_dot_fix` corrects for the duration
of a run. Neither touches the GPU path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
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


def rerun_test_file(path: str, timeout: float = 600) -> InterpreterRun:
    """Run the pytest file ``path`` again in a fresh interpreter with ``TRITON_INTERPRET=1``; the
    caller asserts on the outcome (``assert run.passed(skipped=...), run.report``).

    Triton reads the variable when it is imported and when each kernel is decorated, so a test file
    whose kernels must run interpreted re-runs itself in a subprocess from one parent test; called
    inside that subprocess, this skips.
    """
    import pytest

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this is the interpreter run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    lines = result.stdout.strip().splitlines()
    return InterpreterRun(result.returncode, lines[-1] if lines else "", result.stdout[-6000:] + result.stderr[-2000:])
