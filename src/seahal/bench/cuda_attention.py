"""Benchmarks of the attention path's kernels: ``sparse_attention``, ``sparse_attention_fp8``,
``indexer_topk`` and ``indexer_topk_packed``.

Decode rows (one query per sequence) at contexts 4k-1M, batch 1 and 64, with V4-Flash and V4-Pro
head counts; sparse attention also at a 4096-token CSA prefill, the indexer at 4k- and 64k-token
prefills (causal visibility), over bf16 keys and over FP4 (68-byte) and FP8 (132-byte) packed keys.
Per CSA layer (m = 4) a query attends to the 128-slot window ring
plus ``index_topk`` compressed entries; per HCA layer (m = 128) to the window and every compressed
entry. ``sparse_attention`` reads dense bf16 rows; ``sparse_attention_fp8`` reads the 584-byte FP8
records of v4_ops.md §12 (CSA decode rows, with issue #6's goal as ``goal_us``: V4-Flash at 65% of
the copy bandwidth over the unique bytes, V4-Pro at 300 TFLOP/s, transfers under ~30 MB within
bytes / bandwidth + 5 us; the bandwidth is 3.0 TB/s on an H100, 4.3 on an H200), and for a batch of 64 sequences of mixed lengths (1k-64k) in one paged pool of
records (pages of 64 rows scattered at random; the op on the pool expanded over the batch),
timed with and without the index translation ``seahal.hal.paging.paged_rows``. The peer is the
CPU reference's code on the GPU tensors: for decode the selected
rows are gathered first (FP8 records then decoded by the reference ``kv_cache_unpack``), then
attended densely; for the indexer's long prefills the reference runs over blocks of queries. The
FP8 decode rows also time the model's own call, the output rotated back by the query's position
in the attention's store, beside the unrotated launch followed by rope's kernel.

    seahal bench --backend cuda --ops sparse_attention,indexer [--quick] [--json out.json]

(``sparse_attention`` names both attention ops, ``indexer`` both indexer ops: :data:`seahal.bench.ALIASES`.)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from functools import partial

import torch

from seahal.bench.common import (
    PEAK_BF16_TFLOPS,
    peak_tbps,
    Case,
    V4_FLASH,
    ModelDims,
    Workload,
    close,
    decode_grid,
    implementation,
    measure_all,
    models,
    reference,
    workload_calls,
)
from seahal.hal.formats import INDEX_KEY_FORMATS, index_key_bytes, index_key_pack, index_key_unpack
from seahal.hal.ops.quant import kv_record_bytes
from seahal.hal.paging import paged_rows

OPS = ("sparse_attention", "indexer_topk", "sparse_attention_fp8", "indexer_topk_packed")
CSA, HCA = 4, 128
BF16_TOL = 1e-2
"""bf16 inputs and output, fp32 softmax and accumulation: the output's rounding alone is ~2^-9."""
MIN_OVERLAP = 0.99
"""Fraction of the reference's top-k the kernel must also pick: bf16 keys with fp32 sums in another
order can swap near-tied entries at the top-k boundary, nothing more."""


# -- sparse attention -----------------------------------------------------------------------------
def attention_cost(batch: int, seq: int, heads: int, dim: int, slots: int, valid: int, unique_rows: int,
                   row_bytes: int | None = None) -> tuple[int, int]:
    """FLOPs and bytes of sparse attention with K = V rows of ``dim``, bf16 q and o.

    FLOPs: ``4 * batch * heads * dim * valid`` (q.k and p.v over ``valid`` = the valid slots summed
    over one sequence's queries). Bytes: q read and o written (``2 * batch * seq * heads * dim * 2``),
    each of the ``unique_rows`` kv rows of a sequence once (``batch * unique_rows * row_bytes``:
    ``2 * dim`` for dense bf16 rows, the record size for FP8 records), the int32 indices
    (``batch * seq * slots * 4``) and the fp32 sinks (``heads * 4``).
    """
    row_bytes = 2 * dim if row_bytes is None else row_bytes
    flops = 4 * batch * heads * dim * valid
    nbytes = 4 * batch * seq * heads * dim + batch * unique_rows * row_bytes + 4 * batch * seq * slots + 4 * heads
    return flops, nbytes


FP8_GOALS = {"V4-Flash": ("bandwidth", 0.65), "V4-Pro": ("TFLOP/s", 300.0)}
"""Issue #6's goals for decode over FP8 records, per model: a fraction of the GPU's copy bandwidth
over the row's bytes, or a rate over its FLOPs."""
SMALL_TRANSFER = 30e6
LATENCY_US = 5.0
"""Issue #6: a transfer under ~30 MB may take ``bytes / bandwidth + 5 us`` (launch and latency)."""


