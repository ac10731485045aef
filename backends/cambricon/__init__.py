"""The Cambricon backend: MLUs through ``torch_mlu`` (and ``torch_mlu_ops`` where installed).

Not verified on hardware: no Cambricon chip is reachable where seahal is developed.
"""

from __future__ import annotations

import importlib.util

from seahal.hal import Availability, register_backend


def _probe() -> Availability:
    if importlib.util.find_spec("torch_mlu") is None:
        return Availability(False, "torch_mlu is not installed (Cambricon ships it with its PyTorch build)")
    try:
        import torch
        import torch_mlu  # noqa: F401  (registers torch.mlu)
    except Exception as exc:
        return Availability(False, f"torch_mlu failed to import: {exc} (is the Cambricon driver/CNToolkit installed?)")
    if not torch.mlu.is_available() or torch.mlu.device_count() == 0:
        return Availability(False, "torch_mlu is installed but no MLU is visible (driver, MLU_VISIBLE_DEVICES?)")
    return Availability(True, "torch_mlu", chip=torch.mlu.get_device_name())


def register() -> None:
    """Entry point ``seahal.backends: cambricon``."""
    register_backend(
        "cambricon",
        device_type="mlu",
        probe=_probe,
        aliases=("mlu",),
        description="Cambricon MLU through torch_mlu",
        verified_with={"torch-mlu": "API only, no hardware"},
        verified_on_hardware=False,
        priority=20,
    )
