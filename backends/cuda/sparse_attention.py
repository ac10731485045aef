"""Triton sparse attention (ops ``sparse_attention`` and ``sparse_attention_fp8``): one softmax over
gathered keys, K = V, per-head sinks.

One program per (batch, query, head block, output slice). The program walks the query's index row
BLOCK_N slots at a time, gathers those kv rows once and uses each for all BLOCK_H heads of its
block (the point of V4's single shared K = V vector): the logits ``q_h . kv[idx]`` come from a dot
over D in BLOCK_D chunks (registers stay bounded at D = 512), then an online softmax in fp32
(running max and sum) and ``acc += p @ kv[idx][:, slice]`` for the program's BLOCK_DV output
columns. The sink joins the denominator at the end, ``o = acc / (l + exp(sink - m))``, which is the
reference's ratio with the max taken over the keys only. Programs of the other output slices of
the same heads recompute the logits (the rows come from L2); for D <= BLOCK_DV there is one slice.

Split-K (flash-decoding) when that grid is small against the chip (decode): each query's index row
is cut into SPLITS contiguous chunks of whole BLOCK_N blocks, one program per (query, split, head
block, output slice) runs the same loop over its chunk and writes its running max m_i, sum l_i and
unnormalised accumulator acc_i in fp32 to a workspace, and a second launch merges the splits in
split order: ``M = max_i m_i``, ``L = sum_i l_i e^(m_i - M) + e^(sink - M)``,
``o = sum_i acc_i e^(m_i - M) / L`` (:func:`attention_splits` picks SPLITS).

``kv`` is dense rows (bf16 or fp32, any strides; op ``sparse_attention``) or the FP8 records of
v4_ops.md §12 (``[B, N, 584]`` uint8 for V4; op ``sparse_attention_fp8``, the model's FP8 cache):
the program then decodes each gathered chunk in registers, ``e4m3(code) * 2^(e_t - 127)`` rounded
to bf16 for the nope columns and the bf16 rope bytes as bits, exactly the values
:func:`..kv_unpack.kv_cache_unpack` writes, so only the selected records are read and no decoded
copy of the cache is ever written. Rows are addressed through kv's strides, so one pool of rows
expanded over the batch (batch stride 0) with pool-row indices serves a paged cache
(``seahal.hal.paging``) as it is; nothing here makes kv contiguous.
Verified under the Triton interpreter only; launch choices are untuned (TUNING.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from seahal.hal.ops.quant import kv_record_bytes

from ._numerics import cast_rne
from .kv_unpack import _e4m3_value, _e8m0_scale


@dataclass(frozen=True)
class AttentionConfig:
    """One launch: heads per program, index slots per step, D chunk of the logits, output slice."""

    block_h: int
    block_n: int
    block_d: int
    block_dv: int
    num_warps: int = 4
    num_stages: int = 2


def attention_config(h: int, d: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> AttentionConfig:
    """The launch for H heads of dimension D.

    GPU (untuned, TUNING.md): up to 64 heads per program, so that V4-Flash's 64 heads read each
    gathered row once per output slice; 256-column output slices (a [64, 256] fp32 accumulator is
    64 registers a thread at 8 warps). On CPU (the interpreter) small tiles, so the tests cross
    head blocks, D chunks and output slices.
    """
    if device.type != "cuda":
        return AttentionConfig(16, 16, 32, 64)
    block_h = min(64, max(16, triton.next_power_of_2(h)))
    block_dv = min(256, max(16, triton.next_power_of_2(d)))
    # fp32 rows double the gathered tiles: two stages of them need 238 KB of shared memory at
    # H = 64, D = 512, over sm_90's 227 KB (tests/test_cuda_compile.py), so fp32 takes one.
    stages = 1 if dtype == torch.float32 else 2
    return AttentionConfig(
        block_h, 32, 64, block_dv, num_warps=8 if block_h * block_dv >= 64 * 256 else 4, num_stages=stages
    )


def attention_splits(queries: int, h: int, d: int, k: int, config: AttentionConfig, sm_count: int) -> int:
    """Split-K factor for ``queries`` (B * S) queries of H heads, D dims and K index slots.

    Untuned heuristic (TUNING.md): none while the unsplit grid (queries x head blocks x output
    slices) already holds two programs per SM; otherwise enough splits for two programs per SM,
    at most one per BLOCK_N block of the index row (V4-Flash decode at batch 1 on 132 SMs: 2
    programs, 640 slots in 20 blocks of 32 -> 20 splits). The workspace is SPLITS x H x D fp32 per
    query (2.6 MB there), written once and read once, mostly from L2.
    """
    programs = queries * triton.cdiv(h, config.block_h) * triton.cdiv(d, config.block_dv)
    if programs >= 2 * sm_count:
        return 1
    return max(1, min(triton.cdiv(2 * sm_count, programs), triton.cdiv(k, config.block_n)))


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """One softmax over the keys each query selects, K = V shared, a sink in the denominator.

    q: [B, S, H, D] bf16/fp32, kv: [B, N, D] q's dtype, indices: [B, S, K] int32/int64 (-1 = empty
    slot), sink: [H] fp32 -> o: [B, S, H, D] in q's dtype.

    ``s_j = softmax_scale * q_h . kv[idx_j]`` (a repeated index counts each time), ``m = max_j s_j``,
    ``o_h = sum_j exp(s_j - m) kv[idx_j] / (sum_j exp(s_j - m) + exp(sink_h - m))``; a query with no
    valid slot gets 0. Logits, max and sums in fp32; bf16 inputs round the probabilities to bf16
    for the PV product (as FlashMLA). Indices >= N are not checked (that would cost a host sync)
    and read as empty slots.
    """
    if q.dtype not in (torch.bfloat16, torch.float32):
        raise NotImplementedError(f"cuda.triton sparse_attention takes bf16 or fp32 q and kv, got {q.dtype}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    launch_sparse_attention(q, kv, indices, sink, softmax_scale, out)
    return out


def sparse_attention_fp8(
    q: torch.Tensor,
    records: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    rope_dim: int = 64,
    tile: int = 64,
) -> torch.Tensor:
    """:func:`sparse_attention` over keys stored as packed FP8 records, decoded in registers.

    q: [B, S, H, D] bf16/fp32, records: [B, N, kv_record_bytes(D, rope_dim, tile)] uint8 (584 bytes
    for V4's D = 512, rope 64, tile 64; any strides), indices: [B, S, K] int32/int64 (-1 = empty),
    sink: [H] fp32 -> o: [B, S, H, D] in q's dtype.

    Row j's key is ``kv_cache_unpack(records[:, j], D, rope_dim, tile)`` (bf16; exact in fp32 for
    fp32 q): the output equals ``sparse_attention(q, kv_cache_unpack(records).to(q.dtype), ...)``
    bit for bit under the same launch (the HAL op ``sparse_attention_fp8``).
    """
    if q.dtype not in (torch.bfloat16, torch.float32):
        raise NotImplementedError(f"cuda.triton sparse_attention_fp8 takes bf16 or fp32 q, got {q.dtype}")
    d = q.shape[-1]
    if not (tile > 0 and 0 <= rope_dim < d and rope_dim % 2 == 0 and (d - rope_dim) % tile == 0):
        raise ValueError(
            f"rope_dim={rope_dim}, tile={tile} do not split q's head dim {d}: need an even rope_dim < {d} "
            f"and (D - rope_dim) % tile == 0"
        )
    width = kv_record_bytes(d, rope_dim, tile)
    batch_and_width = (records.shape[0], records.shape[-1]) if records.dim() == 3 else None
    if records.dtype != torch.uint8 or batch_and_width != (q.shape[0], width):
        raise ValueError(
            f"records must be uint8 [B={q.shape[0]}, N, {width}] for head dim {d}, got "
            f"{records.dtype} {list(records.shape)}"
        )
    if records.device != q.device:
        raise ValueError(f"records must be on q's device {q.device}, got {records.device}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    launch_sparse_attention(q, records, indices, sink, softmax_scale, out, rope_dim=rope_dim, tile=tile)
    return out


def launch_sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    out: torch.Tensor,
    config: AttentionConfig | None = None,
    *,
    rope_dim: int = 64,
    tile: int = 64,
    splits: int | None = None,
) -> None:
    """Write :func:`sparse_attention` of the arguments into ``out`` [B, S, H, D] (any strides).

    ``kv`` is dense rows in q's dtype, or uint8 FP8 records of geometry (``rope_dim``, ``tile``)
    (:func:`sparse_attention_fp8`; the geometry is unused for dense rows). ``splits`` forces the
    split-K factor; chunks are whole BLOCK_N blocks, so fewer splits run when K has fewer blocks.
    Default: :func:`attention_splits` on a GPU, 1 on CPU tensors (the interpreter: tests force
    their splits, and launches that differ only in batch size stay bit-identical there). On a GPU
    the split changes the fp32 summation order, so one query's output may differ in the last bits
    between a small (split) and a large (unsplit) batch.
    """
    b, s, h, d = q.shape
    if out.numel() == 0:
        return
    k = indices.shape[-1]
    config = config or attention_config(h, d, q.device, q.dtype)
    if splits is None:
        splits = 1
        if q.device.type == "cuda":
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            splits = attention_splits(b * s, h, d, k, config, sms)
    blocks = max(1, triton.cdiv(k, config.block_n))
    split_slots = triton.cdiv(blocks, max(1, splits)) * config.block_n
    splits = triton.cdiv(blocks * config.block_n, split_slots)  # no empty trailing split
    head_blocks, slices = triton.cdiv(h, config.block_h), triton.cdiv(d, config.block_dv)
    if splits > 1:  # fp32 partials [B*S, SPLITS, H, D] and their (max, sum) [2, B*S, SPLITS, H]
        partial = torch.empty((b * s, splits, h, d), dtype=torch.float32, device=q.device)
        stats = torch.empty((2, b * s, splits, h), dtype=torch.float32, device=q.device)
    else:  # unused by the unsplit kernel
        partial = stats = out
    _sparse_attention_kernel[(b * s * splits, head_blocks, slices)](
        q, kv, indices, sink, out, partial, stats, s, h, kv.shape[1], k, splits, split_slots,
        float(softmax_scale),
        *q.stride(), *kv.stride(), *indices.stride(), sink.stride(0), *out.stride(),
        HEAD_DIM=d, BLOCK_H=config.block_h, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        BLOCK_DV=config.block_dv, LOW_PRECISION_DOT=q.dtype == torch.bfloat16 and q.device.type == "cuda",
        KV_FP8=kv.dtype == torch.uint8, ROPE_DIM=rope_dim, TILE=tile, SPLIT=splits > 1,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        _combine_splits_kernel[(b * s, head_blocks, slices)](
            partial, stats, sink, out, s, h, splits, sink.stride(0), *out.stride(),
            HEAD_DIM=d, BLOCK_H=config.block_h, BLOCK_DV=config.block_dv, num_warps=4,
        )


@triton.jit
def _dot(a, b, acc, LOW_PRECISION_DOT: tl.constexpr):
    """acc + a @ b with fp32 sums. bf16 operands go straight into the MMA (exact products) on the
    GPU; otherwise both are widened to fp32 (the same products: the interpreter's dot misreads
    bf16) and multiplied in IEEE fp32, never TF32."""
    if LOW_PRECISION_DOT:
        return tl.dot(a, b, acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _load_kv(rows, cols, mask, stride_kd, dtype: tl.constexpr, KV_FP8: tl.constexpr, HEAD_DIM: tl.constexpr,
             ROPE_DIM: tl.constexpr, TILE: tl.constexpr):
    """Columns ``cols`` [C] of the gathered rows (pointers [R, 1]) as [R, C] ``dtype``, 0 where masked.

    Dense rows are loaded as they are. An FP8 record ``[e4m3 nope | bf16 rope bytes | e8m0 per
    tile | pad]`` (v4_ops.md §12) is decoded as :func:`..kv_unpack.kv_cache_unpack` does: nope
    column c is ``e4m3(byte c) * 2^(e - 127)`` with e the byte of tile c // TILE, rounded to bf16;
    rope column NOPE + j is the little-endian bf16 at bytes NOPE + 2j, NOPE + 2j + 1, as bits.
    """
    if not KV_FP8:
        return tl.load(rows + cols[None, :] * stride_kd, mask=mask, other=0.0)
    NOPE: tl.constexpr = HEAD_DIM - ROPE_DIM
    nope = cols[None, :] < NOPE
    codes = tl.load(rows + cols[None, :] * stride_kd, mask=mask & nope, other=0).to(tl.int32)
    exponent = tl.load(rows + (NOPE + 2 * ROPE_DIM + cols // TILE)[None, :] * stride_kd, mask=mask & nope, other=127)
    nope_values = cast_rne(_e4m3_value(codes) * _e8m0_scale(exponent.to(tl.int32)), tl.bfloat16)
    rope_bytes = rows + (NOPE + 2 * (cols - NOPE))[None, :] * stride_kd
    low = tl.load(rope_bytes, mask=mask & ~nope, other=0).to(tl.int32)
    high = tl.load(rope_bytes + stride_kd, mask=mask & ~nope, other=0).to(tl.int32)
    rope_values = ((high << 8) | low).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return tl.where(nope, nope_values, rope_values).to(dtype)


@triton.jit
def _sparse_attention_kernel(
    q_ptr, kv_ptr, idx_ptr, sink_ptr, out_ptr, part_ptr, stats_ptr, S, H, N, K, SPLITS, SPLIT_SLOTS, softmax_scale,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_ib, stride_is, stride_ik,
    stride_sink,
    stride_ob, stride_os, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, LOW_PRECISION_DOT: tl.constexpr, KV_FP8: tl.constexpr, ROPE_DIM: tl.constexpr,
    TILE: tl.constexpr, SPLIT: tl.constexpr,
):
    """out[b, s, heads, cols] for one (b, s), BLOCK_H heads and BLOCK_DV output columns; kv rows
    dense, or FP8 records decoded by :func:`_load_kv` (KV_FP8). With SPLIT, program (b, s, split)
    walks index slots [split * SPLIT_SLOTS, (split + 1) * SPLIT_SLOTS) only and writes its fp32
    acc to ``part_ptr`` [B*S, SPLITS, H, D] and its running max and sum to ``stats_ptr`` [2, B*S,
    SPLITS, H] for :func:`_combine_splits_kernel`."""
    pid = tl.program_id(0).to(tl.int64)  # (b * S + s) * SPLITS + split
    pid_bs = pid // SPLITS
    first = (pid % SPLITS) * SPLIT_SLOTS
    end = tl.minimum(K, first + SPLIT_SLOTS)
    bat = pid_bs // S
    seq = pid_bs % S
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols_v = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    head_ok = heads < H
    q_rows = q_ptr + bat * stride_qb + seq * stride_qs + heads[:, None] * stride_qh
    kv_base = kv_ptr + bat * stride_kb
    idx_row = idx_ptr + bat * stride_ib + seq * stride_is

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)  # running max of the logits
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)  # running sum of exp(s - m_i)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    for start in range(first, end, BLOCK_N):
        slots = start + offs_n
        idx = tl.load(idx_row + slots * stride_ik, mask=slots < end, other=-1).to(tl.int64)
        valid = (idx >= 0) & (idx < N)
        rows = kv_base + idx[:, None] * stride_kn
        logits = tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32)
        for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
            cols = d0 + offs_d
            in_d = cols[None, :] < HEAD_DIM
            q = tl.load(q_rows + cols[None, :] * stride_qd, mask=head_ok[:, None] & in_d, other=0.0)
            k_mask = valid[:, None] & in_d
            k = _load_kv(rows, cols, k_mask, stride_kd, q_ptr.dtype.element_ty, KV_FP8, HEAD_DIM, ROPE_DIM, TILE)
            logits = _dot(q, tl.trans(k), logits, LOW_PRECISION_DOT)
        logits = tl.where(valid[None, :], logits * softmax_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: nothing to shift
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(logits - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_mask = valid[:, None] & (cols_v[None, :] < HEAD_DIM)
        v = _load_kv(rows, cols_v, v_mask, stride_kd, q_ptr.dtype.element_ty, KV_FP8, HEAD_DIM, ROPE_DIM, TILE)
        acc = _dot(cast_rne(p, v.dtype), v, acc * alpha[:, None], LOW_PRECISION_DOT)
        m_i = m_new

    out_mask = head_ok[:, None] & (cols_v[None, :] < HEAD_DIM)
    if SPLIT:
        tl.store(part_ptr + (pid * H + heads[:, None]) * HEAD_DIM + cols_v[None, :], acc, mask=out_mask)
        if tl.program_id(2) == 0:  # one output slice writes the (equal) statistics
            tl.store(stats_ptr + pid * H + heads, m_i, mask=head_ok)
            tl.store(stats_ptr + (tl.num_programs(0).to(tl.int64) + pid) * H + heads, l_i, mask=head_ok)
    else:
        out = out_ptr + bat * stride_ob + seq * stride_os + heads[:, None] * stride_oh + cols_v[None, :] * stride_od
        _normalise_and_store(acc, m_i, l_i, sink_ptr, stride_sink, heads, head_ok, out, out_mask)


@triton.jit
def _normalise_and_store(acc, m_i, l_i, sink_ptr, stride_sink, heads, head_ok, out, out_mask):
    """Store ``acc / (l + exp(sink - m))`` (0 where that denominator is 0: no key and a -inf sink)
    through the pointers ``out``; m is the max over the keys only (-inf without any)."""
    sink = tl.load(sink_ptr + heads * stride_sink, mask=head_ok, other=float("-inf")).to(tl.float32)
    denominator = l_i + tl.exp(sink - tl.where(m_i == float("-inf"), 0.0, m_i))
    o = tl.where(denominator[:, None] > 0, acc / tl.where(denominator > 0, denominator, 1.0)[:, None], 0.0)
    tl.store(out, cast_rne(o, out.dtype.element_ty), mask=out_mask)


@triton.jit
def _combine_splits_kernel(
    part_ptr, stats_ptr, sink_ptr, out_ptr, S, H, SPLITS, stride_sink,
    stride_ob, stride_os, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out[b, s, heads, cols] from the SPLITS partials of :func:`_sparse_attention_kernel`, merged
    in split order: ``M = max_i m_i``, ``acc = sum_i acc_i e^(m_i - M)``, ``l = sum_i l_i e^(m_i - M)``,
    then normalised with the sink as the unsplit kernel does."""
    pid_bs = tl.program_id(0)
    bat = (pid_bs // S).to(tl.int64)
    seq = (pid_bs % S).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols_v = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    head_ok = heads < H
    out_mask = head_ok[:, None] & (cols_v[None, :] < HEAD_DIM)
    first = pid_bs.to(tl.int64) * SPLITS  # this query's first split row in the workspace
    sum_rows = tl.num_programs(0).to(tl.int64) * SPLITS  # the running sums follow the maxima

    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    for i in range(SPLITS):
        m = tl.maximum(m, tl.load(stats_ptr + (first + i) * H + heads, mask=head_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # no valid key in any split: every weight is 0
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    for i in range(SPLITS):
        m_i = tl.load(stats_ptr + (first + i) * H + heads, mask=head_ok, other=float("-inf"))
        weight = tl.exp(m_i - m_safe)
        l += tl.load(stats_ptr + (sum_rows + first + i) * H + heads, mask=head_ok, other=0.0) * weight
        part = part_ptr + ((first + i) * H + heads[:, None]) * HEAD_DIM + cols_v[None, :]
        acc += tl.load(part, mask=out_mask, other=0.0) * weight[:, None]
    out = out_ptr + bat * stride_ob + seq * stride_os + heads[:, None] * stride_oh + cols_v[None, :] * stride_od
    _normalise_and_store(acc, m, l, sink_ptr, stride_sink, heads, head_ok, out, out_mask)
