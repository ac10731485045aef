"""Host-side alignment facts the cuda kernels specialise on."""

from __future__ import annotations

import torch


def row_alignment(rows: torch.Tensor) -> int:
    """The largest power of two <= 16 dividing every row's start address, in elements of ``rows``,
    when a row's elements are contiguous, else 1: a kernel's ``tl.multiple_of`` hint for vector
    loads of byte records whose length is no multiple of 16 (584-byte KV records: 8; 132- and
    68-byte indexer keys: 4), and its licence to read their scale bytes as whole words."""
    if rows.shape[-1] > 1 and rows.stride(-1) != 1:
        return 1
    starts = [rows.data_ptr() // rows.element_size()]
    starts += [stride for size, stride in zip(rows.shape[:-1], rows.stride()[:-1]) if size > 1]
    align = 16
    while align > 1 and any(start % align for start in starts):
        align //= 2
    return align


def words_readable(codes: torch.Tensor, e8m0_scales: bool) -> bool:
    """Whether packed FP4 codes can be read as 4-byte words by the weights-first decode
    (``_e2m1.e2m1_bf16_words``): e8m0 scales, K contiguous, every row 4-byte aligned."""
    return e8m0_scales and row_alignment(codes) >= 4
