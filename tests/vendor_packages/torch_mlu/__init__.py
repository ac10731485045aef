"""TEST EMULATION of ``torch_mlu`` (Cambricon's PyTorch device extension), for seahal's tests.

Written from Cambricon's public API as vllm-mlu and FlagGems use it: importing ``torch_mlu``
registers ``torch.mlu`` with ``is_available()``, ``device_count()``, ``get_device_name()`` and
``get_device_capability()``. This emulation keeps every tensor on the CPU
(``__seahal_emulated_on__ = "cpu"``) and pretends to see the MLUs configured in
:mod:`._emulation`. Remove ``torch.mlu`` with ``_emulation.uninstall()``.
"""

from __future__ import annotations

import torch

from . import _emulation

__version__ = "1.29.2+torch2.7.1 (emulated)"
__seahal_emulated_on__ = "cpu"

mlu = _emulation.DeviceModule()
torch.mlu = mlu
