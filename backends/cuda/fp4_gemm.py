"""Triton FP8 x FP4 GEMM (op ``fp4_gemm``): e2m1 weights decoded in registers.

Per 128-wide K block: B's packed e2m1 codes and 1x32 power-of-two scales are decoded to bf16 here
(the committed configs), or go through Triton's microscaling product ``tl.dot_scaled``
(``GemmConfig.fp4_mx``, e8m0 scales only), both exact (:mod:`._e2m1`); ``sA[m, kb]`` scales the
block product into the fp32 accumulator. Equal to the reference's per-32-step sum up to fp32
rounding order (v4_ops.md §11.5).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cache_keys import settle_cache_keys
from ._e2m1 import fp4_block_dot
from ._gemm import (
    ConfigTable, GemmConfig, gemm, k_block_range, launch, oriented, oriented_acc, store_tile, tile_coords,
)
from ._pdl import wait_for_prior_grid

SM90_CONFIGS: ConfigTable = {
    (1, 2048, 4096): GemmConfig(16, 64, 4, 5, 8, 8),  # exp_up 18.6 us; H200: 14.3 mx, 17.5 bf16; H100: 14.8 mx, 12.4 bf16
    (16, 2048, 4096): GemmConfig(16, 64, 4, 5, 8, 8),  # exp_up 18.5 us; H200: 15.0 mx, 18.1 bf16; H100: 15.6 mx, 12.8 bf16
    (64, 2048, 4096): GemmConfig(64, 32, 4, 6, 4, 8),  # exp_up 23.8 us
    (512, 2048, 4096): GemmConfig(64, 128, 4, 4, 2, 8),  # exp_up 93.7 us
    (4096, 2048, 4096): GemmConfig(128, 128, 8, 3, 1, 16),  # exp_up 448.7 us
    (1, 4096, 2048): GemmConfig(16, 128, 4, 4, 8, 8),  # exp_down 17.5 us; H200: 13.9 mx, 16.9 bf16; H100: 14.1 mx, 11.9 bf16
    (16, 4096, 2048): GemmConfig(16, 64, 4, 5, 8, 8),  # exp_down 17.7 us; H200: 14.6 mx, 19.0 bf16; H100: 14.7 mx, 12.3 bf16
    (64, 4096, 2048): GemmConfig(64, 64, 4, 5, 4, 8),  # exp_down 22.1 us
    (512, 4096, 2048): GemmConfig(128, 128, 8, 3, 1, 8),  # exp_down 63.8 us
    (4096, 4096, 2048): GemmConfig(128, 128, 8, 3, 1, 8),  # exp_down 442.9 us
}
"""(m class, N, K) -> config, measured on an H100 SXM by ``python -m seahal.bench.cuda_gemm --tune --write-tables``,
in the bf16-decode form (the times in the comments); ``--tune`` also tries each candidate through
``tl.dot_scaled`` (``fp4_mx=True``), and ``--write-tables`` commits that form where it wins
(TUNING.md). The mx form was committed at M <= 16 from the H200 run of 2026-11-26 (18-23% faster
there); since then the bf16 form decodes straight to bf16 (``_e2m1.e2m1_bf16``), and on the H100
run of 2026-11-26 it was the faster one at M <= 16 too (12-17%: both forms in the comments) and
the mx form 1.4-2.8x slower from M = 64, so every entry is the bf16 form."""

CONFIGS = {"sm90": SM90_CONFIGS}


@triton.jit(do_not_specialize=["M", "stride_asm", "stride_bsn"])
def _fp4_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, partial_ptr, counter_ptr,
    M, N, K,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_bn, stride_bk, stride_bsn, stride_bsk,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    B_SCALE_E8M0: tl.constexpr, MX: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
    WEIGHTS_FIRST: tl.constexpr = False, FP4_WORDS: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """:func:`_fp4_gemm_tile` for this program's (tile, K split), or, PERSISTENT, for work items
    program_id, program_id + programs, ... of tiles x SPLIT_K (``tile = w % tiles``, ``split = w // tiles``).
    The product is formed weights first with MX, or WEIGHTS_FIRST (:func:`._gemm.weights_first`),
    then with FP4_WORDS B's codes load as 4-byte words (:func:`._e2m1.e2m1_bf16_words`)."""
    wait_for_prior_grid(PDL)
    if PERSISTENT:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for w in tl.range(tl.program_id(0), tiles * SPLIT_K, tl.num_programs(0)):
            _fp4_gemm_tile(
                w % tiles, w // tiles, a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, partial_ptr, counter_ptr,
                M, N, K, stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                stride_cm, stride_cn, BLOCK_M, BLOCK_N, GROUP_M, SPLIT_K, B_SCALE_E8M0, MX, WEIGHTS_FIRST, FP4_WORDS,
            )
    else:
        _fp4_gemm_tile(
            tl.program_id(0), tl.program_id(1), a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, partial_ptr,
            counter_ptr, M, N, K, stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn,
            stride_bsk, stride_cm, stride_cn, BLOCK_M, BLOCK_N, GROUP_M, SPLIT_K, B_SCALE_E8M0, MX, WEIGHTS_FIRST,
            FP4_WORDS,
        )


@triton.jit
def _fp4_gemm_tile(
    tile, pid_k, a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, partial_ptr, counter_ptr,
    M, N, K,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_bn, stride_bk, stride_bsn, stride_bsk,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    B_SCALE_E8M0: tl.constexpr, MX: tl.constexpr, WEIGHTS_FIRST: tl.constexpr, FP4_WORDS: tl.constexpr,
):
    """C[m, n] = sum_kb sA[m, kb] * sum_{k in kb} A[m, k] * e2m1(B[n, k]) * sB[n, k // 32] for output
    tile ``tile`` (in GROUP_M order), K blocks of split ``pid_k``."""
    pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    kb_lo, kb_hi = k_block_range(K, pid_k, SPLIT_K, 128)
    rows_a = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    rows_b = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + (kb_lo * 128 + tl.arange(0, 128))[None, :] * stride_ak
    if FP4_WORDS:  # K contiguous, rows 4-byte aligned: a K block is 16 words
        b_ptrs = (b_ptr + rows_b[:, None] * stride_bn).to(tl.pointer_type(tl.uint32), bitcast=True)
        b_ptrs += (kb_lo * 16 + tl.arange(0, 16))[None, :]
        b_step = 16
    else:
        b_ptrs = b_ptr + rows_b[:, None] * stride_bn + (kb_lo * 64 + tl.arange(0, 64))[None, :] * stride_bk
        b_step = 64 * stride_bk
    a_scale_ptrs = a_scale_ptr + rows_a * stride_asm + kb_lo * stride_ask
    b_scale_ptrs = b_scale_ptr + rows_b[:, None] * stride_bsn + (kb_lo * 4 + tl.arange(0, 4))[None, :] * stride_bsk
    first: tl.constexpr = MX or WEIGHTS_FIRST
    acc = _k_loop(oriented_acc(BLOCK_M, BLOCK_N, first), a_ptrs, a_scale_ptrs, b_ptrs, b_scale_ptrs, kb_hi - kb_lo,
                  stride_ak, stride_ask, b_step, stride_bsk, BLOCK_N, B_SCALE_E8M0, MX, first)
    store_tile(oriented(acc, first), c_ptr, partial_ptr, counter_ptr, pid_m, pid_n, pid_k, M, N, stride_cm, stride_cn,
               BLOCK_M, BLOCK_N, SPLIT_K)


@triton.jit
def _k_loop(
    acc, a_ptrs, a_scale_ptrs, b_ptrs, b_scale_ptrs, k_blocks, stride_ak, stride_ask, b_step, stride_bsk,
    BLOCK_N: tl.constexpr, B_SCALE_E8M0: tl.constexpr, MX: tl.constexpr, WEIGHTS_FIRST: tl.constexpr,
):
    """``acc`` plus ``k_blocks`` scaled 128-wide block products from the given tile pointers on
    (oriented as :func:`._e2m1.fp4_block_dot` says); ``b_step``: B's pointer advance a block."""
    for _ in range(k_blocks):
        acc = fp4_block_dot(acc, tl.load(a_ptrs), tl.load(a_scale_ptrs), tl.load(b_ptrs), tl.load(b_scale_ptrs),
                            B_SCALE_E8M0, MX, WEIGHTS_FIRST, BLOCK_N, 128)
        a_ptrs += 128 * stride_ak
        b_ptrs += b_step
        a_scale_ptrs += stride_ask
        b_scale_ptrs += 4 * stride_bsk
    return acc


def launch_fp4_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out: torch.Tensor,
    config: GemmConfig,
) -> torch.Tensor:
    """:func:`fp4_gemm` into a given ``out`` with an explicit config (tuning, benchmarks, tests)."""
    return launch(_fp4_gemm_kernel, a, a_scale, b, b_scale, out, config)


def fp4_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """FP8 x FP4 GEMM ``C = (A sA) @ (e2m1(B) sB)^T`` with fp32 accumulation.

    a: [M, K] e4m3, a_scale: [M, K/128] fp32, b: [N, K/2] uint8 (two e2m1 codes per byte, low
    nibble first), b_scale: [N, K/32] fp32 or e8m0 -> [M, N] bf16 (or out_dtype fp32).

    ``C[m, n] = sum_k A[m, k] sA[m, k/128] * e2m1(B[n, k]) sB[n, k/32]``
    """
    return gemm(launch_fp4_gemm, CONFIGS, a, a_scale, b, b_scale, out_dtype)


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
