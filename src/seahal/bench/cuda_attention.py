"""Benchmarks of the attention path's kernels: ``sparse_attention`` and ``indexer_topk``.

Decode rows (one query per sequence) at contexts 4k-1M, batch 1 and 64, with V4-Flash and V4-Pro
head counts; sparse attention also at a 4096-token CSA prefill. Per CSA layer (m = 4) a query
attends to the 128-slot window ring plus ``index_topk`` compressed entries; per HCA layer (m = 128)
to the window and every compressed entry. The cache is dense bf16 rows (the kernel does not read
the FP8 584-byte layout yet). The peer is the CPU reference's code on the GPU tensors: for decode
the selected rows are gathered first, then attended densely.

    seahal bench --backend cuda --ops sparse_attention,indexer_topk [--quick] [--json out.json]
"""

from __future__ import annotations

from functools import partial

import torch

from seahal.bench.common import (
    PEAK_BF16_TFLOPS,
    Case,
    ModelDims,
    Workload,
    close,
    decode_grid,
    implementation,
    measure_all,
    models,
    reference,
)

OPS = ("sparse_attention", "indexer_topk")
CSA, HCA = 4, 128
BF16_TOL = 1e-2
"""bf16 inputs and output, fp32 softmax and accumulation: the output's rounding alone is ~2^-9."""
MIN_OVERLAP = 0.99
"""Fraction of the reference's top-k the kernel must also pick: bf16 keys with fp32 sums in another
order can swap near-tied entries at the top-k boundary, nothing more."""


# -- sparse attention -----------------------------------------------------------------------------
def attention_cost(batch: int, seq: int, heads: int, dim: int, slots: int, valid: int, unique_rows: int) -> tuple[int, int]:
    """FLOPs and bytes of sparse attention with K = V rows of ``dim`` bf16.

    FLOPs: ``4 * batch * heads * dim * valid`` (q.k and p.v over ``valid`` = the valid slots summed
    over one sequence's queries). Bytes: q read and o written (``2 * batch * seq * heads * dim * 2``),
    each of the ``unique_rows`` kv rows of a sequence once (``batch * unique_rows * dim * 2``), the
    int32 indices (``batch * seq * slots * 4``) and the fp32 sinks (``heads * 4``).
    """
    flops = 4 * batch * heads * dim * valid
    nbytes = 4 * batch * seq * heads * dim + 2 * batch * unique_rows * dim + 4 * batch * seq * slots + 4 * heads
    return flops, nbytes


def _decode_layout(dims: ModelDims, ratio: int, ctx: int) -> tuple[int, int]:
    """(slots, valid slots) of one decode query at context ``ctx``: window + top-k or all entries."""
    entries = ctx // ratio
    if ratio == CSA:
        return dims.window + dims.index_topk, dims.window + min(dims.index_topk, entries)
    return dims.window + entries, dims.window + entries


