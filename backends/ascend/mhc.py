"""mHC on the Ascend 950: ``npu_mhc_pre`` -> ``npu_mhc_sinkhorn`` for ``hc_pre`` (and ``hc_head``),
``npu_mhc_post`` for ``hc_post``, and ``hc_post_pre`` as this module's ``hc_post`` then its
``hc_pre`` (torch-npu >= 2.10.0.post4; Ascend 950 only, ``chips.py``).

The vendor's formulas (op-plugin ``docs/context/torch_npu-npu_mhc_pre.md``, ``..._mhc_sinkhorn.md``,
the 2.14 docstring of ``npu_mhc_post``) are the HAL's (v4_ops.md §5) term by term: RMS over all n*D
stream entries, ``phi`` rows ordered pre | post | res, ``alpha`` = (pre, post, res) scales,
``H_pre = sigmoid(.) + hc_eps``, ``H_post = 2 sigmoid(.)``, ``h_in = sum_i H_pre_i x_i`` on the raw
streams; Sinkhorn = softmax over the last dim + eps, a column normalisation, then ``num_iters - 1``
row/column rounds, each sum + eps; ``y = H_res^T x + h_out H_post``.

With ``norm_weight`` (the sub-layer's or the final RMSNorm folded into hc_pre / hc_head) the
norm runs on the portable ``rms_norm`` after the vendor's collapse ``h_in``. ``npu_mhc_pre``'s
``gamma`` keyword is not used for it: its documentation does not settle that it is this weight.
With hc_post's ``addend`` (the sub-layer output in two parts) ``npu_mhc_post`` takes their sum,
added in torch first. torch_npu has no fused post-then-pre operator: ``hc_post_pre`` makes the
streams with ``npu_mhc_post`` and reads them back with ``npu_mhc_pre``, each half with its own
portable fallback.
"""

from __future__ import annotations

import torch
import torch_npu

from seahal.backends.cpu.reference.norm import rms_norm
from seahal.hal.ops.mhc import post_then_pre

from ._portable import portable

STREAMS = frozenset({4, 6, 8})
"""n: the only stream counts of npu_mhc_pre/post/sinkhorn."""
DIM_RANGE = range(512, 16385, 32)
"""D of npu_mhc_pre: 512..16384 and a multiple of 32 (CANN ``MhcPre`` spec table)."""
MAX_TOKENS = 65536
SINKHORN_ITERS = range(1, 101)
_HALF = (torch.bfloat16, torch.float16)


def _pre_limits(x: torch.Tensor) -> str | None:
    """Why npu_mhc_pre cannot take streams x [B, S, n, D], or None."""
    b, s, n, d = x.shape
    if x.dtype not in _HALF:
        return f"bf16/fp16 streams (got {x.dtype})"
    if n not in STREAMS or d not in DIM_RANGE or not 0 < b * s <= MAX_TOKENS:
        return f"n in {sorted(STREAMS)}, D in 512..16384 (multiple of 32), 1..{MAX_TOKENS} tokens (got n={n}, D={d}, {b * s} tokens)"
    return None


def _mhc_pre(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, eps: float, norm_eps: float):
    """``npu_mhc_pre(x, phi, alpha, bias, *, norm_eps, hc_eps, out_flag=0)`` -> (h_in, h_post, h_res logits)."""
    h_in, h_post, h_res, *_ = torch_npu.npu_mhc_pre(
        x, phi.float(), alpha.float(), bias.float(), norm_eps=norm_eps, hc_eps=eps, out_flag=0
    )
    return h_in, h_post, h_res


