"""Sparse attention decode over a paged cache: sequences of different lengths in one shared pool (issue #6).

A batch of sequences keeps its cache rows in pages scattered over one pool ``[1, P, row]``; the
pool expanded over the batch (batch stride 0) and indices mapped by ``seahal.hal.paging.paged_rows``
are the ops' ordinary arguments. Held here: ``paged_rows`` against hand-worked numbers; the ops
(dense rows and FP8 records) on the pool against the same op on each sequence's own contiguous
cache, bit for bit, for the CPU reference, the onnxruntime backend and the cuda Triton kernels
under the interpreter; one case against a float64 brute force; and that no backend copies the pool
per sequence (a batch whose copies would need hundreds of GB).

The decode layout is V4's (v4_ops.md §9): the window ring of W = 128 raw tokens (slot p mod W),
then CSA's top-k of the compressed entries (m = 4; entry j in row W + j), -1 where a short
sequence has fewer. Free pages and page tails hold NaN (dense) or 0xFF bytes (records: NaN as an
e4m3 code and as an e8m0 scale), and page 0 of the pool is always free: a kernel that reads a row
it was not given, row 0 for an empty slot included, turns the output into NaN.
"""

from __future__ import annotations

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference.attention import sparse_attention, sparse_attention_fp8
from seahal.backends.cpu.reference.quant import kv_cache_pack, kv_cache_unpack
from seahal.hal.ops.quant import kv_record_bytes
from seahal.hal.paging import paged_rows
from seahal.testing import triton_interpreter
from seahal.testing.triton_interpreter import require_triton

from cuda_marks import IN_INTERPRETER, interpreted  # noqa: E402

host = pytest.mark.skipif(IN_INTERPRETER, reason="checked by the parent run")

WINDOW, RATIO, TOPK, PAGE = 128, 4, 48, 16
LENGTHS = (5, 130, 1000)
"""Tokens of each sequence at decode: 5 (123 empty window slots, 1 entry: 47 empty top-k slots),
130 (a wrapped ring, 32 entries < top-k), 1000 (250 entries). Layer rows: 129, 160, 378 (9, 10 and
24 pages of 16)."""
SPARE_PAGES = 13
POISON = {torch.uint8: 0xFF, torch.float32: float("nan"), torch.bfloat16: float("nan"), torch.float64: float("nan")}


# -- paged_rows ----------------------------------------------------------------------------------
@host
def test_paged_rows_by_hand():
    # Sequence 0's pages are pool pages 5, 2 (its third not mapped); sequence 1's 0, 7, 3 (page
    # size 4). Rows on no mapped page (8: the unmapped third page; 12: past the table) give -1.
    table = torch.tensor([[5, 2, -1], [0, 7, 3]], dtype=torch.int32)
    logical = torch.tensor([[[0, 3, 4, 7, -1, 8]], [[1, 5, 8, 11, -1, 12]]])
    want = torch.tensor([[[20, 23, 8, 11, -1, -1]], [[1, 29, 12, 15, -1, -1]]], dtype=torch.int32)
    got = paged_rows(table, logical, 4)
    assert got.dtype == torch.int32 and torch.equal(got, want)


