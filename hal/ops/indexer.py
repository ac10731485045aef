"""Lightning indexer: ReLU-weighted multi-head scores over compressed keys, causal top-k."""

from __future__ import annotations

import math

import torch

from ..checks import Contract
from ..formats import FP4_TILE, INDEX_KEY_FORMATS, index_key_bytes
from ..spec import Out, define_op

Q_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
WEIGHT_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


def _selection(
    c: Contract, ratio: int, start_pos: int | torch.Tensor, topk: int, weights_scale: float, offset: int
) -> Out:
    """Check the selection arguments both indexer ops share; the indices' metadata."""
    c.positive("ratio", ratio)
    c.positive("topk", topk)
    c.position("start_pos", start_pos)
    c.require(
        isinstance(weights_scale, (int, float)) and math.isfinite(weights_scale),
        f"weights_scale must be a finite float, got {weights_scale!r}",
    )
    c.require(isinstance(offset, int) and offset >= 0, f"offset must be an int >= 0, got {offset!r}")
    return Out((c.dims["B"], c.dims["S"], topk), torch.int32)


@define_op(
    "indexer_topk",
    family="indexer",
    schema=(
        "(Tensor q, Tensor weights, Tensor keys, int ratio, int start_pos, int topk, float weights_scale=1.0, "
        "int offset=0) -> Tensor"
    ),
    position="start_pos",
)
def indexer_topk(q, weights, keys, ratio, start_pos, topk, weights_scale=1.0, offset=0):
    """Select, for every query token, the top-k visible compressed entries by indexer score.

    q: [B, S, H, d] bf16/fp32, weights: [B, S, H] bf16/fp32, keys: [B, N, d]
    -> indices: [B, S, topk] int32, ``offset + j`` for entry j, -1 in slots beyond the visible entries.

    Query s sits at position ``t = start_pos + s`` (start_pos an int, or an integer tensor on q's
    device, 0-d or [B] for one position per sequence: the position as data) and sees entries
    ``j < min(N, floor((t+1)/m))``; with the head weights ``w = fp32(weights) * weights_scale``
    (one fp32 product each: the model's bf16 projection and its constant scale, as the official
    ``weights_proj(x).float() * scale``), ``I(t, j) = sum_h w_h * relu(q_h . K_j)`` in fp32;
    indices are ordered by score descending, ties to the smaller index. ``offset``: where entry 0
    stands in the rows the caller indexes (the attention's keys ``[window | entries]``: W).
    """
    c = Contract("indexer_topk")
    c.tensor("q", q, ["B", "S", "H", "d"], Q_DTYPES)
    c.tensor("weights", weights, ["B", "S", "H"], WEIGHT_DTYPES)
    c.tensor("keys", keys, ["B", "N", "d"], Q_DTYPES)
    return _selection(c, ratio, start_pos, topk, weights_scale, offset)


@define_op(
    "indexer_topk_packed",
    family="indexer",
    schema=(
        "(Tensor q, Tensor weights, Tensor keys, str key_format, int ratio, int start_pos, int topk, "
        "float weights_scale=1.0, int offset=0) -> Tensor"
    ),
    position="start_pos",
)
def indexer_topk_packed(q, weights, keys, key_format, ratio, start_pos, topk, weights_scale=1.0, offset=0):
    """``indexer_topk`` over packed FP4 or FP8 indexer keys (the production key cache, v4_ops.md §12).

    q: [B, S, H, d] bf16/fp32, weights: [B, S, H] bf16/fp32, keys: [B, N, index_key_bytes(d, key_format)]
    uint8 -> indices: [B, S, topk] int32, ``offset + j`` for entry j, -1 in slots beyond the visible
    entries.

    Equal to ``indexer_topk(q, weights, index_key_unpack(keys, d, key_format, q.dtype), ratio,
    start_pos, topk, weights_scale, offset)``. Key j decodes in fp32, then rounds to q's dtype (exact for ue8m0 scales):
    ``"fp4"`` (d/2 + d/32 bytes, 68 at d = 128): ``K_jc = e2m1(code_jc) * 2^(e_j,c/32 - 127)``, codes
    two per byte with element 2i in the low nibble, then one e8m0 byte per 32 elements;
    ``"fp8"`` (d + 4 bytes, 132 at d = 128): ``K_jc = e4m3(code_jc) * s_j``, d e4m3 codes then the
    key's fp32 scale s_j (little-endian).
    """
    c = Contract("indexer_topk_packed")
    c.tensor("q", q, ["B", "S", "H", "d"], Q_DTYPES)
    c.tensor("weights", weights, ["B", "S", "H"], WEIGHT_DTYPES)
    c.tensor("keys", keys, ["B", "N", None], (torch.uint8,))
    c.choice("key_format", key_format, INDEX_KEY_FORMATS)
    if key_format == "fp4":
        c.divisible("d", FP4_TILE, "fp4 keys carry one e8m0 scale per 32 elements")
    width = index_key_bytes(c.dims["d"], key_format)
    c.require(
        keys.shape[-1] == width,
        f"keys's last dim must be {width} bytes for {key_format} keys of d={c.dims['d']} (q's head dim), "
        f"got {keys.shape[-1]}",
    )
    return _selection(c, ratio, start_pos, topk, weights_scale, offset)
