"""Reference kernels of the attention family: sparse attention over gathered keys with sinks (v4_ops.md §9),
the keys dense rows or packed FP8 cache records."""

from __future__ import annotations

import torch

from seahal.hal.formats import compute_dtype

from .quant import kv_cache_unpack
from .rope import rope


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    positions: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
) -> torch.Tensor:
    """One softmax over the keys each query selects, K = V shared, a sink in the denominator.

    q: [B, S, H, D], kv: [B, N, D], indices: [B, S, K] int (-1 = empty), sink: [H],
    positions: [B, S] int or None, freqs: [R] or None -> [B, S, H, D] in q's dtype.

    ``s_j = softmax_scale * q_h . kv[idx_j]`` over the valid slots (a repeated index counts each
    time); ``o_h = sum_j exp(s_j - m) kv[idx_j] / (sum_j exp(s_j - m) + exp(sink_h - m))``, i.e. a
    softmax in which the sink is one more key whose value is zero. Here m is the max over the keys
    and the sink (the ratio does not depend on m). fp32 math (fp64 for fp64 inputs); a query with
    no valid key gets 0, also when its sink is -inf. Only the selected rows are read, through
    kv's strides: a pool shared by the batch (batch stride 0, a paged cache) is never copied.
    With positions and freqs, ``rope(o, positions, freqs, inverse=True)`` of that o.
    """
    o = _attend(q, _gather(kv, indices), indices >= 0, sink, softmax_scale)
    return _rotated_back(o, positions, freqs)


def sparse_attention_fp8(
    q: torch.Tensor,
    records: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    rope_dim: int = 64,
    tile: int = 64,
    positions: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`sparse_attention` over packed FP8 KV records [B, N, kv_record_bytes(D)] uint8.

    Gathers the [B, S, K] records the indices name (K x 584 bytes per query for V4, whatever N is),
    decodes those with ``kv_cache_unpack`` and casts them to q's dtype: exactly
    ``sparse_attention(q, kv_cache_unpack(records).to(q.dtype), ..., positions, freqs)``, bit for bit.
    """
    rows = kv_cache_unpack(_gather(records, indices), q.shape[-1], rope_dim, tile).to(q.dtype)
    return _rotated_back(_attend(q, rows, indices >= 0, sink, softmax_scale), positions, freqs)


def _rotated_back(o: torch.Tensor, positions: torch.Tensor | None, freqs: torch.Tensor | None) -> torch.Tensor:
    """o as it is, or with its query's inverse RoPE (the output's, before V4's output projection)."""
    return o if positions is None else rope(o, positions, freqs, inverse=True)


def _gather(rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``rows[b, indices[b, s, k]]`` for rows [B, N, W] (any strides, batch stride 0 included)
    -> [B, S, K, W] (row 0 in empty slots)."""
    batch = torch.arange(rows.shape[0], device=rows.device)[:, None, None]
    return rows[batch, indices.clamp(min=0).long()]


def _attend(
    q: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """The softmax with sink over each query's gathered keys: q [B, S, H, D], values [B, S, K, D]
    (q's dtype), valid [B, S, K] bool -> [B, S, H, D] in q's dtype."""
    dtype = compute_dtype(q, values, sink)
    batch, seq_len, heads, _ = q.shape
    # Empty slots gathered row 0, which may be anything (a free page of a paged pool: NaN bytes);
    # zeroed, so that their zero weights give 0 and not 0 * NaN.
    values = torch.where(valid[..., None], values.to(dtype), 0.0)
    logits = torch.einsum("bshd,bskd->bshk", q.to(dtype), values) * softmax_scale
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    sink_logits = sink.to(dtype)[None, None, :, None].expand(batch, seq_len, heads, 1)
    logits = torch.cat((logits, sink_logits), dim=-1)  # the sink: a last key with value zero

    peak = logits.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    probs = torch.exp(logits - peak)
    denominator = probs.sum(dim=-1, keepdim=True)
    out = torch.einsum("bshk,bskd->bshd", probs[..., :-1], values)
    out = torch.where(denominator > 0, out / denominator, 0.0)
    return out.to(q.dtype)