@host
def test_paged_rows_matches_a_loop_and_needs_no_host_sync():
    gen = torch.Generator().manual_seed(0)
    table = torch.randperm(24, generator=gen).view(3, 8).long()
    table[1, 6:] = -1  # sequence 1 maps 6 pages
    logical = torch.randint(0, 9 * 5, (3, 2, 9), generator=gen, dtype=torch.int32)  # some past the table
    logical[:, 0, ::4] = -1
    got = paged_rows(table, logical, 5)
    for (b, s, k), r in zip(torch.cartesian_prod(*map(torch.arange, logical.shape)).tolist(), logical.flatten().tolist()):
        mapped = 0 <= r < 8 * 5 and table[b, r // 5] >= 0
        assert got[b, s, k] == (int(table[b, r // 5]) * 5 + r % 5 if mapped else -1)
    meta = paged_rows(torch.empty(3, 8, dtype=torch.int32, device="meta"),
                      torch.empty(3, 2, 9, dtype=torch.int64, device="meta"), 64)  # .item() etc. raise on meta
    assert meta.shape == (3, 2, 9) and meta.dtype == torch.int32


@host
def test_paged_rows_names_the_argument():
    table, logical = torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 1, 5, dtype=torch.int32)
    bad_calls = {
        "paged_rows: logical must be [B=2, S, K] int32 or int64 (with B=2 from an earlier argument), got "
        "[3, 1, 5] int32 on cpu": (table, torch.zeros(3, 1, 5, dtype=torch.int32), 16),
        "paged_rows: block_table must be [B, max_pages] int32 or int64, got [2, 4] float32 on cpu":
            (table.float(), logical, 16),
        "paged_rows: block_table must map at least one page, got [2, 0]": (table[:, :0], logical, 16),
        "paged_rows: page_size must be a positive int, got 0": (table, logical, 0),
    }
    for message, args in bad_calls.items():
        with pytest.raises(hal.SpecError) as err:
            paged_rows(*args)
        assert str(err.value) == message


# -- a batch of sequences in one pool --------------------------------------------------------------
def _decode_indices(lengths: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Logical indices [B, 1, W + top-k] int32 of each sequence's decode query (token t = L - 1, in
    its ring slot): ring slots of tokens t-W+1..t (>= 0), then W + j for top-k random entries j <
    L // m, -1 where there are fewer."""
    rows = []
    for length in lengths:
        t = length - 1
        window = [p % WINDOW if p >= 0 else -1 for p in range(t, t - WINDOW, -1)]
        entries = length // RATIO
        picked = (torch.randperm(entries, generator=gen)[:TOPK] + WINDOW).tolist()
        rows.append(window + picked + [-1] * (TOPK - len(picked)))
    return torch.tensor(rows, dtype=torch.int32)[:, None]


def _caches(lengths: tuple[int, ...], width: int, dtype: torch.dtype, gen: torch.Generator,
            geometry: tuple[int, ...]) -> list[torch.Tensor]:
    """Each sequence's own layer buffer [1, W + L // m, row]: normal vectors of ``width`` in dtype,
    or packed as FP8 records of ``geometry`` = (rope_dim, tile) when given."""
    caches = []
    for length in lengths:
        kv = torch.randn(1, WINDOW + length // RATIO, width, generator=gen)
        caches.append(kv_cache_pack(kv, *geometry) if geometry else kv.to(dtype))
    return caches


def _pool(caches: list[torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches' pages scattered over one pool: (pool [1, pages * PAGE, row], block table [B,
    max_pages] int32, -1 past a sequence's pages). Pool page 0 and SPARE_PAGES others stay free;
    free pages and page tails hold :data:`POISON`. Rows are placed page by page, by the definition
    of a block table, independently of ``paged_rows``."""
    pages = [-(-c.shape[1] // PAGE) for c in caches]
    order = 1 + torch.randperm(sum(pages) + SPARE_PAGES, generator=gen)
    row = caches[0].shape[-1]
    pool = torch.full((1 + len(order), PAGE, row), POISON[caches[0].dtype], dtype=caches[0].dtype)
    table = torch.full((len(caches), max(pages)), -1, dtype=torch.int32)
    first = 0
    for b, (cache, n) in enumerate(zip(caches, pages)):
        table[b, :n] = order[first : first + n]
        first += n
        for i in range(n):
            rows = cache[0, i * PAGE : (i + 1) * PAGE]
            pool[table[b, i], : rows.shape[0]] = rows
    return pool.view(1, -1, row), table


def _batch(dtype: torch.dtype, d: int, geometry: tuple[int, ...], seed: int, heads: int = 4):
    """q [B, 1, H, D], the per-sequence caches, their pool and block table, logical indices, sinks."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(len(LENGTHS), 1, heads, d, generator=gen) * 0.5).to(dtype)
    caches = _caches(LENGTHS, d, dtype, gen, geometry)
    pool, table = _pool(caches, gen)
    return q, caches, pool, table, _decode_indices(LENGTHS, gen), torch.randn(heads, generator=gen)


def _per_sequence(attend, q, caches, logical, sink, *extra) -> torch.Tensor:
    """The op on each sequence alone, over its own contiguous cache and logical indices."""
    return torch.cat([attend(q[b : b + 1], cache, logical[b : b + 1], sink, *extra) for b, cache in enumerate(caches)])


def _pooled(attend, q, pool, table, logical, sink, *extra) -> torch.Tensor:
    """The op once for the batch, over the pool expanded over it (no copy) and pool-row indices."""
    expanded = pool.expand(q.shape[0], -1, -1)
    assert expanded.stride(0) == 0
    return attend(q, expanded, paged_rows(table, logical, PAGE), sink, *extra)


FORMS = {
    "dense bf16": ("sparse_attention", torch.bfloat16, 64, ()),
    "dense fp32": ("sparse_attention", torch.float32, 64, ()),
    "fp8 records, V4's 584 B": ("sparse_attention_fp8", torch.bfloat16, 512, (64, 64)),
}
"""Op, q's dtype, head dim, record geometry (rope_dim, tile) of each form of the keys."""


@host
@pytest.mark.parametrize("backend", ["cpu", "onnxruntime"])
@pytest.mark.parametrize("form", FORMS)
def test_pool_equals_per_sequence_caches_bit_for_bit(backend, form):
    op, dtype, d, geometry = FORMS[form]
    environ = {} if backend == "cpu" else {"SEAHAL_OPS": f"{op}={backend}"}
    plan = hal.plan("cpu", ops=[op], announce=False, environ=environ)
    assert plan.entries[op].label == ("cpu.reference" if backend == "cpu" else "onnxruntime.function")
    attend = plan[op]
    q, caches, pool, table, logical, sink = _batch(dtype, d, geometry, seed=len(form))
    extra = (d**-0.5, *geometry)
    want = _per_sequence(attend, q, caches, logical, sink, *extra)
    got = _pooled(attend, q, pool, table, logical, sink, *extra)
    assert torch.isfinite(want).all() and want.abs().amax() > 0
    assert torch.equal(got, want)


@host
def test_pool_against_float64_brute_force():
    """fp64 q and rows: per query, a softmax over its valid logits and the sink, the valid rows of
    its own cache weighted by it (independent of the pool, the gather and the reference)."""
    q, caches, pool, table, logical, sink = _batch(torch.float64, 64, (), seed=7)
    got = _pooled(sparse_attention, q, pool, table, logical, sink, 0.125)
    for b, cache in enumerate(caches):
        slots = logical[b, 0]
        rows = cache[0, slots[slots >= 0].long()]
        weights = torch.softmax(torch.cat((q[b, 0] @ rows.T * 0.125, sink.double()[:, None]), dim=1), dim=1)
        # fp64 sums of <= 176 terms in another order: ~1e-15 relative
        torch.testing.assert_close(got[b, 0], weights[:, :-1] @ rows, rtol=1e-12, atol=1e-13)


NO_COPY_BATCH = 1 << 16
"""Sequences sharing one 2^16-row pool: a copy of the pool per sequence would be 2^16 x 8 MB =
512 GiB of fp32 rows or 2^16 x 3.5 MiB = 224 GiB of 56-byte records, beyond this machine's memory
(an allocation that large fails at once): the call can only succeed without one."""


@host
@pytest.mark.parametrize("backend", ["cpu", "onnxruntime"])
@pytest.mark.parametrize("records", [False, True], ids=["dense", "fp8"])
def test_pool_shared_by_a_huge_batch_is_not_copied(backend, records):
    gen = torch.Generator().manual_seed(11)
    rows, d, geometry = 1 << 16, 32, (16, 16) if records else ()
    pool = torch.randn(1, rows, d, generator=gen)
    if records:
        pool = kv_cache_pack(pool, *geometry)
        assert pool.shape[-1] == kv_record_bytes(d, *geometry) == 56
    op, extra = "sparse_attention_fp8" if records else "sparse_attention", (d**-0.5, *geometry)
    environ = {} if backend == "cpu" else {"SEAHAL_OPS": f"{op}={backend}"}
    attend = hal.plan("cpu", ops=[op], announce=False, environ=environ)[op]
    q = torch.randn(NO_COPY_BATCH, 1, 1, d, generator=gen)
    indices = torch.randint(-1, rows, (NO_COPY_BATCH, 1, 4), generator=gen, dtype=torch.int32)
    sink = torch.randn(1, generator=gen)
    out = attend(q, pool.expand(NO_COPY_BATCH, -1, -1), indices, sink, *extra)
    some = torch.tensor([0, 4321, NO_COPY_BATCH - 1])
    alone = attend(q[some], pool.expand(3, -1, -1).contiguous(), indices[some], sink, *extra)
    # the same values, in another batch: equal up to the fp32 sums' order (K = 4 terms, ~2^-22)
    torch.testing.assert_close(out[some], alone, rtol=2**-20, atol=2**-20)


# -- the cuda Triton kernels, interpreted ----------------------------------------------------------
BF16_TOL = (2**-7, 2**-8 + 2**-16)
"""(rtol, atol / max|row|) against the reference for bf16 q: the kernel rounds the probabilities to
bf16 before the PV product (<= 2^-8 relative each, moving the output by <= 2^-8 max|row|), fp32
sums in another order add ~2^-16 max|row|, and the two bf16 outputs may round to neighbours (2^-7)."""


@host
def test_under_interpreter():
    require_triton()
    run = triton_interpreter.rerun_test_file(__file__)
    assert run.passed(skipped=15), run.report


@interpreted
@pytest.mark.parametrize("records", [False, True], ids=["dense", "fp8"])
def test_triton_pool_equals_per_sequence_caches_bit_for_bit(records):
    # D = 64 (two 32-wide D chunks); records of 88 bytes (rope 16, three tiles of 16): the interpreter
    # is slow at V4's D = 512. H = 20: a full and a partial head block of 16.
    from seahal.backends.cuda import sparse_attention as kernels

    geometry = (16, 16) if records else ()
    q, caches, pool, table, logical, sink = _batch(torch.bfloat16, 64, geometry, seed=3, heads=20)
    attend = kernels.sparse_attention_fp8 if records else kernels.sparse_attention
    reference = sparse_attention_fp8 if records else sparse_attention
    extra = (0.125, *geometry)
    with triton_interpreter.bf16_dot_fix():
        want = _per_sequence(attend, q, caches, logical, sink, *extra)
        got = _pooled(attend, q, pool, table, logical, sink, *extra)
    assert torch.isfinite(want).all() and torch.equal(got, want)
    ref = _per_sequence(reference, q, caches, logical, sink, *extra)
    rows = torch.cat([kv_cache_unpack(c, 64, *geometry) if records else c for c in caches], dim=1)
    rtol, atol = BF16_TOL
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol * float(rows.abs().amax()))
