"""``start_pos`` as data (TUNING.md): a 0-d tensor (every sequence at one position) or [B] (one
position per sequence) that only the kernel reads, at ``pos_ptr + b * stride`` for sequence b."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cache_keys import settle_cache_keys


def position_stride(op: str, start_pos: torch.Tensor, batch: int, device: torch.device) -> int:
    """The stride between sequences' positions in ``start_pos``: 0 for a 0-d tensor, its own stride
    for [batch]. Checks what the metadata says (rank, length, dtype, device), never the value."""
    if (
        start_pos.dim() > 1
        or (start_pos.dim() == 1 and start_pos.shape[0] != batch)
        or start_pos.dtype not in (torch.int32, torch.int64)
        or start_pos.device != device
    ):
        raise ValueError(
            f"cuda.triton {op}: a tensor start_pos must be 0-d or [B={batch}] int32/int64 on {device}, "
            f"got {list(start_pos.shape)} {start_pos.dtype} on {start_pos.device}"
        )
    return start_pos.stride(0) if start_pos.dim() == 1 else 0


@triton.jit
def load_position(pos_ptr, stride, b):
    """Sequence b's start_pos, as int32: the index math an int position (< 2^31) gets."""
    return tl.load(pos_ptr + b * stride).to(tl.int32)


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
