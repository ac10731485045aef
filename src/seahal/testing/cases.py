"""Conformance cases: deterministic inputs for every op, edge cases first, plus hypothesis strategies.

A :class:`Case` is a name and the positional arguments of one or more calls (schema order). A
stateful op (``kv_compress``) gets a sequence of calls that share their state tensors (the same
objects), e.g. a prefill followed by single-token decode steps; every call's outputs are compared,
then the final states. All values come from a seeded CPU generator, so ``cases_for(op)`` is the
same everywhere; the runner moves them to the device under test.

Edge cases covered where they apply: sequence lengths that are not a multiple of the compression
ratio m, shorter than the window, shorter than m (no entry yet); decode after a prefill ending at
every offset mod m; top-k larger than the visible entries (``-1`` slots); batch > 1 with different
contents; exact ties in routing / indexer scores; every token routed to one expert and experts that
receive no token; FP8 saturation (codes at ±448, quotients that round past 448); exact e4m3
ties; zero and tiny tiles (the scale clamp); non-contiguous inputs (transposed, sliced and strided
views, attention keys that are one pool expanded over the batch: a paged cache); attention outputs
rotated back by their query's inverse RoPE (positions one row per sequence or one shared row);
mHC sub-layer outputs in two parts (hc_post's addend, cancelling f to 0 or to an ulp or two in places);
hc_post_pre's fused boundary (the streams hc_post makes, a zero token among them, fed to hc_pre);
bf16 and fp32 data; dense, fp8 and fp4 expert weights with fp32 and e8m0 scales; packed FP4 / FP8
indexer keys of far-apart magnitudes, zero keys and non-power-of-two FP8 key scales; indexer head
weights in bf16 times V4's scale or times a negative one, their picks returned from an offset (the
attention window W, or W + S for a chunk); KV records
stored into rows of a cache pre-filled with random bytes (rows per sequence or shared by the batch,
wrapping around a ring's end, the cache a view of a bigger buffer), normalised and rotated first at
per-sequence positions (up to 99999; int32 and int64; with and without the norm weight); FP4 / FP8
indexer-key records stored into such random-byte stores the same ways; the compressor's FP8 records
stored by a stream of calls into such a store at their entries' rows (shuffled, per sequence or
shared, at int, 0-d and per-sequence positions, the zero rows past the new entries included, in rows
of a bigger buffer or of rows twice as wide); Hadamard rotations (with and without their FP4
rounding) of heads rotated by RoPE first (the indexer's query), at per-sequence positions up to
99999.

:func:`strategy` gives a hypothesis strategy of random cases within each contract (shapes and
values drawn, tensors built from a drawn seed by the same builders).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from seahal.backends.cpu.reference.quant import kv_cache_pack
from seahal.hal.formats import FP4_TILE, e8m0_scales, index_key_bytes, index_key_pack, ue8m0_ceil
from seahal.hal.ops.compressor import compressor_state, compressor_width, most_new_entries, new_entries
from seahal.hal.ops.moe import expert_weight_format
from seahal.hal.ops.quant import kv_record_bytes
from seahal.hal.ops.rope import Yarn, rope_frequencies
from seahal.hal.spec import get_spec, specs

BF16, F32 = torch.bfloat16, torch.float32
E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
V4_INDEXER_SCALE = 128**-0.5 * 64**-0.5
"""V4's indexer head-weight scale ``head_dim^-0.5 * n_heads^-0.5`` (2^-6.5): the model's ``weights_scale``."""


@dataclass(frozen=True)
class Case:
    """One conformance case: ``calls`` are positional argument tuples in schema order; stateful ops
    thread their state tensors (the same objects) through successive calls."""

    op: str
    name: str
    calls: tuple[tuple, ...]
    requirements: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Case({self.op}: {self.name}, {len(self.calls)} call(s))"


# --------------------------------------------------------------------------------------------
# Values and layouts
# --------------------------------------------------------------------------------------------


class _Rand:
    """Seeded CPU tensors: the only source of case values."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0, dtype: torch.dtype = F32) -> torch.Tensor:
        return (torch.randn(shape, generator=self.gen) * std).to(dtype)

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=self.gen, dtype=F32)

    def ints(self, low: int, high: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.gen, dtype=dtype)

    def e4m3(self, *shape: int, saturate: bool = True) -> torch.Tensor:
        """e4m3 codes of all magnitudes; with ``saturate`` every 7th is ±448, the largest code."""
        values = self.normal(*shape, std=96.0).clamp(-FP8_MAX, FP8_MAX)
        if saturate:
            flat = values.view(-1)
            flat[::7] = FP8_MAX * torch.sign(flat[::7] + 0.5)
        return values.to(E4M3)

    def scales(self, *shape: int, fmt: str, log2_center: int, spread: int = 2) -> torch.Tensor:
        """Block scales around ``2^log2_center``: fp32 (any positive value; with ``spread`` > 2 also
        times 2^[-spread, spread]) or e8m0 (powers of two 2^[center - spread, center + spread];
        their fp32 values on a torch without the e8m0 dtype, :func:`e8m0_scales`)."""
        if fmt == "e8m0":
            exponent = self.ints(log2_center - spread, log2_center + spread + 1, *shape)
            return e8m0_scales((exponent + 127).to(torch.uint8))
        scale = self.uniform(*shape, low=0.6, high=1.6) * 2.0**log2_center
        return scale if spread <= 2 else scale * torch.exp2(self.ints(-spread, spread + 1, *shape).to(F32))


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in another memory layout.

    ``"contiguous"``: t itself; ``"transposed"``: the last two dims stored swapped; ``"sliced"``:
    a view of the first half of rows twice as wide (as when slicing one projection out of a fused
    one); ``"heads"``: t [..., H, D] as the first H * D columns of rows twice as wide, viewed as
    heads (a stacked projection's query heads: rows that no single stride steps through);
    ``"strided"``: every other element of the last dim (works for 1-D tensors too).
    """
    if layout == "contiguous":
        return t
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "heads":
        *lead, heads, d = t.shape
        wide = torch.zeros((*lead, 2 * heads * d), dtype=t.dtype)
        wide[..., : heads * d] = t.reshape(*lead, heads * d)
        return wide[..., : heads * d].view(*lead, heads, d)
    width = t.shape[-1]
    wide = torch.zeros((*t.shape[:-1], 2 * width), dtype=t.dtype)
    if layout == "sliced":
        wide[..., :width] = t
        return wide[..., :width]
    if layout == "strided":
        wide[..., ::2] = t
        return wide[..., ::2]
    raise ValueError(f"unknown layout {layout!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# Requirements: what a case asks of a kernel, in the vocabulary of declared capabilities
# --------------------------------------------------------------------------------------------

_DATA_ARG = {
    "fp8_act_quant": "x",
    "fp4_quant": "x",
    "hadamard_rotate": "x",
    "index_key_pack": "keys",
    "index_key_store": "keys",
    "kv_cache_pack": "kv",
    "kv_cache_store": "kv",
    "moe_gate": "x",
    "moe_experts": "x",
    "indexer_topk": "q",
    "indexer_topk_packed": "q",
    "sparse_attention": "q",
    "sparse_attention_fp8": "q",
    "hc_pre": "x",
    "hc_post": "x",
    "hc_post_pre": "x",
    "hc_head": "x",
    "rope": "x",
    "rms_norm": "x",
    "rms_norm_rope": "x",
    "fp32_linear": "x",
    "grouped_linear": "x",
    "act_quant_gemm": "x",
}


def named_args(op: str, args: tuple, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A call's arguments by name in schema order, defaults filled in."""
    bound = inspect.signature(get_spec(op).contract).bind(*args, **(kwargs or {}))
    bound.apply_defaults()
    return dict(bound.arguments)


def requirements(op: str, args: tuple) -> dict[str, Any]:
    """What a call needs from a kernel, as a plan would ask: ``{"dtype": "bfloat16",
    "weight_format": "fp4", "scale_dtype": "float8_e8m0fnu", ...}`` (matched against capabilities)."""
    a = named_args(op, args)
    req: dict[str, Any] = {}
    if op in _DATA_ARG:
        req["dtype"] = _dtype_name(a[_DATA_ARG[op]].dtype)
    if op == "fp8_act_quant":
        req["scale_fmt"] = a["scale_fmt"]
    elif op in ("fp8_gemm", "fp4_gemm", "act_quant_gemm"):
        if op == "act_quant_gemm":
            req["weight_format"] = expert_weight_format(a["b"])
        req["out_dtype"] = _dtype_name(a["out_dtype"] or BF16)
        req["scale_dtype"] = _dtype_name(a["b_scale"].dtype)
    elif op == "moe_gate":
        req["score_func"] = a["score_func"]
        req["routing"] = "hash" if a["tid2eid"] is not None else "group-limited" if a["n_groups"] > 1 else "score"
    elif op == "moe_experts":
        req["weight_format"] = expert_weight_format(a["w1"])
        if a["w1_scale"] is not None:
            req["scale_dtype"] = _dtype_name(a["w1_scale"].dtype)
    elif op in ("kv_compress", "kv_compress_fp8", "kv_compress_store"):
        req["ratio"] = a["ratio"]
        req["overlap"] = a["overlap"]
        if op == "kv_compress":
            req["out_dtype"] = _dtype_name(a["out_dtype"] or BF16)
    elif op in ("indexer_topk_packed", "index_key_pack", "index_key_store"):
        req["key_format"] = a["key_format"]
    elif op == "fp32_linear":
        req["weight_dtype"] = _dtype_name(a["weight"].dtype)
    elif op == "grouped_linear":
        req["weight_format"] = "fp8" if a["scale"] is not None else "dense"
        if a["scale"] is not None:
            req["scale_dtype"] = _dtype_name(a["scale"].dtype)
    if isinstance(a.get("start_pos"), torch.Tensor) and a["start_pos"].dim() == 1:
        req["position"] = "per-sequence"
    elif op in ("sparse_attention", "sparse_attention_fp8"):
        req["head_dim"] = a["q"].shape[-1]
        req["kv_format"] = "fp8" if op == "sparse_attention_fp8" else "dense"
    return req


def _case(op: str, name: str, *calls: tuple) -> Case:
    for call in calls:
        get_spec(op).check(*call)  # a case that violates its contract is a bug in this module
    return Case(op, name, tuple(calls), requirements(op, calls[0]))


# --------------------------------------------------------------------------------------------
# Builders: one per op, parameters chosen by the fixed cases and by the hypothesis strategies
# --------------------------------------------------------------------------------------------


def _tile_values(r: _Rand, shape: tuple[int, ...], tile: int, values: str, std: float = 4.0) -> torch.Tensor:
    """fp32 data in ``[..., K]`` tiles: ``normal``; ``zero-tiny`` (tile 0 zero, tile 1 below the
    1e-4 amax floor); ``saturate`` (each tile's largest element replaced by a random amax so that
    amax / fp32(amax/448) may round past 448); ``huge`` (1e30)."""
    x = r.normal(*shape, std=std)
    tiles = x.view(*shape[:-1], shape[-1] // tile, tile)
    if values == "zero-tiny":
        tiles[..., 0, :] = 0.0
        if tiles.shape[-2] > 1:
            tiles[..., 1, :] *= 1e-7
    elif values == "saturate":
        at = tiles.abs().argmax(-1, keepdim=True)
        amax = r.uniform(*tiles.shape[:-1], 1, low=1.0, high=1000.0)
        tiles.scatter_(-1, at, amax * torch.sign(tiles.gather(-1, at) + 1e-30))
    elif values == "huge":
        tiles *= 1e30
    return x


def fp8_act_quant_case(
    name: str, seed: int, shape: tuple[int, ...], dtype=BF16, block: int = 128, fmt: str = "ue8m0",
    values: str = "normal", layout: str = "contiguous",
) -> Case:
    x = _tile_values(_Rand(seed), shape, block, values).to(dtype)
    return _case("fp8_act_quant", name, (strided(x, layout), block, fmt))


def fp4_quant_case(
    name: str, seed: int, shape: tuple[int, ...], dtype=BF16, block: int = 32, values: str = "normal",
    layout: str = "contiguous",
) -> Case:
    r = _Rand(seed)
    if values == "ties":
        # every block holds ±6 (so its scale is exactly 2^k) and e2m1 midpoints times 2^k: RNE ties
        choices = torch.tensor(E2M1_MIDPOINTS + tuple(-v for v in E2M1_MIDPOINTS) + (6.0, -6.0, 0.0))
        x = choices[r.ints(0, len(choices), *shape)]
        x.view(-1, block)[:, 0] = 6.0
        x = x * 2.0 ** r.ints(-3, 4, *shape[:-1], 1).float()
    else:
        x = _tile_values(r, shape, block, values)
    return _case("fp4_quant", name, (strided(x.to(dtype), layout), block))


def hadamard_rotate_case(
    name: str, seed: int, shape: tuple[int, ...], dtype=BF16, fp4_block: int = 32, values: str = "normal",
    layout: str = "contiguous", positions: tuple[tuple[int, ...], ...] | None = None, rope: int = 64,
    yarn: bool = False, pos_dtype=torch.int64,
) -> Case:
    """x ~ N(0, 1) times 2^e per row, e in [-8, 8] (FP4 blocks of many scales); ``zero-tiny``: the
    first row zero (every block at the amax floor), the second scaled by 2^-100.

    ``positions``: one tuple of S token positions per sequence (x [B, S, H, n], ``pos_dtype``): x is
    rotated by RoPE on the last ``rope`` dims of each head first (the op's ``positions``, ``freqs``:
    :func:`_rope_freqs`), as the indexer's query is."""
    r = _Rand(seed)
    x = r.normal(*shape) * torch.exp2(r.ints(-8, 9, *shape[:-1], 1).to(F32))
    if values == "zero-tiny":
        rows = x.view(-1, shape[-1])
        rows[0] = 0.0
        rows[1:2] *= 2.0**-100
    rotation: tuple = ()
    if positions is not None:
        rotation = (torch.tensor(positions, dtype=pos_dtype), _rope_freqs(rope, yarn))
    return _case("hadamard_rotate", name, (strided(x.to(dtype), layout), fp4_block, *rotation))


def index_key_pack_case(
    name: str, seed: int, shape: tuple[int, ...], fmt: str, dtype=BF16, values: str = "normal",
    layout: str = "contiguous",
) -> Case:
    """Keys in 32-element tiles (:func:`_index_keys`)."""
    x = _index_keys(_Rand(seed), shape, values)
    return _case("index_key_pack", name, (strided(x.to(dtype), layout), fmt))


def index_key_store_case(
    name: str, seed: int, slots: tuple[tuple[int, ...], ...], rows: int, fmt: str, b: int = 2, d: int = 128,
    dtype=BF16, slot_dtype=torch.int64, values: str = "normal", first: int = 0, layout: str = "contiguous",
) -> Case:
    """keys [b, n, d] (:func:`_index_keys`; ``layout`` keys's) packed as ``fmt`` records and stored
    into a store of ``rows`` records per sequence: ``slots``, ``first`` and ``slot_dtype`` as
    :func:`kv_cache_store_case` (a store of random bytes, rows ``first..`` of a bigger buffer)."""
    r = _Rand(seed)
    keys = _index_keys(r, (b, len(slots[0]), d), values)
    store, rows_of = _random_store(r, slots, rows, b, index_key_bytes(d, fmt), first, slot_dtype)
    return _case("index_key_store", name, (strided(keys.to(dtype), layout), store, rows_of, fmt))


def _index_keys(r: _Rand, shape: tuple[int, ...], values: str) -> torch.Tensor:
    """Indexer keys in 32-element tiles (:func:`_tile_values`: ``zero-tiny`` puts a zero and a
    sub-floor block in each key, so at d = 64 FP8's whole-key scale and FP4's per-block scales both
    hit their floors)."""
    return _tile_values(r, shape, FP4_TILE, values, std=2.0)


def _random_store(
    r: _Rand, slots: tuple[tuple[int, ...], ...], rows: int, b: int, width: int, first: int, slot_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A store op's store and slots: [b, rows, width] uint8 of random bytes (rows no slot names
    must keep them), the rows ``first..`` of a buffer ``first + rows`` rows long (``first`` > 0: a
    strided view), and ``slots`` (one tuple of n distinct rows per sequence, or one the batch
    shares) as a [B or 1, n] tensor of ``slot_dtype``."""
    if any(len(set(row)) != len(row) or not all(0 <= i < rows for i in row) for row in slots):
        raise ValueError(f"slots must be distinct per sequence and in [0, {rows}), got {slots}")
    buffer = r.ints(0, 256, b, first + rows, width, dtype=torch.uint8)
    return buffer[:, first:], torch.tensor(slots, dtype=slot_dtype)


def kv_cache_pack_case(
    name: str, seed: int, lead: tuple[int, ...], dim: int = 512, rope_dim: int = 64, tile: int = 64,
    dtype=BF16, values: str = "normal", layout: str = "contiguous",
) -> Case:
    r = _Rand(seed)
    kv = r.normal(*lead, dim, std=2.0)
    if values == "zero-tiny" and dim > rope_dim:
        kv[..., :tile] = 0.0
        kv[..., tile : 2 * tile] *= 1e-6
    return _case("kv_cache_pack", name, (strided(kv.to(dtype), layout), rope_dim, tile))


def kv_cache_store_case(
    name: str, seed: int, slots: tuple[tuple[int, ...], ...], rows: int, b: int = 2, dim: int = 512,
    rope_dim: int = 64, tile: int = 64, dtype=BF16, slot_dtype=torch.int64, values: str = "normal",
    first: int = 0, layout: str = "contiguous", positions: tuple[tuple[int, ...], ...] | None = None,
    weighted: bool = False, yarn: bool = False, pos_dtype=torch.int64,
) -> Case:
    """kv [b, n, dim] stored into a cache of ``rows`` records per sequence. ``slots``: one tuple of
    n distinct rows per sequence ([B, n]), or a single tuple shared by the batch ([1, n]). The cache
    is pre-filled with random bytes (rows no slot names must keep them) and is the rows ``first..``
    of a buffer ``first + rows`` rows long (``first`` > 0: a strided view, as the model's compressed
    entries after its window ring). ``values``/``layout`` as :func:`kv_cache_pack_case` (kv's layout).

    ``positions``: one tuple of n token positions per sequence ([B, n], ``pos_dtype``): the vectors
    are normalised and rotated before packing (the op's ``positions``, ``freqs`` of the last
    ``rope_dim`` dims, :func:`_rope_freqs`), each times a magnitude in 2^-8..2^8 (the norm takes it
    to unit rms), with a norm weight in [0.5, 1.5] when ``weighted``."""
    n = len(slots[0])
    r = _Rand(seed)
    kv = r.normal(b, n, dim, std=2.0)
    if values == "zero-tiny" and dim > rope_dim:
        kv[..., :tile] = 0.0
        kv[..., tile : 2 * tile] *= 1e-6
    cache, rows_of = _random_store(r, slots, rows, b, kv_record_bytes(dim, rope_dim, tile), first, slot_dtype)
    rotation: tuple = ()
    if positions is not None:
        kv *= torch.exp2(r.ints(-8, 9, b, n, 1).to(F32))
        weight = r.uniform(dim, low=0.5, high=1.5) if weighted else None
        rotation = (torch.tensor(positions, dtype=pos_dtype), _rope_freqs(rope_dim, yarn), weight)
    args = (strided(kv.to(dtype), layout), cache, rows_of, rope_dim, tile, *rotation)
    return _case("kv_cache_store", name, args)


def kv_cache_unpack_case(
    name: str, seed: int, lead: tuple[int, ...], dim: int = 512, rope_dim: int = 64, tile: int = 64,
    layout: str = "contiguous",
) -> Case:
    """Records assembled byte by byte: random e4m3 codes, bf16 rope bytes, e8m0 exponents in
    [117, 137], zero padding (independent of any packer)."""
    r = _Rand(seed)
    nope = dim - rope_dim
    record = torch.zeros(*lead, kv_record_bytes(dim, rope_dim, tile), dtype=torch.uint8)
    record[..., :nope] = r.e4m3(*lead, nope).view(torch.uint8)
    record[..., nope : nope + 2 * rope_dim] = r.normal(*lead, rope_dim, dtype=BF16).view(torch.uint8)
    exponents = r.ints(117, 138, *lead, nope // tile).to(torch.uint8)
    record[..., nope + 2 * rope_dim : nope + 2 * rope_dim + nope // tile] = exponents
    return _case("kv_cache_unpack", name, (strided(record, layout), dim, rope_dim, tile))


def _activation(r: _Rand, m: int, k: int, values: str) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 activation codes [M, K] and fp32 1x128 scales; ``zero-tile`` zeroes row 0's first tile."""
    a = r.e4m3(m, k)
    scale = r.scales(m, k // 128, fmt="fp32", log2_center=-6)
    if values == "zero-tile":
        a.view(torch.uint8)[0, :128] = 0  # e4m3 +0 (torch before 2.6 cannot fill float8 tensors)
        scale[0, 0] = 1e-4 / FP8_MAX  # the clamped scale of an all-zero tile
    return a, scale


def _fp4_scales(r: _Rand, *shape: int, scale_fmt: str, log2_center: int, spread: int = 2) -> torch.Tensor:
    """FP4 block scales are ue8m0 by definition (v4_ops.md §11.4): e8m0 bytes, or fp32 tensors
    holding the same powers of two; 2^[center - spread, center + spread]. A wide spread puts the
    four 1x32 scales of a 128-wide block far apart, as a decoder that shares one exponent per
    block could not represent (``backends/cuda/_e2m1.py`` keeps each group's scale)."""
    scale = r.scales(*shape, fmt=scale_fmt, log2_center=log2_center, spread=spread)
    return ue8m0_ceil(scale) if scale_fmt == "fp32" else scale


def gemm_case(
    name: str, seed: int, op: str, m: int, n: int, k: int, out_dtype=None, scale_fmt: str = "fp32",
    values: str = "normal", a_layout: str = "contiguous", b_layout: str = "contiguous",
) -> Case:
    """``fp8_gemm`` (b e4m3, 128x128 scales) or ``fp4_gemm`` (b packed e2m1, 1x32 scales; values
    ``"wide-scales"``: 1x32 scales over 2^±12 around their center)."""
    r = _Rand(seed)
    a, a_scale = _activation(r, m, k, values)
    b, b_scale = _weights(r, "fp8" if op == "fp8_gemm" else "fp4", n, k, scale_fmt, values)
    args = (strided(a, a_layout), a_scale, strided(b, b_layout), b_scale, out_dtype)
    return _case(op, name, args)


def _weights(r: _Rand, fmt: str, n: int, k: int, scale_fmt: str, values: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM weights: ``fp8`` e4m3 codes [N, K] (every 7th ±448) with 128x128 scales around 2^-8, or
    ``fp4`` random e2m1 bytes [N, K/2] with 1x32 scales around 2^-4 (``wide-scales``: over 2^±12)."""
    if fmt == "fp8":
        return r.e4m3(n, k), r.scales(-(-n // 128), k // 128, fmt=scale_fmt, log2_center=-8)
    b = r.ints(0, 256, n, k // 2).to(torch.uint8)
    spread = 12 if values == "wide-scales" else 2
    return b, _fp4_scales(r, n, k // 32, scale_fmt=scale_fmt, log2_center=-4, spread=spread)


E4M3_MIDPOINTS = (1.0625, 1.1875, 1.5625, 3.375, 6.25, 13.5, 108.0, 216.0, 432.0, 4.5 * 2**-9, 7.5 * 2**-9, 2**-10)
"""x/s values halfway between two neighbouring e4m3 codes (1 and 1.125, ..., 416 and 448; between
subnormals, the largest subnormal and 2^-6, 0 and 2^-9): RNE sends each to the even code."""


def _act_quant_values(r: _Rand, m: int, k: int, values: str) -> torch.Tensor:
    """fp32 x [M, K] in 1x128 tiles, each row's tiles scaled by 2^[-6, 6]: ``normal``;
    ``zero-tiny`` (:func:`_tile_values`: tile 0 zero, tile 1 below the 1e-4 amax floor);
    ``sub-floor`` (tiles scaled by 2^[-31, -25], every amax far below 1e-4: all take the floor's
    scale 2^-22, and x/s <= ~1.5 puts most codes in e4m3's subnormal range, coarse as the spec
    makes them, where a kernel without the floor, or another floor, keeps three mantissa bits);
    ``saturate`` (every tile's amax exactly 448 * 2^e, so x/s = 448 is the top code unrounded, a
    second element at -440 * 2^e rounding to -448, and in odd tiles a third at -456 * 2^e, just
    past 448 * 2^e, which doubles the scale); ``ties`` (an eighth of the elements at e4m3
    midpoints of their tile's scale, the amax 448 * 2^e fixing it, exact in bf16)."""
    if values == "zero-tiny":
        return _tile_values(r, (m, k), 128, values)
    x = r.normal(m, k, std=4.0)
    tiles = x.view(m, k // 128, 128)
    exponent = r.ints(-6, 7, m, k // 128, 1).to(F32)
    if values == "saturate":
        tiles[..., :1] = 448.0
        tiles[..., 1:2] = -440.0
        tiles[:, 1::2, 2:3] = -456.0
        tiles *= 2.0 ** (exponent - 8)  # amax 448 * 2^(e - 8): x/s = 448 for the scale 2^(e - 8)
    elif values == "ties":
        choices = torch.tensor(E4M3_MIDPOINTS + tuple(-v for v in E4M3_MIDPOINTS))
        ties = choices[r.ints(0, len(choices), m, k // 128, 16)]
        tiles[..., 0] = 448.0
        tiles[..., 1::8] = ties
        tiles *= 2.0 ** (exponent - 8)
    elif values == "sub-floor":
        tiles *= torch.exp2(exponent.div(2).floor() - 28)
    elif values == "normal":
        tiles *= torch.exp2(exponent)
    else:
        raise ValueError(f"unknown values {values!r}")
    return x


def act_quant_gemm_case(
    name: str, seed: int, m: int, n: int, k: int, weights: str = "fp8", dtype=BF16, out_dtype=None,
    scale_fmt: str = "fp32", values: str = "normal", x_layout: str = "contiguous", b_layout: str = "contiguous",
) -> Case:
    """x [M, K] (:func:`_act_quant_values`) quantised by the op itself, times ``fp8`` or ``fp4``
    weights as :func:`gemm_case` draws them (``wide-scales``: fp4's 1x32 scales over 2^±12, x
    normal)."""
    r = _Rand(seed)
    x = _act_quant_values(r, m, k, "normal" if values == "wide-scales" else values).to(dtype)
    b, b_scale = _weights(r, weights, n, k, scale_fmt, values)
    return _case("act_quant_gemm", name, (strided(x, x_layout), strided(b, b_layout), b_scale, out_dtype))


def moe_gate_case(
    name: str, seed: int, t: int = 8, d: int = 64, e: int = 16, top_k: int = 6, score_func: str = "sqrtsoftplus",
    bias: bool = True, route_scale: float = 1.5, n_groups: int = 1, topk_groups: int = 1, hash_vocab: int = 0,
    dtype=BF16, variant: str = "random", layout: str = "contiguous",
) -> Case:
    """Variants: ``random``; ``tied-experts`` (experts 1, 5, 9 share weights and bias: exact ties);
    ``zero-token`` (token 0 is zero: every logit ties); ``one-expert`` (a huge bias on expert 3
    sends every token there); ``dead-experts`` (experts 0 and 1 never win)."""
    r = _Rand(seed)
    x = r.normal(t, d)
    weight = r.normal(e, d, std=d**-0.5)
    b = r.normal(e, std=0.1) if bias or variant in ("one-expert", "dead-experts") else None
    if variant == "tied-experts":
        weight[5] = weight[9] = weight[1]
        if b is not None:
            b[5] = b[9] = b[1]
    elif variant == "zero-token":
        x[0] = 0.0
    elif variant == "one-expert":
        b[3] = 100.0
    elif variant == "dead-experts":
        b[:2] = -100.0
    input_ids = tid2eid = None
    if hash_vocab:
        input_ids = r.ints(0, hash_vocab, t)
        tid2eid = torch.stack([torch.randperm(e, generator=r.gen)[:top_k] for _ in range(hash_vocab)]).to(torch.int32)
    x_layout, w_layout = ("sliced", "transposed") if layout != "contiguous" else (layout, layout)
    args = (
        strided(x.to(dtype), x_layout), strided(weight, w_layout), b, top_k, score_func, route_scale,
        n_groups, topk_groups, input_ids, tid2eid,
    )
    return _case("moe_gate", name, args)


def _expert_weights(
    r: _Rand, e: int, rows: int, cols: int, fmt: str, scale_fmt: str, dtype: torch.dtype, spread: int = 2
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stacked expert weights [E, rows, cols] with std ~ cols^-1/2 in format ``fmt`` (fp4: 1x32
    scales over 2^±spread, see :func:`_fp4_scales`)."""
    if fmt == "fp8":  # codes ~ 96 * N(0,1), scales ~ 2^-10: values ~ 0.1
        return r.e4m3(e, rows, cols), r.scales(e, -(-rows // 128), cols // 128, fmt=scale_fmt, log2_center=-10)
    if fmt == "fp4":  # e2m1 magnitudes ~ 2.5, scales ~ 2^-5
        codes = r.ints(0, 256, e, rows, cols // 2).to(torch.uint8)
        return codes, _fp4_scales(r, e, rows, cols // 32, scale_fmt=scale_fmt, log2_center=-5, spread=spread)
    return r.normal(e, rows, cols, std=cols**-0.5, dtype=dtype), None


def moe_experts_case(
    name: str, seed: int, t: int = 6, d: int = 128, inter: int = 128, e: int = 4, k: int = 2, fmt: str = "dense",
    scale_fmt: str = "fp32", dtype=BF16, limit: float = 10.0, routing: str = "random", values: str = "normal",
    layout: str = "contiguous",
) -> Case:
    """Routing: ``random``; ``empty-slots`` (some ids -1); ``one-expert`` (every token to expert
    e-1, other slots -1); ``unused-experts`` (only experts 1 and e-2 receive tokens). Values:
    ``normal`` (std 2); ``clamp`` (std 20: the SwiGLU clamp at ``limit`` is active); ``zero-token``
    (token 0 is zero: the FP8 scale clamp); ``wide-scales`` (fp4: 1x32 scales over 2^±12)."""
    r = _Rand(seed)
    x = r.normal(t, d, std=20.0 if values == "clamp" else 2.0, dtype=dtype)
    if values == "zero-token":
        x[0] = 0.0
    weights = r.uniform(t, k, low=0.1, high=1.0)
    ids = torch.stack([torch.randperm(e, generator=r.gen)[:k] for _ in range(t)])
    if routing == "empty-slots":
        ids[::2, -1] = -1
        ids[t // 2, :] = -1
    elif routing == "one-expert":
        ids[:, 0] = e - 1
        ids[:, 1:] = -1
    elif routing == "unused-experts":
        ids = torch.where(r.ints(0, 2, t, k) > 0, 1, e - 2)
        ids[:, 1] = torch.where(ids[:, 0] == 1, e - 2, 1)
    spread = 12 if values == "wide-scales" else 2
    w1, s1 = _expert_weights(r, e, inter, d, fmt, scale_fmt, dtype, spread)
    w3, s3 = _expert_weights(r, e, inter, d, fmt, scale_fmt, dtype, spread)
    w2, s2 = _expert_weights(r, e, d, inter, fmt, scale_fmt, dtype, spread)
    ids = ids.to(torch.int32)
    if layout != "contiguous":
        x, ids, w1 = strided(x, "sliced"), strided(ids, "transposed"), strided(w1, "transposed")
    args = (x, weights, ids, w1, s1, w3, s3, w2, s2, limit)
    return _case("moe_experts", name, args)


def kv_compress_case(
    name: str, seed: int, chunks: tuple[int, ...], ratio: int = 4, overlap: bool = True, b: int = 2, d: int = 32,
    rope: int = 16, norm_dtype=F32, out_dtype=None, stale_state: bool = False, layout: str = "contiguous",
    records: tuple[int, int] | None = None, offsets: tuple[int, ...] | None = None,
) -> Case:
    """Successive calls over chunks of one token stream (a prefill then decode steps, or chunked
    prefill), sharing the state. ``stale_state`` fills the state with garbage before the first
    call (start_pos 0 must ignore it); ``layout="sliced"`` takes kv and score as the two halves of
    one fused projection (non-contiguous). ``records=(rope_dim, tile)``: the calls are of
    ``kv_compress_fp8`` with that record geometry (out_dtype unused). ``offsets``: sequence i's
    stream starts at position offsets[i] (from the fresh state, as the contract allows), the calls
    passing start_pos as a [B] tensor, one position per sequence."""
    calls = _compress_calls(
        _Rand(seed), chunks, ratio, overlap, b, d, rope, norm_dtype, out_dtype, stale_state, layout, records, offsets
    )
    return _case("kv_compress_fp8" if records else "kv_compress", name, *calls)


def _compress_calls(
    r: _Rand, chunks: tuple[int, ...], ratio: int, overlap: bool, b: int, d: int, rope: int, norm_dtype,
    out_dtype, stale_state: bool, layout: str, records: tuple[int, int] | None, offsets: tuple[int, ...] | None,
) -> list[tuple]:
    """:func:`kv_compress_case`'s calls (its parameters), values drawn from ``r``."""
    coff = compressor_width(ratio, overlap)
    total = sum(chunks)
    projection = r.normal(b, total, 2 * coff * d)
    kv, score = projection[..., : coff * d], projection[..., coff * d :]
    ape = r.normal(ratio, coff * d, std=0.5)
    norm_weight = (1 + r.normal(d, std=0.1)).to(norm_dtype)
    freqs = rope_frequencies(rope, 160000.0, Yarn(factor=4, original_seq_len=64))
    kv_state, score_state = compressor_state(b, ratio, d, overlap)
    if stale_state:
        kv_state.copy_(r.normal(*kv_state.shape))
        score_state.copy_(r.normal(*score_state.shape))
    calls, start = [], 0
    for size in chunks:
        kv_chunk, score_chunk = kv[:, start : start + size], score[:, start : start + size]
        if layout == "contiguous":
            kv_chunk, score_chunk = kv_chunk.contiguous(), score_chunk.contiguous()
        position = start if offsets is None else torch.tensor([start + o for o in offsets])
        state = (kv_state, score_state, ratio, overlap, position, 1e-6) + (records or (out_dtype,))
        calls.append((kv_chunk, score_chunk, ape, norm_weight, freqs, *state))
        start += size
    return calls


def kv_compress_store_case(
    name: str, seed: int, chunks: tuple[int, ...], ratio: int = 4, overlap: bool = True, b: int = 2, d: int = 32,
    rope: int = 16, records: tuple[int, int] = (16, 8), norm_dtype=F32, stale_state: bool = False,
    layout: str = "contiguous", position: str = "int", offsets: tuple[int, ...] | None = None, shared: bool = False,
    order: str = "shuffled", spare: int = 3, first: int = 0, wide: bool = False, slot_dtype=torch.int64,
) -> Case:
    """:func:`kv_compress_case`'s ``kv_compress_fp8`` calls (``records=(rope_dim, tile)``; the other
    parameters up to ``offsets`` as there) storing their records into one store, which the calls
    share (a state: compared after the last call, every row any call stored into).

    Entry j of a sequence (positions [j*m, (j+1)*m)) is stored at that sequence's row
    ``row_of[j]``, as the model's compressed cache keeps entry j at row W + j: a call at position p
    stores its n rows at the rows of entries p // m .. p // m + n - 1. At a tensor position a
    sequence's zero rows past its new entries land on the rows of its next entries, which a later
    call overwrites (the model's scheme). ``order="shuffled"``: row_of is a seeded permutation of the
    store's rows (slots in no sorted order), one per sequence or, with ``shared``, one the batch
    shares (slots [1, n]; only where the batch is at one position); ``"ascending"``: row_of[j] = j.

    The store: [b, N, record] uint8 of random bytes (rows no call stores into must keep them), N the
    rows the entries need plus ``spare``, the rows ``first..`` of a buffer ``first + N`` rows long
    (``first`` > 0: a strided view, as the model's compressed rows after its window ring); ``wide``:
    each record the first half of a row twice as wide (rows no single record stride steps through).
    ``position``: how each call passes start_pos: ``"int"``, ``"tensor"`` (0-d) or
    ``"per-sequence"`` ([B], the streams starting at ``offsets``); slots [B or 1, n] of ``slot_dtype``.
    """
    if (position == "per-sequence") != (offsets is not None) or position not in POSITION_FORMS:
        raise ValueError(f"position {position!r} with offsets {offsets}: per-sequence positions need offsets")
    if shared and offsets is not None:
        raise ValueError("slots shared by the batch need the batch at one position")
    r = _Rand(seed)
    calls = _compress_calls(
        r, chunks, ratio, overlap, b, d, rope, norm_dtype, None, stale_state, layout, records, offsets
    )
    index = get_spec("kv_compress_fp8").position_index()  # kv_compress_store's too: store and slots follow it
    if position == "tensor":
        calls = [(*args[:index], torch.tensor(args[index]), *args[index + 1 :]) for args in calls]
    writes = []  # per call: each sequence's first entry, and the rows n the call stores
    for args in calls:
        start, seq_len = args[index], args[0].shape[1]
        n = most_new_entries(seq_len, ratio) if isinstance(start, torch.Tensor) else new_entries(start, seq_len, ratio)
        starts = start.tolist() if isinstance(start, torch.Tensor) and start.dim() else [int(start)] * b
        writes.append(([p // ratio for p in starts], n))
    rows = max(entry + n for entries, n in writes for entry in entries) + spare
    row_of = [torch.randperm(rows, generator=r.gen) if order == "shuffled" else torch.arange(rows)
              for _ in range(1 if shared else b)]
    width = kv_record_bytes(d, *records)
    store = r.ints(0, 256, b, first + rows, 2 * width if wide else width, dtype=torch.uint8)[:, first:, :width]
    stored = []
    for args, (entries, n) in zip(calls, writes):
        slots = torch.stack([row[entry : entry + n] for row, entry in zip(row_of, entries)]).to(slot_dtype)
        stored.append((*args[: index + 1], store, slots, *args[index + 1 :]))
    return _case("kv_compress_store", name, *stored)


def at_tensor_position(case: Case) -> Case:
    """``case`` with the position of every call a 0-d int64 tensor (on the kernel's device once
    materialised): the position as data, as a captured decode graph passes it. Kernels must return
    what they return at the int position, rows a tensor position pads zero (``OpSpec.position``)."""
    index = get_spec(case.op).position_index()
    calls = tuple((*args[:index], torch.tensor(args[index]), *args[index + 1 :]) for args in case.calls)
    return Case(case.op, f"{case.name} [start_pos a tensor]", calls, case.requirements)


def _position(start_pos: int | tuple[int, ...]) -> int | torch.Tensor:
    """A case's start_pos: an int, or a tuple of per-sequence positions as a [B] tensor."""
    return torch.tensor(start_pos) if isinstance(start_pos, tuple) else start_pos


def indexer_topk_case(
    name: str, seed: int, s: int, n: int, start_pos: int | tuple[int, ...] = 0, topk: int = 4, b: int = 2,
    h: int = 4, d: int = 32, ratio: int = 4, dtype=BF16, variant: str = "random", layout: str = "contiguous",
    weights_dtype=F32, weights_scale: float = 1.0, offset: int = 0,
) -> Case:
    """Variants: ``random``; ``tied-keys`` (entries 0, 2 and 3 equal: exact score ties);
    ``zero-query`` (query 0 is zero: all its scores tie at 0); ``negative-weights``. A tuple
    start_pos gives each sequence its own position. The head weights come in ``weights_dtype``
    (bf16: the model's projection), the op multiplying them by ``weights_scale`` (a negative one
    reverses the order: a kernel that drops it fails) and returning entry j as ``offset + j``."""
    q, weights, keys = _indexer_inputs(_Rand(seed), s, n, b, h, d, dtype, variant, layout, weights_dtype)
    args = (q, weights, keys.to(dtype), ratio, _position(start_pos), topk, weights_scale, offset)
    return _case("indexer_topk", name, args)


def indexer_topk_packed_case(
    name: str, seed: int, key_format: str, s: int, n: int, start_pos: int | tuple[int, ...] = 0, topk: int = 4, b: int = 2,
    h: int = 4, d: int = 64, ratio: int = 4, dtype=BF16, variant: str = "random", keys: str = "varied",
    layout: str = "contiguous", weights_dtype=F32, weights_scale: float = 1.0, offset: int = 0,
) -> Case:
    """indexer_topk's inputs (``variant``, ``layout``, the head weights as there) with fp32 keys
    packed by ``index_key_pack``. Keys: ``varied`` (each key scaled by 2^[-12, 12] and each 32-block
    of it by 2^[-6, 6]: FP4 block scales far apart, FP8 subnormal codes beside large ones in one key);
    ``zero`` (every third key zero as well: scales at their floor, exact score ties at 0);
    ``plain-scale`` (fp8 only: each key's scale times a factor in [0.6, 1.6), a non-power-of-two
    fp32 scale as vLLM's non-ue8m0 mode writes, so the decoded values round to q's dtype)."""
    r = _Rand(seed)
    q, weights, dense = _indexer_inputs(r, s, n, b, h, d, dtype, variant, layout, weights_dtype, varied_keys=True)
    if keys == "zero":
        dense[:, ::3] = 0.0
    packed = index_key_pack(dense, key_format)
    if keys == "plain-scale":
        if key_format != "fp8":
            raise ValueError(f"plain-scale keys are fp8 keys, got key_format={key_format!r}")
        scale = packed[..., d:].contiguous().view(F32) * r.uniform(b, n, 1, low=0.6, high=1.6)
        packed[..., d:] = scale.view(torch.uint8)
    args = (q, weights, packed, key_format, ratio, _position(start_pos), topk, weights_scale, offset)
    return _case("indexer_topk_packed", name, args)


def _indexer_inputs(
    r: _Rand, s: int, n: int, b: int, h: int, d: int, dtype: torch.dtype, variant: str, layout: str,
    weights_dtype: torch.dtype, varied_keys: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [B, S, H, d] in dtype and layout, weights [B, S, H] in weights_dtype, keys [B, N, d] fp32)
    of an indexer case; ``varied_keys`` scales keys and their 32-blocks by powers of two (see above)."""
    q = r.normal(b, s, h, d)
    keys = r.normal(b, n, d)
    if varied_keys:
        blocks = keys.view(b, n, -1, min(d, FP4_TILE))
        blocks *= torch.exp2(r.ints(-12, 13, b, n, 1, 1).float() + r.ints(-6, 7, b, n, blocks.shape[2], 1).float())
    weights = r.normal(b, s, h, std=(h * d) ** -0.5, dtype=weights_dtype)
    if variant == "tied-keys" and n > 3:
        keys[:, 2] = keys[:, 3] = keys[:, 0]
    elif variant == "zero-query":
        q[:, 0] = 0.0
    elif variant == "negative-weights":
        weights = -weights.abs()
    q = q.to(dtype)
    if layout != "contiguous":  # heads and tokens swapped in memory
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    return q, weights, keys


def _window_indices(s: int, window: int, n_entries: int, ratio: int) -> torch.Tensor:
    """Prefill indices like the model builds them: the window ``max(0, t-W+1)..t`` padded with -1,
    then the compressed entries ``S + j`` visible to t (``j < floor((t+1)/m)``), padded with -1."""
    rows = []
    for t in range(s):
        window_slots = [p for p in range(t - window + 1, t + 1) if p >= 0]
        entries = [s + j for j in range(min(n_entries, (t + 1) // ratio))]
        rows.append(window_slots + [-1] * (window - len(window_slots)) + entries + [-1] * (n_entries - len(entries)))
    return torch.tensor(rows)


def _attention_inputs(
    r: _Rand, b: int, s: int, h: int, d: int, n: int, k: int, indices: str, sink: str, window: int, n_entries: int,
    ratio: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 q [B, S, H, D], keys [B, N, D] and sinks [H], int64 indices [B, S, K] (the variants of
    :func:`sparse_attention_case`; ``indices="window"`` makes N = S + n_entries)."""
    if indices == "window":
        n = s + n_entries
        idx = _window_indices(s, window, n_entries, ratio).expand(b, s, -1).clone()
    else:
        idx = r.ints(0, n, b, s, k)
        if indices == "duplicates":
            idx[..., 1::2] = idx[..., 0::2][..., : idx[..., 1::2].shape[-1]]
        else:
            idx = torch.where(r.uniform(b, s, k) < 0.25, -1, idx)
        if indices == "empty-query":
            idx[:, 0] = -1
    q = r.normal(b, s, h, d)
    kv = r.normal(b, n, d)
    sinks = r.normal(h)
    if sink == "dominant":
        sinks += 6.0
    elif sink == "neg-inf":
        sinks[0] = float("-inf")
    return q, kv, idx, sinks


def _rope_freqs(rope: int, yarn: bool) -> torch.Tensor:
    """The frequencies of ``rope`` rotated dims: base 10000, or base 160000 with YaRN (factor 4,
    original length 64)."""
    return rope_frequencies(rope, 160000.0, Yarn(4, 64)) if yarn else rope_frequencies(rope, 10000.0)


def _output_rotation(
    r: _Rand, b: int, s: int, rotate: int, yarn: bool, pos_dtype: torch.dtype, positions: str
) -> tuple[torch.Tensor, torch.Tensor] | tuple[()]:
    """The attention output's inverse RoPE arguments ``(positions, freqs)``, or none for ``rotate=0``.

    positions [B, S] random in [0, 1000) (|theta| < 2^10, see tolerances); ``positions="shared"``:
    one row [1, S] expanded over the batch (batch stride 0, as a batch of sequences at the same
    offsets shares one row). freqs of the last ``rotate`` dims (:func:`_rope_freqs`).
    """
    if not rotate:
        return ()
    rows = r.ints(0, 1000, 1 if positions == "shared" else b, s, dtype=pos_dtype).expand(b, s)
    return rows, _rope_freqs(rotate, yarn)


def sparse_attention_case(
    name: str, seed: int, b: int = 2, s: int = 5, h: int = 4, d: int = 64, n: int = 16, k: int = 8, dtype=BF16,
    indices: str = "random", sink: str = "normal", window: int = 8, n_entries: int = 0, ratio: int = 4,
    index_dtype=torch.int32, layout: str = "contiguous", rotate: int = 0, yarn: bool = False,
    pos_dtype=torch.int64, positions: str = "random",
) -> Case:
    """Indices: ``random`` (a quarter -1); ``window`` (the model's prefill layout: raw tokens then
    compressed entries, n = s + n_entries); ``empty-query`` (query 0 has no valid slot);
    ``duplicates`` (repeated keys). Sinks: ``normal``; ``dominant`` (+6); ``neg-inf`` (head 0).
    ``layout="pool"``: kv one pool of rows expanded over the batch (batch stride 0: a paged cache).
    ``rotate`` > 0: the output's inverse RoPE on its last ``rotate`` dims (:func:`_output_rotation`,
    drawn after every other value, so the cases without it keep theirs)."""
    r = _Rand(seed)
    q, kv, idx, sinks = _attention_inputs(r, b, s, h, d, n, k, indices, sink, window, n_entries, ratio)
    n = kv.shape[1]
    if layout == "pool":
        kv = kv[:1].to(dtype).expand(b, -1, -1)
    elif layout != "contiguous":
        q = q.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
        kv = torch.cat((kv, r.normal(b, 3, d)), dim=1).to(dtype)[:, :n]  # a prefix of a longer cache
    args = (q.to(dtype), kv.to(dtype), idx.to(index_dtype), sinks, d**-0.5)
    return _case("sparse_attention", name, args + _output_rotation(r, b, s, rotate, yarn, pos_dtype, positions))


def sparse_attention_fp8_case(
    name: str, seed: int, b: int = 2, s: int = 5, h: int = 4, d: int = 64, n: int = 16, k: int = 8,
    rope_dim: int = 16, tile: int = 16, dtype=BF16, indices: str = "random", sink: str = "normal", window: int = 8,
    n_entries: int = 0, ratio: int = 4, tile_spread: int = 4, subnormal: bool = False, q_std: float = 1.0,
    index_dtype=torch.int32, layout: str = "contiguous", rotate: int = 0, yarn: bool = False,
    pos_dtype=torch.int64, positions: str = "random",
) -> Case:
    """:func:`sparse_attention_case`'s inputs with the keys packed into FP8 records by the reference
    ``kv_cache_pack``: each nope tile scaled by ``2^u``, u uniform in [-tile_spread, tile_spread], so
    the ue8m0 tile exponents spread over 2 tile_spread + 1 values; ``subnormal`` shrinks every 7th
    nope element by 2^-14 (below 2^-6 of its tile's scale: subnormal e4m3 codes); ``q_std`` keeps
    the logits moderate under wide spreads. ``layout="strided"``: q transposed in memory, the
    records every other row of a longer buffer; ``"pool"``: the records one pool expanded over the
    batch (batch stride 0: a paged cache). ``rotate``, ``yarn``, ``pos_dtype``, ``positions``: the
    output's inverse RoPE, as for :func:`sparse_attention_case`."""
    r = _Rand(seed)
    q, kv, idx, sinks = _attention_inputs(r, b, s, h, d, n, k, indices, sink, window, n_entries, ratio)
    n, nope = kv.shape[1], d - rope_dim
    exponents = r.ints(-tile_spread, tile_spread + 1, b, n, nope // tile).float()
    kv[..., :nope] *= torch.exp2(exponents).repeat_interleave(tile, dim=-1)
    if subnormal:
        kv[..., :nope:7] *= 2.0**-14
    records = kv_cache_pack(kv, rope_dim, tile)
    q = (q * q_std).to(dtype)
    if layout == "pool":
        records = records[:1].expand(b, -1, -1)
    elif layout != "contiguous":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        buffer = torch.zeros(b, 2 * n, records.shape[-1], dtype=torch.uint8)
        buffer[:, ::2] = records
        records = buffer[:, ::2]
    args = (q, records, idx.to(index_dtype), sinks, d**-0.5, rope_dim, tile)
    return _case("sparse_attention_fp8", name, args + _output_rotation(r, b, s, rotate, yarn, pos_dtype, positions))


def _streams(r: _Rand, b: int, s: int, n: int, d: int, values: str, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """n residual streams [B, S, n, D] of N(0, 1) in ``dtype`` and ``layout``; ``values``:
    ``"zero-token"`` (the first token all zeros) or ``"equal streams"`` (one stride-0 view of the
    first stream, as the model's first layer receives its embedding)."""
    x = r.normal(b, s, n, d)
    if values == "zero-token":
        x[0, 0] = 0.0
    x = strided(x.to(dtype), layout)
    return x[:, :, :1].expand(b, s, n, d) if values == "equal streams" else x


def _post_addend(r: _Rand, f: torch.Tensor, values: str, layout: str) -> tuple[torch.Tensor] | tuple[()]:
    """hc_post's ``addend`` [B, S, D] in f's dtype and ``layout`` (the sub-layer output's second
    part), or none for ``values="none"``.

    ``"random"``: N(0, 1), so that ``f + addend`` rounds; ``"cancelling"``: N(0, 1) with every
    third element ``-f`` (``f + addend`` exactly 0) and every third from the second
    ``-f (1 + eps)`` rounded to f's dtype (eps its machine epsilon: ``f + addend`` is one or two
    ulps of f against f's sign, exact by Sterbenz's lemma).
    """
    if values == "none":
        return ()
    addend = r.normal(*f.shape).to(f.dtype)
    if values == "cancelling":
        flat, f_flat = addend.view(-1), f.view(-1)
        flat[::3] = -f_flat[::3]
        flat[1::3] = (-f_flat[1::3].double() * (1 + torch.finfo(f.dtype).eps)).to(f.dtype)
    return (strided(addend, layout),)


def hc_case(
    name: str, seed: int, op: str, b: int = 2, s: int = 3, n: int = 4, d: int = 32, dtype=BF16, iters: int = 20,
    values: str = "normal", layout: str = "contiguous", normed: bool = False, addend: str = "none",
) -> Case:
    """``hc_pre`` / ``hc_head`` (streams + mix parameters) or ``hc_post`` (sub-layer output,
    streams, post in [0, 2] and a column-normalised comb); ``values`` as :func:`_streams`.
    ``normed`` (hc_pre / hc_head): a folded RMSNorm weight as ``norm_weight``, magnitudes
    uniform in [0.5, 2], every third negative. ``addend`` (hc_post): the sub-layer output in two
    parts (:func:`_post_addend`, drawn after every other value, so the cases without it keep theirs).
    ``hc_post_pre``: hc_post's inputs, then hc_pre's parameters (``normed`` and ``addend`` as there);
    with ``"zero-token"`` f's first token is zero too, so the streams hc_pre reads have a zero token."""
    r = _Rand(seed)
    x = _streams(r, b, s, n, d, values, dtype, layout)
    if op in ("hc_post", "hc_post_pre"):
        f = r.normal(b, s, d, dtype=dtype)
        post = 2 * torch.sigmoid(r.normal(b, s, n))
        comb = torch.softmax(r.normal(b, s, n, n), dim=-2)
        post_args = (f, x, post, strided(comb, layout))
        if op == "hc_post":
            return _case(op, name, post_args + _post_addend(r, f, addend, layout))
        if values == "zero-token":
            f[0, 0] = 0.0
    mixes = n if op == "hc_head" else (2 + n) * n
    fn = r.normal(mixes, n * d, std=(n * d) ** -0.5)
    base = r.normal(mixes, std=0.5)
    scale = r.uniform(1 if op == "hc_head" else 3, low=0.5, high=2.0)
    norm_weight = None
    if normed:
        norm_weight = r.uniform(d, low=0.5, high=2.0)
        norm_weight[::3] *= -1
    if op == "hc_pre":
        return _case(op, name, (x, fn, base, scale, iters, 1e-6, 1e-6, norm_weight))
    if op == "hc_post_pre":
        pre_args = (fn, base, scale, iters, 1e-6, 1e-6, norm_weight)
        return _case(op, name, post_args + pre_args + _post_addend(r, f, addend, layout))
    return _case(op, name, (x, fn, base, scale, 1e-6, 1e-6, norm_weight))


def rope_case(
    name: str, seed: int, b: int = 2, s: int = 5, h: int = 3, d: int = 32, rope: int = 16, dtype=BF16,
    inverse: bool = False, yarn: bool = False, pos_dtype=torch.int64, layout: str = "contiguous",
) -> Case:
    """Positions random in [0, 1000) per batch row (|theta| < 2^10, see tolerances)."""
    r = _Rand(seed)
    x = r.normal(b, s, h, d, dtype=dtype)
    positions = r.ints(0, 1000, b, s, dtype=pos_dtype)
    return _case("rope", name, (strided(x, layout), positions, _rope_freqs(rope, yarn), inverse))


def rms_norm_rope_case(
    name: str, seed: int, b: int = 2, s: int = 3, h: int = 4, d: int = 64, rope: int = 16, dtype=BF16,
    weighted: bool = False, yarn: bool = False, pos_dtype=torch.int64, layout: str = "contiguous",
) -> Case:
    """Heads of N(0, 1) times a per-head magnitude in 2^-8..2^8 (the norm takes each to unit rms);
    weight in [0.5, 1.5] or None; positions random in [0, 1000) (|theta| < 2^10, see tolerances)."""
    r = _Rand(seed)
    x = r.normal(b, s, h, d) * torch.exp2(r.ints(-8, 9, b, s, h, 1).to(F32))
    weight = r.uniform(d, low=0.5, high=1.5) if weighted else None
    positions = r.ints(0, 1000, b, s, dtype=pos_dtype)
    args = (strided(x.to(dtype), layout), weight, 1e-6, positions, _rope_freqs(rope, yarn))
    return _case("rms_norm_rope", name, args)


def rms_norm_case(
    name: str, seed: int, lead: tuple[int, ...] = (2, 3), d: int = 512, dtype=BF16, weighted: bool = True,
    values: str = "normal", layout: str = "contiguous",
) -> Case:
    """Rows of N(0, 1) times a per-row magnitude in 2^-8..2^8 (``"normal"``); ``"zero-rows"``: every
    other row all zeros (eps alone under the root); weight in [0.5, 1.5] or None."""
    r = _Rand(seed)
    x = r.normal(*lead, d) * torch.exp2(r.ints(-8, 9, *lead, 1).to(F32))
    if values == "zero-rows":
        x.view(-1, d)[::2] = 0.0
    weight = r.uniform(d, low=0.5, high=1.5) if weighted else None
    return _case("rms_norm", name, (strided(x.to(dtype), layout), weight, 1e-6))


def fp32_linear_case(
    name: str, seed: int, tokens: tuple[int, ...] = (1, 1), d: int = 256, n: int = 1000, dtype=F32,
    weight_dtype=BF16, layout: str = "contiguous",
) -> Case:
    """x ~ N(0, 1) (a normalised hidden state), W [n, d] ~ N(0, d^-1/2)."""
    r = _Rand(seed)
    x = r.normal(*tokens, d, dtype=dtype)
    weight = r.normal(n, d, std=d**-0.5, dtype=weight_dtype)
    return _case("fp32_linear", name, (strided(x, layout), weight))


def grouped_linear_case(
    name: str, seed: int, tokens: tuple[int, ...] = (1, 1), g: int = 4, r: int = 256, i: int = 256, dtype=BF16,
    weight: str = "fp8", scale_fmt: str = "e8m0", layout: str = "contiguous",
) -> Case:
    """x [*tokens, g, i] ~ N(0, 1); the weight [g*r, i]: ``"fp8"`` (e4m3 codes of every magnitude,
    128x128 scales around 2^-8, fp32 or e8m0) or dense ``"bf16"`` / ``"fp32"`` ~ N(0, i^-1/2)."""
    rand = _Rand(seed)
    x = rand.normal(*tokens, g, i, dtype=dtype)
    if weight == "fp8":
        w, scale = rand.e4m3(g * r, i), rand.scales(-(-g * r // 128), i // 128, fmt=scale_fmt, log2_center=-8)
    else:
        w, scale = rand.normal(g * r, i, std=i**-0.5, dtype=F32 if weight == "fp32" else BF16), None
    return _case("grouped_linear", name, (strided(x, layout), w, scale))


# --------------------------------------------------------------------------------------------
# Fixed cases per op
# --------------------------------------------------------------------------------------------


def _fp8_act_quant_cases(seed: int) -> list[Case]:
    c = fp8_act_quant_case
    return [
        c("bf16 [4,256] ue8m0", seed, (4, 256)),
        c("fp32 [2,3,128] fp32 scales", seed + 1, (2, 3, 128), dtype=F32, fmt="fp32"),
        c("bf16 block 64, one row", seed + 2, (1, 192), block=64),
        c("fp32 zero and tiny tiles (scale clamp)", seed + 3, (3, 384), dtype=F32, values="zero-tiny"),
        c("bf16 zero and tiny tiles, fp32 scales", seed + 4, (2, 256), fmt="fp32", values="zero-tiny"),
        c("fp32 saturation: x/s rounds past 448", seed + 5, (16, 128), dtype=F32, fmt="fp32", values="saturate"),
        c("fp32 huge values", seed + 6, (2, 256), dtype=F32, values="huge"),
        c("bf16 transposed view", seed + 7, (3, 256), layout="transposed"),
        c("fp32 sliced view", seed + 8, (2, 256), dtype=F32, layout="sliced"),
    ]


def _fp4_quant_cases(seed: int) -> list[Case]:
    c = fp4_quant_case
    return [
        c("bf16 [4,128]", seed, (4, 128)),
        c("fp32 [2,3,64] block 16", seed + 1, (2, 3, 64), dtype=F32, block=16),
        c("fp32 e2m1 midpoints (ties to even)", seed + 2, (4, 64), dtype=F32, values="ties"),
        c("fp32 zero and tiny blocks (scale clamp)", seed + 3, (2, 96), dtype=F32, values="zero-tiny"),
        c("bf16 block 64", seed + 4, (3, 128), block=64),
        c("bf16 strided view", seed + 5, (2, 64), layout="strided"),
        c("fp32 transposed view", seed + 6, (3, 64), dtype=F32, layout="transposed"),
    ]


def _hadamard_rotate_cases(seed: int) -> list[Case]:
    c = hadamard_rotate_case
    return [
        c("bf16 indexer query [1,2,64,128], FP4 blocks of 32", seed, (1, 2, 64, 128)),
        c("bf16 keys [2,3,128], rotation only", seed + 1, (2, 3, 128), fp4_block=0),
        c("fp32 keys [2,5,128], FP4 blocks of 32", seed + 2, (2, 5, 128), dtype=F32),
        c("fp32 n=256 (two K steps), FP4 blocks of 64", seed + 3, (3, 256), dtype=F32, fp4_block=64),
        c("bf16 n=8 (below the MMA's 16), FP4 blocks of 8", seed + 4, (5, 8), fp4_block=8),
        c("fp32 n=1, rotation only", seed + 5, (4, 1), dtype=F32, fp4_block=0),
        c("fp32 zero and tiny rows", seed + 6, (3, 128), dtype=F32, values="zero-tiny"),
        c("bf16 sliced view", seed + 7, (2, 128), layout="sliced"),
        c("fp32 transposed view, rotation only", seed + 8, (3, 64), dtype=F32, fp4_block=0, layout="transposed"),
        # with positions: RoPE first (the lightning indexer's query, v4_ops.md §8 step 1)
        c("bf16 V4 indexer query [2,1,64,128] roped (last 64 dims, YaRN) at per-sequence positions 293, 101, FP4 "
          "blocks of 32", seed + 9, (2, 1, 64, 128), positions=((293,), (101,)), yarn=True),
        c("fp32 [2,3,4,64] roped (last 32 dims), rotation only, 3 tokens per sequence, int32 positions up to 99999 "
          "(angles up to 1e5 radians)", seed + 10, (2, 3, 4, 64), dtype=F32, fp4_block=0,
          positions=((99997, 99998, 99999), (61, 62, 63)), rope=32, pos_dtype=torch.int32),
        c("fp32 [1,2,3,128] roped (last 64 dims), FP4 blocks of 64, positions 65534, 65535", seed + 11, (1, 2, 3, 128),
          dtype=F32, fp4_block=64, positions=((65534, 65535),)),
        c("bf16 [2,2,4,32] roped on every dim (2R = n), FP4 blocks of 16, int32 positions", seed + 12, (2, 2, 4, 32),
          fp4_block=16, positions=((7, 8), (517, 518)), rope=32, pos_dtype=torch.int32),
        c("bf16 roped query heads of a stacked projection [2,1,8,128], zero and tiny rows", seed + 13, (2, 1, 8, 128),
          values="zero-tiny", layout="heads", positions=((40,), (977,)), yarn=True),
    ]


def _index_key_pack_cases(seed: int) -> list[Case]:
    c = index_key_pack_case
    return [
        c("bf16 V4 keys [2,3,128] fp4 (68-byte records)", seed, (2, 3, 128), "fp4"),
        c("bf16 V4 keys [2,3,128] fp8 (132-byte records)", seed + 1, (2, 3, 128), "fp8"),
        c("fp32 d=64 fp4, zero and tiny blocks", seed + 2, (5, 64), "fp4", dtype=F32, values="zero-tiny"),
        c("fp32 d=64 fp8, zero and tiny blocks", seed + 3, (5, 64), "fp8", dtype=F32, values="zero-tiny"),
        c("fp32 d=96 fp8 (not a power of two)", seed + 4, (3, 96), "fp8", dtype=F32),
        c("bf16 d=256 fp4, saturating blocks", seed + 5, (4, 256), "fp4", values="saturate"),
        c("bf16 sliced view fp4", seed + 6, (3, 128), "fp4", layout="sliced"),
        c("fp32 transposed view fp8", seed + 7, (4, 128), "fp8", dtype=F32, layout="transposed"),
    ]


def _index_key_store_cases(seed: int) -> list[Case]:
    c = index_key_store_case
    return [
        c("bf16 V4 keys fp4 (68-byte records), decode step: each sequence's new entry at its own row (73, 25)", seed,
          ((73,), (25,)), rows=128, fmt="fp4"),
        c("bf16 V4 keys fp8 (132-byte records), decode step: each sequence's new entry at its own row (0, 31)",
          seed + 1, ((0,), (31,)), rows=32, fmt="fp8"),
        c("fp32 d=64 fp4, slots [1,n] shared by the batch", seed + 2, ((3, 9, 0),), rows=12, fmt="fp4", b=3, d=64,
          dtype=F32),
        c("bf16 fp8, 4 rows wrapping around the store's end", seed + 3, ((6, 7, 0, 1), (7, 0, 1, 2)), rows=8,
          fmt="fp8"),
        c("fp32 d=64 fp4, zero and tiny blocks", seed + 4, ((2, 0), (1, 2)), rows=3, fmt="fp4", d=64, dtype=F32,
          values="zero-tiny"),
        c("fp32 d=64 fp8, zero and tiny blocks", seed + 5, ((1,), (3,)), rows=4, fmt="fp8", d=64, dtype=F32,
          values="zero-tiny"),
        c("bf16 d=256 fp4, int32 slots, saturating blocks", seed + 6, ((5, 0, 3), (1, 4, 2)), rows=6, fmt="fp4", d=256,
          slot_dtype=torch.int32, values="saturate"),
        c("bf16 V4 keys fp8, store = rows 64.. of a bigger buffer (strided view)", seed + 7, ((5,), (2,)), rows=6,
          fmt="fp8", first=64),
        c("fp32 fp4 strided store view, int32 shared slots, sliced keys", seed + 8, ((2, 0),), rows=4, fmt="fp4",
          dtype=F32, slot_dtype=torch.int32, first=3, layout="sliced"),
        c("fp64 d=96 fp8 (not a power of two), one sequence fills every row (prefill)", seed + 9, ((4, 2, 0, 1, 3),),
          rows=5, fmt="fp8", b=1, d=96, dtype=torch.float64),
    ]


def _kv_cache_pack_cases(seed: int) -> list[Case]:
    c = kv_cache_pack_case
    return [
        c("bf16 V4 record (512 = 448 + 64)", seed, (2, 3)),
        c("fp32 dim 128, one nope tile", seed + 1, (5,), dim=128, dtype=F32),
        c("bf16 zero and tiny tiles", seed + 2, (2, 2), values="zero-tiny"),
        c("fp32 dim 96, tile 32, rope 32", seed + 3, (3,), dim=96, rope_dim=32, tile=32, dtype=F32),
        c("bf16 sliced view", seed + 4, (4,), dim=128, layout="sliced"),
    ]


def _kv_cache_store_cases(seed: int) -> list[Case]:
    c = kv_cache_store_case
    return [
        c("bf16 V4 record, decode step: ring slots p mod 128 per sequence (positions 293, 101)", seed,
          ((293 % 128,), (101 % 128,)), rows=128),
        c("bf16 V4 record, slots [1,n] shared by the batch", seed + 1, ((3, 9, 0),), rows=12),
        c("bf16 dim 128, 4 rows wrapping around the ring end", seed + 2, ((6, 7, 0, 1), (7, 0, 1, 2)), rows=8,
          dim=128),
        c("fp32 dim 96, tile 32, rope 32", seed + 3, ((4, 1), (0, 3), (2, 4)), rows=5, b=3, dim=96, rope_dim=32,
          tile=32, dtype=F32),
        c("bf16 zero and tiny tiles", seed + 4, ((1,), (3,)), rows=4, values="zero-tiny"),
        c("fp32 zero and tiny tiles, dim 96, tile 32", seed + 5, ((2, 0), (1, 2)), rows=3, dim=96, rope_dim=32,
          tile=32, dtype=F32, values="zero-tiny"),
        c("bf16 int32 slots", seed + 6, ((5, 0, 3), (1, 4, 2)), rows=6, dim=128, slot_dtype=torch.int32),
        c("bf16 V4 record, cache = rows 128.. of a bigger buffer (strided view)", seed + 7, ((5,), (2,)), rows=6,
          first=128),
        c("fp32 strided cache view, int32 shared slots, sliced kv", seed + 8, ((2, 0),), rows=4, dim=96, rope_dim=32,
          tile=32, dtype=F32, slot_dtype=torch.int32, first=3, layout="sliced"),
        c("one sequence fills every row (prefill)", seed + 9, ((4, 2, 0, 1, 3),), rows=5, b=1, dim=128),
        c("bf16 V4 record normed and rotated, decode step at positions 293, 101 (ring slots p mod 128), kv norm "
          "weight, YaRN frequencies", seed + 10, ((293 % 128,), (101 % 128,)), rows=128, positions=((293,), (101,)),
          weighted=True, yarn=True),
        c("fp32 dim 96, tile 32, rope 32, normed and rotated without a weight, 3 tokens at positions up to 99999",
          seed + 11, ((4, 1, 0), (2, 3, 4)), rows=5, dim=96, rope_dim=32, tile=32, dtype=F32,
          positions=((99997, 99998, 99999), (61, 62, 63))),
        c("bf16 dim 128 normed and rotated, int32 positions and slots [1,n] shared by the batch, weighted", seed + 12,
          ((3, 0),), rows=4, dim=128, slot_dtype=torch.int32, positions=((517, 518), (6, 7)), weighted=True,
          pos_dtype=torch.int32),
        c("bf16 normed and rotated zero and tiny tiles, sliced kv, cache a strided view", seed + 13, ((1,), (0,)),
          rows=3, first=2, values="zero-tiny", layout="sliced", positions=((40,), (977,)), weighted=True),
    ]


def _kv_cache_unpack_cases(seed: int) -> list[Case]:
    c = kv_cache_unpack_case
    return [
        c("V4 record (584 bytes)", seed, (2, 3)),
        c("dim 128 record", seed + 1, (5,), dim=128),
        c("dim 96, tile 32, rope 32", seed + 2, (3,), dim=96, rope_dim=32, tile=32),
        c("sliced rows", seed + 3, (4,), dim=128, layout="sliced"),
    ]


def _gemm_cases(op: str, seed: int) -> list[Case]:
    def c(name: str, offset: int, *args, **kwargs) -> Case:
        return gemm_case(name, seed + offset, op, *args, **kwargs)

    return [
        c("M4 N256 K256 bf16 out, fp32 scales", 0, 4, 256, 256),
        c("M1 N80 K128 e8m0 scales (decode, N % 128 != 0)", 1, 1, 80, 128, scale_fmt="e8m0"),
        c("M5 N200 K384 fp32 out, e8m0 scales", 2, 5, 200, 384, out_dtype=F32, scale_fmt="e8m0"),
        c("M3 N130 K256 zero tile, saturated codes", 3, 3, 130, 256, values="zero-tile"),
        c("M4 N96 K256 sliced a, transposed b", 4, 4, 96, 256, a_layout="sliced", b_layout="transposed"),
        c("M3 N64 K512 e8m0 scales over 2^±12 (fp4: 1x32 groups far apart)", 5, 3, 64, 512, scale_fmt="e8m0",
          values="wide-scales"),
    ]


def _act_quant_gemm_cases(seed: int) -> list[Case]:
    c = act_quant_gemm_case
    return [
        c("fp8 W: M4 N256 K256 bf16 x, fp32 scales", seed, 4, 256, 256),
        c("fp8 W: M1 N130 K128 e8m0 scales (decode, N % 128 != 0)", seed + 1, 1, 130, 128, scale_fmt="e8m0"),
        c("fp8 W: M5 N130 K384 fp32 x, fp32 out, e8m0 scales", seed + 2, 5, 130, 384, dtype=F32, out_dtype=F32,
          scale_fmt="e8m0"),
        c("fp8 W: M16 N64 K1024 bf16 x, fp32 out", seed + 3, 16, 64, 1024, out_dtype=F32),
        c("fp8 W: M3 N130 K384 zero and tiny tiles (the 1e-4 amax floor)", seed + 4, 3, 130, 384, values="zero-tiny"),
        c("fp8 W: M2 N130 K256 every tile far below the amax floor (subnormal codes)", seed + 14, 2, 130, 256,
          values="sub-floor"),
        c("fp8 W: M5 N96 K256 saturating tiles (x/s = 448; a scale doubled)", seed + 5, 5, 96, 256, scale_fmt="e8m0",
          values="saturate"),
        c("fp8 W: M33 N130 K256 fp32 x, e4m3 ties", seed + 6, 33, 130, 256, dtype=F32, values="ties"),
        c("fp8 W: M4 N96 K256 sliced x, transposed b", seed + 7, 4, 96, 256, x_layout="sliced", b_layout="transposed"),
        c("fp4 W: M1 N64 K128 e8m0 scales (decode)", seed + 8, 1, 64, 128, weights="fp4", scale_fmt="e8m0"),
        c("fp4 W: M16 N96 K256 fp32 x, fp32 out", seed + 9, 16, 96, 256, weights="fp4", dtype=F32, out_dtype=F32),
        c("fp4 W: M33 N80 K512 e8m0 scales over 2^±12", seed + 10, 33, 80, 512, weights="fp4", scale_fmt="e8m0",
          values="wide-scales"),
        c("fp4 W: M5 N64 K384 fp32 x, zero and tiny tiles", seed + 11, 5, 64, 384, weights="fp4", dtype=F32,
          values="zero-tiny"),
        c("fp4 W: M2 N64 K256 fp32 x, fp32 out, every tile far below the amax floor", seed + 15, 2, 64, 256,
          weights="fp4", dtype=F32, out_dtype=F32, values="sub-floor"),
        c("fp4 W: M4 N64 K256 saturating tiles, fp32 out", seed + 12, 4, 64, 256, weights="fp4", out_dtype=F32,
          values="saturate"),
        c("fp4 W: M5 N40 K256 e4m3 ties, sliced x, transposed b", seed + 13, 5, 40, 256, weights="fp4", values="ties",
          x_layout="sliced", b_layout="transposed"),
    ]


def _moe_gate_cases(seed: int) -> list[Case]:
    c = moe_gate_case
    return [
        c("sqrtsoftplus, bias, top-6 of 16, bf16", seed),
        c("sigmoid, 4 groups keep 2, fp32", seed + 1, score_func="sigmoid", n_groups=4, topk_groups=2, top_k=4,
          dtype=F32),
        c("softmax, no bias, top-2", seed + 2, score_func="softmax", bias=False, top_k=2, route_scale=1.0),
        c("hash routing", seed + 3, t=7, top_k=2, hash_vocab=32),
        c("exact ties: experts sharing weights", seed + 4, variant="tied-experts"),
        c("exact ties: zero token, no bias", seed + 5, bias=False, variant="zero-token"),
        c("all tokens to one expert", seed + 6, top_k=2, variant="one-expert"),
        c("experts that never win", seed + 7, top_k=4, variant="dead-experts"),
        c("one token (decode)", seed + 8, t=1),
        c("top-k = E", seed + 9, e=8, top_k=8),
        c("sliced x, transposed weight", seed + 10, layout="strided"),
    ]


def _moe_experts_cases(seed: int) -> list[Case]:
    c = moe_experts_case
    return [
        c("dense bf16", seed),
        c("dense fp32", seed + 1, dtype=F32),
        c("fp8 weights, fp32 scales", seed + 2, fmt="fp8"),
        c("fp8 weights, e8m0 scales", seed + 3, fmt="fp8", scale_fmt="e8m0"),
        c("fp4 weights, fp32 scales", seed + 4, fmt="fp4"),
        c("fp4 weights, e8m0 scales", seed + 5, fmt="fp4", scale_fmt="e8m0"),
        c("fp4 weights, fp32 activations", seed + 6, fmt="fp4", scale_fmt="e8m0", dtype=F32),
        c("fp4 weights, e8m0 scales over 2^±12", seed + 15, fmt="fp4", scale_fmt="e8m0", values="wide-scales"),
        c("fp8, I=256 (two blocks), zero token (scale clamp)", seed + 7, fmt="fp8", inter=256, values="zero-token"),
        c("empty slots (-1)", seed + 8, routing="empty-slots"),
        c("all tokens to one expert", seed + 9, fmt="fp4", scale_fmt="e8m0", routing="one-expert"),
        c("experts without tokens", seed + 10, e=8, routing="unused-experts"),
        c("SwiGLU clamp active", seed + 11, values="clamp"),
        c("SwiGLU clamp disabled (limit 0)", seed + 12, values="clamp", limit=0.0),
        c("one token, top-1", seed + 13, t=1, k=1, fmt="fp8", scale_fmt="e8m0"),
        # the model's shared expert at decode: a GPU kernel splits K over its few output tiles
        # and sees one sorted row (the first GPU run of the model failed to compile exactly this)
        c("shared expert: one token, one expert, V4-Flash widths, fp8", seed + 16, t=1, k=1, e=1, d=4096,
          inter=2048, fmt="fp8", scale_fmt="e8m0"),
        c("shared expert: one token, one expert, V4-Flash widths, bf16", seed + 17, t=1, k=1, e=1, d=4096,
          inter=2048),
        # the shared expert over a prompt, some tokens routed nowhere: GPU kernels may take row t for
        # token t with no routing tables (the CUDA backend does), where unrouted rows must be 0
        c("shared expert: 40 tokens, one expert, empty slots, fp8", seed + 18, t=40, k=1, e=1, d=256, inter=256,
          fmt="fp8", scale_fmt="e8m0", routing="empty-slots"),
        c("shared expert: 40 tokens, one expert, sliced x, transposed ids, fp4", seed + 19, t=40, k=1, e=1,
          fmt="fp4", scale_fmt="e8m0", layout="strided"),
        c("sliced x, transposed ids and w1", seed + 14, layout="strided"),
    ]


def _kv_compress_cases(seed: int) -> list[Case]:
    c = kv_compress_case
    cases = []
    for overlap in (True, False):
        kind = "overlapped m=4" if overlap else "plain m=4"
        for prefill in range(1, 8):  # shorter than m, then every offset mod m, then decode m+1 steps
            chunks = (prefill,) + (1,) * 5
            cases.append(c(f"{kind}: prefill {prefill} + 5 decode steps", seed + prefill, chunks, overlap=overlap))
    return cases + [
        c("overlapped m=4: prefill 19 (several entries)", seed + 20, (19, 1, 1)),
        c("plain m=8: prefill 13 + 4 decode steps", seed + 21, (13, 1, 1, 1, 1), ratio=8, overlap=False),
        c("plain m=16: prefill 5 (no entry) + 12 (completes one)", seed + 22, (5, 12), ratio=16, overlap=False),
        c("overlapped: chunked prefill 3+3+5+2", seed + 23, (3, 3, 5, 2)),
        c("start_pos 0 ignores a stale state", seed + 24, (6, 1), stale_state=True),
        c("kv/score as halves of one projection (sliced)", seed + 25, (7, 1, 1), layout="sliced"),
        c("bf16 norm weight", seed + 26, (9, 1), norm_dtype=BF16),
        c("fp32 entries (out_dtype)", seed + 27, (10, 1, 1), out_dtype=F32),
        at_tensor_position(c("overlapped m=4: prefill 6 + 5 decode steps", seed + 28, (6,) + (1,) * 5)),
        at_tensor_position(c("plain m=16: prefill 5 (no entry) + 12 (completes one)", seed + 29, (5, 12),
                             ratio=16, overlap=False)),
        at_tensor_position(c("start_pos 0 ignores a stale state", seed + 30, (6, 1), stale_state=True)),
        c("per-sequence positions 0, 3, 8: prefill 5 + 4 decode steps", seed + 31, (5, 1, 1, 1, 1), b=3,
          offsets=(0, 3, 8)),
        c("plain m=8, per-sequence positions 0, 13", seed + 32, (3, 1, 1, 6), ratio=8, overlap=False, offsets=(0, 13)),
    ]


def _kv_compress_fp8_cases(seed: int) -> list[Case]:
    c = partial(kv_compress_case, records=(16, 8))  # d=32: 2 nope tiles of 8, 16 bf16 RoPE dims
    return [
        c("overlapped m=4: prefill 6 + 5 decode steps", seed, (6,) + (1,) * 5),
        c("plain m=4: prefill 3 + 5 decode steps", seed + 1, (3,) + (1,) * 5, overlap=False),
        c("overlapped: chunked prefill 3+3+5+2", seed + 2, (3, 3, 5, 2)),
        c("plain m=16: prefill 5 (no entry) + 12 (completes one)", seed + 3, (5, 12), ratio=16, overlap=False),
        c("start_pos 0 ignores a stale state", seed + 4, (6, 1), stale_state=True),
        c("sliced kv/score, bf16 norm weight", seed + 5, (7, 1, 1), norm_dtype=BF16, layout="sliced"),
        c("V4 record geometry: d=512, rope 64, tile 64 (584 bytes)", seed + 6, (9, 1), b=1, d=512,
          rope=64, records=(64, 64)),
        at_tensor_position(c("plain m=4: prefill 3 + 5 decode steps", seed + 7, (3,) + (1,) * 5, overlap=False)),
        c("per-sequence positions 0, 6: prefill 3 + 3 decode steps", seed + 8, (3, 1, 1, 1), offsets=(0, 6)),
    ]


def _kv_compress_store_cases(seed: int) -> list[Case]:
    c = kv_compress_store_case  # records=(16, 8) at d=32, as kv_compress_fp8's; entry rows shuffled, 3 spare rows
    return [
        c("overlapped m=4: prefill 6 + 5 decode steps, each sequence's entry rows shuffled", seed, (6,) + (1,) * 5),
        c("plain m=4: prefill 3 + 5 decode steps, int32 slots [1,n] shared by the batch", seed + 1, (3,) + (1,) * 5,
          overlap=False, shared=True, slot_dtype=torch.int32),
        c("overlapped: chunked prefill 3+3+5+2, store = rows 8.. of a bigger buffer (strided view)", seed + 2,
          (3, 3, 5, 2), first=8),
        c("plain m=16: prefill 5 (no entry: slots [B,0]) + 12 (completes one)", seed + 3, (5, 12), ratio=16,
          overlap=False),
        c("start_pos 0 ignores a stale state, int32 slots", seed + 4, (6, 1), stale_state=True, slot_dtype=torch.int32),
        c("sliced kv/score, bf16 norm weight, records the first half of rows twice as wide", seed + 5, (7, 1, 1),
          norm_dtype=BF16, layout="sliced", wide=True),
        c("V4 record geometry: d=512, rope 64, tile 64 (584 bytes), store = rows 128.. of the cache buffer", seed + 6,
          (9, 1), b=1, d=512, rope=64, records=(64, 64), first=128),
        c("plain m=4: 9 single-token steps from position 0, entry j at row j (slots in order)", seed + 7, (1,) * 9,
          overlap=False, order="ascending", spare=1),
        c("overlapped m=4: prefill 6 + 5 decode steps [start_pos a tensor] (zero rows at the next entries' rows)",
          seed + 8, (6,) + (1,) * 5, position="tensor"),
        c("plain m=4: prefill 3 + 5 decode steps, int32 shared slots, strided store [start_pos a tensor]", seed + 9,
          (3,) + (1,) * 5, overlap=False, position="tensor", shared=True, slot_dtype=torch.int32, first=4),
        c("start_pos 0 ignores a stale state [start_pos a tensor]", seed + 10, (6, 1), stale_state=True,
          position="tensor"),
        c("per-sequence positions 0, 6: prefill 3 + 3 decode steps", seed + 11, (3, 1, 1, 1), position="per-sequence",
          offsets=(0, 6)),
        c("plain m=8, per-sequence positions 0, 13, 5: records the first half of rows twice as wide, strided store",
          seed + 12, (3, 1, 1, 6), ratio=8, overlap=False, b=3, position="per-sequence", offsets=(0, 13, 5),
          first=2, wide=True),
    ]


def _indexer_topk_cases(seed: int) -> list[Case]:
    c = indexer_topk_case
    return [
        c("prefill 11, top-4 > 2 visible (-1 slots)", seed, s=11, n=2),
        c("prefill 24, top-3 of up to 6", seed + 1, s=24, n=6, topk=3),
        c("prefill 3 < m: nothing visible", seed + 2, s=3, n=1),
        c("decode t=37, N=9", seed + 3, s=1, n=9, start_pos=37),
        c("decode with future entries in the cache", seed + 4, s=1, n=12, start_pos=21),
        c("chunk at start_pos 5", seed + 5, s=6, n=5, start_pos=5, topk=2),
        c("exact ties: equal keys", seed + 6, s=16, n=4, topk=2, variant="tied-keys"),
        c("exact ties: zero query", seed + 7, s=12, n=3, variant="zero-query"),
        c("negative weights", seed + 8, s=13, n=3, topk=2, variant="negative-weights"),
        c("fp32", seed + 9, s=9, n=2, dtype=F32),
        c("transposed q", seed + 10, s=10, n=2, topk=1, layout="transposed"),
        at_tensor_position(c("decode t=37, N=9", seed + 11, s=1, n=9, start_pos=37)),
        at_tensor_position(c("chunk at start_pos 5", seed + 12, s=6, n=5, start_pos=5, topk=2)),
        at_tensor_position(c("prefill 3 < m: nothing visible", seed + 13, s=3, n=1)),
        c("decode, per-sequence positions 2 (nothing visible), 15, 37", seed + 14, s=1, n=9, b=3, start_pos=(2, 15, 37)),
        c("chunk, per-sequence positions 5, 11", seed + 15, s=4, n=4, start_pos=(5, 11), topk=3),
        # the head weights' scale and the indices' offset: bf16 weights times V4's scale, entry j at
        # the attention window W + j (decode) or W + S + j (a chunk of S); a negative scale reverses
        # the order (a positive one cannot change it), so a kernel that drops the scale fails there
        c("bf16 weights x V4 scale, V4 heads (64 x 128): decode t=37, N=9, offset W=128", seed + 16, s=1, n=9,
          start_pos=37, h=64, d=128, weights_dtype=BF16, weights_scale=V4_INDEXER_SCALE, offset=128),
        c("bf16 weights x V4 scale: chunk of 16 from start_pos 20, offset W+S=144", seed + 17, s=16, n=9,
          start_pos=20, weights_dtype=BF16, weights_scale=V4_INDEXER_SCALE, offset=144),
        c("bf16 weights x -0.37 (order reversed), head dim 128, offset 7, -1 slots", seed + 18, s=13, n=3, topk=2,
          h=8, d=128, weights_dtype=BF16, weights_scale=-0.37, offset=7),
        c("bf16 weights x V4 scale: decode, per-sequence positions 2 (nothing visible), 15, 37, offset 128",
          seed + 19, s=1, n=9, b=3, start_pos=(2, 15, 37), weights_dtype=BF16, weights_scale=V4_INDEXER_SCALE,
          offset=128),
    ]


def _indexer_topk_packed_cases(seed: int) -> list[Case]:
    c = indexer_topk_packed_case
    cases = []
    for i, fmt in enumerate(("fp4", "fp8")):
        first = seed + 10 * i
        cases += [
            c(f"{fmt}: prefill 11, top-4 > 2 visible (-1 slots)", first, fmt, s=11, n=2),
            c(f"{fmt}: decode t=37, N=9", first + 1, fmt, s=1, n=9, start_pos=37),
            c(f"{fmt}: chunk at start_pos 5, zero keys", first + 2, fmt, s=6, n=5, start_pos=5, topk=3, keys="zero"),
            c(f"{fmt}: exact ties: equal keys", first + 3, fmt, s=16, n=4, topk=2, variant="tied-keys"),
            c(f"{fmt}: negative weights, transposed q", first + 4, fmt, s=13, n=3, topk=2,
              variant="negative-weights", layout="transposed"),
            c(f"{fmt}: fp32, head dim 128", first + 5, fmt, s=9, n=4, d=128, dtype=F32),
        ]
    return cases + [
        c("fp8: non-power-of-two scales", seed + 20, "fp8", s=10, n=3, keys="plain-scale"),
        c("fp8: non-power-of-two scales, fp32", seed + 21, "fp8", s=10, n=3, dtype=F32, keys="plain-scale"),
        *(at_tensor_position(c(f"{fmt}: decode t=37, N=9", seed + 22 + i, fmt, s=1, n=9, start_pos=37))
          for i, fmt in enumerate(("fp4", "fp8"))),
        *(c(f"{fmt}: decode, per-sequence positions 3, 21, 37", seed + 24 + i, fmt, s=1, n=9, b=3,
            start_pos=(3, 21, 37)) for i, fmt in enumerate(("fp4", "fp8"))),
        # the head weights' scale and the indices' offset, as indexer_topk's cases
        c("fp4: bf16 weights x V4 scale, V4 heads (64 x 128): decode t=37, N=9, offset W=128", seed + 26, "fp4",
          s=1, n=9, start_pos=37, h=64, d=128, weights_dtype=BF16, weights_scale=V4_INDEXER_SCALE, offset=128),
        c("fp8: bf16 weights x V4 scale: chunk of 16 from start_pos 20, offset W+S=144", seed + 27, "fp8", s=16,
          n=9, start_pos=20, weights_dtype=BF16, weights_scale=V4_INDEXER_SCALE, offset=144),
        c("fp4: fp32, weights x -0.37 (order reversed), offset 7, -1 slots", seed + 28, "fp4", s=13, n=3,
          topk=2, dtype=F32, weights_scale=-0.37, offset=7),
        c("fp8: bf16 weights x V4 scale: decode, per-sequence positions 2 (nothing visible), 21, 37, offset 128",
          seed + 29, "fp8", s=1, n=9, b=3, start_pos=(2, 21, 37), weights_dtype=BF16,
          weights_scale=V4_INDEXER_SCALE, offset=128),
    ]


def _sparse_attention_cases(seed: int) -> list[Case]:
    c = sparse_attention_case
    return [
        c("prefill 5 shorter than window 8", seed, s=5, indices="window"),
        c("prefill 11: window 8 + 2 compressed entries (m=4)", seed + 1, s=11, indices="window", n_entries=2),
        c("random slots with -1", seed + 2),
        c("query without valid slots", seed + 3, indices="empty-query"),
        c("duplicate indices", seed + 4, indices="duplicates"),
        c("dominant sinks", seed + 5, sink="dominant"),
        c("-inf sink", seed + 6, sink="neg-inf"),
        c("fp32", seed + 7, dtype=F32),
        c("head_dim 512", seed + 8, b=1, s=2, h=2, d=512, n=12, k=6),
        c("transposed q, kv prefix of a cache, int64 indices", seed + 9, layout="transposed", index_dtype=torch.int64),
        c("kv one pool shared by a batch of 3 (batch stride 0: a paged cache)", seed + 10, b=3, layout="pool"),
        # the output rotated back by its query's inverse RoPE (V4, before the output projection)
        c("output rotated back: last 16 dims, int64 positions", seed + 11, rotate=16),
        c("output rotated back: fp32, YaRN, int32 positions", seed + 12, dtype=F32, rotate=16, yarn=True,
          pos_dtype=torch.int32),
        c("output rotated back: head_dim 512, rope 64, YaRN (V4 geometry)", seed + 13, b=1, s=2, h=2, d=512, n=12,
          k=6, rotate=64, yarn=True),
        c("output rotated back: prefill 11, window 8 + 2 compressed entries, int32 positions", seed + 14, s=11,
          indices="window", n_entries=2, rotate=16, pos_dtype=torch.int32),
        c("output rotated back: kv pool and positions [1, S] shared by a batch of 3 (stride 0)", seed + 15, b=3,
          layout="pool", rotate=16, positions="shared"),
    ]


def _sparse_attention_fp8_cases(seed: int) -> list[Case]:
    c = sparse_attention_fp8_case
    return [
        c("V4 record (584 B: 448 e4m3 + 64 bf16 + 7 scales + pad), decode", seed, s=1, h=3, d=512, rope_dim=64,
          tile=64, n=12, k=6),
        c("prefill 11: window 8 + 2 compressed entries (m=4), 200 B records", seed + 1, s=11, d=128, rope_dim=64,
          tile=64, indices="window", n_entries=2),
        c("random slots with -1, 88 B records (3 tiles of 16, rope 16)", seed + 2),
        c("query without valid slots", seed + 3, indices="empty-query"),
        c("duplicate indices", seed + 4, indices="duplicates"),
        c("dominant sinks", seed + 5, sink="dominant"),
        c("-inf sink", seed + 6, sink="neg-inf"),
        c("fp32 q", seed + 7, dtype=F32),
        c("D=80, rope 24, tile 8: 7 tile scales, 112 B records", seed + 8, d=80, rope_dim=24, tile=8),
        c("tile exponents 2^-12..2^12 apart (e8m0 108..132), subnormal codes", seed + 9, tile_spread=12,
          subnormal=True, q_std=2.0**-10),
        c("transposed q, records every other row, int64 indices", seed + 10, layout="strided", index_dtype=torch.int64),
        c("records one pool shared by a batch of 3 (batch stride 0: a paged cache)", seed + 11, b=3, layout="pool"),
        # the output rotated back by its query's inverse RoPE (V4, before the output projection)
        c("output rotated back: V4 record, decode, rope 64, YaRN", seed + 12, s=1, h=3, d=512, rope_dim=64, tile=64,
          n=12, k=6, rotate=64, yarn=True),
        c("output rotated back: prefill 11, 200 B records, rope 64, int32 positions", seed + 13, s=11, d=128,
          rope_dim=64, tile=64, indices="window", n_entries=2, rotate=64, pos_dtype=torch.int32),
        c("output rotated back: fp32 q, last 16 dims", seed + 14, dtype=F32, rotate=16),
        c("output rotated back: records pool and positions [1, S] shared by a batch of 3 (stride 0)", seed + 15,
          b=3, layout="pool", rotate=16, positions="shared"),
    ]


def _hc_cases(op: str, seed: int) -> list[Case]:
    cases = [
        hc_case("bf16", seed, op),
        hc_case("fp32", seed + 1, op, dtype=F32),
        hc_case("bf16 zero token", seed + 2, op, values="zero-token"),
        hc_case("fp32 transposed streams", seed + 3, op, dtype=F32, layout="transposed"),
        hc_case("n=2, one token", seed + 4, op, b=1, s=1, n=2, d=16),
        hc_case("bf16 equal streams, a stride-0 view", seed + 6, op, values="equal streams"),
    ]
    if op in ("hc_pre", "hc_post_pre"):
        cases.append(hc_case("one Sinkhorn iteration", seed + 5, op, iters=1))
    if op == "hc_post_pre":  # hc_post's forms and hc_pre's around one boundary, and its token counts
        cases += [
            hc_case("bf16 zero token, norm_weight", seed + 7, op, values="zero-token", normed=True),
            hc_case("fp32 transposed streams, norm_weight", seed + 8, op, dtype=F32, layout="transposed", normed=True),
            hc_case("bf16 f + addend", seed + 9, op, addend="random"),
            hc_case("fp32 f + addend, transposed streams and addend, norm_weight", seed + 10, op, dtype=F32,
                    layout="transposed", addend="random", normed=True),
            hc_case("bf16 addend cancelling f (sums of 0 and of an ulp or two), norm_weight", seed + 11, op,
                    addend="cancelling", normed=True),
            hc_case("fp32 addend cancelling f, every other element of wider rows", seed + 12, op, dtype=F32,
                    layout="strided", addend="cancelling"),
            hc_case("bf16 equal streams (stride 0), f + addend, norm_weight", seed + 13, op, values="equal streams",
                    addend="random", normed=True),
            hc_case("bf16 decode: 3 sequences of one token, f + addend", seed + 14, op, b=3, s=1, addend="random"),
            hc_case("fp32 prefill: 17 tokens, norm_weight", seed + 15, op, dtype=F32, b=1, s=17, normed=True),
            hc_case("bf16 n=4 D=512 (V4-like streams), addend cancelling f, norm_weight", seed + 16, op, b=1, s=2,
                    d=512, addend="cancelling", normed=True),
        ]
    elif op != "hc_post":  # with the sub-layer's (or the final) RMSNorm folded in
        cases += [
            hc_case("bf16 zero token, norm_weight", seed + 7, op, values="zero-token", normed=True),
            hc_case("fp32 transposed streams, norm_weight", seed + 8, op, dtype=F32, layout="transposed", normed=True),
            hc_case("bf16 equal streams (stride 0), norm_weight", seed + 9, op, values="equal streams", normed=True),
            hc_case("bf16 n=4 D=512 (V4-like streams), norm_weight", seed + 10, op, b=1, s=2, d=512, normed=True),
        ]
    else:  # the sub-layer output in two parts, f + addend (V4's MoE: the routed and the shared experts)
        cases += [
            hc_case("bf16 f + addend", seed + 7, op, addend="random"),
            hc_case("fp32 f + addend, transposed streams and addend", seed + 8, op, dtype=F32, layout="transposed",
                    addend="random"),
            hc_case("bf16 addend cancelling f (sums of 0 and of an ulp or two)", seed + 9, op, addend="cancelling"),
            hc_case("fp32 addend cancelling f, every other element of wider rows", seed + 10, op, dtype=F32,
                    layout="strided", addend="cancelling"),
            hc_case("bf16 equal streams (stride 0), f + addend", seed + 11, op, values="equal streams",
                    addend="random"),
            hc_case("bf16 n=4 D=4096 (V4-Flash), addend cancelling f", seed + 12, op, b=1, s=2, d=4096,
                    addend="cancelling"),
        ]
    return cases


def _rope_cases(seed: int) -> list[Case]:
    c = rope_case
    return [
        c("bf16 last 16 of 32 dims", seed),
        c("fp32 full rotation", seed + 1, dtype=F32, rope=32),
        c("inverse", seed + 2, inverse=True),
        c("YaRN frequencies, fp32", seed + 3, dtype=F32, yarn=True),
        c("int32 positions", seed + 4, pos_dtype=torch.int32),
        c("transposed view", seed + 5, dtype=F32, layout="transposed"),
    ]


def _rms_norm_cases(seed: int) -> list[Case]:
    c = rms_norm_case
    return [
        c("bf16 [2,3,512] weighted", seed),
        c("fp32 unweighted per-head rows [2,4,8,128]", seed + 1, lead=(2, 4, 8), d=128, dtype=F32, weighted=False),
        c("bf16 one row of 4096 (V4-Flash dim)", seed + 2, lead=(1,), d=4096),
        c("fp32 one row of 7168 (V4-Pro dim)", seed + 3, lead=(1,), d=7168, dtype=F32),
        c("bf16 zero rows", seed + 4, lead=(6,), d=256, values="zero-rows"),
        c("fp32 odd width 5", seed + 5, lead=(7,), d=5, dtype=F32),
        c("bf16 transposed view", seed + 6, lead=(3,), d=64, layout="transposed"),
        c("fp32 strided view, unweighted", seed + 7, lead=(2, 5), d=96, dtype=F32, weighted=False, layout="strided"),
        c("bf16 query heads of a stacked projection [2,3,8,64]", seed + 8, lead=(2, 3, 8), d=64, weighted=False,
          layout="heads"),
    ]


def _rms_norm_rope_cases(seed: int) -> list[Case]:
    c = rms_norm_rope_case
    return [
        c("bf16 query heads, no weight", seed),
        c("bf16 one KV head, weighted (V4: 512 dims, rope 64)", seed + 1, b=1, s=2, h=1, d=512, rope=64, weighted=True),
        c("fp32 weighted, full rotation", seed + 2, dtype=F32, rope=64, weighted=True),
        c("bf16 query heads of a stacked projection", seed + 3, h=8, layout="heads"),
        c("bf16 20 heads (more than a program's 16), int32 positions", seed + 4, b=1, s=2, h=20, d=32, rope=8,
          pos_dtype=torch.int32),
        c("fp32 YaRN frequencies, transposed view", seed + 5, dtype=F32, yarn=True, layout="transposed"),
        c("bf16 V4 query heads [1,1,64,512], rope 64", seed + 6, b=1, s=1, h=64, d=512, rope=64),
    ]


def _fp32_linear_cases(seed: int) -> list[Case]:
    c = fp32_linear_case
    return [
        c("decode: fp32 x, bf16 W", seed),
        c("batch 4 decode, bf16 x", seed + 1, tokens=(4, 1), dtype=BF16),
        c("3 tokens, fp32 W", seed + 2, tokens=(3,), weight_dtype=F32),
        c("prefill: 37 tokens", seed + 3, tokens=(1, 37), n=300),
        c("odd sizes D=100, N=77", seed + 4, tokens=(2,), d=100, n=77),
        c("sliced x", seed + 5, tokens=(2,), layout="sliced"),
    ]


def _grouped_linear_cases(seed: int) -> list[Case]:
    c = grouped_linear_case
    return [
        c("decode: bf16 x, FP8 W, e8m0 scales", seed),
        c("decode: fp32 scales (W rounded to bf16)", seed + 1, scale_fmt="fp32"),
        c("batch 4 decode, fp32 x", seed + 2, tokens=(4, 1), dtype=F32),
        c("3 tokens, R=64: groups share a scale block", seed + 3, tokens=(3,), g=6, r=64),
        c("R=96: groups straddle scale blocks, I=384", seed + 4, tokens=(2,), g=4, r=96, i=384),
        c("decode batch: 37 tokens, 8 groups", seed + 5, tokens=(37, 1), g=8, r=128, i=128),
        c("prefill: 2 x 40 tokens, fp32 scales", seed + 9, tokens=(2, 40), g=2, r=64, i=256, scale_fmt="fp32"),
        c("dense bf16 W", seed + 6, weight="bf16"),
        c("dense fp32 W, bf16 x (W rounded to bf16)", seed + 7, tokens=(2,), weight="fp32"),
        c("sliced x (rows twice as wide)", seed + 8, tokens=(2,), layout="sliced"),
    ]


_FIXED: dict[str, Callable[[int], list[Case]]] = {
    "fp8_act_quant": _fp8_act_quant_cases,
    "fp4_quant": _fp4_quant_cases,
    "hadamard_rotate": _hadamard_rotate_cases,
    "index_key_pack": _index_key_pack_cases,
    "index_key_store": _index_key_store_cases,
    "kv_cache_pack": _kv_cache_pack_cases,
    "kv_cache_store": _kv_cache_store_cases,
    "kv_cache_unpack": _kv_cache_unpack_cases,
    "fp8_gemm": lambda seed: _gemm_cases("fp8_gemm", seed),
    "fp4_gemm": lambda seed: _gemm_cases("fp4_gemm", seed),
    "act_quant_gemm": _act_quant_gemm_cases,
    "moe_gate": _moe_gate_cases,
    "moe_experts": _moe_experts_cases,
    "kv_compress": _kv_compress_cases,
    "kv_compress_fp8": _kv_compress_fp8_cases,
    "kv_compress_store": _kv_compress_store_cases,
    "indexer_topk": _indexer_topk_cases,
    "indexer_topk_packed": _indexer_topk_packed_cases,
    "sparse_attention": _sparse_attention_cases,
    "sparse_attention_fp8": _sparse_attention_fp8_cases,
    "hc_pre": lambda seed: _hc_cases("hc_pre", seed),
    "hc_post": lambda seed: _hc_cases("hc_post", seed),
    "hc_post_pre": lambda seed: _hc_cases("hc_post_pre", seed),
    "hc_head": lambda seed: _hc_cases("hc_head", seed),
    "rope": _rope_cases,
    "rms_norm": _rms_norm_cases,
    "rms_norm_rope": _rms_norm_rope_cases,
    "fp32_linear": _fp32_linear_cases,
    "grouped_linear": _grouped_linear_cases,
}


def _example_cases(op: str, seed: int) -> list[Case]:
    """The shared example arguments of :mod:`seahal.testing.examples` (bf16 and fp32 data; every
    expert weight format), so the suite also covers what other tools feed the ops."""
    from seahal.hal.errors import SpecError

    from .examples import example_args

    variants = [(dtype, "dense") for dtype in (BF16, F32)]
    if op == "moe_experts":
        variants += [(BF16, "fp8"), (BF16, "fp4")]
    cases = []
    for dtype, fmt in variants:
        try:
            formats = {"weight_format": fmt} if op == "moe_experts" else {}
            args, kwargs = example_args(op, dtype=dtype, seed=seed, **formats)
        except SpecError:
            continue  # the op has no form in this dtype
        label = f"example {_dtype_name(dtype)}" + (f" {fmt}" if fmt != "dense" else "")
        cases.append(_case(op, label, tuple(named_args(op, args, kwargs).values())))
    return cases


def cases_for(op: str, seed: int = 0) -> list[Case]:
    """The fixed conformance cases of ``op``, deterministic for a seed."""
    if op not in _FIXED:
        raise KeyError(f"no conformance cases for op {op!r}; known ops: {', '.join(sorted(specs()))}")
    return _example_cases(op, seed) + _FIXED[op](seed)


# --------------------------------------------------------------------------------------------
# Property-based cases (hypothesis)
# --------------------------------------------------------------------------------------------


def strategy(op: str):
    """A hypothesis strategy of random :class:`Case` s for ``op`` within its contract: shapes,
    dtypes, formats, layouts and edge-value variants are drawn; values come from a drawn seed."""
    from hypothesis import strategies as st

    seeds = st.integers(0, 2**16)
    dtypes = st.sampled_from([BF16, F32])
    layouts = st.sampled_from(["contiguous", "transposed", "sliced", "strided"])
    builders: dict[str, Callable[[Any], Case]] = {
        "fp8_act_quant": lambda draw: fp8_act_quant_case(
            "property", draw(seeds), (draw(st.integers(1, 5)), 64 * draw(st.integers(1, 4))),
            dtype=draw(dtypes), block=64, fmt=draw(st.sampled_from(["ue8m0", "fp32"])),
            values=draw(st.sampled_from(["normal", "zero-tiny", "saturate"])), layout=draw(layouts)),
        "fp4_quant": lambda draw: fp4_quant_case(
            "property", draw(seeds), (draw(st.integers(1, 5)), 32 * draw(st.integers(1, 4))), dtype=draw(dtypes),
            values=draw(st.sampled_from(["normal", "zero-tiny", "ties"])), layout=draw(layouts)),
        "hadamard_rotate": _draw_hadamard_rotate,
        "index_key_pack": lambda draw: index_key_pack_case(
            "property", draw(seeds), (draw(st.integers(1, 5)), 32 * draw(st.integers(1, 5))),
            draw(st.sampled_from(["fp4", "fp8"])), dtype=draw(dtypes),
            values=draw(st.sampled_from(["normal", "zero-tiny", "saturate"])), layout=draw(layouts)),
        "index_key_store": _draw_index_key_store,
        "kv_cache_pack": lambda draw: kv_cache_pack_case(
            "property", draw(seeds), (draw(st.integers(1, 4)),), dim=32 * draw(st.integers(1, 4)) + 32, rope_dim=32,
            tile=32, dtype=draw(dtypes), values=draw(st.sampled_from(["normal", "zero-tiny"])),
            layout=draw(st.sampled_from(["contiguous", "sliced"]))),
        "kv_cache_store": _draw_kv_cache_store,
        "kv_cache_unpack": lambda draw: kv_cache_unpack_case(
            "property", draw(seeds), (draw(st.integers(1, 4)),), dim=32 * draw(st.integers(1, 4)) + 32, rope_dim=32,
            tile=32, layout=draw(st.sampled_from(["contiguous", "sliced"]))),
        "moe_gate": _draw_moe_gate,
        "moe_experts": lambda draw: moe_experts_case(
            "property", draw(seeds), t=draw(st.integers(1, 5)), e=draw(st.integers(2, 5)), k=draw(st.integers(1, 2)),
            fmt=draw(st.sampled_from(["dense", "fp8", "fp4"])), scale_fmt=draw(st.sampled_from(["fp32", "e8m0"])),
            dtype=draw(dtypes), routing=draw(st.sampled_from(["random", "empty-slots", "one-expert"])),
            values=draw(st.sampled_from(["normal", "clamp", "zero-token", "wide-scales"])), d=128, inter=128),
        "kv_compress": _draw_kv_compress,
        "kv_compress_fp8": lambda draw: _draw_kv_compress(draw, records=(8, 8)),
        "kv_compress_store": _draw_kv_compress_store,
        "indexer_topk": _draw_indexer_topk,
        "indexer_topk_packed": _draw_indexer_topk_packed,
        "sparse_attention": lambda draw: sparse_attention_case(
            "property", draw(seeds), b=draw(st.integers(1, 2)), s=draw(st.integers(1, 6)), h=draw(st.integers(1, 3)),
            d=16 * draw(st.integers(1, 4)), n=draw(st.integers(1, 12)), k=draw(st.integers(1, 10)), dtype=draw(dtypes),
            indices=draw(st.sampled_from(["random", "empty-query", "duplicates"])),
            sink=draw(st.sampled_from(["normal", "dominant", "neg-inf"])),
            layout=draw(st.sampled_from(["contiguous", "strided", "pool"])), **_draw_output_rotation(draw)),
        "sparse_attention_fp8": lambda draw: sparse_attention_fp8_case(
            "property", draw(seeds), b=draw(st.integers(1, 2)), s=draw(st.integers(1, 6)), h=draw(st.integers(1, 3)),
            d=16 + 16 * draw(st.integers(1, 3)), n=draw(st.integers(1, 12)), k=draw(st.integers(1, 10)),
            dtype=draw(dtypes), indices=draw(st.sampled_from(["random", "empty-query", "duplicates"])),
            sink=draw(st.sampled_from(["normal", "dominant", "neg-inf"])), tile_spread=draw(st.integers(0, 6)),
            subnormal=draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "strided", "pool"])),
            **_draw_output_rotation(draw)),
        "hc_pre": lambda draw: _draw_hc(draw, "hc_pre"),
        "hc_post": lambda draw: _draw_hc(draw, "hc_post"),
        "hc_post_pre": lambda draw: _draw_hc(draw, "hc_post_pre"),
        "hc_head": lambda draw: _draw_hc(draw, "hc_head"),
        "rope": lambda draw: rope_case(
            "property", draw(seeds), b=draw(st.integers(1, 2)), s=draw(st.integers(1, 4)), h=draw(st.integers(1, 3)),
            d=32, rope=2 * draw(st.integers(1, 16)), dtype=draw(dtypes), inverse=draw(st.booleans()),
            yarn=draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "transposed"]))),
        "rms_norm": lambda draw: rms_norm_case(
            "property", draw(seeds), lead=tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))),
            d=draw(st.integers(1, 600)), dtype=draw(dtypes), weighted=draw(st.booleans()),
            values=draw(st.sampled_from(["normal", "zero-rows"])),
            layout=draw(st.sampled_from(["contiguous", "transposed", "strided"]))),
        "rms_norm_rope": lambda draw: rms_norm_rope_case(
            "property", draw(seeds), b=draw(st.integers(1, 2)), s=draw(st.integers(1, 3)), h=draw(st.integers(1, 20)),
            d=8 * draw(st.integers(1, 12)), rope=8, dtype=draw(dtypes), weighted=draw(st.booleans()),
            yarn=draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "transposed", "heads"]))),
        "fp32_linear": lambda draw: fp32_linear_case(
            "property", draw(seeds), tokens=(draw(st.integers(1, 6)),), d=draw(st.integers(1, 300)),
            n=draw(st.integers(1, 200)), dtype=draw(dtypes), weight_dtype=draw(dtypes),
            layout=draw(st.sampled_from(["contiguous", "sliced"]))),
        "grouped_linear": lambda draw: grouped_linear_case(
            "property", draw(seeds), tokens=(draw(st.integers(1, 6)),), g=draw(st.integers(1, 4)),
            r=draw(st.integers(1, 160)), i=128 * draw(st.integers(1, 3)), dtype=draw(st.sampled_from([BF16, F32])),
            weight=draw(st.sampled_from(["fp8", "fp8", "bf16", "fp32"])),
            scale_fmt=draw(st.sampled_from(["fp32", "e8m0"])), layout=draw(st.sampled_from(["contiguous", "sliced"]))),
    }
    for gemm in ("fp8_gemm", "fp4_gemm"):
        builders[gemm] = lambda draw, gemm=gemm: gemm_case(
            "property", draw(seeds), gemm, draw(st.integers(1, 6)), draw(st.integers(1, 160)),
            128 * draw(st.integers(1, 3)), out_dtype=draw(st.sampled_from([None, F32])),
            scale_fmt=draw(st.sampled_from(["fp32", "e8m0"])),
            values=draw(st.sampled_from(["normal", "zero-tile", "wide-scales"])),
            a_layout=draw(st.sampled_from(["contiguous", "sliced"])),
            b_layout=draw(st.sampled_from(["contiguous", "transposed"])))
    builders["act_quant_gemm"] = lambda draw: act_quant_gemm_case(
        "property", draw(seeds), draw(st.integers(1, 40)), draw(st.integers(1, 160)), 128 * draw(st.integers(1, 3)),
        weights=draw(st.sampled_from(["fp8", "fp4"])), dtype=draw(dtypes), out_dtype=draw(st.sampled_from([None, F32])),
        scale_fmt=draw(st.sampled_from(["fp32", "e8m0"])),
        values=draw(st.sampled_from(["normal", "zero-tiny", "sub-floor", "saturate", "ties", "wide-scales"])),
        x_layout=draw(st.sampled_from(["contiguous", "sliced"])),
        b_layout=draw(st.sampled_from(["contiguous", "transposed"])))
    if op not in builders:
        raise KeyError(f"no strategy for op {op!r}")
    return st.composite(lambda draw: builders[op](draw))()


def _draw_hadamard_rotate(draw) -> Case:
    from hypothesis import strategies as st

    n = 2 ** draw(st.integers(0, 8))
    fp4_block = draw(st.sampled_from([0] + [b for b in (2, 4, 8, 16, 32, 64) if b <= n]))
    seed, shape = draw(st.integers(0, 2**16)), (draw(st.integers(1, 5)), n)
    dtype = draw(st.sampled_from([BF16, F32]))
    values = draw(st.sampled_from(["normal", "zero-tiny"]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "strided"]))
    rotation = {}
    if n >= 2 and draw(st.booleans()):  # roped first, after the other draws: x [B, S, H, n]
        b, s = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        shape = (b, s, draw(st.integers(1, 3)), n)
        positions = tuple(tuple(draw(st.lists(st.integers(0, 999), min_size=s, max_size=s))) for _ in range(b))
        rotation = {"positions": positions, "rope": 2 * draw(st.integers(1, n // 2)), "yarn": draw(st.booleans()),
                    "pos_dtype": draw(st.sampled_from([torch.int32, torch.int64]))}
    return hadamard_rotate_case(
        "property", seed, shape, dtype=dtype, fp4_block=fp4_block, values=values, layout=layout, **rotation)


def _draw_store_slots(draw) -> tuple[int, int, tuple[tuple[int, ...], ...]]:
    """A store op's batch b, rows per sequence and slots: n distinct rows per sequence, or one
    tuple of them the batch shares."""
    from hypothesis import strategies as st

    b, n = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    rows = n + draw(st.integers(0, 5))
    shared = draw(st.booleans())
    return b, rows, tuple(tuple(draw(st.permutations(range(rows)))[:n]) for _ in range(1 if shared else b))


def _draw_index_key_store(draw) -> Case:
    from hypothesis import strategies as st

    b, rows, slots = _draw_store_slots(draw)
    return index_key_store_case(
        "property", draw(st.integers(0, 2**16)), slots, rows, draw(st.sampled_from(["fp4", "fp8"])), b=b,
        d=32 * draw(st.integers(1, 5)), dtype=draw(st.sampled_from([BF16, F32])),
        slot_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        values=draw(st.sampled_from(["normal", "zero-tiny", "saturate"])), first=draw(st.integers(0, 3)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced", "strided"])))


def _draw_kv_cache_store(draw) -> Case:
    from hypothesis import strategies as st

    b, rows, slots = _draw_store_slots(draw)
    n = len(slots[0])
    rotation = {}
    if draw(st.booleans()):  # normed and rotated before packing
        positions = tuple(tuple(draw(st.lists(st.integers(0, 999), min_size=n, max_size=n))) for _ in range(b))
        rotation = {"positions": positions, "weighted": draw(st.booleans()), "yarn": draw(st.booleans()),
                    "pos_dtype": draw(st.sampled_from([torch.int32, torch.int64]))}
    return kv_cache_store_case(
        "property", draw(st.integers(0, 2**16)), slots, rows, b=b, dim=32 * draw(st.integers(1, 4)) + 32,
        rope_dim=32, tile=32, dtype=draw(st.sampled_from([BF16, F32])),
        slot_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        values=draw(st.sampled_from(["normal", "zero-tiny"])), first=draw(st.integers(0, 3)),
        layout=draw(st.sampled_from(["contiguous", "sliced"])), **rotation)


def _draw_moe_gate(draw) -> Case:
    from hypothesis import strategies as st

    n_groups = draw(st.sampled_from([1, 2, 4]))
    e = n_groups * draw(st.integers(2, 4))
    topk_groups = draw(st.integers(1, n_groups))
    top_k = draw(st.integers(1, topk_groups * e // n_groups))
    hashed = n_groups == 1 and draw(st.booleans())
    return moe_gate_case(
        "property", draw(st.integers(0, 2**16)), t=draw(st.integers(1, 6)), d=draw(st.integers(1, 48)), e=e,
        top_k=top_k, score_func=draw(st.sampled_from(["sqrtsoftplus", "sigmoid", "softmax"])), bias=draw(st.booleans()),
        route_scale=draw(st.sampled_from([1.0, 1.5, 2.5])), n_groups=n_groups, topk_groups=topk_groups,
        hash_vocab=8 if hashed else 0, dtype=draw(st.sampled_from([BF16, F32])),
        variant=draw(st.sampled_from(["random", "tied-experts", "zero-token", "one-expert"])) if e >= 10 else "random",
    )


def _draw_output_rotation(draw) -> dict[str, Any]:
    """An attention case's output rotation, drawn half the time after its other draws: 2..16
    rotated dims (every drawn D is >= 16), plain or YaRN frequencies, int32 or int64 positions,
    one row per sequence or one shared row."""
    from hypothesis import strategies as st

    if not draw(st.booleans()):
        return {}
    return {"rotate": 2 * draw(st.integers(1, 8)), "yarn": draw(st.booleans()),
            "pos_dtype": draw(st.sampled_from([torch.int32, torch.int64])),
            "positions": draw(st.sampled_from(["random", "shared"]))}


POSITION_FORMS = ("int", "tensor", "per-sequence")
"""How a drawn call passes start_pos: an int, a 0-d tensor, or a [B] tensor of positions drawn per
sequence (see ``OpSpec.position``)."""


def _draw_kv_compress(draw, records: tuple[int, int] | None = None) -> Case:
    from hypothesis import strategies as st

    overlap = draw(st.booleans())
    chunks = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=5)))
    b = draw(st.integers(1, 2))
    form = draw(st.sampled_from(POSITION_FORMS))
    # per-sequence: each sequence's stream starts at its own position, from the fresh state
    offsets = tuple(draw(st.lists(st.integers(0, 12), min_size=b, max_size=b))) if form == "per-sequence" else None
    case = kv_compress_case(
        "property", draw(st.integers(0, 2**16)), chunks, ratio=4 if overlap else draw(st.sampled_from([2, 4, 8])),
        overlap=overlap, b=b, d=8 * draw(st.integers(2 if records else 1, 4)), rope=8,
        stale_state=offsets is None and draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "sliced"])),
        records=records, offsets=offsets,
    )
    return at_tensor_position(case) if form == "tensor" else case


def _draw_kv_compress_store(draw) -> Case:
    """:func:`_draw_kv_compress`'s streams (records (8, 8)) stored into a drawn store: shuffled or
    ascending entry rows, per sequence or shared by the batch (when it is at one position), 0..3
    spare rows, 0..3 rows of a bigger buffer before it, rows twice as wide or not, int32 or int64."""
    from hypothesis import strategies as st

    overlap = draw(st.booleans())
    chunks = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=5)))
    b = draw(st.integers(1, 2))
    form = draw(st.sampled_from(POSITION_FORMS))
    offsets = tuple(draw(st.lists(st.integers(0, 12), min_size=b, max_size=b))) if form == "per-sequence" else None
    return kv_compress_store_case(
        "property", draw(st.integers(0, 2**16)), chunks, ratio=4 if overlap else draw(st.sampled_from([2, 4, 8])),
        overlap=overlap, b=b, d=8 * draw(st.integers(2, 4)), rope=8, records=(8, 8),
        stale_state=offsets is None and draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "sliced"])),
        position=form, offsets=offsets, shared=offsets is None and draw(st.booleans()),
        order=draw(st.sampled_from(["shuffled", "ascending"])), spare=draw(st.integers(0, 3)),
        first=draw(st.integers(0, 3)), wide=draw(st.booleans()),
        slot_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
    )


