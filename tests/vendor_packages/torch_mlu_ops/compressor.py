"""``fused_compress_multi_kv``: the prefill half of DeepSeek-V4's KV compressor.

kv, score [sum S_b, coff*d] (float or bfloat16; coff = 2 when ``overlap``), packed sequences
delimited by ``cu_seqlens`` [B+1] int32, each starting at position 0; ``batch_ids`` [B] int32: the
state row of each sequence; ``ape`` [R, coff*d] float32 (R = compression ratio, read from ape);
kv_state, score_state [max_B, coff*R, coff*d] float32, updated in place; ``compressed_kv``
[sum floor(S_b / R), d] receives each sequence's pooled entries in order (before any norm/RoPE).

Per channel, entry j is a softmax over its slots of ``score + ape[t mod R]`` weighting ``kv``: the
R tokens of block j, or, overlapped, the first-half channels of block j-1 (none for j = 0) and the
second-half channels of block j. Afterwards the state holds, overlapped, the last complete block in
rows [0, R) and the incomplete block's tokens from row (coff-1)*R on; empty rows kv 0, score -inf.
"""

from __future__ import annotations

import itertools

import torch

from ._emulation import check, check_dtype, recorded


def _pool(kv: torch.Tensor, score: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """One sequence: kv, score [L, coff*d] fp32 (L a multiple of R) -> entries [L/R, d]."""
    blocks = kv.shape[0] // ratio
    d = kv.shape[1] // (2 if overlap else 1)
    if blocks == 0:
        return kv.new_zeros(0, d)
    kv_b, score_b = kv.view(blocks, ratio, -1), score.view(blocks, ratio, -1)
    if overlap:
        empty_kv = kv_b.new_zeros(1, ratio, d)
        empty_score = score_b.new_full((1, ratio, d), float("-inf"))
        prev_kv = torch.cat((empty_kv, kv_b[:-1, :, :d]))
        prev_score = torch.cat((empty_score, score_b[:-1, :, :d]))
        kv_b = torch.cat((prev_kv, kv_b[:, :, d:]), dim=1)
        score_b = torch.cat((prev_score, score_b[:, :, d:]), dim=1)
    return (score_b.softmax(dim=1) * kv_b).sum(dim=1)


@recorded
def fused_compress_multi_kv(kv, score, kv_state, score_state, cu_seqlens, batch_ids, ape, max_seqlen, overlap,
                            compressed_kv):
    coff = 2 if overlap else 1
    check(kv.dim() == 2 and score.shape == kv.shape, f"kv and score must be [tokens, D], got {list(kv.shape)}, {list(score.shape)}")
    check_dtype("kv", kv, (torch.float32, torch.bfloat16))
    check(score.dtype == kv.dtype, f"score dtype must equal kv dtype {kv.dtype}")
    for name, t in (("kv_state", kv_state), ("score_state", score_state), ("ape", ape)):
        check_dtype(name, t, (torch.float32,))
    check_dtype("cu_seqlens", cu_seqlens, (torch.int32,))
    check_dtype("batch_ids", batch_ids, (torch.int32,))
    ratio, width = ape.shape
    check(width == kv.shape[1] and kv.shape[1] % coff == 0, f"ape must be [R, {kv.shape[1]}], got {list(ape.shape)}")
    d = width // coff
    check(kv_state.shape[1:] == (coff * ratio, width) and score_state.shape == kv_state.shape,
          f"states must be [max_B, {coff * ratio}, {width}], got {list(kv_state.shape)}, {list(score_state.shape)}")
    check(cu_seqlens.shape == (batch_ids.numel() + 1,), "cu_seqlens must be [B+1] for batch_ids [B]")
    bounds = cu_seqlens.tolist()
    check(bounds[0] == 0 and bounds[-1] == kv.shape[0], "cu_seqlens must run from 0 to the token count")
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    check(max(lengths, default=0) <= max_seqlen, f"a sequence is longer than max_seqlen={max_seqlen}")
    total = sum(n // ratio for n in lengths)
    check(compressed_kv.shape == (total, d) and compressed_kv.dtype == kv.dtype,
          f"compressed_kv must be [{total}, {d}] {kv.dtype}, but got {list(compressed_kv.shape)} {compressed_kv.dtype}")
    row = 0
    for seq, (start, length) in enumerate(zip(bounds, lengths)):
        seq_kv = kv[start:start + length].float()
        seq_score = score[start:start + length].float() + ape[torch.arange(length) % ratio]
        complete = length // ratio * ratio
        compressed_kv[row:row + length // ratio] = _pool(seq_kv[:complete], seq_score[:complete], ratio, overlap).to(kv.dtype)
        row += length // ratio
        state = int(batch_ids[seq])
        kv_state[state], score_state[state] = 0.0, float("-inf")
        tail = length - complete
        if overlap and complete:
            kv_state[state, :ratio] = seq_kv[complete - ratio:complete]
            score_state[state, :ratio] = seq_score[complete - ratio:complete]
        kv_state[state, (coff - 1) * ratio:(coff - 1) * ratio + tail] = seq_kv[complete:]
        score_state[state, (coff - 1) * ratio:(coff - 1) * ratio + tail] = seq_score[complete:]
