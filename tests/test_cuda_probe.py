"""The cuda backend's availability probe names why the kernels cannot run, without importing triton:
a Triton older than the kernels need (what an older torch pins) is reported, not crashed into."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest

from seahal.backends import cuda
from seahal.testing import triton_interpreter


@pytest.mark.parametrize("version, ok", [("3.1.0", False), ("3.3.1", False), ("3.4.0", True), ("3.6.0+git9a1b", True),
                                         ("4.0.0", True)])
def test_triton_older_than_the_minimum_is_named(monkeypatch, version, ok):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "triton" else "0")
    why = cuda.triton_too_old()
    assert (why is None) == ok
    if not ok:
        assert why.startswith(f"triton {version} is older than the kernels need (>= {cuda.MIN_TRITON}")


def test_the_probe_and_the_interpreter_report_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else None)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.1.0")
    for availability in (cuda._probe(), triton_interpreter.availability()):
        assert not availability and "triton 3.1.0 is older" in availability.reason
