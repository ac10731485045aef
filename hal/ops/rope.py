"""Interleaved partial RoPE (on the last dims of each head), with YaRN frequency tables."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import Contract, check_norm_parameters, check_rotation
from ..spec import Out, define_op


@dataclass(frozen=True)
class Yarn:
    """YaRN frequency scaling (v4_ops.md §4); no attention-temperature factor in V4."""

    factor: float
    original_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


def rope_frequencies(rope_dim: int, base: float, yarn: Yarn | None = None) -> torch.Tensor:
    """Per-pair angular frequencies ``f_i = base^(-2i/rope_dim)``, i < rope_dim/2, fp32.

    With YaRN: ``cd(r) = rope_dim * ln(L0 / (2 pi r)) / (2 ln base)``, ``lo = floor(cd(beta_fast))``,
    ``hi = ceil(cd(beta_slow))`` clamped to [0, rope_dim-1]; ``ramp_i = clamp((i-lo)/(hi-lo), 0, 1)``;
    ``f_i' = f_i / factor * ramp_i + f_i * (1 - ramp_i)``.
    """
    i = torch.arange(0, rope_dim, 2, dtype=torch.float64)
    freqs = base ** (-i / rope_dim)
    if yarn is not None:
        def correction_dim(rotations: float) -> float:
            return rope_dim * math.log(yarn.original_seq_len / (2 * math.pi * rotations)) / (2 * math.log(base))

        lo = max(math.floor(correction_dim(yarn.beta_fast)), 0)
        hi = min(math.ceil(correction_dim(yarn.beta_slow)), rope_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        freqs = freqs / yarn.factor * ramp + freqs * (1 - ramp)
    return freqs.to(torch.float32)


@define_op(
    "rope",
    family="rope",
    schema="(Tensor x, Tensor positions, Tensor freqs, bool inverse=False) -> Tensor",
)
def rope(x, positions, freqs, inverse=False):
    """Rotate the last r = 2*len(freqs) dims of each head in interleaved pairs.

    x: [B, S, H, D] bf16/fp32, positions: [B, S] int, freqs: [r/2] fp32 -> [B, S, H, D] in x's dtype.

    For pair i of the rope part, ``(x_{2i}, x_{2i+1})`` is rotated by ``theta = pos * f_i``
    (by ``-theta`` when inverse): ``(a cos - b sin, a sin + b cos)``, computed in fp32.
    The first D - r dims pass through.
    """
    c = Contract("rope")
    c.tensor("x", x, ["B", "S", "H", "D"], (torch.bfloat16, torch.float32, torch.float64))
    check_rotation(c, positions, freqs)
    return Out(tuple(x.shape), x.dtype)


@define_op(
    "rms_norm_rope",
    family="rope",
    schema="(Tensor x, Tensor? weight, float eps, Tensor positions, Tensor freqs) -> Tensor",
)
def rms_norm_rope(x, weight, eps, positions, freqs):
    """RMSNorm of each head, then RoPE on its last dims: ``rope(rms_norm(x, weight, eps), positions, freqs)``.

    x: [B, S, H, D] bf16/fp32/fp64, weight: [D] fp32/fp64 or None, positions: [B, S] int,
    freqs: [r/2] fp32 -> [B, S, H, D] in x's dtype.

    The attention's query heads (no weight) and its KV vector (H = 1, the kv norm's weight) as the
    official code computes them: ``y = x * rsqrt(mean(x^2) + eps) * weight`` in fp32 (fp64 for fp64
    x), rounded to x's dtype, then pair i of y's last r dims rotated by ``theta = pos * f_i`` as
    ``rope`` does (fp32), the first D - r dims passing through; the same two roundings as the two
    ops in turn, so a kernel can read and write each head once.
    """
    c = Contract("rms_norm_rope")
    c.tensor("x", x, ["B", "S", "H", "D"], (torch.bfloat16, torch.float32, torch.float64))
    check_norm_parameters(c, weight, eps)
    check_rotation(c, positions, freqs)
    return Out(tuple(x.shape), x.dtype)
