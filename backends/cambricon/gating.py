"""moe_gate on tmo: router logits in torch, scoring + top-k + renormalisation in one tmo call.

- ``sqrtsoftplus`` (V4), score or hash routing: ``tmo.moe_softplus_topk(input, topk, input_ids,
  tid2eid, bias, route_scale)`` (always renormalises);
- ``sigmoid`` (V3): ``tmo.moe_sigmoid_topk(input, topk, normalize=True, score_bias, route_scale)``;
- ``softmax``: ``tmo.moe_softmax_topk(input, topk, normalize=False, route_scale)``.

tmo takes the logits ``x W^T`` (fp32 here, as the official gate computes them), int32 token ids
and an int32 ``tid2eid``, and returns ``(reduce_weight fp32, expert_id int32)``. Group-limited
routing (``n_groups > 1``) is not sent to tmo (its group-score rule is not documented), nor is
hash routing with other scores than sqrt-softplus: those calls run on the portable path.
"""

from __future__ import annotations

import torch

from . import tmo
from .route import portable

FUNCTIONS = {"sqrtsoftplus": "moe_softplus_topk", "sigmoid": "moe_sigmoid_topk", "softmax": "moe_softmax_topk"}


def _unsupported(score_func: str, n_groups: int, hashed: bool, biased: bool) -> str | None:
    if n_groups > 1:
        return "group-limited routing (n_groups > 1): tmo's group score rule is undocumented"
    if hashed and score_func != "sqrtsoftplus":
        return f"hash routing with {score_func} scores (tmo hashes only in moe_softplus_topk)"
    return tmo.lacks(FUNCTIONS[score_func], *(("score_bias",) if score_func == "softmax" and biased else ()))


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
    """Route tokens to experts (contract: ``hal.ops.moe.moe_gate``).

    x: [T, D], weight: [E, D], bias: [E] fp32 | None, input_ids: [T], tid2eid: [vocab, top_k]
    -> (weights [T, top_k] fp32, ids [T, top_k] int32).
    """
    why = _unsupported(score_func, n_groups, tid2eid is not None, bias is not None)
    if why is not None:
        return portable("moe_gate", why)(
            x, weight, bias, top_k, score_func, route_scale, n_groups, topk_groups, input_ids, tid2eid
        )
    logits = x.float() @ weight.float().T
    score_bias = None if bias is None else bias.float()
    if score_func == "sqrtsoftplus":
        hashed = tid2eid is not None
        weights, ids = tmo.call(
            "moe_softplus_topk",
            input=logits,
            topk=top_k,
            input_ids=input_ids.to(torch.int32) if hashed else None,
            tid2eid=tid2eid.to(torch.int32) if hashed else None,
            bias=None if hashed else score_bias,
            route_scale=route_scale,
        )
    elif score_func == "sigmoid":
        weights, ids = tmo.call(
            "moe_sigmoid_topk",
            input=logits,
            topk=top_k,
            normalize=True,
            route_scale=route_scale,
            score_bias=score_bias,
        )
    else:
        extra = {} if score_bias is None else {"score_bias": score_bias}
        weights, ids = tmo.call(
            "moe_softmax_topk", input=logits, topk=top_k, normalize=False, route_scale=route_scale, **extra
        )
    return weights.float(), ids.to(torch.int32)
