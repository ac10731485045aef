"""Triton FP8 block-scaled GEMM (op ``fp8_gemm``) with DeepSeek's two-level accumulation.

Each 128-wide K block's product ``A_kb @ B_kb^T`` runs on the tensor cores into a fresh fp32
tile, which is scaled by ``sA[m, kb] * sB[n // 128, kb]`` and added to a separate fp32
accumulator (v4_ops.md §11.2). Tiles of 64 and more activation rows are FP8 wgmma products, whose
sums inside the block keep about 14 significant bits (as in the official kernels and DeepGEMM,
which promote to fp32 per 128-wide block the same way); smaller tiles are mma.sync products on
operands Triton widens to fp16, exact fp32 sums, which the conformance suite's fp32 rule checks
(:func:`._gemm.weights_first` says why they are not formed weights first). Launch configs come
from a committed table (TUNING.md).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._cache_keys import settle_cache_keys
from ._gemm import (
    ConfigTable, GemmConfig, decode_e8m0, gemm, k_block_range, launch, store_tile, tile_coords, tma_ready,
)
from ._numerics import fp8_quantize_tiles
from ._pdl import wait_for_prior_grid
from .fp4_gemm import fp4_gemm
from .quant import fp8_act_quant

SM90_CONFIGS: ConfigTable = {
    (1, 1024, 4096): GemmConfig(16, 64, 4, 5, 8, 8),  # q_a 10.1 us
    (16, 1024, 4096): GemmConfig(16, 32, 4, 6, 4, 8),  # q_a 9.9 us
    (64, 1024, 4096): GemmConfig(64, 32, 4, 6, 4, 8),  # q_a 11.2 us
    (512, 1024, 4096): GemmConfig(64, 64, 4, 5, 1, 8),  # q_a 15.3 us
    (4096, 1024, 4096): GemmConfig(128, 128, 8, 4, 1, 8, tma=True),  # q_a 43.8 us (ping-pong 41.4, then 115.1)
    (16384, 1024, 4096): GemmConfig(128, 128, 4, 4, 1, 8, pingpong=True),  # q_a 151.9 us (Triton 161.6)
    (1, 32768, 1024): GemmConfig(16, 64, 4, 5, 1, 8, tma=True),  # q_b 18.0 us
    (16, 32768, 1024): GemmConfig(16, 128, 4, 4, 1, 8, tma=True),  # q_b 17.7 us
    (64, 32768, 1024): GemmConfig(64, 128, 4, 4, 1, 8, tma=True),  # q_b 17.9 us
    (512, 32768, 1024): GemmConfig(64, 128, 4, 4, 1, 8, tma=True),  # q_b 53.0 us
    (4096, 32768, 1024): GemmConfig(64, 128, 4, 4, 1, 8, tma=True),  # q_b 380.8 us
    (16384, 32768, 1024): GemmConfig(64, 128, 4, 4, 1, 8, tma=True),  # q_b 1539.4 us
    (1, 512, 4096): GemmConfig(16, 64, 4, 5, 8, 8),  # wkv 9.3 us
    (16, 512, 4096): GemmConfig(16, 32, 4, 6, 8, 8),  # wkv 8.8 us
    (64, 512, 4096): GemmConfig(64, 32, 4, 6, 4, 8),  # wkv 10.5 us
    (512, 512, 4096): GemmConfig(64, 64, 4, 5, 1, 8),  # wkv 14.9 us
    (4096, 512, 4096): GemmConfig(64, 128, 4, 4, 1, 8, tma=True),  # wkv 22.4 us
    (16384, 512, 4096): GemmConfig(128, 128, 4, 4, 1, 8, pingpong=True),  # wkv 79.1 us (Triton 82.2)
    (1, 4096, 8192): GemmConfig(16, 64, 4, 5, 4, 8),  # wo_b 19.9 us
    (16, 4096, 8192): GemmConfig(16, 64, 4, 5, 4, 8),  # wo_b 20.4 us
    (64, 4096, 8192): GemmConfig(64, 64, 4, 5, 2, 8, tma=True),  # wo_b 21.7 us
    (512, 4096, 8192): GemmConfig(64, 128, 4, 4, 1, 8, tma=True),  # wo_b 37.1 us
    (4096, 4096, 8192): GemmConfig(128, 128, 4, 4, 1, 8, pingpong=True),  # wo_b 273.9 us (Triton 297.3)
    (16384, 4096, 8192): GemmConfig(128, 128, 4, 4, 1, 8, pingpong=True),  # wo_b 1116.0 us (Triton 1176.8)
    (1, 8192, 1024): GemmConfig(16, 64, 4, 5, 1, 8, tma=True),  # idx_wq_b 9.6 us
    (16, 8192, 1024): GemmConfig(16, 32, 4, 6, 1, 8),  # idx_wq_b 9.8 us
    (64, 8192, 1024): GemmConfig(64, 64, 4, 5, 1, 8),  # idx_wq_b 9.2 us
    (512, 8192, 1024): GemmConfig(64, 128, 4, 4, 1, 8, tma=True),  # idx_wq_b 16.6 us
    (4096, 8192, 1024): GemmConfig(64, 128, 4, 4, 1, 8, tma=True),  # idx_wq_b 95.7 us
    (16384, 8192, 1024): GemmConfig(64, 128, 4, 4, 1, 8, tma=True),  # idx_wq_b 360.2 us
    (1, 2048, 4096): GemmConfig(16, 128, 4, 4, 8, 8),  # shexp_up 10.9 us
    (16, 2048, 4096): GemmConfig(16, 32, 4, 6, 4, 8),  # shexp_up 11.4 us
    (64, 2048, 4096): GemmConfig(64, 32, 4, 6, 2, 8),  # shexp_up 12.5 us
    (512, 2048, 4096): GemmConfig(64, 128, 4, 4, 1, 8, tma=True),  # shexp_up 16.6 us
    (4096, 2048, 4096): GemmConfig(128, 128, 4, 4, 1, 8, pingpong=True),  # shexp_up 78.4 us (Triton 81.9)
    (16384, 2048, 4096): GemmConfig(128, 128, 4, 4, 1, 8, pingpong=True),  # shexp_up 291.0 us (Triton 304.8)
    (1, 4096, 2048): GemmConfig(16, 128, 4, 4, 4, 8),  # shexp_down 11.0 us
    (16, 4096, 2048): GemmConfig(16, 32, 4, 6, 1, 8),  # shexp_down 10.8 us
    (64, 4096, 2048): GemmConfig(64, 64, 4, 5, 1, 8),  # shexp_down 11.1 us
    (512, 4096, 2048): GemmConfig(64, 128, 4, 4, 1, 8, tma=True),  # shexp_down 14.3 us
    (4096, 4096, 2048): GemmConfig(64, 128, 4, 4, 1, 8, tma=True),  # shexp_down 88.3 us
    (16384, 4096, 2048): GemmConfig(128, 128, 4, 4, 1, 8, pingpong=True),  # shexp_down 314.0 us (Triton 330.3)
}
"""(m class, N, K) -> config, measured on an H100 SXM by ``python -m seahal.bench.cuda_gemm --tune --write-tables``.
The ping-pong entries: where the Gluon kernel (128x128, 4 slots) beat the table's Triton config by
3% or more on the H100 run of 2026-11-26 (both times in the comment); it lost where K = 1024. As the
table's pick in the second H100 run it held those figures (151.0, 79.8, 271.0, 1082.7, 78.5, 290.0,
316.8 us) but for q_a at M = 4096, 115.1 us against 41.4 before: that row keeps its Triton config."""

CONFIGS = {"sm90": SM90_CONFIGS}


@triton.jit
def _scale_tile(a_scale, b_scale_ptrs, B_SCALE_E8M0: tl.constexpr, ONE_SCALE_BLOCK: tl.constexpr):
    """sA[m, kb] * sB[n // 128, kb] for the tile (a_scale: the rows' [BLOCK_M] sA): [BLOCK_M, 1]
    when one sB covers it, else [BLOCK_M, BLOCK_N]."""
    b_scale = tl.load(b_scale_ptrs)
    if B_SCALE_E8M0:
        b_scale = decode_e8m0(b_scale)
    if ONE_SCALE_BLOCK:  # a constexpr if does not end the function: the other return needs the else
        scale = (a_scale * b_scale)[:, None]
    else:
        scale = a_scale[:, None] * b_scale[None, :]
    return scale


@triton.jit(do_not_specialize=["M", "stride_asm", "stride_bsn"])
def _fp8_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, partial_ptr, counter_ptr,
    M, N, K,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_bn, stride_bk, stride_bsn, stride_bsk,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    B_SCALE_E8M0: tl.constexpr, TMA: tl.constexpr = False, PERSISTENT: tl.constexpr = False, PDL: tl.constexpr = False,
    QUANT_A: tl.constexpr = False,
):
    """:func:`_fp8_gemm_tile` for this program's (tile, K split), or, PERSISTENT, for work items
    program_id, program_id + programs, ... of tiles x SPLIT_K (``tile = w % tiles``, ``split = w // tiles``).
    QUANT_A: A holds float rows, quantised here (see :func:`_fp8_gemm_tile`); a_scale is unused."""
    wait_for_prior_grid(PDL)
    if PERSISTENT:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for w in tl.range(tl.program_id(0), tiles * SPLIT_K, tl.num_programs(0)):
            _fp8_gemm_tile(
                w % tiles, w // tiles, a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, partial_ptr, counter_ptr,
                M, N, K, stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                stride_cm, stride_cn, BLOCK_M, BLOCK_N, GROUP_M, SPLIT_K, B_SCALE_E8M0, TMA, QUANT_A,
            )
    else:
        _fp8_gemm_tile(
            tl.program_id(0), tl.program_id(1), a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, partial_ptr,
            counter_ptr, M, N, K, stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn,
            stride_bsk, stride_cm, stride_cn, BLOCK_M, BLOCK_N, GROUP_M, SPLIT_K, B_SCALE_E8M0, TMA, QUANT_A,
        )


@triton.jit
def _fp8_gemm_tile(
    tile, pid_k, a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, partial_ptr, counter_ptr,
    M, N, K,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_bn, stride_bk, stride_bsn, stride_bsk,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    B_SCALE_E8M0: tl.constexpr, TMA: tl.constexpr, QUANT_A: tl.constexpr,
):
    """C[m, n] = sum_kb (A[m, kb] . B[n, kb]) * sA[m, kb] * sB[n // 128, kb] for output tile ``tile``
    (in GROUP_M order), K blocks of split ``pid_k``. QUANT_A: A holds float rows (bf16/fp16/fp32)
    whose 1x128 blocks are quantised as they load, as ``fp8_act_quant`` quantises them (the same
    :func:`fp8_quantize_tiles`, ue8m0): the codes and scales the two-launch form would read."""
    pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    kb_lo, kb_hi = k_block_range(K, pid_k, SPLIT_K, 128)
    rows_a = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    rows_b = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    if not TMA:
        # Rows past the edge re-read valid rows (the store masks them): no masks in the K loop.
        offs_k = kb_lo * 128 + tl.arange(0, 128)
        a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + rows_b[None, :] * stride_bn + offs_k[:, None] * stride_bk
    a_scale_ptrs = a_scale_ptr + rows_a * stride_asm + kb_lo * stride_ask
    ONE_SCALE_BLOCK: tl.constexpr = 128 % BLOCK_N == 0  # the tile's columns share one sB row
    if ONE_SCALE_BLOCK:
        b_scale_ptrs = b_scale_ptr + (pid_n * BLOCK_N // 128) * stride_bsn + kb_lo * stride_bsk
    else:
        b_scale_ptrs = b_scale_ptr + (rows_b // 128) * stride_bsn + kb_lo * stride_bsk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        if TMA:  # a_ptr, b_ptr are tensor descriptors; rows past the edge load as zeros
            a = a_ptr.load([pid_m * BLOCK_M, kb * 128])
            b = b_ptr.load([pid_n * BLOCK_N, kb * 128]).T
        else:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            a_ptrs += 128 * stride_ak
            b_ptrs += 128 * stride_bk
        if QUANT_A:
            a, a_scale = fp8_quantize_tiles(a.to(tl.float32), True)
        else:
            a_scale = tl.load(a_scale_ptrs)
            a_scale_ptrs += stride_ask
        acc += tl.dot(a, b) * _scale_tile(a_scale, b_scale_ptrs, B_SCALE_E8M0, ONE_SCALE_BLOCK)
        b_scale_ptrs += stride_bsk
    store_tile(acc, c_ptr, partial_ptr, counter_ptr, pid_m, pid_n, pid_k, M, N, stride_cm, stride_cn,
               BLOCK_M, BLOCK_N, SPLIT_K)


PINGPONG_TRITON = (3, 6)
"""The first Triton whose Gluon API the ping-pong kernel is written against."""
PINGPONG_AVAILABLE = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= PINGPONG_TRITON
"""Whether the installed Triton runs it (decided once, at import)."""


def launch_fp8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor, b_scale: torch.Tensor, out: torch.Tensor,
    config: GemmConfig,
) -> torch.Tensor:
    """:func:`fp8_gemm` into a given ``out`` with an explicit config (tuning, benchmarks, tests);
    ``config.pingpong`` runs the Gluon kernel of :mod:`.fp8_gemm_pingpong` (imported on first
    use), or, on a Triton older than its Gluon API (:data:`PINGPONG_TRITON`) or an ``out`` TMA
    cannot store to, the Triton kernel's 128-row TMA tiles, which form the same products and give
    the same bits (``test_pingpong_gemm_is_the_triton_product``).

    ``a_scale`` None: ``a`` holds float rows that the Triton kernel quantises as it loads them
    (``QUANT_A``, :func:`act_quant_gemm`), with ``config``'s tiles and K splits loaded through
    pointers (a TMA box of fp32 rows would be 512 bytes wide)."""
    if a_scale is None:
        config = dataclasses.replace(config, tma=False, pingpong=False)
    if config.pingpong:
        if PINGPONG_AVAILABLE and tma_ready(out):
            from .fp8_gemm_pingpong import launch_fp8_gemm_pingpong

            return launch_fp8_gemm_pingpong(a, a_scale, b, b_scale, out, config)
        config = dataclasses.replace(config, num_warps=8, num_stages=3, tma=True, pingpong=False)
    return launch(_fp8_gemm_kernel, a, a_scale, b, b_scale, out, config)



def fp8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """FP8 block-scaled GEMM ``C = (A sA) @ (B sB)^T``, fp32 accumulation per 128-wide K block.

    a: [M, K] e4m3, a_scale: [M, K/128] fp32, b: [N, K] e4m3, b_scale: [ceil(N/128), K/128]
    fp32 or e8m0 -> [M, N] bf16 (or out_dtype fp32).

    ``C[m, n] = sum_kb (sum_{k in kb} A[m, k] B[n, k]) * sA[m, kb] * sB[n // 128, kb]``
    """
    return gemm(launch_fp8_gemm, CONFIGS, a, a_scale, b, b_scale, out_dtype)


FUSED_QUANT_ROWS = 16
"""Up to this many rows (a decode step's) :func:`act_quant_gemm` quantises x inside the FP8 GEMM;
above it each of the N / BLOCK_N column tiles would quantise the same rows again, and one
``fp8_act_quant`` launch before the GEMM quantises them once."""


def act_quant_gemm(
    x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x's FP8 1x128 tiles (ue8m0) times quantised weights, ``fp8_gemm(*fp8_act_quant(x), ...)``
    for e4m3 b or ``fp4_gemm(...)`` for packed e2m1 b.

    x: [M, K] bf16/fp16/fp32 (fp64: two launches), b: [N, K] e4m3 with [ceil(N/128), K/128]
    scales or [N, K/2] uint8 with [N, K/32] scales -> [M, N] bf16 (or out_dtype fp32).

    Up to :data:`FUSED_QUANT_ROWS` rows with FP8 weights, one launch: the GEMM quantises x's
    blocks as it loads them, the same codes and scales as ``fp8_act_quant``'s, so the same bits
    as the two launches. Otherwise ``fp8_act_quant`` then the GEMM.
    """
    if b.dtype == torch.uint8 or x.dtype == torch.float64 or x.shape[0] > FUSED_QUANT_ROWS:
        return (fp4_gemm if b.dtype == torch.uint8 else fp8_gemm)(*fp8_act_quant(x), b, b_scale, out_dtype)
    return gemm(launch_fp8_gemm, CONFIGS, x, None, b, b_scale, out_dtype)


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
