"""Block quantisation: npu_dynamic_block_quant (emulated from CANN ops-nn ``quant/dynamic_block_quant``
and the torch_npu 2.14 docstring: INT8 on A2/A3, FLOAT8 also on the Ascend 950)."""

from __future__ import annotations

import torch

from ._emulation import check, on_device, soc_family

_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
_CODES = {1: torch.int8, 23: torch.float8_e5m2, 24: torch.float8_e4m3fn, 291: torch.float8_e5m2, 292: torch.float8_e4m3fn}
"""dst_type: torch ScalarType numbers (a torch dtype passes as its number) and torch_npu's own codes."""


def npu_dynamic_block_quant(
    x, *, min_scale=0.0, round_mode="rint", dst_type=1, row_block_size=1, col_block_size=128, dst_type_max=0.0
):
    """x: [M, N] (or [B, M, N] on the 950) bf16/fp16 -> (y like x in dst_type, scale
    [.., ceil(M/row), ceil(N/col)] fp32). Per block: ``scale = max(amax / DST_MAX, min_scale)``,
    ``y = cast(x / scale)`` (RNE, saturating at DST_MAX). Only row_block_size 1 is emulated.
    """
    dtype = _CODES.get(int(dst_type)) if not isinstance(dst_type, torch.dtype) else dst_type
    on_device("x", x)
    check(x.dtype in (torch.bfloat16, torch.float16), f"x must be float16 or bfloat16, got {x.dtype}")
    check(dtype in _MAX, f"dst_type {dst_type} is not INT8, FLOAT8_E5M2 or FLOAT8_E4M3FN")
    a5 = soc_family() == "A5"
    check(x.dim() == 2 or (a5 and x.dim() == 3), f"x must be 2-D (3-D on Ascend 950), got {x.dim()}-D")
    check(dtype == torch.int8 or a5, f"FLOAT8 outputs are only supported on Ascend 950, this is {soc_family()}")
    check(round_mode == "rint", f"round_mode must be 'rint' for {dtype}, got {round_mode!r}")
    check(row_block_size == 1, f"only row_block_size=1 is emulated, got {row_block_size}")
    check(col_block_size in ((64, 128, 192, 256) if a5 else (128,)), f"col_block_size {col_block_size} is not supported")
    check(min_scale >= 0 and dst_type_max == 0.0, "min_scale must be >= 0; dst_type_max is for HIFLOAT8 only")
    n = x.shape[-1]
    blocks = -(-n // col_block_size)
    padded = torch.nn.functional.pad(x.float(), (0, blocks * col_block_size - n))
    tiles = padded.unflatten(-1, (blocks, col_block_size))
    scale = torch.clamp(tiles.abs().amax(-1) / _MAX[dtype], min=min_scale)
    q = (tiles / scale[..., None]).flatten(-2)[..., :n]
    if dtype == torch.int8:
        q = q.round().clamp(-128, 127)
    else:
        q = q.clamp(-_MAX[dtype], _MAX[dtype])
    return q.to(dtype), scale
