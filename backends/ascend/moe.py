"""MoE on Ascend: gating through ``npu_moe_gating_top_k``; experts through
``npu_moe_init_routing_v2`` -> ``npu_grouped_matmul`` -> clamped SwiGLU -> ``npu_grouped_matmul`` ->
``npu_moe_token_unpermute`` (not ``npu_moe_finalize_routing``: vllm-ascend reports accuracy
problems with it)."""

from __future__ import annotations

import torch
import torch_npu

from ._portable import portable

MAX_EXPERTS = 2048

_NORM_TYPE = {"softmax": 0, "sigmoid": 1}
"""npu_moe_gating_top_k's norm_type; V4's sqrtsoftplus is not among the documented ones."""


def _gating_limits(experts: int, n_groups: int) -> str | None:
    """npu_moe_gating_top_k's documented shape rules (k and k_group the contract already bounds)."""
    per_group = experts // n_groups
    if experts > MAX_EXPERTS:
        return f"at most {MAX_EXPERTS} experts"
    if per_group <= 2:
        return "more than 2 experts per group"
    if -(-per_group // 32) * 32 * n_groups > MAX_EXPERTS:
        return f"group_count * align32(experts per group) <= {MAX_EXPERTS}"
    return None


def moe_gate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    score_func: str = "sqrtsoftplus",
    route_scale: float = 1.0,
    n_groups: int = 1,
    topk_groups: int = 1,
    input_ids: torch.Tensor | None = None,
    tid2eid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``moe_gate`` contract with the selection in ``torch_npu.npu_moe_gating_top_k``.

    x: [T, D], weight: [E, D] -> logits ``x W^T`` [T, E] fp32 (torch), then
    ``npu_moe_gating_top_k(logits, k, *, bias, input_ids, tid2eid, k_group, group_count,
    group_select_mode=1, renorm=0, norm_type, routed_scaling_factor, eps=1e-20)``
    (torch-npu 2.14 schema; hash arguments since 2.13): norm_type 1 (sigmoid) renormalises the
    picked scores by their sum + eps, 0 (softmax) does not, both scale by route_scale: the HAL's
    weights. group_select_mode 1 scores a group by its top-2 sum, as V3/V4 do. Expert counts
    outside the vendor's documented limits run the portable kernel.
    -> (weights [T, k] fp32, indices [T, k] int32)
    """
    if score_func not in _NORM_TYPE:
        raise NotImplementedError(
            f"ascend.torch_npu moe_gate serves score_func sigmoid/softmax (npu_moe_gating_top_k norm_type 1/0), "
            f"got {score_func!r}; plan without requirements to get the portable kernel"
        )
    beyond = _gating_limits(weight.shape[0], n_groups)
    if beyond is not None:
        args = (x, weight, bias, top_k, score_func, route_scale, n_groups, topk_groups, input_ids, tid2eid)
        return portable("moe_gate", f"npu_moe_gating_top_k needs {beyond}", *args)
    logits = x.float() @ weight.float().T
    hashed = tid2eid is not None
    weights, indices, _ = torch_npu.npu_moe_gating_top_k(
        logits,
        top_k,
        bias=bias.float() if bias is not None and not hashed else None,
        input_ids=input_ids if hashed else None,
        tid2eid=tid2eid,
        k_group=topk_groups,
        group_count=n_groups,
        group_select_mode=1,
        renorm=0,
        norm_type=_NORM_TYPE[score_func],
        out_flag=False,
        routed_scaling_factor=route_scale,
        eps=1e-20,
    )
    return weights, indices


def _grouped(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``torch_npu.npu_grouped_matmul([x], [weight], *, group_list, split_item=2, group_type=0,
    group_list_type=1)``: rows of x grouped by expert (``counts`` rows each) times weight[e] [K, N]."""
    (y,) = torch_npu.npu_grouped_matmul(
        [x], [weight], group_list=counts, split_item=2, group_type=0, group_list_type=1
    )
    return y


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
    """The ``moe_experts`` contract for dense bf16 weights on torch_npu's grouped MoE ops.

    x: [T, D] bf16, topk_weights/topk_ids: [T, k], w1, w3: [E, I, D], w2: [E, D, I] bf16 -> [T, D] bf16.

    1. ``npu_moe_init_routing_v2(x, ids, *, expert_num=E, expert_tokens_num_type=1,
       expert_tokens_num_flag=True, quant_mode=-1, row_idx_type=0)`` sorts the T*k pairs by expert:
       expanded rows [T*k, D], per-expert counts, and each pair's row (-1 ids routed to expert 0
       with weight 0, contributing exactly nothing);
    2. gate/up = ``npu_grouped_matmul`` with w1/w3 as [E, D, I] views (bf16 out);
    3. ``h = w * silu(min(gate, L)) * clamp(up, -L, L)`` in fp32, rounded to bf16 (the routing
       weight multiplies before the down projection, as the contract says);
    4. down = ``npu_grouped_matmul`` with w2 as [E, I, D];
    5. ``npu_moe_token_unpermute(down, rows, probs=ones[T, k] bf16)`` sums each token's k rows.
    Quantised weights are dequantised at load on Ascend (``chips.weight_conversions``).
    """
    if w1_scale is not None or x.dtype != torch.bfloat16:
        raise NotImplementedError(
            "ascend.torch_npu moe_experts takes bf16 activations and dense bf16 weights (npu_moe_token_unpermute "
            f"is bf16-only), got x {x.dtype}, w1 {w1.dtype}; quantised experts are dequantised at load on Ascend"
        )
    tokens, k = topk_ids.shape
    valid = topk_ids >= 0
    ids = torch.where(valid, topk_ids, 0).to(torch.int32)
    routed = torch.where(valid, topk_weights.float(), 0.0).reshape(-1)
    expanded, rows, counts, _ = torch_npu.npu_moe_init_routing_v2(
        x,
        ids,
        expert_num=w1.shape[0],
        expert_tokens_num_type=1,
        expert_tokens_num_flag=True,
        quant_mode=-1,
        row_idx_type=0,
    )
    rows = rows.long()
    gate = _grouped(expanded, w1.to(x.dtype).transpose(1, 2), counts).float()
    up = _grouped(expanded, w3.to(x.dtype).transpose(1, 2), counts).float()
    if swiglu_limit > 0:
        gate, up = gate.clamp(max=swiglu_limit), up.clamp(-swiglu_limit, swiglu_limit)
    row_weight = torch.zeros_like(routed).index_copy_(0, rows, routed)
    hidden = (row_weight[:, None] * torch.nn.functional.silu(gate) * up).to(x.dtype)
    down = _grouped(hidden, w2.to(x.dtype).transpose(1, 2), counts)
    ones = torch.ones(tokens, k, dtype=torch.bfloat16, device=x.device)
    return torch_npu.npu_moe_token_unpermute(down, rows, probs=ones)
