"""Sparse attention and the lightning indexer on Ascend: ``npu_sparse_flash_attention`` and
``npu_lightning_indexer`` (torch_npu >= 2.9; ``sinks`` since 2.13), with the HAL's [B, S, ...]
tensors marshalled to the vendor's TND (token-major) layouts.

V4's window + compressed attention (CSA/HCA) reaches the HAL as one explicit index list per query
(the model composes window and compressed indices), so one vendor op serves all three layer kinds.
The output's inverse RoPE (``positions``, ``freqs``) follows the vendor attention as the backend's
own ``rope`` (``npu_rotary_mul``) on the chips that have its interleave mode (A2/A3), else as the
portable rope (the 950, whose plan runs ``rope`` on the portable kernel too).
"""

from __future__ import annotations

import torch
import torch_npu

from seahal.backends.cpu.reference.rope import rope as portable_rope

from ._portable import portable
from .chips import family
from .rope import rope

INDEXER_HEAD_DIM = 128
INDEXER_MAX_HEADS = 64
INDEXER_SPARSE_COUNTS = frozenset(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}
"""npu_lightning_indexer's documented limits (TND queries)."""
_INDEXER_BLOCK = 128
"""Page size of the keys handed to npu_lightning_indexer (layout PA_BSND)."""


def _valid_first(indices: torch.Tensor) -> torch.Tensor:
    """Each row's valid (>= 0) indices first, in order, then the -1s (the vendor requires it)."""
    order = (indices < 0).to(torch.uint8).argsort(dim=-1, stable=True)
    return indices.gather(-1, order)


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    positions: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``sparse_attention`` contract on ``torch_npu.npu_sparse_flash_attention``.

    q: [B, S, H, D] bf16, kv: [B, N, D] (K = V), indices: [B, S, K] (-1 empty), sink: [H],
    positions: [B, S] int or None, freqs: [R] fp32 or None -> [B, S, H, D] bf16. Called as
    ``npu_sparse_flash_attention(query [B*S, H, D], key = value [B, N, 1, D], sparse_indices
    [B*S, 1, K] int32, softmax_scale, *, actual_seq_lengths_query = (1..B)*S,
    actual_seq_lengths_kv = N per batch, layout_query="TND", layout_kv="BSND", sparse_mode=0,
    sinks=sink fp32)``: sparse_mode 0 because the indices already say what each query sees.
    With positions, ``o = rope(o, positions, freqs, inverse=True)`` after it (:func:`_rotated_back`).
    """
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise NotImplementedError(f"npu_sparse_flash_attention takes bf16/fp16 queries, got {q.dtype}")
    b, s, h, d = q.shape
    n, k = kv.shape[1], indices.shape[-1]
    if q.numel() == 0 or n == 0 or k == 0:  # the vendor rejects empty inputs; nothing to attend to (0 rotates to 0)
        return torch.zeros_like(q)
    key = kv.to(q.dtype).unsqueeze(2).contiguous()
    device = q.device
    out, _, _ = torch_npu.npu_sparse_flash_attention(
        q.reshape(b * s, h, d).contiguous(),
        key,
        key,
        _valid_first(indices).to(torch.int32).reshape(b * s, 1, k).contiguous(),
        softmax_scale,
        actual_seq_lengths_query=torch.arange(1, b + 1, device=device, dtype=torch.int32) * s,
        actual_seq_lengths_kv=torch.full((b,), n, device=device, dtype=torch.int32),
        layout_query="TND",
        layout_kv="BSND",
        sparse_mode=0,
        sinks=sink.float(),
    )
    o = out.view(b, s, h, d)
    return o if positions is None else _rotated_back(o, positions, freqs)


def _rotated_back(o: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``rope(o, positions, freqs, inverse=True)``: :func:`.rope.rope` on ``npu_rotary_mul`` where the
    chip has its interleave mode (A2/A3, ``chips.py``), else the portable rope (the 950)."""
    chip = family(torch_npu.npu.get_soc_version())
    rotate = rope if chip is not None and chip.rotary_mul_interleave else portable_rope
    return rotate(o, positions, freqs, True)


def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, ratio: int, start_pos: int, topk: int,
    weights_scale: float = 1.0, offset: int = 0,
) -> torch.Tensor:
    """The ``indexer_topk`` contract on ``torch_npu.npu_lightning_indexer``.

    q: [B, S, H, 128] bf16, weights: [B, S, H] bf16/fp32, keys: [B, N, 128] -> [B, S, topk] int32,
    entry j as ``offset + j`` (added to the vendor's picks, its -1s kept).

    Each query token is its own TND "batch" of one query, so its visible count
    ``min(N, floor((start_pos + s + 1) / ratio))`` becomes its ``actual_seq_lengths_key`` and
    sparse_mode 0 (no causal mask) is exact; the keys are paged ([B * pages, 128, 1, 128], layout
    PA_BSND) and every token's block-table row points at its batch's pages. The head weights are
    rounded to q's dtype, which the vendor op requires. ``weights_scale`` multiplies every score of
    a query alike, so only its sign can change the selection: the vendor gets the weights times
    that sign, and bf16 weights (the model's projection) reach it exactly, where scaling them first
    would round them again. Shapes outside the vendor's limits (head dim 128, <= 64 heads, the
    documented top-k counts) run the portable kernel.
    """
    b, s, h, d = q.shape
    n = keys.shape[1]
    if d != INDEXER_HEAD_DIM or h > INDEXER_MAX_HEADS or topk not in INDEXER_SPARSE_COUNTS:
        limits = f"head dim {INDEXER_HEAD_DIM}, <= {INDEXER_MAX_HEADS} heads, top-k 1..2048 or 3072..8192"
        return portable(
            "indexer_topk", f"npu_lightning_indexer's limits: {limits}", q, weights, keys, ratio, start_pos, topk,
            weights_scale, offset,
        )
    if n == 0:
        return torch.full((b, s, topk), -1, dtype=torch.int32, device=q.device)
    device = q.device
    pages = -(-n // _INDEXER_BLOCK)
    paged = torch.zeros(b, pages * _INDEXER_BLOCK, 1, d, dtype=q.dtype, device=device)
    paged[:, :n, 0] = keys.to(q.dtype)
    position = start_pos + torch.arange(s, device=device)
    visible = torch.clamp((position + 1) // ratio, max=n).to(torch.int32).repeat(b)
    batch = torch.arange(b, device=device).repeat_interleave(s)
    block_table = (batch[:, None] * pages + torch.arange(pages, device=device)).to(torch.int32)
    sign = (weights_scale > 0) - (weights_scale < 0)
    indices, _ = torch_npu.npu_lightning_indexer(
        q.reshape(b * s, h, d).contiguous(),
        paged.view(b * pages, _INDEXER_BLOCK, 1, d),
        (weights.to(q.dtype) * sign).reshape(b * s, h).contiguous(),
        actual_seq_lengths_query=torch.arange(1, b * s + 1, device=device, dtype=torch.int32),
        actual_seq_lengths_key=visible,
        block_table=block_table,
        layout_query="TND",
        layout_key="PA_BSND",
        sparse_count=topk,
        sparse_mode=0,
    )
    indices = indices.view(b, s, topk)
    return torch.where(indices >= 0, indices + offset, indices)