def _normed(y: torch.Tensor, norm_weight: torch.Tensor | None, norm_eps: float) -> torch.Tensor:
    """The collapse ``y`` [B, S, D], or ``rms_norm(y, norm_weight, norm_eps)`` (portable) with a weight."""
    return y if norm_weight is None else rms_norm(y, norm_weight, norm_eps)


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
    """The ``hc_pre`` contract on ``npu_mhc_pre`` + ``npu_mhc_sinkhorn``.

    x: [B, S, n, D] bf16, fn: [(2+n)*n, n*D], base: [(2+n)*n], scale: [3] fp32, norm_weight: [D] or None
    -> y [B, S, D] in x's dtype, post [B, S, n] fp32, comb [B, S, n, n] fp32, as
    ``h_in, h_post, h_res = npu_mhc_pre(x, phi=fn, alpha=scale, bias=base, *, norm_eps, hc_eps=eps)``
    and ``comb = npu_mhc_sinkhorn(h_res, *, eps, num_iters=sinkhorn_iters)``; with norm_weight
    ``y = rms_norm(h_in, norm_weight, norm_eps)`` on the portable kernel. Streams outside the
    vendor's limits (fp32, n not 4/6/8, D not 512..16384 by 32, > 100 iterations) run the portable kernel.
    """
    beyond = _pre_limits(x)
    if beyond is None and sinkhorn_iters not in SINKHORN_ITERS:
        beyond = f"1..100 Sinkhorn iterations (got {sinkhorn_iters})"
    if beyond is not None:
        args = (x, fn, base, scale, sinkhorn_iters, eps, norm_eps, norm_weight)
        return portable("hc_pre", f"npu_mhc_pre/npu_mhc_sinkhorn need {beyond}", *args)
    y, post, comb_logits = _mhc_pre(x, fn, scale, base, eps, norm_eps)
    comb, _, _ = torch_npu.npu_mhc_sinkhorn(comb_logits, eps=eps, num_iters=sinkhorn_iters, out_flag=0)
    return _normed(y, norm_weight, norm_eps), post, comb


def hc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
    norm_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``hc_head`` contract on ``npu_mhc_pre``: its ``h_in`` with the post and res rows zero.

    x: [B, S, n, D] bf16, fn: [n, n*D], base: [n], scale: [1], norm_weight: [D] or None
    -> [B, S, D] in x's dtype.
    ``phi = [fn; 0]`` ((2+n)*n rows), ``bias = [base; 0]``, ``alpha = (scale, 0, 0)``: the pre
    weights are hc_head's, the unused post/res outputs are discarded. The padded phi is built per
    call ((2+n)*n x n*D fp32, once per forward at the head). With norm_weight (the final norm)
    ``rms_norm(h_in, norm_weight, norm_eps)`` on the portable kernel.
    """
    beyond = _pre_limits(x)
    if beyond is not None:
        args = (x, fn, base, scale, eps, norm_eps, norm_weight)
        return portable("hc_head", f"npu_mhc_pre needs {beyond}", *args)
    n = x.shape[2]
    rows = (2 + n) * n
    phi = torch.cat((fn.float(), fn.new_zeros(rows - n, fn.shape[1], dtype=torch.float32)))
    bias = torch.cat((base.float(), base.new_zeros(rows - n, dtype=torch.float32)))
    alpha = torch.cat((scale.float(), scale.new_zeros(2, dtype=torch.float32)))
    y, _, _ = _mhc_pre(x, phi, alpha, bias, eps, norm_eps)
    return _normed(y, norm_weight, norm_eps)


def hc_post(
    f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, addend: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``hc_post`` contract on ``npu_mhc_post(x, h_res=comb, h_out=f, h_post=post)``.

    f: [B, S, D], x: [B, S, n, D] bf16 (same dtype), post: [B, S, n], comb: [B, S, n, n] fp32,
    addend: [B, S, D] in f's dtype or None -> [B, S, n, D] in x's dtype:
    ``x'_j = post_j f + sum_i comb[i, j] x_i`` (the vendor's ``H_res^T x + h_out H_post``); with
    addend ``h_out = f + addend``, a torch add on the NPU (the contract's rounding to f's dtype).
    Other dtypes or n run the portable kernel.
    """
    n = x.shape[2]
    if x.dtype not in _HALF or f.dtype != x.dtype or n not in STREAMS:
        reason = f"bf16/fp16 x and f of one dtype, n in {sorted(STREAMS)} (got x {x.dtype}, f {f.dtype}, n={n})"
        return portable("hc_post", f"npu_mhc_post needs {reason}", f, x, post, comb, addend)
    h_out = f if addend is None else f + addend
    return torch_npu.npu_mhc_post(x, h_res=comb.float(), h_out=h_out, h_post=post.float())


hc_post_pre = post_then_pre(hc_post, hc_pre)
