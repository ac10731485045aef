"""Triton KV compressor (op ``kv_compress``; v4_ops.md §7): gated softmax pooling, RMSNorm, RoPE.

One program per (sequence, completed entry). The entry's slots are read straight from where they
live — the carried state for the first ``held`` slots of the timeline, the new tokens after it —
so the token stream is never concatenated. Per channel, an online softmax over the slots (in
chunks of SLOT_BLOCK, one chunk for CSA's 8 slots) pools the values; the d-vector stays in
registers for the norm and the rotation.

The timeline of a call (the reference's picture): the state's ``held = (coff-1)·m + start_pos mod m``
slots (the previous complete block when overlapped, then the incomplete block), then the S tokens;
it starts at a block boundary. Entry k of the call (global index ``j = start_pos // m + k``) pools
timeline slots ``u = k·m + i`` for ``i < coff·m``, slot i reading channels ``[(i // m)·d, +d)``:
the a-halves of block k and the b-halves of block k+1 when overlapped, the d channels of block k
otherwise. Token slots get ``z = score + ape[i mod m]`` (``held ≡ start_pos mod m``). Then, as the
reference: ``x = out(pooled)``, ``y = out(w · x · rsqrt(mean(x²) + eps))``, the last r dims of y
rotated in interleaved pairs by ``fp32(j·m) · f``, cast to out_dtype (RNE, :func:`cast_rne`).

The state update (at most coff·m rows per sequence) is torch slicing after the launch, on the
same stream so the kernel has read the old state first. Numerics differ from the reference only
in fp32 rounding order (online softmax, sum(p·kv)/sum(p) instead of normalised weights, the RMS
sum) and in cos/sin: within the conformance tolerance of ``kv_compress``; the state is bitwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from seahal.hal.ops.compressor import compressor_width

from ._numerics import cast_rne

ELEMENTS_PER_CHUNK = 4096
"""Slot-chunk size in elements (slots x padded d): CSA's 8 x 512 in one chunk, HCA's 128 slots
in 16. Not measured on a GPU yet (TUNING.md)."""


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

    kv, score: [B, S, coff·d] fp32 (any strides), ape: [m, coff·d] fp32, norm_weight: [d] fp32/bf16,
    rope_freqs: [r/2] fp32, kv_state, score_state: [B, coff·m, coff·d] fp32 (updated in place)
    -> [B, new_entries, d] in out_dtype (bf16 or fp32; default bf16). Semantics: the module docstring.
    """
    for name, t in (("kv", kv), ("score", score), ("ape", ape), ("rope_freqs", rope_freqs)):
        if t.dtype != torch.float32:
            raise NotImplementedError(f"cuda.triton kv_compress: {name} must be float32, got {t.dtype} (fp32 math)")
    batch, seq_len, channels = kv.shape
    coff = compressor_width(ratio, overlap)
    d = channels // coff
    if d % 2:
        raise NotImplementedError(f"cuda.triton kv_compress: d must be even (rope pairs), got {d}")
    held = (coff - 1) * ratio + start_pos % ratio
    n_new = (held + seq_len) // ratio - (coff - 1)
    dtype = torch.bfloat16 if out_dtype is None else out_dtype
    out = torch.empty((batch, n_new, d), dtype=dtype, device=kv.device)
    if batch * n_new > 0:
        d_p2 = triton.next_power_of_2(d)
        _kv_compress_kernel[(batch * n_new,)](
            kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, out,
            n_new, held, start_pos // ratio, norm_eps,
            *kv.stride(), *score.stride(), *ape.stride(), norm_weight.stride(0), rope_freqs.stride(0),
            *kv_state.stride(), *score_state.stride(),
            RATIO=ratio, SLOTS=coff * ratio, D=d, D_P2=d_p2, PAIRS=rope_freqs.shape[0],
            SLOT_BLOCK=min(triton.next_power_of_2(coff * ratio), max(1, ELEMENTS_PER_CHUNK // d_p2)),
            CARRIED=start_pos > 0,
        )
    _advance_state(kv, score, ape, kv_state, score_state, ratio, coff, start_pos, held)
    return out


def _advance_state(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, kv_state: torch.Tensor, score_state: torch.Tensor,
    ratio: int, coff: int, start_pos: int, held: int,
) -> None:
    """Keep the timeline's last ``coff - 1`` complete blocks and its incomplete block, then empty
    slots (kv 0, z -inf). Reads only the <= coff·m rows kept; ``start_pos == 0`` holds empty slots."""
    seq_len = kv.shape[1]
    first = ((held + seq_len) // ratio - (coff - 1)) * ratio  # first timeline slot kept
    from_tokens = max(first - held, 0)
    ape_rows = (torch.arange(from_tokens, seq_len, device=kv.device) + start_pos) % ratio
    kept_tokens = (kv[:, from_tokens:], score[:, from_tokens:] + ape[ape_rows])
    for state, tokens, fill in zip((kv_state, score_state), kept_tokens, (0.0, float("-inf")), strict=True):
        batch, slots, channels = state.shape
        if start_pos > 0:
            kept = state[:, first:held]
        else:
            kept = state.new_full((batch, max(held - first, 0), channels), fill)
        empty = state.new_full((batch, slots - kept.shape[1] - tokens.shape[1], channels), fill)
        state.copy_(torch.cat((kept, tokens, empty), dim=1))


@triton.jit
def _kv_compress_kernel(
    kv_ptr, score_ptr, ape_ptr, w_ptr, freq_ptr, kv_state_ptr, score_state_ptr, out_ptr,
    N_NEW, HELD, FIRST_ENTRY, eps,
    stride_kb, stride_ks, stride_kc, stride_zb, stride_zs, stride_zc, stride_am, stride_ac, stride_n, stride_f,
    stride_vb, stride_vs, stride_vc, stride_wb, stride_ws, stride_wc,
    RATIO: tl.constexpr, SLOTS: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, PAIRS: tl.constexpr,
    SLOT_BLOCK: tl.constexpr, CARRIED: tl.constexpr,
):
    """out[b, k] = rope(norm(pool(slots of entry k))); program = (b, k)."""
    pid = tl.program_id(0)
    b = (pid // N_NEW).to(tl.int64)
    k = pid % N_NEW
    c = tl.arange(0, D_P2)
    c_ok = c < D
    run_max = tl.full((D_P2,), float("-inf"), tl.float32)
    run_sum = tl.zeros((D_P2,), tl.float32)
    acc = tl.zeros((D_P2,), tl.float32)
    for s0 in tl.range(0, SLOTS, SLOT_BLOCK):
        i = s0 + tl.arange(0, SLOT_BLOCK)
        u = (k * RATIO + i).to(tl.int64)  # timeline slot (64-bit: t * stride may pass 2^31 at 1M tokens)
        col = (i // RATIO * D)[:, None] + c[None, :]  # a-half (i < m) or b-half channels
        live = (i < SLOTS)[:, None] & c_ok[None, :]
        in_state = live & (u < HELD)[:, None] & CARRIED  # start_pos 0: empty slots, whatever the state holds
        in_tokens = live & (u >= HELD)[:, None]
        t = (u - HELD)[:, None]
        slot = u[:, None]
        kv_v = tl.load(kv_state_ptr + b * stride_vb + slot * stride_vs + col * stride_vc, mask=in_state, other=0.0)
        z_v = tl.load(
            score_state_ptr + b * stride_wb + slot * stride_ws + col * stride_wc, mask=in_state, other=float("-inf")
        )
        kv_t = tl.load(kv_ptr + b * stride_kb + t * stride_ks + col * stride_kc, mask=in_tokens, other=0.0)
        z_t = tl.load(score_ptr + b * stride_zb + t * stride_zs + col * stride_zc, mask=in_tokens, other=0.0)
        z_t += tl.load(ape_ptr + (i % RATIO)[:, None] * stride_am + col * stride_ac, mask=in_tokens, other=0.0)
        values = tl.where(in_tokens, kv_t, kv_v)
        z = tl.where(in_tokens, z_t, z_v)
        # online softmax over slots, per channel; a channel with only empty slots so far keeps 0s
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp(z - shift[None, :])
        scale = tl.exp(run_max - shift)
        run_sum = run_sum * scale + tl.sum(p, axis=0)
        acc = acc * scale + tl.sum(p * values, axis=0)
        run_max = new_max
    out_dtype = out_ptr.dtype.element_ty
    x = cast_rne(acc / tl.where(c_ok, run_sum, 1.0), out_dtype).to(tl.float32)  # padding lanes: 0 / 1
    w = tl.load(w_ptr + c * stride_n, mask=c_ok, other=0.0).to(tl.float32)
    y = cast_rne(w * x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps), out_dtype).to(tl.float32)
    # interleaved RoPE of the last 2·PAIRS dims at position j·m
    a, bb = tl.split(tl.reshape(y, (D_P2 // 2, 2)))
    pair = tl.arange(0, D_P2 // 2) - (D // 2 - PAIRS)  # rope pair index, negative in the nope part
    rotated = (pair >= 0) & (pair < PAIRS)
    freq = tl.load(freq_ptr + pair * stride_f, mask=rotated, other=0.0)
    theta = ((FIRST_ENTRY + k) * RATIO).to(tl.float32) * freq
    cos = tl.cos(theta)
    sin = tl.sin(theta)
    a, bb = tl.where(rotated, a * cos - bb * sin, a), tl.where(rotated, a * sin + bb * cos, bb)
    entry = tl.reshape(tl.join(a, bb), (D_P2,))
    tl.store(out_ptr + pid.to(tl.int64) * D + c, cast_rne(entry, out_dtype), mask=c_ok)
