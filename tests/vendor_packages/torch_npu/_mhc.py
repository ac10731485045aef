"""mHC: npu_mhc_pre, npu_mhc_sinkhorn, npu_mhc_post (emulated from the op-plugin docs
``docs/context/torch_npu-npu_mhc_{pre,sinkhorn}.md``, the 2.14 docstrings and CANN ``MhcPre``;
torch-npu >= 2.10.0.post4, Ascend 950 only)."""

from __future__ import annotations

import torch

from ._emulation import check, older_than, on_device, soc_family

_HALF = (torch.bfloat16, torch.float16)
_STREAMS = (4, 6, 8)


def _available(name: str) -> None:
    if older_than(2, 10):
        raise AttributeError(f"module 'torch_npu' has no attribute {name!r}")
    check(soc_family() == "A5", f"{name} is only supported on Ascend 950, this is {soc_family()}")


def npu_mhc_pre(x, phi, alpha, bias, *, gamma=None, norm_eps=1e-6, hc_eps=1e-6, out_flag=0, inner_precise=0):
    """x: [B, S, n, D] or [T, n, D] bf16/fp16, phi: [n^2+2n, nD] fp32 (rows pre | post | res),
    alpha: [3] fp32, bias: [n^2+2n] fp32 -> (h_in [.., D] x's dtype, h_post [.., n] fp32,
    h_res [.., n, n] fp32 (before Sinkhorn), inv_rms, h_mix, h_pre (empty unless out_flag)).

    ``x' = x_flat / sqrt(mean(x_flat^2) + norm_eps)`` (times gamma if given); ``H = alpha_k (x' phi_k) + b_k``;
    ``h_pre = sigmoid(H_pre) + hc_eps``; ``h_post = 2 sigmoid(H_post)``; ``h_in = sum_i h_pre_i x_i``.
    Shape rules: n in {4, 6, 8}, D in 512..16384 and a multiple of 32 (CANN MhcPre spec table).
    """
    _available("npu_mhc_pre")
    for name, t in (("x", x), ("phi", phi), ("alpha", alpha), ("bias", bias), ("gamma", gamma)):
        on_device(name, t)
    check(x.numel() > 0, "Input x should not be empty.")
    check(x.dim() in (3, 4), f"Input x must be 3D or 4D, but got {x.dim()}D.")
    check(x.dtype in _HALF, f"x must be bfloat16 or float16, got {x.dtype}")
    n, d = x.shape[-2:]
    check(n in _STREAMS, f"n must be 4, 6 or 8, got {n}")
    check(512 <= d <= 16384 and d % 32 == 0, f"D must be in [512, 16384] and a multiple of 32, got {d}")
    mixes = n * n + 2 * n
    check(phi.dtype == alpha.dtype == bias.dtype == torch.float32, "phi, alpha and bias must be float32")
    check(tuple(phi.shape) == (mixes, n * d), f"phi must be [n^2+2n={mixes}, nD={n * d}], got {list(phi.shape)}")
    check(alpha.numel() == 3, f"Input alpha must have 3 or 2 elements, but got {alpha.numel()}.")
    check(tuple(bias.shape) == (mixes,), f"bias must be [n^2+2n={mixes}], got {list(bias.shape)}")
    check(out_flag in (0, 1), f"Input out_flag must be 0 or 1, but got {out_flag}.")
    check(inner_precise in (0, 1), f"Input inner_precise must be 0 or 1, but got {inner_precise}.")

    flat = x.flatten(-2).float()
    inv_rms = torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    weighted = flat * gamma.reshape(-1).float() if gamma is not None else flat
    h_mix = weighted @ phi.T
    h = h_mix * inv_rms
    h_pre = torch.sigmoid(h[..., :n] * alpha[0] + bias[:n]) + hc_eps
    h_post = 2 * torch.sigmoid(h[..., n : 2 * n] * alpha[1] + bias[n : 2 * n])
    h_res = (h[..., 2 * n :] * alpha[2] + bias[2 * n :]).unflatten(-1, (n, n))
    h_in = (h_pre[..., None] * x.float()).sum(-2).to(x.dtype)
    if not out_flag:
        empty = torch.empty(0)
        return h_in, h_post, h_res, empty, empty, empty
    return h_in, h_post, h_res, inv_rms[..., 0], h_mix, h_pre


def npu_mhc_sinkhorn(x, *, eps=1e-6, num_iters=20, out_flag=0):
    """x: [B, S, n, n] or [T, n, n] fp32 -> (y like x, norm_out, sum_out (None unless out_flag, as
    on hardware; the intermediate outputs for the backward are not emulated)).

    ``y = softmax(x, -1) + eps``; ``y /= colsum + eps``; ``num_iters - 1`` times ``y /= rowsum + eps``,
    ``y /= colsum + eps`` (op-plugin doc formula: norm_out[2 num_iters - 1]).
    """
    _available("npu_mhc_sinkhorn")
    on_device("x", x)
    check(x.dim() in (3, 4), f"The x's dim should be 3 or 4, but got {x.dim()}.")
    check(x.shape[-1] in _STREAMS and x.shape[-2] == x.shape[-1], f"The x's dim should be 4 or 6 or 8, but got {x.shape[-1]}.")
    check(x.dtype == torch.float32, f"x must be float32, got {x.dtype}")
    check(x.numel() > 0, "x must not be empty")
    check(0 < num_iters <= 100, f"num_iters must be within (0, 100], but got {num_iters}.")
    check(out_flag == 0, "out_flag=1 (intermediates for the backward) is not emulated")
    y = torch.softmax(x, dim=-1) + eps
    y = y / (y.sum(-2, keepdim=True) + eps)
    for _ in range(num_iters - 1):
        y = y / (y.sum(-1, keepdim=True) + eps)
        y = y / (y.sum(-2, keepdim=True) + eps)
    return y, None, None


def npu_mhc_post(x, h_res, h_out, h_post):
    """x: [B, S, n, D] or [T, n, D] bf16/fp16, h_res: [.., n, n] fp32 (None: 950 only, plain residual),
    h_out: [.., D] in x's dtype, h_post: [.., n] fp32 -> ``H_res^T x + h_out (x) H_post`` in x's dtype
    (fp32 math)."""
    _available("npu_mhc_post")
    for name, t in (("x", x), ("h_res", h_res), ("h_out", h_out), ("h_post", h_post)):
        on_device(name, t)
    check(x.dim() in (3, 4) and x.dtype in _HALF, f"x must be a 3-D/4-D bfloat16/float16 tensor, got {x.dim()}-D {x.dtype}")
    n, d = x.shape[-2:]
    check(n in _STREAMS, f"n must be 4, 6 or 8, got {n}")
    check(h_out.dtype == x.dtype and tuple(h_out.shape) == (*x.shape[:-2], d), f"h_out must be [..., D={d}] {x.dtype}")
    check(h_post.dtype == torch.float32 and tuple(h_post.shape) == tuple(x.shape[:-1]), f"h_post must be [..., n={n}] float32")
    mixed = x.float()
    if h_res is not None:
        check(h_res.dtype == torch.float32 and tuple(h_res.shape) == (*x.shape[:-2], n, n), "h_res must be [..., n, n] float32")
        mixed = h_res.transpose(-1, -2) @ mixed
    return (mixed + h_post[..., None] * h_out.float()[..., None, :]).to(x.dtype)
