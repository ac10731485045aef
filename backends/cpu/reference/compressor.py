"""Reference kernel of the compressor family: the streaming KV compressor (v4_ops.md §7)."""

from __future__ import annotations

import torch

from seahal.hal.formats import compute_dtype
from seahal.hal.ops.compressor import compressor_state, compressor_width

from .quant import kv_cache_pack
from .rope import rotate_pairs


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``w * x * rsqrt(mean(x^2) + eps)`` over the last dim, in x's dtype."""
    return weight.to(x.dtype) * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _pool_blocks(kv: torch.Tensor, score: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """Gated softmax pooling, per channel, of every complete block of a token timeline.

    kv, score: [B, n*m (+ tail), coff*d], the timeline starting at a block boundary, score already
    including ape -> [B, n - (coff - 1), d], one entry per block that has all its slots.

    Plain: entry k pools the m tokens of block k. Overlapped: entry k (for timeline block k+1)
    pools the a-halves (channels [0, d)) of block k and the b-halves (channels [d, 2d)) of block
    k+1: 2m slots per channel.
    """
    batch, length, channels = kv.shape
    n = length // ratio
    kv_blocks = kv[:, : n * ratio].reshape(batch, n, ratio, channels)
    score_blocks = score[:, : n * ratio].reshape(batch, n, ratio, channels)
    if overlap:
        d = channels // 2
        kv_blocks = torch.cat((kv_blocks[:, :-1, :, :d], kv_blocks[:, 1:, :, d:]), dim=2)
        score_blocks = torch.cat((score_blocks[:, :-1, :, :d], score_blocks[:, 1:, :, d:]), dim=2)
    weights = torch.softmax(score_blocks, dim=2)
    return (weights * kv_blocks).sum(dim=2)


def _finish_entries(
    pooled: torch.Tensor,
    norm_weight: torch.Tensor,
    rope_freqs: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """pooled: [B, n, d] fp32/fp64 -> out_dtype -> RMSNorm -> out_dtype -> RoPE of the last dims at
    positions -> out_dtype (bf16 in the official model: each cast is a rounding step)."""
    dtype = pooled.dtype
    normed = _rms_norm(pooled.to(out_dtype).to(dtype), norm_weight, eps).to(out_dtype)
    angles = positions.to(dtype)[:, None] * rope_freqs.to(dtype)
    return rotate_pairs(normed.to(dtype), angles).to(out_dtype)


def _next_state(timeline: torch.Tensor, ratio: int, kept_blocks: int, fill: float) -> torch.Tensor:
    """The state after a timeline: its last ``kept_blocks`` complete blocks, then the tokens of its
    incomplete block, then ``fill`` up to ``(kept_blocks + 1) * ratio`` slots.

    timeline: [B, L, C] -> [B, (kept_blocks + 1) * ratio, C] fp32.
    """
    batch, length, channels = timeline.shape
    kept = timeline[:, (length // ratio - kept_blocks) * ratio :]
    state = timeline.new_full((batch, (kept_blocks + 1) * ratio, channels), fill, dtype=torch.float32)
    state[:, : kept.shape[1]] = kept
    return state


def kv_compress(
    kv: torch.Tensor,
    score: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    rope_freqs: torch.Tensor,
    kv_state: torch.Tensor,
    score_state: torch.Tensor,
    ratio: int,
    overlap: bool,
    start_pos: int,
    norm_eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Compress tokens [start_pos, start_pos + S) into the entries their blocks complete.

    kv, score: [B, S, coff*d] fp32/fp64, ape: [m, coff*d], norm_weight: [d], rope_freqs: [r/2],
    kv_state, score_state: [B, coff*m, coff*d] fp32 (updated in place) -> [B, n_new, d] in out_dtype
    (default bf16).

    Token t gets ``z_t = score_t + ape[t mod m]``. The state's slots, followed by the new tokens,
    form a timeline that starts at a block boundary: (overlapped) the previous complete block, then
    the incomplete current block, then the S tokens. Entry j pools per channel with
    ``softmax_slots(z) . kv`` over block j (plain) or over the a-halves of block j-1 and the b-halves
    of block j (overlapped; an empty block j-1 is kv=0, z=-inf, weight 0). Each entry is cast to
    out_dtype, RMS-normed, and rotated at position ``j*m``. Afterwards the state holds (overlapped) the
    last complete block in slots [0, m) and the incomplete block's tokens from slot (coff-1)*m on;
    unused slots are kv=0, z=-inf. ``start_pos == 0`` starts from a reset state.
    """
    dtype = compute_dtype(kv, score)
    batch, seq_len, channels = kv.shape
    coff = compressor_width(ratio, overlap)
    d = channels // coff
    kept_blocks = coff - 1  # complete blocks the state carries: the previous one when overlapped

    if start_pos == 0:
        kv_state_in, score_state_in = compressor_state(batch, ratio, d, overlap, device=kv.device)
    else:
        kv_state_in, score_state_in = kv_state, score_state
    held = kept_blocks * ratio + start_pos % ratio  # slots in use: kept blocks, then the partial block
    ape_rows = (torch.arange(seq_len, device=kv.device) + start_pos) % ratio
    timeline_kv = torch.cat((kv_state_in[:, :held].to(dtype), kv.to(dtype)), dim=1)
    timeline_score = torch.cat((score_state_in[:, :held].to(dtype), score.to(dtype) + ape.to(dtype)[ape_rows]), dim=1)

    pooled = _pool_blocks(timeline_kv, timeline_score, ratio, overlap)
    first_entry = start_pos // ratio
    entry_positions = torch.arange(first_entry, first_entry + pooled.shape[1], device=kv.device) * ratio
    out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
    entries = _finish_entries(pooled, norm_weight, rope_freqs, entry_positions, norm_eps, out_dtype)

    kv_state.copy_(_next_state(timeline_kv, ratio, kept_blocks, fill=0.0))
    score_state.copy_(_next_state(timeline_score, ratio, kept_blocks, fill=float("-inf")))
    return entries


def kv_compress_fp8(
    kv: torch.Tensor,
    score: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    rope_freqs: torch.Tensor,
    kv_state: torch.Tensor,
    score_state: torch.Tensor,
    ratio: int,
    overlap: bool,
    start_pos: int,
    norm_eps: float = 1e-6,
    rope_dim: int = 64,
    tile: int = 64,
) -> torch.Tensor:
    """``kv_cache_pack(kv_compress(..., out_dtype=bf16), rope_dim, tile)``: the new entries as
    packed FP8 records [B, n_new, kv_record_bytes(d, rope_dim, tile)] uint8; states as kv_compress."""
    entries = kv_compress(
        kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, ratio, overlap, start_pos, norm_eps,
        torch.bfloat16,
    )
    return kv_cache_pack(entries, rope_dim, tile)