def _draw_position(draw, b: int) -> tuple[int | tuple[int, ...], int, str]:
    """(start_pos for an indexer case, the largest position, its form)."""
    from hypothesis import strategies as st

    form = draw(st.sampled_from(POSITION_FORMS))
    if form == "per-sequence":
        positions = tuple(draw(st.lists(st.integers(0, 40), min_size=b, max_size=b)))
        return positions, max(positions), form
    start_pos = draw(st.integers(0, 40))
    return start_pos, start_pos, form


def _draw_head_weights(draw) -> dict[str, Any]:
    """An indexer case's head weights (dtype and scale) and the offset of its indices."""
    from hypothesis import strategies as st

    return {
        "weights_dtype": draw(st.sampled_from([BF16, F32])),
        "weights_scale": draw(st.sampled_from([1.0, V4_INDEXER_SCALE, -0.37])),
        "offset": draw(st.integers(0, 200)),
    }


def _draw_indexer_topk(draw) -> Case:
    from hypothesis import strategies as st

    b, s = draw(st.integers(1, 2)), draw(st.integers(1, 12))
    start_pos, last, form = _draw_position(draw, b)
    case = indexer_topk_case(
        "property", draw(st.integers(0, 2**16)), s=s, n=draw(st.integers(1, (last + s) // 4 + 3)),
        start_pos=start_pos, topk=draw(st.integers(1, 8)), b=b, h=draw(st.integers(1, 4)),
        d=8 * draw(st.integers(1, 4)), dtype=draw(st.sampled_from([BF16, F32])),
        variant=draw(st.sampled_from(["random", "tied-keys", "zero-query", "negative-weights"])),
        layout=draw(st.sampled_from(["contiguous", "transposed"])), **_draw_head_weights(draw),
    )
    return at_tensor_position(case) if form == "tensor" else case


def _draw_indexer_topk_packed(draw) -> Case:
    from hypothesis import strategies as st

    b, s = draw(st.integers(1, 2)), draw(st.integers(1, 12))
    start_pos, last, form = _draw_position(draw, b)
    key_format = draw(st.sampled_from(["fp4", "fp8"]))
    case = indexer_topk_packed_case(
        "property", draw(st.integers(0, 2**16)), key_format, s=s, n=draw(st.integers(1, (last + s) // 4 + 3)),
        start_pos=start_pos, topk=draw(st.integers(1, 8)), b=b, h=draw(st.integers(1, 4)),
        d=32 * draw(st.integers(1, 4)), dtype=draw(st.sampled_from([BF16, F32])),
        variant=draw(st.sampled_from(["random", "tied-keys", "zero-query", "negative-weights"])),
        keys=draw(st.sampled_from(["varied", "zero"] + (["plain-scale"] if key_format == "fp8" else []))),
        layout=draw(st.sampled_from(["contiguous", "transposed"])), **_draw_head_weights(draw),
    )
    return at_tensor_position(case) if form == "tensor" else case


def _draw_hc(draw, op: str) -> Case:
    from hypothesis import strategies as st

    return hc_case(
        "property", draw(st.integers(0, 2**16)), op, b=draw(st.integers(1, 2)), s=draw(st.integers(1, 3)),
        n=draw(st.integers(1, 4)), d=8 * draw(st.integers(1, 4)), dtype=draw(st.sampled_from([BF16, F32])),
        iters=draw(st.integers(1, 20)), values=draw(st.sampled_from(["normal", "zero-token"])),
        layout=draw(st.sampled_from(["contiguous", "transposed"])), normed=op != "hc_post" and draw(st.booleans()),
        addend=draw(st.sampled_from(["none", "random", "cancelling"])) if op in ("hc_post", "hc_post_pre") else "none",
    )
