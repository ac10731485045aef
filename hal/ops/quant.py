"""Number formats: FP8 e4m3 activation quant, FP4 e2m1 quant, the Hadamard rotation that shapes the
indexer's FP4 error, the packed FP8 KV record and the packed indexer-key records.

Formats (v4_ops.md §11): e4m3 saturates at ±448; e2m1 holds {0, .5, 1, 1.5, 2, 3, 4, 6} and
negatives, two codes per byte with the even (first) element in the low nibble; ue8m0 scales are
powers of two ``2^(e-127)``. Scales are returned as fp32 tensors whose values are those powers of
two (``scale_fmt="ue8m0"``) or plain ``amax/448`` (``scale_fmt="fp32"``).
"""

from __future__ import annotations

import torch

from ..checks import FLOAT_HIGH, FLOATS, INDEX, Contract, check_rotation, describe
from ..formats import FP4_TILE, INDEX_KEY_FORMATS, index_key_bytes
from ..spec import Out, define_op

SCALE_FORMATS = ("ue8m0", "fp32")


@define_op(
    "fp8_act_quant",
    family="quant",
    schema="(Tensor x, int block_size=128, str scale_fmt='ue8m0') -> (Tensor, Tensor)",
)
def fp8_act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str = "ue8m0"):
    """Quantise activations to FP8 e4m3 in 1 x block_size tiles along the last dim.

    x: [..., K] bf16/fp16/fp32/fp64, K % block_size == 0
    -> q: [..., K] float8_e4m3fn, scale: [..., K/block_size] fp32

    Per tile: ``amax = max(max|x|, 1e-4)``; ``s = amax/448`` (fp32) or, for ue8m0,
    ``s = 2^ceil(log2(amax/448))``; ``q = e4m3_rne(clamp(x/s, -448, 448))``. ``q * s`` approximates x.
    """
    c = Contract("fp8_act_quant")
    c.tensor("x", x, dtypes=FLOAT_HIGH + (torch.float16,), min_rank=1)
    c.positive("block_size", block_size)
    c.choice("scale_fmt", scale_fmt, SCALE_FORMATS)
    k = x.shape[-1]
    c.require(k % block_size == 0, f"x's last dim must be a multiple of block_size={block_size}, got {k}")
    return Out(tuple(x.shape), torch.float8_e4m3fn), Out((*x.shape[:-1], k // block_size), torch.float32)


@define_op(
    "fp4_quant",
    family="quant",
    schema="(Tensor x, int block_size=32) -> (Tensor, Tensor)",
)
def fp4_quant(x: torch.Tensor, block_size: int = 32):
    """Quantise to FP4 e2m1 with 1 x block_size ue8m0 scales and pack two codes per byte.

    x: [..., K] float, K % block_size == 0, block_size even
    -> codes: [..., K/2] uint8 (element 2i in the low nibble, 2i+1 in the high nibble),
       scale: [..., K/block_size] fp32 (powers of two)

    Per block: ``amax = max(max|x|, 6 * 2^-126)``; ``s = 2^ceil(log2(amax/6))``;
    ``code = e2m1_rne(clamp(x/s, -6, 6))`` with code = sign<<3 | magnitude index.
    """
    c = Contract("fp4_quant")
    c.tensor("x", x, dtypes=FLOAT_HIGH + (torch.float16,), min_rank=1)
    c.positive("block_size", block_size)
    c.require(block_size % 2 == 0, f"block_size must be even, got {block_size}")
    k = x.shape[-1]
    c.require(k % block_size == 0, f"x's last dim must be a multiple of block_size={block_size}, got {k}")
    return Out((*x.shape[:-1], k // 2), torch.uint8), Out((*x.shape[:-1], k // block_size), torch.float32)


@define_op(
    "hadamard_rotate",
    family="quant",
    schema="(Tensor x, int fp4_block=0, Tensor? positions=None, Tensor? freqs=None) -> Tensor",
)
def hadamard_rotate(x: torch.Tensor, fp4_block: int = 0, positions: torch.Tensor | None = None,
                    freqs: torch.Tensor | None = None):
    """Rotate the last dim by the orthonormal Sylvester Hadamard matrix, then, with ``fp4_block``,
    round through FP4 (the indexer's query and keys, v4_ops.md §7, §8 step 1, §11.6).

    x: [..., n] bf16/fp32/fp64, n a power of two -> [..., n] in x's dtype.

    ``y = x @ H_n * n^-0.5`` (``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``; fp32 math, fp64
    for fp64 x), rounded to x's dtype. ``fp4_block > 0`` then returns y's FP4 e2m1 quant-dequant
    in 1 x fp4_block blocks: ``fp4_quant(y, fp4_block)`` decoded back to x's dtype (exact: an e2m1
    value times a power of two). 0 returns y.

    With ``positions`` [B, S] int and ``freqs`` [R] fp32 (x then [B, S, H, n], 2R <= n), x is first
    ``rope(x, positions, freqs)`` (rounded to x's dtype): the indexer's query heads, rotated by
    their token's position before the Hadamard rotation (§8 step 1), in one op.
    """
    c = Contract("hadamard_rotate")
    if positions is None:
        c.tensor("x", x, dtypes=FLOAT_HIGH, min_rank=1)
        c.require(freqs is None, "freqs goes with positions (x rotated by RoPE first)")
    else:
        c.tensor("x", x, ["B", "S", "H", "D"], FLOAT_HIGH)
        check_rotation(c, positions, freqs)
    n = x.shape[-1]
    # powers of two are the divisors of 2^62 (and SymInt has no `&` on torch 2.5)
    c.require(n > 0 and (1 << 62) % n == 0, f"x's last dim must be a power of two, got {n}")
    c.require(fp4_block >= 0, f"fp4_block must be >= 0 (0: no FP4 rounding), got {fp4_block}")
    if fp4_block:
        c.require(
            fp4_block % 2 == 0 and n % fp4_block == 0,
            f"fp4_block must be even and divide x's last dim {n}, got {fp4_block}",
        )
    return Out(tuple(x.shape), x.dtype)


@define_op(
    "index_key_pack",
    family="quant",
    schema="(Tensor keys, str key_format) -> Tensor",
)
def index_key_pack(keys: torch.Tensor, key_format: str):
    """Pack indexer keys into the records ``indexer_topk_packed`` scores (v4_ops.md §12).

    keys: [..., d] bf16/fp32/fp64 -> [..., index_key_bytes(d, key_format)] uint8:
    ``"fp4"`` (d a multiple of 32; 68 bytes at d = 128): the e2m1 codes of ``fp4_quant(keys, 32)``,
    element 2i in the low nibble of byte i, then each 32-block's ue8m0 scale as an e8m0 byte;
    ``"fp8"`` (132 bytes at d = 128): the e4m3 codes of ``fp8_act_quant(keys, d, "ue8m0")`` (one
    power-of-two scale per key, ``2^ceil(log2(max(amax, 1e-4) / 448))``), then that scale's fp32
    bytes, little-endian.
    """
    c = Contract("index_key_pack")
    c.tensor("keys", keys, dtypes=FLOAT_HIGH, min_rank=1)
    c.choice("key_format", key_format, INDEX_KEY_FORMATS)
    d = keys.shape[-1]
    block = FP4_TILE if key_format == "fp4" else 1  # fp4: one e8m0 scale per 32 elements
    c.require(d > 0 and d % block == 0, f"keys's last dim must be a positive multiple of {block} for {key_format} keys, got {d}")
    return Out((*keys.shape[:-1], index_key_bytes(d, key_format)), torch.uint8)


@define_op(
    "index_key_store",
    family="quant",
    schema="(Tensor keys, Tensor(a!) store, Tensor slots, str key_format) -> ()",
    mutates=("store",),
)
def index_key_store(keys: torch.Tensor, store: torch.Tensor, slots: torch.Tensor, key_format: str):
    """Pack indexer keys into their records and store each in its sequence's row of the store.

    keys: [B, S, d] bf16/fp32/fp64, store: [B, N, index_key_bytes(d, key_format)] uint8 (any
    strides), slots: [B or 1, S] int32/int64 (one row for every sequence) -> nothing;
    ``store[b, slots[b, i]] = index_key_pack(keys[b, i], key_format)``, the other rows untouched
    (a step's new compressed entries, written where the indexer then scores them).

    Each sequence's S slots must be distinct and in [0, N): as for ``kv_cache_store``, their values
    are data the contract never reads; the reference raises on a slot out of range, a kernel must
    not write there.
    """
    c = Contract("index_key_store")
    c.tensor("keys", keys, ["B", "S", "d"], FLOAT_HIGH)
    c.choice("key_format", key_format, INDEX_KEY_FORMATS)
    d = c.dims["d"]
    block = FP4_TILE if key_format == "fp4" else 1
    c.require(d > 0 and d % block == 0, f"keys's last dim must be a positive multiple of {block} for {key_format} keys, got {d}")
    c.tensor("store", store, ["B", "N", index_key_bytes(d, key_format)], (torch.uint8,))
    check_slots(c, slots)
    return ()


def kv_record_bytes(dim: int, rope_dim: int = 64, tile: int = 64) -> int:
    """Bytes of one packed KV record: nope e4m3 + rope bf16 + one e8m0 per tile, padded to 8.

    For V4 (dim 512, rope 64, tile 64): 448 + 128 + 7 + 1 = 584 (v4_ops.md §12).
    """
    nope = dim - rope_dim
    n_tiles = nope // tile
    return nope + 2 * rope_dim + (n_tiles + 7) // 8 * 8


def kv_geometry(c: Contract, dim_name: str, dim: int, rope_dim: int, tile: int) -> None:
    """Check that (``rope_dim``, ``tile``) split vectors of ``dim`` (named ``dim_name`` in errors)
    into whole nope tiles and an even RoPE tail: the geometry of a packed KV record."""
    c.positive("tile", tile)
    c.require(0 <= rope_dim < dim and rope_dim % 2 == 0, f"rope_dim must be even and in [0, {dim}), got {rope_dim}")
    c.require(
        (dim - rope_dim) % tile == 0,
        f"{dim_name} - rope_dim must be a multiple of tile={tile}, got {dim} - {rope_dim} = {dim - rope_dim}",
    )


@define_op(
    "kv_cache_pack",
    family="quant",
    schema="(Tensor kv, int rope_dim=64, int tile=64) -> Tensor",
)
def kv_cache_pack(kv: torch.Tensor, rope_dim: int = 64, tile: int = 64):
    """Pack KV vectors into the FP8 cache record (FlashMLA MODEL1_FP8Sparse per-token layout).

    kv: [..., dim] bf16/fp32 -> [..., kv_record_bytes(dim)] uint8, each record
    ``[e4m3(nope / s_t) for each tile t | rope as bf16 bytes | e8m0(s_t) per tile | zero pad]``
    where nope = kv[..., :dim-rope_dim] in 1 x tile tiles with ue8m0 scales as fp8_act_quant.
    """
    c = Contract("kv_cache_pack")
    c.tensor("kv", kv, dtypes=FLOATS, min_rank=1)
    kv_geometry(c, "kv's last dim", kv.shape[-1], rope_dim, tile)
    return Out((*kv.shape[:-1], kv_record_bytes(kv.shape[-1], rope_dim, tile)), torch.uint8)


@define_op(
    "kv_cache_store",
    family="quant",
    schema=(
        "(Tensor kv, Tensor(a!) cache, Tensor slots, int rope_dim=64, int tile=64, Tensor? positions=None, "
        "Tensor? freqs=None, Tensor? norm_weight=None, float norm_eps=1e-6) -> ()"
    ),
    mutates=("cache",),
)
def kv_cache_store(
    kv: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, rope_dim: int = 64, tile: int = 64,
    positions: torch.Tensor | None = None, freqs: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
):
    """Pack KV vectors into FP8 cache records and store each in its sequence's row of the cache.

    kv: [B, S, D] bf16/fp16/fp32, cache: [B, N, kv_record_bytes(D, rope_dim, tile)] uint8 (any
    strides), slots: [B or 1, S] int32/int64 (one row for every sequence) -> nothing;
    ``cache[b, slots[b, i]] = kv_cache_pack(v[b, i], rope_dim, tile)``, the other rows untouched,
    where v is kv, or with ``positions`` [B, S] int and ``freqs`` [R] fp32 (2R <= D) the attention's
    KV as V4 computes it from the projection (v4_ops §6): ``rms_norm_rope(kv, norm_weight, norm_eps,
    positions, freqs)`` of each vector (one head; norm_weight [D] fp32 or None), the same roundings.

    Each sequence's S slots must be distinct and in [0, N): a slot's value is data on the device,
    which the contract never reads (a decode step's ring slot ``p mod W``, in a graph that serves
    every position); the reference raises on a slot out of range, a kernel must not write there.
    """
    c = Contract("kv_cache_store")
    c.tensor("kv", kv, ["B", "S", "D"], FLOATS)
    dim = c.dims["D"]
    kv_geometry(c, "kv's last dim", dim, rope_dim, tile)
    c.tensor("cache", cache, ["B", "N", kv_record_bytes(dim, rope_dim, tile)], (torch.uint8,))
    check_slots(c, slots)
    if positions is None:
        c.require(
            freqs is None and norm_weight is None,
            "freqs and norm_weight go with positions (the vectors normalised and rotated before packing)",
        )
        return ()
    c.require(kv.dtype != torch.float16, f"kv must be bfloat16 or float32 to be normalised and rotated, got {describe(kv)}")
    check_rotation(c, positions, freqs)
    c.optional("norm_weight", norm_weight, ["D"], (torch.float32, torch.float64))
    c.require(isinstance(norm_eps, float) and norm_eps >= 0.0, f"norm_eps must be a float >= 0, got {norm_eps!r}")
    return ()


@define_op(
    "kv_cache_unpack",
    family="quant",
    schema="(Tensor packed, int dim, int rope_dim=64, int tile=64) -> Tensor",
)
def kv_cache_unpack(packed: torch.Tensor, dim: int, rope_dim: int = 64, tile: int = 64):
    """Decode packed FP8 KV records back to bf16 vectors (inverse layout of kv_cache_pack).

    packed: [..., kv_record_bytes(dim)] uint8 -> [..., dim] bf16; nope = e4m3 * 2^(e-127).
    """
    c = Contract("kv_cache_unpack")
    c.positive("dim", dim)
    kv_geometry(c, "dim", dim, rope_dim, tile)
    c.tensor("packed", packed, dtypes=(torch.uint8,), min_rank=1)
    width = kv_record_bytes(dim, rope_dim, tile)
    c.require(packed.shape[-1] == width, f"packed's last dim must be {width} bytes for dim={dim}, got {packed.shape[-1]}")
    return Out((*packed.shape[:-1], dim), torch.bfloat16)


def check_slots(c: Contract, slots: object, rows: int | str = "S") -> None:
    """A store op's slots: [B or 1, rows] int32/int64, B bound by its data; ``rows`` the records it
    stores a sequence (a dimension its data bound, or their count)."""
    c.tensor("slots", slots, [None, rows], INDEX)
    count = f"{rows}={c.dims[rows]}" if isinstance(rows, str) else rows
    c.require(
        slots.shape[0] in (1, c.dims["B"]),
        f"slots must be [B={c.dims['B']} or 1, {count}] (one row for every sequence), got {describe(slots)}",
    )
