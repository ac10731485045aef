"""Reference kernels of the block-scaled quantised GEMMs (v4_ops.md §11.2, §11.5).

Both GEMMs are ``C = A @ B^T`` over K split into steps: each step's partial product of the raw
(unscaled) codes is computed in fp32, multiplied by the step's activation and weight scales and
added to a separate fp32 accumulator, in K order. The step is the finer of the two scale
granularities: 128 for FP8 x FP8 (1x128 / 128x128), 32 for FP8 x FP4 (1x128 / 1x32).
"""

from __future__ import annotations

import torch

from seahal.hal.formats import decode_scale, e2m1_decode, fp4_unpack

from .quant import fp8_act_quant

FP8_BLOCK = 128
FP4_BLOCK = 32


def _block_scaled_matmul(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, step: int, out_dtype
) -> torch.Tensor:
    """``C = sum_j (A_j @ B_j^T) * (sA[:, j] sB[:, j])`` over K steps j of width ``step``, in fp32.

    a: [M, K], b: [N, K] fp32 code values; a_scale: [M, K/step], b_scale: [N, K/step] fp32
    -> [M, N] in out_dtype (bf16 when None).
    """
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for j in range(a.shape[1] // step):
        k = slice(j * step, (j + 1) * step)
        acc += (a[:, k] @ b[:, k].T) * (a_scale[:, j, None] * b_scale[None, :, j])
    return acc.to(torch.bfloat16 if out_dtype is None else out_dtype)


def fp8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype=None
) -> torch.Tensor:
    """FP8 block-scaled GEMM ``C = (A sA) @ (B sB)^T``, fp32 accumulation per 128-wide K block.

    a: [M, K] e4m3, a_scale: [M, K/128] fp32, b: [N, K] e4m3, b_scale: [ceil(N/128), K/128]
    fp32 or e8m0 -> [M, N] bf16 (or out_dtype).

    ``C[m, n] = sum_kb (sum_{k in kb} A[m, k] B[n, k]) * sA[m, kb] * sB[n // 128, kb]``
    """
    n = b.shape[0]
    b_scale_rows = decode_scale(b_scale).repeat_interleave(FP8_BLOCK, dim=0)[:n]
    return _block_scaled_matmul(
        a.to(torch.float32), decode_scale(a_scale), b.to(torch.float32), b_scale_rows, FP8_BLOCK, out_dtype
    )


def fp4_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype=None
) -> torch.Tensor:
    """FP8 x FP4 GEMM ``C = (A sA) @ (e2m1(B) sB)^T``, fp32 accumulation per 32-wide K step.

    a: [M, K] e4m3, a_scale: [M, K/128] fp32, b: [N, K/2] uint8 packed e2m1 (low nibble first),
    b_scale: [N, K/32] fp32 or e8m0 -> [M, N] bf16 (or out_dtype).

    ``C[m, n] = sum_ks (sum_{k in ks} A[m, k] e2m1(B[n, k])) * sA[m, ks // 4] * sB[n, ks]``
    (e2m1 values are exact in e4m3, so the partial products match the official kernel's).
    """
    a_scale_steps = decode_scale(a_scale).repeat_interleave(FP8_BLOCK // FP4_BLOCK, dim=1)
    b_values = e2m1_decode(fp4_unpack(b))
    return _block_scaled_matmul(
        a.to(torch.float32), a_scale_steps, b_values, decode_scale(b_scale), FP4_BLOCK, out_dtype
    )


def act_quant_gemm(x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """x's FP8 1x128 tiles (ue8m0 scales) times quantised weights: :func:`fp8_gemm` for e4m3 b,
    :func:`fp4_gemm` for packed e2m1 b (uint8).

    x: [M, K] float, b: [N, K] e4m3 or [N, K/2] uint8, b_scale as the GEMM of b's format takes
    -> [M, N] bf16 (or out_dtype).
    """
    gemm = fp4_gemm if b.dtype == torch.uint8 else fp8_gemm
    return gemm(*fp8_act_quant(x), b, b_scale, out_dtype)
