"""seahal backend for examplechip, a made-up accelerator simulated on CPU tensors.

seahal finds this package through its ``seahal.backends`` entry point (pyproject.toml), which
names :func:`register`. Everything a plan needs to choose our kernels is data given here: the
backend (device type, probe, priority, verified versions) and, per kernel, its priority,
capabilities and ``supports`` predicate. The kernels themselves live in :mod:`.kernels`.
"""

from __future__ import annotations

import os

import torch
from seahal.hal import Availability, PlanContext, register_backend, register_kernel

BACKEND = "examplechip"
CHIP = "ex1"
"""The chip family the probe reports; plans for this backend carry it in ``PlanContext.chip``."""
DISABLE_VARIABLE = "EXAMPLECHIP_DISABLE"

KERNEL_PRIORITY = 20
"""Above the CPU reference (0) and the CPU native GEMMs (10): where our predicate accepts the plan,
our kernels win; every other op keeps the best kernel that already serves cpu tensors."""

KERNELS = {
    "rope": {"dtype": ("bfloat16", "float32")},
    "fp8_act_quant": {"scale_fmt": ("ue8m0",)},
}
"""Our kernels (``seahal_examplechip.kernels:<op>``) with their capabilities, as data: rope computes
in fp32 (examplechip has no fp64 unit), the quant unit makes power-of-two scales only. A plan or
conformance case asking for anything else gets another kernel (or "unsupported"), with the reason."""


def probe() -> Availability:
    """Whether examplechip can run here, and why not (a real plugin asks its driver)."""
    if os.environ.get(DISABLE_VARIABLE) == "1":
        return Availability(False, f"disabled by {DISABLE_VARIABLE}=1")
    threads = torch.get_num_threads()
    return Availability(True, f"examplechip simulator on {threads} CPU thread{'s' * (threads != 1)}", chip=CHIP)


def on_examplechip(ctx: PlanContext) -> str | None:
    """A ``supports`` predicate: our kernels serve plans made for examplechip only.

    examplechip shares the ``cpu`` device type with the built-in CPU backend, and kernels compete
    per device type; without this predicate, installing the plugin would also change what
    ``device="cpu"`` runs. Returns None when the kernel may serve ``ctx``, else the reason.
    """
    if ctx.chip != CHIP:
        return f"serves examplechip plans only (this plan's chip: {ctx.chip})"
    return None


def register() -> None:
    """Entry point ``seahal.backends: examplechip``: declare the backend, then its kernels."""
    register_backend(
        BACKEND,
        device_type="cpu",
        probe=probe,
        aliases=("exchip",),
        description="examplechip simulator: own rope and fp8_act_quant, every other op from the cpu backend",
        verified_with={"seahal": "0.1.0", "torch": "2.13.0"},
        priority=10,  # device="auto" prefers us to the cpu backend (0), not to real accelerators (20, 30)
    )
    for op, capabilities in KERNELS.items():
        register_kernel(
            op,
            BACKEND,
            "vector",
            f"seahal_examplechip.kernels:{op}",  # imported when a plan first binds it
            priority=KERNEL_PRIORITY,
            capabilities=capabilities,
            supports=on_examplechip,
        )
