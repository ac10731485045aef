"""mHC: ``hc_split_sinkhorn`` and ``fused_mhc_post`` (DeepSeek-V4 hyper-connections).

hc_split_sinkhorn(mixes [B, S, (2+hc)*hc] float32, hc_scale [3], hc_base [(2+hc)*hc],
pre_scale [B, S] or None, hc_mult, sinkhorn_iter, eps) -> (pre, post [B, S, hc], comb [B, S, hc, hc]):
``m = mixes * pre_scale``; ``pre = sigmoid(m[:hc] s0 + b) + eps``; ``post = 2 sigmoid(m[hc:2hc] s1 + b)``;
``comb`` = Sinkhorn of ``m[2hc:] s2 + b`` viewed [hc, hc]: softmax over the last axis + eps, then
columns normalised, then ``sinkhorn_iter - 1`` times rows and columns (+eps in each division).

fused_mhc_post(x [N, D], residual [N, HC, D], post [N, HC] float32, comb [N, HC, HC] float32,
compute_rms, eps, output, output_rms): ``output[:, j] = post[:, j] x + sum_i comb[:, i, j] residual[:, i]``
in x's dtype; with ``compute_rms`` also ``output_rms = rsqrt(mean(output^2) + eps)`` per row and the
pair is returned. Documented limitation: D must be 4096, HC must be 4.
"""

from __future__ import annotations

import torch

from ._emulation import check, check_dtype, recorded


@recorded
def hc_split_sinkhorn(mixes, hc_scale, hc_base, pre_scale=None, hc_mult=4, sinkhorn_iter=20, eps=1e-6):
    width = (2 + hc_mult) * hc_mult
    check(mixes.dim() == 3 and mixes.shape[-1] == width,
          f"mixes must be [B, S, (2+hc_mult)*hc_mult={width}], but got {list(mixes.shape)}")
    for name, t in (("mixes", mixes), ("hc_scale", hc_scale), ("hc_base", hc_base)):
        check_dtype(name, t, (torch.float32,))
    check(hc_scale.shape == (3,) and hc_base.shape == (width,),
          f"hc_scale must be [3] and hc_base [{width}], but got {list(hc_scale.shape)} and {list(hc_base.shape)}")
    m = mixes
    if pre_scale is not None:
        check(pre_scale.shape == mixes.shape[:2], f"pre_scale must be {list(mixes.shape[:2])}, got {list(pre_scale.shape)}")
        m = mixes * pre_scale.unsqueeze(-1)
    n = hc_mult
    pre = torch.sigmoid(m[..., :n] * hc_scale[0] + hc_base[:n]) + eps
    post = 2 * torch.sigmoid(m[..., n:2 * n] * hc_scale[1] + hc_base[n:2 * n])
    comb = (m[..., 2 * n:] * hc_scale[2] + hc_base[2 * n:]).unflatten(-1, (n, n)).softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(sinkhorn_iter - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


@recorded
def fused_mhc_post(x, residual, post, comb, compute_rms, eps, output=None, output_rms=None):
    check(x.dim() == 2 and residual.dim() == 3, f"x must be [N, D] and residual [N, HC, D], got {x.dim()}-D, {residual.dim()}-D")
    n, hc, d = residual.shape
    check(d == 4096 and hc == 4, f"fused_mhc_post: D must be 4096 and HC must be 4, but got D={d}, HC={hc}")
    check_dtype("x", x, (torch.float32, torch.bfloat16))
    check(residual.dtype == x.dtype, f"residual dtype must equal x dtype {x.dtype}, but got {residual.dtype}")
    check_dtype("post", post, (torch.float32,))
    check_dtype("comb", comb, (torch.float32,))
    check(x.shape == (n, d) and post.shape == (n, hc) and comb.shape == (n, hc, hc), "x, post, comb shapes mismatch residual")
    result = post.unsqueeze(-1) * x.float().unsqueeze(1) + torch.einsum("nij,nid->njd", comb, residual.float())
    result = result.to(x.dtype)
    if output is not None:
        output.copy_(result)
        result = output
    if not compute_rms:
        return result
    rms = torch.rsqrt(result.float().flatten(1).square().mean(-1) + eps)
    if output_rms is not None:
        output_rms.copy_(rms)
        rms = output_rms
    return result, rms