def _decode_attention(dims: ModelDims, ratio: int, batch: int, ctx: int, device: torch.device) -> Workload:
    torch.manual_seed(ctx + batch)
    entries = ctx // ratio
    slots, valid = _decode_layout(dims, ratio, ctx)
    q = torch.randn(batch, 1, dims.heads, dims.head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(batch, dims.window + entries, dims.head_dim, device=device, dtype=torch.bfloat16)
    window = torch.arange(dims.window, device=device).expand(batch, -1)
    if ratio == CSA:
        picked = torch.rand(batch, entries, device=device).argsort(dim=-1)[:, : valid - dims.window] + dims.window
    else:
        picked = torch.arange(dims.window, dims.window + entries, device=device).expand(batch, -1)
    indices = torch.full((batch, 1, slots), -1, dtype=torch.int32, device=device)
    indices[:, 0, :valid] = torch.cat((window, picked), dim=-1).int()
    sink = torch.randn(dims.heads, device=device)
    args = (q, kv, indices, sink, dims.head_dim**-0.5)
    kernel = implementation("sparse_attention", "sparse_attention", "attention", device)
    return Workload(partial(kernel, *args), {"reference, gathered": partial(_gathered_reference, *args)}, close(BF16_TOL))


def _gathered_reference(q, kv, indices, sink, softmax_scale):
    """The reference on each sequence's selected rows only: gather [B, K, D], then attend densely."""
    flat = indices[:, 0].long()
    gathered = kv[torch.arange(kv.shape[0], device=kv.device)[:, None], flat.clamp(min=0)]
    dense = torch.where(flat >= 0, torch.arange(flat.shape[1], device=kv.device), -1)[:, None]
    return reference("sparse_attention", "attention")(q, gathered, dense, sink, softmax_scale)


def _prefill_valid(seq: int, window: int, topk: int) -> int:
    """Valid slots summed over ``seq`` prefill queries: ``min(s + 1, window)`` window rows each, plus top-k."""
    return sum(min(s + 1, window) for s in range(seq)) + seq * topk


def _prefill_attention(dims: ModelDims, seq: int, device: torch.device) -> Workload:
    """CSA prefill from an empty cache: kv = [seq raw rows | seq/4 entries]; query s sees raw rows
    (s-window, s] and top-k random entries (causality ignored: the work per query is the same)."""
    torch.manual_seed(seq)
    entries = seq // CSA
    topk = min(dims.index_topk, entries)
    q = torch.randn(1, seq, dims.heads, dims.head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, seq + entries, dims.head_dim, device=device, dtype=torch.bfloat16)
    window = torch.arange(seq, device=device)[:, None] - torch.arange(dims.window, device=device)
    picked = torch.rand(seq, entries, device=device).argsort(dim=-1)[:, :topk] + seq
    indices = torch.cat((torch.where(window >= 0, window, -1), picked), dim=-1).int()[None]
    args = (q, kv, indices, torch.randn(dims.heads, device=device), dims.head_dim**-0.5)
    kernel = implementation("sparse_attention", "sparse_attention", "attention", device)
    return Workload(partial(kernel, *args), {"reference": partial(reference("sparse_attention", "attention"), *args)},
                    close(BF16_TOL))


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
        seq = 4096 if device.type == "cuda" else 32
        topk = min(dims.index_topk, seq // CSA)
        flops, nbytes = attention_cost(1, seq, dims.heads, dims.head_dim, dims.window + topk,
                                       _prefill_valid(seq, dims.window, topk), seq + seq // CSA)
        cases.append(Case("sparse_attention", f"{dims.name} CSA prefill S={seq}", flops, nbytes, PEAK_BF16_TFLOPS,
                          partial(_prefill_attention, dims, seq), {"model": dims.name, "layer": "CSA", "batch": 1, "tokens": seq}))
    return cases


# -- indexer --------------------------------------------------------------------------------------
def indexer_cost(batch: int, seq: int, heads: int, dim: int, entries: int, topk: int) -> tuple[int, int]:
    """FLOPs and bytes of the lightning indexer with bf16 keys, every query seeing ``entries`` keys.

    FLOPs: ``2 * batch * seq * heads * entries * (dim + 1)`` (q.k per head, then the weighted head
    sum). Bytes: the keys (``batch * entries * dim * 2``), bf16 q (``batch * seq * heads * dim * 2``),
    fp32 head weights (``batch * seq * heads * 4``) and the int32 indices written (``batch * seq * topk * 4``).
    """
    flops = 2 * batch * seq * heads * entries * (dim + 1)
    nbytes = 2 * batch * entries * dim + 2 * batch * seq * heads * dim + 4 * batch * seq * heads + 4 * batch * seq * topk
    return flops, nbytes


def _overlap(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    """Checker: 1 - the fraction of the reference's picks (-1 included) the kernel also picked."""
    ours, theirs = out.flatten(0, -2).sort(dim=-1).values, ref.flatten(0, -2).sort(dim=-1).values
    position = torch.searchsorted(theirs, ours).clamp(max=theirs.shape[-1] - 1)
    found = float((theirs.gather(-1, position) == ours).double().mean())
    return 1 - found, found >= MIN_OVERLAP


def _decode_indexer(dims: ModelDims, batch: int, ctx: int, device: torch.device) -> Workload:
    torch.manual_seed(ctx + batch)
    q = torch.randn(batch, 1, dims.index_heads, dims.index_dim, device=device, dtype=torch.bfloat16)
    weights = torch.randn(batch, 1, dims.index_heads, device=device) * dims.index_heads**-0.5
    keys = torch.randn(batch, ctx // CSA, dims.index_dim, device=device, dtype=torch.bfloat16)
    args = (q, weights, keys, CSA, ctx - 1, dims.index_topk)
    kernel = implementation("indexer_topk", "indexer", "indexer", device)
    return Workload(partial(kernel, *args), {"reference": partial(reference("indexer_topk", "indexer"), *args)}, _overlap)


def indexer_cases(device: torch.device, quick: bool) -> list[Case]:
    cases = []
    for dims in models(device):
        for batch, ctx in decode_grid(device, quick):
            flops, nbytes = indexer_cost(batch, 1, dims.index_heads, dims.index_dim, ctx // CSA, dims.index_topk)
            cases.append(Case("indexer_topk", f"{dims.name} decode B={batch} ctx={ctx}", flops, nbytes, PEAK_BF16_TFLOPS,
                              partial(_decode_indexer, dims, batch, ctx), {"model": dims.name, "batch": batch, "context": ctx}))
    return cases


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """Rows of ``ops`` (a subset of :data:`OPS`) in the common schema."""
    cases = {"sparse_attention": attention_cases, "indexer_topk": indexer_cases}
    return [row for op in ops for row in measure_all(cases[op](device, quick), device, quick)]
