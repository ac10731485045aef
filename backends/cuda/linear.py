"""Triton linear layers: fp32 math over bf16 weights (op ``fp32_linear``: the output head and the
compressors' projections, W streamed once in bf16 and widened in registers), and the attention's
grouped output projection over an FP8 weight (op ``grouped_linear``, at the end of this module).

Decode is bound by reading W: V4's head is 129280 x 4096, 1.06 GB in bf16 and 2.1 GB as the fp32
copy the official code keeps, more than every FP8/FP4 layer weight of a 4-layer model together;
the compressors' wkv / wgate (bf16 in the checkpoint, fp32 math) were widened by a copy per call.
Three paths, by token count T:

- T <= :data:`GEMV_MAX_TOKENS` (decode of a few sequences): a GEMV on the CUDA cores. Each program
  widens BLOCK_V rows of W to fp32 in registers (:func:`gemv_rows`), BLOCK_D columns at a time,
  and keeps one fp32 running sum per (token, row, lane) (fp32 FMA: TF32 would round x), reduced
  once at the end.
- More tokens with a bf16 W (batched decode, prefill): tensor cores on a split x. Each fp32 x is
  the exact sum of three bf16 parts (``hi = bf16(x)``, ``mid = bf16(x - hi)``, ``lo = bf16(x - hi
  - mid)``: 24 significant bits in three 8-bit pieces), and bf16 x bf16 products are exact in
  fp32, so three bf16 MMAs with fp32 accumulation sum the same exact products as fp32 math (3D
  terms instead of D; a bf16 x, the model's, is its own single part). W is read once, and at T =
  64 the 68 GFLOP of V4's head run at tensor-core rate rather than the CUDA cores'. At prefill
  (the compressors' projections over every prompt token) this replaced cuBLAS's fp32 GEMM, which
  runs on the CUDA cores (0.52 ms in four calls of the H100's 1k prefill) after widening W by a
  copy per call.
- An fp32 W, or outputs past int32 offsets: cuBLAS fp32 GEMMs on row blocks of W widened at a time
  (the reference's method).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seahal.backends.cpu.reference.linear import fp32_linear as widened_gemm
from seahal.backends.cpu.reference.linear import grouped_linear as batched_gemm

from ._cache_keys import settle_cache_keys
from ._gemm import (
    K_BLOCK,
    GemmConfig,
    decode_e8m0,
    k_block_range,
    k_splits,
    sm_count,
    split_k_workspace,
    store_tile,
)
from ._host import cdiv, next_power_of_2
from ._numerics import cast_rne, split_dot
from ._pdl import pdl_options, wait_for_prior_grid
from .rope import check_dtype

GEMV_MAX_TOKENS = 4
"""Up to this many tokens the CUDA-core GEMV runs."""
INT32_OFFSETS = 2**31
"""The split-x kernel indexes x and the output with int32 offsets: T*D and T*V stay below this."""
GEMV_LANES = 4096
"""GEMV: fp32 running sums a program keeps (BLOCK_T x BLOCK_V x BLOCK_D, 32 a thread at 4 warps)."""
FEW_ROWS = 8192
"""Fewer rows of W than this take :func:`gemv_rows`' narrow tiles (under 4 programs an SM at 16 rows)."""


def gemv_rows(v: int) -> int:
    """GEMV: rows of W per program. 16 for many rows (V4's 129280-row head: 8080 programs, every
    SM streaming), each step reading 256 of a row's columns per token; below :data:`FEW_ROWS`
    (the compressors' 256-2048 rows) 4, each step reading 1024 columns: the same bytes a step,
    4x the programs and a quarter of the steps. A compressor's GEMV was latency-bound: 16-64
    programs each streaming 16 rows in 16 dependent steps, 15 us a call for 2-8 MB (H100, 567d97d)."""
    return 16 if v >= FEW_ROWS else 4


SPLIT_BLOCK_V = 64
"""Split-x kernel: rows of W per program (the MMA's N; 2020 programs per token block for V4's head)."""


