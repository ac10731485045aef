"""Interleaved partial RoPE on Atlas A2/A3: ``npu_rotary_mul(rotary_mode="interleave")``."""

from __future__ import annotations

import torch
import torch_npu

from seahal.backends.cpu.reference.norm import rms_norm

from ._portable import portable

MAX_ROTARY_DIM = 896
"""npu_rotary_mul: the rotated last dim must be even and < 896."""
MAX_HEADS = 1000
"""npu_rotary_mul (interleave): B * N < 1000; the call below has B = 1, N = heads."""


def rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The ``rope`` contract on ``torch_npu.npu_rotary_mul``.

    x: [B, S, H, D] bf16/fp32, positions: [B, S] int, freqs: [r/2] fp32 -> [B, S, H, D] in x's dtype.

    The vendor's interleave mode is ``out = r1 * x + r2 * x_new`` with ``x_new = (-x_1, x_0, -x_3,
    x_2, ...)`` (2.14 docstring): the HAL's pair rotation ``(a cos - b sin, a sin + b cos)`` when
    ``r1``/``r2`` hold cos/sin of ``theta_i = pos * f_i`` repeated per pair (``-theta_i`` when
    inverse). Interleave mode takes cos/sin broadcast as 1S1D for a BSND input, one position per S
    row, so the B*S tokens become the S axis of a batch of one: ``npu_rotary_mul(x_rope [1, B*S, H, r],
    r1=cos [1, B*S, 1, r], r2=sin, rotary_mode="interleave")``. The rope part goes in as fp32 (the
    contract's precision) and is rounded to x's dtype once; the first D - r dims pass through.
    fp64 x, r >= 896 or >= 1000 heads run the portable kernel.
    """
    b, s, h, d = x.shape
    r = 2 * freqs.shape[0]
    if x.dtype not in (torch.bfloat16, torch.float32) or not 0 < r < MAX_ROTARY_DIM or h >= MAX_HEADS:
        reason = f"bf16/fp32 x, 0 < rope dims < {MAX_ROTARY_DIM}, < {MAX_HEADS} heads (got {x.dtype}, r={r}, H={h})"
        return portable("rope", f"npu_rotary_mul needs {reason}", x, positions, freqs, inverse)
    angles = positions.to(torch.float32)[..., None] * freqs.to(torch.float32)
    if inverse:
        angles = -angles
    cos, sin = (t.repeat_interleave(2, dim=-1).view(1, b * s, 1, r) for t in (angles.cos(), angles.sin()))
    part = x[..., d - r :].to(torch.float32).contiguous().view(1, b * s, h, r)
    rotated = torch_npu.npu_rotary_mul(part, r1=cos, r2=sin, rotary_mode="interleave")
    return torch.cat((x[..., : d - r], rotated.view(b, s, h, r).to(x.dtype)), dim=-1)


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, positions: torch.Tensor, freqs: torch.Tensor
) -> torch.Tensor:
    """The ``rms_norm_rope`` contract as the portable RMSNorm (torch_npu's is not wired here: the
    plan runs ``rms_norm`` on the portable kernel too), then :func:`rope` on ``npu_rotary_mul``.

    x: [B, S, H, D] bf16/fp32, weight: [D] fp32 or None, positions: [B, S] int, freqs: [r/2] fp32
    -> [B, S, H, D] in x's dtype.
    """
    return rope(rms_norm(x, weight, eps), positions, freqs)
