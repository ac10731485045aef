"""Reference kernels of the linear family: fp32 linear layers over bf16 or fp32 weights, and the
grouped linear layer over a dequantised weight."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from seahal.hal.formats import compute_dtype, dequantize_weight

WIDEN_ROWS = 16384
"""Rows of a narrower weight widened at a time: a bounded temporary (V4's 129280 x 4096 bf16 head
would otherwise need a 2 GB fp32 copy per call)."""


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` with both widened to fp32 (fp64 if either is fp64), fp32 sums.

    x: [..., D], weight: [N, D] -> [..., N] fp32 (fp64).
    """
    dtype = compute_dtype(x, weight)
    xf = x.to(dtype)
    if weight.dtype == dtype:
        return F.linear(xf, weight)
    return torch.cat([F.linear(xf, rows.to(dtype)) for rows in weight.split(WIDEN_ROWS)], dim=-1)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per group g, ``x[..., g, :] @ W'_g^T`` with W' the weight dequantised and rounded to x's dtype.

    x: [..., G, I], weight: [G*R, I] (FP8 e4m3 + scale [ceil(G*R/128), I/128], or dense)
    -> [..., G, R] in x's dtype.

    The official code's einsum, in x's dtype: bf16 products are exact in fp32 and every torch
    device's bf16 matmul sums them in fp32 (the CPU's too), so this is the fp32 sum the contract
    names without an fp32 copy of the weight (64 MB of bf16 wo_a a layer would take 128 MB).
    """
    g, i = x.shape[-2:]
    w = dequantize_weight(weight, scale, x.dtype).view(g, -1, i)
    return torch.einsum("...gi,gri->...gr", x, w).contiguous()  # the batched GEMM writes [G, ..., R]
