"""The Ascend backend: Huawei NPUs through ``torch_npu`` (``pip install seahal[ascend]``).

Not verified on hardware: no Ascend chip is reachable where seahal is developed.
"""

from __future__ import annotations

import importlib.util

from seahal.hal import Availability, register_backend


def _probe() -> Availability:
    if importlib.util.find_spec("torch_npu") is None:
        return Availability(False, "torch_npu is not installed: pip install seahal[ascend] (needs the CANN toolkit)")
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
        import torch
    except Exception as exc:  # torch_npu without CANN fails at import (libhccl.so not found)
        return Availability(False, f"torch_npu failed to import: {exc} (is the CANN toolkit installed and sourced?)")
    if not torch.npu.is_available() or torch.npu.device_count() == 0:
        return Availability(False, "torch_npu is installed but no NPU is visible (driver, ASCEND_RT_VISIBLE_DEVICES?)")
    return Availability(True, "torch_npu", chip=str(torch_npu.npu.get_soc_version()))


def register() -> None:
    """Entry point ``seahal.backends: ascend``."""
    register_backend(
        "ascend",
        device_type="npu",
        probe=_probe,
        aliases=("npu",),
        description="Huawei Ascend through torch_npu",
        verified_with={"torch-npu": "2.13 (API only, no hardware)"},
        verified_on_hardware=False,
        priority=20,
    )
