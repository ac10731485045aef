"""What the block-scaled GEMM kernels share: launch configs, tile order, the split-K epilogue.

Configs are never autotuned at import or at call time: each kernel module commits a table measured
once on the chip (``(m_class, N, K) -> GemmConfig``, see TUNING.md), and shapes the table lacks get
:func:`heuristic_config`. The choice is a pure function of the shape and the chip, so runs repeat.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._alignment import words_readable
from ._cache_keys import settle_cache_keys
from ._host import cdiv
from ._numerics import cast_rne
from ._pdl import pdl_options

K_BLOCK = 128
"""K width of one scaled partial product (the 1x128 activation / 128x128 weight scale block)."""

M_CLASSES = (1, 16, 64, 512, 4096, 16384)
"""Row counts the config tables are measured at; a shape uses the smallest class >= its M."""


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration: output tile, warps, pipeline depth, K splits, tile grouping, loads, grid."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    group_m: int = 8
    tma: bool = False
    """Load A and B tiles through tensor descriptors (the Hopper bulk copy engine)."""
    persistent: int = 0
    """Programs per SM of a persistent launch: min(work items, SMs x persistent) programs, each
    looping over (output tile, K split) work items in launch order; 0: one program per work item."""
    fp4_mx: bool = False
    """FP4 weights with e8m0 scales: each K block through Triton's microscaling ``tl.dot_scaled``
    (the weight decoded in registers by the compiler, wgmma); off, or with fp32 scales, decoded to
    bf16 by ``_e2m1.as_bf16`` (``_e2m1.fp4_block_dot``). Off by default: the committed tables were
    measured in the bf16 form, and the tuner tries both (TUNING.md). Unused by the FP8 kernel."""
    pingpong: bool = False
    """FP8 only: the Gluon kernel of :mod:`.fp8_gemm_pingpong` (a TMA producer warp, two consumer
    warpgroups of block_m / 2 rows taking turns on the tensor cores); num_warps is a consumer's (4)."""


ConfigTable = Mapping[tuple[int, int, int], GemmConfig]


def m_class(m: int) -> int:
    """The smallest of :data:`M_CLASSES` that is >= m (the largest for bigger m)."""
    return next((c for c in M_CLASSES if m <= c), M_CLASSES[-1])


