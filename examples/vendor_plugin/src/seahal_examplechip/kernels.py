"""examplechip's own kernels, ``rope`` and ``fp8_act_quant``, in the formulations its units like.

Each takes exactly its op's schema arguments, positionally (defaults as in the schema), and returns
fresh tensors shaped as the op's contract in ``seahal/hal/ops/`` says; neither modifies an input.
Both are pure torch on the inputs' device with no host synchronisation. What they do not support
is declared as capability data in :func:`seahal_examplechip.register`, not discovered at run time.
"""

from __future__ import annotations

import torch


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(a, b) -> (-b, a)`` for every interleaved pair of the last dim.

    x: [..., 2R] -> [..., 2R]; a pair times ``sin`` is the rotation's cross term.
    """
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last r = 2*len(freqs) dims of each head as ``x cos + swap_pairs(x) sin``.

    x: [B, S, H, D] bf16/fp32, positions: [B, S] int, freqs: [r/2] fp32 -> [B, S, H, D] in x's dtype.

    ``theta_i = pos * f_i`` (``-theta_i`` when inverse), repeated for both members of pair i, so
    pair ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)``: the rotation written as two
    full-width multiplies and one add instead of a split into a's and b's. Per element these are
    the same fp32 operations as the reference, so the results are identical. The first D - r dims
    pass through.
    """
    angles = positions.to(torch.float32)[:, :, None, None] * freqs.to(torch.float32)  # [B, S, 1, r/2]
    if inverse:
        angles = -angles
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = angles.sin().repeat_interleave(2, dim=-1)
    nope = x.shape[-1] - cos.shape[-1]
    part = x[..., nope:].to(torch.float32)
    rotated = part * cos + swap_pairs(part) * sin
    return torch.cat((x[..., :nope], rotated.to(x.dtype)), dim=-1)


E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
# fp32 bit fields: a positive normal float is 2^(e - 127) * 1.m, e in bits 23..30, m in bits 0..22.
MANTISSA_BITS = 0x007FFFFF
EXPONENT_BITS = 0x7F800000
ONE_BITS = 127 << 23


def ceil_power_of_two(s: torch.Tensor) -> torch.Tensor:
    """``2^ceil(log2 s)`` for positive normal fp32 s, exactly: any mantissa bit carries into the
    exponent, then the mantissa is cleared."""
    return ((s.view(torch.int32) + MANTISSA_BITS) & EXPONENT_BITS).view(torch.float32)


def reciprocal_power_of_two(s: torch.Tensor) -> torch.Tensor:
    """``1 / s`` for fp32 powers of two ``s = 2^k`` with |k| < 127, exactly: the biased exponent
    ``k + 127`` becomes ``-k + 127``."""
    return (2 * ONE_BITS - s.view(torch.int32)).view(torch.float32)


def fp8_act_quant(
    x: torch.Tensor, block_size: int = 128, scale_fmt: str = "ue8m0"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise activations to FP8 e4m3 in 1 x block_size tiles with power-of-two (ue8m0) scales.

    x: [..., K] float, K % block_size == 0 -> q: [..., K] float8_e4m3fn, scale: [..., K/block_size] fp32

    Per tile ``s = 2^ceil(log2(max(amax, 1e-4) / 448))`` (the division in fp32, then the exponent
    rounded up from the bits); ``q = e4m3_rne(clamp(x * (1/s), -448, 448))``. 1/s is a power of two
    too, so multiplying by it is exactly the contract's division, and q and s are the reference's
    bit for bit. examplechip's quant unit makes power-of-two scales only (``scale_fmt="ue8m0"``).
    """
    if scale_fmt != "ue8m0":
        raise ValueError(f"examplechip fp8_act_quant makes ue8m0 scales only (see its capabilities), got {scale_fmt!r}")
    tiles = x.to(torch.float32).unflatten(-1, (-1, block_size))
    amax = tiles.abs().amax(dim=-1).clamp(min=AMAX_FLOOR)
    scale = ceil_power_of_two(amax / E4M3_MAX)
    scaled = tiles * reciprocal_power_of_two(scale).unsqueeze(-1)
    q = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), scale
