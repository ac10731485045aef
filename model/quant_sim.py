"""The stored precision of cached vectors, as the official inference code simulates it."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from seahal.hal.formats import fp4_dequantize, hadamard

KV_TILE = 64
FP4_BLOCK = 32


def fp8_kv_precision(kv: torch.Tensor, ops: SimpleNamespace, rope_dim: int) -> torch.Tensor:
    """Round the no-RoPE dims through FP8 e4m3 in 1x64 ue8m0 tiles; RoPE dims stay (v4_ops §11.3)."""
    nope = kv[..., : kv.shape[-1] - rope_dim]
    q, s = ops.fp8_act_quant(nope, KV_TILE)
    rounded = (q.float().unflatten(-1, (-1, KV_TILE)) * s.unsqueeze(-1)).flatten(-2)
    return torch.cat((rounded.to(kv.dtype), kv[..., nope.shape[-1] :]), dim=-1)


def fp4_indexer_precision(x: torch.Tensor, ops: SimpleNamespace, rotation: torch.Tensor) -> torch.Tensor:
    """Hadamard-rotate, then round through FP4 e2m1 with 1x32 ue8m0 scales (indexer q and keys);
    ``rotation``: the fp32 Sylvester matrix of the last dim (``sylvester_hadamard``)."""
    rotated = hadamard(x, rotation)
    codes, scale = ops.fp4_quant(rotated, FP4_BLOCK)
    return fp4_dequantize(codes, scale, FP4_BLOCK, x.dtype)
