"""The CPU backend: the reference (pure PyTorch, the spec in code) plus native fast paths.

The reference kernels are *portable*: written device-resident without host synchronisation, they
run on tensors of any device and are every plan's fallback. Native kernels (``seahal._native``,
C++/OpenMP) serve the CPU above them where they exist.
"""

from __future__ import annotations

import torch

from seahal.hal import Availability, register_backend, register_kernel

_REF = "seahal.backends.cpu.reference"

# op -> module of backends/cpu/reference holding the reference kernel of the same name
REFERENCE_KERNELS = {
    "fp8_act_quant": "quant",
    "fp4_quant": "quant",
    "kv_cache_pack": "quant",
    "kv_cache_unpack": "quant",
    "fp8_gemm": "gemm",
    "fp4_gemm": "gemm",
    "moe_gate": "moe",
    "moe_experts": "moe",
    "kv_compress": "compressor",
    "indexer_topk": "indexer",
    "sparse_attention": "attention",
    "hc_pre": "mhc",
    "hc_post": "mhc",
    "hc_head": "mhc",
    "rope": "rope",
}


def _probe() -> Availability:
    return Availability(True, f"{torch.get_num_threads()} threads")


def register() -> None:
    """Entry point ``seahal.backends: cpu``."""
    register_backend(
        "cpu",
        device_type="cpu",
        probe=_probe,
        description="reference (pure PyTorch) + native C++ fast paths",
        verified_with={"torch": "2.13.0"},
    )
    for op, module in REFERENCE_KERNELS.items():
        register_kernel(op, "cpu", "reference", f"{_REF}.{module}:{op}", priority=0, portable=True)
    from .native import register_native_kernels

    register_native_kernels()