def fp8_decode_goal_us(model: str, flops: int, nbytes: int) -> float | None:
    """The time issue #6 allows an FP8-record decode row: V4-Flash moving its bytes at 65% of the
    copy bandwidth (:func:`~seahal.bench.common.peak_tbps`: 3.0 TB/s on an H100), V4-Pro doing its
    FLOPs at 300 TFLOP/s; under :data:`SMALL_TRANSFER` bytes the latency allowance
    ``bytes / bandwidth + 5 us`` where that is longer. None for other models."""
    if model not in FP8_GOALS:
        return None
    unit, rate = FP8_GOALS[model]
    bytes_per_us = peak_tbps() * 1e6
    goal = nbytes / (rate * bytes_per_us) if unit == "bandwidth" else flops / (rate * 1e6)
    if nbytes < SMALL_TRANSFER:
        goal = max(goal, nbytes / bytes_per_us + LATENCY_US)
    return goal


def _decode_layout(dims: ModelDims, ratio: int, ctx: int) -> tuple[int, int]:
    """(slots, valid slots) of one decode query at context ``ctx``: window + top-k or all entries."""
    entries = ctx // ratio
    if ratio == CSA:
        return dims.window + dims.index_topk, dims.window + min(dims.index_topk, entries)
    return dims.window + entries, dims.window + entries


def _decode_inputs(dims: ModelDims, ratio: int, batch: int, ctx: int, device: torch.device):
    """Decode at context ``ctx``: bf16 q [B, 1, H, D], int32 indices [B, 1, slots] into a cache of
    ``window + ctx / m`` rows (the window rows, then the CSA pick or every entry; -1 pads) and fp32
    sinks [H]; returns them and the cache's row count."""
    torch.manual_seed(ctx + batch)
    entries = ctx // ratio
    slots, valid = _decode_layout(dims, ratio, ctx)
    q = torch.randn(batch, 1, dims.heads, dims.head_dim, device=device, dtype=torch.bfloat16)
    window = torch.arange(dims.window, device=device).expand(batch, -1)
    if ratio == CSA:
        picked = torch.rand(batch, entries, device=device).argsort(dim=-1)[:, : valid - dims.window] + dims.window
    else:
        picked = torch.arange(dims.window, dims.window + entries, device=device).expand(batch, -1)
    indices = torch.full((batch, 1, slots), -1, dtype=torch.int32, device=device)
    indices[:, 0, :valid] = torch.cat((window, picked), dim=-1).int()
    return q, indices, torch.randn(dims.heads, device=device), dims.window + entries


def _decode_attention(dims: ModelDims, ratio: int, batch: int, ctx: int, device: torch.device) -> Workload:
    q, indices, sink, rows = _decode_inputs(dims, ratio, batch, ctx, device)
    kv = torch.randn(batch, rows, dims.head_dim, device=device, dtype=torch.bfloat16)
    args = (q, kv, indices, sink, dims.head_dim**-0.5)
    kernel = implementation("sparse_attention", "sparse_attention", "attention", device)
    peers = {"reference, gathered": partial(_gathered_reference, *args)}
    return Workload(partial(kernel, *args), peers, close(BF16_TOL),
                    variants=_variants(args, device, "HEADS64", "HEADS64_WIDE"))


RECORD_POOL = 4096
"""Distinct records packed per FP8 row; the cache buffer repeats them at random rows."""


def _records(dims: ModelDims, batch: int, rows: int, device: torch.device) -> torch.Tensor:
    """A cache of FP8 records [B, rows, kv_record_bytes]: up to :data:`RECORD_POOL` normal bf16
    vectors packed by the reference ``kv_cache_pack``, placed at random rows (packing a 1M-token
    batch-64 cache whole would need 17 GB of bf16 first; the kernel reads only the selected rows,
    each a full record wherever it lies)."""
    kv = torch.randn(min(rows, RECORD_POOL), dims.head_dim, device=device, dtype=torch.bfloat16)
    pool = reference("kv_cache_pack", "quant")(kv, dims.rope_dim, dims.kv_tile)
    return pool[torch.randint(0, pool.shape[0], (batch, rows), device=device)]


