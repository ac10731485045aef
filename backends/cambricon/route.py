"""The narrow per-call escape hatch: a call the vendor op cannot take runs on the portable kernel.

A plan binds a Cambricon kernel once per op, but some calls fall outside what the tmo function
accepts (``scaled_matmul`` writes only fp16/bf16, ``fused_mhc_post`` only takes D=4096 with four
streams, ``fused_compress_multi_kv`` only starts at position 0). Those calls run the portable
reference kernel instead; each distinct reason is logged once at WARNING and counted in
:data:`PORTABLE_CALLS`, so a run can say how often it fired.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

log = logging.getLogger("seahal.backends.cambricon")

PORTABLE_CALLS: Counter[tuple[str, str]] = Counter()
"""(op, reason) -> calls that took the portable path."""

_REFERENCE_MODULE = {
    "moe_gate": "moe",
    "moe_experts": "moe",
    "fp8_gemm": "gemm",
    "kv_compress": "compressor",
    "sparse_attention": "attention",
    "hc_pre": "mhc",
    "hc_post": "mhc",
    "rope": "rope",
}


def portable(op: str, reason: str) -> Callable[..., Any]:
    """The portable reference kernel of ``op``, after recording why this call cannot use tmo."""
    if (op, reason) not in PORTABLE_CALLS:
        log.warning("seahal cambricon: %s runs on the portable path for this call: %s", op, reason)
    PORTABLE_CALLS[(op, reason)] += 1
    module = importlib.import_module(f"seahal.backends.cpu.reference.{_REFERENCE_MODULE[op]}")
    return getattr(module, op)
