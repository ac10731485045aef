"""MoE gating: ``moe_softmax_topk``, ``moe_sigmoid_topk``, ``moe_softplus_topk``.

All take router logits ``input [tokens, experts]`` (float/half/bfloat16) and return
``(reduce_weight [tokens, topk] float32, expert_id [tokens, topk] int32)``, written into the
optional ``reduce_weight`` / ``expert_id`` outputs when given. Selection ranks ``score + bias``;
equal keys go to the smaller expert id (the documentation does not say; DeepSeek's kernels do so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._emulation import FLOATS, check, check_dtype, recorded, unsupported


def _logits(input: torch.Tensor, topk: int) -> torch.Tensor:
    check(input.dim() == 2, f"input must be a 2-D tensor [tokens, experts], but got {input.dim()}-D")
    check_dtype("input", input, FLOATS)
    check(0 < topk <= input.shape[1], f"topk must be in (0, {input.shape[1]}], but got {topk}")
    return input.float()


def _bias(name: str, bias: torch.Tensor | None, experts: int) -> torch.Tensor | float:
    if bias is None:
        return 0.0
    check(bias.shape == (experts,), f"{name} must be [{experts}], but got {list(bias.shape)}")
    check_dtype(name, bias, (torch.float32,))
    return bias


def _select(key: torch.Tensor, topk: int) -> torch.Tensor:
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :topk]


def _finish(weight: torch.Tensor, ids: torch.Tensor, normalize: bool, route_scale: float,
            reduce_weight: torch.Tensor | None, expert_id: torch.Tensor | None):
    if normalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    weight, ids = weight * route_scale, ids.to(torch.int32)
    for name, given, value in (("reduce_weight", reduce_weight, weight), ("expert_id", expert_id, ids)):
        if given is not None:
            check(given.shape == value.shape and given.dtype == value.dtype,
                  f"{name} must be {list(value.shape)} {value.dtype}, but got {list(given.shape)} {given.dtype}")
            given.copy_(value)
    return (weight if reduce_weight is None else reduce_weight), (ids if expert_id is None else expert_id)


@recorded
def moe_softmax_topk(input, topk, normalize=False, num_expert_group=-1, topk_group=0, mask=None,
                     normed_by="topk_logit", route_scale=1.0, reduce_weight=None, expert_id=None, score_bias=None):
    """``softmax(input)``, top-k of (softmax + score_bias); ``normalize`` renormalises the k
    weights (``normed_by='topk_logit'``); times ``route_scale``."""
    logits = _logits(input, topk)
    if num_expert_group > 1 or mask is not None or normed_by != "topk_logit":
        raise unsupported("grouped selection, mask and normed_by='softmax_logit'")
    scores = logits.softmax(dim=-1)
    ids = _select(scores + _bias("score_bias", score_bias, logits.shape[1]), topk)
    return _finish(scores.gather(1, ids), ids, normalize, route_scale, reduce_weight, expert_id)


@recorded
def moe_sigmoid_topk(input, topk, normalize=False, num_expert_group=-1, topk_group=0, route_scale=1.0,
                     score_bias=None, reduce_weight=None, expert_id=None):
    """DeepSeek-V3 gating: ``sigmoid(input)``, top-k of (sigmoid + score_bias), weights are the
    unbiased sigmoid scores (renormalised if ``normalize``) times ``route_scale``."""
    logits = _logits(input, topk)
    if num_expert_group > 1:
        raise unsupported("group-limited selection (num_expert_group > 1)")
    scores = logits.sigmoid()
    ids = _select(scores + _bias("score_bias", score_bias, logits.shape[1]), topk)
    return _finish(scores.gather(1, ids), ids, normalize, route_scale, reduce_weight, expert_id)


@recorded
def moe_softplus_topk(input, topk, input_ids=None, tid2eid=None, bias=None, route_scale=1.0,
                      reduce_weight=None, expert_id=None):
    """DeepSeek-V4 gating: ``s = sqrt(softplus(input))``; hash layers take ``tid2eid[input_ids]``
    (int32 both, ``tid2eid [vocab, topk]``), the others top-k of ``s + bias``; the weights are
    ``s`` at the chosen experts, renormalised, times ``route_scale``."""
    logits = _logits(input, topk)
    check((input_ids is None) == (tid2eid is None), "input_ids and tid2eid must be given together")
    scores = F.softplus(logits).sqrt()
    if tid2eid is not None:
        check_dtype("input_ids", input_ids, (torch.int32,))
        check_dtype("tid2eid", tid2eid, (torch.int32,))
        check(input_ids.shape == (logits.shape[0],), f"input_ids must be [{logits.shape[0]}], got {list(input_ids.shape)}")
        check(tid2eid.dim() == 2 and tid2eid.shape[1] == topk,
              f"tid2eid must be [vocab, topk={topk}], but got {list(tid2eid.shape)}")
        check(bias is None, "bias must be None for hash routing (input_ids/tid2eid)")
        ids = tid2eid[input_ids.long()].long()
    else:
        ids = _select(scores + _bias("bias", bias, logits.shape[1]), topk)
    return _finish(scores.gather(1, ids), ids, True, route_scale, reduce_weight, expert_id)
