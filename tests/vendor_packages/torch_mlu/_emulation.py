"""Settings of the torch_mlu emulation: which MLUs it pretends to see."""

from __future__ import annotations

import torch


class DeviceModule:
    """The ``torch.mlu`` functions seahal's probe reads."""

    def __init__(self) -> None:
        self.name = "MLU590-M9"
        self.count = 1

    def is_available(self) -> bool:
        return self.count > 0

    def device_count(self) -> int:
        return self.count

    def get_device_name(self, device: int | None = None) -> str:
        return self.name

    def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
        return (5, 92) if "590" in self.name else (3, 72)


def configure(chip: str | None = None, device_count: int | None = None, **_: object) -> None:
    """``chip``: the device name to report (e.g. ``"MLU370-X8"``); ``device_count``: 0 = none visible."""
    mlu = torch.mlu
    if chip is not None:
        mlu.name = chip
    if device_count is not None:
        mlu.count = device_count


def uninstall() -> None:
    """Remove ``torch.mlu`` (the real torch_mlu cannot be unloaded; the emulation can)."""
    if hasattr(torch, "mlu"):
        del torch.mlu
