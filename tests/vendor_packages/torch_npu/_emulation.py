"""What the emulated machine looks like: chip (SoC version), torch_npu version, visible devices."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

VERSION = "2.14.0"


@dataclass
class State:
    soc_version: int = 220
    """``torch_npu.npu.get_soc_version()``: 220-225 Atlas A2 (910B), 250-255 A3 (910C), 260 Ascend 950."""
    version: str = VERSION
    device_count: int = 1


state = State()


def configure(**settings) -> None:
    """Set fields of :data:`state` (``soc_version=260``, ``version="2.10.0"``, ``device_count=0``)."""
    for key, value in settings.items():
        if not hasattr(state, key):
            raise TypeError(f"unknown emulation setting {key!r}; known: {list(vars(state))}")
        setattr(state, key, value)


def older_than(major: int, minor: int) -> bool:
    """Whether the emulated torch_npu version is below ``major.minor``."""
    found = tuple(int(part) for part in re.findall(r"\d+", state.version)[:2])
    return found < (major, minor)


def check(condition: bool, message: str) -> None:
    """The vendor's ``torch._check``: RuntimeError with its message."""
    if not condition:
        raise RuntimeError(message)


def on_device(name: str, t: torch.Tensor | None) -> None:
    """Emulated NPU tensors are CPU tensors; anything else was not moved to the device."""
    if t is not None:
        check(t.device.type == "cpu", f"{name} must be on the npu (emulated on cpu), got {t.device}")


def soc_family() -> str:
    v = state.soc_version
    return "A2" if 220 <= v <= 225 else "A3" if 250 <= v <= 255 else "A5" if v == 260 else f"soc{v}"
