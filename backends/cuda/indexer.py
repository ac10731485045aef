"""Triton lightning indexer (ops ``indexer_topk``, ``indexer_topk_packed``): ReLU-weighted
multi-head scores, exact causal top-k.

Two kernels, one job each (v4_ops.md §8).

``_scores_kernel`` -- one program per (batch, block of BLOCK_S queries, split of the compressed
entries). It loads its queries' q rows once, every head stacked on the M side of one matrix
[BLOCK_S * H_PAD, d] (decode with V4's 64 heads: an M = 64 MMA), then walks its split BLOCK_N
entries at a time: each key tile is loaded once and serves all heads in one dot; ``relu``, times
the head weights, summed over each query's heads gives fp32 scores [BLOCK_S, BLOCK_N]. Packed keys
(``indexer_topk_packed``, v4_ops.md §12: 68-byte FP4 or 132-byte FP8 records at d = 128) are
decoded in registers as each tile is loaded (a constexpr KEY_FORMAT), to exactly the values
``index_key_unpack`` gives in q's dtype; the dot and everything after are the dense path's, so
packed keys rank bit for bit as the dense kernel ranks their unpacked values. A score is
stored as one int64 ranking key, ``(order-preserving bits of the score) << 32 | (2^31 - 1 - j)``
(moe_gate's ``_packed_key``): a larger key is a higher score or, at an equal score, the smaller
entry j. Entries a query does not see (``j >= floor((t+1)/m)``) get INT64_MIN, and tiles past the
block's last visible entry skip the dot.

``_select_kernel`` -- exact top-k of those keys by split and merge. One program per (query row,
CHUNK keys of it) sorts its chunk (``tl.sort``, bitonic) and keeps the first k. The key order is
total, so a row's top k lie in the union of its chunks' top k: a round shrinks a row of L keys to
ceil(L / CHUNK) * k candidates (CHUNK >= 2k, so at least halving) until one chunk holds the row;
that last round decodes the entry indices, INT64_MIN -> -1. Decode at a 1M-token context (N = 256k
entries, k = 1024, CHUNK = 4096): 64 chunk programs, then 16, 4, 1.

The ranking keys take 8 bytes per (query, visible entry) of workspace next to the key rows' 256
(bf16, d = 128; 68 or 132 packed); prefill processes the queries in passes that bound that
workspace. bf16 or fp32 q and keys; fp32 math throughout (q . k, relu, weights, head sum).

The position as data (CUDA-graph decode): ``start_pos`` may be an int32/int64 tensor on q's device,
0-d (every sequence) or [B] (query s of sequence b at ``start_pos[b] + s``), loaded by
``_scores_kernel`` (POS_FROM_PTR, at ``pos_ptr + b * stride``, stride 0 for a 0-d tensor) and never
read on the host, so one captured launch serves every position. The host then cannot bound the
visible entries: the scores grid, the ranking rows, the query passes and the top-k rounds are
sized by all N rows of the key store, and the kernel masks the entries a query does not see
(INT64_MIN, tiles past the last visible one skip the dot but still store their masked keys).
Each sequence's indices equal the int path's at its position; the cost is the ranking of N keys
a query instead of the visible ones (a store sized to the context pays little).
Verified under the Triton interpreter only; launch choices are untuned (TUNING.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._numerics import cast_rne
from ._position import load_position, position_stride
from ._e2m1 import decode_e2m1
from .kv_unpack import _e4m3_value, _e8m0_scale
from .moe_gate import _packed_key
from .sparse_attention import _dot

MAX_ENTRIES = 2**31
"""Entry indices are packed as ``MAX_ENTRIES - 1 - j`` in the low 32 bits of a ranking key (a
kernel argument: the interpreter cannot hand a global constexpr on to a called jit function)."""
NOT_VISIBLE = tl.constexpr(-(2**63))
"""The ranking key of an entry the query does not see: below every packed score."""
WORKSPACE_BYTES = 256 * 2**20
"""Ranking keys held at once (queries per pass * visible entries * 8 bytes)."""


@dataclass(frozen=True)
class IndexerConfig:
    """One launch: queries per scores program, entries per key tile and per split, sort chunk."""

    block_s: int
    block_n: int
    split_len: int
    chunk: int
    num_warps: int = 4


def indexer_config(s: int, h: int, n_entries: int, topk: int, rows: int, device: torch.device) -> IndexerConfig:
    """The launch for S queries of H heads over n_entries visible entries, top-k, ``rows`` = B * S.

    GPU (untuned, TUNING.md): heads times queries fill an M of 64 (decode) or 128 (prefill) and
    at least 16 (the MMA's minimum); 64-entry key tiles; splits until the scores grid holds about
    two programs per SM; 4096-key sort chunks. On CPU (the interpreter) small blocks, so the tests
    cross query blocks, splits and several merge rounds.
    """
    h_pad = triton.next_power_of_2(h)
    if device.type != "cuda":
        return IndexerConfig(2, 16, 32, max(16, 2 * triton.next_power_of_2(topk)))
    block_s = min(triton.next_power_of_2(s), max(1, (64 if s == 1 else 128) // h_pad))
    block_s = max(block_s, triton.cdiv(16, h_pad))
    block_n = 64
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_programs = (rows // s) * triton.cdiv(s, block_s)
    tiles = triton.cdiv(n_entries, block_n)
    splits = max(1, min(tiles, triton.cdiv(2 * sms, row_programs)))
    split_len = triton.cdiv(tiles, splits) * block_n
    chunk = max(4096, 2 * triton.next_power_of_2(topk))
    return IndexerConfig(block_s, block_n, split_len, chunk, num_warps=8 if block_s * h_pad >= 128 else 4)


def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, ratio: int, start_pos: int | torch.Tensor, topk: int
) -> torch.Tensor:
    """Select, for every query token, the top-k visible compressed entries by indexer score.

    q: [B, S, H, d] bf16/fp32, weights: [B, S, H] fp32, keys: [B, N, d] bf16/fp32
    -> indices: [B, S, topk] int32, -1 in slots beyond the visible entries.

    ``I(t, j) = sum_h weights[h] * relu(q_h . K_j)`` in fp32 for query ``t = start_pos + s`` and
    the entries it sees, ``j < min(N, floor((t+1)/m))``; indices ordered by score descending,
    ties to the smaller index. start_pos: an int, or an int32/int64 tensor on q's device that only
    the kernel reads, 0-d or [B] (sequence b's queries at ``start_pos[b] + s``; module docstring:
    the position as data).
    """
    _check_float("indexer_topk", "keys", keys)
    return _indexer(q, weights, keys, "dense", ratio, start_pos, topk)


def indexer_topk_packed(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, key_format: str, ratio: int,
    start_pos: int | torch.Tensor, topk: int,
) -> torch.Tensor:
    """:func:`indexer_topk` over packed keys [B, N, index_key_bytes(d, key_format)] uint8, decoded
    in registers to q's dtype: ``"fp4"`` e2m1 codes times one e8m0 scale per 32 elements, ``"fp8"``
    e4m3 codes times the key's fp32 scale (``seahal.hal.formats.index_key_unpack``)."""
    return _indexer(q, weights, keys, key_format, ratio, start_pos, topk)


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.bfloat16, torch.float32):
        raise NotImplementedError(f"cuda.triton {op} takes bf16 or fp32 {name}, got {t.dtype}")


