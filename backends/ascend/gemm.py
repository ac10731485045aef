"""FP8 block-scaled GEMM on the Ascend 950: ``npu_quant_matmul`` in G-B mode (group_sizes [1, 128, 128])."""

from __future__ import annotations

import torch
import torch_npu

from seahal.hal.formats import decode_scale


def fp8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The ``fp8_gemm`` contract: ``C = (A sA) @ (B sB)^T``.

    a: [M, K] e4m3, a_scale: [M, K/128] fp32, b: [N, K] e4m3, b_scale: [ceil(N/128), K/128] fp32/e8m0
    -> [M, N] bf16 (or fp32), as
    ``npu_quant_matmul(a, b^T [K, N], b_scale^T fp32 [K/128, ceil(N/128)], *, pertoken_scale=a_scale,
    output_dtype, group_sizes=[1, 128, 128])`` (torch-npu 2.14 schema; FP8 and G-B on Ascend 950 only,
    CANN aclnnQuantMatmulV5).
    """
    return torch_npu.npu_quant_matmul(
        a,
        b.t(),
        decode_scale(b_scale).float().t().contiguous(),
        pertoken_scale=a_scale,
        output_dtype=out_dtype or torch.bfloat16,
        group_sizes=[1, 128, 128],
    )
