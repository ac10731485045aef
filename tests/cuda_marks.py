"""Where the cuda backend's test files run their tests: under the Triton interpreter (their
``test_under_interpreter`` re-runs the file in a subprocess with ``TRITON_INTERPRET=1``), or on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
"""This process runs Triton kernels in the interpreter, on CPU tensors."""
interpreted = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in test_under_interpreter's subprocess")
"""Kernel tests on CPU tensors: they run in the interpreter subprocess only."""
on_gpu = pytest.mark.skipif(IN_INTERPRETER or not torch.cuda.is_available(), reason="needs a CUDA device")
"""Tests of compiled kernels on a GPU."""
kernels = pytest.mark.skipif(
    not IN_INTERPRETER and not torch.cuda.is_available(),
    reason="no CUDA device: runs in test_under_interpreter's subprocess",
)
"""Kernel tests that run wherever kernels run: in the interpreter subprocess, or on a GPU."""
