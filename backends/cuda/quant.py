"""Triton quantisers (ops ``fp8_act_quant``, ``fp4_quant``, ``kv_cache_pack``, ``kv_cache_store``,
``index_key_pack``; v4_ops.md §11-12) and the indexer's rotation with its FP4 rounding (op
``hadamard_rotate``, §8, §11.6).

Memory-bound and elementwise within a tile: each program loads a [BLOCK_M rows, TILES tiles,
block] brick (tiles padded to a power of two and masked), reduces ``amax`` per tile, and writes
codes and scales. No host synchronisation; launch shapes come from :func:`quant_launch`.

The arithmetic is the reference's, bit for bit: fp32 ``s = max(amax, floor) / qmax`` by a correctly
rounded division (``div_rn``; Triton's ``/`` is approximate on the GPU), a ue8m0 scale rounded up
to a power of two by its bits, ``x / s`` as ``x * 2^-k`` (exact for a power of two) or by
``div_rn`` for fp32 scales, then round to nearest even. The FP8 tile quantiser and the RNE casts
(the hardware's on a GPU, integer arithmetic under the Triton interpreter, whose casts do not
round) are shared with the other kernels in :mod:`._numerics`. NaN inputs are not handled
(``tl.max`` drops them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seahal.hal.formats import FP4_TILE, index_key_bytes, scatter_rows
from seahal.hal.ops.quant import kv_record_bytes

from ._cache_keys import settle_cache_keys
from ._e2m1 import decode_e2m1
from ._host import cdiv, next_power_of_2
from ._numerics import INTERPRETED, cast_rne, exact_dot, fp8_quantize_tiles, pow2_ceil
from ._pdl import pdl_options, wait_for_prior_grid
from .rope import rms_norm_rope, rms_norm_then_rope, rope

FP4_MAX = tl.constexpr(6.0)
FP4_AMAX_FLOOR = tl.constexpr(6.0 * 2.0**-126)

ELEMENTS_PER_PROGRAM = 4096
"""Target brick size: 8 KB of bf16 (16 KB of fp32) in flight per program, 32 elements per thread
at 4 warps — enough outstanding 16-byte loads per SM to approach HBM bandwidth, with many
programs per SM for latency hiding. Not measured yet (TUNING.md)."""
MAX_COLUMNS = 1024
"""At most this many columns per program, so that few-row calls (decode) still spread over SMs."""


def quant_launch(rows: int, n_tiles: int, block: int) -> tuple[int, int, int]:
    """(BLOCK_M, TILES, grid) for ``rows`` x ``n_tiles`` tiles of ``block`` elements.

    TILES = tiles per program (a power of two, up to MAX_COLUMNS columns), BLOCK_M = rows per program
    filling ELEMENTS_PER_PROGRAM; grid = (row blocks, tile groups).
    """
    width = next_power_of_2(block)
    tiles = min(next_power_of_2(n_tiles), max(1, MAX_COLUMNS // width))
    block_m = min(next_power_of_2(rows), max(1, ELEMENTS_PER_PROGRAM // (tiles * width)))
    return block_m, tiles, (cdiv(rows, block_m), cdiv(n_tiles, tiles))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, K] with unit stride along K: a view when the leading dims collapse, else a copy."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def fp8_act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 quant in 1 x block_size tiles along the last dim.

    x: [..., K] bf16/fp16/fp32/fp64 -> q: [..., K] float8_e4m3fn, scale: [..., K/block_size] fp32.
    Per tile: ``s = max(amax, 1e-4) / 448`` (ue8m0: ``2^ceil(log2 s)``),
    ``q = e4m3_rne(clamp(x / s, -448, 448))``.
    """
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.float32, device=x.device)
    _launch_fp8_quant(x, q, scale, block_size, ue8m0=scale_fmt == "ue8m0", round_trip=False)
    return q, scale