def _indexer(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, key_format: str, ratio: int,
    start_pos: int | torch.Tensor, topk: int,
) -> torch.Tensor:
    """Both ops: scores and top-k in passes of queries; ``key_format`` "dense", "fp4" or "fp8"."""
    _check_float("indexer_topk" if key_format == "dense" else "indexer_topk_packed", "q", q)
    b, s, _, _ = q.shape
    out = torch.full((b, s, topk), -1, dtype=torch.int32, device=q.device)

    def entries_seen(queries: int) -> int:
        """Ranking keys a row of the first ``queries`` queries needs: the visible entries of the last
        one, or at a position in memory all N (the kernel masks those a query does not see)."""
        if isinstance(start_pos, torch.Tensor):
            return keys.shape[1]
        return min(keys.shape[1], (start_pos + queries) // ratio)

    per_pass = max(1, WORKSPACE_BYTES // (8 * b * max(entries_seen(s), 1)))
    for first in range(0, s, per_pass):
        last = min(s, first + per_pass)
        n_entries = entries_seen(last)
        if n_entries == 0:
            continue  # nothing visible yet: the slots stay -1
        config = indexer_config(last - first, q.shape[2], n_entries, topk, b * (last - first), q.device)
        ranking = ranking_keys(
            q[:, first:last], weights[:, first:last], keys, ratio, start_pos, n_entries, config, key_format, first
        )
        select_topk(ranking, topk, out[:, first:last], config.chunk)
    return out


def ranking_keys(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    ratio: int,
    start_pos: int | torch.Tensor,
    n_entries: int,
    config: IndexerConfig,
    key_format: str = "dense",
    offset: int = 0,
) -> torch.Tensor:
    """Packed ranking keys [B * S, n_entries] int64 of the first n_entries entries (rows b * S + s).

    Key = order-preserving fp32 score bits << 32 | (2^31 - 1 - j), INT64_MIN where query s, at
    position ``start_pos + offset + s``, does not see entry j. start_pos: an int, or an int32/int64
    tensor on q's device, 0-d or [B] (one a sequence), loaded by the kernel. ``key_format``: keys
    [B, N, d] floats (``"dense"``) or packed records (``"fp4"``, ``"fp8"``) decoded to q's dtype.
    """
    b, s, h, d = q.shape
    key_dtype = keys.dtype if key_format == "dense" else q.dtype  # packed keys decode to q's dtype
    ranking = torch.empty((b * s, n_entries), dtype=torch.int64, device=q.device)
    grid = (b * triton.cdiv(s, config.block_s), triton.cdiv(n_entries, config.split_len))
    if isinstance(start_pos, torch.Tensor):
        op = "indexer_topk" if key_format == "dense" else "indexer_topk_packed"
        pos_ptr, pos_stride, position = start_pos, position_stride(op, start_pos, b, q.device), offset
    else:
        pos_ptr, pos_stride, position = None, None, start_pos + offset
    _scores_kernel[grid](
        q, weights, keys, ranking, s, h, n_entries, pos_ptr, pos_stride, position, ratio, config.split_len,
        *q.stride(), *weights.stride(), keys.stride(0), keys.stride(1), keys.stride(2),
        HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)), H_PAD=triton.next_power_of_2(h),
        BLOCK_S=config.block_s, BLOCK_N=config.block_n, KEY_FORMAT=key_format,
        LOW_PRECISION_DOT=q.dtype == key_dtype == torch.bfloat16 and q.device.type == "cuda",
        POS_FROM_PTR=pos_ptr is not None, MAX_ENTRIES=MAX_ENTRIES, num_warps=config.num_warps,
    )
    return ranking


