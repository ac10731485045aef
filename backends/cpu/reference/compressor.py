"""Reference kernel of the compressor family: the streaming KV compressor (v4_ops.md §7)."""

from __future__ import annotations

import torch

from seahal.hal.formats import compute_dtype
from seahal.hal.ops.compressor import compress_then_store, compressor_width, most_new_entries, new_entries

from .quant import kv_cache_pack
from .rope import rotate_pairs


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``w * x * rsqrt(mean(x^2) + eps)`` over the last dim, in x's dtype."""
    return weight.to(x.dtype) * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _pool_blocks(kv: torch.Tensor, score: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """Gated softmax pooling, per channel, of every block of a token timeline.

    kv, score: [B, n*m (+ tail), coff*d], the timeline starting at a block boundary, score already
    including ape -> [B, n - (coff - 1), d], one entry per block (the caller keeps those whose
    slots are all filled).

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
    positions [B, n] -> out_dtype (bf16 in the official model: each cast is a rounding step)."""
    dtype = pooled.dtype
    normed = _rms_norm(pooled.to(out_dtype).to(dtype), norm_weight, eps).to(out_dtype)
    angles = positions.to(dtype)[..., None] * rope_freqs.to(dtype)
    return rotate_pairs(normed.to(dtype), angles).to(out_dtype)


def _sequence_positions(start_pos: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """start_pos (an int, a 0-d or a [B] tensor) as each sequence's position: [B, 1] int."""
    return torch.as_tensor(start_pos, device=device).reshape(-1, 1).expand(batch, 1)


def _completed(position: torch.Tensor, seq_len: int, ratio: int) -> torch.Tensor:
    """position: [B, 1] -> [B, ceil(S/m)] bool: row k holds an entry the S tokens complete."""
    k = torch.arange(most_new_entries(seq_len, ratio), device=position.device)[None, :]
    return k < new_entries(position, seq_len, ratio)


def _gather_slots(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """source: [B, L, C], index: [B, n] (into [0, L)) -> source[b, index[b, i]]: [B, n, C]."""
    return source.gather(1, index[..., None].expand(-1, -1, source.shape[2]))


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
    start_pos: int | torch.Tensor,
    norm_eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Compress tokens [start_pos, start_pos + S) into the entries their blocks complete.

    kv, score: [B, S, coff*d] fp32/fp64, ape: [m, coff*d], norm_weight: [d], rope_freqs: [r/2],
    kv_state, score_state: [B, coff*m, coff*d] fp32 (updated in place), start_pos: an int, or a
    0-d / [B] integer tensor (per sequence) -> [B, n_new, d] in out_dtype (default bf16); at a
    tensor position [B, ceil(S/m), d], each sequence's n_new entries first, then zero rows.

    Token t gets ``z_t = score_t + ape[t mod m]``. Per sequence, the state's slots followed by the
    new tokens form a timeline that starts at a block boundary: (overlapped) the previous complete
    block, then the incomplete current block (``held = (coff-1)*m + start_pos mod m`` slots in all),
    then the S tokens; empty slots are kv=0, z=-inf. Entry j pools per channel with
    ``softmax_slots(z) . kv`` over block j (plain) or over the a-halves of block j-1 and the
    b-halves of block j (overlapped; an empty block j-1 has weight 0), for each block the tokens
    complete. Each entry is cast to out_dtype, RMS-normed, and rotated at position ``j*m``.
    Afterwards the state holds (overlapped) the last complete block in slots [0, m) and the
    incomplete block's tokens from slot (coff-1)*m on, the rest empty. ``start_pos == 0`` starts
    from a reset state.

    Written for any position per sequence without reading it on the host: the timeline has the
    fixed length ``coff*m + S`` (its slots past ``held + S`` empty) and every block is pooled, the
    incomplete ones masked out.
    """
    dtype = compute_dtype(kv, score)
    batch, seq_len, channels = kv.shape
    coff = compressor_width(ratio, overlap)
    slots = coff * ratio
    d = channels // coff
    device = kv.device

    position = _sequence_positions(start_pos, batch, device)
    held = (coff - 1) * ratio + position % ratio  # state slots in use: kept blocks, then the partial block
    filled = held + seq_len  # timeline slots holding a value
    u = torch.arange(slots + seq_len, device=device)[None, :]  # [1, L] timeline slots
    from_state = ((u < held) & (position > 0))[..., None]  # start_pos 0: a reset state, whatever it holds
    state_slot = u.clamp(max=slots - 1).expand(batch, -1)
    token = torch.where((u >= held) & (u < filled), u - held, seq_len)  # seq_len: the empty row after the tokens

    def timeline(state: torch.Tensor, tokens: torch.Tensor, empty: float) -> torch.Tensor:
        """[B, L, C]: slot u holds the state's slot u, token u - held, or is empty."""
        padded = torch.cat((tokens.to(dtype), tokens.new_full((batch, 1, channels), empty, dtype=dtype)), dim=1)
        return torch.where(from_state, _gather_slots(state.to(dtype), state_slot), _gather_slots(padded, token))

    ape_rows = (torch.arange(seq_len, device=device) + position) % ratio  # [B, S]
    timeline_kv = timeline(kv_state, kv, 0.0)
    timeline_score = timeline(score_state, score.to(dtype) + ape.to(dtype)[ape_rows], float("-inf"))

    rows = most_new_entries(seq_len, ratio)
    pooled = _pool_blocks(timeline_kv, timeline_score, ratio, overlap)[:, :rows]
    k = torch.arange(rows, device=device)[None, :]
    out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
    entries = _finish_entries(pooled, norm_weight, rope_freqs, (position // ratio + k) * ratio, norm_eps, out_dtype)
    completed = _completed(position, seq_len, ratio)[..., None]
    entries = torch.where(completed, entries, torch.zeros((), dtype=out_dtype, device=device))

    # the new state: the last (coff-1) complete blocks and the incomplete block's tokens, moved to the front
    first = (filled // ratio - (coff - 1)) * ratio
    source = first + torch.arange(slots, device=device)[None, :]  # [B, slots]
    kept = (source < filled)[..., None]
    source = source.clamp(max=slots + seq_len - 1)
    kv_state.copy_(torch.where(kept, _gather_slots(timeline_kv, source), 0.0))
    score_state.copy_(torch.where(kept, _gather_slots(timeline_score, source), float("-inf")))
    if isinstance(start_pos, torch.Tensor):
        return entries
    return entries[:, : new_entries(start_pos, seq_len, ratio)].contiguous()  # the int position's rows, dense


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
    start_pos: int | torch.Tensor,
    norm_eps: float = 1e-6,
    rope_dim: int = 64,
    tile: int = 64,
) -> torch.Tensor:
    """``kv_cache_pack(kv_compress(..., out_dtype=bf16), rope_dim, tile)``: the new entries as
    packed FP8 records [B, n_new, kv_record_bytes(d, rope_dim, tile)] uint8 (at a tensor position
    [B, ceil(S/m), ...], zero bytes past each sequence's entries); states as kv_compress."""
    entries = kv_compress(
        kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, ratio, overlap, start_pos, norm_eps,
        torch.bfloat16,
    )
    records = kv_cache_pack(entries, rope_dim, tile)
    if not isinstance(start_pos, torch.Tensor):
        return records
    position = _sequence_positions(start_pos, kv.shape[0], kv.device)
    return torch.where(_completed(position, kv.shape[1], ratio)[..., None], records, 0)  # zero bytes past the entries


kv_compress_store = compress_then_store(kv_compress_fp8)
"""``store[b, slots[b, i]] = kv_compress_fp8(...)[b, i]``: the records scattered into their rows."""