def heuristic_config(m: int, n: int, k: int, sm_count: int) -> GemmConfig:
    """A reasonable config for shapes no table covers.

    Small M streams the weight: narrow tiles and, when the tiles alone cannot fill the chip, K
    splits (each keeping >= 4 K blocks). Large M is math-bound: 128x128 tiles, 8 warps, 4 stages.
    Pointer loads only: the TMA path is chosen per shape by the tables (TUNING.md).
    """
    if m <= 16:
        block_m, block_n, warps, stages = 16, 64, 4, 5
    elif m <= 64:
        block_m, block_n, warps, stages = 64, 64, 4, 5
    elif m <= 512:
        block_m, block_n, warps, stages = 64, 128, 4, 4
    else:
        block_m, block_n, warps, stages = 128, 128, 8, 4
    tiles = cdiv(m, block_m) * cdiv(n, block_n)
    split = k_splits(tiles, k // K_BLOCK, sm_count) if m <= 64 else 1
    return GemmConfig(block_m, block_n, warps, stages, split)


def k_splits(programs: int, k_blocks: int, target: int) -> int:
    """Split-K factor of a grid of ``programs`` output tiles over ``k_blocks`` K blocks: doubled
    while the grid holds fewer than ``target`` programs and each split keeps >= 4 K blocks."""
    split = 1
    while programs * split < target and k_blocks // (2 * split) >= 4:
        split *= 2
    return split


def chip(device: torch.device) -> str:
    """``"sm90"`` for an H100: the key of the committed config tables."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def committed_config(tables: Mapping[str, Mapping], key: tuple, device: torch.device):
    """The config a kernel module's tables commit for ``key`` on ``device``'s chip; None off a GPU
    (the Triton interpreter on CPU tensors) or where the chip's table lacks the key."""
    return tables.get(chip(device), {}).get(key) if device.type == "cuda" else None


def select_config(tables: Mapping[str, ConfigTable], m: int, n: int, k: int, device: torch.device) -> GemmConfig:
    """The committed config for (chip, m class, N, K), else :func:`heuristic_config`."""
    found = committed_config(tables, (m_class(m), n, k), device)
    if found is not None:
        return found
    if device.type != "cuda":
        return heuristic_config(m, n, k, sm_count=8)
    return heuristic_config(m, n, k, torch.cuda.get_device_properties(device).multi_processor_count)


INTERPRETER_SMS = 3
"""SMs a persistent launch assumes on CPU tensors (the Triton interpreter): few, and prime, so
programs loop over several, unequal numbers of tiles."""

_COUNTERS: dict[tuple, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []
"""Counter buffers replaced by larger ones, kept alive: a captured CUDA graph holds no reference to
the buffers its kernels were given, and may still replay on one of these."""


def arrival_counters(count: int, device: torch.device) -> torch.Tensor:
    """At least ``count`` int32 zeros: the arrival counters of a fixed-order "last one reduces" epilogue.

    The kernels that use them (split-K GEMMs and grouped experts, the mHC mix, the compressor's
    channel blocks) reset each counter to zero after use, so one buffer per (device, stream) serves
    every launch on that stream, one after another. To capture such a launch in a CUDA graph, run
    it once on the capture stream first (as torch recommends for any warm-up), so the buffer exists
    before the capture. A call that needs more counters gets a new, larger buffer; the old one is
    never freed (:data:`_OUTGROWN`), since graphs captured before may still use it.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        if counters is not None:
            _OUTGROWN.append(counters)
        counters = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = counters
    return counters


def split_k_workspace(
    config: GemmConfig, m: int, n: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """fp32 partial sums ``[split_k, M, N]`` and per-tile arrival counters for a split-K launch."""
    if config.split_k == 1:
        return None, None
    partial = torch.empty((config.split_k, m, n), dtype=torch.float32, device=device)
    tiles = cdiv(m, config.block_m) * cdiv(n, config.block_n)
    return partial, arrival_counters(tiles, device)


def sm_count(device: torch.device) -> int:
    """The SMs a launch on ``device`` spreads over: the CUDA device's, :data:`INTERPRETER_SMS` on CPU
    tensors (the Triton interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else INTERPRETER_SMS


def launch_grid(config: GemmConfig, m: int, n: int, device: torch.device) -> tuple[int, int]:
    """(programs along tiles, along K splits): one per (tile, split), or a persistent grid of
    min(tiles x splits, SMs x ``config.persistent``) programs on one axis.

    The SM count is read from the device at each launch (:func:`sm_count`).
    """
    tiles = cdiv(m, config.block_m) * cdiv(n, config.block_n)
    if not config.persistent:
        return tiles, config.split_k
    return min(tiles * config.split_k, sm_count(device) * config.persistent), 1


def launch(
    kernel, a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor, b_scale: torch.Tensor, out: torch.Tensor,
    config: GemmConfig,
) -> torch.Tensor:
    """Run a block-scaled GEMM kernel with an explicit config into ``out`` [M, N]; returns ``out``.

    Both kernels take (A, sA, B, sB, C, workspace, M, N, K, strides) and e8m0 weight scales as bytes.
    ``a_scale`` None (the FP8 kernel only): ``a`` holds float rows, FP8-quantised in the kernel
    (``QUANT_A``).
    """
    options = {}
    if a_scale is None:
        options["QUANT_A"] = True
        a_scale = a.as_strided((0, 0), (0, 0))  # never read: a pointer and strides to pass
    m, k = a.shape
    n = b.shape[0]
    if config.split_k > 1 and config.split_k * m * n >= 2**31:  # workspace offsets are int32
        config = dataclasses.replace(config, split_k=1)
    e8m0 = b_scale.dtype != torch.float32
    if e8m0:
        b_scale = b_scale.view(torch.uint8)
    partial, counters = split_k_workspace(config, m, n, a.device)
    a_arg, b_arg = (_descriptor(a, config.block_m), _descriptor(b, config.block_n)) if config.tma else (a, b)
    if config.tma:  # only the fp8 kernel has a TMA path
        options["TMA"] = True
    if config.fp4_mx and e8m0 and "MX" in kernel.arg_names:  # the FP4 kernel's microscaling form
        options["MX"] = True
    if config.persistent:
        options["PERSISTENT"] = True
    if weights_first(config.block_m, config.block_n, fp4=b.dtype == torch.uint8):
        options["WEIGHTS_FIRST"] = True
        if not options.get("MX") and words_readable(b, e8m0):  # FP4 codes as 4-byte words
            options["FP4_WORDS"] = True
    kernel[launch_grid(config, m, n, a.device)](
        a_arg, a_scale, b_arg, b_scale, out, partial, counters,
        m, n, k,
        a.stride(0), a.stride(1), a_scale.stride(0), a_scale.stride(1),
        b.stride(0), b.stride(1), b_scale.stride(0), b_scale.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, GROUP_M=config.group_m, SPLIT_K=config.split_k,
        B_SCALE_E8M0=e8m0, num_warps=config.num_warps, num_stages=config.num_stages, **options, **pdl_options(),
    )
    return out


def tma_ready(t: torch.Tensor) -> bool:
    """Whether TMA can address the 2-D tensor ``t`` as it is: row-major, rows 16-byte aligned."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def _descriptor(t: torch.Tensor, rows: int):
    """A tensor descriptor loading [rows, 128] tiles of a K-contiguous 2-D tensor (copied if not)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not tma_ready(t):
        t = t.contiguous()
    return TensorDescriptor.from_tensor(t, [rows, K_BLOCK])


def gemm(
    launcher: Callable[..., torch.Tensor], tables: Mapping[str, ConfigTable], a: torch.Tensor,
    a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Allocate C [M, N] (bf16 unless out_dtype) and fill it with ``launcher(a, a_scale, b,
    b_scale, out, config)`` under the committed config."""
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or torch.bfloat16, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    return launcher(a, a_scale, b, b_scale, out, select_config(tables, m, n, k, a.device))


MMA_ROWS = 64
"""The M of one Hopper wgmma (a warpgroup's tile rows)."""


def weights_first(block_m: int, block_n: int, fp4: bool) -> bool:
    """Whether a GEMM tile of ``block_m`` activation rows and ``block_n`` FP4 (``fp4``) weight rows
    forms its product weights first, ``(B_tile · A_tile^T)^T``: when only the weight rows fill a
    wgmma's M, the weights decoded to bf16 go in from registers (sm_90 SASS, 16x64: 494 -> 439
    loop instructions a warp per K block), where activations first a 16-row tile is an mma.sync
    product in which every warp handles all of A.

    Not for FP8 weights: their wgmma would take the e4m3 codes as stored, and an FP8 wgmma keeps
    only about 14 significant bits of its sums (fp32 outputs off by 4e-4 relative on the H100,
    2026-11-26: conformance failed), where the 16-row mma.sync product, on operands Triton widens
    to fp16, sums the exact products in fp32.
    """
    return fp4 and block_m < MMA_ROWS <= block_n


@triton.jit
def oriented_acc(BLOCK_M: tl.constexpr, ROWS: tl.constexpr, WEIGHTS_FIRST: tl.constexpr):
    """A zero fp32 accumulator for a tile of BLOCK_M activation rows and ROWS weight rows: [ROWS,
    BLOCK_M] when the product is formed weights first (:func:`weights_first`), else [BLOCK_M, ROWS]."""
    if WEIGHTS_FIRST:
        return tl.zeros((ROWS, BLOCK_M), dtype=tl.float32)
    else:
        return tl.zeros((BLOCK_M, ROWS), dtype=tl.float32)


@triton.jit
def oriented(x, WEIGHTS_FIRST: tl.constexpr):
    """A 2-D tensor laid out [activation rows, weight rows] turned as :func:`oriented_acc` holds
    its accumulator (transposed weights first), or the other way: the product from the
    accumulator, a block's scales into it."""
    if WEIGHTS_FIRST:
        return tl.trans(x)
    else:
        return x


@triton.jit
def oriented_dot(a, b, WEIGHTS_FIRST: tl.constexpr):
    """``A [M, K] · B [K, N]`` as :func:`oriented_acc` holds it: weights first ``B^T · A^T`` (the
    weight rows are the MMA's M), else ``A · B``."""
    if WEIGHTS_FIRST:
        return tl.dot(tl.trans(b), tl.trans(a))
    else:
        return tl.dot(a, b)


@triton.jit
def tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M tile rows at a time so B tiles stay in L2."""
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def k_block_range(K, pid_k, SPLIT_K: tl.constexpr, K_STEP: tl.constexpr):
    """The K blocks [lo, hi) that split ``pid_k`` of SPLIT_K accumulates."""
    k_blocks = K // K_STEP
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    lo = pid_k * per_split
    return lo, tl.minimum(lo + per_split, k_blocks)


@triton.jit
def decode_e8m0(e):
    """e8m0 bytes -> fp32 ``2^(e-127)`` exactly (e = 0 is the subnormal 2^-127, 255 is NaN)."""
    bits = e.to(tl.int32) << 23
    bits = tl.where(e == 0, 0x00400000, bits)
    bits = tl.where(e == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def store_tile(
    acc, c_ptr, partial_ptr, counter_ptr, pid_m, pid_n, pid_k, M, N, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Write the fp32 tile ``acc`` to C in C's dtype (rounded to nearest even); with SPLIT_K > 1,
    through the workspace.

    Split-K: each split stores its partial tile, then bumps the tile's counter; the split that
    arrives last sums all partials in split order (deterministic) and writes C, then resets the
    counter to zero for the next launch.
    """
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    if SPLIT_K == 1:
        tl.store(c_ptrs, cast_rne(acc, c_ptr.dtype.element_ty), mask=mask)
    else:
        tile_ptrs = partial_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(tile_ptrs + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()
        counter = counter_ptr + pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(tile_ptrs + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(c_ptrs, cast_rne(total, c_ptr.dtype.element_ty), mask=mask)
            reset_arrival_counter(counter)


@triton.jit
def reset_arrival_counter(counter):
    """Zero an arrival counter (:func:`arrival_counters`) once the last program has seen it.

    Relaxed, no fence: nothing in this launch reads the counter again, and the next launch reads
    it only after this grid has finished (stream order, or PDL's wait for the prior grid), which
    makes every write of this grid visible. An ``acq_rel`` exchange would first wait, behind a
    ``MEMBAR.ALL.GPU``, for the program's earlier stores (the output tile) to reach L2.
    """
    tl.atomic_xchg(counter, 0, sem="relaxed")


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