def select_topk(ranking: torch.Tensor, topk: int, out: torch.Tensor, chunk: int) -> None:
    """Write the entries of each row's ``topk`` largest ranking keys, in key order (-1 for
    INT64_MIN and past the row), into ``out`` [B, S, topk] int32 (row b * S + s of ``ranking``).

    Rounds of per-chunk top-k until a row fits one chunk; chunk: a power of two >= 2 * topk.
    """
    if chunk < 2 * topk or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 2 * topk = {2 * topk}, got {chunk}")
    rows, length = ranking.shape
    while length > chunk:
        n_chunks = triton.cdiv(length, chunk)
        candidates = torch.empty((rows, n_chunks * topk), dtype=torch.int64, device=ranking.device)
        _select_kernel[(rows, n_chunks)](
            ranking, candidates, length, topk, ranking.stride(0), candidates.stride(0), 1, 0, 0, 0,
            CHUNK=chunk, FINAL=False, MAX_ENTRIES=MAX_ENTRIES,
        )
        ranking, length = candidates, n_chunks * topk
    _select_kernel[(rows, 1)](
        ranking, out, length, topk, ranking.stride(0), 0, out.shape[1], *out.stride(), CHUNK=chunk, FINAL=True,
        MAX_ENTRIES=MAX_ENTRIES,
    )


