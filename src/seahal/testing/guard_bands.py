"""Guard bands: poisoned bytes around every argument the conformance runner hands a kernel.

Each tensor argument is copied into the middle of a larger buffer whose first and last
:data:`GUARD_BYTES` hold poison: all-ones bytes for floating-point and byte tensors (NaN in fp32,
bf16, fp16, e4m3, e5m2 and e8m0; two -6.0 codes in a packed e2m1 byte), zeros for other integer
tensors (a wild index would make the kernel fault rather than fail). A kernel that reads past an
argument computes with the poison, so its output fails the comparison; one that writes past an
argument changes the poison, which :meth:`GuardBands.overwritten` reports by argument. On a GPU,
and in the Triton interpreter (which dereferences raw host pointers), such accesses otherwise
land silently in whatever tensor lies next in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GUARD_BYTES = 4096
"""Poisoned bytes before and after each argument: a multiple of 16 (and of every element size),
so an argument keeps its allocation's alignment, which Triton specialises on."""


def poison_byte(dtype: torch.dtype) -> int:
    """The byte every guard byte of a ``dtype`` buffer holds: 0xFF for floating-point and byte
    tensors, 0 for the other integer ones."""
    return 0xFF if dtype.is_floating_point or dtype == torch.uint8 else 0


def _extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from a strided view's first to its last element, inclusive (0 if it is empty)."""
    if any(size == 0 for size in shape):
        return 0
    return 1 + sum((size - 1) * step for size, step in zip(shape, stride))


@dataclass
class GuardBands:
    """The guarded buffers of one case's arguments: (argument position, buffer, guard elements,
    argument extent in elements) per tensor placed by :meth:`empty_strided`."""

    placed: list[tuple[int, torch.Tensor, int, int]] = field(default_factory=list)

    def empty_strided(
        self, position: int, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """``torch.empty_strided(shape, stride)`` inside a poisoned buffer, for argument ``position``."""
        guard = GUARD_BYTES // dtype.itemsize
        extent = _extent(shape, stride)
        buffer = torch.empty(2 * guard + extent, dtype=dtype, device=device)
        buffer.view(torch.uint8).fill_(poison_byte(dtype))
        self.placed.append((position, buffer, guard, extent))
        return buffer.as_strided(shape, stride, guard)

    def overwritten(self) -> list[tuple[int, str]]:
        """(argument position, "N bytes before" / "N bytes after") for every band a kernel changed."""
        found = []
        for position, buffer, guard, extent in self.placed:
            poison = poison_byte(buffer.dtype)
            for where, band in (("before", buffer[:guard]), ("after", buffer[guard + extent:])):
                changed = int((band.view(torch.uint8) != poison).sum())
                if changed:
                    found.append((position, f"{changed} bytes {where}"))
        return found
