"""Sparse attention over gathered keys (window + compressed entries) with per-head sinks."""

from __future__ import annotations

import torch

from ..checks import INDEX, Contract
from ..spec import Out, define_op

DTYPES = (torch.bfloat16, torch.float32, torch.float64)


@define_op(
    "sparse_attention",
    family="attention",
    schema="(Tensor q, Tensor kv, Tensor indices, Tensor sink, float softmax_scale) -> Tensor",
)
def sparse_attention(q, kv, indices, sink, softmax_scale):
    """One softmax over the keys each query selects, K = V shared, a sink in the denominator.

    q: [B, S, H, D], kv: [B, N, D] (same dtype), indices: [B, S, K] int (-1 = empty slot),
    sink: [H] fp32 -> o: [B, S, H, D] in q's dtype.

    ``s_j = softmax_scale * q_h . kv[idx_j]``; ``m = max_j s_j``;
    ``o_h = sum_j exp(s_j - m) kv[idx_j] / (sum_j exp(s_j - m) + exp(sink_h - m))``;
    a query with no valid index gets 0.
    """
    c = Contract("sparse_attention")
    c.tensor("q", q, ["B", "S", "H", "D"], DTYPES)
    c.tensor("kv", kv, ["B", "N", "D"], (q.dtype,))
    c.tensor("indices", indices, ["B", "S", "K"], INDEX)
    c.tensor("sink", sink, ["H"], (torch.float32, torch.float64))
    c.require(softmax_scale > 0, f"softmax_scale must be > 0, got {softmax_scale}")
    return Out(tuple(q.shape), q.dtype)
