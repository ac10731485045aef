"""The narrow per-call escape hatch: a call the vendor op cannot take runs on the portable kernel.

A plan binds a Cambricon kernel once per op, but some calls fall outside what the tmo function
accepts (``scaled_matmul`` writes only fp16/bf16, ``fused_mhc_post`` only takes D=4096 with four
streams, ``fused_compress_multi_kv`` only starts at position 0). Those calls run the portable
reference kernel instead, warned once per reason and counted in ``seahal.hal.registry.PORTABLE_CALLS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from seahal.hal.registry import portable_fallback


def portable(op: str, reason: str) -> Callable[..., Any]:
    """The portable kernel of ``op``, for a call that cannot use tmo (``reason``)."""
    return portable_fallback("cambricon.tmo", op, reason)