def _decode_attention_fp8(dims: ModelDims, batch: int, ctx: int, device: torch.device) -> Workload:
    q, indices, sink, rows = _decode_inputs(dims, CSA, batch, ctx, device)
    args = (q, _records(dims, batch, rows, device), indices, sink, dims.head_dim**-0.5, dims.rope_dim, dims.kv_tile)
    peers = {"reference, gathered": partial(_gathered_reference, *args)}
    if device.type == "cuda":  # the model's call: the output rotated back by the query's position
        from seahal.backends.cuda import sparse_attention

        positions = torch.full((batch, 1), ctx, device=device)
        freqs = 10000.0 ** -(torch.arange(0, dims.rope_dim, 2, device=device).float() / dims.rope_dim)
        rotation = (positions, freqs)
        peers["output rotated back in the store (the model's call)"] = partial(
            sparse_attention.sparse_attention_fp8, *args, *rotation)
        peers["output rotated back by rope's kernel after (two launches)"] = partial(
            sparse_attention.sparse_attention_fp8_then_rope, *args, *rotation)
    return Workload(partial(_fp8_attention(device), *args), peers, close(BF16_TOL),
                    variants=_variants(args, device, "DECODE", "HEADS64", "HEADS64_WIDE", splits=True))


def _variants(args: tuple, device: torch.device, *configs: str, splits: bool = False) -> dict:
    """The cuda kernel's other launches a row times (on a GPU): under each named tiles, and if
    ``splits`` with split-K off (what flash-decoding buys at the row's grid)."""
    if device.type != "cuda":
        return {}
    variants = {f"{name} tiles": partial(_triton_attention, *args, config=name) for name in configs}
    if splits:
        variants["splits=1"] = partial(_triton_attention, *args, splits=1)
    return variants


def _triton_attention(q, kv, indices, sink, softmax_scale, rope_dim=64, tile=64, *, config: str | None = None,
                      splits: int | None = None):
    """The cuda kernel under a launch other than its own choice: the tiles named ``config`` (an
    :class:`AttentionConfig` of the module: ``"DECODE"``, ``"WIDE"``, ``"HEADS64"``, ...), ``splits``
    key splits (default: what ``attention_splits`` gives those tiles)."""
    from seahal.backends.cuda import sparse_attention as attention

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    attention.launch_sparse_attention(q, kv, indices, sink, softmax_scale, out, getattr(attention, config) if config else None,
                                      rope_dim=rope_dim, tile=tile, splits=splits)
    return out


def _fp8_attention(device: torch.device):
    """The function under test for FP8 records: ``cuda.sparse_attention.sparse_attention_fp8`` on a
    GPU; in CPU smoke mode the op's semantics by the reference (decode every record, then attend)."""
    if device.type == "cuda":
        from seahal.backends.cuda.sparse_attention import sparse_attention_fp8

        return sparse_attention_fp8
    return _unpacked_reference


def _unpacked_reference(q, records, indices, sink, softmax_scale, rope_dim, tile):
    """``sparse_attention(q, kv_cache_unpack(records), ...)`` with the reference kernels."""
    kv = reference("kv_cache_unpack", "quant")(records, q.shape[-1], rope_dim, tile).to(q.dtype)
    return reference("sparse_attention", "attention")(q, kv, indices, sink, softmax_scale)


def _gathered_reference(q, kv, indices, sink, softmax_scale, *geometry):
    """The reference on each sequence's selected rows only: gather [B, K, D] (FP8 records: gather
    the records, then decode them with the reference ``kv_cache_unpack`` at ``geometry`` = (rope_dim,
    tile)), then attend densely."""
    flat = indices[:, 0].long()
    gathered = kv[torch.arange(kv.shape[0], device=kv.device)[:, None], flat.clamp(min=0)]
    if geometry:
        gathered = reference("kv_cache_unpack", "quant")(gathered, q.shape[-1], *geometry).to(q.dtype)
    dense = torch.where(flat >= 0, torch.arange(flat.shape[1], device=kv.device), -1)[:, None]
    return reference("sparse_attention", "attention")(q, gathered, dense, sink, softmax_scale)


def _prefill_valid(seq: int, window: int, topk: int) -> int:
    """Valid slots summed over ``seq`` prefill queries: ``min(s + 1, window)`` window rows each, plus top-k."""
    return sum(min(s + 1, window) for s in range(seq)) + seq * topk


