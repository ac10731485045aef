"""Triton mHC, the manifold-constrained hyper-connections (ops ``hc_pre``, ``hc_head``, ``hc_post``;
v4_ops.md §5).

``hc_post`` is one pass: a program takes one token and BLOCK_D columns, reads each of the n
streams once and writes the n mixed streams, ``x'_j = post_j f + sum_i comb[i, j] x_i``.

``hc_pre`` and ``hc_head`` need a reduction over all n*D entries of a token before any weight is
known. Above :data:`ONE_LAUNCH_MAX_TOKENS` tokens they are two launches:

1. ``_mix_kernel``, the pre-norm GEMM: ``x_flat @ fn^T`` ([tokens, n*D] x [n*D, M], M = (2+n)*n
   or n) in fp32 tiles of BLOCK_T tokens, together with ``sum(x_flat^2)``; the n*D axis is cut
   into SPLIT slices so that decode (a handful of tokens) still spreads the weight read over the
   chip. Each slice writes its partial sums to fp32 workspaces [SPLIT, T, M] and [SPLIT, T].
2. ``_weights_kernel``, one program per (token, BLOCK_D columns): sums the slices in slice order
   (deterministic), applies the RMS factor, the sigmoid pre/post weights and the Sinkhorn
   iterations on the n x n matrix in registers, and collapses the streams, ``y = sum_i pre_i x_i``.
   The weights are recomputed by every column block of a token (a few hundred flops) and written by
   the first. ``hc_head`` is the same launch without post and Sinkhorn.

Up to :data:`ONE_LAUNCH_MAX_TOKENS` tokens (decode) they are one launch, ``_pre_kernel``: the mix
grid, whose last program to arrive at each token tile (an arrival counter per tile, as the GEMMs'
split-K) sums the tile's partials and runs the weights kernel's code (``_token_weights``,
``_collapse``) for each of the tile's tokens and column blocks in turn: the same result bit for bit,
one launch less, but the tile's collapse done by one program (the threshold is a guess: TUNING.md).

All math is fp32 with the reference's operations: IEEE dot products (no TF32), correctly rounded
divisions and square root (``div_rn``, ``sqrt_rn``; Triton's ``/`` is approximate on the GPU). Sums
run in another order than the reference's (tiles, slices, FMA), which the tolerances allow.
Launch shapes are first guesses, not measured (TUNING.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._gemm import arrival_counters
from ._numerics import cast_rne
from .rope import check_dtype

ONE_LAUNCH_MAX_TOKENS = 4
"""hc_pre and hc_head run in one launch up to this many tokens (B*S), else in two. A guess, never
measured (TUNING.md): one launch saves a kernel boundary, but its last program then computes the
weights and collapse of the tile's tokens one after another, which the two-launch path spreads
over a program per (token, column block)."""
WARPS = 4
"""Warps of every hc_pre / hc_head program (mix, weights, one launch): the one launch runs the two
launches' code on as many warps, so it gives their bits."""


@dataclass(frozen=True)
class MixConfig:
    """One launch of the pre-norm GEMM: token tile, K chunk, K slices (on :data:`WARPS` warps)."""

    block_t: int
    block_k: int
    split: int


def mix_config(t: int, k: int, device: torch.device) -> MixConfig:
    """The pre-norm GEMM launch for T tokens and K = n*D.

    On the GPU: 16-token tiles up to 16 tokens (tl.dot's smallest), else 64; K slices doubled until
    the tiles cover every SM twice while each slice keeps >= 4 chunks. On CPU (the interpreter)
    small chunks and two slices, so the tests exercise edge tiles and the slice sum.
    """
    if device.type != "cuda":
        return MixConfig(16, 32, 2)
    block_t = 16 if t <= 16 else 64
    block_k = 64
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(t, block_t)
    split = 1
    while tiles * split < 2 * sms and k // (2 * split) >= 4 * block_k:
        split *= 2
    return MixConfig(block_t, block_k, split)


def _block_d(d: int, device: torch.device) -> int:
    """Columns per program of the per-token kernels: 16 on CPU (edge blocks in tests), else <= 512."""
    return 16 if device.type != "cuda" else min(triton.next_power_of_2(d), 512)


