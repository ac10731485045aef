"""Benchmarks of the per-token ops around each sub-layer: ``hc_pre``, ``hc_post``, ``hc_head`` (mHC,
n = 4 streams), ``rope`` (the last 64 of each 512-d query head) and ``rms_norm_rope`` (the query
heads normalised, then rotated: one pass, with the rms_norm and rope kernels in turn as a peer), at
V4-Flash and V4-Pro widths.

Rows at 1 and 64 tokens (decode batches) and 4096 and 16384 (prefill; hc_pre also 1024, the
end-to-end bench's prompt). All are memory-bound (hc_pre's stream-mix GEMM has 24 outputs per
token: ~24 FLOP/byte); the peer is the CPU reference's code on the GPU tensors. hc_pre and hc_head
run as the model calls them, their collapse normalised by the sub-layer's (the final) RMSNorm
weight, and time the path the kernel picks for T (one launch up to
``mhc.ONE_LAUNCH_MAX_TOKENS``, a guess); where that is one launch, the two launches are a second
peer; above 4 tokens the other ``tl.dot`` token tile (16 or 64 tokens, ``mhc.mix_config``) is
one; and the plain collapse then the ``rms_norm`` kernel (a launch more) is the last. hc_post
runs as the MoE layers call it, f in two parts (routed and shared experts) added as it reads
them, beside torch's add then the plain kernel.

    seahal bench --backend cuda --ops hc_pre,hc_post,hc_head,rope,rms_norm_rope [--quick] [--json out.json]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch

from seahal.bench.common import (
    PEAK_BF16_TFLOPS,
    Case,
    ModelDims,
    Workload,
    close,
    implementation,
    measure_all,
    models,
    reference,
    token_counts,
    workload_calls,
)

OPS = ("hc_pre", "hc_post", "hc_head", "rope", "rms_norm_rope")
BF16_TOL = 1e-2
"""bf16 stream outputs from fp32 math (2^-9 rounding); hc_pre's fp32 post and comb come from a
stream-mix GEMM whose dot may run in tf32 (~3e-4) and 20 Sinkhorn steps that do not amplify it."""


def hc_pre_cost(tokens: int, n: int, dim: int, head: bool = False) -> tuple[int, int]:
    """FLOPs and bytes of hc_pre (``head``: hc_head) with its norm weight over T tokens of n streams
    of width D, with m mixes: ``(2 + n) * n`` for hc_pre, n for hc_head.

    FLOPs ``2 * T * n * D * (m + 2) + 3 * T * D``: the [T, nD] x [nD, m] mix GEMM, the sum of
    squares of the RMS factor and the n-way collapse, then the norm's square, sum and two products
    (Sinkhorn's ~T * 20 * n^2 terms left out). Bytes: bf16 x read (``2 * T * n * D``) and y
    written (``2 * T * D``); fp32 fn (``4 * m * n * D``), the norm weight (``4 * D``), base and the
    scales (``4 * (m + 3)``, one scale for hc_head); hc_pre's post and comb written
    (``4 * T * (n + n^2)``).
    """
    m = n if head else (2 + n) * n
    outputs = 0 if head else 4 * tokens * (n + n * n)
    params = 4 * (m + (1 if head else 3)) + 4 * dim
    flops = 2 * tokens * n * dim * (m + 2) + 3 * tokens * dim
    return flops, 2 * tokens * n * dim + 2 * tokens * dim + 4 * m * n * dim + outputs + params


def hc_post_cost(tokens: int, n: int, dim: int) -> tuple[int, int]:
    """FLOPs ``2 * T * n * D * (n + 1) + T * D`` (``post_j f + sum_i comb_ij x_i`` per output
    element, f the sum of its two parts); bytes: the two bf16 parts of f read (``2 * 2 * T * D``: the
    MoE's routed and shared outputs, as the model calls it), x read and x' written (``2 * 2 * T * n
    * D``), fp32 post and comb read (``4 * T * (n + n^2)``)."""
    flops = 2 * tokens * n * dim * (n + 1) + tokens * dim
    return flops, 4 * tokens * dim + 4 * tokens * n * dim + 4 * tokens * (n + n * n)


def rope_cost(tokens: int, heads: int, head_dim: int, rope_dim: int) -> tuple[int, int]:
    """FLOPs ``3 * T * H * r`` (4 multiplies and 2 adds per rotated pair; the angles' sin/cos left
    out); bytes: the bf16 heads read and written whole (``2 * 2 * T * H * head_dim``: the output is a
    new tensor), int64 positions (``8 * T``) and fp32 frequencies (``4 * r / 2``)."""
    return 3 * tokens * heads * rope_dim, 4 * tokens * heads * head_dim + 8 * tokens + 2 * rope_dim


def rms_norm_rope_cost(tokens: int, heads: int, head_dim: int, rope_dim: int) -> tuple[int, int]:
    """:func:`rope_cost` plus the norm's ``3 * T * H * D`` FLOPs (a square and a sum per element, the
    scaling product); the same bytes: each head read and written once (the point of one pass)."""
    flops, nbytes = rope_cost(tokens, heads, head_dim, rope_dim)
    return flops + 3 * tokens * heads * head_dim, nbytes


def _hc_pre(op: str, dims: ModelDims, tokens: int, device: torch.device) -> Workload:
    """hc_pre or hc_head (the same stream mix with n outputs and one scale), normalised as the
    model calls them."""
    torch.manual_seed(tokens)
    n, head = dims.hc, op == "hc_head"
    m, n_scales = (n, 1) if head else ((2 + n) * n, 3)
    x = torch.randn(1, tokens, n, dims.dim, device=device, dtype=torch.bfloat16)
    fn = torch.randn(m, n * dims.dim, device=device) * (n * dims.dim) ** -0.5
    base, scale = torch.randn(m, device=device) * 0.1, torch.rand(n_scales, device=device) + 0.5
    weight = torch.rand(dims.dim, device=device) + 0.5
    streams, eps = (x, fn, base, scale), ((1e-6, 1e-6) if head else (20, 1e-6, 1e-6))
    args = (*streams, *eps, weight)
    peers = {"reference": partial(reference(op, "mhc"), *args)}
    if device.type == "cuda":
        from seahal.backends.cuda import mhc, norm

        collapse = partial(mhc.collapse_streams, *streams, 1 if head else 20, 1e-6, 1e-6, head=head)
        normed = partial(collapse, norm_weight=weight)
        if tokens <= mhc.ONE_LAUNCH_MAX_TOKENS:
            peers["two launches"] = partial(normed, one_launch=False)
        if tokens > mhc.GEMV_MAX_TOKENS:  # the other tl.dot token tile: 16 re-reads fn 4x as often as 64
            tile = 64 if mhc.mix_config(tokens, n * dims.dim, m, device).block_t == 16 else 16
            peers[f"{tile}-token tiles"] = partial(normed, config=mhc.mix_config(tokens, n * dims.dim, m, device, tile))
        peers["plain collapse, then the rms_norm kernel"] = lambda: norm.rms_norm(collapse()[0], weight, 1e-6)
    return Workload(partial(implementation(op, "mhc", "mhc", device), *args), peers, close(BF16_TOL))


def _hc_post(dims: ModelDims, tokens: int, device: torch.device) -> Workload:
    """hc_post as the model's MoE layers call it: f in two parts (routed and shared experts)."""
    torch.manual_seed(tokens)
    n = dims.hc
    f, addend = (torch.randn(1, tokens, dims.dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    x = torch.randn(1, tokens, n, dims.dim, device=device, dtype=torch.bfloat16)
    post = 2 * torch.rand(1, tokens, n, device=device)
    comb = torch.rand(1, tokens, n, n, device=device).softmax(-1)
    args = (f, x, post, comb, addend)
    peers = {"reference": partial(reference("hc_post", "mhc"), *args)}
    if device.type == "cuda":
        from seahal.backends.cuda import mhc

        peers["torch's add, then hc_post (two launches)"] = partial(mhc.hc_post_after_the_add, *args)
    return Workload(partial(implementation("hc_post", "mhc", "mhc", device), *args), peers, close(BF16_TOL))


def _rope(dims: ModelDims, tokens: int, device: torch.device) -> Workload:
    torch.manual_seed(tokens)
    x = torch.randn(1, tokens, dims.heads, dims.head_dim, device=device, dtype=torch.bfloat16)
    positions = torch.randint(0, 1 << 20, (1, tokens), device=device)
    freqs = 10000.0 ** -(torch.arange(0, dims.rope_dim, 2, device=device).float() / dims.rope_dim)
    args = (x, positions, freqs)
    return Workload(partial(implementation("rope", "rope", "rope", device), *args),
                    {"reference": partial(reference("rope", "rope"), *args)}, close(BF16_TOL))


def _rms_norm_rope(dims: ModelDims, tokens: int, device: torch.device) -> Workload:
    """The query heads (no weight, as the model's): one pass, against the two kernels in turn."""
    torch.manual_seed(tokens)
    x = torch.randn(1, tokens, dims.heads, dims.head_dim, device=device, dtype=torch.bfloat16)
    positions = torch.randint(0, 1 << 20, (1, tokens), device=device)
    freqs = 10000.0 ** -(torch.arange(0, dims.rope_dim, 2, device=device).float() / dims.rope_dim)
    args = (x, None, 1e-6, positions, freqs)
    peers = {"reference": partial(reference("rms_norm_rope", "rope"), *args)}
    if device.type == "cuda":
        from seahal.backends.cuda import rope

        peers["rms_norm then rope (two launches)"] = partial(rope.rms_norm_then_rope, *args)
    return Workload(partial(implementation("rms_norm_rope", "rope", "rope", device), *args), peers, close(BF16_TOL))


def cases(ops: list[str], device: torch.device, quick: bool) -> list[Case]:
    out = []
    for op in ops:
        counts = token_counts(device, quick)
        if op == "hc_pre" and device.type == "cuda" and not quick:  # the end-to-end bench's 1k-token prefill
            counts = tuple(sorted({*counts, 1024}))
        for dims in models(device):
            for tokens in counts:
                shape = f"{dims.name} n={dims.hc} D={dims.dim} T={tokens}"
                if op == "rope":
                    cost = rope_cost(tokens, dims.heads, dims.head_dim, dims.rope_dim)
                    shape, build = f"{dims.name} q {dims.heads}x{dims.head_dim} T={tokens}", _rope
                elif op == "rms_norm_rope":
                    cost = rms_norm_rope_cost(tokens, dims.heads, dims.head_dim, dims.rope_dim)
                    shape, build = f"{dims.name} q {dims.heads}x{dims.head_dim} T={tokens}", _rms_norm_rope
                elif op == "hc_post":
                    cost, build = hc_post_cost(tokens, dims.hc, dims.dim), _hc_post
                else:
                    cost, build = hc_pre_cost(tokens, dims.hc, dims.dim, head=op == "hc_head"), partial(_hc_pre, op)
                out.append(Case(op, shape, *cost, PEAK_BF16_TFLOPS, partial(build, dims, tokens),
                                {"model": dims.name, "tokens": tokens}))
    return out


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """Rows of ``ops`` (a subset of :data:`OPS`) in the common schema."""
    return measure_all(cases(ops, device, quick), device, quick)


def calls(ops: list[str], device: torch.device, quick: bool) -> Iterator[Callable[[], object]]:
    """Every kernel call of the rows, unchecked and untimed (:func:`.common.workload_calls`)."""
    return workload_calls(cases(ops, device, quick), device)
