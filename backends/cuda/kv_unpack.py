"""Triton decoder of the packed FP8 KV record (op ``kv_cache_unpack``; v4_ops.md §12).

The inverse of :func:`seahal.backends.cuda.quant.kv_cache_pack`: a record
``[e4m3 nope codes | bf16 rope bytes | e8m0 tile exponents | pad]`` (584 bytes for V4) becomes a
bf16 vector ``[nope_t * 2^(e_t - 127) per tile t | rope]``. Memory-bound: each program decodes
BLOCK_M whole records, the nope part as a [BLOCK_M, tiles, tile] brick so that each tile's
exponent is loaded once.

Bit-exact with the reference: an e4m3 code and a power of two multiply exactly in fp32 (except
past fp32's own range, where both sides round the same fp32 product), and the product is rounded
to bf16 by :func:`cast_rne` (round to nearest even also under the interpreter, whose own casts
truncate). The rope bytes are copied as bits.
Exponent 255 decodes to NaN, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from seahal.hal.ops.quant import kv_record_bytes

from ._cache_keys import settle_cache_keys
from ._host import cdiv, next_power_of_2
from ._numerics import cast_rne
from ._pdl import pdl_options, wait_for_prior_grid

ELEMENTS_PER_PROGRAM = 4096
"""Decoded elements per program: 8 records of dim 512 (4.6 KB read, 8 KB written). Not measured
on a GPU yet (TUNING.md)."""


def kv_cache_unpack(packed: torch.Tensor, dim: int, rope_dim: int = 64, tile: int = 64) -> torch.Tensor:
    """Decode packed FP8 KV records to bf16 vectors.

    packed: [..., kv_record_bytes(dim, rope_dim, tile)] uint8 (any strides) -> [..., dim] bf16,
    ``out[t*tile + i] = e4m3(code) * 2^(e_t - 127)`` for the nope tiles, then the rope bf16 values.
    """
    width = kv_record_bytes(dim, rope_dim, tile)
    out = torch.empty((*packed.shape[:-1], dim), dtype=torch.bfloat16, device=packed.device)
    records = packed.reshape(-1, width)  # a view when the leading dims collapse to one stride
    if records.shape[0] == 0:
        return out
    n_tiles = (dim - rope_dim) // tile
    block_m = min(next_power_of_2(records.shape[0]), max(1, ELEMENTS_PER_PROGRAM // next_power_of_2(dim)))
    _kv_cache_unpack_kernel[(cdiv(records.shape[0], block_m),)](
        records, out, records.shape[0], *records.stride(),
        N_TILES=n_tiles, TILES_P2=next_power_of_2(max(n_tiles, 1)), TILE=tile,
        TILE_P2=next_power_of_2(tile), ROPE=rope_dim, ROPE_P2=next_power_of_2(max(rope_dim, 1)),
        DIM=dim, BLOCK_M=block_m, **pdl_options(),
    )
    return out


@triton.jit
def _e8m0_scale(e):
    """e8m0 bytes (int32 0..255) -> fp32 ``2^(e-127)`` exactly: 0 is the subnormal 2^-127, 255 NaN."""
    bits = tl.where(e == 0, 0x00400000, tl.where(e == 255, 0x7FC00000, e << 23))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_value(c):
    """e4m3 codes (int32 0..255) -> exact fp32 values, in integer arithmetic: normal codes rebias
    the exponent 7 -> 127, subnormals are ``m * 2^-9``, 0x7F/0xFF are NaN. (The interpreter's
    float8 -> fp32 cast decodes the NaN codes as 480.)"""
    sign = (c & 0x80) << 24
    exponent = (c >> 3) & 0xF
    normal = (sign | ((exponent + 120) << 23) | ((c & 7) << 20)).to(tl.float32, bitcast=True)
    subnormal = ((c & 7).to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True) | sign
    value = tl.where(exponent == 0, subnormal.to(tl.float32, bitcast=True), normal)
    return tl.where((c & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def _kv_cache_unpack_kernel(
    rec_ptr, out_ptr, M, stride_rm, stride_rb,
    N_TILES: tl.constexpr, TILES_P2: tl.constexpr, TILE: tl.constexpr, TILE_P2: tl.constexpr,
    ROPE: tl.constexpr, ROPE_P2: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, PDL: tl.constexpr = False,
):
    """out[rows] = decoded records[rows] (bf16); program = BLOCK_M records."""
    wait_for_prior_grid(PDL)
    NOPE: tl.constexpr = N_TILES * TILE
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rec_row = rec_ptr + rows.to(tl.int64) * stride_rm
    out_row = out_ptr + rows.to(tl.int64) * DIM
    # nope: e4m3 codes times their tile's power-of-two scale, rounded to bf16
    tiles = tl.arange(0, TILES_P2)
    cols = tl.arange(0, TILE_P2)
    k = tiles[None, :, None] * TILE + cols[None, None, :]
    tile_ok = row_ok[:, None] & (tiles < N_TILES)[None, :]
    mask = tile_ok[:, :, None] & (cols < TILE)[None, None, :]
    codes = tl.load(rec_row[:, None, None] + k * stride_rb, mask=mask, other=0)
    exponent = tl.load(rec_row[:, None] + (NOPE + 2 * ROPE + tiles[None, :]) * stride_rb, mask=tile_ok, other=127)
    values = _e4m3_value(codes.to(tl.int32)) * _e8m0_scale(exponent.to(tl.int32))[:, :, None]
    tl.store(out_row[:, None, None] + k, cast_rne(values, tl.bfloat16), mask=mask)
    # rope: little-endian bf16 bytes, copied as bits
    j = tl.arange(0, ROPE_P2)
    rope_mask = row_ok[:, None] & (j < ROPE)[None, :]
    rope_bytes = rec_row[:, None] + (NOPE + 2 * j[None, :]) * stride_rb
    low = tl.load(rope_bytes, mask=rope_mask, other=0).to(tl.int32)
    high = tl.load(rope_bytes + stride_rb, mask=rope_mask, other=0).to(tl.int32)
    rope = ((high << 8) | low).to(tl.int16).to(tl.bfloat16, bitcast=True)
    tl.store(out_row[:, None] + NOPE + j[None, :], rope, mask=rope_mask)


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
