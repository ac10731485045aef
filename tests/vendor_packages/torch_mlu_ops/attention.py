"""``single_query_cached_kv_attn``: decode attention over a paged KV cache.

q [tokens, seq_q, q_heads, head_size]; k_cache [blocks, kv_heads, block_size, head_size];
v_cache of the same layout, or None when K and V share the cache (MLA: V = the first
``head_size_v`` dims of K); out [tokens, seq_q, q_heads, head_size_v], written in place;
block_tables [tokens, max_blocks] int32 and context_lens [tokens] int32: token i attends to the
first ``context_lens[i]`` cache slots its block table lists. ``learnable_sink`` [q_heads] float32
adds ``exp(sink_h)`` to each head's softmax denominator. Documented limits: ``window_size_right``
only -1; on an unquantised cache ``seq_q * q_heads / kv_heads`` at most 128 (256 for a bfloat16
cache). The emulation covers seq_q == 1 (the per-token block-table form DeepSeek-V4 uses).
"""

from __future__ import annotations

import torch

from ._emulation import FLOATS, check, check_dtype, recorded, unsupported


@recorded
def single_query_cached_kv_attn(q, k_cache, v_cache, out, block_tables, context_lens, k_cache_quant_scale,
                                v_cache_quant_scale, alibi_slopes, max_context_len, window_size_left,
                                window_size_right, softmax_scale, return_lse=False, q_quant_scale=None,
                                head_size_v=-1, compute_dtype=None, mask=None, learnable_sink=None):
    check(window_size_right == -1, f"window_size_right only supports -1, but got {window_size_right}")
    check(q.dim() == 4 and k_cache.dim() == 4, "q must be 4-D [tokens, seq_q, heads, head_size] and k_cache 4-D "
          f"[blocks, kv_heads, block_size, head_size], but got {q.dim()}-D and {k_cache.dim()}-D")
    check_dtype("q", q, FLOATS)
    check(k_cache.dtype == q.dtype, f"an unquantised k_cache must have q's dtype {q.dtype}, but got {k_cache.dtype}")
    if any(x is not None for x in (k_cache_quant_scale, v_cache_quant_scale, q_quant_scale, alibi_slopes, mask)):
        raise unsupported("quantised caches, alibi and masks")
    if v_cache is not None or return_lse or window_size_left != -1:
        raise unsupported("a separate v_cache, return_lse and sliding windows")
    tokens, seq_q, q_heads, head_size = q.shape
    _, kv_heads, block_size, k_size = k_cache.shape
    check(k_size == head_size, f"k_cache head_size {k_size} must equal q's {head_size}")
    check(q_heads % kv_heads == 0, f"q_heads {q_heads} must be a multiple of kv_heads {kv_heads}")
    if seq_q != 1:
        raise unsupported("seq_q > 1")
    limit = 256 if k_cache.dtype == torch.bfloat16 else 128
    check(seq_q * q_heads // kv_heads <= limit,
          f"seq_q * q_heads / kv_heads = {seq_q * q_heads // kv_heads} exceeds {limit}; split the heads")
    value_size = head_size if head_size_v == -1 else head_size_v
    check(out.shape == (tokens, seq_q, q_heads, value_size) and out.dtype == q.dtype,
          f"out must be {[tokens, seq_q, q_heads, value_size]} {q.dtype}, but got {list(out.shape)} {out.dtype}")
    check_dtype("block_tables", block_tables, (torch.int32,))
    check_dtype("context_lens", context_lens, (torch.int32,))
    check(block_tables.dim() == 2 and block_tables.shape[0] == tokens,
          f"block_tables must be [{tokens}, max_blocks], but got {list(block_tables.shape)}")
    check(context_lens.shape == (tokens,), f"context_lens must be [{tokens}], but got {list(context_lens.shape)}")
    capacity = min(max_context_len, block_tables.shape[1] * block_size)
    check(bool((context_lens <= capacity).all()), f"context_lens must be <= {capacity} (max_context_len, table size)")
    if learnable_sink is not None:
        check_dtype("learnable_sink", learnable_sink, (torch.float32,))
        check(learnable_sink.shape == (q_heads,), f"learnable_sink must be [{q_heads}], got {list(learnable_sink.shape)}")

    positions = torch.arange(block_tables.shape[1] * block_size)
    slots = block_tables.long()[:, positions // block_size] * block_size + positions % block_size  # [T, L]
    valid = positions < context_lens[:, None].long()
    slots = torch.where(valid, slots, 0)
    keys = k_cache.permute(0, 2, 1, 3).reshape(-1, kv_heads, head_size)[slots].float()  # [T, L, kv, D]
    keys = keys.repeat_interleave(q_heads // kv_heads, dim=2)  # [T, L, H, D]
    scores = torch.einsum("thd,tlhd->thl", q[:, 0].float(), keys) * softmax_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    if learnable_sink is not None:
        top = torch.maximum(top, learnable_sink.view(1, -1, 1))
    top = torch.where(torch.isinf(top), 0.0, top)
    weights = torch.exp(scores - top)
    denominator = weights.sum(-1, keepdim=True)
    if learnable_sink is not None:
        denominator = denominator + torch.exp(learnable_sink.view(1, -1, 1) - top)
    result = torch.einsum("thl,tlhd->thd", weights, keys[..., :value_size]) / denominator.clamp_min(1e-30)
    out.copy_(result.unsqueeze(1).to(out.dtype))
