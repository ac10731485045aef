"""Reference kernel of the norm family: RMSNorm of the last dim (v4_ops.md §3)."""

from __future__ import annotations

import torch

from seahal.hal.formats import compute_dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, in fp32 (fp64 for fp64 x).

    x: [..., D] bf16/fp32/fp64, weight: [D] or None -> [..., D] in x's dtype.
    """
    dtype = compute_dtype(x)
    xf = x.to(dtype)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(dtype)
    return y.to(x.dtype)
