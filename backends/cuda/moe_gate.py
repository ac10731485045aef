"""Triton MoE router (op ``moe_gate``): gate logits, scores, biased top-k and weights (v4_ops.md §10).

Two launches. ``_logits_kernel`` computes ``x W^T`` in fp32 tiles of [BLOCK_T tokens, BLOCK_E
experts], the D axis cut into SPLIT slices so that even one token keeps the whole chip streaming W;
each slice writes its partial sums to a [SPLIT, T, E] fp32 workspace. Every product is exact and
summed in fp32: bf16 x and W straight into the MMA; bf16 x against an fp32 W (the model's gate)
as W's three exact bf16 parts into the MMA (``_numerics.split_dot``); fp32 x in IEEE fp32; up to
4 tokens over a W the MMA does not take as it is, a CUDA-core GEMV. ``_route_kernel`` sums the
slices in slice order (deterministic), scores each token's whole expert row in registers, picks the
top k by k rounds of one int64 max over (key bits, reversed expert index) — ties go to the smaller
expert — and writes the renormalised weights. Launch choices and timings: TUNING.md.

Group-limited routing (n_groups > 1) is not implemented: the capabilities say so, and plans fall
back to the reference for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._cache_keys import settle_cache_keys
from ._host import cdiv, next_power_of_2
from ._numerics import exact_dot, split_dot
from .linear import fp32_gemv_tile
from ._pdl import pdl_options, wait_for_prior_grid


SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
"""score_func -> its code in the kernel (the index)."""
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)
"""softplus(l) = l above this, as torch's ``F.softplus(threshold=20)``."""
RENORM_EPS = tl.constexpr(1e-20)
MAX_TOP_K = 8
ROUTE_WARPS = 4
"""Warps of a routing program. One warp holds a token's whole expert row, so its top-k rounds
reduce within the warp (no block barrier): the sm_90 compile at 16384 tokens (Triton 3.9, blocks
of 4 tokens) has 984 instructions a token and one barrier against 1360 and 17 on 4 warps. A bench
row times it (``route_warps=1``); not measured yet."""


@dataclass(frozen=True)
class GateConfig:
    """One launch configuration of the logits kernel: tile, D slices, warps, stages, and whether
    the tile is a CUDA-core GEMV (``gemv``: no MMA, so the token tile is not padded to 16 rows)."""

    block_t: int
    block_e: int
    block_d: int
    split: int
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False


GEMV_MAX_TOKENS = 4
"""Up to this many tokens, logits over a W the MMA does not take (fp32: the model's gate) are a GEMV."""