def hc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse n streams into one sub-layer input; emit the post and mixing (comb) weights.

    x: [B, S, n, D] bf16/fp32, fn: [(2+n)*n, n*D], base: [(2+n)*n], scale: [3]
    -> y: [B, S, D] in x's dtype, post: [B, S, n] fp32, comb: [B, S, n, n] fp32

    ``mix = (x_flat @ fn^T) * rsqrt(mean(x_flat^2) + norm_eps)``;
    ``pre_i = sigmoid(mix_i scale_0 + base_i) + eps``, ``post_i = 2 sigmoid(mix_{n+i} scale_1 + base_{n+i})``,
    ``comb = Sinkhorn(mix_{2n+i*n+j} scale_2 + base_{2n+i*n+j})`` (``sinkhorn_iters`` column
    normalisations), ``y = sum_i pre_i x_i``.
    """
    return collapse_streams(x, fn, base, scale, sinkhorn_iters, eps, norm_eps, head=False)


def hc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Collapse the n streams before the final norm: :func:`hc_pre`'s y without post and Sinkhorn.

    x: [B, S, n, D] bf16/fp32, fn: [n, n*D], base: [n], scale: [1] -> [B, S, D] in x's dtype.
    """
    return collapse_streams(x, fn, base, scale, 1, eps, norm_eps, head=True)[0]


def hc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Expand a sub-layer output back into n streams, mixed with the old ones.

    f: [B, S, D], x: [B, S, n, D] bf16/fp32, post: [B, S, n], comb: [B, S, n, n]
    -> [B, S, n, D] contiguous, in x's dtype: ``x'_j = post_j f + sum_i comb[i, j] x_i`` (fp32 math).
    """
    check_dtype("hc_post", "x", x)
    b, s, n, d = x.shape
    out = torch.empty((b, s, n, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = _block_d(d, x.device)
    _post_kernel[(b * s, triton.cdiv(d, block_d))](
        f, x, post, comb, out, s, d,
        *f.stride(), *x.stride(), *post.stride(), *comb.stride(),
        N=n, N_PAD=triton.next_power_of_2(n), BLOCK_D=block_d,
    )
    return out


def collapse_streams(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    sinkhorn_iters: int,
    eps: float,
    norm_eps: float,
    *,
    head: bool,
    one_launch: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`hc_pre` (head=False) or :func:`hc_head` (head=True): (y, post, comb), with post [B, S, 0]
    and comb [B, S, 0, 0] for head.

    one_launch: ``_pre_kernel`` (True) or ``_mix_kernel`` then ``_weights_kernel`` (False); None
    picks one launch for B*S <= :data:`ONE_LAUNCH_MAX_TOKENS`. Both give the same bits: the same
    partial sums, reduced in slice order by the same code on :data:`WARPS` warps.
    """
    check_dtype("hc_head" if head else "hc_pre", "x", x)
    b, s, n, d = x.shape
    t, m = b * s, fn.shape[0]
    y = torch.empty((b, s, d), dtype=x.dtype, device=x.device)
    post = torch.empty((b, s, 0 if head else n), dtype=torch.float32, device=x.device)
    comb = torch.empty((b, s, 0 if head else n, 0 if head else n), dtype=torch.float32, device=x.device)
    if t == 0:
        return y, post, comb
    config = mix_config(t, n * d, x.device)
    partial = torch.empty((config.split, t, m), dtype=torch.float32, device=x.device)
    sumsq = torch.empty((config.split, t), dtype=torch.float32, device=x.device)
    k_per_split = triton.cdiv(triton.cdiv(n * d, config.split), config.block_k) * config.block_k
    tiles = triton.cdiv(t, config.block_t)
    mix_args = (x, fn, partial, sumsq, t, s, d, n * d, m, k_per_split, *x.stride(), *fn.stride())
    mix_constexprs = {"BLOCK_T": config.block_t, "BLOCK_K": config.block_k, "M_PAD": max(16, triton.next_power_of_2(m))}
    weights_args = (base, scale, y, post, comb, sinkhorn_iters, eps, norm_eps, base.stride(0), scale.stride(0))
    block_d = _block_d(d, x.device)
    weights_constexprs = {"N": n, "N_PAD": triton.next_power_of_2(n), "SPLIT": config.split, "BLOCK_D": block_d,
                          "HEAD": head}
    if one_launch is None:
        one_launch = t <= ONE_LAUNCH_MAX_TOKENS
    if one_launch:
        _pre_kernel[(tiles, config.split)](
            *mix_args, arrival_counters(tiles, x.device), *weights_args,
            **mix_constexprs, **weights_constexprs, num_warps=WARPS,
        )
    else:
        _mix_kernel[(tiles, config.split)](*mix_args, **mix_constexprs, num_warps=WARPS)
        _weights_kernel[(t, triton.cdiv(d, block_d))](
            partial, sumsq, x, t, s, d, n * d, m, *x.stride(), *weights_args,
            **weights_constexprs, num_warps=WARPS,
        )
    return y, post, comb


