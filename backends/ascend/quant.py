"""FP8 activation quant with fp32 scales on the Ascend 950: ``npu_dynamic_block_quant``."""

from __future__ import annotations

import torch
import torch_npu

from ._portable import portable

BLOCK_SIZES = frozenset({64, 128, 192, 256})
"""col_block_size of npu_dynamic_block_quant on the 950 (CANN ops-nn ``quant/dynamic_block_quant``)."""
_MIN_SCALE = float(torch.tensor(1e-4, dtype=torch.float32) / 448)
"""The contract's amax floor 1e-4 as a scale floor: ``max(fl(amax/448), fl(1e-4/448)) =
fl(max(amax, 1e-4)/448)`` because rounding is monotone; an fp32 value, so exact as a Python float."""


def fp8_act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``fp8_act_quant`` contract with fp32 scales on ``torch_npu.npu_dynamic_block_quant``.

    x: [..., K] bf16 -> q [..., K] float8_e4m3fn, scale [..., K/block_size] fp32, as
    ``npu_dynamic_block_quant(x [rows, K], *, min_scale=fl(1e-4/448), round_mode="rint",
    dst_type=torch.float8_e4m3fn, row_block_size=1, col_block_size=block_size)``: per 1 x block
    tile ``scale = max(amax/448, min_scale)``, ``q = e4m3(x / scale)`` (CANN DynamicBlockQuant;
    FLOAT8 outputs on the 950 only). ue8m0 scales (V4's default) are not served: the vendor's scale
    is amax/448 and its codes are quantised with it, so power-of-two scales and their codes cannot
    be derived bit-exactly; plans get this kernel only when they ask for ``scale_fmt="fp32"``.
    Other dtypes and block sizes run the portable kernel.
    """
    if scale_fmt != "fp32":
        raise NotImplementedError(
            "ascend.torch_npu fp8_act_quant serves scale_fmt='fp32' only (npu_dynamic_block_quant has no "
            f"power-of-two scale rounding), got {scale_fmt!r}; plan without requirements to get the portable kernel"
        )
    if x.dtype not in (torch.bfloat16, torch.float16) or block_size not in BLOCK_SIZES:
        reason = f"bf16/fp16 x and a block size in {sorted(BLOCK_SIZES)} (got {x.dtype}, {block_size})"
        return portable("fp8_act_quant", f"npu_dynamic_block_quant needs {reason}", x, block_size, scale_fmt)
    k = x.shape[-1]
    q, scale = torch_npu.npu_dynamic_block_quant(
        x.reshape(-1, k),
        min_scale=_MIN_SCALE,
        round_mode="rint",
        dst_type=torch.float8_e4m3fn,
        row_block_size=1,
        col_block_size=block_size,
    )
    return q.view(x.shape), scale.view(*x.shape[:-1], k // block_size)
