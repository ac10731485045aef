"""Reference kernels of the quant family: FP8/FP4 activation quant, the Hadamard rotation (with its
FP4 rounding), the packed FP8 KV record and the packed indexer keys."""

from __future__ import annotations

import torch

from seahal.hal import formats
from seahal.hal.formats import (
    decode_scale, fp4_quant_dequant, fp4_quantize, fp8_quantize, hadamard, scatter_rows, ue8m0_encode,
)
from seahal.hal.ops.quant import kv_record_bytes
from .rope import rms_norm_rope, rope


def fp8_act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str = "ue8m0"):
    """FP8 e4m3 quant in 1 x block_size tiles: ``s = max(amax, 1e-4)/448`` (ue8m0: rounded up to
    a power of two), ``q = e4m3_rne(clamp(x/s, -448, 448))``. Returns (q, s)."""
    return fp8_quantize(x, block_size, scale_fmt)


def fp4_quant(x: torch.Tensor, block_size: int = 32):
    """FP4 e2m1 quant in 1 x block_size tiles with ue8m0 scales, packed low nibble first."""
    return fp4_quantize(x, block_size)


def hadamard_rotate(
    x: torch.Tensor, fp4_block: int = 0, positions: torch.Tensor | None = None, freqs: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ H_n * n^-0.5`` in fp32 (fp64 for fp64 x) rounded to x's dtype; with ``fp4_block``, that
    rounded through FP4 e2m1 in 1 x fp4_block ue8m0 blocks (``fp4_quant``, decoded back); with
    ``positions``, of ``rope(x, positions, freqs)``."""
    rotated = hadamard(x if positions is None else rope(x, positions, freqs))
    return fp4_quant_dequant(rotated, fp4_block) if fp4_block else rotated


def index_key_pack(keys: torch.Tensor, key_format: str) -> torch.Tensor:
    """``[e2m1 codes | e8m0 per 32]`` (fp4) or ``[e4m3 codes | fp32 scale bytes]`` (fp8) per key:
    :func:`seahal.hal.formats.index_key_pack`."""
    return formats.index_key_pack(keys, key_format)


def index_key_store(keys: torch.Tensor, store: torch.Tensor, slots: torch.Tensor, key_format: str) -> None:
    """``store[b, slots[b, i]] = index_key_pack(keys[b, i])``: the records scattered into their rows."""
    scatter_rows(store, slots, index_key_pack(keys, key_format))


def kv_cache_pack(kv: torch.Tensor, rope_dim: int = 64, tile: int = 64) -> torch.Tensor:
    """``[e4m3 nope | bf16 rope bytes | e8m0 tile scales | pad]`` per vector (584 B for V4)."""
    dim = kv.shape[-1]
    nope = dim - rope_dim
    q, scale = fp8_quantize(kv[..., :nope], tile)
    rope_bytes = kv[..., nope:].to(torch.bfloat16).contiguous().view(torch.uint8)
    out = torch.zeros(*kv.shape[:-1], kv_record_bytes(dim, rope_dim, tile), dtype=torch.uint8, device=kv.device)
    out[..., :nope] = q.view(torch.uint8)
    out[..., nope : nope + 2 * rope_dim] = rope_bytes
    out[..., nope + 2 * rope_dim : nope + 2 * rope_dim + nope // tile] = ue8m0_encode(scale)
    return out


def kv_cache_store(
    kv: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, rope_dim: int = 64, tile: int = 64,
    positions: torch.Tensor | None = None, freqs: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> None:
    """``cache[b, slots[b, i]] = kv_cache_pack(v[b, i])``: the records scattered into their rows, v
    being kv or, with positions, ``rms_norm_rope(kv, norm_weight, norm_eps, positions, freqs)``."""
    if positions is not None:
        kv = rms_norm_rope(kv.unsqueeze(2), norm_weight, norm_eps, positions, freqs).squeeze(2)
    scatter_rows(cache, slots, kv_cache_pack(kv, rope_dim, tile))


def kv_cache_unpack(packed: torch.Tensor, dim: int, rope_dim: int = 64, tile: int = 64) -> torch.Tensor:
    """Decode ``kv_cache_pack`` records to bf16 vectors."""
    nope = dim - rope_dim
    q = packed[..., :nope].contiguous().view(torch.float8_e4m3fn).to(torch.float32)
    exponent = packed[..., nope + 2 * rope_dim : nope + 2 * rope_dim + nope // tile]
    scale = decode_scale(exponent.contiguous())
    nope_values = (q.reshape(*q.shape[:-1], nope // tile, tile) * scale.unsqueeze(-1)).reshape(q.shape)
    rope = packed[..., nope : nope + 2 * rope_dim].contiguous().view(torch.bfloat16)
    return torch.cat((nope_values.to(torch.bfloat16), rope), dim=-1)