def _prefill_attention(dims: ModelDims, seq: int, device: torch.device, fp8: bool = False) -> Workload:
    """CSA prefill from an empty cache: kv = [seq raw rows | seq/4 entries]; query s sees raw rows
    (s-window, s] and top-k random entries (causality ignored: the work per query is the same).
    ``fp8``: the rows as the 584-byte FP8 records the model's cache holds (``sparse_attention_fp8``)."""
    torch.manual_seed(seq)
    entries = seq // CSA
    topk = min(dims.index_topk, entries)
    q = torch.randn(1, seq, dims.heads, dims.head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, seq + entries, dims.head_dim, device=device, dtype=torch.bfloat16)
    window = torch.arange(seq, device=device)[:, None] - torch.arange(dims.window, device=device)
    picked = torch.rand(seq, entries, device=device).argsort(dim=-1)[:, :topk] + seq
    indices = torch.cat((torch.where(window >= 0, window, -1), picked), dim=-1).int()[None]
    sink = torch.randn(dims.heads, device=device)
    if fp8:
        records = reference("kv_cache_pack", "quant")(kv, dims.rope_dim, dims.kv_tile)
        args = (q, records, indices, sink, dims.head_dim**-0.5, dims.rope_dim, dims.kv_tile)
        kernel, peers = _fp8_attention(device), {"reference, records decoded": partial(_unpacked_reference, *args)}
    else:
        args = (q, kv, indices, sink, dims.head_dim**-0.5)
        kernel = implementation("sparse_attention", "sparse_attention", "attention", device)
        peers = {"reference": partial(reference("sparse_attention", "attention"), *args)}
    return Workload(partial(kernel, *args), peers, close(BF16_TOL), variants=_variants(args, device, "HEADS64"))