@triton.jit(do_not_specialize=["stride_pos"])
def _scores_kernel(
    q_ptr, w_ptr, k_ptr, rank_ptr, S, H, n_entries, pos_ptr, stride_pos, start_pos, ratio, split_len,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_wb, stride_ws, stride_wh,
    stride_kb, stride_kn, stride_kd,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr, KEY_FORMAT: tl.constexpr, LOW_PRECISION_DOT: tl.constexpr, POS_FROM_PTR: tl.constexpr,
    MAX_ENTRIES: tl.constexpr,
):
    """Ranking keys of BLOCK_S queries (all heads) over the entries of one split; key rows dense,
    or packed records decoded by :func:`_key_tile` (KEY_FORMAT "fp4" / "fp8"). Query s sits at
    start_pos + s, plus, when POS_FROM_PTR, sequence bat's position at ``pos_ptr + bat *
    stride_pos`` (stride 0: one position for all)."""
    s_blocks = tl.cdiv(S, BLOCK_S)
    bat = (tl.program_id(0) // s_blocks).to(tl.int64)
    if POS_FROM_PTR:
        start_pos += load_position(pos_ptr, stride_pos, bat)
    first = (tl.program_id(0) % s_blocks) * BLOCK_S
    rows = tl.arange(0, BLOCK_S * H_PAD)  # row = query * H_PAD + head
    seq = first + rows // H_PAD
    head = rows % H_PAD
    row_ok = (seq < S) & (head < H)
    cols = tl.arange(0, D_PAD)
    in_d = cols[None, :] < HEAD_DIM
    q_rows = q_ptr + bat * stride_qb + seq[:, None] * stride_qs + head[:, None] * stride_qh
    q = tl.load(q_rows + cols[None, :] * stride_qd, mask=row_ok[:, None] & in_d, other=0.0)
    w = tl.load(w_ptr + bat * stride_wb + seq * stride_ws + head * stride_wh, mask=row_ok, other=0.0)
    w = w.to(tl.float32)

    queries = first + tl.arange(0, BLOCK_S)
    visible = tl.minimum((start_pos + queries + 1) // ratio, n_entries)  # entries each query sees
    block_visible = tl.max(tl.where(queries < S, visible, 0))
    out_rows = rank_ptr + (bat * S + queries)[:, None] * n_entries
    k_base = k_ptr + bat * stride_kb
    offs_n = tl.arange(0, BLOCK_N)
    lo = tl.program_id(1) * split_len
    hi = tl.minimum(lo + split_len, n_entries)
    for start in range(lo, hi, BLOCK_N):
        entries = start + offs_n
        ranked = tl.full((BLOCK_S, BLOCK_N), NOT_VISIBLE, tl.int64)
        if start < block_visible:
            key_rows = k_base + entries[:, None] * stride_kn
            k = _key_tile(key_rows, cols, entries[:, None] < block_visible, in_d, stride_kd, q_ptr.dtype.element_ty,
                          KEY_FORMAT, HEAD_DIM)
            logits = _dot(q, tl.trans(k), tl.zeros((BLOCK_S * H_PAD, BLOCK_N), tl.float32), LOW_PRECISION_DOT)
            weighted = tl.maximum(logits, 0.0) * w[:, None]
            scores = tl.sum(tl.reshape(weighted, (BLOCK_S, H_PAD, BLOCK_N)), axis=1)
            seen = entries[None, :] < visible[:, None]
            ranked = tl.where(seen, _packed_key(scores, entries, MAX_ENTRIES), NOT_VISIBLE)
        tl.store(out_rows + entries[None, :], ranked, mask=(queries[:, None] < S) & (entries[None, :] < hi))


@triton.jit
def _key_tile(rows, cols, row_ok, in_d, stride_kd, dtype: tl.constexpr, KEY_FORMAT: tl.constexpr,
              HEAD_DIM: tl.constexpr):
    """Columns ``cols`` [C] of the key rows (pointers [R, 1]) as [R, C] ``dtype``, 0 where masked.

    ``"dense"``: loaded as they are. Packed records decode as ``index_key_unpack`` does, in fp32,
    then rounded to dtype by :func:`cast_rne`: ``"fp4"`` column c is ``e2m1(nibble c % 2 of byte
    c // 2) * 2^(e - 127)``, e the byte HEAD_DIM/2 + c // 32; ``"fp8"`` column c is ``e4m3(byte c)
    * s``, s the little-endian fp32 at bytes HEAD_DIM..HEAD_DIM+3 (codes decoded in integer
    arithmetic: the interpreter's float8 cast reads the NaN codes as 480).
    """
    mask = row_ok & in_d
    if KEY_FORMAT == "fp4":
        byte = tl.load(rows + (cols // 2)[None, :] * stride_kd, mask=mask, other=0).to(tl.int32)
        code = (byte >> (4 * (cols % 2))[None, :]) & 0xF
        exponent = tl.load(rows + (HEAD_DIM // 2 + cols // 32)[None, :] * stride_kd, mask=mask, other=127)
        tile = cast_rne(tl.where(mask, decode_e2m1(code) * _e8m0_scale(exponent.to(tl.int32)), 0.0), dtype)
    elif KEY_FORMAT == "fp8":
        codes = tl.load(rows + cols[None, :] * stride_kd, mask=mask, other=0).to(tl.int32)
        bits = tl.load(rows + HEAD_DIM * stride_kd, mask=row_ok, other=0).to(tl.uint32)
        for i in tl.static_range(1, 4):  # the scale's other bytes, least significant first
            byte = tl.load(rows + (HEAD_DIM + i) * stride_kd, mask=row_ok, other=0).to(tl.uint32)
            bits = bits | (byte << (8 * i))
        scale = bits.to(tl.float32, bitcast=True)
        tile = cast_rne(tl.where(mask, _e4m3_value(codes) * scale, 0.0), dtype)
    else:
        tile = tl.load(rows + cols[None, :] * stride_kd, mask=mask, other=0.0)
    return tile


@triton.jit
def _select_kernel(
    src_ptr, dst_ptr, length, topk, stride_src, stride_dst, S, stride_ob, stride_os, stride_ok,
    CHUNK: tl.constexpr, FINAL: tl.constexpr, MAX_ENTRIES: tl.constexpr,
):
    """The topk largest keys of one CHUNK of one row, in order: as candidates at dst[row, chunk *
    topk:], or (FINAL, one chunk per row) as entry indices into out[row // S, row % S, :]."""
    row = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, CHUNK)
    offs = tl.program_id(1) * CHUNK + slots
    keys = tl.load(src_ptr + row * stride_src + offs, mask=offs < length, other=NOT_VISIBLE)
    ranked = tl.sort(keys, descending=True)
    keep = slots < topk
    if FINAL:
        index = tl.where(ranked == NOT_VISIBLE, -1, MAX_ENTRIES - 1 - (ranked & 0xFFFFFFFF)).to(tl.int32)
        out = dst_ptr + (row // S) * stride_ob + (row % S) * stride_os + slots * stride_ok
        tl.store(out, index, mask=keep)
    else:
        tl.store(dst_ptr + row * stride_dst + tl.program_id(1) * topk + slots, ranked, mask=keep)