@triton.jit
def fp32_gemv_tile(
    x_ptr, w_ptr, tokens, rows, T, V, lo, hi, span, stride_xt, stride_xd, stride_wv, stride_wd,
    BLOCK_D: tl.constexpr,
):
    """``sum_{lo <= d < hi} fp32(x[t, d]) fp32(W[v, d])`` for tokens [BT] x rows [BV] of W ->
    [BT, BV] fp32, on the CUDA cores (fp32 FMAs: TF32 would round x). Tokens >= T and rows >= V
    read zeros. ``span`` (a scalar, >= hi - lo) bounds the loop: BLOCK_D features a step.

    One running sum per (token, row, lane), reduced once at the end. x's pointers repeat over the
    rows and W's over the tokens, so both load as [BT, BV, BLOCK_D] in the product's layout (the
    repeats hit L1): loaded [BT, D] and [BV, D] and broadcast, Triton converted them through shared
    memory, with barriers in every step of the stream (the head's GEMV had six)."""
    t3, v3, d3 = tokens[:, None, None], rows[None, :, None], tl.arange(0, BLOCK_D)[None, None, :]
    x_rows = x_ptr + t3.to(tl.int64) * stride_xt + 0 * v3
    w_rows = w_ptr + v3.to(tl.int64) * stride_wv + 0 * t3
    lanes = tl.zeros((tokens.shape[0], rows.shape[0], BLOCK_D), dtype=tl.float32)
    for step in range(0, span, BLOCK_D):  # scalar bounds: the Triton 3.6 interpreter needs them
        cols = lo + step + d3
        in_range = cols < hi
        x = tl.load(x_rows + cols * stride_xd, mask=(t3 < T) & in_range, other=0.0)
        w = tl.load(w_rows + cols * stride_wd, mask=(v3 < V) & in_range, other=0.0)
        lanes += x.to(tl.float32) * w.to(tl.float32)
    return tl.sum(lanes, axis=2)


@triton.jit
def _fp32_gemv_kernel(
    x_ptr, w_ptr, out_ptr, T, V, D, stride_xt, stride_wv, stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
):
    """out[t, v] = sum_d fp32(x[t, d]) fp32(W[v, d]) for this program's BLOCK_V rows of W."""
    wait_for_prior_grid(PDL)
    rows = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    tokens = tl.arange(0, BLOCK_T)
    logits = fp32_gemv_tile(x_ptr, w_ptr, tokens, rows, T, V, 0, D, D, stride_xt, 1, stride_wv, 1, BLOCK_D)
    out = out_ptr + tokens[:, None] * stride_ot + rows[None, :]
    tl.store(out, logits, mask=(tokens[:, None] < T) & (rows[None, :] < V))


