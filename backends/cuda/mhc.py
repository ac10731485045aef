"""Triton mHC, the manifold-constrained hyper-connections (ops ``hc_pre``, ``hc_head``, ``hc_post``;
v4_ops.md §5).

``hc_post`` is one pass: a program takes one token and BLOCK_D columns, reads each of the n
streams once and writes the n mixed streams, ``x'_j = post_j f + sum_i comb[i, j] x_i``; given the
sub-layer output in two parts (``addend``: V4's shared expert beside the routed experts' sum) it
adds them as it reads f, rounded to f's dtype as the tensor add would.

``hc_pre`` and ``hc_head`` need a reduction over all n*D entries of a token before any weight is
known, then a pass over the token's n*D entries to collapse them. ``_mix_kernel``:

1. The pre-norm GEMM ``x_flat @ fn^T`` ([T, n*D] x [n*D, M], M = (2+n)*n or n) with
   ``sum(x_flat^2)``, program (token tile, K slice). The K axis is cut into SPLIT slices so that
   decode spreads the weight read (1.5 MB for V4-Flash, 2.7 MB for V4-Pro) over the chip: at one
   token, 128 and 224 programs of 12 KB each. Up to :data:`GEMV_MAX_TOKENS` tokens a tile is a
   CUDA-core GEMV (fp32 FMA, one running sum per lane); above, ``tl.dot`` on token tiles of 16/64:
   for bf16 x on the tensor cores with fn split into three bf16 parts (``hi = bf16(fn)``, ``mid =
   bf16(fn - hi)``, ``lo = bf16(fn - hi - mid)``: exactly fn, and bf16 x bf16 products are exact
   in fp32, so the three MMAs sum fp32 math's products with fp32 accumulation); for fp32 x an
   IEEE fp32 dot (no TF32). Each slice writes its partial sums to fp32 workspaces [SPLIT, T, M],
   [SPLIT, T].
2. The last program of a token tile to arrive (an arrival counter per tile, reset by it, as the
   GEMMs' split-K) sums the tile's partials in a fixed order (chunks of slices, each chunk by one
   ``tl.sum``: deterministic), applies the RMS factor and the sigmoid pre/post weights and runs the
   Sinkhorn iterations for all the tile's tokens at once ([tokens, n, n] in registers). It writes
   post, comb and pre (pre to a [T, n] workspace). ``hc_head`` has no post and no Sinkhorn. All
   its loads (a chunk's partials of every sum, the scales and biases) issue before any of them is
   reduced: one dependent trip through L2 on the serial tail, not one per sum.
3. Up to :data:`ONE_LAUNCH_MAX_TOKENS` tokens (decode) the same program then collapses the tile's
   tokens, ``y = sum_i pre_i x_i``, in column blocks of up to 4096 (x is in L2: the mix just read
   it): one launch. Above, ``_collapse_kernel`` does it on a program per (token, column block):
   two launches. The collapse adds the n products of each column one after another (no cross-lane
   reduction), so both give the same bits whatever their block widths.
4. With ``norm_weight`` (the sub-layer's pre-norm, or the final norm after ``hc_head``) the
   collapse takes the token's whole row in one block, rounds it to x's dtype and normalises it
   as ``rms_norm``'s kernel does (fp32 ``sum(y^2)``, ``rsqrt(sum / D + eps)``, times the weight,
   one rounding): the norm's launch and its read of y saved. Both launch forms then hold the row
   in one block of :data:`WARPS` warps, so they still give the same bits.

Every weight is thus computed once, by one program: a decode step's serial work is the weight
read of one slice, one arrival, one load of the partial sums (through L2), 2*iters normalisations
of an n x n matrix and the collapse of one token. All math is fp32 with the reference's
operations: correctly rounded divisions and square root (``div_rn``, ``sqrt_rn``; Triton's ``/``
is approximate on the GPU). Sums run in another order than the reference's (lanes, slices,
tiles), which the tolerances allow. Launch shapes are estimates from bytes and program counts,
not measured (TUNING.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from seahal.hal.ops.mhc import post_then_pre

from ._cache_keys import settle_cache_keys
from ._gemm import arrival_counters, reset_arrival_counter
from ._host import cdiv, next_power_of_2
from ._numerics import cast_rne, split_dot
from ._pdl import pdl_options, wait_for_prior_grid
from .norm import MAX_D
from .rope import check_dtype

GEMV_MAX_TOKENS = 4
"""Token tiles of up to this many tokens multiply on the CUDA cores (a tl.dot tile has >= 16 rows)."""
ONE_LAUNCH_MAX_TOKENS = 4
"""hc_pre and hc_head collapse in the mixing launch up to this many tokens (B*S), else in a second
launch. Estimated, not measured: one program collapses 32 KB a token (V4-Flash) from L2, ~0.5 us,
against ~2-3 us for a second dependent launch; at 4 tokens the two are about even."""
WARPS = 4
"""Warps of every hc_pre / hc_head program."""
FINISH_ELEMENTS = 16384
"""At most this many partial sums (slices x tile tokens x padded mixes) for one tile's last
program to read: bounds the slices of a tile (mix_config)."""
PROGRAMS_PER_SM = 4
"""Programs an SM the pre-norm GEMM's K slices aim for (fewer where FINISH_ELEMENTS bounds them).
Each program's loop waits on its own loads and products every step, so programs sharing an SM hide
each other's waits (sm_90, Triton 3.6: 5 of the 16-token-tile programs fit an SM). An estimate: at
2 the H100's end-to-end prefill profile (d2669c9) put the mix at 68 us a call over 1024 tokens, 256
programs for 32 MB of x (about 11 us at 3.0 TB/s)."""
CHUNK_ELEMENTS = 4096
"""Partial comb mixes the last program loads at once (one ``tl.sum`` each; the same slices' pre and
post mixes and squares load with them)."""


@dataclass(frozen=True)
class MixConfig:
    """One launch of the pre-norm GEMM: token tile, K chunk, K slices (on :data:`WARPS` warps).

    The launch cuts K into slices of ``ceil(ceil(K / split) / block_k)`` chunks, so it may run
    fewer than ``split`` of them (never an empty one)."""

    block_t: int
    block_k: int
    split: int


@dataclass(frozen=True)
class PostedStreams:
    """hc_post's inputs, for a mix over the streams they make (:func:`hc_post_pre`): the sub-layer
    output ``f`` (and its second part ``addend``, or None), the weights ``post`` and ``comb``,
    and ``out``, the contiguous [B, S, n, D] tensor the new streams are stored in."""

    f: torch.Tensor
    post: torch.Tensor
    comb: torch.Tensor
    addend: torch.Tensor | None
    out: torch.Tensor


def mix_config(t: int, k: int, m: int, device: torch.device, block_t: int | None = None) -> MixConfig:
    """The pre-norm GEMM launch for T tokens, K = n*D and M mixes (``block_t``: another token tile
    than the rule's, 16 or more; the bench times it as a variant).

    On the GPU: a GEMV tile of next_pow2(T) tokens up to :data:`GEMV_MAX_TOKENS` (chunks of ~4096
    products), else ``tl.dot`` tiles of 16 tokens up to 1024, then 64 (chunks of 64; each tile
    reads all of fn, through L2); slices enough for :data:`PROGRAMS_PER_SM` programs per SM, at
    most :data:`FINISH_ELEMENTS` partial sums a tile. V4-Flash hc_pre at one token: 128 slices of
    128 (12 KB of fn each); at 64 tokens: 4 tiles x 32 slices of 512; at 1024 and 4096: 64 tiles x
    8 slices.
    On CPU (the interpreter) small chunks and two slices, so the tests exercise edge tiles and the
    slice sum.
    """
    block_t = block_t or (next_power_of_2(t) if t <= GEMV_MAX_TOKENS else (16 if t <= 1024 else 64))
    if device.type != "cuda":
        return MixConfig(block_t, 16, 2)
    m_pad = _m_pad(m, block_t)
    block_k = max(16, min(256, 4096 // (block_t * m_pad))) if block_t < 16 else 64
    tiles = cdiv(t, block_t)
    programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    split = max(1, min(programs // tiles, FINISH_ELEMENTS // (block_t * m_pad)))
    return MixConfig(block_t, block_k, split)


def slices(k: int, config: MixConfig) -> tuple[int, int]:
    """(K per slice, slices) of a launch: ``config.split`` slices rounded up to whole chunks, none empty."""
    width = cdiv(cdiv(k, config.split), config.block_k) * config.block_k
    return width, cdiv(k, width)


def _m_pad(m: int, block_t: int) -> int:
    """Padded mix count: a power of two, >= 16 for tl.dot tiles."""
    return next_power_of_2(m) if block_t < 16 else max(16, next_power_of_2(m))


def _block_d(d: int, device: torch.device, widest: int) -> int:
    """Columns per collapse step: 16 on CPU (edge blocks in tests), else next_pow2(D) up to widest."""
    return 16 if device.type != "cuda" else min(next_power_of_2(d), widest)


def _collapse_block_d(d: int, device: torch.device, widest: int, normed: bool) -> int:
    """Columns per collapse step: the whole row for a normalised collapse, else :func:`_block_d`."""
    return next_power_of_2(d) if normed else _block_d(d, device, widest)


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

    x: [B, S, n, D] bf16/fp32, fn: [(2+n)*n, n*D], base: [(2+n)*n], scale: [3], norm_weight: [D] or None
    -> y: [B, S, D] in x's dtype, post: [B, S, n] fp32, comb: [B, S, n, n] fp32

    ``mix = (x_flat @ fn^T) * rsqrt(mean(x_flat^2) + norm_eps)``;
    ``pre_i = sigmoid(mix_i scale_0 + base_i) + eps``, ``post_i = 2 sigmoid(mix_{n+i} scale_1 + base_{n+i})``,
    ``comb = Sinkhorn(mix_{2n+i*n+j} scale_2 + base_{2n+i*n+j})`` (``sinkhorn_iters`` column
    normalisations), ``y = sum_i pre_i x_i``; with norm_weight ``rms_norm(y, norm_weight, norm_eps)``.
    """
    return collapse_streams(x, fn, base, scale, sinkhorn_iters, eps, norm_eps, head=False, norm_weight=norm_weight)


def hc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
    norm_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Collapse the n streams before the final norm: :func:`hc_pre`'s y without post and Sinkhorn
    (with norm_weight, that final norm too).

    x: [B, S, n, D] bf16/fp32, fn: [n, n*D], base: [n], scale: [1], norm_weight: [D] or None
    -> [B, S, D] in x's dtype.
    """
    return collapse_streams(x, fn, base, scale, 1, eps, norm_eps, head=True, norm_weight=norm_weight)[0]


def hc_post(
    f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, addend: torch.Tensor | None = None
) -> torch.Tensor:
    """Expand a sub-layer output back into n streams, mixed with the old ones.

    f: [B, S, D], x: [B, S, n, D] bf16/fp32, post: [B, S, n], comb: [B, S, n, n], addend: [B, S, D]
    in f's dtype or None -> [B, S, n, D] contiguous, in x's dtype: ``x'_j = post_j f + sum_i comb[i, j]
    x_i`` (fp32 math), f being ``f + addend`` rounded to f's dtype when addend is given.
    """
    check_dtype("hc_post", "x", x)
    b, s, n, d = x.shape
    out = torch.empty((b, s, n, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = _block_d(d, x.device, 512)
    second = f if addend is None else addend  # read only with ADDEND
    _post_kernel[(b * s, cdiv(d, block_d))](
        f, x, post, comb, out, s, d,
        *f.stride(), *x.stride(), *post.stride(), *comb.stride(), second, *second.stride(),
        N=n, N_PAD=next_power_of_2(n), BLOCK_D=block_d, ADDEND=addend is not None, **pdl_options(),
    )
    return out


def hc_post_pre(
    f: torch.Tensor,
    x: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
    norm_weight: torch.Tensor | None = None,
    addend: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`hc_post` then :func:`hc_pre` of the streams it makes.

    f, x, post, comb, addend: hc_post's; fn, base, scale, sinkhorn_iters, eps, norm_eps,
    norm_weight: hc_pre's -> (streams [B, S, n, D] contiguous in x's dtype, y, post', comb').

    Up to :data:`GEMV_MAX_TOKENS` tokens (decode) in hc_pre's one launch: each mix program makes
    the new streams of its tokens and K slice (hc_post's arithmetic, rounded to x's dtype), stores
    them and mixes them, and the last program collapses them from L2: hc_post's launch saved. Above,
    hc_post's kernel and then hc_pre's launches: on tl.dot tiles the streams made in the MMA
    operand's layout cost ~4x the mix loop's instructions (sm_90, 16-token tiles: 974 against 252)
    and more shared memory than an SM has on 64-token tiles, for a launch and one read of the
    streams saved in a step of hundreds of microseconds.
    """
    check_dtype("hc_post_pre", "x", x)
    if x.shape[0] * x.shape[1] > GEMV_MAX_TOKENS:
        return _post_then_pre(f, x, post, comb, fn, base, scale, sinkhorn_iters, eps, norm_eps, norm_weight, addend)
    streams = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    posted = PostedStreams(f, post, comb, addend, streams)
    y, post_next, comb_next = collapse_streams(
        x, fn, base, scale, sinkhorn_iters, eps, norm_eps, head=False, norm_weight=norm_weight, posted=posted
    )
    return streams, y, post_next, comb_next


_post_then_pre = post_then_pre(hc_post, hc_pre)


def hc_post_after_the_add(
    f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, addend: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`hc_post` as the GPU-verified kernels in turn: torch's add of the two parts, then the
    plain one-pass kernel (kernel ``cuda.triton_unfused``)."""
    return hc_post(f if addend is None else f + addend, x, post, comb)


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
    norm_weight: torch.Tensor | None = None,
    one_launch: bool | None = None,
    config: MixConfig | None = None,
    posted: PostedStreams | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`hc_pre` (head=False) or :func:`hc_head` (head=True): (y, post, comb), with post [B, S, 0]
    and comb [B, S, 0, 0] for head; y normalised with norm_weight when given.

    one_launch: the collapse in ``_mix_kernel`` (True) or in ``_collapse_kernel`` after it (False);
    None picks one launch for B*S <= :data:`ONE_LAUNCH_MAX_TOKENS`. Both give the same bits: the
    same weights, and a collapse whose sums do not depend on the block width. ``config``: the
    pre-norm GEMM's launch, default :func:`mix_config`'s. ``posted``: x are the old streams, and
    the mix and collapse run over ``hc_post(posted.f, x, posted.post, posted.comb, posted.addend)``,
    which the mix programs make and store in ``posted.out`` (:func:`hc_post_pre`).
    """
    op = "hc_head" if head else "hc_pre"
    check_dtype(op, "x", x)
    b, s, n, d = x.shape
    normed = norm_weight is not None
    if normed and d > MAX_D:
        raise NotImplementedError(f"cuda.triton {op} with norm_weight: rows of at most {MAX_D} elements, got D={d}")
    t, k, m = b * s, n * d, fn.shape[0]
    y = torch.empty((b, s, d), dtype=x.dtype, device=x.device)
    post = torch.empty((b, s, 0 if head else n), dtype=torch.float32, device=x.device)
    comb = torch.empty((b, s, 0 if head else n, 0 if head else n), dtype=torch.float32, device=x.device)
    if t == 0:
        return y, post, comb
    config = config or mix_config(t, k, m, x.device)
    width, split = slices(k, config)
    tiles = cdiv(t, config.block_t)
    partial = torch.empty((split, t, m), dtype=torch.float32, device=x.device)
    sumsq = torch.empty((split, t), dtype=torch.float32, device=x.device)
    pre = torch.empty((t, n), dtype=torch.float32, device=x.device)
    n_pad = next_power_of_2(n)
    widest = n_pad if head else n_pad * n_pad  # the widest gather of partial sums: comb's n x n
    chunk = CHUNK_ELEMENTS if x.device.type == "cuda" else 2 * config.block_t * widest  # CPU: 2 slices a chunk
    one_launch = t <= ONE_LAUNCH_MAX_TOKENS if one_launch is None else one_launch
    _mix_kernel[(tiles, split)](
        x, fn, base, scale, partial, sumsq, arrival_counters(tiles, x.device), pre, post, comb, y,
        norm_weight if normed else x, t, s, d, k, m, width, sinkhorn_iters, eps, norm_eps,
        *x.stride(), *fn.stride(), base.stride(0), scale.stride(0),
        BLOCK_T=config.block_t, BLOCK_K=config.block_k, M_PAD=_m_pad(m, config.block_t), SPLIT=split,
        SPLIT_CHUNK=min(next_power_of_2(split), max(1, chunk // (config.block_t * widest))),
        N=n, N_PAD=n_pad, HEAD=head, X_BF16=x.dtype == torch.bfloat16, COLLAPSE=one_launch, NORM=normed and one_launch,
        BLOCK_D=_collapse_block_d(d, x.device, 4096, normed) if one_launch else 16, num_warps=WARPS,
        **_posting_options(posted), **pdl_options(),
    )
    if not one_launch:
        block_d = _collapse_block_d(d, x.device, 512, normed)
        source = x if posted is None else posted.out
        _collapse_kernel[(t, cdiv(d, block_d))](
            source, pre, y, norm_weight if normed else x, s, d, norm_eps, *source.stride(),
            N=n, BLOCK_D=block_d, NORM=normed, num_warps=WARPS, **pdl_options(),
        )
    return y, post, comb


def _posting_options(posted: PostedStreams | None) -> dict[str, object]:
    """The mix kernel's hc_post arguments (pointers, strides, POST and ADDEND); none for a plain
    hc_pre or hc_head, whose launches keep the kernel's defaults (the code they compiled to before
    hc_post_pre)."""
    if posted is None:
        return {}
    second = posted.f if posted.addend is None else posted.addend  # read only with ADDEND
    names = ("fb", "fs", "fd", "pb", "ps", "pn", "cb", "cs", "ci", "cj", "ab", "as", "ad")
    strides = (*posted.f.stride(), *posted.post.stride(), *posted.comb.stride(), *second.stride())
    return {
        "f_ptr": posted.f, "post_in_ptr": posted.post, "comb_in_ptr": posted.comb, "a_ptr": second,
        "streams_ptr": posted.out, **{f"stride_{name}": v for name, v in zip(names, strides)},
        "POST": True, "ADDEND": posted.addend is not None,
    }


@triton.jit
def _post_kernel(
    f_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, S, D,
    stride_fb, stride_fs, stride_fd, stride_xb, stride_xs, stride_xn, stride_xd,
    stride_pb, stride_ps, stride_pn, stride_cb, stride_cs, stride_ci, stride_cj,
    a_ptr, stride_ab, stride_as, stride_ad,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, ADDEND: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """out[token, j, cols] = post_j f[cols] + sum_i comb[i, j] x_i[cols]; program (token, column
    block). ADDEND: f is ``f + a`` rounded to f's dtype (the two parts of the sub-layer output)."""
    wait_for_prior_grid(PDL)
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
    if ADDEND:
        a = tl.load(a_ptr + batch * stride_ab + seq * stride_as + cols * stride_ad, mask=in_d, other=0.0)
        f = cast_rne(f.to(tl.float32) + a.to(tl.float32), f_ptr.dtype.element_ty)
    out = post.to(tl.float32)[:, None] * f.to(tl.float32)[None, :] + mixed
    out_ptrs = out_ptr + (token.to(tl.int64) * N + streams[:, None]) * D + cols[None, :]
    tl.store(out_ptrs, cast_rne(out, out_ptr.dtype.element_ty), mask=in_n[:, None] & in_d[None, :])


@triton.jit
def _mix_kernel(
    x_ptr, fn_ptr, base_ptr, scale_ptr, partial_ptr, sumsq_ptr, counter_ptr, pre_ptr, post_ptr, comb_ptr, y_ptr,
    norm_w_ptr, T, S, D, K, M, width, iters, eps, norm_eps,
    stride_xb, stride_xs, stride_xn, stride_xd, stride_fm, stride_fk, stride_base, stride_scale,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr, SPLIT: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, HEAD: tl.constexpr, X_BF16: tl.constexpr,
    COLLAPSE: tl.constexpr, NORM: tl.constexpr, BLOCK_D: tl.constexpr,
    f_ptr=None, post_in_ptr=None, comb_in_ptr=None, a_ptr=None, streams_ptr=None,
    stride_fb=None, stride_fs=None, stride_fd=None, stride_pb=None, stride_ps=None, stride_pn=None,
    stride_cb=None, stride_cs=None, stride_ci=None, stride_cj=None, stride_ab=None, stride_as=None, stride_ad=None,
    POST: tl.constexpr = False, ADDEND: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """Program (token tile, K slice): the slice's partial mixes; the tile's last program to arrive
    computes the tile's weights (:func:`_tile_weights`) and, if COLLAPSE, its collapse (normalised
    with the weights at norm_w_ptr if NORM).

    The partials are stored and the tile's counter bumped after a barrier (release); the program
    that sees the count reach SPLIT - 1 resets it to 0 and reads the SPLIT partials through L2 (.cg).

    POST: x holds the old streams, and the mix runs over ``hc_post(f, x, post_in, comb_in, a)`` (a
    read if ADDEND), which each program makes for its tokens and K slice (:func:`_posted_streams`)
    and stores in streams_ptr ([T, N, D] contiguous); the collapse reads them back through L2 after
    the arrival, as the partials.
    """
    wait_for_prior_grid(PDL)
    pid_t = tl.program_id(0)
    _mix_slice(x_ptr, fn_ptr, partial_ptr, sumsq_ptr, T, S, D, K, M, width,
               stride_xb, stride_xs, stride_xn, stride_xd, stride_fm, stride_fk,
               pid_t, tl.program_id(1), BLOCK_T, BLOCK_K, M_PAD, X_BF16,
               f_ptr, post_in_ptr, comb_in_ptr, a_ptr, streams_ptr, stride_fb, stride_fs, stride_fd,
               stride_pb, stride_ps, stride_pn, stride_cb, stride_cs, stride_ci, stride_cj,
               stride_ab, stride_as, stride_ad, N, POST, ADDEND)
    tl.debug_barrier()
    if SPLIT > 1:
        last = tl.atomic_add(counter_ptr + pid_t, 1, sem="acq_rel") == SPLIT - 1
    else:
        last = True
    if last:
        if SPLIT > 1:
            reset_arrival_counter(counter_ptr + pid_t)
        _tile_weights(partial_ptr, sumsq_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, pid_t,
                      T, K, M, iters, eps, norm_eps, stride_base, stride_scale,
                      BLOCK_T, SPLIT, SPLIT_CHUNK, N, N_PAD, HEAD)
        if COLLAPSE:
            tl.debug_barrier()  # pre, stored by every thread, is read back by every thread
            if POST:  # the streams this launch made, [T, N, D]
                src, src_b, src_s, src_n, src_d = streams_ptr, S * N * D, N * D, D, 1
            else:
                src, src_b, src_s, src_n, src_d = x_ptr, stride_xb, stride_xs, stride_xn, stride_xd
            for step in tl.static_range(BLOCK_T):
                token = pid_t * BLOCK_T + step
                if token < T:
                    if NORM:  # the row in one block (BLOCK_D >= D): its norm's reduction in no loop
                        _collapse_columns(src, pre_ptr, y_ptr, norm_w_ptr, token, tl.arange(0, BLOCK_D),
                                          S, D, norm_eps, src_b, src_s, src_n, src_d, N, NORM, POST)
                    else:
                        for c0 in range(0, D, BLOCK_D):
                            _collapse_columns(src, pre_ptr, y_ptr, norm_w_ptr, token, c0 + tl.arange(0, BLOCK_D),
                                              S, D, norm_eps, src_b, src_s, src_n, src_d, N, NORM, POST)


@triton.jit
def _collapse_kernel(
    x_ptr, pre_ptr, y_ptr, norm_w_ptr, S, D, norm_eps, stride_xb, stride_xs, stride_xn, stride_xd,
    N: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr = False,
):
    """y[token, cols] from the weights ``_mix_kernel`` left in pre; program (token, column block),
    one block of the whole row if NORM."""
    wait_for_prior_grid(PDL)
    _collapse_columns(x_ptr, pre_ptr, y_ptr, norm_w_ptr, tl.program_id(0),
                      tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D),
                      S, D, norm_eps, stride_xb, stride_xs, stride_xn, stride_xd, N, NORM)


@triton.jit
def _mix_slice(
    x_ptr, fn_ptr, partial_ptr, sumsq_ptr, T, S, D, K, M, width,
    stride_xb, stride_xs, stride_xn, stride_xd, stride_fm, stride_fk, pid_t, pid_s,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr, X_BF16: tl.constexpr,
    f_ptr=None, post_ptr=None, comb_ptr=None, a_ptr=None, streams_ptr=None, stride_fb=None, stride_fs=None,
    stride_fd=None, stride_pb=None, stride_ps=None, stride_pn=None, stride_cb=None, stride_cs=None,
    stride_ci=None, stride_cj=None, stride_ab=None, stride_as=None, stride_ad=None,
    N: tl.constexpr = 4, POST: tl.constexpr = False, ADDEND: tl.constexpr = False,
):
    """partial[s, t, m] = sum over k in slice s of x_flat[t, k] fn[m, k]; sumsq[s, t] = sum of
    x_flat[t, k]^2; for the tokens of tile pid_t and the slice s = pid_s, k in [s*width, +width).

    BLOCK_T < 16: a GEMV on the CUDA cores. Its rows are (token, mix) pairs, each holding the
    token's x and the mix's fn row in the one layout of the fn load (no exchange between lanes),
    and keep one fp32 running sum per lane, reduced once at the end. Else tl.dot: bf16 x against
    fn split into three exact bf16 parts (fp32 accumulation), or fp32 x in IEEE fp32.

    POST: x_flat is the new streams ``hc_post(f, x, post, comb, a)``, made here from the old ones
    (:func:`_posted_streams`) and stored at streams_ptr [T, N*D]; the GEMV's (token, mix) rows
    take their token's values by a broadcast of that tile.
    """
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = tokens < T
    rows = x_ptr + (tokens // S).to(tl.int64) * stride_xb + (tokens % S).to(tl.int64) * stride_xs
    lo = pid_s * width
    hi = tl.minimum(lo + width, K)
    sq = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    if BLOCK_T < 16:
        pairs = tl.arange(0, BLOCK_T * M_PAD)
        pair_token = pid_t * BLOCK_T + pairs // M_PAD
        mixes = pairs % M_PAD
        pair_rows = x_ptr + (pair_token // S).to(tl.int64) * stride_xb + (pair_token % S).to(tl.int64) * stride_xs
        lanes = tl.zeros((BLOCK_T * M_PAD, BLOCK_K), dtype=tl.float32)
    else:
        mixes = tl.arange(0, M_PAD)
        acc = tl.zeros((BLOCK_T, M_PAD), dtype=tl.float32)
    in_m = mixes < M
    for k0 in range(lo, hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        in_k = k < hi
        flat = (k // D) * stride_xn + (k % D) * stride_xd  # x_flat[t, k] = x[t, k // D, k % D]
        if POST:
            xk = _posted_streams(x_ptr, f_ptr, post_ptr, comb_ptr, a_ptr, tokens, in_t, k, in_k, S, D,
                                 stride_xb, stride_xs, stride_xn, stride_xd, stride_fb, stride_fs, stride_fd,
                                 stride_pb, stride_ps, stride_pn, stride_cb, stride_cs, stride_ci, stride_cj,
                                 stride_ab, stride_as, stride_ad, N, ADDEND)
            tl.store(streams_ptr + tokens.to(tl.int64)[:, None] * K + k[None, :], xk,
                     mask=in_t[:, None] & in_k[None, :])
        else:
            xk = tl.load(rows[:, None] + flat[None, :], mask=in_t[:, None] & in_k[None, :], other=0.0)
        w = tl.load(fn_ptr + mixes[:, None] * stride_fm + k[None, :] * stride_fk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0).to(tl.float32)
        xf = xk.to(tl.float32)
        sq += xf * xf
        if BLOCK_T < 16:
            if POST:  # each token's values made once, repeated for its mixes' rows
                x_pairs = tl.reshape(tl.broadcast_to(xk[:, None, :], (BLOCK_T, M_PAD, BLOCK_K)),
                                     (BLOCK_T * M_PAD, BLOCK_K))
            else:
                x_pairs = tl.load(pair_rows[:, None] + flat[None, :],
                                  mask=(pair_token < T)[:, None] & in_k[None, :], other=0.0)
            lanes += x_pairs.to(tl.float32) * w
        elif X_BF16:
            acc = split_dot(xk, tl.trans(w), acc, False, True)
        else:
            acc = tl.dot(xf, tl.trans(w), acc, input_precision="ieee")
    tl.store(sumsq_ptr + pid_s * T + tokens, tl.sum(sq, axis=1), mask=in_t)
    if BLOCK_T < 16:
        tl.store(partial_ptr + (pid_s * T + pair_token).to(tl.int64) * M + mixes, tl.sum(lanes, axis=1),
                 mask=(pair_token < T) & in_m)
    else:
        tl.store(partial_ptr + (pid_s * T + tokens[:, None]).to(tl.int64) * M + mixes[None, :], acc,
                 mask=in_t[:, None] & in_m[None, :])


@triton.jit
def _posted_streams(
    x_ptr, f_ptr, post_ptr, comb_ptr, a_ptr, tokens, in_t, k, in_k, S, D,
    stride_xb, stride_xs, stride_xn, stride_xd, stride_fb, stride_fs, stride_fd, stride_pb, stride_ps, stride_pn,
    stride_cb, stride_cs, stride_ci, stride_cj, stride_ab, stride_as, stride_ad, N: tl.constexpr, ADDEND: tl.constexpr,
):
    """[len(tokens), len(k)]: the new streams' flat entries ``x'[t, k]`` of hc_post, stream j = k // D
    and column c = k % D: ``post_j f[c] + sum_i comb[i, j] x_i[c]`` (f first ``f + a`` rounded to
    f's dtype if ADDEND), rounded to x's dtype; ``_post_kernel``'s operations in its order."""
    batch = (tokens // S).to(tl.int64)[:, None]
    seq = (tokens % S).to(tl.int64)[:, None]
    j = (k // D)[None, :]
    c = (k % D)[None, :]
    mask = in_t[:, None] & in_k[None, :]
    comb_col = comb_ptr + batch * stride_cb + seq * stride_cs + j * stride_cj
    x_col = x_ptr + batch * stride_xb + seq * stride_xs + c * stride_xd
    mixed = tl.zeros(mask.shape, dtype=tl.float32)
    for i in tl.static_range(N):  # sum over comb's first index, in the reference's order
        c_i = tl.load(comb_col + i * stride_ci, mask=mask, other=0.0).to(tl.float32)
        x_i = tl.load(x_col + i * stride_xn, mask=mask, other=0.0).to(tl.float32)
        mixed += c_i * x_i
    post = tl.load(post_ptr + batch * stride_pb + seq * stride_ps + j * stride_pn, mask=mask, other=0.0)
    f = tl.load(f_ptr + batch * stride_fb + seq * stride_fs + c * stride_fd, mask=mask, other=0.0)
    if ADDEND:
        a = tl.load(a_ptr + batch * stride_ab + seq * stride_as + c * stride_ad, mask=mask, other=0.0)
        f = cast_rne(f.to(tl.float32) + a.to(tl.float32), f_ptr.dtype.element_ty)
    return cast_rne(post.to(tl.float32) * f.to(tl.float32) + mixed, x_ptr.dtype.element_ty)


@triton.jit
def _slice_chunk(ptr, s0, tokens, in_t, idx, valid, T, M, SPLIT: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """[SPLIT_CHUNK, BLOCK_T, W]: the partial sums ``ptr[s0 + c, token, idx]`` of slices s0 ..
    s0 + SPLIT_CHUNK - 1 (workspace [SPLIT, T, M]; 0 past SPLIT and in masked lanes). Loads bypass
    L1 (.cg): other programs wrote them."""
    s = s0 + tl.arange(0, SPLIT_CHUNK)
    at = (tokens.to(tl.int64) * M)[:, None] + idx[None, :]
    mask = (s < SPLIT)[:, None, None] & (in_t[:, None] & valid[None, :])[None, :, :]
    return tl.load(ptr + (s.to(tl.int64) * T * M)[:, None, None] + at[None, :, :], mask=mask, other=0.0,
                   cache_modifier=".cg")


@triton.jit
def _param(ptr, offsets, mask):
    """fp32 parameters (scale, base) at offsets; fp64 ones rounded to fp32 as the reference does."""
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _sigmoid(z):
    return tl.math.div_rn(tl.full(z.shape, 1.0, tl.float32), 1.0 + tl.exp(-z))


@triton.jit
def _sinkhorn(logits, valid, iters, eps):
    """Near doubly-stochastic [BLOCK_T, N_PAD, N_PAD] (token, row i, column j) from logits;
    padding stays 0.

    ``C = softmax_j(logits) + eps``; ``C /= colsum + eps``; then ``iters - 1`` times
    ``C /= rowsum + eps``, ``C /= colsum + eps``.
    """
    z = tl.where(valid, logits, float("-inf"))
    peak = tl.max(z, axis=2)
    e = tl.where(valid, tl.exp(z - tl.where(peak == float("-inf"), 0.0, peak)[:, :, None]), 0.0)
    rowsum = tl.sum(e, axis=2)
    c = tl.where(valid, tl.math.div_rn(e, tl.where(rowsum == 0.0, 1.0, rowsum)[:, :, None]) + eps, 0.0)
    c = tl.math.div_rn(c, tl.sum(c, axis=1)[:, None, :] + eps)
    for _ in range(iters - 1):
        c = tl.math.div_rn(c, tl.sum(c, axis=2)[:, :, None] + eps)
        c = tl.math.div_rn(c, tl.sum(c, axis=1)[:, None, :] + eps)
    return c


@triton.jit
def _tile_weights(
    partial_ptr, sumsq_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, pid_t,
    T, K, M, iters, eps, norm_eps, stride_base, stride_scale,
    BLOCK_T: tl.constexpr, SPLIT: tl.constexpr, SPLIT_CHUNK: tl.constexpr, N: tl.constexpr,
    N_PAD: tl.constexpr, HEAD: tl.constexpr,
):
    """The weights of the tokens of tile pid_t from their SPLIT partial mixes, all tokens at once:
    pre [T, N] (workspace); unless HEAD, post [T, N] and comb [T, N, N]."""
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = tokens < T
    one = tl.arange(0, 1)
    streams = tl.arange(0, N_PAD)
    in_n = streams < N
    pairs = tl.arange(0, N_PAD * N_PAD)  # (i, j) row-major: mix index 2N + i*N + j of comb[i, j]
    i = pairs // N_PAD
    j = pairs % N_PAD
    valid = (i < N) & (j < N)
    mix = 2 * N + i * N + j
    # Every load first, the parameters with the partial sums (SPLIT_CHUNK slices at a time: each
    # chunk's loads issue together, one trip through L2 for all of them); then each sum adds its
    # chunk by one tl.sum, the chunks in turn (a fixed order: deterministic).
    scale_pre = _param(scale_ptr, 0, True)
    base_pre = _param(base_ptr, streams * stride_base, in_n)[None, :]
    if not HEAD:
        scale_post = _param(scale_ptr, stride_scale, True)
        base_post = _param(base_ptr, (N + streams) * stride_base, in_n)[None, :]
        scale_comb = _param(scale_ptr, 2 * stride_scale, True)
        base_comb = _param(base_ptr, mix * stride_base, valid)[None, :]
    sq = tl.zeros((BLOCK_T, 1), dtype=tl.float32)
    z_pre = tl.zeros((BLOCK_T, N_PAD), dtype=tl.float32)
    if not HEAD:
        z_post = tl.zeros((BLOCK_T, N_PAD), dtype=tl.float32)
        z_comb = tl.zeros((BLOCK_T, N_PAD * N_PAD), dtype=tl.float32)
    for s0 in tl.static_range(0, SPLIT, SPLIT_CHUNK):
        sq_chunk = _slice_chunk(sumsq_ptr, s0, tokens, in_t, one, one < 1, T, 1, SPLIT, SPLIT_CHUNK)
        pre_chunk = _slice_chunk(partial_ptr, s0, tokens, in_t, streams, in_n, T, M, SPLIT, SPLIT_CHUNK)
        if not HEAD:
            post_chunk = _slice_chunk(partial_ptr, s0, tokens, in_t, N + streams, in_n, T, M, SPLIT, SPLIT_CHUNK)
            comb_chunk = _slice_chunk(partial_ptr, s0, tokens, in_t, mix, valid, T, M, SPLIT, SPLIT_CHUNK)
        sq += tl.sum(sq_chunk, axis=0)
        z_pre += tl.sum(pre_chunk, axis=0)
        if not HEAD:
            z_post += tl.sum(post_chunk, axis=0)
            z_comb += tl.sum(comb_chunk, axis=0)
    sq = tl.sum(sq, axis=1)
    inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(sq, K.to(tl.float32)) + norm_eps))[:, None]

    out = (tokens.to(tl.int64) * N)[:, None] + streams[None, :]  # [token, i] of pre and post
    in_out = in_t[:, None] & in_n[None, :]
    tl.store(pre_ptr + out, _sigmoid(z_pre * inv_rms * scale_pre + base_pre) + eps, mask=in_out)
    if not HEAD:
        tl.store(post_ptr + out, 2 * _sigmoid(z_post * inv_rms * scale_post + base_post), mask=in_out)
        z = z_comb * inv_rms * scale_comb + base_comb
        comb = _sinkhorn(tl.reshape(z, (BLOCK_T, N_PAD, N_PAD)), tl.reshape(valid, (1, N_PAD, N_PAD)), iters, eps)
        at = (tokens.to(tl.int64) * N * N)[:, None] + (i * N + j)[None, :]
        tl.store(comb_ptr + tl.reshape(at, (BLOCK_T, N_PAD, N_PAD)), comb,
                 mask=tl.reshape(in_t[:, None] & valid[None, :], (BLOCK_T, N_PAD, N_PAD)))


@triton.jit
def _collapse_columns(
    x_ptr, pre_ptr, y_ptr, norm_w_ptr, token, cols, S, D, norm_eps, stride_xb, stride_xs, stride_xn, stride_xd,
    N: tl.constexpr, NORM: tl.constexpr, FRESH: tl.constexpr = False,
):
    """y[token, cols] = sum_i pre[token, i] x_i[cols]: fp32, the streams added in order, column by
    column (the same bits for any block of columns), rounded to y's dtype. NORM (cols the whole
    row): then ``y * rsqrt(sum(y^2) / D + norm_eps) * w`` on the rounded y, rounded again, the
    math of ``rms_norm``'s kernel. FRESH: other programs of this launch wrote x; read it through L2."""
    row = x_ptr + (token // S).to(tl.int64) * stride_xb + (token % S).to(tl.int64) * stride_xs
    in_d = cols < D
    y = tl.zeros(cols.shape, dtype=tl.float32)
    for i in tl.static_range(N):
        weight = tl.load(pre_ptr + token * N + i)
        at = row + i * stride_xn + cols * stride_xd
        if FRESH:
            x_i = tl.load(at, mask=in_d, other=0.0, cache_modifier=".cg")
        else:
            x_i = tl.load(at, mask=in_d, other=0.0)
        y += weight * x_i.to(tl.float32)
    y = cast_rne(y, y_ptr.dtype.element_ty)
    if NORM:
        yf = y.to(tl.float32)
        w = tl.load(norm_w_ptr + cols, mask=in_d, other=0.0).to(tl.float32)
        y = cast_rne(yf * tl.math.rsqrt(tl.sum(yf * yf, axis=0) / D + norm_eps) * w, y_ptr.dtype.element_ty)
    tl.store(y_ptr + token.to(tl.int64) * D + cols, y, mask=in_d)


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
