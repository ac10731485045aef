"""rope on tmo: ``apply_rotary`` in cross (interleaved) mode, one fp32 table row per token.

``tmo.apply_rotary(input, sin_cache, cos_cache, position_ids, cu_seqlens, interleaved, discrete,
dynamic_ntk, max_seqlen)`` (Torch-MLU-Ops manual v1.3.2, section 5.1.2) rotates the first
``rotary_dim`` dims of each head. It uses full-width tables ``[rows, rotary_dim]``, with the angle
of each pair at both of its dims. With ``discrete`` it reads row ``position_ids[t]`` for token t.
In cross mode (``interleaved=True``) pair (2i, 2i+1) becomes
``(a cos - b sin, b cos + a sin)``: the interleaved rotation of the spec. Marshalling:

- the rope part ``x[..., D-r:]`` is copied into a private contiguous fp32 buffer
  ``[B, S, H, r]`` (pad mode). The spec rotates in fp32, and tmo writes its result back into
  ``input``, so the buffer keeps the caller's tensor untouched;
- one table row per token: ``theta = pos * f`` in fp32, as the reference forms it, and
  ``-theta`` for the inverse rotation. tmo rotates by whatever angle the table holds (vllm-mlu's
  inverse rope negates its sin table the same way). ``cos``/``sin`` are repeated for both dims of
  each pair. ``position_ids = arange(B*S)`` (int32) with ``discrete=True``. A table indexed by
  position would need ``max(positions)`` on the host;
- the result is cast to x's dtype after the first ``D - r`` dims, which pass through.

float64 runs on the portable path (tmo computes in fp32 at most). Whether tmo takes fp32 at all
is probed once at backend start (:func:`.probe.fp32_rotary_works`).
"""

from __future__ import annotations

import torch

from seahal.backends.cpu.reference.norm import rms_norm

from . import tmo
from .route import portable


def _tables(positions: torch.Tensor, freqs: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, S], freqs [R] -> (sin, cos) [B*S, 2R] fp32, each angle at both dims of its pair."""
    theta = positions.float()[..., None] * freqs.float()
    if inverse:
        theta = -theta
    full = theta.repeat_interleave(2, dim=-1).flatten(0, 1)
    return full.sin(), full.cos()


def rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last r = 2*len(freqs) dims of each head by ``positions * freqs`` (interleaved
    pairs; by the negated angle when ``inverse``) (contract: ``hal.ops.rope.rope``).

    x: [B, S, H, D] bf16/fp32, positions: [B, S] int, freqs: [r/2] fp32 -> [B, S, H, D] in x's dtype.
    """
    why = tmo.lacks("apply_rotary")
    if x.dtype == torch.float64:
        why = "float64 rotary (tmo computes in fp32 at most)"
    if why is not None:
        return portable("rope", why)(x, positions, freqs, inverse)
    batch, seq, heads, dim = x.shape
    r = 2 * freqs.shape[0]
    sin, cos = _tables(positions, freqs, inverse)
    rotated = tmo.call(
        "apply_rotary",
        input=x[..., dim - r:].to(torch.float32, memory_format=torch.contiguous_format, copy=True),
        sin_cache=sin,
        cos_cache=cos,
        position_ids=torch.arange(batch * seq, dtype=torch.int32, device=x.device),
        cu_seqlens=None,
        interleaved=True,
        discrete=True,
        dynamic_ntk=False,
        max_seqlen=seq,
    )
    return torch.cat((x[..., : dim - r], rotated.reshape(batch, seq, heads, r).to(x.dtype)), dim=-1)


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, positions: torch.Tensor, freqs: torch.Tensor
) -> torch.Tensor:
    """The ``rms_norm_rope`` contract as the portable RMSNorm (tmo's is not wired here: the plan runs
    ``rms_norm`` on the portable kernel too), then :func:`rope` on ``apply_rotary``.

    x: [B, S, H, D] bf16/fp32, weight: [D] fp32 or None, positions: [B, S] int, freqs: [r/2] fp32
    -> [B, S, H, D] in x's dtype.
    """
    return rope(rms_norm(x, weight, eps), positions, freqs)
