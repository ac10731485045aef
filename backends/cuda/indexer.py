"""Triton lightning indexer (ops ``indexer_topk``, ``indexer_topk_packed``): ReLU-weighted
multi-head scores, exact causal top-k.

Three kernels, one job each (v4_ops.md §8). A decode call launches the scores, one selection
round per 8x shrink of the row (V4: one at 1024 entries, two at 16k, three at 256k) and the
ranking, and no other kernel: nothing fills the output beforehand.

``_scores_kernel`` -- one program per (batch, block of BLOCK_S queries, split of the compressed
entries). It loads its queries' q rows once, every head side by side in one matrix [BLOCK_S *
H_PAD, d], then walks its split BLOCK_N entries at a time: each key tile is loaded once and serves
all heads in one dot with the keys on the MMA's M side, ``K_tile · q^T`` [BLOCK_N, BLOCK_S *
H_PAD] (decode with V4's 64 heads: 64 x 64); ``relu``, times the head weights, summed over each
query's heads gives fp32 scores [BLOCK_N, BLOCK_S]. That way round a thread holds whole rows of
heads, so the head sum is adds in registers and two shuffles; with the heads on M (the first
design) it crossed warps through shared memory, ~260 of the 524 instructions a warp issued per
64 keys (sm_90 SASS), and decoded keys had to go through shared memory to reach the MMA, which
now takes them from registers. Packed keys (``indexer_topk_packed``, v4_ops.md §12: 68-byte FP4
or 132-byte FP8 records at d = 128) are decoded in registers as each tile is loaded (a constexpr
KEY_FORMAT), to exactly the values ``index_key_unpack`` gives in q's dtype (bf16 FP4 keys by
:func:`._e2m1.e2m1_bf16`'s bit arithmetic); the dot and everything after are the dense path's,
so packed keys rank bit for bit as the dense kernel ranks their unpacked values. A score is stored
as an int32 ranking key, its order-preserving bits (-0.0 as +0.0, so zeros tie); an entry the
query does not see (``j >= floor((t+1)/m)``) gets NOT_VISIBLE (INT32_MIN), below every score.
The tiles some query of the block sees run the dot in one branch-free loop (so Triton pipelines
its key loads), the tiles after them only store NOT_VISIBLE. Splits are sized so that the grid
holds about two programs per SM.

``_select_kernel`` -- exact top-k by split and merge, without sorting. One program per (query row,
CHUNK keys of it) finds its chunk's k-th largest key by bisection on its bits in registers: the
keys that share the bits fixed so far with the k-th form a bucket; one count of the keys at or
above the bucket's middle says which half holds the k-th. It stops once the bucket holds exactly
the keys still needed (typically after ~20 of the 32 bits) or every bit is fixed (the bucket's
keys are then equal, and the first ones in entry order are taken). The chosen keys are written in
entry order, each packed with its entry as an int64 candidate ``key << 32 | (2^31 - 1 - j)`` (a
larger candidate is a higher score or, at an equal score, the smaller entry), padded to k with
INT64_MIN. Every round keeps entry order, so ties go to the smaller entry in every round, and a
row's top k lie in the union of its chunks' top k: a round shrinks a row of L keys to
ceil(L / CHUNK) * k candidates (CHUNK = 8k, at least 4096) until one chunk holds the row, the
last round's chunk the row rounded up to a power of two. Decode at a 1M-token context (N = 256k
entries, k = 512): 64 programs of 4096 keys, then 8, then one.

``_rank_kernel`` -- orders the k winners: a program takes BLOCK_R of a row's candidates and counts,
for each, the row's larger candidates (k comparisons each): that count is its slot. The
candidates are distinct (their entries are), so they fill slots 0..c-1 exactly once; each program
writes -1 into its share of the slots c..k-1 (a row that sees fewer than k entries).

The ranking keys take 4 bytes per (query, visible entry) of workspace next to the key rows' 256
(bf16, d = 128; 68 or 132 packed), the candidates 8 per (query, k, chunk); prefill processes the
queries in passes that bound that workspace. bf16 or fp32 q and keys; fp32 math throughout (q .
k, relu, weights, head sum).

The position as data (CUDA-graph decode): ``start_pos`` may be an int32/int64 tensor on q's device,
0-d (every sequence) or [B] (query s of sequence b at ``start_pos[b] + s``), loaded by
``_scores_kernel`` (POS_FROM_PTR, at ``pos_ptr + b * stride``, stride 0 for a 0-d tensor) and never
read on the host, so one captured launch serves every position. The host then cannot bound the
visible entries: the scores grid, the ranking rows, the query passes and the top-k rounds are
sized by all N rows of the key store, and the kernel masks the entries a query does not see
(NOT_VISIBLE; tiles past the last visible one skip the dot but still store their masked keys).
Each sequence's indices equal the int path's at its position; the cost is the ranking of N keys
a query instead of the visible ones (a store sized to the context pays little).
This top-k (selection rounds and ranking, which replaced per-chunk bitonic sorts) is verified under
the Triton interpreter and on the H100 (full-shape conformance at 14a3a20, both key formats);
launch choices are untuned (TUNING.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._cache_keys import settle_cache_keys
from ._alignment import row_alignment
from ._e2m1 import _per_element, decode_e2m1, e2m1_bf16, e2m1_bf16_words, in_k_order, unpack_codes
from ._host import cdiv, next_power_of_2
from ._numerics import INTERPRETED, cast_rne, exact_dot
from ._position import load_position, position_stride
from .kv_unpack import _e4m3_value, _e8m0_scale
from ._pdl import pdl_options, wait_for_prior_grid


MAX_ENTRIES = 2**31
"""Entry indices are packed as ``MAX_ENTRIES - 1 - j`` in the low 32 bits of a candidate (a
kernel argument: the interpreter cannot hand a global constexpr on to a called jit function)."""
NOT_VISIBLE = tl.constexpr(-(2**31))
"""The ranking key of an entry the query does not see: below every score's key."""
NO_CANDIDATE = tl.constexpr(-(2**63))
"""A candidate slot past a chunk's winners: below every candidate (its key part is NOT_VISIBLE)."""
WORKSPACE_BYTES = 256 * 2**20
"""Ranking keys held at once (queries per pass * visible entries * 4 bytes)."""


