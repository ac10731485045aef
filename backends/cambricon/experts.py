"""moe_experts on tmo: token permutation, grouped GEMMs and the weighted combine.

The composition of vllm-mlu's ``fused_moe`` for dense (bf16/fp32) expert weights:

1. ``moe_gen_idx(expert_id, expert_num)`` -> ``(expand_idx, combine_idx, token_count,
   cusum_token_count)``: the (token, k) pairs sorted by expert;
2. ``moe_expand_input(input, gather_idx=expand_idx)`` -> the tokens in that order, ``[T*k, D]``;
3. ``group_gemm(a, b=[w1 | w3] as [E, 2I, D], m_list=token_count)`` -> ``[T*k, 2I]``;
4. clamped SwiGLU times the routing weight, in torch: tmo's ``moe_active`` has no clamp
   (``swiglu_limit``) and V4 applies the routing weight *before* the down projection;
5. ``group_gemm(b=w2 [E, D, I])`` -> ``[T*k, D]``;
6. ``moe_combine_result(input, reduce_weight=1, gather_ids=combine_idx)`` sums each token's k rows.

Empty routing slots (id -1) become expert 0 with weight 0, which contributes exactly 0.
FP8/FP4 expert weights run on the portable path: tmo's quantised grouped GEMM
(``smooth_quant_group_gemm``) is int8 per-channel, not DeepSeek's block formats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from seahal.hal.ops.moe import expert_weight_format

from . import tmo
from .route import portable

FUNCTIONS = ("moe_gen_idx", "moe_expand_input", "group_gemm", "moe_combine_result")
_DTYPES = (torch.float32, torch.bfloat16)


def _swiglu(h13: torch.Tensor, weight: torch.Tensor, limit: float) -> torch.Tensor:
    """``w * silu(min(g, L)) * clamp(u, -L, L)`` in fp32 for rows ``[g | u]``; no clamp if L <= 0."""
    gate, up = h13.float().chunk(2, dim=-1)
    if limit > 0:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up * weight.unsqueeze(-1)


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
    """Weighted sum of clamped-SwiGLU experts (contract: ``hal.ops.moe.moe_experts``).

    x: [T, D], topk_weights: [T, k] fp32, topk_ids: [T, k] (-1 = none), w1, w3: [E, I, D],
    w2: [E, D, I] dense -> [T, D] in x's dtype.
    """
    fmt = expert_weight_format(w1)
    missing = [f for f in FUNCTIONS if tmo.lacks(f)]
    why = f"torch_mlu_ops {tmo.version()} has no {missing[0]}" if missing else None
    if fmt != "dense":
        why = f"{fmt} expert weights (tmo's grouped GEMMs take dense or int8 weights)"
    elif x.dtype not in _DTYPES or w1.dtype != x.dtype or w2.dtype != x.dtype:
        why = f"x {x.dtype} with {w1.dtype} weights (tmo group_gemm: fp32/bf16, same as x)"
    if why is not None:
        return portable("moe_experts", why)(
            x, topk_weights, topk_ids, w1, w1_scale, w3, w3_scale, w2, w2_scale, swiglu_limit
        )
    n_experts = w1.shape[0]
    valid = topk_ids >= 0
    ids = torch.where(valid, topk_ids, 0).to(torch.int32)
    weights = torch.where(valid, topk_weights.float(), 0.0)
    expand_idx, combine_idx, token_count, cusum = tmo.call("moe_gen_idx", expert_id=ids, expert_num=n_experts)
    rows = tmo.call("moe_expand_input", input=x.contiguous(), gather_idx=expand_idx)
    w13 = torch.cat((w1, w3), dim=1).contiguous()
    max_m = rows.shape[0]  # bound on any expert's rows: a token may pick one expert in several slots
    h13 = tmo.call("group_gemm", a=rows, b=w13, m_list=token_count, expand_idx=None, c=None, alpha=None,
                   beta=None, max_m=max_m)
    # the routing weight of expanded row r is that of flat pair expand order: combine_idx maps
    # pair p = t*k + j to its row, so row combine_idx[p] carries weights.flatten()[p]
    row_weight = torch.empty_like(weights.flatten()).scatter_(0, combine_idx.long(), weights.flatten())
    h = _swiglu(h13, row_weight, swiglu_limit).to(x.dtype)
    down = tmo.call("group_gemm", a=h, b=w2.contiguous(), m_list=token_count, expand_idx=None, c=None,
                    alpha=None, beta=None, max_m=max_m)
    ones = torch.ones_like(weights)
    return tmo.call("moe_combine_result", input=down, reduce_weight=ones, gather_ids=combine_idx, residual=None,
                    cusum_token_count=cusum, start_expert_id=0, expert_size=n_experts)
