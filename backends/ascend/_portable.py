"""The per-call escape hatch: a call outside a vendor operator's documented shape limits runs the
portable reference kernel instead (device-resident torch, so it runs on the NPU too). Limits the
plan can see (dtypes, chips, formats) are declared as capabilities instead; this covers the shape
rules that plans have no vocabulary for."""

from __future__ import annotations

from typing import Any

from seahal.hal.registry import portable_fallback


def portable(op: str, reason: str, *args: Any) -> Any:
    """Run ``op``'s portable kernel on ``args`` (warned once per op and reason)."""
    return portable_fallback("ascend.torch_npu", op, reason)(*args)
