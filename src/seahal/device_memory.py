"""Accelerator memory sizes, as data: what one device offers the memory planner.

``total_mib`` is the device memory one process sees: the driver's reported total where known
(``nvidia-smi`` ``memory.total``, ``npu-smi`` HBM total), else the vendor's nominal capacity.
The planner uses a configurable fraction of it (the rest: runtime context, allocator
fragmentation, collective-communication buffers). Nothing here was measured on this project's
machines; each row names its source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class DeviceMemory:
    name: str
    vendor: str
    total_mib: int
    source: str

    @property
    def total_bytes(self) -> int:
        return self.total_mib * MIB


DEVICES = (
    DeviceMemory("H100", "NVIDIA", 81559, "H100 SXM5 80GB HBM3: nvidia-smi memory.total 81559 MiB"),
    DeviceMemory("H200", "NVIDIA", 143771, "H200 141GB HBM3e: nvidia-smi memory.total 143771 MiB"),
    DeviceMemory("B200", "NVIDIA", 183359, "B200 (HGX/DGX, 1440 GB per 8 GPUs): nvidia-smi memory.total 183359 MiB"),
    DeviceMemory("910B", "Huawei Ascend", 65536, "Ascend 910B1/B2/B3: 64 GB HBM (nominal; 910B4 has 32 GB)"),
    DeviceMemory(
        "910C", "Huawei Ascend", 131072,
        "Ascend 910C package: 128 GB HBM over two dies (nominal); Atlas A3 servers expose each die as "
        "a 64 GB NPU, which plans like a 910B",
    ),
    DeviceMemory("950PR", "Huawei Ascend", 131072, "Ascend 950PR: 128 GB HiBL 1.0 (announced, Huawei Connect 2025)"),
    DeviceMemory("950DT", "Huawei Ascend", 147456, "Ascend 950DT: 144 GB HiZQ 2.0 (announced, Huawei Connect 2025)"),
    DeviceMemory("MLU370", "Cambricon", 49152, "MLU370-X8 card: 48 GB LPDDR5 (nominal; the X4 has 24 GB)"),
    DeviceMemory("MLU590", "Cambricon", 81920, "MLU590: 80 GB HBM2e (press reports; no public datasheet)"),
)

_ALIASES = {"ascend910b": "910B", "ascend910c": "910C", "ascend950": "950DT", "950": "950DT"}


def device_memory(name: str) -> DeviceMemory:
    """The table row for ``name`` (case-insensitive; ``Ascend910B`` = ``910B``, ``950`` = ``950DT``)."""
    key = re.sub(r"[\s_-]", "", name).lower()
    key = _ALIASES.get(key, key).lower()
    for row in DEVICES:
        if row.name.lower() == key:
            return row
    raise ValueError(f"unknown device {name!r}; known: {', '.join(d.name for d in DEVICES)}")


def parse_devices(spec: str) -> tuple[int, DeviceMemory]:
    """``"8xH100"`` -> (8, the H100 row); a bare name means one device."""
    match = re.fullmatch(r"\s*(?:(\d+)\s*[xX*]\s*)?(.+?)\s*", spec)
    count = int(match.group(1) or 1)
    if count < 1:
        raise ValueError(f"--devices needs at least one device, got {spec!r}")
    return count, device_memory(match.group(2))
