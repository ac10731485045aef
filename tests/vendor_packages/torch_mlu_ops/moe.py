"""Grouped expert FFN pieces: ``moe_gen_idx``, ``moe_expand_input``, ``group_gemm``,
``moe_combine_result`` (the composition vllm-mlu's ``fused_moe`` uses).

Index conventions: the ``tokens*topk`` (token, slot) pairs, flattened as ``p = t*topk + j``, are
ordered by expert id (stable); ``expand_idx[r]`` is the token of expanded row r, ``combine_idx[p]``
the expanded row of pair p; ``token_count[e]`` rows per expert, ``cusum_token_count`` its
exclusive prefix sum ``[experts + 1]``. All index tensors are int32.
"""

from __future__ import annotations

import torch

from ._emulation import FLOATS, check, check_dtype, recorded, unsupported


@recorded
def moe_gen_idx(expert_id, expert_num):
    """expert_id [tokens, topk] int32 -> (expand_idx, combine_idx, token_count, cusum_token_count)."""
    check(expert_id.dim() == 2, f"expert_id must be 2-D [tokens, topk], but got {expert_id.dim()}-D")
    check_dtype("expert_id", expert_id, (torch.int32,))
    flat = expert_id.flatten().long()
    check(bool(((flat >= 0) & (flat < expert_num)).all()), f"expert_id values must be in [0, {expert_num})")
    order = torch.sort(flat, stable=True).indices
    expand_idx = (order // expert_id.shape[1]).to(torch.int32)
    combine_idx = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel())).to(torch.int32)
    token_count = torch.bincount(flat, minlength=expert_num).to(torch.int32)
    cusum = torch.cat((token_count.new_zeros(1), token_count.cumsum(0, dtype=torch.int32)))
    return expand_idx, combine_idx, token_count, cusum


@recorded
def moe_expand_input(input, gather_idx, cusum_token_count=None, start_expert_id=0, expert_size=0):
    """Rows ``input[gather_idx]`` ([tokens, hidden] -> [rows, hidden]); with ``cusum_token_count``
    and ``expert_size > 0`` only the rows of experts [start_expert_id, + expert_size)."""
    check(input.dim() == 2, f"input must be 2-D [tokens, hidden], but got {input.dim()}-D")
    check_dtype("gather_idx", gather_idx, (torch.int32,))
    check(bool(((gather_idx >= 0) & (gather_idx < input.shape[0])).all()), "gather_idx out of range")
    rows = input[gather_idx.long()]
    if cusum_token_count is not None and expert_size > 0:
        rows = rows[int(cusum_token_count[start_expert_id]):int(cusum_token_count[start_expert_id + expert_size])]
    return rows


@recorded
def group_gemm(a, b, m_list, expand_idx, c, alpha, beta, max_m=0, d=None):
    """Per expert e, ``out[rows of e] = a[rows of e] @ b[e]^T``: a [rows, K], b [experts, N, K]
    (same dtype: float/half/bfloat16), m_list [experts] int32 summing to rows; fp32 accumulation,
    output in a's dtype. ``max_m``, when > 0, bounds every ``m_list`` entry."""
    check_dtype("a", a, FLOATS)
    check(b.dtype == a.dtype, f"b dtype must equal a dtype {a.dtype}, but got {b.dtype}")
    check(a.dim() == 2 and b.dim() == 3 and b.shape[2] == a.shape[1],
          f"a must be [M, K] and b [experts, N, K], but got {list(a.shape)} and {list(b.shape)}")
    check_dtype("m_list", m_list, (torch.int32,))
    check(m_list.shape == (b.shape[0],), f"m_list must be [{b.shape[0]}], but got {list(m_list.shape)}")
    if expand_idx is not None or c is not None or alpha is not None or beta is not None:
        raise unsupported("group_gemm with expand_idx, c, alpha or beta")
    counts = m_list.tolist()
    check(sum(counts) == a.shape[0], f"sum(m_list)={sum(counts)} must equal a's rows {a.shape[0]}")
    check(max_m <= 0 or max(counts, default=0) <= max_m, f"m_list entries must be <= max_m={max_m}, got {max(counts)}")
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype) if d is None else d
    start = 0
    for e, m in enumerate(counts):
        out[start:start + m] = (a[start:start + m].float() @ b[e].float().T).to(a.dtype)
        start += m
    return out


@recorded
def moe_combine_result(input, reduce_weight, gather_ids, residual, cusum_token_count, start_expert_id,
                       expert_size, bias=None, output=None):
    """``out[t] = sum_j reduce_weight[t, j] * input[gather_ids[t*topk + j]]`` (+ residual[t]),
    accumulated in fp32, in input's dtype. input [rows, hidden], reduce_weight [tokens, topk] float32."""
    check_dtype("reduce_weight", reduce_weight, (torch.float32,))
    check_dtype("gather_ids", gather_ids, (torch.int32,))
    tokens, topk = reduce_weight.shape
    check(gather_ids.shape == (tokens * topk,), f"gather_ids must be [{tokens * topk}], but got {list(gather_ids.shape)}")
    check(input.dim() == 2 and input.shape[0] == tokens * topk,
          f"input must be [{tokens * topk}, hidden] (all experts local), but got {list(input.shape)}")
    if bias is not None or start_expert_id != 0:
        raise unsupported("moe_combine_result with bias or an expert-parallel slice")
    rows = input[gather_ids.long()].float().view(tokens, topk, -1)
    out = (reduce_weight.unsqueeze(-1) * rows).sum(dim=1)
    if residual is not None:
        out = out + residual.float()
    out = out.to(input.dtype)
    if output is not None:
        output.copy_(out)
        return output
    return out
