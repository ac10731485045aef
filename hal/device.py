"""Device resolution: user-facing device names to a torch device and the backend that serves it."""

from __future__ import annotations

import torch

from .errors import DeviceError
from .registry import Backend, backends


def _candidates(name: str) -> list[Backend]:
    """Backends a name refers to: those it names (or aliases) first, then those serving a torch
    device type of that name, each group by priority. ``"cpu"`` is the cpu backend even when a
    plugin serving cpu tensors has a higher priority."""
    named = [b for b in backends().values() if name == b.name or name in b.aliases]
    by_type = [b for b in backends().values() if b.device_type == name and b not in named]
    return sorted(named, key=lambda b: -b.priority) + sorted(by_type, key=lambda b: -b.priority)


def _report(exclude: Backend | None = None) -> str:
    lines = []
    for b in sorted(backends().values(), key=lambda b: b.name):
        if b is exclude:
            continue
        avail = b.availability()
        state = "available" if avail else f"unavailable: {avail.reason}"
        lines.append(f"  {b.name} (device type {b.device_type!r}): {state}")
    return "\n".join(lines)


def resolve_device(device: str | torch.device | None = "auto") -> tuple[torch.device, Backend]:
    """Resolve ``"cpu"``, ``"cuda:1"``, ``"ascend"``/``"npu:0"``, ``"cambricon"``/``"mlu"``, a plugin's
    name, ``"auto"`` (the best available) or a :class:`torch.device` to ``(torch.device, backend)``.

    Raises :class:`DeviceError` that lists every backend with its availability when the name is
    unknown or its backend is unavailable here. A backend whose vendor package is a test emulation
    resolves to the device its tensors really live on (``Availability.emulated_on``, e.g. cpu).
    """
    if device is None or device == "auto":
        ranked = sorted(
            (b for b in backends().values() if b.availability()),
            key=lambda b: (-b.priority, b.name),
        )
        if not ranked:
            raise DeviceError("device='auto': no backend is available here:\n" + _report())
        return torch.device(ranked[0].tensor_device_type()), ranked[0]

    text = str(device)
    name, colon, index_text = text.partition(":")
    if colon and not index_text.isdigit():
        raise DeviceError(f"device {text!r}: the index after ':' must be a non-negative integer")
    index = int(index_text) if index_text else None
    candidates = _candidates(name)
    if not candidates:
        raise DeviceError(f"unknown device {text!r}; seahal knows these backends:\n" + _report())
    available = [b for b in candidates if b.availability()]
    if not available:
        best = candidates[0]
        raise DeviceError(
            f"device {text!r} is not available: {best.availability().reason}\n"
            "Backends on this machine:\n" + _report()
        )
    backend = available[0]
    device_type = backend.tensor_device_type()
    torch_device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    _check_index(text, torch_device)
    return torch_device, backend


def _check_index(text: str, device: torch.device) -> None:
    if device.index is None:
        return
    module = getattr(torch, device.type, None)
    count = getattr(module, "device_count", None)
    if callable(count) and device.index >= count():
        raise DeviceError(f"device {text!r}: index {device.index} out of range, {count()} {device.type} device(s) visible")
