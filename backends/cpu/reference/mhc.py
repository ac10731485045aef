"""Reference kernels of mHC, the manifold-constrained hyper-connections (v4_ops.md §5).

n residual streams ``x: [B, S, n, D]`` are collapsed into one sub-layer input by ``hc_pre`` (or
``hc_head`` before the final norm) and expanded back by ``hc_post``. All weights come from one
projection of the RMS-normalised flattened streams, the "mix".
"""

from __future__ import annotations

import torch

from seahal.hal.formats import compute_dtype
from seahal.hal.ops.mhc import post_then_pre

from .norm import rms_norm


def _stream_mix(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """Projection of the normalised streams: ``mix = (x_flat @ fn^T) * rsqrt(mean(x_flat^2) + norm_eps)``.

    x: [B, S, n, D], fn: [m, n*D] -> [B, S, m] in the compute dtype (mean over all n*D entries).
    """
    flat = x.flatten(2).to(compute_dtype(x))
    inv_rms = torch.rsqrt(flat.square().mean(dim=-1, keepdim=True) + norm_eps)
    return (flat @ fn.to(flat.dtype).T) * inv_rms


def _affine(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``mix * scale + base``: scale a 0-d tensor, base [m] broadcast over tokens; in mix's dtype."""
    return mix * scale.to(mix.dtype) + base.to(mix.dtype)


def _pre_weights(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float) -> torch.Tensor:
    """Collapse weights ``pre_i = sigmoid(mix_i scale + base_i) + eps``."""
    return torch.sigmoid(_affine(mix, scale, base)) + eps


def _collapse(x: torch.Tensor, pre: torch.Tensor, norm_weight: torch.Tensor | None, norm_eps: float) -> torch.Tensor:
    """``y = sum_i pre_i x_i``: x: [B, S, n, D], pre: [B, S, n] -> [B, S, D] in x's dtype; with
    norm_weight [D], ``rms_norm(y, norm_weight, norm_eps)`` of that rounded y."""
    y = (pre.unsqueeze(-1) * x.to(pre.dtype)).sum(dim=2).to(x.dtype)
    return y if norm_weight is None else rms_norm(y, norm_weight, norm_eps)


def _sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Near doubly-stochastic matrix from logits [..., n, n] (rows i, columns j).

    ``C = softmax_j(logits) + eps``; ``C /= colsum + eps``; then ``iters - 1`` times
    ``C /= rowsum + eps``, ``C /= colsum + eps`` (colsum = sum over i, rowsum = sum over j).
    """
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


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
    """Collapse n streams into one sub-layer input; emit the post and mixing (comb) weights.

    x: [B, S, n, D], fn: [(2+n)*n, n*D], base: [(2+n)*n], scale: [3], norm_weight: [D] or None
    -> y: [B, S, D] in x's dtype, post: [B, S, n] fp32, comb: [B, S, n, n] fp32

    With mix from ``_stream_mix`` (index layout pre [0, n), post [n, 2n), comb [2n, 2n + n*n)):
    ``pre_i = sigmoid(mix_i scale_0 + base_i) + eps``, ``post_i = 2 sigmoid(mix_{n+i} scale_1 + base_{n+i})``,
    ``comb = Sinkhorn(mix_{2n+i*n+j} scale_2 + base_{2n+i*n+j})``, ``y = sum_i pre_i x_i``, with
    norm_weight normalised as :func:`rms_norm` does (eps norm_eps). fp32 math (fp64 when x is fp64).
    """
    n = x.shape[2]
    mix = _stream_mix(x, fn, norm_eps)
    pre = _pre_weights(mix[..., :n], scale[0], base[:n], eps)
    post = 2 * torch.sigmoid(_affine(mix[..., n : 2 * n], scale[1], base[n : 2 * n]))
    comb_logits = _affine(mix[..., 2 * n :], scale[2], base[2 * n :]).unflatten(-1, (n, n))
    comb = _sinkhorn(comb_logits, sinkhorn_iters, eps)
    return _collapse(x, pre, norm_weight, norm_eps), post.to(torch.float32), comb.to(torch.float32)


def hc_post(
    f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, addend: torch.Tensor | None = None
) -> torch.Tensor:
    """Expand a sub-layer output back into n streams, mixed with the old ones.

    f: [B, S, D], x: [B, S, n, D], post: [B, S, n], comb: [B, S, n, n], addend: [B, S, D] or None
    -> [B, S, n, D] in x's dtype

    ``x'_j = post_j f + sum_i comb[i, j] x_i`` (sum over comb's FIRST index, i.e. comb^T @ x);
    fp32 math (fp64 when x is fp64). With addend, f is ``f + addend`` (in f's dtype) first.
    """
    if addend is not None:
        f = f + addend
    dtype = compute_dtype(x)
    expanded = post.to(dtype).unsqueeze(-1) * f.to(dtype).unsqueeze(-2)
    mixed = comb.to(dtype).transpose(-1, -2) @ x.to(dtype)
    return (expanded + mixed).to(x.dtype)


hc_post_pre = post_then_pre(hc_post, hc_pre)


def hc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
    norm_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Collapse the n streams before the final norm: hc_pre's pre-weights only.

    x: [B, S, n, D], fn: [n, n*D], base: [n], scale: [1], norm_weight: [D] or None
    -> [B, S, D] in x's dtype

    ``pre_i = sigmoid(mix_i scale_0 + base_i) + eps`` with mix from ``_stream_mix``;
    ``y = sum_i pre_i x_i`` (with norm_weight, the final norm of it, as in :func:`hc_pre`).
    fp32 math (fp64 when x is fp64).
    """
    return _collapse(x, _pre_weights(_stream_mix(x, fn, norm_eps), scale[0], base, eps), norm_weight, norm_eps)