@dataclass(frozen=True)
class IndexerConfig:
    """One launch: queries per scores program, entries per key tile and per split, selection
    chunk, candidates per ranking program and how many of the row's it compares them with a step."""

    block_s: int
    block_n: int
    split_len: int
    chunk: int
    rank_block: int
    num_warps: int = 4
    rank_chunk: int = 1024


PROGRAMS_PER_SM = {"dense": 2, "fp4": 4, "fp8": 4}
"""Scores programs per SM the splits aim for, by key format. Packed keys decode in registers, so
more resident programs hide more of it: on the H100 (2026-11-26, V4-Flash decode, batch 64, 64k to
1M context) 4 against 2 took FP8 keys from 1526 to 1368 us at 1M (408 -> 364 at 256k) and FP4 keys
from 1302 to 1196 us; bf16 keys gained at most 3% from 1 program an SM and keep 2."""


def indexer_config(
    s: int, h: int, n_entries: int, topk: int, rows: int, device: torch.device, *,
    key_format: str = "dense", block_n: int = 64, programs_per_sm: int | None = None,
    num_warps: int | None = None, chunk_topks: int = 8,
) -> IndexerConfig:
    """The launch for S queries of H heads over n_entries visible entries, top-k, ``rows`` = B * S.

    GPU (TUNING.md): heads times queries fill an N of 64 (decode) or 128 (prefill) and
    at least 16 (the MMA's minimum); ``block_n``-entry key tiles; splits until the scores grid
    holds about ``programs_per_sm`` programs per SM (default :data:`PROGRAMS_PER_SM` of
    ``key_format``); 4 warps, 8 from 128 heads x queries
    (``num_warps`` overrides); selection chunks of ``chunk_topks`` * k keys, at least 4096 (for 8 *
    k: three rounds at 256k entries for V4's k = 512 and 1024); 16 candidates per ranking program
    (one warp, comparing them with up to 1024 of the row's a step).
    The keyword arguments are what the bench's variants change. On CPU (the interpreter) small
    blocks, so the tests cross query blocks, splits, several selection rounds and ranking programs.
    """
    h_pad = next_power_of_2(h)
    k_pad = next_power_of_2(topk)
    if device.type != "cuda":
        return IndexerConfig(2, 16, 32, max(16, 2 * k_pad), 4, rank_chunk=4)
    block_s = min(next_power_of_2(s), max(1, (64 if s == 1 else 128) // h_pad))
    block_s = max(block_s, cdiv(16, h_pad))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_programs = (rows // s) * cdiv(s, block_s)
    tiles = cdiv(n_entries, block_n)
    programs_per_sm = programs_per_sm or PROGRAMS_PER_SM[key_format]
    splits = max(1, min(tiles, cdiv(programs_per_sm * sms, row_programs)))
    split_len = cdiv(tiles, splits) * block_n
    chunk = max(4096, chunk_topks * k_pad)
    warps = num_warps or (8 if block_s * h_pad >= 128 else 4)
    return IndexerConfig(block_s, block_n, split_len, chunk, min(16, k_pad), num_warps=warps)


def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, ratio: int, start_pos: int | torch.Tensor, topk: int,
    weights_scale: float = 1.0, offset: int = 0,
) -> torch.Tensor:
    """Select, for every query token, the top-k visible compressed entries by indexer score.

    q: [B, S, H, d] bf16/fp32, weights: [B, S, H] bf16/fp32, keys: [B, N, d] bf16/fp32
    -> indices: [B, S, topk] int32, ``offset + j`` for entry j, -1 in slots beyond the visible entries.

    ``I(t, j) = sum_h w_h * relu(q_h . K_j)`` in fp32, ``w_h = fp32(weights[h]) * weights_scale``
    (as the scores kernel loads them), for query ``t = start_pos + s`` and the entries it sees,
    ``j < min(N, floor((t+1)/m))``; indices ordered by score descending, ties to the smaller
    index. start_pos: an int, or an int32/int64 tensor on q's device that only the kernel reads,
    0-d or [B] (sequence b's queries at ``start_pos[b] + s``; module docstring: the position as
    data).
    """
    _check_float("indexer_topk", "keys", keys)
    return launch_indexer(q, weights, keys, "dense", ratio, start_pos, topk, weights_scale, offset)


def indexer_topk_packed(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, key_format: str, ratio: int,
    start_pos: int | torch.Tensor, topk: int, weights_scale: float = 1.0, offset: int = 0,
) -> torch.Tensor:
    """:func:`indexer_topk` over packed keys [B, N, index_key_bytes(d, key_format)] uint8, decoded
    in registers to q's dtype: ``"fp4"`` e2m1 codes times one e8m0 scale per 32 elements, ``"fp8"``
    e4m3 codes times the key's fp32 scale (``seahal.hal.formats.index_key_unpack``)."""
    return launch_indexer(q, weights, keys, key_format, ratio, start_pos, topk, weights_scale, offset)


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.bfloat16, torch.float32):
        raise NotImplementedError(f"cuda.triton {op} takes bf16 or fp32 {name}, got {t.dtype}")


def launch_indexer(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, key_format: str, ratio: int,
    start_pos: int | torch.Tensor, topk: int, weights_scale: float = 1.0, offset: int = 0, **launch: int,
) -> torch.Tensor:
    """Both ops: scores and top-k in passes of queries; ``key_format`` "dense", "fp4" or "fp8";
    ``weights_scale`` and ``offset`` as the ops take them (the head weights' factor, entry 0's
    index). ``launch``: keyword arguments of :func:`indexer_config` for every pass (benchmarks,
    tuning)."""
    _check_float("indexer_topk" if key_format == "dense" else "indexer_topk_packed", "q", q)
    b, s, _, _ = q.shape
    out = torch.empty((b, s, topk), dtype=torch.int32, device=q.device)

    def entries_seen(queries: int) -> int:
        """Ranking keys a row of the first ``queries`` queries needs: the visible entries of the last
        one, or at a position in memory all N (the kernel masks those a query does not see)."""
        if isinstance(start_pos, torch.Tensor):
            return keys.shape[1]
        return min(keys.shape[1], (start_pos + queries) // ratio)

    per_pass = max(1, WORKSPACE_BYTES // (4 * b * max(entries_seen(s), 1)))
    for first in range(0, s, per_pass):
        last = min(s, first + per_pass)
        n_entries = entries_seen(last)
        if n_entries == 0:
            out[:, first:last] = -1  # nothing visible yet
            continue
        config = indexer_config(
            last - first, q.shape[2], n_entries, topk, b * (last - first), q.device, key_format=key_format, **launch
        )
        ranking = ranking_keys(
            q[:, first:last], weights[:, first:last], keys, ratio, start_pos, n_entries, config, key_format, first,
            weights_scale,
        )
        select_topk(ranking, topk, out[:, first:last], config, offset)
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
    first_query: int = 0,
    weights_scale: float = 1.0,
) -> torch.Tensor:
    """Ranking keys [B * S, n_entries] int32 of the first n_entries entries (rows b * S + s).

    Key = the score's order-preserving fp32 bits (head weights ``fp32(weights) * weights_scale``),
    INT32_MIN where query s, at position ``start_pos + first_query + s``, does not see entry j.
    start_pos: an int, or an int32/int64 tensor on q's device, 0-d or [B] (one a sequence), loaded
    by the kernel. ``key_format``: keys [B, N, d] floats (``"dense"``) or packed records
    (``"fp4"``, ``"fp8"``) decoded to q's dtype.
    """
    b, s, h, d = q.shape
    key_dtype = keys.dtype if key_format == "dense" else q.dtype  # packed keys decode to q's dtype
    ranking = torch.empty((b * s, n_entries), dtype=torch.int32, device=q.device)
    grid = (b * cdiv(s, config.block_s), cdiv(n_entries, config.split_len))
    if isinstance(start_pos, torch.Tensor):
        op = "indexer_topk" if key_format == "dense" else "indexer_topk_packed"
        pos_ptr, pos_stride, position = start_pos, position_stride(op, start_pos, b, q.device), first_query
    else:
        pos_ptr, pos_stride, position = None, None, start_pos + first_query
    _scores_kernel[grid](
        q, weights, keys, ranking, s, h, n_entries, pos_ptr, pos_stride, position, ratio, config.split_len,
        weights_scale,
        *q.stride(), *weights.stride(), keys.stride(0), keys.stride(1), keys.stride(2),
        HEAD_DIM=d, D_PAD=max(16, next_power_of_2(d)), H_PAD=next_power_of_2(h),
        BLOCK_S=config.block_s, BLOCK_N=config.block_n, KEY_FORMAT=key_format, ROW_ALIGN=row_alignment(keys),
        LOW_PRECISION_DOT=q.dtype == key_dtype == torch.bfloat16 and q.device.type == "cuda",
        POS_FROM_PTR=pos_ptr is not None, num_warps=config.num_warps, **pdl_options(),
    )
    return ranking


def select_topk(
    ranking: torch.Tensor, topk: int, out: torch.Tensor, config: IndexerConfig, offset: int = 0
) -> None:
    """Write the entries of each row's ``topk`` largest ranking keys, by key descending and then
    entry ascending (-1 for INT32_MIN keys and past the row), into ``out`` [B, S, topk] int32 (row
    b * S + s of ``ranking`` [B * S, L] int32), entry j as ``offset + j``.

    Rounds of per-chunk selection (``config.chunk``: a power of two >= 2 * topk) until a row fits
    one chunk, the last round's chunk the row's length rounded up to a power of two; then the
    ranking. Launches depend only on the shapes.
    """
    chunk = config.chunk
    if chunk < 2 * topk or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 2 * topk = {2 * topk}, got {chunk}")
    rows, length = ranking.shape
    candidates, packed = ranking, False
    while True:
        last_round = length <= chunk
        size = max(16, next_power_of_2(max(length, topk))) if last_round else chunk
        n_chunks = cdiv(length, size)
        chosen = torch.empty((rows, n_chunks * topk), dtype=torch.int64, device=ranking.device)
        _select_kernel[(rows, n_chunks)](
            candidates, chosen, length, topk, candidates.stride(0), chosen.stride(0),
            CHUNK=size, PACKED=packed, MAX_ENTRIES=MAX_ENTRIES, num_warps=min(16, max(4, size // 512)), **pdl_options(),
        )
        candidates, length, packed = chosen, n_chunks * topk, True
        if last_round:
            break
    _rank_kernel[(rows, cdiv(topk, config.rank_block))](
        candidates, out, topk, offset, candidates.stride(0), out.shape[1], *out.stride(),
        BLOCK_R=config.rank_block, CHUNK=min(next_power_of_2(topk), config.rank_chunk), MAX_ENTRIES=MAX_ENTRIES,
        num_warps=1, **pdl_options(),
    )


@triton.jit(do_not_specialize=["stride_pos"])
def _scores_kernel(
    q_ptr, w_ptr, k_ptr, rank_ptr, S, H, n_entries, pos_ptr, stride_pos, start_pos, ratio, split_len, weights_scale,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_wb, stride_ws, stride_wh,
    stride_kb, stride_kn, stride_kd,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr, KEY_FORMAT: tl.constexpr, ROW_ALIGN: tl.constexpr, LOW_PRECISION_DOT: tl.constexpr,
    POS_FROM_PTR: tl.constexpr, PDL: tl.constexpr = False,
):
    """Ranking keys of BLOCK_S queries (all heads) over the entries of one split; key rows dense,
    or packed records decoded by :func:`_key_tile` (KEY_FORMAT "fp4" / "fp8"). Query s sits at
    start_pos + s, plus, when POS_FROM_PTR, sequence bat's position at ``pos_ptr + bat *
    stride_pos`` (stride 0: one position for all). ROW_ALIGN: every key row starts at a multiple
    of it (:func:`._alignment.row_alignment`): 132- and 68-byte records load as 4-byte words, not
    byte by byte."""
    wait_for_prior_grid(PDL)
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
    q_rows = q_ptr + bat * stride_qb + seq[:, None] * stride_qs + head[:, None] * stride_qh
    q = tl.load(q_rows + cols[None, :] * stride_qd, mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)
    lanes: tl.constexpr = KEY_FORMAT == "fp4" and q_ptr.dtype.element_ty == tl.bfloat16 and D_PAD == 128
    words: tl.constexpr = lanes and ROW_ALIGN % 4 == 0  # FP4 codes of aligned records as 4-byte words
    order: tl.constexpr = "words" if words else ("lanes" if lanes else "stored")
    q = in_k_order(q, BLOCK_S * H_PAD, D_PAD, order)  # FP4 key tiles decode in (word) lane order: q's D alike
    w = tl.load(w_ptr + bat * stride_wb + seq * stride_ws + head * stride_wh, mask=row_ok, other=0.0)
    w = w.to(tl.float32) * weights_scale  # one fp32 product a head weight, as the op defines them

    queries = first + tl.arange(0, BLOCK_S)
    visible = tl.minimum((start_pos + queries + 1) // ratio, n_entries)  # entries each query sees
    block_visible = tl.max(tl.where(queries < S, visible, 0))
    out_rows = rank_ptr + (bat * S + queries)[None, :] * n_entries
    row_stored = queries[None, :] < S
    offs_n = tl.arange(0, BLOCK_N)
    lo = tl.program_id(1) * split_len
    hi = tl.minimum(lo + split_len, n_entries)
    scored = lo + tl.cdiv(tl.maximum(tl.minimum(hi, block_visible) - lo, 0), BLOCK_N) * BLOCK_N
    for start in range(lo, scored, BLOCK_N):  # tiles some query of the block sees
        entries = start + offs_n
        records = k_ptr + tl.multiple_of(bat * stride_kb + entries * stride_kn, ROW_ALIGN)
        k = _key_tile(records, entries < block_visible, stride_kd, q_ptr.dtype.element_ty,
                      KEY_FORMAT, HEAD_DIM, D_PAD, BLOCK_N, ROW_ALIGN, order)
        logits = exact_dot(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_S * H_PAD), tl.float32), LOW_PRECISION_DOT)
        weighted = tl.maximum(logits, 0.0) * w[None, :]
        scores = tl.sum(tl.reshape(weighted, (BLOCK_N, BLOCK_S, H_PAD)), axis=2)
        ranked = tl.where(entries[:, None] < visible[None, :], _order_key(scores), NOT_VISIBLE)
        tl.store(out_rows + entries[:, None], ranked, mask=row_stored & (entries[:, None] < hi))
    for start in range(scored, hi, BLOCK_N):  # tiles no query of the block sees (a position in memory)
        entries = start + offs_n
        unseen = tl.full((BLOCK_N, BLOCK_S), NOT_VISIBLE, tl.int32)
        tl.store(out_rows + entries[:, None], unseen, mask=row_stored & (entries[:, None] < hi))


@triton.jit
def _order_key(score):
    """int32 keys ordered as the fp32 scores: -0.0 is made +0.0 first (zeros tie), and the one
    NaN pattern that would land on NOT_VISIBLE is kept above it (a seen entry stays an entry)."""
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
    return tl.maximum(bits ^ ((bits >> 31) & 0x7FFFFFFF), NOT_VISIBLE + 1)


@triton.jit
def _key_tile(records, row_ok, stride_kd, dtype: tl.constexpr, KEY_FORMAT: tl.constexpr, HEAD_DIM: tl.constexpr,
              D_PAD: tl.constexpr, ROWS: tl.constexpr, ROW_ALIGN: tl.constexpr, ORDER: tl.constexpr = "stored"):
    """The keys at ``records`` (pointers [ROWS] to their first byte or element) as [ROWS, D_PAD]
    ``dtype``, 0 in rows not ``row_ok`` and columns from HEAD_DIM; ORDER (bf16 FP4 keys): "lanes",
    the columns in :func:`._e2m1.lane_order`, or "words" (records 4-byte aligned), the codes
    loaded as 4-byte words and the columns in :func:`._e2m1.word_lane_order`.

    ``"dense"``: loaded as they are. Packed records decode to the values ``index_key_unpack`` gives
    (fp32, then rounded to dtype); each byte is loaded once. ``"fp4"``: column c is ``e2m1(nibble c
    % 2 of byte c // 2) * 2^(e - 127)``, e the byte HEAD_DIM/2 + c // 32 (to bf16 in bf16 bit
    arithmetic, :func:`._e2m1.e2m1_bf16`; to fp32 in integer arithmetic); ``"fp8"``: column c is
    ``e4m3(byte c) * s`` in fp32 rounded by :func:`cast_rne`, s the
    little-endian fp32 at bytes HEAD_DIM..HEAD_DIM+3 (:func:`_e4m3_to_f32`), one 4-byte load where
    the rows are 4-byte aligned (ROW_ALIGN).
    """
    rows = records[:, None]
    cols = tl.arange(0, D_PAD)[None, :]
    if KEY_FORMAT == "fp4":
        if ORDER == "words":
            offs = tl.arange(0, D_PAD // 8)[None, :]
            words = rows.to(tl.pointer_type(tl.uint32), bitcast=True)
            packed = tl.load(words + offs, mask=row_ok[:, None] & (offs < HEAD_DIM // 8), other=0)
        else:
            pairs = tl.arange(0, D_PAD // 2)[None, :]
            packed = tl.load(rows + pairs * stride_kd, mask=row_ok[:, None] & (pairs < HEAD_DIM // 2), other=0)
        groups = tl.arange(0, D_PAD // 32)[None, :]
        exponent = tl.load(rows + (HEAD_DIM // 2 + groups) * stride_kd, mask=row_ok[:, None] & (groups < HEAD_DIM // 32),
                           other=127)
        if ORDER == "words":
            tile = e2m1_bf16_words(packed, exponent, ROWS, D_PAD)  # masked: code 0 (the value 0), scale 1
        elif dtype == tl.bfloat16:
            tile = e2m1_bf16(packed, exponent, ROWS, D_PAD, ORDER == "lanes")
        else:
            codes = unpack_codes(packed.to(tl.int32), ROWS, D_PAD)  # 0 where masked: the value 0 (scale 1)
            tile = cast_rne(decode_e2m1(codes) * _per_element(_e8m0_scale(exponent.to(tl.int32)), ROWS, D_PAD), dtype)
    elif KEY_FORMAT == "fp8":
        mask = row_ok[:, None] & (cols < HEAD_DIM)
        codes = tl.load(rows + cols * stride_kd, mask=mask, other=0)
        if ROW_ALIGN % 4 == 0 and HEAD_DIM % 4 == 0:  # the scale as one little-endian word
            scale = tl.load((records + HEAD_DIM).to(tl.pointer_type(tl.float32)), mask=row_ok, other=0.0)
        else:
            bits = tl.load(records + HEAD_DIM * stride_kd, mask=row_ok, other=0).to(tl.uint32)
            for i in tl.static_range(1, 4):  # the scale's other bytes, least significant first
                byte = tl.load(records + (HEAD_DIM + i) * stride_kd, mask=row_ok, other=0).to(tl.uint32)
                bits = bits | (byte << (8 * i))
            scale = bits.to(tl.float32, bitcast=True)
        value = _e4m3_to_f32(codes) * scale[:, None]  # masked rows: code 0 times scale 0
        if HEAD_DIM < D_PAD:  # the padding columns stay 0 whatever the scale (0 * inf is NaN)
            value = tl.where(cols < HEAD_DIM, value, 0.0)
        tile = cast_rne(value, dtype)
    else:
        tile = tl.load(rows + cols * stride_kd, mask=row_ok[:, None] & (cols < HEAD_DIM), other=0.0)
    return tile


@triton.jit
def _e4m3_to_f32(codes):
    """e4m3 codes (uint8) -> their exact fp32 values (0x7F / 0xFF: NaN): the hardware conversion
    on the GPU, integer arithmetic in the interpreter (whose float8 cast reads the NaN codes as 480)."""
    if INTERPRETED:
        return _e4m3_value(codes.to(tl.int32))
    return codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _select_kernel(
    src_ptr, dst_ptr, length, topk, stride_src, stride_dst,
    CHUNK: tl.constexpr, PACKED: tl.constexpr, MAX_ENTRIES: tl.constexpr, PDL: tl.constexpr = False,
):
    """The topk largest keys of one CHUNK of one row, in entry order, as int64 candidates at
    dst[row, chunk * topk:], INT64_MIN past them. The source holds int32 ranking keys (entry j at
    column j) or, when PACKED, the candidates of the previous round."""
    wait_for_prior_grid(PDL)
    row = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, CHUNK)
    offs = tl.program_id(1) * CHUNK + slots
    if PACKED:
        candidate = tl.load(src_ptr + row * stride_src + offs, mask=offs < length, other=NO_CANDIDATE)
        key = (candidate >> 32).to(tl.int32)
    else:
        key = tl.load(src_ptr + row * stride_src + offs, mask=offs < length, other=NOT_VISIBLE)
        candidate = (key.to(tl.int64) << 32) | (MAX_ENTRIES - 1 - offs).to(tl.int64)
    chosen = _top_k_mask(key, topk)
    out = dst_ptr + row * stride_dst + tl.program_id(1) * topk
    tl.store(out + tl.cumsum(chosen.to(tl.int32), axis=0) - 1, candidate, mask=chosen)
    n_chosen = tl.sum(chosen.to(tl.int32), axis=0)
    tl.store(out + slots, tl.full((CHUNK,), NO_CANDIDATE, tl.int64), mask=(slots >= n_chosen) & (slots < topk))


@triton.jit
def _top_k_mask(key, topk):
    """Which of the int32 keys [C] are the ``topk`` largest above NOT_VISIBLE (keys of unseen
    entries and of empty slots, never chosen), exact ties to the earlier position: all of them if
    there are no more than topk.

    Bisection on the bits of the k-th largest key, from the top, in unsigned order (``key ^
    INT32_MIN``). The bucket is the range of keys whose bits fixed so far equal the k-th's, ``[base,
    base + 2^shift)`` in that order; it holds ``bucket`` keys, of which ``need`` are still to be
    taken, and the ``taken`` keys above it are taken. One count of the keys >= the bucket's middle
    says which half holds the k-th. It stops once the bucket holds exactly the needed keys, or
    every bit is fixed (they are equal: the first ``need`` in position order are taken).
    """
    bucket = tl.sum((key > NOT_VISIBLE).to(tl.int32), axis=0)
    need = tl.minimum(bucket, topk)
    taken = need - need
    base = tl.zeros((), tl.int64)  # the bucket's first key, in unsigned order
    shift = bucket * 0 + 32
    while (bucket > need) & (shift > 0):
        shift -= 1
        middle = base + (tl.full((), 1, tl.int64) << shift)
        upper = tl.sum((key >= (middle + NOT_VISIBLE).to(tl.int32)).to(tl.int32), axis=0) - taken
        in_upper = upper >= need  # the k-th is in the upper half
        base = tl.where(in_upper, middle, base)
        taken = tl.where(in_upper, taken, taken + upper)
        need = tl.where(in_upper, need, need - upper)
        bucket = tl.where(in_upper, upper, bucket - upper)
    last = (base + (tl.full((), 1, tl.int64) << shift) - 1 + NOT_VISIBLE).to(tl.int32)
    tied = (key >= tl.maximum(base + NOT_VISIBLE, NOT_VISIBLE + 1).to(tl.int32)) & (key <= last)
    return (key > last) | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= need))


@triton.jit(do_not_specialize=["offset"])  # a prefill chunk's offset W + S: one compile for all S
def _rank_kernel(
    cand_ptr, out_ptr, topk, offset, stride_c, S, stride_ob, stride_os, stride_ok,
    BLOCK_R: tl.constexpr, CHUNK: tl.constexpr, MAX_ENTRIES: tl.constexpr, PDL: tl.constexpr = False,
):
    """Entries of BLOCK_R of a row's topk candidates, plus ``offset``, into out[row // S, row % S,
    slot], the slot the number of larger candidates in the row; the slots past the row's candidates
    get -1. One warp compares them with CHUNK of the row's candidates a step (on a GPU 1024: V4's
    whole top-k), so the counts reduce within the warp, by shuffles: with 4 warps and 64
    candidates each of the 8 steps at V4-Flash's k = 512 waited on 8 barriers (sm_90 SASS), now 1
    in all."""
    wait_for_prior_grid(PDL)
    row = tl.program_id(0).to(tl.int64)
    cands = cand_ptr + row * stride_c
    slots = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mine = tl.load(cands + slots, mask=slots < topk, other=NO_CANDIDATE)
    larger = tl.zeros((BLOCK_R,), tl.int32)
    filled = tl.zeros((), tl.int32)  # the row's candidates (its other slots are empty)
    for start in range(0, topk, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        other = tl.load(cands + cols, mask=cols < topk, other=NO_CANDIDATE)
        larger += tl.sum((other[None, :] > mine[:, None]).to(tl.int32), axis=1)
        filled += tl.sum((other != NO_CANDIDATE).to(tl.int32), axis=0)
    out = out_ptr + (row // S) * stride_ob + (row % S) * stride_os
    entry = (MAX_ENTRIES - 1 - (mine & 0xFFFFFFFF)).to(tl.int32) + offset
    tl.store(out + larger * stride_ok, entry, mask=mine != NO_CANDIDATE)
    tl.store(out + slots * stride_ok, tl.full((BLOCK_R,), -1, tl.int32), mask=(slots < topk) & (slots >= filled))


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
