"""Triton sparse attention (ops ``sparse_attention`` and ``sparse_attention_fp8``): one softmax over
gathered keys, K = V, per-head sinks.

All heads of a query attend to the same selected rows (V4 shares one K = V vector across heads:
MQA-like), so a program owns a block of BLOCK_H heads of one query and every column of D, and
gathers each selected row once for all of them: a step loads the kv rows of BLOCK_N index slots as
one [BLOCK_N, D] tile (FP8 records decoded once, in registers), then ``s = q @ tile^T`` (heads are
the M dimension of the MMA), an online softmax in fp32 (running max m and sum l) and
``acc = acc * e^(m_old - m) + p @ tile``. The sink joins the denominator at the end,
``o = acc / (l + exp(sink - m))``, the reference's ratio with the max taken over the keys only.

Decode (few queries) splits each index row into SPLITS chunks of whole BLOCK_N blocks so that the
grid covers the chip (flash-decoding): program (query, split, head block) runs the same loop over
its chunk and writes m_i, l_i and its unnormalised fp32 acc_i to a workspace, and a second launch
merges them, ``M = max_i m_i``, ``L = sum_i l_i e^(m_i - M) + e^(sink - M)``,
``o = sum_i acc_i e^(m_i - M) / L``, a program per (query, head block, 64 columns)
(:data:`MERGE_ROWS`). :func:`attention_config` and :func:`attention_splits`
pick the launch (the numbers for V4's shapes are in their docstrings); nothing depends on index
values, so a CUDA graph replays it at every position.

``kv`` is dense rows (bf16 or fp32, any strides; op ``sparse_attention``) or the FP8 records of
v4_ops.md §12 (``[B, N, 584]`` uint8 for V4; op ``sparse_attention_fp8``, the model's FP8 cache):
a record ``[e4m3 nope codes | bf16 rope | e8m0 per tile | pad]`` becomes
``e4m3(code) * 2^(e_t - 127)`` rounded to bf16 for the nope columns and the rope bf16 as bits,
exactly the values :func:`..kv_unpack.kv_cache_unpack` writes, so only the selected records are
read and no decoded copy of the cache is ever written. Each program decodes a row once for its
BLOCK_H heads, on a [BLOCK_N, tiles, tile] brick: the codes in vectors as wide as the rows'
alignment allows (V4's 584-byte rows: 8 bytes), each tile's exponent once per row (in 4-byte
words, so that the loads are prefetched with the codes), the rope as 2-byte words (byte pairs
when rows start at odd bytes); the kernel's column space is that brick flattened, column
``t * TILE_W + i`` being head-dim column ``t * tile + i`` (the identity for a power-of-two tile,
as V4's 64; padding columns otherwise). Rows are addressed through kv's
strides, so one pool of rows expanded over the batch (batch stride 0) with pool-row indices serves
a paged cache (``seahal.hal.paging``) as it is; nothing here makes kv contiguous.

With ``positions`` and ``freqs`` (V4's inverse RoPE of the output, before its output projection)
the store rotates the output back: the normalised tile rounded to q's dtype, each head's last 2R
columns turned in interleaved pairs by ``-pos * f_i`` in fp32 as rope's kernel does, rounded
again (``OUT_ROPE`` pairs, :func:`_rotated_back`), in whichever launch stores the output (the
merge's when the keys are split): the rope launch and its read and write of the output saved.
Verified on the H100 (conformance at full shapes, 567d97d); the launch choices' figures are in
their docstrings and TUNING.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from seahal.hal.ops.quant import kv_record_bytes

from ._cache_keys import settle_cache_keys
from ._alignment import row_alignment
from ._host import cdiv, next_power_of_2
from ._numerics import INTERPRETED, cast_rne, exact_dot
from ._pdl import pdl_options, wait_for_prior_grid
from .kv_unpack import _e4m3_value, _e8m0_scale
from .rope import rope


@dataclass(frozen=True)
class AttentionConfig:
    """One launch: heads per program (the MMA's M), index slots per step, warps, pipeline depth,
    and how many of its programs one SM holds at once (``resident``: the registers and shared
    memory of its sm_90 compile allow that many; tests/test_cuda_compile.py checks the number).
    :func:`attention_splits` fills the chip's resident slots."""

    block_h: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    resident: int = 1


DECODE = AttentionConfig(block_h=16, block_n=32, num_warps=4, num_stages=2, resident=2)
"""Few queries: 16 heads a program, acc [16, 512] fp32 in 64 registers a thread; the four warps
split the 32 slots of the logits and the 512 output columns (mma.sync). sm_90 (offline compile):
132-185 registers and 50 KB of shared memory dense, 255 and 70 KB with the FP8 decode, no spills:
two programs an SM (three for some dense specialisations). Over FP8 records each row is decoded
once per 16 heads: 8.4 warp instructions per (row, head) in the loop with Triton 3.6, 12.2 with 3.9."""
WIDE = AttentionConfig(block_h=32, block_n=64, num_warps=8, num_stages=2, resident=1)
"""Many queries over dense rows (batched decode, prefill): each gathered row serves 32 heads, half
the rows' L2 reads and 35% fewer instructions per (row, head) than :data:`DECODE` (150-175
registers, 100 KB of shared memory, no spills: one program an SM). At 32 heads the FP8 decode
spills."""
HEADS64 = AttentionConfig(block_h=64, block_n=32, num_warps=8, num_stages=2, resident=1)
"""FP8 records over many queries: 64 heads a program are one wgmma M tile (q staged in shared
memory), so each gathered record is decoded once for V4-Flash's 64 heads (twice for V4-Pro's 128)
instead of once per 16. sm_90 (offline compile): 255 registers, 117-128 KB of shared memory, one
program an SM; 4.4 warp instructions per (row, head) in the loop against DECODE's 8.4 with Triton
3.6 (no spills), 5.5 against 12.2 with Triton 3.9 (which spills: 88 local loads an iteration).
Chosen by :func:`attention_config` once its grid can fill the chip; not yet measured (the bench's
FP8 rows time DECODE beside it)."""
HEADS64_WIDE = AttentionConfig(block_h=64, block_n=64, num_warps=8, num_stages=2, resident=1)
""":data:`HEADS64` over 64 slots a step, where its grid runs unsplit (prefill; batches whose
queries x head blocks exceed half the SMs): the two MMAs' instructions, the online softmax's
rescale of the [64, 512] accumulator and the loop's bookkeeping are paid once per 64 rows, not
32. sm_90 (offline compile, Triton 3.6, the GPU image's): a step's loop 1263 instructions a warp
over dense rows against HEADS64's 836 for half the rows (2.47 against 3.27 warp instructions per
(row, head), 25% fewer), 1764 against 1122 over FP8 records (3.45 against 4.38, 21% fewer); 255
registers, no spill (16 bytes over FP8 records, as HEADS64), 197 / 174 KB of shared memory: one
program an SM, as HEADS64. Triton 3.9 spills 128 / 768 bytes there (HEADS64: 136 / 408). Not yet
measured: the bench's prefill rows time HEADS64 beside it."""
FP32 = AttentionConfig(block_h=16, block_n=16, num_warps=4, num_stages=1)
"""fp32 q and rows (accuracy checks, not speed): IEEE fp32 dots, small tiles."""
INTERPRETER = AttentionConfig(block_h=16, block_n=16)
"""CPU tensors (the Triton interpreter): small tiles, so that tests cross head and slot blocks."""
MERGE_ROWS, MERGE_COLUMNS = 32, 64
"""The merge launch reads partials in [splits, heads, 64 columns] fp32 tiles of 32 (split, head)
rows: all of a query's splits up to 32 (next_pow2), and as many heads as fill the 32 rows. One
head a program (the first form) made B*S*H x D/64 programs of a few loads each: 32768 for V4-Flash
at batch 64 in 2 splits, 58 us on the H100 against 63 us for the attention itself. In this form
(H100, 567d97d) the two launches take 61.7 us there, as fast as the split programs merging their
partials themselves (62.1 us; that one-launch form, 24.9 against 14.0 us at batch 1, was removed)."""


HEADS64_MIN_SLOTS = 1024
"""Dense rows: index slots from which HEADS64 in two splits beats WIDE unsplit (:func:`attention_config`)."""


def attention_config(queries: int, h: int, k: int, dtype: torch.dtype, device: torch.device, sm_count: int,
                     fp8: bool = False) -> AttentionConfig:
    """The launch for ``queries`` (B * S) queries of H heads over K index slots in ``dtype`` (FP8
    records if ``fp8``) on a chip of ``sm_count`` SMs.

    FP8 records with at least 64 heads take :data:`HEADS64` once its split grid can fill the chip
    (queries x head blocks x BLOCK_N blocks >= SMs: V4-Flash CSA from 7 queries, V4-Pro from 2), where
    the decode's instruction count is what costs; fewer queries keep :data:`DECODE`, four times as
    many programs for the few rows there are. Dense rows take HEADS64 once its unsplit grid
    (queries x ceil(H / 64) programs) fills half the SMs (V4-Pro from batch 33, V4-Flash from 66,
    every prefill), or a quarter of them over at least :data:`HEADS64_MIN_SLOTS` slots (V4-Flash HCA
    from batch 33 at 256k context), else :data:`WIDE` once its unsplit grid fills half the SMs
    (V4-Flash from batch 33, V4-Pro from 17), else DECODE. Measured on the H100 (bf16 rows):
    HEADS64 against WIDE at prefill S=4096 2069 vs 2618 us (V4-Flash CSA), 6905 vs 8964 us (V4-Pro),
    at batch 64 V4-Pro CSA 134 vs 166 us (1e4356c); at batch 64 V4-Flash in two splits (567d97d)
    HCA over 2176 slots (256k) 134.5 vs 157.6 us, 8320 (1M) 453.2 vs 557.0, but 55.1 vs 55.7 over
    640 (CSA) and 29.6 vs 23.0 over 160 (HCA at 4k). Where HEADS64 would run unsplit
    (:func:`attention_splits` 1: its grid exceeds half the SMs), :data:`HEADS64_WIDE` (64 slots a
    step) takes its place. fp32 q takes :data:`FP32`, CPU tensors :data:`INTERPRETER`.
    """
    if device.type != "cuda":
        return INTERPRETER
    if dtype == torch.float32:
        return FP32
    if fp8:
        work_items = queries * cdiv(h, HEADS64.block_h) * cdiv(k, HEADS64.block_n)
        heads64 = h >= HEADS64.block_h and work_items >= sm_count
    else:
        programs = queries * cdiv(h, HEADS64.block_h)
        heads64 = h >= HEADS64.block_h and (2 * programs >= sm_count
                                            or (4 * programs >= sm_count and k >= HEADS64_MIN_SLOTS))
    if heads64:
        return HEADS64_WIDE if attention_splits(queries, h, k, HEADS64, sm_count) == 1 else HEADS64
    if fp8:
        return DECODE
    return WIDE if 2 * queries * cdiv(h, WIDE.block_h) >= sm_count else DECODE


def attention_splits(queries: int, h: int, k: int, config: AttentionConfig, sm_count: int) -> int:
    """Split-K factor for ``queries`` queries of H heads and K index slots under ``config``.

    The most splits whose grid still runs in one wave (config.resident programs on each SM), at
    most one per BLOCK_N block: none once the unsplit grid (queries x head blocks) fills the
    chip's resident slots, since a second wave would leave SMs idle behind it. The workspace is
    SPLITS x H x D fp32 per query, written once and read once by the merge, from L2. V4 decode on
    132 SMs: V4-Flash CSA (64 heads, 640 slots) at batch 1 under :data:`DECODE` 4 head blocks x 20
    splits of 32 slots = 80 programs (2.6 MB of partials), at batch 64 under :data:`HEADS64` 64 x 2
    splits of 320 = 128; V4-Pro (128 heads, 1152 slots) at batch 1 8 x 33 asked, which whole
    blocks make 18 splits of 64 slots = 144; an HCA row of 8320 slots (1M context) 4 x 65 splits
    of 128 = 260.
    """
    programs = queries * cdiv(h, config.block_h)
    return max(1, min(config.resident * sm_count // programs, cdiv(k, config.block_n)))


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    positions: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
) -> torch.Tensor:
    """One softmax over the keys each query selects, K = V shared, a sink in the denominator.

    q: [B, S, H, D] bf16/fp32, kv: [B, N, D] q's dtype, indices: [B, S, K] int32/int64 (-1 = empty
    slot), sink: [H] fp32, positions: [B, S] int or None, freqs: [R] fp32 or None -> o: [B, S, H, D]
    in q's dtype.

    ``s_j = softmax_scale * q_h . kv[idx_j]`` (a repeated index counts each time), ``m = max_j s_j``,
    ``o_h = sum_j exp(s_j - m) kv[idx_j] / (sum_j exp(s_j - m) + exp(sink_h - m))``; a query with no
    valid slot gets 0. Logits, max and sums in fp32; bf16 inputs round the probabilities to bf16
    for the PV product (as FlashMLA). Indices >= N are not checked (that would cost a host sync)
    and read as empty slots. With positions and freqs, ``rope(o, positions, freqs, inverse=True)``
    formed as the output is stored.
    """
    if q.dtype not in (torch.bfloat16, torch.float32):
        raise NotImplementedError(f"cuda.triton sparse_attention takes bf16 or fp32 q and kv, got {q.dtype}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    launch_sparse_attention(q, kv, indices, sink, softmax_scale, out, positions=positions, freqs=freqs)
    return out


def sparse_attention_fp8(
    q: torch.Tensor,
    records: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    rope_dim: int = 64,
    tile: int = 64,
    positions: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`sparse_attention` over keys stored as packed FP8 records, decoded in registers.

    q: [B, S, H, D] bf16/fp32, records: [B, N, kv_record_bytes(D, rope_dim, tile)] uint8 (584 bytes
    for V4's D = 512, rope 64, tile 64; any strides), indices: [B, S, K] int32/int64 (-1 = empty),
    sink: [H] fp32, positions / freqs: the output's inverse RoPE, as :func:`sparse_attention`
    -> o: [B, S, H, D] in q's dtype.

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
    launch_sparse_attention(q, records, indices, sink, softmax_scale, out, rope_dim=rope_dim, tile=tile,
                            positions=positions, freqs=freqs)
    return out


def sparse_attention_then_rope(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    positions: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`sparse_attention` as the GPU-verified kernels in turn: the attention's unrotated store,
    then rope's kernel (inverse) where positions are given (kernel ``cuda.triton_unfused``)."""
    return _then_rope(sparse_attention(q, kv, indices, sink, softmax_scale), positions, freqs)


def sparse_attention_fp8_then_rope(
    q: torch.Tensor,
    records: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    softmax_scale: float,
    rope_dim: int = 64,
    tile: int = 64,
    positions: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`sparse_attention_fp8` as the GPU-verified kernels in turn (:func:`sparse_attention_then_rope`)."""
    o = sparse_attention_fp8(q, records, indices, sink, softmax_scale, rope_dim, tile)
    return _then_rope(o, positions, freqs)


def _then_rope(o: torch.Tensor, positions: torch.Tensor | None, freqs: torch.Tensor | None) -> torch.Tensor:
    """o, rotated back by rope's kernel where positions are given."""
    return o if positions is None else rope(o, positions, freqs, inverse=True)


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
    positions: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
) -> None:
    """Write :func:`sparse_attention` of the arguments into ``out`` [B, S, H, D] (any strides),
    rotated back by ``positions`` [B, S] and ``freqs`` [R] when they are given.

    ``kv`` is dense rows in q's dtype, or uint8 FP8 records of geometry (``rope_dim``, ``tile``)
    (:func:`sparse_attention_fp8`; the geometry is unused for dense rows). ``config`` and
    ``splits`` override :func:`attention_config` and :func:`attention_splits` (on CPU tensors the
    default is unsplit, so that launches differing only in batch size stay bit-identical in the
    interpreter); chunks are whole BLOCK_N blocks, so fewer splits run when K has fewer blocks.
    On a GPU the split changes the fp32 summation order, so one query's output may differ in the
    last bits between a small (split) and a large (unsplit) batch. Split partials are merged by
    a second launch (:func:`_combine_splits_kernel`).
    """
    b, s, h, d = q.shape
    if out.numel() == 0:
        return
    k = indices.shape[-1]
    on_gpu = q.device.type == "cuda"
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if on_gpu else 1
    fp8 = kv.dtype == torch.uint8
    config = config or attention_config(b * s, h, k, q.dtype, q.device, sms, fp8)
    if splits is None:
        splits = attention_splits(b * s, h, k, config, sms) if on_gpu else 1
    blocks = max(1, cdiv(k, config.block_n))
    split_slots = cdiv(blocks, max(1, splits)) * config.block_n
    splits = cdiv(blocks * config.block_n, split_slots)  # no empty trailing split
    head_blocks = cdiv(h, config.block_h)
    # the column space: [tiles, tile] bricks for FP8 records, one power-of-two run for dense rows
    tile_w = next_power_of_2(tile) if fp8 else next_power_of_2(d)
    col_tiles = next_power_of_2(cdiv(d, tile)) if fp8 else 1
    if splits > 1:  # fp32 partials [B*S, SPLITS, H, D] and their (max, sum) [2, B*S, SPLITS, H]
        partial = torch.empty((b * s, splits, h, d), dtype=torch.float32, device=q.device)
        stats = torch.empty((2, b * s, splits, h), dtype=torch.float32, device=q.device)
    else:  # unused by the unsplit kernel
        partial = stats = out
    rotation = _rotation_arguments(positions, freqs, out)
    _sparse_attention_kernel[(b * s * splits * head_blocks,)](
        q, kv, indices, sink, out, partial, stats, s, h, kv.shape[1], k, splits, split_slots,
        float(softmax_scale),
        *q.stride(), *kv.stride(), *indices.stride(), sink.stride(0), *out.stride(), *rotation,
        HEAD_DIM=d, BLOCK_H=config.block_h, BLOCK_N=config.block_n, COL_TILES=col_tiles, TILE_W=tile_w,
        LOW_PRECISION_DOT=q.dtype == torch.bfloat16 and on_gpu, KV_FP8=fp8, ROPE_DIM=rope_dim,
        TILE=tile if fp8 else tile_w, ROW_ALIGN=row_alignment(kv), SPLIT=splits > 1,
        OUT_ROPE=0 if freqs is None else freqs.shape[0],
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_options(),
    )
    if splits > 1:
        block_s = min(next_power_of_2(splits), MERGE_ROWS)
        block_h = min(MERGE_ROWS // block_s, next_power_of_2(h))
        _combine_splits_kernel[(b * s * cdiv(h, block_h), cdiv(d, MERGE_COLUMNS))](
            partial, stats, sink, out, s, h, splits, sink.stride(0), *out.stride(), *rotation,
            HEAD_DIM=d, BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_D=MERGE_COLUMNS,
            OUT_ROPE=0 if freqs is None else freqs.shape[0], num_warps=4, **pdl_options(),
        )


def _rotation_arguments(
    positions: torch.Tensor | None, freqs: torch.Tensor | None, unused: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """The kernels' (positions, freqs, position strides over B and S, freqs' stride) for the
    output's inverse RoPE; ``unused`` as both pointers (and zero strides) without it."""
    if positions is None:
        return unused, unused, 0, 0, 0
    return positions, freqs, positions.stride(0), positions.stride(1), freqs.stride(0)


@triton.jit
def _columns(HEAD_DIM: tl.constexpr, COL_TILES: tl.constexpr, TILE_W: tl.constexpr, TILE: tl.constexpr):
    """The head-dim column of each of the kernel's COL_TILES * TILE_W columns (``t * TILE + i`` for
    column ``t * TILE_W + i``) and whether it is one (i < TILE, column < HEAD_DIM)."""
    c = tl.arange(0, COL_TILES * TILE_W)
    if TILE_W == TILE:
        return c, c < HEAD_DIM
    cols = (c // TILE_W) * TILE + c % TILE_W
    return cols, (c % TILE_W < TILE) & (cols < HEAD_DIM)


@triton.jit
def _e4m3_to_f32(codes):
    """e4m3 codes (uint8) -> exact fp32: the hardware conversion on the GPU; integer arithmetic in
    the interpreter (whose float8 cast decodes the NaN codes 0x7F / 0xFF as 480)."""
    if INTERPRETED:
        return _e4m3_value(codes.to(tl.int32))
    return codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _load_rows(rows, valid, stride_kd, dtype: tl.constexpr, KV_FP8: tl.constexpr, HEAD_DIM: tl.constexpr,
               ROPE_DIM: tl.constexpr, TILE: tl.constexpr, COL_TILES: tl.constexpr, TILE_W: tl.constexpr,
               ROW_ALIGN: tl.constexpr):
    """The rows at pointers ``rows`` [R] as an [R, COL_TILES * TILE_W] ``dtype`` tile in the
    kernel's column space (:func:`_columns`); 0 in rows not ``valid`` and in padding columns.

    Dense rows are loaded as they are. An FP8 record ``[e4m3 nope | bf16 rope | e8m0 per tile |
    pad]`` (v4_ops.md §12) is decoded as :func:`..kv_unpack.kv_cache_unpack` does, on an [R,
    COL_TILES, TILE_W] brick: column t * TILE + i < NOPE is ``e4m3(byte) * 2^(e_t - 127)`` (byte
    ``t * TILE + i``, exponent byte ``NOPE + 2 ROPE + t``, one load per row and tile) rounded to
    bf16; column NOPE + j is the little-endian bf16 at bytes NOPE + 2j, NOPE + 2j + 1, as bits.
    """
    if KV_FP8:
        tile = _decode_records(rows, valid, stride_kd, HEAD_DIM, ROPE_DIM, TILE, COL_TILES, TILE_W, ROW_ALIGN)
    else:
        cols, col_ok = _columns(HEAD_DIM, COL_TILES, TILE_W, TILE)
        tile = tl.load(rows[:, None] + cols[None, :] * stride_kd, mask=valid[:, None] & col_ok[None, :], other=0.0)
    return tile.to(dtype)


@triton.jit
def _decode_records(rows, valid, stride_kd, HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, TILE: tl.constexpr,
                    COL_TILES: tl.constexpr, TILE_W: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """The FP8 records at ``rows`` [R] decoded to bf16 [R, COL_TILES * TILE_W] (see :func:`_load_rows`)."""
    NOPE: tl.constexpr = HEAD_DIM - ROPE_DIM
    N_TILES: tl.constexpr = NOPE // TILE
    t = tl.arange(0, COL_TILES)
    i = tl.arange(0, TILE_W)
    col = t[:, None] * TILE + i[None, :]  # [COL_TILES, TILE_W] head-dim columns
    is_nope = (t[:, None] < N_TILES) & (i[None, :] < TILE)
    codes = tl.load(rows[:, None, None] + col[None] * stride_kd, mask=valid[:, None, None] & is_nope[None], other=0)
    SCALES: tl.constexpr = NOPE + 2 * ROPE_DIM  # byte offset of the tile exponents
    scale_mask = valid[:, None] & (t < N_TILES)[None, :]
    if ROW_ALIGN % 4 == 0 and SCALES % 4 == 0:  # as 4-byte words, which the pipeliner can prefetch
        words = (rows + SCALES).to(tl.pointer_type(tl.int32))
        word = tl.load(words[:, None] + (t // 4)[None, :], mask=scale_mask, other=127 * 0x01010101)
        exponent = (word >> (8 * (t % 4))[None, :]) & 0xFF
    else:
        exponent = tl.load(rows[:, None] + (SCALES + t)[None, :] * stride_kd, mask=scale_mask, other=127).to(tl.int32)
    values = _e4m3_to_f32(codes) * _e8m0_scale(exponent)[:, :, None]
    for r in tl.static_range((ROPE_DIM + TILE - 1) // TILE):  # the brick tiles holding rope (V4: one)
        j = r * TILE + i  # rope columns of brick tile N_TILES + r
        rope_mask = valid[:, None] & ((i < TILE) & (j < ROPE_DIM))[None, :]
        if ROW_ALIGN % 2 == 0 and NOPE % 2 == 0:  # 2-byte aligned words: one load each
            words = (rows + NOPE).to(tl.pointer_type(tl.int16))
            bits = tl.load(words[:, None] + j[None, :], mask=rope_mask, other=0).to(tl.int32) & 0xFFFF
        else:
            rope_bytes = rows[:, None] + (NOPE + 2 * j)[None, :] * stride_kd
            low = tl.load(rope_bytes, mask=rope_mask, other=0).to(tl.int32)
            high = tl.load(rope_bytes + stride_kd, mask=rope_mask, other=0).to(tl.int32)
            bits = (high << 8) | low
        rope = (bits << 16).to(tl.float32, bitcast=True)[:, None, :]
        values = tl.where((t == N_TILES + r)[None, :, None], rope, values)
    return tl.reshape(_hide_byte_loads(cast_rne(values, tl.bfloat16)), [values.shape[0], COL_TILES * TILE_W])


@triton.jit
def _hide_byte_loads(x):
    """bf16 ``x`` unchanged; on the GPU through an opaque register move.

    Triton (seen in 3.9) lays a dot's operands out for the narrowest load in their elementwise
    backward slice: the decoded tile's uint8 record loads would make both dots' bf16 operands
    8-bit style (kWidth 4), read from shared memory by 64-bit loads plus register shuffles instead
    of ldmatrix, with a second shared copy of the tile. The move (one per two values) ends that
    slice: in the sm_90 SASS of a [32, 512] step, 1911 -> 1567 instructions, 102 -> 71 KB shared.
    """
    if INTERPRETED:
        return x
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.bfloat16, is_pure=False, pack=2)


@triton.jit
def _sparse_attention_kernel(
    q_ptr, kv_ptr, idx_ptr, sink_ptr, out_ptr, part_ptr, stats_ptr, S, H, N, K, SPLITS, SPLIT_SLOTS,
    softmax_scale,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_ib, stride_is, stride_ik,
    stride_sink,
    stride_ob, stride_os, stride_oh, stride_od,
    pos_ptr, freq_ptr, stride_pb, stride_ps, stride_f,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, COL_TILES: tl.constexpr,
    TILE_W: tl.constexpr, LOW_PRECISION_DOT: tl.constexpr, KV_FP8: tl.constexpr, ROPE_DIM: tl.constexpr,
    TILE: tl.constexpr, ROW_ALIGN: tl.constexpr, SPLIT: tl.constexpr, OUT_ROPE: tl.constexpr = 0,
    PDL: tl.constexpr = False,
):
    """out[b, s, heads] for one (b, s) and BLOCK_H heads, every column; kv rows dense, or FP8
    records decoded by :func:`_load_rows` (KV_FP8). Program ids run over (b * S + s, split, head
    block), the head block fastest, so a query's head blocks run together and share its rows in
    L2. With SPLIT, program (b, s, split) walks index slots [split * SPLIT_SLOTS, (split + 1) *
    SPLIT_SLOTS) only and writes its fp32 acc to ``part_ptr`` [B*S, SPLITS, H, D] and its running
    max and sum to ``stats_ptr`` [2, B*S, SPLITS, H] for :func:`_combine_splits_kernel`. OUT_ROPE
    pairs: the stored output rotated back (:func:`_rotated_back`)."""
    wait_for_prior_grid(PDL)
    pid = tl.program_id(0).to(tl.int64)
    head_blocks = tl.cdiv(H, BLOCK_H)
    row = pid // head_blocks  # (b * S + s) * SPLITS + split: the workspace row
    pid_bs = row // SPLITS
    first = (row % SPLITS) * SPLIT_SLOTS
    end = tl.minimum(K, first + SPLIT_SLOTS)
    bat = pid_bs // S
    seq = pid_bs % S
    heads = (pid % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < H
    cols, col_ok = _columns(HEAD_DIM, COL_TILES, TILE_W, TILE)
    offs_n = tl.arange(0, BLOCK_N)
    q_rows = q_ptr + bat * stride_qb + seq * stride_qs + heads[:, None] * stride_qh
    q = tl.load(q_rows + cols[None, :] * stride_qd, mask=head_ok[:, None] & col_ok[None, :], other=0.0)
    idx_row = idx_ptr + bat * stride_ib + seq * stride_is

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)  # running max of the logits
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)  # running sum of exp(s - m_i)
    acc = tl.zeros((BLOCK_H, COL_TILES * TILE_W), dtype=tl.float32)
    for start in range(first, end, BLOCK_N):
        slots = start + offs_n
        idx = tl.load(idx_row + slots * stride_ik, mask=slots < end, other=-1).to(tl.int64)
        valid = (idx >= 0) & (idx < N)
        rows = kv_ptr + tl.multiple_of(bat * stride_kb + idx * stride_kn, ROW_ALIGN)
        kv = _load_rows(rows, valid, stride_kd, q_ptr.dtype.element_ty, KV_FP8, HEAD_DIM, ROPE_DIM, TILE,
                        COL_TILES, TILE_W, ROW_ALIGN)
        logits = exact_dot(q, tl.trans(kv), tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32), LOW_PRECISION_DOT)
        logits = tl.where(valid[None, :], logits * softmax_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: nothing to shift
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(logits - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = exact_dot(cast_rne(p, kv.dtype), kv, acc * alpha[:, None], LOW_PRECISION_DOT)
        m_i = m_new

    out_mask = head_ok[:, None] & col_ok[None, :]
    out = out_ptr + bat * stride_ob + seq * stride_os + heads[:, None] * stride_oh + cols[None, :] * stride_od
    if SPLIT:
        workspace_rows = tl.num_programs(0).to(tl.int64) // head_blocks  # B * S * SPLITS
        tl.store(part_ptr + (row * H + heads[:, None]) * HEAD_DIM + cols[None, :], acc, mask=out_mask)
        tl.store(stats_ptr + row * H + heads, m_i, mask=head_ok)
        tl.store(stats_ptr + (workspace_rows + row) * H + heads, l_i, mask=head_ok)
    else:
        _normalise_and_store(acc, m_i, l_i, sink_ptr, stride_sink, heads, head_ok, out, out_mask, cols,
                             pos_ptr + bat * stride_pb + seq * stride_ps, freq_ptr, stride_f, HEAD_DIM, OUT_ROPE)


@triton.jit
def _normalise_and_store(
    acc, m_i, l_i, sink_ptr, stride_sink, heads, head_ok, out, out_mask, cols, pos_at, freq_ptr, stride_f,
    HEAD_DIM: tl.constexpr, OUT_ROPE: tl.constexpr,
):
    """Store ``acc / (l + exp(sink - m))`` (0 where that denominator is 0: no key and a -inf sink)
    through the pointers ``out``; acc [X, C], m and l [X] for the heads ``heads`` [X]; m is the max
    over the keys only (-inf without any). With OUT_ROPE pairs, that output rounded to out's dtype
    and rotated back by the position at ``pos_at`` (:func:`_rotated_back`; ``cols``: the head-dim
    column of each of the C)."""
    sink = tl.load(sink_ptr + heads * stride_sink, mask=head_ok, other=float("-inf")).to(tl.float32)
    denominator = l_i + tl.exp(sink - tl.where(m_i == float("-inf"), 0.0, m_i))
    o = tl.where(denominator[:, None] > 0, acc / tl.where(denominator > 0, denominator, 1.0)[:, None], 0.0)
    if OUT_ROPE > 0:
        o = cast_rne(o, out.dtype.element_ty).to(tl.float32)
        o = _rotated_back(o, cols, tl.load(pos_at).to(tl.float32), freq_ptr, stride_f, HEAD_DIM - 2 * OUT_ROPE)
    tl.store(out, cast_rne(o, out.dtype.element_ty), mask=out_mask)


@triton.jit
def _rotated_back(o, cols, pos, freq_ptr, stride_f, NOPE: tl.constexpr):
    """o [X, C] fp32 with the head-dim columns from NOPE on rotated in interleaved pairs by
    ``-pos * f_i`` (pair i: columns NOPE + 2i, NOPE + 2i + 1): ``(a cos - b sin, a sin + b cos)``,
    the arithmetic of rope's kernel with INVERSE. ``cols`` [C]: each column's head-dim index, the
    two of a pair adjacent (an even column, then the next); other columns pass through."""
    X: tl.constexpr = o.shape[0]
    C: tl.constexpr = o.shape[1]
    a, b = tl.split(tl.reshape(o, (X, C // 2, 2)))
    first, _ = tl.split(tl.reshape(cols, (C // 2, 2)))  # each pair's even column
    live = first >= NOPE
    theta = pos * tl.load(freq_ptr + (first - NOPE) // 2 * stride_f, mask=live, other=0.0).to(tl.float32)
    theta = -theta
    cos = tl.cos(theta)[None, :]
    sin = tl.sin(theta)[None, :]
    rotated = tl.join(tl.where(live[None, :], a * cos - b * sin, a), tl.where(live[None, :], a * sin + b * cos, b))
    return tl.reshape(rotated, (X, C))


@triton.jit
def _combine_splits_kernel(
    part_ptr, stats_ptr, sink_ptr, out_ptr, S, H, SPLITS, stride_sink,
    stride_ob, stride_os, stride_oh, stride_od,
    pos_ptr, freq_ptr, stride_pb, stride_ps, stride_f,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    OUT_ROPE: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """out[b, s, heads, cols] from the SPLITS partials of :func:`_sparse_attention_kernel`; program
    ((b * S + s) * ceil(H / BLOCK_H) + head block, column block). ``M = max_i m_i``, ``acc = sum_i
    acc_i e^(m_i - M)``, ``l = sum_i l_i e^(m_i - M)``, summed over BLOCK_S splits at a time, then
    normalised with the sink as the unsplit kernel does."""
    wait_for_prior_grid(PDL)
    pid = tl.program_id(0).to(tl.int64)
    head_blocks = tl.cdiv(H, BLOCK_H)
    pid_bs = pid // head_blocks
    heads = (pid % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < H
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM
    offs_s = tl.arange(0, BLOCK_S)
    first = pid_bs * SPLITS  # this query's first workspace row
    queries = tl.num_programs(0).to(tl.int64) // head_blocks
    max_rows = stats_ptr + first * H + heads[None, :]  # m_i of split i at max_rows + i * H: [1, BLOCK_H]
    sum_rows = max_rows + queries * SPLITS * H  # the running sums follow

    m = tl.full((BLOCK_S, BLOCK_H), float("-inf"), tl.float32)
    for i0 in range(0, SPLITS, BLOCK_S):
        split = (i0 + offs_s)[:, None]
        m = tl.maximum(m, tl.load(max_rows + split * H, mask=(split < SPLITS) & head_ok[None, :], other=float("-inf")))
    m = tl.max(m, axis=0)  # [BLOCK_H]
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # no valid key in any split: every weight is 0
    l = tl.zeros((BLOCK_S, BLOCK_H), dtype=tl.float32)
    acc = tl.zeros((BLOCK_S, BLOCK_H, BLOCK_D), dtype=tl.float32)
    for i0 in range(0, SPLITS, BLOCK_S):
        split = (i0 + offs_s)[:, None]
        rows_ok = (split < SPLITS) & head_ok[None, :]
        weight = tl.exp(tl.load(max_rows + split * H, mask=rows_ok, other=float("-inf")) - m_safe[None, :])
        l += tl.load(sum_rows + split * H, mask=rows_ok, other=0.0) * weight
        part = part_ptr + (((first + split) * H + heads[None, :]) * HEAD_DIM)[:, :, None] + cols[None, None, :]
        acc += tl.load(part, mask=rows_ok[:, :, None] & col_ok[None, None, :], other=0.0) * weight[:, :, None]
    bat, seq = pid_bs // S, pid_bs % S
    out = out_ptr + bat * stride_ob + seq * stride_os + heads[:, None] * stride_oh
    _normalise_and_store(tl.sum(acc, axis=0), m, tl.sum(l, axis=0), sink_ptr, stride_sink, heads, head_ok,
                         out + cols[None, :] * stride_od, head_ok[:, None] & col_ok[None, :], cols,
                         pos_ptr + bat * stride_pb + seq * stride_ps, freq_ptr, stride_f, HEAD_DIM, OUT_ROPE)


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
