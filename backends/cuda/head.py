"""Triton output head (op ``head_logits``; v4_ops.md §13): fp32 logits streaming a bf16 head once.

Decode (at most :data:`GEMV_MAX_TOKENS` tokens) is a GEMV bound by reading W: V4's head is 129280 x
4096, 1.06 GB in bf16 and 2.1 GB as the fp32 copy the official code keeps, more than every FP8/FP4
layer weight of a 4-layer model together. Each program widens BLOCK_V rows of W to fp32 in
registers, BLOCK_D columns at a time, and keeps one fp32 running sum per (token, row, lane) on the
CUDA cores (fp32 FMA, no tensor cores: TF32 would round x), reduced across lanes once at the end. More tokens turn it into a GEMM, which
goes to cuBLAS in fp32 on BLOCK rows of W widened at a time (the reference's method).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seahal.backends.cpu.reference.head import head_logits as widened_gemm

from .rope import check_dtype

GEMV_MAX_TOKENS = 4
"""Up to this many tokens the Triton GEMV runs; beyond, cuBLAS on widened row blocks."""
BLOCK_V = 16
"""Head rows per program: V4's 129280 rows make 8080 programs, enough to keep every SM streaming."""


@triton.jit
def _head_gemv_kernel(
    x_ptr, w_ptr, out_ptr, T, V, D, stride_xt, stride_wv, stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t, v] = sum_d fp32(x[t, d]) fp32(W[v, d]) for this program's BLOCK_V rows of W."""
    rows = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    tokens = tl.arange(0, BLOCK_T)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wv
    partial = tl.zeros((BLOCK_T, BLOCK_V, BLOCK_D), dtype=tl.float32)  # one running sum per lane
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(w_rows + cols[None, :], mask=(rows[:, None] < V) & (cols[None, :] < D), other=0.0)
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + cols[None, :],
                    mask=(tokens[:, None] < T) & (cols[None, :] < D), other=0.0)
        partial += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    out = out_ptr + tokens[:, None] * stride_ot + rows[None, :]
    tl.store(out, tl.sum(partial, axis=2), mask=(tokens[:, None] < T) & (rows[None, :] < V))


def head_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ weight^T`` with both operands widened exactly and fp32 sums.

    x: [..., D] bf16/fp32, weight: [V, D] bf16/fp32 -> [..., V] fp32.
    """
    check_dtype("head_logits", "x", x)
    check_dtype("head_logits", "weight", weight)
    d, v = x.shape[-1], weight.shape[0]
    tokens = x.reshape(-1, d)
    if tokens.shape[0] > GEMV_MAX_TOKENS:
        return widened_gemm(x, weight)
    out = torch.empty((tokens.shape[0], v), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out.zero_().reshape(*x.shape[:-1], v)
    tokens = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    block_t = triton.next_power_of_2(tokens.shape[0])
    _head_gemv_kernel[(triton.cdiv(v, BLOCK_V),)](
        tokens, weight, out, tokens.shape[0], v, d, tokens.stride(0), weight.stride(0), out.stride(0),
        BLOCK_T=block_t, BLOCK_V=BLOCK_V, BLOCK_D=256 // block_t, num_warps=4,
    )
    return out.reshape(*x.shape[:-1], v)
