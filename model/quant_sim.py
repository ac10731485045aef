"""The stored precision of cached KV vectors, as the official inference code simulates it (the
indexer's FP4 precision is the ``hadamard_rotate`` op's rounding)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

KV_TILE = 64


def fp8_kv_precision(kv: torch.Tensor, ops: SimpleNamespace, rope_dim: int) -> torch.Tensor:
    """Round the no-RoPE dims through FP8 e4m3 in 1x64 ue8m0 tiles; RoPE dims stay (v4_ops §11.3)."""
    nope = kv[..., : kv.shape[-1] - rope_dim]
    q, s = ops.fp8_act_quant(nope, KV_TILE)
    rounded = (q.float().unflatten(-1, (-1, KV_TILE)) * s.unsqueeze(-1)).flatten(-2)
    return torch.cat((rounded.to(kv.dtype), kv[..., nope.shape[-1] :]), dim=-1)
