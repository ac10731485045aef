"""Triton routed experts (op ``moe_experts``): permute by expert, two grouped GEMMs, un-permute.

Layout: *contiguous grouped*. The T*k (token, slot) pairs are sorted by expert on the device (no
host synchronisation; one Triton launch, a bitonic sort and a histogram, for few rows, three for
many, a histogram per block of slots, a scan and a sort per block: :func:`route`), so each
expert's rows are consecutive in one [S = T*k] order. A row tile never straddles two experts: expert e owns ``ceil(n_e / BLOCK_M)``
tiles and its last tile masks the rows past ``n_e``. The grid is sized by the bound
``ceil(S / BLOCK_M) + min(E, S)`` (no data-dependent launch shape, so a call can be captured in a
CUDA graph); tiles past the real count exit at once. The same layout serves decode (S small: one
masked tile per touched expert, and experts without tokens cost nothing) and prefill. There is no
separate padded [E, max_rows] decode layout.

Three launches after the routing tables:

1. gate-up: ``h = w * silu(min(x W1^T, L)) * clamp(x W3^T, -L, L)`` for a row tile and a column
   tile of both W1 and W3 (one A load, two fp32 accumulators), rows of x gathered by slot // k (x
   is never copied into the permuted order). ``h`` is rounded to x's dtype; when W2 is FP8/FP4 the
   epilogue then FP8-quantises it in its 1x128 ue8m0 tile (BLOCK_N = 128), so h only exists as e4m3.
   Narrower column tiles (BLOCK_N = 64: smaller programs, two or more resident on an SM) store h
   in x's dtype instead, and the down GEMM quantises it as it loads it (up to
   :data:`QUANT_IN_GEMM_MAX_ROWS` rows) or one ``fp8_act_quant`` launch does: the same function on
   the same values, so the same e4m3 codes and scales.
2. down: ``y_s = x.dtype(h_s W2^T)`` per sorted row, the same kernel with one weight.
3. combine: ``out_t = sum_k fp32(y_{pos(t, k)})`` in ascending expert order (the reference's order).

At decode the (row tile, column tile) grids of both GEMMs are small (one token: 6 experts' tiles),
while each program's FP4 decode is ALU-bound; :func:`decode_splits` then cuts K into splits, and
the last split of a tile to arrive sums the fp32 partials in split order and runs the epilogue.
``ExpertsConfig.gemv`` (:data:`FP8_GEMV`) instead runs FP8 weights' GEMMs on the CUDA cores, a
routed row a program (:func:`_gemv_kernel`), x and h quantised by ``fp8_act_quant``: a bench
variant, since on the H100 it won one run and lost the next (TUNING.md).

Weights: dense (bf16 / fp32; an fp32 operand makes the dot fp32 IEEE), FP8 e4m3 with 128x128 block
scales (per-K-block scaling into a separate fp32 accumulator, as ``fp8_gemm``), FP4 e2m1 with 1x32
scales (as ``fp4_gemm``: Triton's microscaling ``tl.dot_scaled`` for e8m0 scales,
``ExpertsConfig.fp4_mx``, else decoded to bf16 in registers). The activations of FP8/FP4 GEMMs are
FP8-quantised in 1x128 ue8m0 tiles (x by the Triton ``fp8_act_quant``, one launch; h in the
gate-up epilogue). Duplicate expert ids within a token are merged (weights summed, one row), as the
reference applies the summed weight once. Verified on the H100 at 14a3a20 (full-shape conformance;
the FP4 defaults of :func:`experts_config` since then ran there, checked, as bench variants).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from seahal.hal.ops.moe import expert_weight_format

from ._alignment import words_readable
from ._cache_keys import settle_cache_keys
from ._e2m1 import fp4_block_dot
from ._gemm import (
    K_BLOCK, arrival_counters, committed_config, decode_e8m0, k_splits, oriented, oriented_acc,
    reset_arrival_counter, weights_first,
)
from ._host import cdiv, next_power_of_2
from ._numerics import cast_rne, exact_dot, fp8_quantize_tiles
from .quant import fp8_act_quant, fp8_round_trip
from ._pdl import pdl_options, wait_for_prior_grid

_FORMATS = {"dense": 0, "fp8": 1, "fp4": 2}
"""Weight format -> the kernels' FORMAT code."""
_DENSE_WEIGHT_DTYPES = (torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class ExpertsConfig:
    """Launch configuration of both grouped GEMMs (BLOCK_K follows each GEMM's weight format)."""

    block_m: int
    block_n: int
    """Columns of a tile. With FP8/FP4 weights a divisor of 128 (one 128-row weight scale block a
    tile); 128 lets the gate-up epilogue quantise h's 1x128 tiles itself, narrower tiles leave h in
    x's dtype for the down GEMM (or one ``fp8_act_quant`` launch) to quantise."""
    num_warps: int = 4
    num_stages: int = 3
    fp4_mx: bool = False
    """FP4 weights with e8m0 scales through ``tl.dot_scaled`` (:mod:`._e2m1`), else (the default:
    faster on the H100 at every row, :func:`experts_config`) decoded to bf16."""
    split_k: int | None = None
    """K splits of both GEMMs; None: :func:`decode_splits` of each GEMM on a GPU, 1 on CPU tensors."""
    quant_in_gemm: bool | None = None
    """FP8/FP4 weights: the GEMMs quantise their float inputs (x, and h from 64-column gate-up
    tiles) themselves, each program its rows' 1x128 tiles, instead of one ``fp8_act_quant`` launch
    each; None: up to :data:`QUANT_IN_GEMM_MAX_ROWS` routed rows. In the kernel it saves a launch
    and costs every program its quantisation in each K step (sm_90, one token: the FP8 gate-up
    loop 657 instructions and 6 barriers against 382 and 2, FP4 691 and 4 against 631 and 3)."""
    gemv: bool = False
    """FP8 weights, decode: each routed row's products on the CUDA cores (:func:`_gemv_kernel`,
    BLOCK_N weight rows a program, no tensor core and no routing tiles), x and h quantised by
    ``fp8_act_quant`` launches of their own; BLOCK_M only shapes the routing tables."""
    fp4_words: bool = True
    """FP4 weights, weights-first tiles: the codes load as 4-byte words where :func:`_fp4_words`
    allows (:func:`._e2m1.e2m1_bf16_words`); False: a byte at a time (the bench's comparison)."""
    max_registers: int | None = None
    """Registers a thread may use (Triton's ``maxnreg``; None: as ptxas sees fit). A bench variant
    and tuner candidate (:data:`THREE_PROGRAMS_AN_SM`), not a default."""
    round_trip: bool = False
    """FP4 weights in activations-first tiles (prefill): x and h enter the GEMMs as the bf16 values
    of their FP8 quantisation (:func:`.quant.fp8_round_trip`, a launch each, exact) rather than as
    e4m3 codes and scales, so the loop neither widens codes nor scales each block's product (sm_90,
    the 1k-token prefill: gate-up 807 -> 640 loop instructions a warp, down 506 -> 371). A bench
    variant and tuner candidate, not a default."""


THREE_PROGRAMS_AN_SM = 80
"""The register cap at which the one-token FP4 tiles (16x128, 8 warps) fit three programs an SM:
sm_90 (Triton 3.6) compiles the words decode's gate-up to 109 registers and the down to 95, two
programs an SM, so V4-Flash's 384 live programs of each GEMM (6 experts x 16 or 32 column tiles x
4 or 2 K splits) run in two waves, the second half full; at 80, 396 slots hold them in one. The
cost: spills (gate-up 96 bytes a thread, 22 local loads and stores a loop iteration; down 32
bytes, 5), which 3 pipeline stages leave L1 room for. Unmeasured (TUNING.md)."""


FP4_WIDE_DECODE_MAX_ROWS = 16
"""Up to this many routed rows (one or two tokens) FP4 weights are decoded by 8 warps a program."""


def experts_config(rows: int, weight_format: str, device: torch.device) -> ExpertsConfig:
    """Tiles for ``rows`` = T*k routed rows of weights in ``weight_format`` ("dense", "fp8" or
    "fp4"). A heuristic from the H100's bench rows (TUNING.md; ``--tune`` sweeps it).

    With FP8 weights BLOCK_N = 128: one weight scale row per tile, and the gate-up epilogue
    quantises whole 1x128 tiles of h. Few rows (decode) take 16-row tiles, since each touched
    expert has only a handful; many take 64. FP4 blocks are decoded to bf16 (``fp4_mx`` off): on
    the H100 (2026-11-26, V4-Flash) that form took 124.9 us at one token against 135.7 us through
    ``tl.dot_scaled``, 1050 against 1349 us at 16 tokens, and on the H200 the 8192-token row 24.7
    ms against 27.0 ms. That decode is ALU-bound: at one token (a few programs an SM) 8 warps
    decode faster than 4 (105.2 against 124.0 us, V4-Flash; 277.0 against 284.4 us, V4-Pro), and
    from two tokens 64-column tiles of 4 warps, two or more programs an SM, beat 128 columns
    (H100, 14a3a20: V4-Flash 16 tokens 709.0 against 789.2 us, V4-Pro 1686.4 against 1861.5; 64
    tokens 2671.4 against 3517.9; 8192 tokens 11.59 against 14.55 ms, V4-Pro 30.88 against 39.26).
    Their h leaves the gate-up in x's dtype and is quantised by the down GEMM or one
    ``fp8_act_quant`` launch (:data:`QUANT_IN_GEMM_MAX_ROWS`). FP8 keeps 128 columns: its 8192-token
    row took 6.11 ms against 7.40 ms in 64-column tiles.
    """
    quantised = weight_format != "dense"
    if device.type != "cuda":  # the interpreter: small tiles, so tests see edge and masked tiles
        return ExpertsConfig(16, 128 if quantised else 64)
    if weight_format == "fp4":
        if rows <= FP4_WIDE_DECODE_MAX_ROWS:
            return ExpertsConfig(16, 128, num_warps=8, num_stages=4)
        if rows <= 256:
            return ExpertsConfig(16, 64, num_warps=4, num_stages=4)
        return ExpertsConfig(64, 64, num_warps=4, num_stages=3)
    if rows <= 256:
        return ExpertsConfig(16, 128, num_warps=4, num_stages=4)
    return ExpertsConfig(64, 128, num_warps=8 if quantised else 4, num_stages=3)


ExpertsTable = dict[tuple[str, int, int, int], ExpertsConfig]
"""(weight format, routed rows rounded up to a power of two, I, D) -> the launch config tuned there."""

SM90_CONFIGS: ExpertsTable = {}
"""Configs tuned on an H100: ``python -m seahal.bench.cuda_moe_experts --tune --json tune.json`` on
the GPU (the gpu_session step ``tune-experts``), then ``--from-json tune.json --write`` here, which
replaces this literal with the candidates at least 10% faster than the default launch. Empty: the
one sweep so far (H100, 14a3a20: the one-token rows) found none (the routed FP4 experts 80.4 us
against 86.4, the shared FP8 expert 30.2 against 31.5), so :func:`experts_config`'s heuristic
serves every shape."""
CONFIGS = {"sm90": SM90_CONFIGS}


def rows_class(rows: int) -> int:
    """The table's row key: T*k routed rows rounded up to a power of two (one token's 6 -> 8)."""
    return next_power_of_2(rows)


def select_experts_config(rows: int, weight_format: str, inter: int, dim: int, device: torch.device) -> ExpertsConfig:
    """What :func:`moe_experts` launches for ``rows`` routed rows of [I, D] experts in
    ``weight_format``: the committed config of (chip, format, :func:`rows_class`, I, D), else
    :func:`experts_config`'s heuristic."""
    found = committed_config(CONFIGS, (weight_format, rows_class(rows), inter, dim), device)
    return found if found is not None else experts_config(rows, weight_format, device)


FP8_GEMV = ExpertsConfig(16, 16, num_warps=4, gemv=True)
"""FP8 weights on the CUDA cores, 16 weight rows a program: a bench variant at up to 16 tokens. On
the H100 (V4-Flash, 6 of 256 experts, one token) it took 83.9 us against the tensor-core tiles'
92.9 at 567d97d, then 96.0 against 85.2 at d2669c9, where, as the one-token default, it also ran
the end-to-end decode's one-row shared experts 45 us a step slower (one row is 128 gate-up and 256
down programs, under two an SM; the tiles split K); at 16 tokens 829.7 against 791.1."""


QUANT_IN_GEMM_MAX_ROWS = 256
"""Up to this many routed rows (T * k: the decode tiles of :func:`experts_config`) the gate-up
GEMM quantises x itself, and the down GEMM an h its gate-up left unquantised (column tiles under
128), instead of a separate ``fp8_act_quant`` launch (``ExpertsConfig.quant_in_gemm`` None).
A rule, not a measurement: the bench's decode rows time the other way as a variant."""


def _block_k(fmt: str) -> int:
    """K step: one 128-wide scale block for FP8/FP4 weights, 64 (masked) for dense."""
    return K_BLOCK if fmt != "dense" else 64


@dataclass(frozen=True)
class Routing:
    """The permutation of the S = T*k routed rows into expert order (all on the device).

    tiles: [3, max_tiles] int32: per row tile its expert (-1: unused), first and end sorted row.
    slots: [S] int32, the (token * k + j) slot of each sorted row (dropped slots sort last).
    weights: [S] fp32, the routing weight of each sorted row (duplicates of an expert summed).
    positions: [T, k] int32, the sorted rows of each token in ascending expert order.
    n_valid: [1] int32, the number of routed rows (the rest of the S rows are dropped slots).
    """

    tiles: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor
    positions: torch.Tensor
    n_valid: torch.Tensor
    identity: bool = False
    """One expert and top-1 (:meth:`one_expert`): sorted row r is token r, no table is built."""

    @classmethod
    def one_expert(cls, topk_weights: torch.Tensor, topk_ids: torch.Tensor, block_m: int) -> Routing:
        """The routing of one expert at top-1 (a shared expert), read by the GEMMs as it is: token t
        is row t, routed when its id is 0 (any other id routes nowhere), with weight
        ``topk_weights[t, 0]``. ``slots`` holds the ids and ``weights`` the weights [T] (views of
        any stride: the model's are stride 0); ``tiles`` only sizes the grid (ceil(T / BLOCK_M) row
        tiles). Nothing is launched, and the down GEMM writes the output itself (no combine)."""
        t = topk_ids.shape[0]
        empty = torch.empty(0, dtype=torch.int32, device=topk_ids.device)
        return cls(tiles=torch.empty((3, cdiv(t, block_m)), dtype=torch.int32, device=topk_ids.device),
                   slots=topk_ids[:, 0], weights=topk_weights[:, 0].float(), positions=empty,
                   n_valid=empty, identity=True)

    @classmethod
    def empty(cls, tokens: int, top_k: int, max_tiles: int, device: torch.device) -> Routing:
        """Uninitialised tables for a routing kernel to fill."""
        rows = tokens * top_k
        return cls(
            tiles=torch.empty((3, max_tiles), dtype=torch.int32, device=device),
            slots=torch.empty(rows, dtype=torch.int32, device=device),
            weights=torch.empty(rows, dtype=torch.float32, device=device),
            positions=torch.empty((tokens, top_k), dtype=torch.int32, device=device),
            n_valid=torch.empty(1, dtype=torch.int32, device=device),
        )


ROUTE_KERNEL_MAX_ROWS = 512
"""Up to this many routed rows T*k, :func:`route` builds the tables in one Triton launch
(:func:`route_small`); above, in three (:func:`route_blocked`)."""
ROUTE_KERNEL_MAX_EXPERTS = 1024
"""The Triton routings hold per-expert counts in registers: beyond this E :func:`route` takes the torch path."""
_ROUTE_CHUNK = 32
"""Tiles the routing kernel assigns to experts at a time (a [32, experts] comparison tile)."""


def route(topk_weights: torch.Tensor, topk_ids: torch.Tensor, n_experts: int, block_m: int) -> Routing:
    """Sort the (token, slot) pairs by expert and cut each expert's rows into BLOCK_M tiles.

    topk_weights: [T, k] float, topk_ids: [T, k] int (ids outside [0, E) route nowhere).
    A slot repeating an earlier slot's expert is dropped and its weight added to that slot's.
    Few rows (decode) take one Triton launch (:func:`route_small`), many three
    (:func:`route_blocked`); beyond :data:`ROUTE_KERNEL_MAX_EXPERTS` experts the torch sort
    (:func:`route_sorted`). All give the same tables.
    """
    rows = topk_ids.numel()
    if rows == 0 or not 0 < n_experts <= ROUTE_KERNEL_MAX_EXPERTS:
        return route_sorted(topk_weights, topk_ids, n_experts, block_m)
    if rows <= ROUTE_KERNEL_MAX_ROWS:
        return route_small(topk_weights, topk_ids, n_experts, block_m)
    return route_blocked(topk_weights, topk_ids, n_experts, block_m)


def _max_tiles(rows: int, n_experts: int, block_m: int) -> int:
    """Row tiles the tables hold: the bound ceil(S / BLOCK_M) + min(E, S) (one partial tile per expert)."""
    return cdiv(rows, block_m) + min(n_experts, rows)


def _tiles_pad(max_tiles: int) -> int:
    """The tiles table's length rounded up to the routing kernels' :data:`_ROUTE_CHUNK`."""
    return cdiv(max_tiles, _ROUTE_CHUNK) * _ROUTE_CHUNK


def route_sorted(topk_weights: torch.Tensor, topk_ids: torch.Tensor, n_experts: int, block_m: int) -> Routing:
    """:func:`route` with torch ops: a stable sort of the slots by expert, searchsorted for the bounds."""
    t, k = topk_ids.shape
    rows = t * k
    device = topk_ids.device
    ids = topk_ids.long()
    same = ids[:, :, None] == ids[:, None, :]
    weights = torch.where(same, topk_weights.float()[:, None, :], 0.0).sum(-1)
    repeat = (same & torch.ones(k, k, dtype=torch.bool, device=device).tril(-1)).any(-1)
    keep = (ids >= 0) & (ids < n_experts) & ~repeat
    sorted_ids, slots = torch.sort(torch.where(keep, ids, n_experts).flatten(), stable=True)
    bounds = torch.searchsorted(sorted_ids, torch.arange(n_experts + 1, device=device))
    n_tiles = (bounds[1:] - bounds[:-1] + block_m - 1) // block_m
    tiles_end = n_tiles.cumsum(0)
    tile = torch.arange(_max_tiles(rows, n_experts, block_m), device=device)
    expert = torch.searchsorted(tiles_end, tile, right=True)
    e = expert.clamp(max=n_experts - 1)
    first = bounds[e] + (tile - tiles_end[e] + n_tiles[e]) * block_m
    tiles = torch.stack([torch.where(expert < n_experts, expert, -1), first, bounds[e + 1]]).to(torch.int32)
    positions = torch.empty(rows, dtype=torch.long, device=device)
    positions.scatter_(0, slots, torch.arange(rows, device=device))
    return Routing(
        tiles=tiles.contiguous(),
        slots=slots.to(torch.int32),
        weights=weights.flatten()[slots].contiguous(),
        positions=positions.view(t, k).sort(dim=1).values.to(torch.int32),
        n_valid=bounds[n_experts:].to(torch.int32),
    )


@triton.jit
def _slot_key(ids_ptr, slot, mask, stride_t, stride_k, n_experts, TOP_K: tl.constexpr):
    """The sort key of each (token * k + j) ``slot``: its expert id, or E when the id is outside
    [0, E) or repeats one of the token's earlier slots (the slot is dropped and sorts last)."""
    token = slot // TOP_K
    j = slot % TOP_K
    ids = tl.load(ids_ptr + token * stride_t + j * stride_k, mask=mask, other=-1)
    repeat = tl.zeros_like(mask)
    for jj in tl.static_range(TOP_K):
        other = tl.load(ids_ptr + token * stride_t + jj * stride_k, mask=mask, other=-1)
        repeat |= (jj < j) & (other == ids)
    keep = (ids >= 0) & (ids < n_experts) & ~repeat
    return tl.where(keep, ids, n_experts).to(tl.int32)


@triton.jit
def _store_tiles(tiles_ptr, count, below, n_experts, max_tiles, BLOCK_M: tl.constexpr, EXPERTS_PAD: tl.constexpr,
                 TILES_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """The ``tiles`` table from each expert's row ``count`` and first sorted row ``below``
    ([EXPERTS_PAD], zero past E): expert e owns ceil(count_e / BLOCK_M) tiles; tile -> expert is
    #{e : tiles_end_e <= tile} (searchsorted, right), -1 past the last used tile."""
    expert = tl.arange(0, EXPERTS_PAD)
    n_tiles = (count + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.where(expert < n_experts, tl.cumsum(n_tiles, axis=0), max_tiles)
    row_lo = below - (tiles_end - n_tiles) * BLOCK_M  # tile's first row: row_lo_e + tile * BLOCK_M
    row_hi = below + count
    for c in range(0, TILES_PAD, CHUNK):
        tile = c + tl.arange(0, CHUNK)
        owner = tl.sum((tiles_end[None, :] <= tile[:, None]).to(tl.int32), axis=1)
        one_hot = expert[None, :] == tl.minimum(owner, n_experts - 1)[:, None]  # unused tiles: expert E - 1's
        first = tl.sum(tl.where(one_hot, row_lo[None, :], 0), axis=1) + tile * BLOCK_M
        end = tl.sum(tl.where(one_hot, row_hi[None, :], 0), axis=1)
        mask = tile < max_tiles
        tl.store(tiles_ptr + tile, tl.where(owner < n_experts, owner, -1), mask=mask)
        tl.store(tiles_ptr + max_tiles + tile, first, mask=mask)
        tl.store(tiles_ptr + 2 * max_tiles + tile, end, mask=mask)


@triton.jit
def _merged_weight_and_order(weights_ptr, ids_ptr, slot, key, mask, n_experts, stride_wt, stride_wk, stride_it,
                             stride_ik, TOP_K: tl.constexpr):
    """Per ``slot`` (sort ``key``): its merged routing weight, the fp32 sum in slot order of its
    token's weights with its id, and its place among its token's k rows (the rank of (key, slot))."""
    token = slot // TOP_K
    j = slot % TOP_K
    ids = tl.load(ids_ptr + token * stride_it + j * stride_ik, mask=mask, other=-1)
    weight = tl.zeros(slot.shape, dtype=tl.float32)
    order = tl.zeros(slot.shape, dtype=tl.int32)
    for jj in tl.static_range(TOP_K):
        peer = tl.load(ids_ptr + token * stride_it + jj * stride_ik, mask=mask, other=-1)
        w = tl.load(weights_ptr + token * stride_wt + jj * stride_wk, mask=mask, other=0.0).to(tl.float32)
        weight += tl.where(peer == ids, w, 0.0)
        peer_key = _slot_key(ids_ptr, token * TOP_K + jj, mask, stride_it, stride_ik, n_experts, TOP_K)
        order += ((peer_key < key) | ((peer_key == key) & (jj < j))).to(tl.int32)
    return weight, order


@triton.jit
def _route_kernel(
    weights_ptr, ids_ptr, tiles_ptr, slots_ptr, sorted_weights_ptr, positions_ptr, n_valid_ptr,
    rows, n_experts, max_tiles, stride_wt, stride_wk, stride_it, stride_ik,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, ROWS_PAD: tl.constexpr, EXPERTS_PAD: tl.constexpr,
    TILES_PAD: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr = False,
):
    """The :class:`Routing` tables of ``rows`` = T*k slots in one program.

    The slots sorted by ``key * ROWS_PAD + slot`` (one bitonic ``tl.sort``; the slot breaks ties,
    so the order is the stable sort's) give sorted row r its slot; the padding slots (key E, slot
    >= rows) sort last. Per expert the row count is a histogram of the routed keys and its first
    row the exclusive prefix sum. A row's place among its token's rows is its key's rank over the
    token's k slots; tile -> expert is #{e : tiles_end_e <= tile} (searchsorted, right). The merged
    weight of a slot sums, in slot order, the weights of the token's slots with its id.
    """
    wait_for_prior_grid(PDL)
    row = tl.arange(0, ROWS_PAD)
    in_rows = row < rows
    key = _slot_key(ids_ptr, row, in_rows, stride_it, stride_ik, n_experts, TOP_K)
    count = tl.histogram(key, EXPERTS_PAD, mask=key < n_experts)
    below = tl.cumsum(count, axis=0) - count  # bounds_e = #{key < e}
    tl.store(n_valid_ptr, tl.sum((key < n_experts).to(tl.int32), axis=0))
    order_key = tl.sort(key * ROWS_PAD + row)
    slot = order_key % ROWS_PAD  # sorted row -> its slot
    key = order_key // ROWS_PAD
    weight, order = _merged_weight_and_order(weights_ptr, ids_ptr, slot, key, in_rows, n_experts, stride_wt,
                                             stride_wk, stride_it, stride_ik, TOP_K)
    tl.store(slots_ptr + row, slot, mask=in_rows)
    tl.store(sorted_weights_ptr + row, weight, mask=in_rows)
    tl.store(positions_ptr + slot - slot % TOP_K + order, row, mask=in_rows)
    _store_tiles(tiles_ptr, count, below, n_experts, max_tiles, BLOCK_M, EXPERTS_PAD, TILES_PAD, CHUNK)


def route_small(topk_weights: torch.Tensor, topk_ids: torch.Tensor, n_experts: int, block_m: int) -> Routing:
    """:func:`route` in one launch of :func:`_route_kernel`, for T*k <= :data:`ROUTE_KERNEL_MAX_ROWS`
    and E <= :data:`ROUTE_KERNEL_MAX_EXPERTS`: decode, where the torch path's ~45 small kernels cost
    more than the experts' GEMMs."""
    t, k = topk_ids.shape
    rows = t * k
    max_tiles = _max_tiles(rows, n_experts, block_m)
    r = Routing.empty(t, k, max_tiles, topk_ids.device)
    rows_pad = max(next_power_of_2(rows), _ROUTE_CHUNK)
    _route_kernel[(1,)](
        topk_weights, topk_ids, r.tiles, r.slots, r.weights, r.positions, r.n_valid,
        rows, n_experts, max_tiles, *topk_weights.stride(), *topk_ids.stride(),
        TOP_K=k, BLOCK_M=block_m, ROWS_PAD=rows_pad, EXPERTS_PAD=max(next_power_of_2(n_experts), _ROUTE_CHUNK),
        TILES_PAD=_tiles_pad(max_tiles), CHUNK=_ROUTE_CHUNK, **pdl_options(),
    )
    return r


@triton.jit
def _route_count_kernel(ids_ptr, counts_ptr, rows, n_experts, stride_it, stride_ik, TOP_K: tl.constexpr,
                        BLOCK: tl.constexpr, BINS: tl.constexpr, PDL: tl.constexpr = False):
    """counts[b, e]: block b's slots (``BLOCK`` of them) with sort key e (E: dropped), e < BINS."""
    wait_for_prior_grid(PDL)
    block = tl.program_id(0)
    slot = block * BLOCK + tl.arange(0, BLOCK)
    in_rows = slot < rows
    key = _slot_key(ids_ptr, slot, in_rows, stride_it, stride_ik, n_experts, TOP_K)
    tl.store(counts_ptr + block * BINS + tl.arange(0, BINS), tl.histogram(key, BINS, mask=in_rows))


@triton.jit
def _route_scan_kernel(counts_ptr, tiles_ptr, n_valid_ptr, n_blocks, n_experts, max_tiles, BLOCK_M: tl.constexpr,
                       BINS: tl.constexpr, TILES_PAD: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr = False):
    """One program: the keys' totals and first sorted rows (exclusive prefix sum over the keys,
    dropped slots last), the ``tiles`` table, and per block b, in place of its counts, the sorted
    row of its first slot of key e less that slot's place among the block's sorted slots:
    ``below_e + #{key e in blocks < b} - #{key < e in block b}``."""
    wait_for_prior_grid(PDL)
    key = tl.arange(0, BINS)
    total = tl.zeros((BINS,), dtype=tl.int32)
    for block in range(n_blocks):
        total += tl.load(counts_ptr + block * BINS + key)
    below = tl.cumsum(total, axis=0) - total
    routed = key < n_experts
    tl.store(n_valid_ptr, tl.sum(tl.where(routed, total, 0), axis=0))
    _store_tiles(tiles_ptr, tl.where(routed, total, 0), below, n_experts, max_tiles, BLOCK_M, BINS, TILES_PAD, CHUNK)
    earlier = below
    for block in range(n_blocks):
        count = tl.load(counts_ptr + block * BINS + key)
        tl.store(counts_ptr + block * BINS + key, earlier - (tl.cumsum(count, axis=0) - count))
        earlier += count


@triton.jit
def _route_place_kernel(
    weights_ptr, ids_ptr, offsets_ptr, slots_ptr, sorted_weights_ptr, positions_ptr, rows, n_experts,
    stride_wt, stride_wk, stride_it, stride_ik, TOP_K: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Block b's slots sorted by (key, slot) (one bitonic ``tl.sort``): the p-th goes to sorted row
    ``offsets[b, key] + p`` (:func:`_route_scan_kernel`), with its merged weight; its token's
    ``positions`` entry at its place among the token's rows."""
    wait_for_prior_grid(PDL)
    block = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    slot = block * BLOCK + local
    key = _slot_key(ids_ptr, slot, slot < rows, stride_it, stride_ik, n_experts, TOP_K)
    order_key = tl.sort(key * BLOCK + local)
    key = order_key // BLOCK
    slot = block * BLOCK + order_key % BLOCK
    in_rows = slot < rows
    row = tl.load(offsets_ptr + block * BINS + key, mask=in_rows, other=0) + local
    weight, order = _merged_weight_and_order(weights_ptr, ids_ptr, slot, key, in_rows, n_experts, stride_wt,
                                             stride_wk, stride_it, stride_ik, TOP_K)
    tl.store(slots_ptr + row, slot, mask=in_rows)
    tl.store(sorted_weights_ptr + row, weight, mask=in_rows)
    tl.store(positions_ptr + slot - slot % TOP_K + order, row, mask=in_rows)


ROUTE_BLOCK = 1024
"""Slots a program of the blocked routing (:func:`route_blocked`) counts and places."""


def route_blocked(topk_weights: torch.Tensor, topk_ids: torch.Tensor, n_experts: int, block_m: int) -> Routing:
    """:func:`route` in three launches for any T*k (E <= :data:`ROUTE_KERNEL_MAX_EXPERTS`): each
    block of :data:`ROUTE_BLOCK` slots counts its keys, one program turns the counts into each
    block's first sorted rows and the tiles table, each block places its slots. The tables equal
    the torch path's (a stable sort: within a key, blocks in order and each block's slots sorted
    by slot); prefill, where that path is ~45 small kernels a call, twice a layer."""
    t, k = topk_ids.shape
    rows = t * k
    max_tiles = _max_tiles(rows, n_experts, block_m)
    n_blocks = cdiv(rows, ROUTE_BLOCK)
    bins = next_power_of_2(n_experts + 1)  # the experts' keys and the dropped slots' E
    counts = torch.empty((n_blocks, bins), dtype=torch.int32, device=topk_ids.device)
    r = Routing.empty(t, k, max_tiles, topk_ids.device)
    _route_count_kernel[(n_blocks,)](topk_ids, counts, rows, n_experts, *topk_ids.stride(), TOP_K=k,
                                     BLOCK=ROUTE_BLOCK, BINS=bins, **pdl_options())
    _route_scan_kernel[(1,)](counts, r.tiles, r.n_valid, n_blocks, n_experts, max_tiles, BLOCK_M=block_m, BINS=bins,
                             TILES_PAD=_tiles_pad(max_tiles), CHUNK=_ROUTE_CHUNK, **pdl_options())
    _route_place_kernel[(n_blocks,)](
        topk_weights, topk_ids, counts, r.slots, r.weights, r.positions, rows, n_experts,
        *topk_weights.stride(), *topk_ids.stride(), TOP_K=k, BLOCK=ROUTE_BLOCK, BINS=bins, **pdl_options(),
    )
    return r


@triton.jit
def _weight_block(
    w_ptr, ws_ptr, cols, col0, kb, K, stride_wn, stride_wk, stride_wsn, stride_wsk,
    FORMAT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_E8M0: tl.constexpr,
    FP4_WORDS: tl.constexpr,
):
    """K block ``kb`` of one expert's weight as the dot's B [BLOCK_K, BLOCK_N], and its scale.

    dense: the stored values (K masked), scale 1; fp8: e4m3 codes and the tile's one 128x128
    block scale; fp4: the packed codes [BLOCK_N, BLOCK_K / 2] (FP4_WORDS: as uint32 words
    [BLOCK_N, BLOCK_K / 8], K contiguous) and their 1x32 scales.
    """
    if FORMAT == 0:
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        b_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K, other=0.0)
        return b, 1.0
    elif FORMAT == 1:
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        b = tl.load(w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk)
        scale = tl.load(ws_ptr + (col0 // 128) * stride_wsn + kb * stride_wsk)
        if SCALE_E8M0:
            scale = decode_e8m0(scale)
        return b, scale
    else:  # a constexpr if does not end the function: the fp4 path must not be compiled for fp8
        if FP4_WORDS:
            offs_word = kb * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
            words = (w_ptr + cols[:, None] * stride_wn).to(tl.pointer_type(tl.uint32), bitcast=True)
            packed = tl.load(words + offs_word[None, :])
        else:
            offs_byte = kb * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + cols[:, None] * stride_wn + offs_byte[None, :] * stride_wk)
        offs_s = kb * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
        return packed, tl.load(ws_ptr + cols[:, None] * stride_wsn + offs_s[None, :] * stride_wsk)


@triton.jit
def _accumulate(
    acc, a, a_scale, b, b_scale, FORMAT: tl.constexpr, DOT_FP32: tl.constexpr, SCALE_E8M0: tl.constexpr,
    MX: tl.constexpr, WEIGHTS_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_ROUND_TRIP: tl.constexpr = False,
):
    """``acc + A B`` with the block's scales: fp32 accumulation in every format; acc [BLOCK_N,
    BLOCK_M] when WEIGHTS_FIRST (fp4 only, :func:`._gemm.weights_first`), else [BLOCK_M,
    BLOCK_N] (fp4: b, b_scale are the packed codes and 1x32 scales, formed as
    :func:`._e2m1.fp4_block_dot` says)."""
    if FORMAT == 0:
        return exact_dot(a, b, acc, not DOT_FP32)
    elif FORMAT == 1:
        return acc + tl.dot(a, b) * (a_scale * b_scale)[:, None]
    else:
        return fp4_block_dot(acc, a, a_scale, b, b_scale, SCALE_E8M0, MX, WEIGHTS_FIRST, BLOCK_N, BLOCK_K,
                             not A_ROUND_TRIP)


@triton.jit
def _k_loop(
    a_ptr, a_scale_ptr, a_rows, w_ptr, w_scale_ptr, v_ptr, v_scale_ptr, w_cols, col0, K, kb_lo, kb_hi,
    stride_am, stride_ak, stride_asm, stride_ask, stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_vn, stride_vk, stride_vsn, stride_vsk,
    GATE_UP: tl.constexpr, FORMAT: tl.constexpr, DOT_FP32: tl.constexpr, W_SCALE_E8M0: tl.constexpr,
    V_SCALE_E8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MX: tl.constexpr, WEIGHTS_FIRST: tl.constexpr, QUANT_A: tl.constexpr, FP4_WORDS: tl.constexpr,
    A_ROUND_TRIP: tl.constexpr,
):
    """(A W^T, A V^T) over K blocks [kb_lo, kb_hi) for a row tile and column tile (A V^T zero
    unless GATE_UP). QUANT_A: A holds float rows, FP8-quantised here per 1x128 block as
    ``fp8_act_quant`` would (the same :func:`fp8_quantize_tiles`, ue8m0), instead of e4m3 codes
    with their scales. A_ROUND_TRIP (FP4, activations first): A holds the bf16 values of its FP8
    quantisation (:func:`.quant.fp8_round_trip`), summed into the MMA's accumulator unscaled."""
    fp4_mx: tl.constexpr = FORMAT == 2 and MX
    weights_first: tl.constexpr = FORMAT == 2 and (fp4_mx or WEIGHTS_FIRST)  # dense, fp8: activations first
    acc_w = oriented_acc(BLOCK_M, BLOCK_N, weights_first)
    acc_v = oriented_acc(BLOCK_M, BLOCK_N, weights_first)
    for kb in range(kb_lo, kb_hi):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        if FORMAT == 0:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K, other=0.0)
            a_scale = 1.0
        elif QUANT_A:
            a, a_scale = fp8_quantize_tiles(tl.load(a_ptrs).to(tl.float32), True)
        elif A_ROUND_TRIP:
            a = tl.load(a_ptrs)
            a_scale = 1.0
        else:
            a = tl.load(a_ptrs)
            a_scale = tl.load(a_scale_ptr + a_rows * stride_asm + kb * stride_ask)
        b, b_scale = _weight_block(w_ptr, w_scale_ptr, w_cols, col0, kb, K, stride_wn, stride_wk, stride_wsn,
                                   stride_wsk, FORMAT, BLOCK_K, BLOCK_N, W_SCALE_E8M0, FP4_WORDS)
        acc_w = _accumulate(acc_w, a, a_scale, b, b_scale, FORMAT, DOT_FP32, W_SCALE_E8M0, fp4_mx, weights_first,
                            BLOCK_N, BLOCK_K, A_ROUND_TRIP)
        if GATE_UP:
            b, b_scale = _weight_block(v_ptr, v_scale_ptr, w_cols, col0, kb, K, stride_vn, stride_vk, stride_vsn,
                                       stride_vsk, FORMAT, BLOCK_K, BLOCK_N, V_SCALE_E8M0, FP4_WORDS)
            acc_v = _accumulate(acc_v, a, a_scale, b, b_scale, FORMAT, DOT_FP32, V_SCALE_E8M0, fp4_mx, weights_first,
                                BLOCK_N, BLOCK_K, A_ROUND_TRIP)
    return oriented(acc_w, weights_first), oriented(acc_v, weights_first)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, v_ptr, v_scale_ptr, out_ptr, out_scale_ptr,
    tiles_ptr, slots_ptr, weights_ptr, partial_ptr, counter_ptr,
    N, K, S, max_tiles, limit, stride_slot, stride_weight,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
    stride_ve, stride_vn, stride_vk, stride_vse, stride_vsn, stride_vsk,
    stride_om, stride_on, stride_osm, stride_osn,
    TOP_K: tl.constexpr, GATE_UP: tl.constexpr, FORMAT: tl.constexpr, CLAMP: tl.constexpr,
    QUANT_OUT: tl.constexpr, ROUND_BF16: tl.constexpr, DOT_FP32: tl.constexpr,
    W_SCALE_E8M0: tl.constexpr, V_SCALE_E8M0: tl.constexpr, MX: tl.constexpr, WEIGHTS_FIRST: tl.constexpr,
    QUANT_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    FP4_WORDS: tl.constexpr = False, IDENTITY: tl.constexpr = False, A_ROUND_TRIP: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """One (row tile, column tile, K split) of an expert's GEMM over its consecutive sorted rows.

    GATE_UP: A rows are x[slot // k]; C = h = w * silu(min(A W1^T, L)) * clamp(A W3^T, -L, L)
    (W1 = w, W3 = v), stored in C's dtype or, with QUANT_OUT, rounded to bf16 if ROUND_BF16 and
    stored as e4m3 codes + 1x128 scales. Else (down): A rows are the sorted rows, C = A W2^T.
    SPLIT_K > 1: the last of a tile's splits to arrive sums their partials (:func:`_sum_splits`)
    and runs the epilogue. FP4_WORDS: FP4 codes load as 4-byte words (:func:`_fp4_words`).
    IDENTITY (:meth:`Routing.one_expert`): one expert, row r is token r (tiles unread, slots the
    ids, weights the routing weights); rows of unrouted tokens store 0 (h, and the down GEMM's C,
    the op's output). A_ROUND_TRIP: A holds bf16 values of FP8-quantised rows (:func:`_k_loop`).
    """
    wait_for_prior_grid(PDL)
    tile = tl.program_id(0)
    if IDENTITY:
        expert = tl.full((), 0, tl.int32)
        row_lo = tile * BLOCK_M
        rows = row_lo + tl.arange(0, BLOCK_M)
        row_mask = rows < S
        routed = tl.load(slots_ptr + rows * stride_slot, mask=row_mask, other=-1) == 0
        a_rows = tl.where(row_mask, rows, row_lo).to(tl.int64)
    else:
        expert = tl.load(tiles_ptr + tile)
        if expert < 0:
            return
        row_lo = tl.load(tiles_ptr + max_tiles + tile)
        rows = row_lo + tl.arange(0, BLOCK_M)
        row_mask = rows < tl.load(tiles_ptr + 2 * max_tiles + tile)
        routed = row_mask
        if GATE_UP:
            a_rows = (tl.load(slots_ptr + rows * stride_slot, mask=row_mask, other=0) // TOP_K).to(tl.int64)
        else:
            a_rows = tl.where(row_mask, rows, row_lo).to(tl.int64)  # masked rows re-read a valid one
    col0 = tl.program_id(1) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    w_cols = (cols % N).to(tl.int64)  # columns past N re-read valid ones; the store masks them
    expert = expert.to(tl.int64)
    w_ptr += expert * stride_we
    w_scale_ptr += expert * stride_wse
    v_ptr += expert * stride_ve
    v_scale_ptr += expert * stride_vse
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_lo = tl.program_id(2) * per_split
    acc_w, acc_v = _k_loop(
        a_ptr, a_scale_ptr, a_rows, w_ptr, w_scale_ptr, v_ptr, v_scale_ptr, w_cols, col0, K,
        kb_lo, tl.minimum(kb_lo + per_split, k_blocks),
        stride_am, stride_ak, stride_asm, stride_ask, stride_wn, stride_wk, stride_wsn, stride_wsk,
        stride_vn, stride_vk, stride_vsn, stride_vsk,
        GATE_UP, FORMAT, DOT_FP32, W_SCALE_E8M0, V_SCALE_E8M0, BLOCK_M, BLOCK_N, BLOCK_K, MX, WEIGHTS_FIRST, QUANT_A,
        FP4_WORDS, A_ROUND_TRIP,
    )
    mask = row_mask[:, None] & (cols[None, :] < N)
    if SPLIT_K > 1:
        acc_w, acc_v, last = _sum_splits(
            acc_w, acc_v, partial_ptr, counter_ptr + tile * tl.num_programs(1) + tl.program_id(1),
            rows, cols, mask, N, S, GATE_UP, SPLIT_K,
        )
    else:
        last = True
    if last:
        _epilogue(acc_w, acc_v, out_ptr, out_scale_ptr, weights_ptr + rows * stride_weight, rows, row_mask, routed,
                  cols, mask, limit, stride_om, stride_on, stride_osm, stride_osn, GATE_UP, CLAMP, QUANT_OUT,
                  ROUND_BF16, IDENTITY)


@triton.jit
def _sum_splits(
    acc_w, acc_v, partial_ptr, counter, rows, cols, mask, N, S, GATE_UP: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Split-K: store this split's partial tiles to the workspace [SPLIT_K, 1 + GATE_UP, S, N]
    (S sorted rows), count the arrival; the split that arrives last sums every split's partials in
    split order (deterministic), resets the counter and returns (A W^T, A V^T, True)."""
    plane = tl.cast(S, tl.int64) * N  # S == 1 (one token's shared expert) arrives as a constexpr int
    ptrs = partial_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    planes: tl.constexpr = 1 + GATE_UP
    split = tl.program_id(2)
    tl.store(ptrs + split * planes * plane, acc_w, mask=mask)
    if GATE_UP:
        tl.store(ptrs + (split * planes + 1) * plane, acc_v, mask=mask)
    tl.debug_barrier()
    last = tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1
    total_w = tl.zeros_like(acc_w)
    total_v = tl.zeros_like(acc_v)
    if last:
        for s in tl.static_range(SPLIT_K):
            total_w += tl.load(ptrs + s * planes * plane, mask=mask, other=0.0, cache_modifier=".cg")
            if GATE_UP:
                total_v += tl.load(ptrs + (s * planes + 1) * plane, mask=mask, other=0.0, cache_modifier=".cg")
        reset_arrival_counter(counter)
    return total_w, total_v, last


@triton.jit
def _epilogue(
    acc_w, acc_v, out_ptr, out_scale_ptr, row_weights, rows, row_mask, routed, cols, mask, limit,
    stride_om, stride_on, stride_osm, stride_osn,
    GATE_UP: tl.constexpr, CLAMP: tl.constexpr, QUANT_OUT: tl.constexpr, ROUND_BF16: tl.constexpr,
    IDENTITY: tl.constexpr,
):
    """Store a tile's C: A W^T (down), or h = w * silu(min(A W^T, L)) * clamp(A V^T, -L, L) (gate-up),
    in C's dtype, or as e4m3 codes + 1x128 scales (QUANT_OUT, rounded to bf16 first if ROUND_BF16);
    ``row_weights``: pointers to the rows' routing weights; IDENTITY: 0 in the rows not ``routed``."""
    out = acc_w
    if GATE_UP:
        gate = acc_w
        up = acc_v
        if CLAMP:
            gate = tl.minimum(gate, limit)
            up = tl.clamp(up, -limit, limit)
        weight = tl.load(row_weights, mask=row_mask, other=0.0)
        out = gate / (1.0 + tl.exp(-gate)) * up * weight[:, None]
    if IDENTITY:
        out = tl.where(routed[:, None], out, 0.0)
    out_rows = rows.to(tl.int64)
    c_ptrs = out_ptr + out_rows[:, None] * stride_om + cols[None, :] * stride_on
    if QUANT_OUT:
        if ROUND_BF16:
            out = cast_rne(out, tl.bfloat16).to(tl.float32)
        q, s = fp8_quantize_tiles(out, True)
        tl.store(c_ptrs, q, mask=mask)
        tl.store(out_scale_ptr + out_rows * stride_osm + tl.program_id(1) * stride_osn, s, mask=row_mask)
    else:
        tl.store(c_ptrs, cast_rne(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_products(
    acc, a_ptr, a_scale, w_ptr, ws_ptr, w_cols, kb, stride_ak, stride_wn, stride_wk, stride_wsn, stride_wsk,
    SCALE_E8M0: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``acc`` plus the exact fp32 products of one K block: A's e4m3 codes (``a_ptr`` at the row,
    ``a_scale`` their 1x128 scale) with the FP8 codes and 128x128 block scales of BLOCK_N weight
    rows, every operand in the [BLOCK_N, BLOCK_K] layout of the sum (A's codes loaded repeated over
    the rows, from L1), so no value changes layout through shared memory."""
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + offs_k[None, :] * stride_ak + 0 * w_cols[:, None]).to(tl.float32)
    w = tl.load(w_ptr + w_cols[:, None] * stride_wn + offs_k[None, :] * stride_wk).to(tl.float32)
    scale = tl.load(ws_ptr + (w_cols // 128) * stride_wsn + kb * stride_wsk)
    if SCALE_E8M0:
        scale = decode_e8m0(scale)
    return acc + a * w * (a_scale * scale)[:, None]


@triton.jit
def _gemv_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, v_ptr, v_scale_ptr, out_ptr,
    ids_ptr, slots_ptr, weights_ptr, n_valid_ptr,
    N, K, limit,
    stride_am, stride_ak, stride_asm, stride_ask, stride_it, stride_ik,
    stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
    stride_ve, stride_vn, stride_vk, stride_vse, stride_vsn, stride_vsk,
    stride_om, stride_on,
    TOP_K: tl.constexpr, GATE_UP: tl.constexpr, CLAMP: tl.constexpr,
    W_SCALE_E8M0: tl.constexpr, V_SCALE_E8M0: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """BLOCK_N outputs of one routed (sorted) row of an expert's GEMM on the CUDA cores: decode,
    where a row tile of the tensor-core kernel holds one valid row of 16.

    ``sum_k a[k] w[n, k]`` over A's FP8 codes and the expert's FP8 weights, each product exact
    in fp32 and scaled by its blocks' powers of two (or fp32 scales), summed in fp32 per lane over
    the K blocks and across the lanes at the end. GATE_UP: A is x's row (the row's token), the
    output ``h = w * silu(min(A W1^T, L)) * clamp(A W3^T, -L, L)``; else A is h's row, the output
    ``A W2^T``; either stored in out's dtype (the caller FP8-quantises h for the down GEMV, as the
    tensor-core kernel's epilogue does). Rows past the routed count exit.
    """
    wait_for_prior_grid(PDL)
    row = tl.program_id(0)
    if row >= tl.load(n_valid_ptr):
        return
    slot = tl.load(slots_ptr + row)
    token = slot // TOP_K
    expert = tl.load(ids_ptr + token * stride_it + (slot % TOP_K) * stride_ik).to(tl.int64)
    a_row = (token if GATE_UP else row).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_cols = (cols % N).to(tl.int64)  # columns past N re-read valid ones; the store masks them
    a_ptr += a_row * stride_am
    w_ptr += expert * stride_we
    w_scale_ptr += expert * stride_wse
    v_ptr += expert * stride_ve
    v_scale_ptr += expert * stride_vse
    acc_w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        a_scale = tl.load(a_scale_ptr + a_row * stride_asm + kb * stride_ask)
        acc_w = _gemv_products(acc_w, a_ptr, a_scale, w_ptr, w_scale_ptr, w_cols, kb, stride_ak, stride_wn,
                               stride_wk, stride_wsn, stride_wsk, W_SCALE_E8M0, BLOCK_K)
        if GATE_UP:
            acc_v = _gemv_products(acc_v, a_ptr, a_scale, v_ptr, v_scale_ptr, w_cols, kb, stride_ak, stride_vn,
                                   stride_vk, stride_vsn, stride_vsk, V_SCALE_E8M0, BLOCK_K)
    out = tl.sum(acc_w, axis=1)
    if GATE_UP:
        gate = out
        up = tl.sum(acc_v, axis=1)
        if CLAMP:
            gate = tl.minimum(gate, limit)
            up = tl.clamp(up, -limit, limit)
        out = gate / (1.0 + tl.exp(-gate)) * up * tl.load(weights_ptr + row)
    out_ptrs = out_ptr + row.to(tl.int64) * stride_om + cols * stride_on
    tl.store(out_ptrs, cast_rne(out, out_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def _combine_kernel(
    y_ptr, positions_ptr, n_valid_ptr, out_ptr, D, stride_ym, stride_yd, stride_om, stride_od,
    TOP_K: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
):
    """out[t] = sum_j fp32(y[positions[t, j]]) over the token's routed rows, in expert order."""
    wait_for_prior_grid(PDL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    n_valid = tl.load(n_valid_ptr)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(positions_ptr + token * TOP_K + j)
        routed = (tl.zeros_like(cols) + row) < n_valid  # dropped slots sort past the routed rows
        y = tl.load(y_ptr + row.to(tl.int64) * stride_ym + cols * stride_yd, mask=col_mask & routed, other=0.0)
        acc += y.to(tl.float32)
    out_ptrs = out_ptr + token.to(tl.int64) * stride_om + cols * stride_od
    tl.store(out_ptrs, cast_rne(acc, out_ptr.dtype.element_ty), mask=col_mask)


def _strides(t: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * dims


def _as_kernel_scale(scale: torch.Tensor | None) -> torch.Tensor | None:
    """e8m0 scales as their bytes (the kernels decode them); fp32 unchanged."""
    return scale if scale is None or scale.dtype == torch.float32 else scale.view(torch.uint8)


def _is_e8m0(scale: torch.Tensor | None) -> bool:
    return scale is not None and scale.dtype == torch.uint8


def _grouped_gemm(
    a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor | None,
    v: torch.Tensor | None, v_scale: torch.Tensor | None, out: torch.Tensor, out_scale: torch.Tensor | None,
    routing: Routing, top_k: int, fmt: str, limit: float, round_bf16: bool, config: ExpertsConfig,
    a_round_trip: bool = False,
) -> None:
    """Launch :func:`_grouped_gemm_kernel`: gate-up when ``v`` (W3) is given, else down. FP8/FP4
    weights with ``a_scale`` None: ``a`` holds float rows, quantised in the kernel (``QUANT_A``),
    or, ``a_round_trip``, the bf16 values of their FP8 quantisation (``A_ROUND_TRIP``)."""
    n = w.shape[1]
    k = a.shape[1]
    rows = routing.slots.shape[0]
    max_tiles = routing.tiles.shape[1]
    w_scale, v_scale = _as_kernel_scale(w_scale), _as_kernel_scale(v_scale)
    gate_up = v is not None
    dot_fp32 = fmt == "dense" and torch.float32 in (a.dtype, w.dtype, (v if gate_up else w).dtype)
    mx = config.fp4_mx and fmt == "fp4" and _is_e8m0(w_scale) and (not gate_up or _is_e8m0(v_scale))
    first = weights_first(config.block_m, config.block_n, fp4=fmt == "fp4")
    col_tiles = cdiv(n, config.block_n)
    block_k = _block_k(fmt)
    split_k = config.split_k
    if split_k is None:
        split_k = 1
        if a.device.type == "cuda":
            sms = torch.cuda.get_device_properties(a.device).multi_processor_count
            split_k = decode_splits(rows, w.shape[0], config.block_m, col_tiles, cdiv(k, block_k), sms)
    split_k = max(1, min(split_k, cdiv(k, block_k)))
    if split_k > 1:  # fp32 partials of every sorted row, and one arrival counter per output tile
        partial = torch.empty((split_k, 1 + gate_up, rows, n), dtype=torch.float32, device=a.device)
        counters = arrival_counters(max_tiles * col_tiles, a.device)
    else:
        partial = counters = out  # unused
    _grouped_gemm_kernel[(max_tiles, col_tiles, split_k)](
        a, a if a_scale is None else a_scale, w, w if w_scale is None else w_scale,
        w if v is None else v, w if v_scale is None else v_scale, out, out if out_scale is None else out_scale,
        routing.tiles, routing.slots, routing.weights, partial, counters,
        n, k, rows, max_tiles, float(limit), routing.slots.stride(0), routing.weights.stride(0),
        *a.stride(), *_strides(a_scale, 2),
        *w.stride(), *_strides(w_scale, 3),
        *_strides(v, 3), *_strides(v_scale, 3),
        *out.stride(), *_strides(out_scale, 2),
        TOP_K=top_k, GATE_UP=gate_up, FORMAT=_FORMATS[fmt], CLAMP=gate_up and limit > 0,
        QUANT_OUT=out_scale is not None, ROUND_BF16=round_bf16, DOT_FP32=dot_fp32,
        QUANT_A=fmt != "dense" and a_scale is None and not a_round_trip, A_ROUND_TRIP=a_round_trip,
        W_SCALE_E8M0=_is_e8m0(w_scale), V_SCALE_E8M0=_is_e8m0(v_scale),
        MX=mx, WEIGHTS_FIRST=first, IDENTITY=routing.identity,
        FP4_WORDS=config.fp4_words and fmt == "fp4" and first and not mx and _fp4_words(w, w_scale, v, v_scale),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_options(),
        **({"maxnreg": config.max_registers} if config.max_registers else {}),
    )


def _fp4_words(w: torch.Tensor, w_scale: torch.Tensor | None, v: torch.Tensor | None,
               v_scale: torch.Tensor | None) -> bool:
    """Whether packed FP4 weights (and W3, if given) load as 4-byte words in the weights-first
    decode (:func:`._alignment.words_readable`; ~12% fewer loop instructions than a byte at a time)."""
    return all(words_readable(weight, _is_e8m0(scale)) for weight, scale in ((w, w_scale), (v, v_scale))
               if weight is not None)


def _gemv(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, v: torch.Tensor | None,
    v_scale: torch.Tensor | None, out: torch.Tensor, routing: Routing, topk_ids: torch.Tensor, limit: float,
    config: ExpertsConfig,
) -> None:
    """Launch :func:`_gemv_kernel` over the routed rows (FP8 weights): gate-up when ``v`` (W3) is
    given, else down."""
    n, k = w.shape[1], a.shape[1]
    gate_up = v is not None
    w_scale, v_scale = _as_kernel_scale(w_scale), _as_kernel_scale(v_scale)
    _gemv_kernel[(out.shape[0], cdiv(n, config.block_n))](
        a, a_scale, w, w_scale, w if v is None else v, w_scale if v_scale is None else v_scale, out,
        topk_ids, routing.slots, routing.weights, routing.n_valid,
        n, k, float(limit),
        *a.stride(), *a_scale.stride(), *topk_ids.stride(),
        *w.stride(), *w_scale.stride(), *_strides(v, 3), *_strides(v_scale, 3),
        *out.stride(),
        TOP_K=topk_ids.shape[1], GATE_UP=gate_up, CLAMP=gate_up and limit > 0,
        W_SCALE_E8M0=_is_e8m0(w_scale), V_SCALE_E8M0=_is_e8m0(v_scale), BLOCK_N=config.block_n, BLOCK_K=K_BLOCK,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_options(),
    )


def decode_splits(rows: int, n_experts: int, block_m: int, col_tiles: int, k_blocks: int, sm_count: int) -> int:
    """K splits of a grouped GEMM over ``rows`` routed rows of ``n_experts`` experts in BLOCK_M row
    tiles and ``col_tiles`` column tiles, K in ``k_blocks`` blocks: doubling while the grid holds
    under two programs per SM and each split keeps >= 4 K blocks. The grid's row tiles with work
    are at least ``max(min(E, rows), ceil(rows / BLOCK_M))`` (every slot routed; the count itself
    is on the device). Decode of one token on 132 SMs (6 experts): V4-Flash gate-up 96 programs of
    32 K blocks -> 4 splits, down 192 of 16 -> 2; from 16 tokens (about 96 experts) none. FP4
    decode is ALU-bound, so more programs decode at once. The shared expert (E = 1) splits at one
    token (16 column tiles: 8 splits) but not at a prefill's 4096 (64 row tiles of 64), where
    the bound min(E, rows) alone asked for 8 splits and [8, 2, T, I] fp32 partials at any T."""
    tiles = max(min(n_experts, rows), cdiv(rows, block_m))
    return k_splits(tiles * col_tiles, k_blocks, 2 * sm_count)


def _check_dense_dtypes(**weights: torch.Tensor) -> None:
    for name, w in weights.items():
        if w.dtype not in _DENSE_WEIGHT_DTYPES:
            raise TypeError(
                f"moe_experts (cuda.triton): dense {name} must be bfloat16 or float32, got {w.dtype}; "
                "float64 calls are served by the reference kernel"
            )


def moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w1_scale: torch.Tensor | None,
    w3: torch.Tensor,
    w3_scale: torch.Tensor | None,
    w2: torch.Tensor,
    w2_scale: torch.Tensor | None,
    swiglu_limit: float = 10.0,
    config: ExpertsConfig | None = None,
) -> torch.Tensor:
    """Weighted sum of clamped-SwiGLU experts over each token's routed experts.

    x: [T, D] bf16/fp32, topk_weights: [T, k] fp32, topk_ids: [T, k] int (-1 = none),
    w1, w3: [E, I, D], w2: [E, D, I] dense bf16/fp32, fp8 e4m3 (+ [E, ceil(rows/128), cols/128]
    scales) or packed fp4 (+ [E, rows, cols/32] scales), scales fp32 or e8m0 -> [T, D] in x's dtype.

    ``y_t = sum_k x.dtype(W2 x.dtype(w_k * silu(min(x W1^T, L)) * clamp(x W3^T, -L, L)))`` with fp32
    accumulation; FP8/FP4 GEMM inputs FP8-quantised in 1x128 ue8m0 tiles. Computes in fp32: fp64
    routing weights are rounded to fp32 (the reference computes such calls in fp64). ``config``
    overrides :func:`select_experts_config` (tuning, benchmarks, tests).

    Launches: the routing tables (:func:`route`), the gate-up and down GEMMs, the combine; one
    expert at top-1 (the model's shared expert) only the two GEMMs (:meth:`Routing.one_expert`).
    """
    fmt_up, fmt_down = expert_weight_format(w1), expert_weight_format(w2)
    if fmt_up == "dense":
        _check_dense_dtypes(w1=w1, w3=w3)
    if fmt_down == "dense":
        _check_dense_dtypes(w2=w2)
    t, d = x.shape
    top_k = topk_ids.shape[1]
    n_experts, inter = w1.shape[:2]
    out = torch.empty((t, d), dtype=x.dtype, device=x.device)
    if t == 0 or top_k == 0 or n_experts == 0:
        return out.zero_()
    rows = t * top_k
    config = config or select_experts_config(rows, max((fmt_up, fmt_down), key=_FORMATS.get), inter, d, x.device)
    if n_experts == 1 and top_k == 1 and not config.gemv:  # a shared expert: no tables, no combine
        routing = Routing.one_expert(topk_weights, topk_ids, config.block_m)
    else:
        routing = route(topk_weights, topk_ids, n_experts, config.block_m)
    y = out if routing.identity else torch.empty((rows, d), dtype=x.dtype, device=x.device)
    if config.gemv:
        if not fmt_up == fmt_down == "fp8":
            raise ValueError(f"moe_experts (cuda.triton): ExpertsConfig.gemv takes FP8 weights, got "
                             f"{fmt_up} gate-up and {fmt_down} down weights")
        h = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
        _gemv(*fp8_act_quant(x, K_BLOCK), w1, w1_scale, w3, w3_scale, h, routing, topk_ids, swiglu_limit,
              config)
        _gemv(*fp8_act_quant(h, K_BLOCK), w2, w2_scale, None, None, y, routing, topk_ids, swiglu_limit,
              config)
    else:
        _tensor_core_gemms(x, w1, w1_scale, w3, w3_scale, w2, w2_scale, y, routing, top_k, fmt_up, fmt_down,
                           swiglu_limit, config)
    if routing.identity:  # the down GEMM wrote each token's row (0 where unrouted): the sum of its one expert
        return out
    block_d = min(next_power_of_2(d), 1024)
    _combine_kernel[(t, cdiv(d, block_d))](
        y, routing.positions, routing.n_valid, out, d, *y.stride(), *out.stride(), TOP_K=top_k, BLOCK_D=block_d,
        **pdl_options(),
    )
    return out


def _tensor_core_gemms(
    x: torch.Tensor, w1: torch.Tensor, w1_scale: torch.Tensor | None, w3: torch.Tensor,
    w3_scale: torch.Tensor | None, w2: torch.Tensor, w2_scale: torch.Tensor | None, y: torch.Tensor,
    routing: Routing, top_k: int, fmt_up: str, fmt_down: str, swiglu_limit: float, config: ExpertsConfig,
) -> None:
    """The gate-up and down grouped GEMMs of :func:`moe_experts` on the tensor cores, into ``y``
    [T*k, D] (a row per sorted routed row)."""
    rows, inter = y.shape[0], w1.shape[1]
    if (fmt_up, fmt_down) != ("dense", "dense") and K_BLOCK % config.block_n:
        raise ValueError(f"moe_experts (cuda.triton): FP8/FP4 weights take column tiles dividing {K_BLOCK}, "
                         f"got ExpertsConfig.block_n={config.block_n}")
    quant_in_gemm = rows <= QUANT_IN_GEMM_MAX_ROWS if config.quant_in_gemm is None else config.quant_in_gemm
    round_trip = config.round_trip and fmt_up == fmt_down == "fp4" and not weights_first(
        config.block_m, config.block_n, fp4=True)  # x and h as the bf16 values of their FP8 quantisation
    if round_trip:
        a, a_scale = fp8_round_trip(x, K_BLOCK), None
    elif fmt_up == "dense" or quant_in_gemm:
        a, a_scale = x, None  # dense: as it is; FP8/FP4 weights: quantised in the gate-up kernel
    else:  # once, rather than once per column tile
        a, a_scale = fp8_act_quant(x, K_BLOCK)
    if fmt_down != "dense" and config.block_n == K_BLOCK and not round_trip:  # the epilogue quantises h's tiles
        h = torch.empty((rows, inter), dtype=torch.float8_e4m3fn, device=x.device)
        h_scale = torch.empty((rows, inter // K_BLOCK), dtype=torch.float32, device=x.device)
    else:
        h, h_scale = torch.empty((rows, inter), dtype=x.dtype, device=x.device), None
    round_bf16 = x.dtype == torch.bfloat16
    _grouped_gemm(a, a_scale, w1, w1_scale, w3, w3_scale, h, h_scale, routing, top_k, fmt_up, swiglu_limit,
                  round_bf16, config, a_round_trip=round_trip)
    if round_trip:
        h = fp8_round_trip(h, K_BLOCK)
    elif fmt_down != "dense" and h_scale is None and not quant_in_gemm:
        h, h_scale = fp8_act_quant(h, K_BLOCK)  # else the down kernel quantises h as it loads it
    _grouped_gemm(h, h_scale, w2, w2_scale, None, None, y, None, routing, top_k, fmt_down, swiglu_limit,
                  round_bf16, config, a_round_trip=round_trip)


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