def _prefill_case(dims: ModelDims, device: torch.device, record: int | None = None) -> Case:
    """The 4096-token CSA prefill row (32 tokens in CPU smoke mode) over dense bf16 rows, or over
    FP8 records of ``record`` bytes (op ``sparse_attention_fp8``)."""
    seq = 4096 if device.type == "cuda" else 32
    topk = min(dims.index_topk, seq // CSA)
    flops, nbytes = attention_cost(1, seq, dims.heads, dims.head_dim, dims.window + topk,
                                   _prefill_valid(seq, dims.window, topk), seq + seq // CSA, record)
    params = {"model": dims.name, "layer": "CSA", "batch": 1, "tokens": seq}
    if record is None:
        return Case("sparse_attention", f"{dims.name} CSA prefill S={seq}", flops, nbytes, PEAK_BF16_TFLOPS,
                    partial(_prefill_attention, dims, seq), params)
    return Case("sparse_attention_fp8", f"{dims.name} CSA prefill S={seq} fp8", flops, nbytes, PEAK_BF16_TFLOPS,
                partial(_prefill_attention, dims, seq, fp8=True), {**params, "kv": f"fp8 {record} B"})


def attention_cases(device: torch.device, quick: bool) -> list[Case]:
    cases = []
    for dims in models(device):
        for ratio, layer in ((CSA, "CSA"), (HCA, "HCA")):
            for batch, ctx in decode_grid(device, quick):
                slots, valid = _decode_layout(dims, ratio, ctx)
                flops, nbytes = attention_cost(batch, 1, dims.heads, dims.head_dim, slots, valid, valid)
                cases.append(Case("sparse_attention", f"{dims.name} {layer} decode B={batch} ctx={ctx}", flops, nbytes,
                                  PEAK_BF16_TFLOPS, partial(_decode_attention, dims, ratio, batch, ctx),
                                  {"model": dims.name, "layer": layer, "batch": batch, "context": ctx}))
        cases.append(_prefill_case(dims, device))
    return cases


def attention_fp8_cases(device: torch.device, quick: bool) -> list[Case]:
    """CSA decode over FP8 records (the layer kind whose reads the records shrink: 584 instead of
    1024 bytes a row); the bytes count each selected record once."""
    cases = []
    for dims in models(device):
        record = kv_record_bytes(dims.head_dim, dims.rope_dim, dims.kv_tile)
        for batch, ctx in decode_grid(device, quick):
            slots, valid = _decode_layout(dims, CSA, ctx)
            flops, nbytes = attention_cost(batch, 1, dims.heads, dims.head_dim, slots, valid, valid, record)
            params = {"model": dims.name, "layer": "CSA", "batch": batch, "context": ctx, "kv": f"fp8 {record} B"}
            goal = fp8_decode_goal_us(dims.name, flops, nbytes)
            if goal is not None:
                params["goal_us"] = goal
            cases.append(Case("sparse_attention_fp8", f"{dims.name} CSA decode B={batch} ctx={ctx} fp8", flops, nbytes,
                              PEAK_BF16_TFLOPS, partial(_decode_attention_fp8, dims, batch, ctx), params))
        cases.append(_prefill_case(dims, device, record))
    return cases


# -- paged decode: sequences of mixed lengths in one pool ------------------------------------------
PAGE_ROWS = 64
"""Rows per page of the paged rows' pool: FlashMLA's block size."""
PAGED_BATCH, PAGED_CONTEXTS, PAGED_SEED = 64, (1024, 65536), 6
"""The paged rows' batch: 64 sequences at contexts uniform in [1k, 64k], drawn with a fixed seed."""


def _paged_setup(device: torch.device) -> tuple[int, tuple[int, int], int]:
    """(sequences, range of their contexts, rows per page) of the paged rows: :data:`PAGED_BATCH`,
    :data:`PAGED_CONTEXTS`, :data:`PAGE_ROWS` on a GPU; 3, [8, 200], 4 in CPU smoke mode."""
    return (PAGED_BATCH, PAGED_CONTEXTS, PAGE_ROWS) if device.type == "cuda" else (3, (8, 200), 4)


def paged_contexts(device: torch.device) -> list[int]:
    """Contexts of the paged rows' sequences, drawn uniformly from their range with a fixed seed
    (the same on every machine)."""
    batch, (low, high), _ = _paged_setup(device)
    return torch.randint(low, high + 1, (batch,), generator=torch.Generator().manual_seed(PAGED_SEED)).tolist()


def paged_decode_cost(dims: ModelDims, contexts: list[int], page_rows: int, translate: bool) -> tuple[int, int]:
    """FLOPs and bytes of one CSA decode step over FP8 records for sequences at ``contexts`` (each
    >= the window) whose layer buffers ``[W ring | ctx / m entries]`` share one paged pool.

    Sequence b attends ``v_b = W + min(top-k, ctx_b / m)`` of its ``K = W + top-k`` slots, distinct
    records. FLOPs: ``4 H D sum_b v_b``. Bytes: q and o (``4 B H D``, bf16), each attended record
    once (``record_bytes * sum_b v_b``), the int32 indices (``4 B K``), the fp32 sinks (``4 H``)
    and, with ``translate`` (logical indices mapped to pool rows in the call), the int32 block
    table (``4 B max_pages``, ``max_pages = ceil((W + max_b ctx_b / m) / page_rows)``).
    """
    valid = sum(_decode_layout(dims, CSA, ctx)[1] for ctx in contexts)
    batch, slots = len(contexts), dims.window + dims.index_topk
    record = kv_record_bytes(dims.head_dim, dims.rope_dim, dims.kv_tile)
    flops = 4 * dims.heads * dims.head_dim * valid
    nbytes = 4 * batch * dims.heads * dims.head_dim + record * valid + 4 * batch * slots + 4 * dims.heads
    if translate:
        nbytes += 4 * batch * -(-(dims.window + max(contexts) // CSA) // page_rows)
    return flops, nbytes


def _paged_logical(dims: ModelDims, contexts: list[int], device: torch.device) -> torch.Tensor:
    """Each sequence's decode query's indices into its own layer buffer ``[W ring | entries]``,
    [B, 1, W + top-k] int32: the W ring slots, then ``W + j`` for top-k distinct random entries
    ``j < ctx / m``, -1 where a sequence has fewer."""
    batch = len(contexts)
    entries = torch.tensor([ctx // CSA for ctx in contexts], device=device)[:, None]
    scores = torch.rand(batch, max(contexts) // CSA, device=device)
    scores = torch.where(torch.arange(scores.shape[1], device=device) < entries, scores, -1.0)
    picked = scores.topk(min(dims.index_topk, scores.shape[1]), dim=-1).indices
    picked = torch.where(picked < entries, picked + dims.window, -1)
    pad = torch.full((batch, dims.index_topk - picked.shape[1]), -1, device=device)
    window = torch.arange(dims.window, device=device).expand(batch, -1)
    return torch.cat((window, picked, pad), dim=-1).int()[:, None]


def _paged_decode_fp8(dims: ModelDims, contexts: list[int], page_rows: int, translate: bool,
                      device: torch.device) -> Workload:
    """The sequences' layer buffers in pages scattered at random over one pool of FP8 records
    ``[1, P, 584]``; ``sparse_attention_fp8`` on the pool expanded over the batch (no copy), with
    the logical indices mapped by ``paged_rows`` in the call (``translate``) or beforehand."""
    torch.manual_seed(len(contexts))
    batch = len(contexts)
    pages = [-(-(dims.window + ctx // CSA) // page_rows) for ctx in contexts]
    order = torch.randperm(sum(pages), device=device).int()
    table = torch.full((batch, max(pages)), -1, dtype=torch.int32, device=device)
    for b, (first, n) in enumerate(zip(itertools.accumulate([0] + pages), pages)):
        table[b, :n] = order[first : first + n]
    records = _records(dims, 1, sum(pages) * page_rows, device).expand(batch, -1, -1)
    logical = _paged_logical(dims, contexts, device)
    rows = paged_rows(table, logical, page_rows)
    q = torch.randn(batch, 1, dims.heads, dims.head_dim, device=device, dtype=torch.bfloat16)
    rest = (torch.randn(dims.heads, device=device), dims.head_dim**-0.5, dims.rope_dim, dims.kv_tile)
    attention = implementation("sparse_attention_fp8", "sparse_attention", "attention", device)

    def kernel() -> torch.Tensor:
        return attention(q, records, paged_rows(table, logical, page_rows) if translate else rows, *rest)

    return Workload(kernel, {"reference, gathered": partial(_gathered_reference, q, records, rows, *rest)},
                    close(BF16_TOL))


def paged_fp8_cases(device: torch.device, quick: bool) -> list[Case]:
    """CSA decode over FP8 records for :func:`paged_contexts`' batch of mixed lengths in one paged
    pool, with issue #6's goal as the other FP8 decode rows: timed with the index translation
    ``paged_rows`` (``paged fp8``: logical indices and the block table in, what a caller holding
    the indexer's picks runs) and without it (``pool rows``: the kernel alone; the difference is
    the translation's cost)."""
    contexts = paged_contexts(device)
    _, (low, high), page_rows = _paged_setup(device)
    cases = []
    for dims in models(device):
        record = kv_record_bytes(dims.head_dim, dims.rope_dim, dims.kv_tile)
        for translate in (True, False):
            flops, nbytes = paged_decode_cost(dims, contexts, page_rows, translate)
            params = {"model": dims.name, "layer": "CSA", "batch": len(contexts),
                      "contexts": f"uniform {low}..{high}, seed {PAGED_SEED}", "page_rows": page_rows,
                      "indices": "logical + block table" if translate else "pool rows", "kv": f"fp8 {record} B"}
            goal = fp8_decode_goal_us(dims.name, flops, nbytes)
            if goal is not None:
                params["goal_us"] = goal
            shape = f"{dims.name} CSA decode B={len(contexts)} ctx={low}..{high} paged fp8"
            shape += "" if translate else ", pool rows"
            cases.append(Case("sparse_attention_fp8", shape, flops, nbytes, PEAK_BF16_TFLOPS,
                              partial(_paged_decode_fp8, dims, contexts, page_rows, translate), params))
    return cases


# -- indexer --------------------------------------------------------------------------------------
def indexer_cost(batch: int, seq: int, heads: int, dim: int, entries: int, topk: int,
                 pairs: int | None = None, key_format: str | None = None) -> tuple[int, int]:
    """FLOPs and bytes of the lightning indexer over ``entries`` keys, bf16 or packed in
    ``key_format``, of which a sequence's queries see ``pairs`` (query, entry) pairs in all
    (default ``seq * entries``: decode).

    FLOPs: ``2 * batch * pairs * heads * (dim + 1)`` (q.k per head, then the weighted head sum).
    Bytes: the keys (``batch * entries * key_bytes``: ``dim * 2`` in bf16, ``index_key_bytes(dim,
    key_format)`` packed: 68 for fp4 and 132 for fp8 at dim 128), bf16 q (``batch * seq * heads *
    dim * 2``), fp32 head weights (``batch * seq * heads * 4``) and the int32 indices written
    (``batch * seq * topk * 4``).
    """
    pairs = seq * entries if pairs is None else pairs
    key_bytes = 2 * dim if key_format is None else index_key_bytes(dim, key_format)
    flops = 2 * batch * pairs * heads * (dim + 1)
    nbytes = batch * entries * key_bytes + 2 * batch * seq * heads * dim + 4 * batch * seq * heads + 4 * batch * seq * topk
    return flops, nbytes


def _overlap(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    """Checker: 1 - the fraction of the reference's picks (-1 included) the kernel also picked."""
    ours, theirs = out.flatten(0, -2).sort(dim=-1).values, ref.flatten(0, -2).sort(dim=-1).values
    position = torch.searchsorted(theirs, ours).clamp(max=theirs.shape[-1] - 1)
    found = float((theirs.gather(-1, position) == ours).double().mean())
    return 1 - found, found >= MIN_OVERLAP


def _indexer_kernel(key_format: str | None, device: torch.device) -> Callable:
    """The indexer under test with the dense op's arguments ``(q, weights, keys, ratio, start_pos,
    topk)``: ``indexer_topk``, or ``indexer_topk_packed`` with ``key_format`` bound."""
    if key_format is None:
        return implementation("indexer_topk", "indexer", "indexer", device)
    packed = implementation("indexer_topk_packed", "indexer", "indexer", device)
    return lambda q, weights, keys, *rest: packed(q, weights, keys, key_format, *rest)


def _indexer_peer(key_format: str | None, reference_indexer: Callable) -> Callable:
    """The reference semantics with the dense op's arguments: packed keys decoded to q's dtype by
    the reference codec first (part of the peer's time), then ``reference_indexer``."""
    if key_format is None:
        return reference_indexer
    return lambda q, weights, keys, *rest: reference_indexer(
        q, weights, index_key_unpack(keys, q.shape[-1], key_format, q.dtype), *rest
    )


def _index_keys(batch: int, entries: int, dims: ModelDims, key_format: str | None, device: torch.device) -> torch.Tensor:
    """Random indexer keys [batch, entries, d]: bf16, or packed in ``key_format``."""
    keys = torch.randn(batch, entries, dims.index_dim, device=device, dtype=torch.bfloat16)
    return keys if key_format is None else index_key_pack(keys, key_format)


INDEXER_VARIANTS = {
    "block_n=32": {"block_n": 32},
    "block_n=128": {"block_n": 128},
    "8 warps": {"num_warps": 8},
    "1 program/SM": {"programs_per_sm": 1},
    "2 programs/SM": {"programs_per_sm": 2},
    "4 programs/SM": {"programs_per_sm": 4},
    "chunks of 32 x topk": {"chunk_topks": 32},
}
"""Launches of the cuda indexer a V4-Flash decode row at batch >= 64 and context >= 64k also times
(``indexer.indexer_config``'s keyword arguments): the rows issue #6's 70%-of-bandwidth goal is
about (V4-Pro's indexer differs only in its top-k); one of the programs-per-SM rows repeats the
default of the row's key format (``indexer.PROGRAMS_PER_SM``)."""


def _decode_indexer(dims: ModelDims, batch: int, ctx: int, key_format: str | None, device: torch.device) -> Workload:
    torch.manual_seed(ctx + batch)
    q = torch.randn(batch, 1, dims.index_heads, dims.index_dim, device=device, dtype=torch.bfloat16)
    weights = torch.randn(batch, 1, dims.index_heads, device=device) * dims.index_heads**-0.5
    args = (q, weights, _index_keys(batch, ctx // CSA, dims, key_format, device), CSA, ctx - 1, dims.index_topk)
    peer = _indexer_peer(key_format, reference("indexer_topk", "indexer"))
    variants = {}
    if device.type == "cuda" and dims is V4_FLASH and batch >= 64 and ctx >= 65536:
        from seahal.backends.cuda.indexer import launch_indexer

        variants = {name: partial(launch_indexer, *args[:3], key_format or "dense", *args[3:], **launch)
                    for name, launch in INDEXER_VARIANTS.items()}
    return Workload(partial(_indexer_kernel(key_format, device), *args), {"reference": partial(peer, *args)}, _overlap,
                    variants=variants)


def causal_pairs(seq: int, ratio: int) -> int:
    """(query, entry) pairs a prefill of ``seq`` tokens from position 0 scores: query t sees
    ``floor((t + 1) / m)`` entries, and with ``S = q m + r``, ``sum_{u=1..S} floor(u / m) =
    m q (q - 1) / 2 + q (r + 1)``."""
    q, r = divmod(seq, ratio)
    return ratio * q * (q - 1) // 2 + q * (r + 1)


REFERENCE_SCORES = 1 << 28
"""fp32 scores the reference indexer peer holds at once (1 GiB): the reference forms every
(query, head, entry) logit, 275 GB at a 64k-token prefill, so the peer feeds it blocks of queries."""


def _reference_in_query_blocks(q, weights, keys, ratio, start_pos, topk):
    """The reference indexer over blocks of queries, each at its own positions: the same
    selection as one call (every query's row depends only on its position), bounded memory."""
    step = max(1, REFERENCE_SCORES // (q.shape[2] * max(keys.shape[1], 1)))
    indexer = reference("indexer_topk", "indexer")
    blocks = [indexer(q[:, s : s + step], weights[:, s : s + step], keys, ratio, start_pos + s, topk)
              for s in range(0, q.shape[1], step)]
    return torch.cat(blocks, dim=1)


def _prefill_indexer(dims: ModelDims, seq: int, key_format: str | None, device: torch.device) -> Workload:
    """A CSA prefill of ``seq`` tokens from position 0: its ``seq / 4`` entries' keys, every query
    seeing the entries its position completed."""
    torch.manual_seed(seq)
    q = torch.randn(1, seq, dims.index_heads, dims.index_dim, device=device, dtype=torch.bfloat16)
    weights = torch.randn(1, seq, dims.index_heads, device=device) * dims.index_heads**-0.5
    args = (q, weights, _index_keys(1, seq // CSA, dims, key_format, device), CSA, 0, dims.index_topk)
    peer = _indexer_peer(key_format, _reference_in_query_blocks)
    return Workload(partial(_indexer_kernel(key_format, device), *args), {"reference, query blocks": partial(peer, *args)},
                    _overlap)


def prefill_lengths(device: torch.device, quick: bool) -> tuple[int, ...]:
    """Token counts of the indexer's prefill rows: 4k and 64k on a GPU (4k when quick), 64 on CPU."""
    if device.type != "cuda":
        return (64,)
    return (4096,) if quick else (4096, 65536)


def indexer_cases(device: torch.device, quick: bool, key_format: str | None = None) -> list[Case]:
    """Decode and prefill rows of ``indexer_topk`` (bf16 keys) or, with ``key_format``, of
    ``indexer_topk_packed`` over keys packed in that format (the shape names it)."""
    op = "indexer_topk" if key_format is None else "indexer_topk_packed"
    keys = "" if key_format is None else f" {key_format} keys"
    # Packed keys matter where the keys dominate the bytes (decode); their prefill rows stop at the
    # shortest length, as the 64k ones (~10-15 s each with the peer) would triple the step's time.
    prefills = prefill_lengths(device, quick)[: None if key_format is None else 1]
    cases = []
    for dims in models(device):
        for batch, ctx in decode_grid(device, quick):
            flops, nbytes = indexer_cost(batch, 1, dims.index_heads, dims.index_dim, ctx // CSA, dims.index_topk,
                                         key_format=key_format)
            cases.append(Case(op, f"{dims.name} decode B={batch} ctx={ctx}{keys}", flops, nbytes, PEAK_BF16_TFLOPS,
                              partial(_decode_indexer, dims, batch, ctx, key_format),
                              {"model": dims.name, "batch": batch, "context": ctx, "key_format": key_format}))
        for seq in prefills:
            flops, nbytes = indexer_cost(1, seq, dims.index_heads, dims.index_dim, seq // CSA, dims.index_topk,
                                         causal_pairs(seq, CSA), key_format)
            cases.append(Case(op, f"{dims.name} prefill S={seq}{keys}", flops, nbytes, PEAK_BF16_TFLOPS,
                              partial(_prefill_indexer, dims, seq, key_format),
                              {"model": dims.name, "batch": 1, "tokens": seq, "key_format": key_format}))
    return cases


def packed_indexer_cases(device: torch.device, quick: bool) -> list[Case]:
    """:func:`indexer_cases` for every packed key format (fp4: 68 bytes a key, fp8: 132)."""
    return [case for fmt in INDEX_KEY_FORMATS for case in indexer_cases(device, quick, fmt)]


CASES: dict[str, Callable[[torch.device, bool], list[Case]]] = {
    "sparse_attention": attention_cases,
    "indexer_topk": indexer_cases,
    "sparse_attention_fp8": lambda device, quick: attention_fp8_cases(device, quick) + paged_fp8_cases(device, quick),
    "indexer_topk_packed": packed_indexer_cases,
}
"""op -> its rows' cases (device, quick)."""


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """Rows of ``ops`` (a subset of :data:`OPS`) in the common schema."""
    return [row for op in ops for row in measure_all(CASES[op](device, quick), device, quick)]


def calls(ops: list[str], device: torch.device, quick: bool) -> Iterator[Callable[[], object]]:
    """Every kernel call of the rows of ``ops``, unchecked and untimed (:func:`.common.workload_calls`)."""
    for op in ops:
        yield from workload_calls(CASES[op](device, quick), device)