def gate_config(t: int, e: int, d: int, device: torch.device, mma: bool = True) -> GateConfig:
    """The logits launch for T tokens, E experts, D features (``mma``: bf16 x and W, which the
    tensor cores take as they are; an fp32 W they take in three bf16 parts, fp32 x not at all).

    Decode and small batches (T <= 512) stream W: 64-expert tiles and D slices until the tiles
    fill the SMs once. Without ``mma``, up to 4 tokens are a GEMV: a 16-row tile would do 16 (or
    4) times the FMAs of the real rows (three times that for W's parts). Prefill is a GEMM on the
    tensor cores (bf16 x; an fp32 W in three passes): 128x128 tiles, 8 warps. On CPU (the
    interpreter) small tiles and two slices, so the tests exercise edge tiles and the slice sum.
    """
    gemv = not mma and t <= GEMV_MAX_TOKENS
    block_t = next_power_of_2(t)
    if device.type != "cuda":
        return GateConfig(block_t, 16, 32, 2, gemv=True) if gemv else GateConfig(16, 16, 32, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if gemv:  # [tokens, 64 experts, 128 / tokens features] products a step: 64 fp32 registers a thread
        config = GateConfig(block_t, 64, 128 // block_t, 1, gemv=True)
    elif t <= 16:
        config = GateConfig(16, 64, 128, 1)
    elif t <= 512:
        config = GateConfig(64, 64, 128, 1)
    else:
        config = GateConfig(128, 128, 64, 1, num_warps=8)
    tiles = cdiv(t, config.block_t) * cdiv(e, config.block_e)
    split = 1
    while tiles * split < sms and d // (2 * split) >= 2 * config.block_d and split < 32:
        split *= 2
    return dataclasses.replace(config, split=split)


def moe_gate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    score_func: str = "sqrtsoftplus",
    route_scale: float = 1.0,
    n_groups: int = 1,
    topk_groups: int = 1,
    input_ids: torch.Tensor | None = None,
    tid2eid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts: scores, biased top-k selection, renormalised weights.

    x: [T, D] bf16/fp32, weight: [E, D] bf16/fp32, bias: [E] fp32 or None; hash routing:
    input_ids: [T] int, tid2eid: [vocab, k] int -> weights: [T, k] fp32, indices: [T, k] int32

    ``s = score(x W^T)`` in fp32; ``idx = topk(s + bias)`` with ties to the smaller expert index,
    or ``idx = tid2eid[input_ids]``; ``w = s[idx]``, divided by ``sum(w) + 1e-20`` unless
    score_func is softmax, times ``route_scale``. n_groups must be 1.
    """
    if n_groups != 1:
        raise NotImplementedError("cuda.triton moe_gate has no group-limited routing; plan with "
                                  "requirements {'routing': 'group-limited'} to get the reference")
    if top_k > MAX_TOP_K:
        raise NotImplementedError(f"cuda.triton moe_gate supports top_k <= {MAX_TOP_K}, got {top_k}")
    logits = gate_logits(x, weight)
    return route(logits, bias, top_k, score_func, route_scale, input_ids, tid2eid)


def gate_logits(x: torch.Tensor, weight: torch.Tensor, config: GateConfig | None = None) -> torch.Tensor:
    """Partial gate logits ``x W^T`` by D slice: [SPLIT, T, E] fp32 (sum over dim 0 = the logits)."""
    partial, grid, args, constexprs = _logits_launch(x, weight, config)
    if x.shape[0]:
        _logits_kernel[grid](*args, **constexprs, **pdl_options())
    return partial


def _logits_launch(x: torch.Tensor, weight: torch.Tensor, config: GateConfig | None):
    """The [SPLIT, T, E] workspace, grid, arguments and constexprs of a logits launch."""
    t, d = x.shape
    e = weight.shape[0]
    # bf16 operands go to the MMA only on the GPU: the interpreter's dot misreads bf16
    # (test_cuda_interpret.py), so on CPU tensors they are widened to fp32 (the same products)
    on_gpu = x.device.type == "cuda"
    both_bf16 = x.dtype == weight.dtype == torch.bfloat16
    split_w = x.dtype == torch.bfloat16 and weight.dtype == torch.float32
    config = config or gate_config(t, e, d, x.device, mma=both_bf16 and on_gpu)
    partial = torch.empty((config.split, t, e), dtype=torch.float32, device=x.device)
    d_per_split = cdiv(cdiv(d, config.split), config.block_d) * config.block_d
    grid = (cdiv(t, config.block_t), cdiv(e, config.block_e), config.split)
    args = (x, weight, partial, t, e, d, d_per_split, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1))
    constexprs = {
        "BLOCK_T": config.block_t, "BLOCK_E": config.block_e, "BLOCK_D": config.block_d,
        # the GEMV reads neither flag: it keeps the constexprs (and the code) of its launch before the split
        "BF16_DOT": on_gpu and not config.gemv and (both_bf16 or split_w), "SPLIT_W": split_w and not config.gemv,
        "GEMV": config.gemv,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }
    return partial, grid, args, constexprs


def route_block(t: int) -> int:
    """Tokens per routing program (H100, TUNING.md): 1 for T <= 512 (from 16 partials at T=1:
    6.7 us vs 8.5 at 2, 10.9 at 8), else 4 (T=16384: 38.0 us vs 42.6 at 2, 62.0 at 1)."""
    return 1 if t <= 512 else 4


def route(
    partial_logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    score_func: str = "sqrtsoftplus",
    route_scale: float = 1.0,
    input_ids: torch.Tensor | None = None,
    tid2eid: torch.Tensor | None = None,
    route_t: int | None = None,
    route_warps: int = ROUTE_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [T, k] fp32 and indices [T, k] int32 from partial logits [SPLIT, T, E] fp32.

    Scores, selection and weights as :func:`moe_gate`; the SPLIT partials are summed in order.
    ``route_t`` tokens a program (default :func:`route_block`) on ``route_warps`` warps.
    """
    t = partial_logits.shape[1]
    weights, indices, args, constexprs = _route_launch(
        partial_logits, bias, top_k, score_func, route_scale, input_ids, tid2eid
    )
    if t:
        route_t = route_t or route_block(t)
        _route_kernel[(cdiv(t, route_t),)](partial_logits, t, partial_logits.shape[2], *args, **constexprs,
                                                  ROUTE_T=route_t, num_warps=route_warps, **pdl_options())
    return weights, indices


def _route_launch(partial_logits, bias, top_k, score_func, route_scale, input_ids, tid2eid):
    """The outputs, and the routing arguments and constexprs after (partial logits, T, E) of both kernels."""
    split, t, e = partial_logits.shape
    weights = torch.empty((t, top_k), dtype=torch.float32, device=partial_logits.device)
    indices = torch.empty((t, top_k), dtype=torch.int32, device=partial_logits.device)
    hashed = tid2eid is not None
    if bias is not None:
        bias = bias.contiguous()
    args = (
        bias if bias is not None else partial_logits,
        input_ids if hashed else indices, tid2eid if hashed else indices,
        weights, indices, float(route_scale),
        tid2eid.stride(0) if hashed else 0, tid2eid.stride(1) if hashed else 0,
        input_ids.stride(0) if hashed else 0,
    )
    constexprs = {
        "SPLIT": split, "SCORE": SCORE_FUNCS.index(score_func), "HAS_BIAS": bias is not None and not hashed,
        "HASH": hashed, "TOP_K": top_k, "K_PAD": next_power_of_2(top_k),
        "E_PAD": max(16, next_power_of_2(e)),
    }
    return weights, indices, args, constexprs


@triton.jit
def _logits_kernel(
    x_ptr, w_ptr, partial_ptr, T, E, D, d_per_split, stride_xt, stride_xd, stride_we, stride_wd,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BF16_DOT: tl.constexpr,
    SPLIT_W: tl.constexpr = False, GEMV: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """partial[s, t, e] = sum over d in slice s of x[t, d] * W[e, d], fp32 accumulation, for the
    [BLOCK_T, BLOCK_E] tile (program 0, program 1) of slice program 2. GEMV: the CUDA-core tile of
    :func:`.linear.fp32_gemv_tile`, without padding the tokens to an MMA's 16 rows. SPLIT_W: bf16
    x against fp32 W, W as three exact bf16 parts (:func:`._numerics.split_dot`)."""
    wait_for_prior_grid(PDL)
    pid_t, pid_e, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    lo = pid_s * d_per_split
    hi = tl.minimum(lo + d_per_split, D)
    if GEMV:
        acc = fp32_gemv_tile(x_ptr, w_ptr, offs_t, offs_e, T, E, lo, hi, d_per_split, stride_xt, stride_xd,
                             stride_we, stride_wd, BLOCK_D)
    else:
        x_rows = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt
        w_rows = w_ptr + offs_e[:, None].to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for step in range(0, d_per_split, BLOCK_D):  # scalar bounds: the Triton 3.6 interpreter needs them
            cols = lo + step + offs_d
            in_slice = cols[None, :] < hi
            xa = tl.load(x_rows + cols[None, :] * stride_xd, mask=(offs_t[:, None] < T) & in_slice, other=0.0)
            wa = tl.load(w_rows + cols[None, :] * stride_wd, mask=(offs_e[:, None] < E) & in_slice, other=0.0)
            if SPLIT_W:
                acc = split_dot(xa, tl.trans(wa), acc, False, BF16_DOT)
            else:
                acc = exact_dot(xa, tl.trans(wa), acc, BF16_DOT)
    out = partial_ptr + (pid_s * T + offs_t[:, None]).to(tl.int64) * E + offs_e[None, :]
    tl.store(out, acc, mask=(offs_t[:, None] < T) & (offs_e[None, :] < E))


@triton.jit
def _log1p(u):
    """log(1 + u) for u >= 0 to a few ulp: the rounding of 1 + u is corrected by u / ((1 + u) - 1)."""
    v = 1.0 + u
    return tl.where(v == 1.0, u, tl.log(v) * (u / tl.where(v == 1.0, 1.0, v - 1.0)))


@triton.jit
def _score(logits, row_max, row_sum, SCORE: tl.constexpr):
    """sqrt(softplus) (0), sigmoid (1) or softmax (2, given its row max and sum of exp) of logits."""
    if SCORE == 0:
        soft = _log1p(tl.exp(tl.minimum(logits, SOFTPLUS_THRESHOLD)))
        return tl.sqrt_rn(tl.where(logits > SOFTPLUS_THRESHOLD, logits, soft))
    elif SCORE == 1:
        return tl.div_rn(tl.full(logits.shape, 1.0, tl.float32), 1.0 + tl.exp(-logits))
    else:
        return tl.div_rn(tl.exp(logits - row_max), row_sum)


@triton.jit
def _sum_partials(ptrs, mask, T, E, SPLIT: tl.constexpr):
    """Sum of the SPLIT partial logits at ptrs (slice stride T * E), in slice order; loads unrolled."""
    total = tl.load(ptrs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT):
        total += tl.load(ptrs + s * T * E, mask=mask, other=0.0)
    return total


@triton.jit
def _packed_key(key, experts, E_PAD: tl.constexpr):
    """int64 (key's order-preserving bits << 32 | E_PAD - 1 - expert): one max gives the largest
    key and, among equal keys, the smallest expert. -0.0 is made +0.0 first, so zeros tie."""
    bits = tl.where(key == 0.0, 0.0, key).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (E_PAD - 1 - experts)[None, :].to(tl.int64)


@triton.jit
def _route_kernel(
    partial_ptr, T, E, bias_ptr, ids_ptr, tid2eid_ptr, w_out, i_out, route_scale,
    stride_hv, stride_hk, stride_ids,
    SPLIT: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, HASH: tl.constexpr,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, ROUTE_T: tl.constexpr, PDL: tl.constexpr = False,
):
    """Scores, top-k (ties to the smaller expert) or hash indices, and weights of this program's
    ROUTE_T tokens (those < T).

    Selection: TOP_K rounds of one int64 max over the packed (key, expert) row, the winner then
    masked out. The picked experts' scores are recomputed from their logits (same arithmetic).
    """
    wait_for_prior_grid(PDL)
    offs_t = tl.program_id(0) * ROUTE_T + tl.arange(0, ROUTE_T)
    experts = tl.arange(0, E_PAD)
    rows = offs_t < T
    row_base = partial_ptr + offs_t.to(tl.int64) * E
    valid = rows[:, None] & (experts[None, :] < E)
    row_max = tl.zeros((ROUTE_T,), dtype=tl.float32)
    row_sum = tl.full((ROUTE_T,), 1.0, tl.float32)
    if SCORE == 2 or not HASH:
        logits = _sum_partials(row_base[:, None] + experts[None, :], valid, T, E, SPLIT)
        if SCORE == 2:
            row_max = tl.max(tl.where(valid, logits, float("-inf")), axis=1)
            row_sum = tl.maximum(tl.sum(tl.where(valid, tl.exp(logits - row_max[:, None]), 0.0), axis=1), 1.0)
    slots = tl.arange(0, K_PAD)
    picked = tl.zeros((ROUTE_T, K_PAD), dtype=tl.int32)
    if HASH:
        ids = tl.load(ids_ptr + offs_t * stride_ids, mask=rows, other=0).to(tl.int64)
        hash_ptrs = tid2eid_ptr + ids[:, None] * stride_hv + slots[None, :] * stride_hk
        picked = tl.load(hash_ptrs, mask=rows[:, None] & (slots[None, :] < TOP_K), other=0).to(tl.int32)
    else:
        key = _score(logits, row_max[:, None], row_sum[:, None], SCORE)
        if HAS_BIAS:
            key += tl.load(bias_ptr + experts, mask=experts < E, other=0.0).to(tl.float32)[None, :]
        packed = tl.where(valid, _packed_key(key, experts, E_PAD), -(2**63))
        for j in tl.static_range(TOP_K):
            best = tl.max(packed, axis=1)
            packed = tl.where(packed == best[:, None], -(2**63), packed)
            idx = (E_PAD - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
            picked = tl.where(slots[None, :] == j, idx[:, None], picked)
    mask = rows[:, None] & (slots[None, :] < TOP_K)
    picked_logits = _sum_partials(row_base[:, None] + picked, mask, T, E, SPLIT)
    weights = tl.where(mask, _score(picked_logits, row_max[:, None], row_sum[:, None], SCORE), 0.0)
    if SCORE != 2:
        weights = tl.div_rn(weights, tl.sum(weights, axis=1)[:, None] + RENORM_EPS)
    out = offs_t[:, None].to(tl.int64) * TOP_K + slots[None, :]
    tl.store(w_out + out, weights * route_scale, mask=mask)
    tl.store(i_out + out, picked, mask=mask)


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
