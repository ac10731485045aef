"""mHC on tmo: ``hc_split_sinkhorn`` for hc_pre, ``fused_mhc_post`` for hc_post, both in turn for
hc_post_pre.

hc_pre: the stream projection ``mixes = x_flat @ fn^T`` and its RMS factor are computed in torch
(fp32) and handed to ``tmo.hc_split_sinkhorn(mixes, hc_scale, hc_base, pre_scale=rsqrt, hc_mult,
sinkhorn_iter, eps)``, which applies the factor, splits pre/post/comb and runs Sinkhorn (vllm-mlu's
DeepSeek-V4 ``HCPre``); the collapse ``y = sum_i pre_i x_i`` is torch again, and with ``norm_weight``
(the sub-layer's RMSNorm folded in) the norm of that y runs on the portable ``rms_norm``.

hc_post: ``tmo.fused_mhc_post(x=f, residual=x, post, comb, compute_rms=False, eps)`` computes
``post_j f + sum_i comb[i, j] x_i``, with ``addend`` (the sub-layer output in two parts) on
``f + addend``, added in torch first. Its documented limitation is D = 4096 and four streams (the
V4-Flash shape); other shapes, and f in another dtype than the streams, run on the portable path.

hc_post_pre: this module's hc_post, then its hc_pre of the streams it made, each with its own
portable fallback, so its results are the two ops' in turn, bit for bit. Not done:
``fused_mhc_post(compute_rms=True)`` also returns a per-token ``rsqrt(mean(out^2) + eps)`` of the
new streams, which could stand in for hc_pre's own RMS factor (one reduction fewer) once it is
shown on an MLU to equal hc_pre's fp32 factor.
"""

from __future__ import annotations

import torch

from seahal.backends.cpu.reference.norm import rms_norm
from seahal.hal.ops.mhc import post_then_pre

from . import tmo
from .route import portable

MHC_POST_SHAPE = (4, 4096)
"""(streams, D) that fused_mhc_post accepts."""
_DTYPES = (torch.float32, torch.bfloat16)


def hc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
    norm_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse n streams, emit post and comb (contract: ``hal.ops.mhc.hc_pre``).

    x: [B, S, n, D], fn: [(2+n)*n, n*D], base: [(2+n)*n], scale: [3], norm_weight: [D] or None
    -> y [B, S, D] in x's dtype, post [B, S, n] fp32, comb [B, S, n, n] fp32; with norm_weight
    ``y = rms_norm(sum_i pre_i x_i, norm_weight, norm_eps)`` on the portable kernel.
    """
    why = tmo.lacks("hc_split_sinkhorn")
    if x.dtype not in _DTYPES:
        why = f"{x.dtype} streams (tmo mHC takes fp32/bf16)"
    if why is not None:
        return portable("hc_pre", why)(x, fn, base, scale, sinkhorn_iters, eps, norm_eps, norm_weight)
    n = x.shape[2]
    flat = x.flatten(2).float()
    rsqrt = torch.rsqrt(flat.square().mean(-1) + norm_eps)
    pre, post, comb = tmo.call(
        "hc_split_sinkhorn",
        mixes=flat @ fn.float().T,
        hc_scale=scale.float(),
        hc_base=base.float(),
        pre_scale=rsqrt,
        hc_mult=n,
        sinkhorn_iter=sinkhorn_iters,
        eps=eps,
    )
    y = (pre.unsqueeze(-1) * flat.unflatten(-1, (n, -1))).sum(dim=2).to(x.dtype)
    if norm_weight is not None:
        y = rms_norm(y, norm_weight, norm_eps)
    return y, post.float(), comb.float()


def hc_post(
    f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, addend: torch.Tensor | None = None
) -> torch.Tensor:
    """Expand a sub-layer output into n streams (contract: ``hal.ops.mhc.hc_post``).

    f: [B, S, D], x: [B, S, n, D], post: [B, S, n] fp32, comb: [B, S, n, n] fp32, addend: [B, S, D]
    in f's dtype or None -> [B, S, n, D]; with addend ``fused_mhc_post`` takes ``x = f + addend``, a
    torch add on the MLU (the contract's rounding to f's dtype).
    """
    batch, seq, n, dim = x.shape
    why = tmo.lacks("fused_mhc_post")
    if (n, dim) != MHC_POST_SHAPE:
        why = f"fused_mhc_post takes {MHC_POST_SHAPE[0]} streams of D={MHC_POST_SHAPE[1]}, got {n} of D={dim}"
    elif x.dtype not in _DTYPES or f.dtype != x.dtype or post.dtype != torch.float32 or comb.dtype != torch.float32:
        why = f"dtypes f {f.dtype}, x {x.dtype}, post/comb {post.dtype}/{comb.dtype} (tmo: f = x in fp32/bf16, fp32 weights)"
    if why is not None:
        return portable("hc_post", why)(f, x, post, comb, addend)
    if addend is not None:
        f = f + addend
    out = tmo.call(
        "fused_mhc_post",
        x=f.reshape(batch * seq, dim).contiguous(),
        residual=x.reshape(batch * seq, n, dim).contiguous(),
        post=post.reshape(batch * seq, n).contiguous(),
        comb=comb.reshape(batch * seq, n, n).contiguous(),
        compute_rms=False,
        eps=1e-6,
    )
    return out.reshape(batch, seq, n, dim)


hc_post_pre = post_then_pre(hc_post, hc_pre)
