"""fp8_gemm on tmo: ``scaled_matmul`` with group-wise (1x128) A scales and per-block B scales.

``tmo.scaled_matmul(a, b, a_scale, b_scale, output_dtype, quant_bit_size=8, a_quant_bit_size=8)``
picks its scale layouts from the scale shapes (as xLLM's wrapper does): a 2-D ``a_scale [M, K/128]``
is group-wise along K, a 2-D ``b_scale`` with fewer rows than B is per-block
(``[ceil(N/128), K/128]``). Scales go in as fp32 (e8m0 weight scales are widened, exactly).
tmo writes only fp16/bf16, so an fp32 ``out_dtype`` runs on the portable path. Whether the chip
runs FP8 at all is probed once at backend start (:func:`.probe.fp8_gemm_works`).
"""

from __future__ import annotations

import torch
from seahal.backends.cpu.reference.quant import fp8_act_quant
from seahal.hal.formats import decode_scale

from . import tmo
from .route import portable


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``C = (A * sA) @ (B * sB)^T`` (contract: ``hal.ops.gemm.fp8_gemm``).

    a: [M, K] e4m3, a_scale: [M, K/128] fp32, b: [N, K] e4m3, b_scale: [ceil(N/128), K/128]
    fp32 or e8m0 -> [M, N] bf16.
    """
    out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
    why = tmo.lacks("scaled_matmul", "a_quant_bit_size")
    if out_dtype != torch.bfloat16:
        why = f"out_dtype {out_dtype} (scaled_matmul writes fp16/bf16 only)"
    if why is not None:
        return portable("fp8_gemm", why)(a, a_scale, b, b_scale, out_dtype)
    return tmo.call(
        "scaled_matmul",
        a=a.contiguous(),
        b=b.contiguous(),
        a_scale=a_scale.float().contiguous(),
        b_scale=decode_scale(b_scale).float().contiguous(),
        output_dtype=torch.bfloat16,
        quant_bit_size=8,
        a_quant_bit_size=8,
    )


def act_quant_gemm(
    x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The ``act_quant_gemm`` contract for e4m3 weights: x's 1x128 tiles by the portable
    ``fp8_act_quant`` (``scaled_quantize`` has no 1x128 mode), then :func:`fp8_gemm`. Packed e2m1
    weights (no FP4 GEMM on tmo) run the portable kernel.

    x: [M, K] bf16/fp32, b: [N, K] e4m3, b_scale: [ceil(N/128), K/128] fp32/e8m0 -> [M, N] bf16.
    """
    if b.dtype == torch.uint8:
        return portable("act_quant_gemm", "FP4 weights (no FP4 GEMM on tmo)")(x, b, b_scale, out_dtype)
    return fp8_gemm(*fp8_act_quant(x), b, b_scale, out_dtype)
