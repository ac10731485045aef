"""``torch_npu.npu``: the device module (emulated: ``device_count`` NPUs of ``soc_version``)."""

from __future__ import annotations

from . import _emulation


def is_available() -> bool:
    return _emulation.state.device_count > 0


def device_count() -> int:
    return _emulation.state.device_count


def get_soc_version() -> int:
    """The SoC version number (int), as ``torch_npu.npu.get_soc_version()`` returns it."""
    return _emulation.state.soc_version
