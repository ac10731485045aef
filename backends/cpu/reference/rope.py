"""Reference kernel of the rope family: interleaved partial RoPE on the last dims (v4_ops.md §4)."""

from __future__ import annotations

import torch

from seahal.hal.formats import compute_dtype

from .norm import rms_norm


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the last r = 2*R dims of x in interleaved pairs by ``angles``; the rest pass through.

    x: [..., D] float, angles: [..., R] broadcastable to x's leading dims -> [..., D] in x's dtype.

    Pair i is ``(a, b) = (x_{D-r+2i}, x_{D-r+2i+1})`` -> ``(a cos - b sin, a sin + b cos)`` with
    ``cos, sin`` of ``angles[..., i]``. The caller chooses the precision by x's dtype.
    """
    nope = x.shape[-1] - 2 * angles.shape[-1]
    pairs = x[..., nope:].unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.cos(), angles.sin()
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., :nope], rotated), dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last r = 2*len(freqs) dims of each head by ``positions * freqs`` (interleaved pairs).

    x: [B, S, H, D] bf16/fp32/fp64, positions: [B, S] int, freqs: [r/2] fp32 -> [B, S, H, D] in x's dtype.

    ``theta_i = pos * f_i`` (``-theta_i`` when inverse); pair i of the rope part becomes
    ``(a cos theta_i - b sin theta_i, a sin theta_i + b cos theta_i)``. Computed in fp32 (fp64 for
    fp64 x); the first D - r dims pass through.
    """
    dtype = compute_dtype(x)
    angles = positions.to(dtype)[:, :, None, None] * freqs.to(dtype)
    if inverse:
        angles = -angles
    return rotate_pairs(x.to(dtype), angles).to(x.dtype)


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, positions: torch.Tensor, freqs: torch.Tensor
) -> torch.Tensor:
    """``rope(rms_norm(x, weight, eps), positions, freqs)``: each head normalised (rounded to x's
    dtype), then its last r = 2*len(freqs) dims rotated.

    x: [B, S, H, D] bf16/fp32/fp64, weight: [D] or None, positions: [B, S] int, freqs: [r/2] fp32
    -> [B, S, H, D] in x's dtype.
    """
    return rope(rms_norm(x, weight, eps), positions, freqs)