@triton.jit
def _split_x_kernel(
    x_ptr, w_ptr, out_ptr, T, V, D, stride_xt, stride_wv, stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, X_BF16: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out[t, v] = sum_d x[t, d] W[v, d] for a (row block, token block): x split into three exact
    bf16 parts (bf16 x: itself, X_BF16), each multiplied by the bf16 W tile on the tensor cores
    into one fp32 accumulator."""
    wait_for_prior_grid(PDL)
    tokens = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wv
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + cols[None, :],
                    mask=(tokens[:, None] < T) & (cols[None, :] < D), other=0.0)
        w = tl.trans(tl.load(w_rows + cols[None, :], mask=(rows[:, None] < V) & (cols[None, :] < D), other=0.0))
        if X_BF16:
            acc = tl.dot(x, w, acc)
        else:
            acc = split_dot(x, w, acc, True, True)
    out = out_ptr + tokens[:, None] * stride_ot + rows[None, :]
    tl.store(out, acc, mask=(tokens[:, None] < T) & (rows[None, :] < V))


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ weight^T`` with both operands widened exactly and fp32 sums.

    x: [..., D] bf16/fp32, weight: [N, D] bf16/fp32 -> [..., N] fp32.
    """
    check_dtype("fp32_linear", "x", x)
    check_dtype("fp32_linear", "weight", weight)
    d, v = x.shape[-1], weight.shape[0]
    tokens = x.reshape(-1, d)
    t = tokens.shape[0]
    if t > GEMV_MAX_TOKENS and (weight.dtype != torch.bfloat16 or t * max(d, v) >= INT32_OFFSETS):
        return widened_gemm(x, weight)
    out = torch.empty((t, v), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out.zero_().reshape(*x.shape[:-1], v)
    tokens = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    args = (tokens, weight, out, t, v, d, tokens.stride(0), weight.stride(0), out.stride(0))
    if t <= GEMV_MAX_TOKENS:
        block_t, block_v = next_power_of_2(t), gemv_rows(v)
        _fp32_gemv_kernel[(cdiv(v, block_v),)](
            *args, BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_D=GEMV_LANES // (block_t * block_v), num_warps=4,
            **pdl_options(),
        )
    else:
        block_t = min(max(16, next_power_of_2(t)), 64)
        _split_x_kernel[(cdiv(v, SPLIT_BLOCK_V), cdiv(t, block_t))](
            *args, BLOCK_T=block_t, BLOCK_V=SPLIT_BLOCK_V, BLOCK_D=64, X_BF16=x.dtype == torch.bfloat16,
            num_warps=4, num_stages=4, **pdl_options(),
        )
    return out.reshape(*x.shape[:-1], v)


# --------------------------------------------------------------------------------------------
# grouped_linear: wo_a, z_g = W'_g o_g with W' the FP8 weight dequantised to o's dtype
# --------------------------------------------------------------------------------------------
#
# The official code installs wo_a dequantised to bf16 (V4-Flash: 8192 x 4096, 64 MB a layer; V4-Pro
# 128 MB) and a decode step streams all of it. The kernels below read the checkpoint's FP8 bytes
# (half) and decode each weight in registers to exactly the bf16 value the official code installs
# (e4m3 x scale, rounded to o's dtype), so the products are the official ones: only the
# summation order differs. A few tokens take a GEMV on the CUDA cores, a decode batch the tensor
# cores; a prefill dequantises once per call into a temporary and runs cuBLAS, the reference's
# method in o's dtype.

GROUPED_LANES = 4096
"""GEMV: fp32 running sums a program keeps (BLOCK_T x BLOCK_N x 128, 32 a thread at 4 warps)."""


def grouped_rows(tokens: int, rows_per_group: int) -> int:
    """GEMV rows a program streams: GROUPED_LANES / (128 x BLOCK_T) (32 at one token: 4 KB of FP8
    a K block), halved until it divides R so that a program's rows are one group's."""
    rows = GROUPED_LANES // (K_BLOCK * next_power_of_2(tokens))
    while rows_per_group % rows:
        rows //= 2
    return rows


@triton.jit
def official_weight(codes, scale, SCALE_E8M0: tl.constexpr, dtype: tl.constexpr):
    """W' = ``dtype(e4m3 codes * scale)`` (rounded to nearest even), the value the official code
    installs: scale an fp32 or (SCALE_E8M0) an e8m0 byte, broadcast against the codes."""
    if SCALE_E8M0:
        scale = decode_e8m0(scale)
    return cast_rne(codes.to(tl.float32) * scale, dtype)


@triton.jit
def _grouped_gemv_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, partial_ptr, counter_ptr, T, N, K, R,
    stride_xt, stride_xg, stride_wn, stride_sn, stride_sk, stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, SCALE_E8M0: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out[t, n] = sum_k x[t, n // R, k] W'[n, k] over this program's BLOCK_N rows (one group's:
    BLOCK_N divides R) and its K split, ``W' = x_dtype(e4m3 W[n, k] * s[n // 128, k // 128])``.

    One fp32 running sum per (token, row, lane of the 128-wide K block), reduced once at the end,
    both operands loaded in the product's [BT, BN, 128] layout (as :func:`fp32_gemv_tile`); the
    block's scale is one load a row. Split-K partials are summed in split order (``store_tile``).
    """
    wait_for_prior_grid(PDL)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    lo, hi = k_block_range(K, pid_k, SPLIT_K, 128)
    first_row = pid_n * BLOCK_N
    t3 = tl.arange(0, BLOCK_T)[:, None, None]
    n3 = first_row + tl.arange(0, BLOCK_N)[None, :, None]
    k3 = tl.arange(0, 128)[None, None, :]
    x_rows = x_ptr + (first_row // R) * stride_xg + t3 * stride_xt + 0 * n3
    w_rows = w_ptr + n3.to(tl.int64) * stride_wn + 0 * t3
    s_rows = s_ptr + (n3 // 128) * stride_sn
    lanes = tl.zeros((BLOCK_T, BLOCK_N, 128), dtype=tl.float32)
    for kb in range(lo, hi):
        cols = kb * 128 + k3
        x = tl.load(x_rows + cols, mask=t3 < T, other=0.0)
        w = official_weight(tl.load(w_rows + cols), tl.load(s_rows + kb * stride_sk), SCALE_E8M0,
                            x_ptr.dtype.element_ty)
        lanes += x.to(tl.float32) * w.to(tl.float32)
    store_tile(tl.sum(lanes, axis=2), out_ptr, partial_ptr, counter_ptr, 0, pid_n, pid_k, T, N, stride_ot, 1,
               BLOCK_T, BLOCK_N, SPLIT_K)


MMA_MAX_TOKENS = 64
"""Up to this many tokens (a decode batch) a bf16 x takes the tensor cores over the FP8 weight:
the weight is read once per 64 tokens, where dequantising it for cuBLAS writes and reads it again
in bf16 (160 MB of traffic a V4-Flash layer against 32)."""
MMA_ROWS = 64
"""Tensor-core path: weight rows a program decodes (one wgmma's M, weights first), of one group."""


@triton.jit
def _grouped_mma_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, partial_ptr, counter_ptr, T, N, K, R,
    stride_xt, stride_xg, stride_wn, stride_sn, stride_sk, stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, SCALE_E8M0: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out[t, n] = sum_k x[t, n // R, k] W'[n, k] for BLOCK_T tokens x BLOCK_N rows (one group's)
    and a K split, on the tensor cores: each 128-wide block of W decoded to the bf16 W' in
    registers and multiplied weights first, ``acc[n, t] += W'[n, :] . x[t, :]`` (W' the MMA's
    A operand from registers, x^T its B; bf16 products are exact, summed in fp32)."""
    wait_for_prior_grid(PDL)
    pid_n, pid_t, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo, hi = k_block_range(K, pid_k, SPLIT_K, 128)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, 128)
    x_cols = x_ptr + ((pid_n * BLOCK_N) // R) * stride_xg + tokens[None, :] * stride_xt + cols[:, None]  # x^T
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    s_rows = s_ptr + (rows // 128) * stride_sn
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for kb in range(lo, hi):
        x = tl.load(x_cols + kb * 128, mask=tokens[None, :] < T, other=0.0)
        w = official_weight(tl.load(w_rows + kb * 128), tl.load(s_rows + kb * stride_sk)[:, None], SCALE_E8M0,
                            tl.bfloat16)
        acc = tl.dot(w, x, acc)
    store_tile(tl.trans(acc), out_ptr, partial_ptr, counter_ptr, pid_t, pid_n, pid_k, T, N, stride_ot, 1,
               BLOCK_T, BLOCK_N, SPLIT_K)


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_sk, stride_on,
                       BLOCK_N: tl.constexpr, SCALE_E8M0: tl.constexpr, PDL: tl.constexpr = False):
    """out[n, k] = out_dtype(e4m3 W[n, k] * s[n // 128, k // 128]) for BLOCK_N rows x one 128-wide block."""
    wait_for_prior_grid(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    kb = tl.program_id(1)
    cols = kb * 128 + tl.arange(0, 128)[None, :]
    s = tl.load(s_ptr + (rows // 128) * stride_sn + kb * stride_sk, mask=rows < N, other=0)
    codes = tl.load(w_ptr + rows.to(tl.int64) * stride_wn + cols, mask=rows < N, other=0.0)
    w = official_weight(codes, s, SCALE_E8M0, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows.to(tl.int64) * stride_on + cols, w, mask=rows < N)


def dequantize_fp8_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An FP8 weight [N, K] with [ceil(N/128), K/128] block scales as a dense [N, K] ``dtype`` tensor
    (each value rounded to dtype, as ``hal.formats.dequantize_weight``), in one launch."""
    n, k = weight.shape
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    e8m0 = scale.dtype != torch.float32
    block_n = 32
    _dequantize_kernel[(cdiv(n, block_n), k // K_BLOCK)](
        weight, scale.view(torch.uint8) if e8m0 else scale, out, n, k,
        weight.stride(0), scale.stride(0), scale.stride(1), out.stride(0),
        BLOCK_N=block_n, SCALE_E8M0=e8m0, num_warps=4, **pdl_options(),
    )
    return out


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, split_k: int | None = None
) -> torch.Tensor:
    """Per group g, ``x[..., g, :] @ W'_g^T`` with W' the weight dequantised to x's dtype.

    x: [..., G, I] bf16/fp32, weight: [G*R, I] FP8 e4m3 + scale [ceil(G*R/128), I/128] fp32/e8m0,
    or dense -> [..., G, R] in x's dtype.

    With an FP8 weight: up to :data:`GEMV_MAX_TOKENS` tokens the GEMV over the FP8 bytes; up to
    :data:`MMA_MAX_TOKENS` tokens of a bf16 x, the tensor cores over them (R a multiple of
    :data:`MMA_ROWS`). Either splits K ``split_k`` ways (default: until the grid holds two
    programs an SM, each keeping >= 4 K blocks). Otherwise the weight dequantised to x's dtype in
    one launch (when FP8) and the reference's batched cuBLAS GEMM in x's dtype (fp32 sums).
    """
    check_dtype("grouped_linear", "x", x)
    g, i = x.shape[-2:]
    n = weight.shape[0]
    r = n // g
    tokens = x.reshape(-1, g, i)
    t = tokens.shape[0]
    gemv = 0 < t <= GEMV_MAX_TOKENS
    mma = not gemv and 0 < t <= MMA_MAX_TOKENS and x.dtype == torch.bfloat16 and r % MMA_ROWS == 0
    if weight.dtype != torch.float8_e4m3fn or not (gemv or mma):
        return batched_gemm(x, weight if scale is None else dequantize_fp8_weight(weight, scale, x.dtype))
    tokens = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
    if gemv:
        kernel, block_t, block_n = _grouped_gemv_kernel, next_power_of_2(t), grouped_rows(t, r)
    else:
        kernel, block_t, block_n = _grouped_mma_kernel, max(16, next_power_of_2(t)), MMA_ROWS
    token_blocks = cdiv(t, block_t)
    if split_k is None:
        split_k = k_splits(n // block_n * token_blocks, i // K_BLOCK, 2 * sm_count(x.device))
    config = GemmConfig(block_t, block_n, num_warps=4, num_stages=1, split_k=split_k)
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    partial, counters = split_k_workspace(config, t, n, x.device)
    e8m0 = scale.dtype != torch.float32
    grid = (n // block_n, split_k) if gemv else (n // block_n, token_blocks, split_k)
    kernel[grid](
        tokens, weight, scale.view(torch.uint8) if e8m0 else scale, out, partial, counters, t, n, i, r,
        tokens.stride(0), tokens.stride(1), weight.stride(0), scale.stride(0), scale.stride(1), out.stride(0),
        BLOCK_T=block_t, BLOCK_N=block_n, SPLIT_K=split_k, SCALE_E8M0=e8m0, num_warps=4,
        **({} if gemv else {"num_stages": 3}), **pdl_options(),
    )
    return out.view(*x.shape[:-1], r)


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