@triton.jit
def _post_kernel(
    f_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, S, D,
    stride_fb, stride_fs, stride_fd, stride_xb, stride_xs, stride_xn, stride_xd,
    stride_pb, stride_ps, stride_pn, stride_cb, stride_cs, stride_ci, stride_cj,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[token, j, cols] = post_j f[cols] + sum_i comb[i, j] x_i[cols]; program (token, column block)."""
    token = tl.program_id(0)
    batch = (token // S).to(tl.int64)
    seq = (token % S).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < D
    streams = tl.arange(0, N_PAD)
    in_n = streams < N
    comb_row = comb_ptr + batch * stride_cb + seq * stride_cs + streams * stride_cj
    x_row = x_ptr + batch * stride_xb + seq * stride_xs + cols * stride_xd
    mixed = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    for i in tl.static_range(N):  # sum over comb's first index, in the reference's order
        c_i = tl.load(comb_row + i * stride_ci, mask=in_n, other=0.0).to(tl.float32)
        x_i = tl.load(x_row + i * stride_xn, mask=in_d, other=0.0).to(tl.float32)
        mixed += c_i[:, None] * x_i[None, :]
    post = tl.load(post_ptr + batch * stride_pb + seq * stride_ps + streams * stride_pn, mask=in_n, other=0.0)
    f = tl.load(f_ptr + batch * stride_fb + seq * stride_fs + cols * stride_fd, mask=in_d, other=0.0)
    out = post.to(tl.float32)[:, None] * f.to(tl.float32)[None, :] + mixed
    out_ptrs = out_ptr + (token.to(tl.int64) * N + streams[:, None]) * D + cols[None, :]
    tl.store(out_ptrs, cast_rne(out, out_ptr.dtype.element_ty), mask=in_n[:, None] & in_d[None, :])


@triton.jit
def _mix_kernel(
    x_ptr, fn_ptr, partial_ptr, sumsq_ptr, T, S, D, K, M, k_per_split,
    stride_xb, stride_xs, stride_xn, stride_xd, stride_fm, stride_fk,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr,
):
    """:func:`_mix_tile` of program (token tile, K slice)."""
    _mix_tile(x_ptr, fn_ptr, partial_ptr, sumsq_ptr, T, S, D, K, M, k_per_split,
              stride_xb, stride_xs, stride_xn, stride_xd, stride_fm, stride_fk,
              tl.program_id(0), tl.program_id(1), BLOCK_T, BLOCK_K, M_PAD)


@triton.jit
def _pre_kernel(
    x_ptr, fn_ptr, partial_ptr, sumsq_ptr, T, S, D, K, M, k_per_split,
    stride_xb, stride_xs, stride_xn, stride_xd, stride_fm, stride_fk, counter_ptr,
    base_ptr, scale_ptr, y_ptr, post_ptr, comb_ptr, iters, eps, norm_eps, stride_base, stride_scale,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr,
    N: tl.constexpr, N_PAD: tl.constexpr, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr, HEAD: tl.constexpr,
):
    """hc_pre / hc_head in one launch: :func:`_mix_kernel`, then the last program of each token
    tile to arrive does :func:`_weights_kernel`'s work for the tile's tokens.

    The partial tile is stored and the tile's counter bumped after a barrier (release); the program
    that sees the count reach SPLIT - 1 reads the SPLIT partials through L2 (.cg) and, token by
    token, computes the weights once and collapses every column block, then resets the counter to 0.
    """
    pid_t = tl.program_id(0)
    _mix_tile(x_ptr, fn_ptr, partial_ptr, sumsq_ptr, T, S, D, K, M, k_per_split,
              stride_xb, stride_xs, stride_xn, stride_xd, stride_fm, stride_fk,
              pid_t, tl.program_id(1), BLOCK_T, BLOCK_K, M_PAD)
    tl.debug_barrier()
    counter = counter_ptr + pid_t
    if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT - 1:
        for step in range(BLOCK_T):
            token = pid_t * BLOCK_T + step
            if token < T:
                pre = _token_weights(partial_ptr, sumsq_ptr, base_ptr, scale_ptr, post_ptr, comb_ptr, token,
                                     T, K, M, iters, eps, norm_eps, stride_base, stride_scale, N,
                                     N, N_PAD, SPLIT, HEAD, ".cg")
                for block in range(tl.cdiv(D, BLOCK_D)):
                    _collapse(x_ptr, y_ptr, pre, token, block, S, D, stride_xb, stride_xs, stride_xn, stride_xd,
                              N, N_PAD, BLOCK_D)
        tl.atomic_xchg(counter, 0)


@triton.jit
def _mix_tile(
    x_ptr, fn_ptr, partial_ptr, sumsq_ptr, T, S, D, K, M, k_per_split,
    stride_xb, stride_xs, stride_xn, stride_xd, stride_fm, stride_fk, pid_t, pid_s,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr,
):
    """partial[s, t, m] = sum over k in slice s of x_flat[t, k] fn[m, k]; sumsq[s, t] = sum of
    x_flat[t, k]^2; for the tokens of tile pid_t and the slice s = pid_s."""
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = tokens < T
    rows = x_ptr + (tokens // S).to(tl.int64) * stride_xb + (tokens % S).to(tl.int64) * stride_xs
    mixes = tl.arange(0, M_PAD)
    lo = pid_s * k_per_split
    hi = tl.minimum(lo + k_per_split, K)
    acc = tl.zeros((BLOCK_T, M_PAD), dtype=tl.float32)
    sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for step in range(0, k_per_split, BLOCK_K):
        k = lo + step + tl.arange(0, BLOCK_K)
        in_k = k < hi
        flat = (k // D) * stride_xn + (k % D) * stride_xd  # x_flat[t, k] = x[t, k // D, k % D]
        xk = tl.load(rows[:, None] + flat[None, :], mask=in_t[:, None] & in_k[None, :], other=0.0).to(tl.float32)
        w = tl.load(fn_ptr + mixes[:, None] * stride_fm + k[None, :] * stride_fk,
                    mask=(mixes[:, None] < M) & in_k[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(xk, tl.trans(w), acc, input_precision="ieee")
        sq += tl.sum(xk * xk, axis=1)
    tl.store(partial_ptr + (pid_s * T + tokens[:, None]).to(tl.int64) * M + mixes[None, :], acc,
             mask=in_t[:, None] & (mixes[None, :] < M))
    tl.store(sumsq_ptr + pid_s * T + tokens, sq, mask=in_t)


@triton.jit
def _mix_at(partial_ptr, token, T, M, idx, mask, SPLIT: tl.constexpr, CACHE: tl.constexpr):
    """mix[token, idx] before the RMS factor: the SPLIT partial sums, added in slice order (loads
    with cache modifier CACHE)."""
    ptrs = partial_ptr + token.to(tl.int64) * M + idx
    total = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=CACHE)
    for s in tl.static_range(1, SPLIT):
        total += tl.load(ptrs + s * T * M, mask=mask, other=0.0, cache_modifier=CACHE)
    return total


@triton.jit
def _param(ptr, offsets, mask):
    """fp32 parameters (scale, base) at offsets; fp64 ones rounded to fp32 as the reference does."""
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _sigmoid(z):
    return tl.math.div_rn(tl.full(z.shape, 1.0, tl.float32), 1.0 + tl.exp(-z))


@triton.jit
def _sinkhorn(logits, valid, iters, eps):
    """Near doubly-stochastic [N_PAD, N_PAD] (rows i, columns j) from logits; padding stays 0.

    ``C = softmax_j(logits) + eps``; ``C /= colsum + eps``; then ``iters - 1`` times
    ``C /= rowsum + eps``, ``C /= colsum + eps``.
    """
    z = tl.where(valid, logits, float("-inf"))
    peak = tl.max(z, axis=1)
    e = tl.where(valid, tl.exp(z - tl.where(peak == float("-inf"), 0.0, peak)[:, None]), 0.0)
    rowsum = tl.sum(e, axis=1)
    c = tl.where(valid, tl.math.div_rn(e, tl.where(rowsum == 0.0, 1.0, rowsum)[:, None]) + eps, 0.0)
    c = tl.math.div_rn(c, tl.sum(c, axis=0)[None, :] + eps)
    for _ in range(iters - 1):
        c = tl.math.div_rn(c, tl.sum(c, axis=1)[:, None] + eps)
        c = tl.math.div_rn(c, tl.sum(c, axis=0)[None, :] + eps)
    return c


@triton.jit
def _weights_kernel(
    partial_ptr, sumsq_ptr, x_ptr, T, S, D, K, M, stride_xb, stride_xs, stride_xn, stride_xd,
    base_ptr, scale_ptr, y_ptr, post_ptr, comb_ptr, iters, eps, norm_eps, stride_base, stride_scale,
    N: tl.constexpr, N_PAD: tl.constexpr, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr, HEAD: tl.constexpr,
):
    """Weights of one token from its mix, and its collapse y[token, cols]; program (token, column block).

    Every column block recomputes the token's weights; the first writes post and comb.
    """
    token = tl.program_id(0)
    n_out = N * (tl.program_id(1) == 0).to(tl.int32)
    pre = _token_weights(partial_ptr, sumsq_ptr, base_ptr, scale_ptr, post_ptr, comb_ptr, token,
                         T, K, M, iters, eps, norm_eps, stride_base, stride_scale, n_out,
                         N, N_PAD, SPLIT, HEAD, "")
    _collapse(x_ptr, y_ptr, pre, token, tl.program_id(1), S, D, stride_xb, stride_xs, stride_xn, stride_xd,
              N, N_PAD, BLOCK_D)


@triton.jit
def _token_weights(
    partial_ptr, sumsq_ptr, base_ptr, scale_ptr, post_ptr, comb_ptr, token,
    T, K, M, iters, eps, norm_eps, stride_base, stride_scale, n_out,
    N: tl.constexpr, N_PAD: tl.constexpr, SPLIT: tl.constexpr, HEAD: tl.constexpr, CACHE: tl.constexpr,
):
    """The collapse weights pre [N_PAD] (0 past N) of one token from its SPLIT partial mixes; unless
    HEAD, also post and comb, stored for the streams < n_out (N, or 0 to skip the stores)."""
    sq = _mix_at(sumsq_ptr, token, T, 1, 0, True, SPLIT, CACHE)
    inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(sq, K.to(tl.float32)) + norm_eps))

    streams = tl.arange(0, N_PAD)
    in_n = streams < N
    z = _mix_at(partial_ptr, token, T, M, streams, in_n, SPLIT, CACHE) * inv_rms
    z = z * _param(scale_ptr, 0, True) + _param(base_ptr, streams * stride_base, in_n)
    pre = tl.where(in_n, _sigmoid(z) + eps, 0.0)
    if not HEAD:
        z = _mix_at(partial_ptr, token, T, M, N + streams, in_n, SPLIT, CACHE) * inv_rms
        z = z * _param(scale_ptr, stride_scale, True) + _param(base_ptr, (N + streams) * stride_base, in_n)
        tl.store(post_ptr + token.to(tl.int64) * N + streams, 2 * _sigmoid(z), mask=streams < n_out)

        pair = 2 * N + streams[:, None] * N + streams[None, :]  # mix index of comb[i, j]
        valid = in_n[:, None] & in_n[None, :]
        z = _mix_at(partial_ptr, token, T, M, pair, valid, SPLIT, CACHE) * inv_rms
        z = z * _param(scale_ptr, 2 * stride_scale, True) + _param(base_ptr, pair * stride_base, valid)
        comb = _sinkhorn(z, valid, iters, eps)
        comb_ptrs = comb_ptr + (token.to(tl.int64) * N + streams[:, None]) * N + streams[None, :]
        tl.store(comb_ptrs, comb, mask=valid & (streams[:, None] < n_out))
    return pre


@triton.jit
def _collapse(
    x_ptr, y_ptr, pre, token, block, S, D, stride_xb, stride_xs, stride_xn, stride_xd,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y[token, cols] = sum_i pre_i x_i[cols] over the column block ``block`` (fp32, rounded to y's dtype)."""
    streams = tl.arange(0, N_PAD)
    cols = block * BLOCK_D + tl.arange(0, BLOCK_D)
    row = x_ptr + (token // S).to(tl.int64) * stride_xb + (token % S).to(tl.int64) * stride_xs
    x = tl.load(row + streams[:, None] * stride_xn + cols[None, :] * stride_xd,
                mask=(streams[:, None] < N) & (cols[None, :] < D), other=0.0).to(tl.float32)
    y = tl.sum(pre[:, None] * x, axis=0)
    tl.store(y_ptr + token.to(tl.int64) * D + cols, cast_rne(y, y_ptr.dtype.element_ty), mask=cols < D)
