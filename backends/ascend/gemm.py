"""FP8 block-scaled GEMM on the Ascend 950: ``npu_quant_matmul`` in G-B mode (group_sizes [1, 128, 128])."""

from __future__ import annotations

import torch
import torch_npu

from seahal.backends.cpu.reference.quant import fp8_act_quant
from seahal.hal.formats import decode_scale

from ._portable import portable


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


def act_quant_gemm(
    x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The ``act_quant_gemm`` contract for e4m3 weights: x's 1x128 tiles by the portable
    ``fp8_act_quant`` (V4's ue8m0 scales; ``npu_dynamic_block_quant`` makes amax/448 ones), then
    :func:`fp8_gemm`. Packed e2m1 weights run the portable kernel (no FP4 GEMM is wired here).

    x: [M, K] bf16/fp32, b: [N, K] e4m3, b_scale: [ceil(N/128), K/128] fp32/e8m0 -> [M, N] bf16 (or fp32).
    """
    if b.dtype == torch.uint8:
        return portable("act_quant_gemm", "FP4 weights: no FP4 GEMM on torch_npu", x, b, b_scale, out_dtype)
    return fp8_gemm(*fp8_act_quant(x), b, b_scale, out_dtype)
