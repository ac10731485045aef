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

import itertools

import torch
import triton
import triton.language as tl

from ._cache_keys import settle_cache_keys
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
    x_ptr, w_ptr, out_ptr, R, D, eps, stride_xr, inner, stride_xi,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WEIGHT: tl.constexpr, TWO_LEVEL: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) (* w) for rows r of this program's block; row r of
    x at ``r * stride_xr``, or with TWO_LEVEL at ``(r // inner) * stride_xr + (r % inner) * stride_xi``."""
    wait_for_prior_grid(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    if TWO_LEVEL:
        start = (rows // inner).to(tl.int64) * stride_xr + (rows % inner).to(tl.int64) * stride_xi
    else:
        start = rows.to(tl.int64) * stride_xr
    x = tl.load(x_ptr + start[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    r = out.numel() // d if d else 0
    if r == 0 or d == 0:
        return out
    x, stride_r, inner, stride_i = _row_strides(x)
    block_d = next_power_of_2(d)
    block_r = max(1, min(ROW_ELEMENTS // block_d, next_power_of_2(r)))
    _rms_norm_kernel[(cdiv(r, block_r),)](
        x, x if weight is None else weight, out, r, d, float(eps), stride_r, inner, stride_i,
        BLOCK_R=block_r, BLOCK_D=block_d, HAS_WEIGHT=weight is not None, TWO_LEVEL=inner > 1,
        num_warps=min(16, max(1, block_r * block_d // 256)), **pdl_options(),
    )
    return out


def _row_strides(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(x or a copy, stride of a row, inner rows, stride of an inner row): the rows of x [..., D]
    are at one stride where its leading dims flatten into one, else (a column slice of a wider
    tensor viewed as heads: [..., H, D] of a [..., H * D + more]) at ``(r // H) * stride +
    (r % H) * stride_h``; a copy (one) only where neither holds or the columns are not adjacent."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    stride = _flat_stride(x.shape[:-1], x.stride()[:-1])
    if stride is not None:
        return x, stride, 1, 0
    if x.dim() >= 3:
        outer = _flat_stride(x.shape[:-2], x.stride()[:-2])
        if outer is not None:
            return x, outer, x.shape[-2], x.stride(-2)
    x = x.contiguous()
    return x, x.shape[-1], 1, 0


def _flat_stride(sizes: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """The one stride that steps through dims ``sizes`` (row-major) where they flatten into one
    (size-1 dims take any stride), else None; 0 for no dims or a single element."""
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    for (_, outer), (n, inner) in itertools.pairwise(dims):
        if outer != inner * n:
            return None
    return dims[-1][1] if dims else 0


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
