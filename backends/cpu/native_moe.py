"""The routed experts on the CPU over the native block-scaled GEMMs (v4_ops.md §10).

The reference (``reference.moe.moe_experts``) runs every expert on every token, masking the tokens
that did not pick it, through its readable per-K-step GEMMs: a static loop any device can run. Here
only the experts some token picked run, each on its own tokens, through the native FP8 and FP4
GEMMs that read the weights as stored (:mod:`.native`); the math per token is the reference's.
"""

from __future__ import annotations

import torch

from seahal.hal import get_spec
from seahal.hal.formats import fp8_quantize, gather_rows
from seahal.hal.ops.moe import expert_weight_format

from .native import check_cpu_tensors, fp4_gemm, fp8_gemm
from .reference.gemm import FP8_BLOCK
from .reference.moe import clamped_swiglu
from .reference.moe import moe_experts as reference_moe_experts


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
) -> torch.Tensor:
    """Weighted sum of clamped-SwiGLU experts over each token's routed experts, FP8 or FP4 weights.

    x: [T, D] bf16/fp32, topk_weights: [T, k], topk_ids: [T, k] int (-1 = none), w1, w3: [E, I, D],
    w2: [E, D, I] fp8 (+ 128x128 scales) or packed fp4 (+ 1x32 scales) -> [T, D] in x's dtype.

    The reference's math token by token: each GEMM input FP8-quantised in 1x128 ue8m0 tiles (per
    row, so a token's tiles do not depend on the other tokens), ``h = w * silu(min(x W1^T, L)) *
    clamp(x W3^T, -L, L)`` in fp32 rounded to x's dtype, ``y_t = sum_e x.dtype(W2_e h)`` in fp32
    in ascending expert order, cast to x's dtype. The GEMMs sum in another order than the
    reference's, so a gate or up value may round to a neighbouring FP8 code of h. Dense weights
    and fp64 x run the reference.
    """
    get_spec("moe_experts").check(x, topk_weights, topk_ids, w1, w1_scale, w3, w3_scale, w2, w2_scale, swiglu_limit)
    fmt = expert_weight_format(w1)
    if fmt == "dense" or x.dtype == torch.float64:
        return reference_moe_experts(x, topk_weights, topk_ids, w1, w1_scale, w3, w3_scale, w2, w2_scale, swiglu_limit)
    check_cpu_tensors("moe_experts", x, topk_weights, topk_ids, w1, w1_scale, w3, w3_scale, w2, w2_scale)
    gemm = fp8_gemm if fmt == "fp8" else fp4_gemm
    ids, weights = topk_ids.long(), topk_weights.float()
    x_q, x_scale = fp8_quantize(x, FP8_BLOCK)  # once: each row's tiles, whichever experts it goes to
    y = torch.zeros(x.shape, dtype=torch.float32)
    for e in ids[ids >= 0].unique().tolist():  # ascending: the reference's order of addition
        picks = ids == e
        tokens = picks.any(dim=1).nonzero().squeeze(1)
        weight = torch.where(picks, weights, 0.0).sum(dim=1)[tokens]  # the reference's routing sum
        rows, rows_scale = gather_rows(x_q, tokens), x_scale[tokens]
        gate = gemm(rows, rows_scale, w1[e], w1_scale[e], torch.float32)
        up = gemm(rows, rows_scale, w3[e], w3_scale[e], torch.float32)
        h_q, h_scale = fp8_quantize((clamped_swiglu(gate, up, swiglu_limit) * weight[:, None]).to(x.dtype), FP8_BLOCK)
        y[tokens] += gemm(h_q, h_scale, w2[e], w2_scale[e], torch.float32).to(x.dtype)
    return y.to(x.dtype)
