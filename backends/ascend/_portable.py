"""The per-call escape hatch: a call outside a vendor operator's documented shape limits runs the
portable reference kernel instead (device-resident torch, so it runs on the NPU too), with one
warning per op and reason. Limits the plan can see (dtypes, chips, formats) are declared as
capabilities instead; this covers the shape rules that plans have no vocabulary for."""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any


@functools.cache
def _warn_once(op: str, reason: str) -> None:
    warnings.warn(f"seahal: ascend.torch_npu {op} ran the portable kernel: {reason}", RuntimeWarning, stacklevel=4)


def portable(op: str, module: str, reason: str, *args: Any) -> Any:
    """Run ``seahal.backends.cpu.reference.<module>.<op>(*args)``, warning once per (op, reason)."""
    _warn_once(op, reason)
    return getattr(importlib.import_module(f"seahal.backends.cpu.reference.{module}"), op)(*args)
