"""The CUDA backend: Triton kernels for NVIDIA GPUs (``pip install seahal[cuda]``)."""

from __future__ import annotations

import importlib.util

import torch

from seahal.hal import Availability, register_backend


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
        verified_with={"torch": "2.13.0", "triton": "3.6"},
        priority=30,
    )
