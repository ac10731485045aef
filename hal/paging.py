"""Paged KV caches: each sequence's cache rows kept in pages of one shared pool, found through a block table.

A paged cache (vLLM's PagedAttention, FlashMLA's ``block_table``) stores the rows of every
sequence in one pool of fixed-size pages; row ``b, i`` of a block table is the pool page that
holds logical page ``i`` of sequence ``b``. Sequences of any lengths share the pool, and a
sequence grows by one table entry at a time, whichever page is free.

The attention ops need nothing new for it: they index the key rows of each batch element
separately, so a pool ``[1, P, row]`` expanded over the batch (``pool.expand(B, -1, -1)``, batch
stride 0: no copy) with indices that name pool rows *is* a batch of paged caches.
:func:`paged_rows` turns the logical indices a model computes (for V4: ring slot ``p mod W`` and
compressed entry ``W + j`` of the layer's ``[window ring | entries]`` buffer) into those pool rows.
Allocating and freeing pages is the serving stack's business; nothing here allocates.

The pool's rows are whole rows of the op's format: dense vectors, or 584-byte FP8 records with the
scales inside each record (v4_ops.md §12). FlashMLA's FP8 page block stores a page's 576-byte
[nope | rope] parts first and their 8-byte scale groups after them, which is not a pool of rows:
reading such blocks in place needs a kernel that knows the block layout.
"""

from __future__ import annotations

import torch

from .checks import INDEX, Contract


def paged_rows(block_table: torch.Tensor, logical: torch.Tensor, page_size: int) -> torch.Tensor:
    """Pool rows of logical cache rows: ``block_table[b, r // page_size] * page_size + r % page_size``.

    block_table: [B, max_pages] int32/int64, the pool page of each logical page of sequence b
    (< 0: not mapped); logical: [B, S, K] int32/int64, row r of sequence b's own cache (-1 = empty
    slot), e.g. the indices of ``sparse_attention`` -> [B, S, K] int32 rows of the pool
    ``[1, P, row]`` (P = pages x page_size); -1 for an empty slot and for a row on no mapped page
    (``r >= max_pages * page_size`` or a negative table entry), which the ops read as empty.

    The same map places rows when writing: ``pool[0, paged_rows(table, r, page_size)] = rows``.
    Device-resident, no host sync (nothing value-dependent is checked): the pool rows must fit int32.
    """
    c = Contract("paged_rows")
    c.tensor("block_table", block_table, ["B", "max_pages"], INDEX)
    c.tensor("logical", logical, ["B", "S", "K"], INDEX)
    c.positive("page_size", page_size)
    max_pages = c.dims["max_pages"]
    c.require(max_pages > 0, f"block_table must map at least one page, got {list(block_table.shape)}")
    batch, seq, slots = logical.shape
    row = logical.long()
    logical_page = row // page_size
    pages = block_table.long().gather(1, logical_page.clamp(0, max_pages - 1).reshape(batch, seq * slots))
    pages = pages.view(batch, seq, slots)
    mapped = (row >= 0) & (logical_page < max_pages) & (pages >= 0)
    return torch.where(mapped, pages * page_size + row % page_size, -1).to(torch.int32)
