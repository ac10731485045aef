"""Lightning indexer: ReLU-weighted multi-head scores over compressed keys, causal top-k."""

from __future__ import annotations

import torch

from ..checks import Contract
from ..spec import Out, define_op

Q_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


@define_op(
    "indexer_topk",
    family="indexer",
    schema="(Tensor q, Tensor weights, Tensor keys, int ratio, int start_pos, int topk) -> Tensor",
)
def indexer_topk(q, weights, keys, ratio, start_pos, topk):
    """Select, for every query token, the top-k visible compressed entries by indexer score.

    q: [B, S, H, d] bf16/fp32, weights: [B, S, H] fp32 (already scaled), keys: [B, N, d]
    -> indices: [B, S, topk] int32, -1 in slots beyond the visible entries.

    Query s sits at position ``t = start_pos + s`` and sees entries ``j < min(N, floor((t+1)/m))``;
    ``I(t, j) = sum_h weights[h] * relu(q_h . K_j)`` in fp32; indices are ordered by score
    descending, ties to the smaller index.
    """
    c = Contract("indexer_topk")
    c.tensor("q", q, ["B", "S", "H", "d"], Q_DTYPES)
    c.tensor("weights", weights, ["B", "S", "H"], (torch.float32, torch.float64))
    c.tensor("keys", keys, ["B", "N", "d"], Q_DTYPES)
    c.positive("ratio", ratio)
    c.positive("topk", topk)
    c.require(start_pos >= 0, f"start_pos must be >= 0, got {start_pos}")
    return Out((c.dims["B"], c.dims["S"], topk), torch.int32)
