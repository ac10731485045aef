"""Reference kernel of the linear family: fp32 linear layers over bf16 or fp32 weights."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from seahal.hal.formats import compute_dtype

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
