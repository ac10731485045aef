"""Sparse attention over gathered keys (window + compressed entries) with per-head sinks, the keys
given as dense rows (``sparse_attention``) or as the packed FP8 cache records (``sparse_attention_fp8``)."""

from __future__ import annotations

import torch

from ..checks import INDEX, Contract, check_rotation
from ..spec import Out, define_op
from .quant import kv_geometry, kv_record_bytes

DTYPES = (torch.bfloat16, torch.float32, torch.float64)


def _selection(c: Contract, indices, sink, softmax_scale) -> None:
    """The arguments both forms share after the keys: indices [B, S, K], sink [H], the scale."""
    c.tensor("indices", indices, ["B", "S", "K"], INDEX)
    c.tensor("sink", sink, ["H"], (torch.float32, torch.float64))
    c.require(softmax_scale > 0, f"softmax_scale must be > 0, got {softmax_scale}")


def _output_rotation(c: Contract, positions, freqs) -> None:
    """The optional inverse RoPE of the output: positions [B, S] int and freqs [R] (2R <= D), both or neither."""
    c.require((positions is None) == (freqs is None),
              "positions and freqs rotate the output back together: give both or neither")
    if positions is not None:
        check_rotation(c, positions, freqs)


@define_op(
    "sparse_attention",
    family="attention",
    schema=(
        "(Tensor q, Tensor kv, Tensor indices, Tensor sink, float softmax_scale, Tensor? positions=None, "
        "Tensor? freqs=None) -> Tensor"
    ),
)
def sparse_attention(q, kv, indices, sink, softmax_scale, positions=None, freqs=None):
    """One softmax over the keys each query selects, K = V shared, a sink in the denominator.

    q: [B, S, H, D], kv: [B, N, D] (same dtype), indices: [B, S, K] int (-1 = empty slot),
    sink: [H] fp32 -> o: [B, S, H, D] in q's dtype.

    ``s_j = softmax_scale * q_h . kv[idx_j]``; ``m = max_j s_j``;
    ``o_h = sum_j exp(s_j - m) kv[idx_j] / (sum_j exp(s_j - m) + exp(sink_h - m))``;
    a query with no valid index gets 0.

    kv may have batch stride 0: one pool of rows shared by the batch (``pool.expand(B, -1, -1)``),
    which with pool-row indices is a paged cache of sequences of any lengths (``seahal.hal.paging``);
    indices may point anywhere in N. A kernel reads the rows the indices name and never copies kv
    (a contiguous copy of an expanded pool is B pools).

    With ``positions`` [B, S] int and ``freqs`` [R] fp32 (2R <= D) the output then takes its query's
    inverse RoPE, as V4 applies it before the output projection: ``o = rope(o, positions, freqs,
    inverse=True)`` on o rounded to q's dtype (each head's last 2R dims, interleaved pairs rotated
    by ``-pos * f_i`` in fp32), so that a kernel can rotate the output before it stores it.
    """
    c = Contract("sparse_attention")
    c.tensor("q", q, ["B", "S", "H", "D"], DTYPES)
    c.tensor("kv", kv, ["B", "N", "D"], (q.dtype,))
    _selection(c, indices, sink, softmax_scale)
    _output_rotation(c, positions, freqs)
    return Out(tuple(q.shape), q.dtype)


@define_op(
    "sparse_attention_fp8",
    family="attention",
    schema=(
        "(Tensor q, Tensor records, Tensor indices, Tensor sink, float softmax_scale, int rope_dim=64, "
        "int tile=64, Tensor? positions=None, Tensor? freqs=None) -> Tensor"
    ),
)
def sparse_attention_fp8(q, records, indices, sink, softmax_scale, rope_dim=64, tile=64, positions=None, freqs=None):
    """:func:`sparse_attention` over keys stored as packed FP8 KV records (v4_ops.md §12).

    q: [B, S, H, D], records: [B, N, kv_record_bytes(D, rope_dim, tile)] uint8 (584 bytes for V4's
    D = 512, rope_dim 64, tile 64), indices: [B, S, K] int (-1 = empty slot), sink: [H] fp32
    -> o: [B, S, H, D] in q's dtype.

    ``o = sparse_attention(q, kv_cache_unpack(records, D, rope_dim, tile).to(q.dtype), indices,
    sink, softmax_scale)``: key j is record j decoded (nope ``e4m3 * 2^(e_t - 127)`` per tile t,
    RoPE dims the stored bf16), exactly, so only the records the indices name need be read.
    As for :func:`sparse_attention`'s kv, records may have batch stride 0 (a pool of records
    shared by the batch: a paged FP8 cache) and indices may point anywhere in N.

    ``positions`` and ``freqs``: the output's inverse RoPE, as for :func:`sparse_attention`.
    """
    c = Contract("sparse_attention_fp8")
    c.tensor("q", q, ["B", "S", "H", "D"], DTYPES)
    head_dim = c.dims["D"]
    kv_geometry(c, "q's head dim D", head_dim, rope_dim, tile)
    c.tensor("records", records, ["B", "N", kv_record_bytes(head_dim, rope_dim, tile)], (torch.uint8,))
    _selection(c, indices, sink, softmax_scale)
    _output_rotation(c, positions, freqs)
    return Out(tuple(q.shape), q.dtype)
