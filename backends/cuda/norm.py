"""Triton RMSNorm (op ``rms_norm``; v4_ops.md §3): one launch where eager PyTorch takes six.

Each program normalises BLOCK_R rows of the [R, D] view of x held whole in registers (D <= 16384):
fp32 ``sum(x^2)``, ``mean = sum / D``, ``y = x * rsqrt(mean + eps) * w``, one RNE rounding to x's
dtype. Eager PyTorch runs the same math as six kernels (square, mean, add, rsqrt, two multiplies;
more with dtype casts), each a pass over the row; the model runs 5 norms per layer, so a 4-layer
decode step launched 126 of its ~390 kernels for them.

Differences from the reference are the fp32 summation order of ``sum(x^2)`` (a tree here) and
the GPU's ``rsqrt`` (an approximation within 2 ulp, as torch's CUDA ``rsqrt``): a few fp32 ulps
before the one rounding to bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2
from ._numerics import cast_rne
from ._pdl import pdl_options, wait_for_prior_grid
from .rope import check_dtype

MAX_D = 16384
"""Longest row a program holds in registers (V4-Pro's dim is 7168)."""
ROW_ELEMENTS = 4096
"""Elements per program: short rows (the 512-wide per-head q norm) are normalised several at once."""


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, R, D, eps, stride_xr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WEIGHT: tl.constexpr, PDL: tl.constexpr = False,
):
    """out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) (* w) for rows r of this program's block."""
    wait_for_prior_grid(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    inverse_rms = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * inverse_rms[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], cast_rne(y, out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, fp32 math.

    x: [..., D] bf16/fp32 (D <= 16384), weight: [D] fp32 or None -> [..., D] in x's dtype.
    """
    check_dtype("rms_norm", "x", x)
    d = x.shape[-1]
    if d > MAX_D:
        raise NotImplementedError(f"cuda.triton rms_norm: rows of at most {MAX_D} elements, got D={d}")
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0 or d == 0:
        return out
    block_d = next_power_of_2(d)
    block_r = max(1, min(ROW_ELEMENTS // block_d, next_power_of_2(rows.shape[0])))
    _rms_norm_kernel[(cdiv(rows.shape[0], block_r),)](
        rows, rows if weight is None else weight, out, rows.shape[0], d, float(eps), rows.stride(0),
        BLOCK_R=block_r, BLOCK_D=block_d, HAS_WEIGHT=weight is not None,
        num_warps=min(16, max(1, block_r * block_d // 256)), **pdl_options(),
    )
    return out
