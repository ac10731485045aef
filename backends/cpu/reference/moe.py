"""Reference kernels of the MoE layer: the router (gate) and the routed experts (v4_ops.md §10).

The experts loop over every expert (a static count) and run it on all tokens, masking the tokens
that did not pick it: no data-dependent shapes, so the kernel runs on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seahal.hal.formats import compute_dtype, fp8_quantize
from seahal.hal.ops.moe import expert_weight_format

from .gemm import FP8_BLOCK, fp4_gemm, fp8_gemm

GROUP_SCORE_TOP = 2


def _scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """Expert scores: ``sqrt(softplus(l))`` (softplus threshold 20), ``sigmoid(l)`` or ``softmax(l)``."""
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    if score_func == "sigmoid":
        return logits.sigmoid()
    return F.softplus(logits, threshold=20.0).sqrt()


def _topk_indices(key: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of the last dim, equal keys ordered by smaller index."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]


def _limit_to_groups(key: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """Keep the ``topk_groups`` best of ``n_groups`` expert groups, others to -inf.

    key: [T, E] -> [T, E]; group score = sum of the group's top-2 keys (top-1 for groups of one).
    """
    grouped = key.unflatten(-1, (n_groups, -1))
    top = min(GROUP_SCORE_TOP, grouped.shape[-1])
    group_score = grouped.topk(top, dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(group_score, dtype=torch.bool)
    keep.scatter_(-1, _topk_indices(group_score, topk_groups), True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)


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
    """Route tokens to experts: scores, biased top-k selection, renormalised weights.

    x: [T, D], weight: [E, D], bias: [E] or None; hash routing: input_ids: [T], tid2eid: [vocab, k]
    -> weights: [T, k] fp32, indices: [T, k] int32

    ``s = score(x W^T)`` in fp32 (fp64 for fp64 inputs); ``idx = topk(s + bias)`` with ties to the
    smaller expert index, over the ``topk_groups`` best groups when ``n_groups > 1``; hash routing
    takes ``idx = tid2eid[input_ids]`` (bias and groups unused). ``w = s[idx]``, divided by
    ``sum(w) + 1e-20`` unless score_func is softmax, times ``route_scale``.
    """
    dtype = compute_dtype(x, weight)
    scores = _scores(x.to(dtype) @ weight.to(dtype).T, score_func)
    if tid2eid is not None:
        indices = tid2eid[input_ids.long()].long()
    else:
        key = scores if bias is None else scores + bias.to(dtype)
        if n_groups > 1:
            key = _limit_to_groups(key, n_groups, topk_groups)
        indices = _topk_indices(key, top_k)
    weights = scores.gather(-1, indices)
    if score_func != "softmax":
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return (weights * route_scale).to(torch.float32), indices.to(torch.int32)


def _expert_linear(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, expert: int, dtype: torch.dtype
) -> torch.Tensor:
    """``x @ w[expert]^T`` in the stacked weight's format, result in dtype.

    dense: plain matmul in dtype; fp8 / fp4: x FP8-quantised in 1x128 ue8m0 tiles, then the
    block-scaled GEMM (fp32 accumulation) with the expert's scales.
    """
    fmt = expert_weight_format(w)
    if fmt == "dense":
        return x.to(dtype) @ w[expert].to(dtype).T
    q, q_scale = fp8_quantize(x, FP8_BLOCK)
    gemm = fp8_gemm if fmt == "fp8" else fp4_gemm
    return gemm(q, q_scale, w[expert], scale[expert], torch.float32).to(dtype)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """``silu(min(gate, L)) * clamp(up, -L, L)``; no clamp when L <= 0."""
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def _dense_routing(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing as dense [T, E] tables: each token's weight per expert (0 where not picked) and
    whether it picked the expert at all; ids of -1 pick nothing."""
    experts = torch.arange(n_experts, device=topk_ids.device)
    one_hot = topk_ids.long().unsqueeze(-1) == experts
    weight = torch.where(one_hot, topk_weights.unsqueeze(-1), 0.0).sum(dim=1)
    return weight, one_hot.any(dim=1)


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
    """Weighted sum of clamped-SwiGLU experts over each token's routed experts.

    x: [T, D] bf16/fp32/fp64, topk_weights: [T, k], topk_ids: [T, k] int (-1 = none),
    w1, w3: [E, I, D], w2: [E, D, I] dense, fp8 (+ 128x128 scales) or packed fp4 (+ 1x32 scales)
    -> [T, D] in x's dtype.

    ``h = w_k * silu(min(x W1^T, L)) * clamp(x W3^T, -L, L)`` in fp32 (fp64 for fp64 inputs),
    ``y_t = sum_k x.dtype(W2 x.dtype(h))`` accumulated in fp32, cast to x's dtype. The routing
    weight is applied before the down projection (official inference code); quantised weights
    FP8-quantise each GEMM input in 1x128 ue8m0 tiles.
    """
    dtype = compute_dtype(x, topk_weights, w1, w2)
    routing, picked = _dense_routing(topk_weights.to(dtype), topk_ids, w1.shape[0])
    y = torch.zeros(x.shape, dtype=dtype, device=x.device)
    for e in range(w1.shape[0]):
        gate = _expert_linear(x, w1, w1_scale, e, dtype)
        up = _expert_linear(x, w3, w3_scale, e, dtype)
        h = clamped_swiglu(gate, up, swiglu_limit) * routing[:, e, None]
        h = torch.where(picked[:, e, None], h, 0.0).to(x.dtype)
        y += _expert_linear(h, w2, w2_scale, e, dtype).to(x.dtype)
    return y.to(x.dtype)
