"""sparse_attention on tmo: paged decode attention over a per-query block table, with the sink.

Cambricon runs DeepSeek's sparse attention as ``tmo.single_query_cached_kv_attn`` with block
size 1 (vllm-mlu's DeepSeek-V4): every query token becomes one "sequence" of length 1 whose block
table lists the cache slots it attends to, K = V (``v_cache=None``, MLA-style shared latent), and
``learnable_sink`` adds the per-head sink to the softmax denominator. Marshalling:

- kv ``[B, N, D]`` -> ``k_cache [B*N, 1 kv head, 1 slot, D]``; q ``[B, S, H, D]`` ->
  ``[B*S, 1, H, D]``;
- indices ``[B, S, K]`` (-1 = empty, anywhere) -> int32 block table ``[B*S, K]`` of global slots
  ``b*N + idx`` with the valid ones first (a stable sort keeps their order) and
  ``context_lens = #valid``: tmo reads the first ``context_lens`` entries only;
- tmo limits ``seq_q * heads_per_kv_head`` to 128 (256 for a bf16 cache) on unquantised caches,
  so the heads go in chunks of that size, as vllm-mlu does;
- a query with no valid index gets 0 (the contract), whatever the vendor op leaves there;
- with ``positions`` and ``freqs`` the output then takes its query's inverse RoPE: the backend's
  own ``rope`` (``apply_rotary``) where the fp32 rotary probe passed, else the portable rope (the
  plan runs ``rope`` on the portable kernel too then).
"""

from __future__ import annotations

import torch

from seahal.backends.cpu.reference.rope import rope as portable_rope

from . import probe, tmo
from .rope import rope
from .route import portable

HEAD_LIMIT = {torch.bfloat16: 256}
"""``seq_q * q_heads_per_kv_head`` tmo accepts per call on an unquantised cache (else 128)."""
DEFAULT_HEAD_LIMIT = 128


def _block_table(indices: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [B, S, K] (-1 = empty) -> (table [B*S, K] int32 with valid global slots first,
    context_lens [B*S] int32)."""
    batch, seq, k = indices.shape
    valid = indices >= 0
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    offsets = torch.arange(batch, device=indices.device).view(batch, 1, 1) * n_slots
    slots = torch.where(valid, indices.long() + offsets, 0).gather(-1, order)
    return slots.reshape(batch * seq, k).to(torch.int32), valid.sum(-1).reshape(-1).to(torch.int32)


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    positions: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
) -> torch.Tensor:
    """One softmax over each query's selected keys, K = V, sink in the denominator, then with
    positions the output's inverse RoPE ``rope(o, positions, freqs, inverse=True)``
    (contract: ``hal.ops.attention.sparse_attention``).

    q: [B, S, H, D], kv: [B, N, D], indices: [B, S, K] int, sink: [H] fp32, positions: [B, S] int or
    None, freqs: [R] fp32 or None -> [B, S, H, D] in q's dtype.
    """
    why = tmo.lacks("single_query_cached_kv_attn", "learnable_sink")
    if q.dtype == torch.float64:
        why = "float64 attention (tmo computes in fp32 at most)"
    if why is not None:
        return portable("sparse_attention", why)(q, kv, indices, sink, softmax_scale, positions, freqs)
    batch, seq, heads, dim = q.shape
    n_slots = kv.shape[1]
    table, context_lens = _block_table(indices, n_slots)
    k_cache = kv.reshape(batch * n_slots, 1, 1, dim).contiguous()
    queries = q.reshape(batch * seq, 1, heads, dim)
    out = torch.empty_like(queries, memory_format=torch.contiguous_format)
    chunk = HEAD_LIMIT.get(kv.dtype, DEFAULT_HEAD_LIMIT)
    for start in range(0, heads, chunk):
        heads_here = slice(start, min(start + chunk, heads))
        result = torch.empty_like(out[:, :, heads_here])
        tmo.call(
            "single_query_cached_kv_attn",
            q=queries[:, :, heads_here].contiguous(),
            k_cache=k_cache,
            v_cache=None,
            out=result,
            block_tables=table,
            context_lens=context_lens,
            k_cache_quant_scale=None,
            v_cache_quant_scale=None,
            alibi_slopes=None,
            max_context_len=indices.shape[-1],
            window_size_left=-1,
            window_size_right=-1,
            softmax_scale=softmax_scale,
            head_size_v=dim,
            compute_dtype=torch.float32,
            learnable_sink=sink[heads_here].float().contiguous(),
        )
        out[:, :, heads_here] = result
    out = torch.where((context_lens > 0).view(-1, 1, 1, 1), out, 0).reshape(batch, seq, heads, dim)
    return out if positions is None else _rotated_back(out, positions, freqs)


def _rotated_back(o: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``rope(o, positions, freqs, inverse=True)``: :func:`.rope.rope` on ``apply_rotary`` where it
    rotates fp32 on this MLU (:func:`.probe.fp32_rotary_works`), else the portable rope."""
    rotate = rope if probe.fp32_rotary_works() is None else portable_rope
    return rotate(o, positions, freqs, True)