def fp8_round_trip(x: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """The values an FP8 GEMM takes for x, as bf16: ``bf16(q * s)`` of :func:`fp8_act_quant`'s
    ue8m0 tiles, exactly (s = 2^k with k >= -22 by the amax floor, so every ``q * s`` is a normal
    bf16 value). x: [..., K] float -> [..., K] bf16. Lets a GEMM over FP4 weights widen no
    activation code and scale no block product in its loop (``moe_experts``' ``round_trip``)."""
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    _launch_fp8_quant(x, out, out, block_size, ue8m0=True, round_trip=True)
    return out


def _launch_fp8_quant(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block_size: int, ue8m0: bool,
                      round_trip: bool) -> None:
    """:func:`_fp8_act_quant_kernel` over x's rows into q (codes, or with ``round_trip`` the bf16
    values) and scale (unused with ``round_trip``)."""
    n_tiles = x.shape[-1] // block_size
    x2 = _rows(x)
    if x2.numel() == 0:
        return
    block_m, tiles, grid = quant_launch(x2.shape[0], n_tiles, block_size)
    _fp8_act_quant_kernel[grid](
        x2, q, scale, x2.shape[0], n_tiles, x2.stride(0),
        BLOCK=block_size, BLOCK_P2=next_power_of_2(block_size), BLOCK_M=block_m, TILES=tiles,
        UE8M0=ue8m0, ROUND_TRIP=round_trip, **pdl_options(),
    )


def fp4_quant(x: torch.Tensor, block_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 e2m1 quant in 1 x block_size tiles with ue8m0 scales, two codes per byte.

    x: [..., K] float -> codes: [..., K/2] uint8 (element 2i in the low nibble), scale:
    [..., K/block_size] fp32. Per tile: ``s = 2^ceil(log2(max(amax, 6·2^-126) / 6))``,
    ``code = e2m1_rne(clamp(x / s, -6, 6))``, ties to the even code.
    """
    k = x.shape[-1]
    n_tiles = k // block_size
    codes = torch.empty((*x.shape[:-1], k // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((*x.shape[:-1], n_tiles), dtype=torch.float32, device=x.device)
    x2 = _rows(x)
    if x2.numel() == 0:
        return codes, scale
    block_m, tiles, grid = quant_launch(x2.shape[0], n_tiles, block_size)
    _fp4_quant_kernel[grid](
        x2, codes, scale, x2.shape[0], n_tiles, x2.stride(0),
        BLOCK=block_size, BLOCK_P2=next_power_of_2(block_size), BLOCK_M=block_m, TILES=tiles, **pdl_options(),
    )
    return codes, scale


def index_key_pack(keys: torch.Tensor, key_format: str) -> torch.Tensor:
    """Indexer keys [..., d] as the records ``indexer_topk_packed`` reads, one launch.

    ``"fp4"``: ``[e2m1 codes, two a byte | e8m0 byte per 32-block]`` (fp4_quant's codes and
    scales); ``"fp8"``: ``[e4m3 codes | the key's fp32 scale, little-endian]`` (fp8_act_quant with
    one ue8m0 tile per key). One program packs BLOCK_M whole keys.
    """
    out = torch.empty((*keys.shape[:-1], index_key_bytes(keys.shape[-1], key_format)), dtype=torch.uint8,
                      device=keys.device)
    _launch_index_key_pack(_rows(keys), out, key_format)
    return out


def index_key_store(keys: torch.Tensor, store: torch.Tensor, slots: torch.Tensor, key_format: str) -> None:
    """:func:`index_key_pack` whose records go straight to their rows: ``store[b, slots[b, i]] =
    record(keys[b, i])``, one launch where packing then scattering takes two (a decode step's new
    indexer key this way). keys: [B, S, d] bf16/fp32, store: [B, N, record] uint8 (records
    contiguous), slots: [B or 1, S] int32/int64; a slot outside [0, N) is not written."""
    if store.stride(-1) != 1:  # records not contiguous
        return index_key_pack_then_scatter(keys, store, slots, key_format)
    _launch_index_key_pack(_rows(keys), store, key_format, _destination(slots, keys.shape[1], store))


def index_key_pack_then_scatter(keys: torch.Tensor, store: torch.Tensor, slots: torch.Tensor, key_format: str) -> None:
    """The ``index_key_store`` contract as :func:`index_key_pack`'s kernel, then torch's scatter into
    the rows: two launches, the pack verified on a GPU where the storing launch is not yet."""
    scatter_rows(store, slots, index_key_pack(keys, key_format))


def _launch_index_key_pack(x2: torch.Tensor, out: torch.Tensor, key_format: str, destination: dict | None = None) -> None:
    """One ``_index_key_pack_kernel`` launch over the keys x2 [M, d]: record i to row i of out, or
    with ``destination`` (:func:`_destination`) to its store row."""
    if x2.shape[0] == 0:
        return
    d = x2.shape[-1]
    fp4 = key_format == "fp4"
    block = FP4_TILE if fp4 else d
    tiles = next_power_of_2(d // block)
    block_m = min(next_power_of_2(x2.shape[0]), max(1, ELEMENTS_PER_PROGRAM // (tiles * next_power_of_2(block))))
    _index_key_pack_kernel[(cdiv(x2.shape[0], block_m),)](
        x2, out, x2.shape[0], x2.stride(0),
        N_TILES=d // block, BLOCK=block, BLOCK_P2=next_power_of_2(block), TILES=tiles, BLOCK_M=block_m,
        RECORD=index_key_bytes(d, key_format), FP4=fp4, **(destination or {}), **pdl_options(),
    )


def slot_rows(slots: torch.Tensor, store: torch.Tensor) -> dict:
    """The kernel arguments that put record i of sequence b at row ``slots[b, i]`` of store [B, N,
    record]: the slots' pointer and strides (batch stride 0 for one row the batch shares) and the
    store's row strides (the store ops' kernels and the compressor's)."""
    return {"slot_ptr": slots, "stride_sb": slots.stride(0) if slots.shape[0] > 1 else 0,
            "stride_sn": slots.stride(1), "stride_ob": store.stride(0), "stride_or": store.stride(1)}


def _destination(slots: torch.Tensor, n: int, store: torch.Tensor) -> dict:
    """A store op's row arguments for :func:`_record_rows`: each sequence's n slots into store [B, N, record]."""
    return {**slot_rows(slots, store), "N": n, "R": store.shape[1]}


ROTATION_TILE = 128
"""Columns of H a program multiplies at a time (K) and writes (N; wider when an FP4 block is):
V4 rotates 128-vectors, one [rows, 128] @ [128, 128] product a program."""
ROTATION_ROWS = 64
"""Rows a program rotates: the MMA's M. A decode step's indexer query (64 heads) is one program."""
FP32_ROTATION = (16, 32)
"""(rows, K step) for fp32 x, whose IEEE products run on the CUDA cores: small enough not to spill
(64 rows x 128-wide steps spill 22 KB in the sm_90 compile)."""


def hadamard_rotate(
    x: torch.Tensor, fp4_block: int = 0, positions: torch.Tensor | None = None, freqs: torch.Tensor | None = None
) -> torch.Tensor:
    """The orthonormal Hadamard rotation of the last dim, rounded through FP4 when ``fp4_block``.

    x: [..., n] bf16/fp32, n a power of two -> [..., n] in x's dtype. ``y = x @ H_n * n^-0.5``
    rounded to x's dtype, H generated in registers (``(-1)^popcount(k & c)``) and the products
    exact (bf16 MMA, or IEEE fp32), summed in fp32; with ``fp4_block`` y is then quantised to e2m1
    in 1 x fp4_block ue8m0 blocks and decoded, as ``fp4_quant`` then its decode: one launch where
    the reference takes eight (the indexer runs this on its query every decode step). With
    ``positions`` [B, S] and ``freqs`` [R] (x [B, S, H, n]) each K step's RoPE columns are rotated
    first, as rope's kernel does (fp32, its operand order, rounded to x's dtype): the indexer's
    query RoPE in the same launch.
    """
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x2 = _rows(x)
    if x2.numel() == 0:
        return out
    width = max(n, 16)  # tl.dot's smallest K and N: H_16's top-left n x n block is H_n
    rows, k_step = FP32_ROTATION if x.dtype == torch.float32 else (ROTATION_ROWS, ROTATION_TILE)
    block_n = min(width, max(ROTATION_TILE, fp4_block))
    block_m = min(rows, max(16, next_power_of_2(x2.shape[0])))
    rotation = {}
    if positions is not None:  # ONE_TOKEN: every program's rows are heads of one token (V4: 64 heads, 64 rows)
        rotation = {"pos_ptr": positions, "freq_ptr": freqs, "S": x.shape[1], "H": x.shape[2],
                    "stride_pb": positions.stride(0), "stride_ps": positions.stride(1), "stride_f": freqs.stride(0),
                    "ROPE_FROM": n - 2 * freqs.shape[0], "ONE_TOKEN": x.shape[2] % block_m == 0}
    _hadamard_rotate_kernel[(cdiv(x2.shape[0], block_m), width // block_n)](
        x2, out, x2.shape[0], n, x2.stride(0), n**-0.5,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(width, k_step), WIDTH=width,
        INDEX_BITS=width.bit_length() - 1, FP4_BLOCK=fp4_block,
        LOW_PRECISION=x.dtype == torch.bfloat16 and not INTERPRETED, **rotation, **pdl_options(),
    )
    return out


def rope_then_hadamard_rotate(
    x: torch.Tensor, fp4_block: int = 0, positions: torch.Tensor | None = None, freqs: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``hadamard_rotate`` contract as rope's kernel then the rotation's, both verified on a GPU
    (two launches with positions, where the rotating one is not yet)."""
    return hadamard_rotate(x if positions is None else rope(x, positions, freqs), fp4_block)


def kv_cache_pack(kv: torch.Tensor, rope_dim: int = 64, tile: int = 64) -> torch.Tensor:
    """Pack KV vectors into FP8 cache records (584 bytes for V4's dim 512, rope 64, tile 64).

    kv: [..., dim] bf16/fp16/fp32 -> [..., record] uint8, each record
    ``[e4m3(nope / s_t) per tile t | rope as bf16 bytes | e8m0(s_t) per tile | zero pad to 8]``,
    nope = kv[..., :dim - rope_dim] quantised as fp8_act_quant with ue8m0 scales.
    One program packs BLOCK_M whole records.
    """
    out = torch.empty((*kv.shape[:-1], kv_record_bytes(kv.shape[-1], rope_dim, tile)), dtype=torch.uint8, device=kv.device)
    _launch_kv_pack(_rows(kv), out, rope_dim, tile)
    return out


def kv_cache_store(
    kv: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, rope_dim: int = 64, tile: int = 64,
    positions: torch.Tensor | None = None, freqs: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> None:
    """:func:`kv_cache_pack` whose records go straight to their rows: ``cache[b, slots[b, i]] =
    record(v[b, i])``, one launch where packing then scattering takes two (a decode step writes
    every layer's KV to its ring slot this way); v is kv, or with ``positions`` its
    ``rms_norm_rope`` (the attention's KV path) formed in the same program.

    kv: [B, S, D] bf16/fp16/fp32, cache: [B, N, record] uint8 (records contiguous), slots: [B or
    1, S] int32/int64, positions: [B, S] int, freqs: [R] fp32. A program packs BLOCK_M records as
    :func:`kv_cache_pack` does and stores each at its slot's row; a slot outside [0, N) is not
    written. Normalised, each vector is read whole once: ``sum(x^2)`` over its tiles and RoPE
    dims (fp32), then ``x * rsqrt(mean + eps) * w`` rounded to kv's dtype as ``rms_norm``'s kernel
    does, the RoPE pairs rotated as ``rope``'s kernel does and rounded again, then packed. A
    rotation that is not of the record's RoPE dims (2R != rope_dim) runs ``rms_norm_rope`` first."""
    if positions is not None and 2 * freqs.shape[0] != rope_dim:
        kv = rms_norm_rope(kv.unsqueeze(2), norm_weight, norm_eps, positions, freqs).squeeze(2)
        positions = None
    if cache.stride(-1) != 1:  # records not contiguous
        return kv_cache_pack_then_scatter(kv, cache, slots, rope_dim, tile, positions, freqs, norm_weight, norm_eps)
    destination = _destination(slots, kv.shape[1], cache)
    if positions is not None:
        destination |= {"pos_ptr": positions, "freq_ptr": freqs, "w_ptr": norm_weight, "eps": float(norm_eps),
                        "stride_pb": positions.stride(0), "stride_ps": positions.stride(1), "stride_f": freqs.stride(0),
                        "NORM_ROPE": True}
    _launch_kv_pack(_rows(kv), cache, rope_dim, tile, destination)


def kv_cache_pack_then_scatter(
    kv: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, rope_dim: int = 64, tile: int = 64,
    positions: torch.Tensor | None = None, freqs: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> None:
    """The ``kv_cache_store`` contract as kernels verified on a GPU in turn: with positions the
    ``rms_norm`` and ``rope`` kernels, then :func:`kv_cache_pack`'s, then torch's scatter into the
    rows (where the one storing launch is not yet verified)."""
    if positions is not None:
        kv = rms_norm_then_rope(kv.unsqueeze(2), norm_weight, norm_eps, positions, freqs).squeeze(2)
    scatter_rows(cache, slots, kv_cache_pack(kv, rope_dim, tile))


def _launch_kv_pack(kv2: torch.Tensor, out: torch.Tensor, rope_dim: int, tile: int, destination: dict | None = None) -> None:
    """One ``_kv_cache_pack_kernel`` launch over the rows of kv2 [M, dim]: record i to row i of out,
    or, with ``destination`` (the slots and strides of :func:`kv_cache_store`, and what normalises
    and rotates the vectors), to its cache row."""
    if kv2.shape[0] == 0:
        return
    dim = kv2.shape[-1]
    nope = dim - rope_dim
    record = kv_record_bytes(dim, rope_dim, tile)
    scale_bytes = record - nope - 2 * rope_dim
    slots = next_power_of_2(scale_bytes)  # >= n_tiles: one lane per scale byte and per tile
    block_m = min(next_power_of_2(kv2.shape[0]), max(1, ELEMENTS_PER_PROGRAM // next_power_of_2(dim)))
    _kv_cache_pack_kernel[(cdiv(kv2.shape[0], block_m),)](
        kv2, out, kv2.shape[0], kv2.stride(0),
        N_TILES=nope // tile, TILE=tile, TILE_P2=next_power_of_2(tile), SLOTS=slots,
        SCALE_BYTES=scale_bytes, ROPE=rope_dim, ROPE_P2=next_power_of_2(max(rope_dim, 1)),
        RECORD=record, BLOCK_M=block_m, **(destination or {}), **pdl_options(),
    )


# --------------------------------------------------------------------------------------------
# Device functions
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_brick(rows, tiles, M, N_TILES, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr):
    """Element offsets [BLOCK_M, TILES, BLOCK_P2] within a row of tiles, and the in-bounds mask."""
    cols = tl.arange(0, BLOCK_P2)
    k = tiles[None, :, None] * BLOCK + cols[None, None, :]
    mask = (rows < M)[:, None, None] & (tiles < N_TILES)[None, :, None] & (cols < BLOCK)[None, None, :]
    return k, mask


@triton.jit
def bf16_bytes(x):
    """x [...] fp32 -> its RNE bf16 as little-endian bytes [..., 2] uint8 (a record's RoPE dims)."""
    bits = cast_rne(x, tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
    return ((tl.expand_dims(bits, -1) >> (8 * tl.arange(0, 2))) & 0xFF).to(tl.uint8)


@triton.jit
def e8m0_bytes(s):
    """Power-of-two fp32 scales -> their e8m0 codes (the biased exponent) as int32 (a record's scales)."""
    return s.to(tl.int32, bitcast=True) >> 23


@triton.jit
def _fp4_quantize_tiles(x):
    """FP4 e2m1 quantisation of 1 x BLOCK tiles along the last axis (v4_ops.md §11.4).

    x: [..., BLOCK] fp32 (padding lanes zero) -> (codes [..., BLOCK] int32, s [...] fp32):
    ``s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6))`` (a correctly rounded division, then up to a
    power of two by its bits), ``code = e2m1_rne(clamp(x / s, -6, 6))`` with ``x / s`` as the exact
    ``x * 2^-k``."""
    s, inv = pow2_ceil(tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=-1), FP4_AMAX_FLOOR), FP4_MAX))
    return _e2m1_codes(tl.clamp(x * tl.expand_dims(inv, -1), -FP4_MAX, FP4_MAX)), s


@triton.jit
def _fp4_pairs(code):
    """e2m1 codes [M, T, B] (B even; padding lanes pair up too) -> bytes [M, T, B/2] uint8: elements
    2i and 2i+1 of a tile in the low and the high nibble of byte i."""
    even, odd = tl.split(tl.reshape(code, (code.shape[0], code.shape[1], code.shape[2] // 2, 2)))
    return (even | (odd << 4)).to(tl.uint8)


@triton.jit
def _e2m1_codes(v):
    """e2m1 codes 0..15 (int32, sign << 3 | magnitude index) of v in [-6, 6]: the index counts the
    midpoints below |v|, a midpoint itself going to the even index (ties to even)."""
    a = tl.abs(v)
    index = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
             + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
             + (a > 5.0).to(tl.int32))
    return index | ((v.to(tl.int32, bitcast=True) >> 28) & 0x8)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _fp8_act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, N_TILES, stride_xm,
    BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_M: tl.constexpr, TILES: tl.constexpr,
    UE8M0: tl.constexpr, ROUND_TRIP: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """Codes to q and scales to s; ROUND_TRIP: the bf16 values ``q * s`` to q instead (no s)."""
    wait_for_prior_grid(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tiles = tl.program_id(1) * TILES + tl.arange(0, TILES)
    k, mask = _tile_brick(rows, tiles, M, N_TILES, BLOCK, BLOCK_P2)
    rows64 = rows.to(tl.int64)[:, None, None]
    x = tl.load(x_ptr + rows64 * stride_xm + k, mask=mask, other=0.0).to(tl.float32)
    q, s = fp8_quantize_tiles(x, UE8M0)
    if ROUND_TRIP:  # exact: q * 2^k is a normal bf16 value
        tl.store(q_ptr + rows64 * (N_TILES * BLOCK) + k, (q.to(tl.float32) * s[:, :, None]).to(tl.bfloat16),
                 mask=mask)
    else:
        tl.store(q_ptr + rows64 * (N_TILES * BLOCK) + k, q, mask=mask)
        scale_mask = (rows < M)[:, None] & (tiles < N_TILES)[None, :]
        tl.store(s_ptr + rows.to(tl.int64)[:, None] * N_TILES + tiles[None, :], s, mask=scale_mask)


@triton.jit
def _fp4_quant_kernel(
    x_ptr, codes_ptr, s_ptr, M, N_TILES, stride_xm,
    BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_M: tl.constexpr, TILES: tl.constexpr, PDL: tl.constexpr = False,
):
    wait_for_prior_grid(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tiles = tl.program_id(1) * TILES + tl.arange(0, TILES)
    k, mask = _tile_brick(rows, tiles, M, N_TILES, BLOCK, BLOCK_P2)
    rows64 = rows.to(tl.int64)[:, None, None]
    x = tl.load(x_ptr + rows64 * stride_xm + k, mask=mask, other=0.0).to(tl.float32)
    code, s = _fp4_quantize_tiles(x)
    half, half_mask = _tile_brick(rows, tiles, M, N_TILES, BLOCK // 2, BLOCK_P2 // 2)
    tl.store(codes_ptr + rows64 * (N_TILES * BLOCK // 2) + half, _fp4_pairs(code), mask=half_mask)
    scale_mask = (rows < M)[:, None] & (tiles < N_TILES)[None, :]
    tl.store(s_ptr + rows.to(tl.int64)[:, None] * N_TILES + tiles[None, :], s, mask=scale_mask)


@triton.jit
def _kv_cache_pack_kernel(
    kv_ptr, out_ptr, M, stride_km,
    N_TILES: tl.constexpr, TILE: tl.constexpr, TILE_P2: tl.constexpr, SLOTS: tl.constexpr,
    SCALE_BYTES: tl.constexpr, ROPE: tl.constexpr, ROPE_P2: tl.constexpr, RECORD: tl.constexpr,
    BLOCK_M: tl.constexpr, slot_ptr=None, N=1, R=1, stride_sb=0, stride_sn=0, stride_ob=0, stride_or=0,
    pos_ptr=None, freq_ptr=None, w_ptr=None, eps=None, stride_pb=0, stride_ps=0, stride_f=0,
    NORM_ROPE: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """Records of BLOCK_M rows of kv [M, dim]: row i to ``out + i * RECORD``, or with ``slot_ptr``
    (rows of N per sequence) row ``b * N + j`` to ``out + b * stride_ob + slot[b, j] * stride_or``,
    a slot outside [0, R) not at all. NORM_ROPE (with slot_ptr): each row first normalised and its
    ROPE dims rotated at ``pos[b, j]`` (:func:`_normalised_and_rotated`)."""
    wait_for_prior_grid(PDL)
    NOPE: tl.constexpr = N_TILES * TILE
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    kv_row = kv_ptr + rows.to(tl.int64) * stride_km
    out_row, row_ok = _record_rows(out_ptr, rows, row_ok, RECORD, slot_ptr, N, R, stride_sb, stride_sn, stride_ob,
                                   stride_or)
    # nope: e4m3 codes with one ue8m0 scale per tile (slots >= N_TILES lanes, the rest masked)
    slots = tl.arange(0, SLOTS)
    k, mask = _tile_brick(rows, slots, M, N_TILES, TILE, TILE_P2)
    if slot_ptr is not None:
        mask = mask & row_ok[:, None, None]
    x = tl.load(kv_row[:, None, None] + k, mask=mask, other=0.0).to(tl.float32)
    j = tl.arange(0, ROPE_P2)
    rope_mask = row_ok[:, None] & (j < ROPE)[None, :]
    if NORM_ROPE:
        rope = tl.load(kv_row[:, None] + NOPE + j[None, :], mask=rope_mask, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + (rows // N) * stride_pb + (rows % N) * stride_ps, mask=row_ok, other=0).to(tl.float32)
        x, rope = _normalised_and_rotated(x, rope, k, mask, pos, freq_ptr, stride_f, w_ptr, eps, NOPE, ROPE, ROPE_P2,
                                          kv_ptr.dtype.element_ty)
    q, s = fp8_quantize_tiles(x, True)
    tl.store(out_row[:, None, None] + k, q.to(tl.uint8, bitcast=True), mask=mask)
    # rope: bf16 bytes, little-endian
    if not NORM_ROPE:
        rope = tl.load(kv_row[:, None] + NOPE + j[None, :], mask=rope_mask, other=0.0).to(tl.float32)
    byte = tl.arange(0, 2)[None, None, :]
    tl.store(out_row[:, None, None] + NOPE + 2 * j[None, :, None] + byte, bf16_bytes(rope), mask=rope_mask[:, :, None])
    # scales as e8m0 bytes, then zero padding to a multiple of 8
    e8m0 = tl.where((slots < N_TILES)[None, :], e8m0_bytes(s), 0).to(tl.uint8)
    scale_mask = row_ok[:, None] & (slots < SCALE_BYTES)[None, :]
    tl.store(out_row[:, None] + NOPE + 2 * ROPE + slots[None, :], e8m0, mask=scale_mask)


@triton.jit
def _record_rows(out_ptr, rows, row_ok, RECORD: tl.constexpr, slot_ptr, N, R, stride_sb, stride_sn, stride_ob, stride_or):
    """Where rows [BLOCK_M] of a pack go -> (their records' first bytes, which rows to write):
    record i at ``out + i * RECORD``, or with ``slot_ptr`` (rows of N per sequence) row ``b * N + j``
    at ``out + b * stride_ob + slot[b, j] * stride_or``, a slot outside [0, R) written nowhere."""
    if slot_ptr is None:
        out_row = out_ptr + rows.to(tl.int64) * RECORD
    else:
        seq = rows // N
        slot = tl.load(slot_ptr + seq * stride_sb + (rows % N) * stride_sn, mask=row_ok, other=-1).to(tl.int64)
        row_ok = row_ok & (slot >= 0) & (slot < R)
        out_row = out_ptr + seq.to(tl.int64) * stride_ob + slot * stride_or
    return out_row, row_ok


@triton.jit
def _normalised_and_rotated(
    x, rope, k, mask, pos, freq_ptr, stride_f, w_ptr, eps, NOPE: tl.constexpr, ROPE: tl.constexpr,
    ROPE_P2: tl.constexpr, dtype: tl.constexpr,
):
    """``rms_norm_rope`` of BLOCK_M vectors held as their nope tiles x [BLOCK_M, SLOTS, TILE_P2]
    (offsets k, masked lanes zero) and RoPE dims rope [BLOCK_M, ROPE_P2] (fp32): ``v * rsqrt(
    mean(v^2) + eps) (* w)`` rounded to ``dtype`` (rope's kernel's NORM arithmetic), then pair i of
    the RoPE dims rotated by ``pos * f_i`` in fp32 and rounded again (its rotation) -> (x, rope),
    the values the record packs, in fp32."""
    total = tl.sum(tl.sum(x * x, axis=2), axis=1) + tl.sum(rope * rope, axis=1)
    inverse_rms = tl.math.rsqrt(total / (NOPE + ROPE) + eps)
    x = x * inverse_rms[:, None, None]
    rope = rope * inverse_rms[:, None]
    if w_ptr is not None:
        x = x * tl.load(w_ptr + k, mask=mask, other=0.0).to(tl.float32)
        j = tl.arange(0, ROPE_P2)
        rope = rope * tl.load(w_ptr + NOPE + j, mask=j < ROPE, other=0.0).to(tl.float32)[None, :]
    x = cast_rne(x, dtype).to(tl.float32)
    a, b = tl.split(tl.reshape(cast_rne(rope, dtype).to(tl.float32), (rope.shape[0], ROPE_P2 // 2, 2)))
    pairs = tl.arange(0, ROPE_P2 // 2)
    theta = pos[:, None] * tl.load(freq_ptr + pairs * stride_f, mask=pairs < ROPE // 2, other=0.0).to(tl.float32)[None, :]
    cos = tl.cos(theta)
    sin = tl.sin(theta)
    rotated = tl.join(a * cos - b * sin, a * sin + b * cos)
    return x, cast_rne(tl.reshape(rotated, (rope.shape[0], ROPE_P2)), dtype).to(tl.float32)


@triton.jit
def _sylvester_signs(k, cols, dtype: tl.constexpr, INDEX_BITS: tl.constexpr):
    """H[k, c] = (-1)^popcount(k & c), the Sylvester Hadamard matrix's rows ``k`` and columns
    ``cols`` as an exact +-1 tile of ``dtype``: the parity of k & c folded into bit 0 by xor over
    the INDEX_BITS bits an index has."""
    v = k[:, None] & cols[None, :]
    if INDEX_BITS > 16:
        v ^= v >> 16
    if INDEX_BITS > 8:
        v ^= v >> 8
    if INDEX_BITS > 4:
        v ^= v >> 4
    if INDEX_BITS > 2:
        v ^= v >> 2
    if INDEX_BITS > 1:
        v ^= v >> 1
    return (1 - 2 * (v & 1)).to(tl.float32).to(dtype)  # through fp32: the interpreter's int -> bf16 is wrong


@triton.jit
def _hadamard_rotate_kernel(
    x_ptr, out_ptr, M, N, stride_xm, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WIDTH: tl.constexpr,
    INDEX_BITS: tl.constexpr, FP4_BLOCK: tl.constexpr, LOW_PRECISION: tl.constexpr,
    pos_ptr=None, freq_ptr=None, S=1, H=1, stride_pb=0, stride_ps=0, stride_f=0, ROPE_FROM: tl.constexpr = 0,
    ONE_TOKEN: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """out[rows, cols] = x[rows] @ H[:, cols] * scale for BLOCK_M rows and BLOCK_N columns (whole
    FP4 blocks), K in BLOCK_K steps over WIDTH = max(N, 16) (x is zero past N); then the rounding to
    out's dtype and, with FP4_BLOCK, the e2m1 quant-dequant of each block. With ``pos_ptr`` (rows
    of H heads, S tokens a sequence) columns from ROPE_FROM on are first RoPE-rotated in pairs
    (:func:`_roped`); ONE_TOKEN (BLOCK_M divides H): the program's rows share one position, whose
    angles are made once a column rather than once an element."""
    wait_for_prior_grid(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    if pos_ptr is not None:
        if ONE_TOKEN:
            token = tl.program_id(0) * BLOCK_M // H
            pos = tl.load(pos_ptr + (token // S) * stride_pb + (token % S) * stride_ps).to(tl.float32)
        else:
            token = rows // H
            pos = tl.load(pos_ptr + (token // S) * stride_pb + (token % S) * stride_ps, mask=row_ok, other=0)
            pos = pos.to(tl.float32)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, WIDTH, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k < N)[None, :], other=0.0)
        if pos_ptr is not None:
            x = _roped(x, x_rows, k, row_ok, N, pos, freq_ptr, stride_f, ROPE_FROM)
        acc = exact_dot(x, _sylvester_signs(k, cols, x.dtype, INDEX_BITS), acc, LOW_PRECISION)
    y = cast_rne(acc * scale, out_ptr.dtype.element_ty)
    if FP4_BLOCK > 0:
        code, s = _fp4_quantize_tiles(tl.reshape(y.to(tl.float32), (BLOCK_M, BLOCK_N // FP4_BLOCK, FP4_BLOCK)))
        y = cast_rne(tl.reshape(decode_e2m1(code) * s[:, :, None], (BLOCK_M, BLOCK_N)), out_ptr.dtype.element_ty)
    out = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, y, mask=row_ok[:, None] & (cols < N)[None, :])


@triton.jit
def _roped(x, x_rows, k, row_ok, N, pos, freq_ptr, stride_f, ROPE_FROM: tl.constexpr):
    """A K step's tile x [BLOCK_M, BLOCK_K] with its columns from ROPE_FROM on rotated as rope's
    kernel rotates interleaved pairs: column 2i + j of the rotated part (j = 0, 1) pairs with its
    neighbour k ^ 1 under ``theta = pos * f_i`` (fp32; pos [BLOCK_M, 1] or one for all rows),
    ``a cos - b sin`` and ``a sin + b cos`` for the pair (a, b), rounded to x's dtype; other
    columns as they are."""
    roped = (k >= ROPE_FROM) & (k < N)
    partner = tl.load(x_rows + (k ^ 1)[None, :], mask=row_ok[:, None] & roped[None, :], other=0.0).to(tl.float32)
    pair = tl.where(roped, (k - ROPE_FROM) // 2, 0)
    theta = pos * tl.load(freq_ptr + pair * stride_f, mask=roped, other=0.0).to(tl.float32)[None, :]
    cos = tl.cos(theta)
    sin = tl.sin(theta)
    value = x.to(tl.float32)
    first = (k % 2 == 0)[None, :]  # a of the pair: a cos - b sin; else b: a sin + b cos
    rotated = tl.where(first, value * cos - partner * sin, partner * sin + value * cos)
    return tl.where(roped[None, :], cast_rne(rotated, x.dtype), x)


@triton.jit
def _index_key_pack_kernel(
    x_ptr, out_ptr, M, stride_xm,
    N_TILES: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, TILES: tl.constexpr, BLOCK_M: tl.constexpr,
    RECORD: tl.constexpr, FP4: tl.constexpr, slot_ptr=None, N=1, R=1, stride_sb=0, stride_sn=0, stride_ob=0,
    stride_or=0, PDL: tl.constexpr = False,
):
    """BLOCK_M keys of N_TILES * BLOCK elements -> RECORD-byte records: FP4 blocks of 32 with e8m0
    bytes, or (one tile a key) e4m3 codes with the fp32 scale's four bytes; stored at
    :func:`_record_rows`'s rows."""
    wait_for_prior_grid(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tiles = tl.arange(0, TILES)
    k, mask = _tile_brick(rows, tiles, M, N_TILES, BLOCK, BLOCK_P2)
    rows64 = rows.to(tl.int64)
    record, row_ok = _record_rows(out_ptr, rows, rows < M, RECORD, slot_ptr, N, R, stride_sb, stride_sn, stride_ob,
                                  stride_or)
    x = tl.load(x_ptr + rows64[:, None, None] * stride_xm + k, mask=mask, other=0.0).to(tl.float32)
    if slot_ptr is not None:
        mask = mask & row_ok[:, None, None]
    scale_mask = row_ok[:, None] & (tiles < N_TILES)[None, :]
    if FP4:
        code, s = _fp4_quantize_tiles(x)
        half, half_mask = _tile_brick(rows, tiles, M, N_TILES, BLOCK // 2, BLOCK_P2 // 2)
        if slot_ptr is not None:
            half_mask = half_mask & row_ok[:, None, None]
        tl.store(record[:, None, None] + half, _fp4_pairs(code), mask=half_mask)
        tl.store(record[:, None] + N_TILES * BLOCK // 2 + tiles[None, :], e8m0_bytes(s).to(tl.uint8), mask=scale_mask)
    else:
        q, s = fp8_quantize_tiles(x, True)
        tl.store(record[:, None, None] + k, q.to(tl.uint8, bitcast=True), mask=mask)
        byte = tl.arange(0, 4)[None, None, :]  # the scale's fp32 bits, least significant byte first
        scale_bytes = (s.to(tl.int32, bitcast=True)[:, :, None] >> (8 * byte)) & 0xFF
        tl.store(record[:, None, None] + N_TILES * BLOCK + byte, scale_bytes.to(tl.uint8), mask=scale_mask[:, :, None])


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
