"""Reference kernel of the attention family: sparse attention over gathered keys with sinks (v4_ops.md §9)."""

from __future__ import annotations

import torch

from seahal.hal.formats import compute_dtype


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """One softmax over the keys each query selects, K = V shared, a sink in the denominator.

    q: [B, S, H, D], kv: [B, N, D], indices: [B, S, K] int (-1 = empty), sink: [H] -> [B, S, H, D] in q's dtype.

    ``s_j = softmax_scale * q_h . kv[idx_j]`` over the valid slots (a repeated index counts each
    time); ``o_h = sum_j exp(s_j - m) kv[idx_j] / (sum_j exp(s_j - m) + exp(sink_h - m))``, i.e. a
    softmax in which the sink is one more key whose value is zero. Here m is the max over the keys
    and the sink (the ratio does not depend on m). fp32 math (fp64 for fp64 inputs); a query with
    no valid key gets 0, also when its sink is -inf.
    """
    dtype = compute_dtype(q, kv, sink)
    batch, seq_len, heads, _ = q.shape
    valid = indices >= 0
    rows = torch.arange(batch, device=kv.device)[:, None, None]
    values = kv.to(dtype)[rows, indices.clamp(min=0).long()]  # [B, S, K, D]

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
