"""The CUDA backend: Triton kernels for NVIDIA GPUs (``pip install seahal[cuda]``)."""

from __future__ import annotations

import importlib.util

import torch

from seahal.hal import Availability, register_backend, register_kernel

_GEMM_CAPABILITIES = {
    "chip": ("sm90",),
    "out_dtype": ("bfloat16", "float32"),
    "scale_dtype": ("float32", "float8_e8m0fnu"),
}
"""Triton GEMMs: verified (and their launch configs tuned) on sm90 (H100) only."""
_MOE_GATE_CAPABILITIES = {
    "chip": ("sm90",),
    "dtype": ("bfloat16", "float32"),
    "score_func": ("sqrtsoftplus", "sigmoid", "softmax"),
    "routing": ("score", "hash"),
}
"""Triton router: fp32 math, top_k <= 8; no group-limited routing (the reference serves it)."""


def _probe() -> Availability:
    if importlib.util.find_spec("triton") is None:
        return Availability(False, "triton is not installed: pip install seahal[cuda]")
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        return Availability(False, f"{why} (torch {torch.__version__})")
    major, minor = torch.cuda.get_device_capability()
    return Availability(True, torch.cuda.get_device_name(), chip=f"sm{major}{minor}")


def register() -> None:
    """Entry point ``seahal.backends: cuda``."""
    register_backend(
        "cuda",
        device_type="cuda",
        probe=_probe,
        description="Triton kernels for NVIDIA GPUs",
        collective_backend="nccl",
        verified_with={"torch": "2.11.0+cu130", "triton": "3.6.0"},
        priority=30,
    )
    # "module:qualname" strings: importing the backend never imports triton.
    for op in ("fp8_gemm", "fp4_gemm"):
        register_kernel(
            op, "cuda", "triton", f"seahal.backends.cuda.{op}:{op}", priority=10, capabilities=_GEMM_CAPABILITIES
        )
    register_kernel(
        "moe_gate", "cuda", "triton", "seahal.backends.cuda.moe_gate:moe_gate", priority=10,
        capabilities=_MOE_GATE_CAPABILITIES,
    )
