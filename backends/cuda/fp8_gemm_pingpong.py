"""Gluon FP8 block-scaled GEMM (op ``fp8_gemm``, ``GemmConfig.pingpong``): a TMA producer warp and
two consumer warpgroups that run free of each other, so one promotes while the other's MMA runs.

Same product as :mod:`.fp8_gemm`, bit for bit by construction: per 128-wide K block a fresh fp32
tile ``P = A_kb @ B_kb^T`` from wgmma m64nBLOCK_Nk32 (four per block, as the Triton kernel issues
for a 128-row tile on 8 warps), then ``acc += P * (sA[m, kb] * sB[n // 128, kb])`` (v4_ops.md
§11.2). What differs is who waits for whom. In the Triton kernel the two warpgroups of a 128-row
tile meet at a CTA barrier every K block, so both wait for their wgmma, both promote on the CUDA
cores while the tensor cores idle, and Triton 3.6/3.9 cannot make the promotion overlap the next
block's MMA (TUNING.md, "Weights first": only a dot into a loop-carried accumulator is made
asynchronous; ``warp_specialize`` on sm_90 changes nothing). Here (Gluon, explicit partitions):

- a one-warp producer streams K blocks into ``STAGES`` shared-memory slots with TMA, slot ``s``
  refilled once both consumers have arrived on its ``empty`` barrier;
- consumer ``h`` (a warpgroup; the default partition is h = 0) owns output rows
  ``[h * BLOCK_M/2, (h + 1) * BLOCK_M/2)`` of the tile: it waits for the slot's ``ready`` barrier,
  runs its wgmma, waits for it, releases the slot and promotes. It syncs only within itself (the
  compiled loop has one 128-thread named barrier, before the elected arrive), so the two consumers
  drift apart and take turns on the tensor cores: the DeepGEMM structure, without its SASS edits;
- each consumer writes its half of C through shared memory with a TMA store (rows and columns past
  the edge are clipped by TMA; loads past the edge read zeros).

Not in the interpreter (Gluon has none): compiled for sm_90 in CI (tests/test_cuda_compile.py),
checked against the Triton kernel (bit for bit) and the dequantised product only on a GPU
(tests/test_cuda_gpu.py, passed on the H100 on 2026-11-26). In the FP8 table where it was 3% or
more faster than the Triton config there (M >= 4096, K >= 2048); a tuner and bench candidate from
M = 512 (TUNING.md, "Ping-pong FP8 GEMM").
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._cache_keys import settle_cache_keys
from ._gemm import K_BLOCK, GemmConfig, decode_e8m0, tile_coords, tma_ready
from ._host import cdiv

K_STEP = gl.constexpr(K_BLOCK)
"""The 128-wide K block inside the kernels (a global a Gluon kernel may read)."""

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
"""The TMA copies under their Triton 3.6 names (``async_copy_*``) or 3.7+ names (``async_load``,
``async_store``); the arguments are the same."""

PRODUCER_REGISTERS = gl.constexpr(40)
CONSUMER_REGISTERS = gl.constexpr(232)
"""Registers per thread the producer warp gives up and the second consumer warpgroup takes
(``setmaxnreg``): a consumer holds two fp32 [BLOCK_M/2, BLOCK_N] tiles (accumulator, block product)."""


@gluon.jit
def _produce(a_desc, b_desc, a_top, a_bottom, b_bufs, ready, empty, off_m, off_n, k_blocks):
    """Stream K block kb of the tile's A halves and B rows into slot kb % STAGES, once both
    consumers have released it (the first pass waits on the phase before the first)."""
    STAGES: gl.constexpr = b_bufs.shape[0]
    HALF: gl.constexpr = a_top.shape[1]
    for kb in range(k_blocks):
        s = kb % STAGES
        mbarrier.wait(empty.index(s), ((kb // STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes)
        _tma_load(a_desc, [off_m, kb * K_STEP], bar, a_top.index(s))
        _tma_load(a_desc, [off_m + HALF, kb * K_STEP], bar, a_bottom.index(s))
        _tma_load(b_desc, [off_n, kb * K_STEP], bar, b_bufs.index(s))


@gluon.jit
def _consume(
    a_bufs, b_bufs, ready, empty, c_desc, a_scale_ptr, b_scale_ptr, stride_asm, stride_ask, stride_bsk, M,
    off_m, off_n, k_blocks,
):
    """One warpgroup's rows ``off_m + [0, ROWS)`` of the tile: the two-level accumulation over all
    K blocks (``a_bufs``: its own A half of every slot; ``b_scale_ptr``: the tile's sB row), then
    the rounded tile to C."""
    STAGES: gl.constexpr = b_bufs.shape[0]
    ROWS: gl.constexpr = a_bufs.shape[1]
    BLOCK_N: gl.constexpr = b_bufs.shape[1]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, BLOCK_N, 32])
    rows = off_m + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    a_scale_ptrs = a_scale_ptr + (rows % M).to(gl.int64) * stride_asm  # rows past M re-read valid ones
    acc = gl.zeros([ROWS, BLOCK_N], gl.float32, layout)
    unused = gl.zeros([ROWS, BLOCK_N], gl.float32, layout)  # use_acc=False: the product starts from 0
    for kb in range(k_blocks):
        s = kb % STAGES
        mbarrier.wait(ready.index(s), (kb // STAGES) & 1)
        product = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), unused, use_acc=False,
                                is_async=True)
        a_scale = gl.load(a_scale_ptrs + kb * stride_ask)
        b_scale = gl.load(b_scale_ptr + kb * stride_bsk)
        if b_scale_ptr.dtype.element_ty == gl.uint8:  # e8m0 weight scales as bytes
            b_scale = decode_e8m0(b_scale)
        block = warpgroup_mma_wait(0, deps=(product,))
        mbarrier.arrive(empty.index(s), count=1)
        acc += block * (a_scale * b_scale)[:, None]
    c_smem = gl.allocate_shared_memory(c_desc.dtype, [ROWS, BLOCK_N], c_desc.layout)
    c_smem.store(acc.to(c_desc.dtype))
    fence_async_shared()
    _tma_store(c_desc, [off_m, off_n], c_smem)
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["M", "N", "K", "stride_asm", "stride_ask", "stride_bsn", "stride_bsk"])
def _fp8_gemm_pingpong_kernel(
    a_desc, b_desc, c_desc, a_scale_ptr, b_scale_ptr, M, N, K, stride_asm, stride_ask, stride_bsn, stride_bsk,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr,
):
    """One output tile [BLOCK_M, BLOCK_N] (in GROUP_M order) per program: the producer and the two
    consumers above. ``a_desc`` loads [BLOCK_M/2, 128] A tiles, ``b_desc`` [BLOCK_N, 128] B tiles,
    ``c_desc`` stores [BLOCK_M/2, BLOCK_N]; BLOCK_N divides 128 (one sB row per tile)."""
    HALF: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    pid_m, pid_n = tile_coords(gl.program_id(0), M, N, 2 * HALF, BLOCK_N, GROUP_M)
    off_m = pid_m * 2 * HALF
    off_n = pid_n * BLOCK_N
    a_top = gl.allocate_shared_memory(a_desc.dtype, [STAGES, HALF, K_STEP], a_desc.layout)
    a_bottom = gl.allocate_shared_memory(a_desc.dtype, [STAGES, HALF, K_STEP], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, K_STEP], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(STAGES):
        mbarrier.init(ready.index(stage), count=1)
        mbarrier.init(empty.index(stage), count=2)  # one elected arrive per consumer
    k_blocks = K // K_STEP
    b_scale_ptr += (off_n // K_STEP) * stride_bsn
    shared = (b_bufs, ready, empty, c_desc, a_scale_ptr, b_scale_ptr, stride_asm, stride_ask, stride_bsk, M)
    gl.warp_specialize([
        (_consume, (a_top,) + shared + (off_m, off_n, k_blocks)),
        (_consume, (a_bottom,) + shared + (off_m + HALF, off_n, k_blocks)),
        (_produce, (a_desc, b_desc, a_top, a_bottom, b_bufs, ready, empty, off_m, off_n, k_blocks)),
    ], [4, 1], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])
    for stage in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(stage))
        mbarrier.invalidate(empty.index(stage))


_GL_DTYPES = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}


def _descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """A TMA descriptor of a row-major 2-D tensor moving ``block`` tiles (swizzled for wgmma)."""
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype])
    return TensorDescriptor.from_tensor(t, block, layout)


def launch_fp8_gemm_pingpong(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out: torch.Tensor,
    config: GemmConfig,
) -> torch.Tensor:
    """:func:`.fp8_gemm.fp8_gemm` into ``out`` [M, N] (bf16 or fp32, rows 16-byte aligned) with
    this kernel: ``config.block_m`` rows a tile (two warpgroups of block_m / 2), ``block_n`` in
    {64, 128}, ``num_stages`` slots; ``num_warps`` must be 4 (a consumer), no split-K or
    persistent grid. A and B are copied when their rows are not 16-byte aligned for TMA."""
    if config.block_m != 128 or config.block_n not in (64, 128) or config.num_warps != 4 \
            or config.split_k != 1 or config.persistent:
        raise ValueError(f"the ping-pong FP8 GEMM takes 128x64 or 128x128 tiles, 4 warps a consumer, no split-K "
                         f"or persistent grid; got {config}")
    if not tma_ready(out):
        raise ValueError(f"out must be row-major with 16-byte aligned rows for the TMA store, got strides "
                         f"{tuple(out.stride())} of {out.dtype}")
    m, k = a.shape
    n = b.shape[0]
    a, b = (t if tma_ready(t) else t.contiguous() for t in (a, b))
    if b_scale.dtype != torch.float32:
        b_scale = b_scale.view(torch.uint8)
    half = config.block_m // 2
    grid = (cdiv(m, config.block_m) * cdiv(n, config.block_n),)
    _fp8_gemm_pingpong_kernel[grid](
        _descriptor(a, [half, K_BLOCK]), _descriptor(b, [config.block_n, K_BLOCK]),
        _descriptor(out, [half, config.block_n]), a_scale, b_scale,
        m, n, k, a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        GROUP_M=config.group_m, STAGES=config.num_stages, num_warps=4,
    )
    return out


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
