"""Reference kernel of the indexer family: lightning-indexer scores and causal top-k (v4_ops.md §8)."""

from __future__ import annotations

import torch

from seahal.hal.formats import compute_dtype, index_key_unpack


def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, ratio: int, start_pos: int | torch.Tensor, topk: int,
    weights_scale: float = 1.0, offset: int = 0,
) -> torch.Tensor:
    """Select, for every query token, the top-k visible compressed entries by indexer score.

    q: [B, S, H, d], weights: [B, S, H] bf16/fp32, keys: [B, N, d] -> indices: [B, S, topk] int32.

    ``I(t, j) = sum_h w_h * relu(q_h . K_j)`` with ``w = weights * weights_scale`` in fp32 (fp64
    for fp64 inputs), for query ``t = start_pos + s`` and the entries it sees, ``j < min(N,
    floor((t+1)/m))``. Indices are ordered by score descending, ties to the smaller index (a stable
    sort); entry j is returned as ``offset + j``, slots beyond the visible entries are -1.
    ``start_pos`` may be a 0-d or [B] (per sequence) integer tensor on q's device: it is only
    computed with, never read on the host.
    """
    dtype = compute_dtype(q, weights, keys)
    batch, seq_len, _, _ = q.shape
    n_entries = keys.shape[1]
    logits = torch.einsum("bshd,bnd->bshn", q.to(dtype), keys.to(dtype))
    scores = (torch.relu(logits) * (weights.to(dtype) * weights_scale)[..., None]).sum(dim=2)

    first = start_pos.reshape(-1, 1) if isinstance(start_pos, torch.Tensor) else start_pos
    query_pos = first + torch.arange(seq_len, device=q.device)  # [S], or [1 or B, S]
    visible = torch.arange(n_entries, device=q.device) < ((query_pos + 1) // ratio)[..., None]
    scores = scores.masked_fill(~visible, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
    picked = torch.where(visible.expand(batch, -1, -1).gather(-1, order), order + offset, -1)

    indices = torch.full((batch, seq_len, topk), -1, dtype=torch.int32, device=q.device)
    indices[..., : picked.shape[-1]] = picked.to(torch.int32)
    return indices


def indexer_topk_packed(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, key_format: str, ratio: int,
    start_pos: int | torch.Tensor, topk: int, weights_scale: float = 1.0, offset: int = 0,
) -> torch.Tensor:
    """:func:`indexer_topk` over packed indexer keys [B, N, index_key_bytes(d, key_format)] uint8,
    decoded to q's dtype first (``fp4``: e2m1 x ue8m0 per 32; ``fp8``: e4m3 x the key's fp32 scale)."""
    keys = index_key_unpack(keys, q.shape[-1], key_format, q.dtype)
    return indexer_topk(q, weights, keys, ratio, start_pos, topk, weights_scale, offset)
