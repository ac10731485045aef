"""MoE routing and grouped GEMMs: npu_moe_gating_top_k, npu_moe_init_routing_v2,
npu_grouped_matmul, npu_moe_token_unpermute (emulated from the torch_npu 2.14 docs)."""

from __future__ import annotations

import torch

from ._emulation import check, older_than, on_device

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def npu_moe_gating_top_k(
    x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1, group_select_mode=0,
    renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0, eps=1e-20,
):
    """x: [T, E] logits -> (y [T, k] in x's dtype, expert_idx [T, k] int32, norm_out [T, E] fp32).

    norm_out = softmax(x) (norm_type 0) or sigmoid(x) (1); selection on norm_out + bias, within the
    k_group best of group_count groups (group score: max, or sum of the top 2 for
    group_select_mode 1); hash mode takes expert_idx = tid2eid[input_ids]. y = norm_out[idx],
    divided by its sum + eps for sigmoid, times routed_scaling_factor.
    """
    if (input_ids is not None or tid2eid is not None) and older_than(2, 13):
        raise TypeError("npu_moe_gating_top_k() got an unexpected keyword argument 'input_ids'")
    on_device("x", x)
    check(x.dim() == 2, "the x shape support only 2d)")
    check(x.dtype in _FLOATS, f"x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    t, e = x.shape
    check(e <= 2048, f"the number of experts (x's last dim) must be <= 2048, got {e}")
    if bias is not None:
        check(bias.dim() == 1, "the bias shape support only 1d)")
        check(bias.shape[0] == e and bias.dtype == x.dtype, f"bias must be [{e}] {x.dtype}, got {list(bias.shape)} {bias.dtype}")
    check((input_ids is None) == (tid2eid is None), "input_ids and tid2eid must be both provided or both omitted)")
    if input_ids is not None:
        check(input_ids.dim() == 1, "the input_ids shape support only 1d)")
        check(input_ids.shape[0] == t, "The input_ids first dim should be same as x first dim)")
        check(tid2eid.dim() == 2, "the tid2eid shape support only 2d)")
        check(tid2eid.shape[1] == k, "The tid2eid second dim should be same as k)")
        for name, ids in (("input_ids", input_ids), ("tid2eid", tid2eid)):
            check(ids.dtype in (torch.int32, torch.int64), f"{name} must be int32 or int64, got {ids.dtype}")
    check(group_count > 0 and e % group_count == 0 and e // group_count > 2,
          f"x's last dim {e} must be divisible by group_count={group_count} with more than 2 experts per group")
    check(-(-(e // group_count) // 32) * 32 * group_count <= 2048, "group_count * align32(experts per group) must be <= 2048")
    check(1 <= k_group <= group_count, f"k_group must be in [1, group_count={group_count}], got {k_group}")
    check(1 <= k <= e // group_count * k_group, f"k must be in [1, {e // group_count * k_group}], got {k}")
    check(renorm == 0, f"renorm only supports 0, got {renorm}")
    check(norm_type in (0, 1), f"norm_type must be 0 (softmax) or 1 (sigmoid), got {norm_type}")
    check(group_select_mode in (0, 1), f"group_select_mode must be 0 or 1, got {group_select_mode}")

    xf = x.float()
    norm_out = xf.softmax(-1) if norm_type == 0 else xf.sigmoid()
    if input_ids is not None:
        idx = tid2eid[input_ids.long()].long()
    else:
        ranking = norm_out + (bias.float() if bias is not None else 0.0)
        if group_count > 1:
            groups = ranking.view(t, group_count, -1)
            score = groups.amax(-1) if group_select_mode == 0 else groups.topk(2, dim=-1).values.sum(-1)
            keep = score.sort(dim=-1, descending=True, stable=True).indices[:, :k_group]
            mask = torch.zeros(t, group_count, dtype=torch.bool).scatter_(1, keep, True)
            ranking = ranking.masked_fill(~mask.repeat_interleave(e // group_count, 1), float("-inf"))
        idx = ranking.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    y = norm_out.gather(1, idx)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    return y.to(x.dtype), idx.to(torch.int32), norm_out


def npu_moe_init_routing_v2(
    x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1, expert_num=-1, drop_pad_mode=0,
    expert_tokens_num_type=0, expert_tokens_num_flag=False, quant_mode=-1, active_expert_range=[], row_idx_type=0,
    x_dtype=None,
):
    """Dispatch: the T*K (token, slot) pairs sorted by expert (stable), x's rows copied in that order.

    -> (expanded_x [T*K, H], expanded_row_idx [T*K] int32, expert_tokens [E] int64, expanded_scale [T*K] fp32).
    row_idx_type 0 ("gather"): expanded_row_idx[t*K + j] = the row of expanded_x holding pair (t, j);
    expert_tokens_num_type 1: per-expert counts (0: cumulative). Only the dropless, unquantised mode
    is emulated (drop_pad_mode 0, quant_mode -1).
    """
    on_device("x", x)
    check(x.dim() == 2, "the x shape support only 2d")
    check(expert_idx.dim() == 2, "the expert_idx shape support only 2d")
    check(x.size(0) == expert_idx.size(0), "the first dim of expert_idx and x should be the same")
    check(x.dtype in _FLOATS, f"x dtype must be float16, bfloat16 or float32 (unquantised), got {x.dtype}")
    check(expert_idx.dtype == torch.int32, f"expert_idx must be int32, got {expert_idx.dtype}")
    check(expert_num > 0, f"expert_num must be > 0, got {expert_num}")
    check(drop_pad_mode == 0, "drop_pad_mode only supports 0 (dropless)")
    check(quant_mode == -1, "only quant_mode=-1 (no quantisation) is emulated")
    check(expert_tokens_num_type in (0, 1), "only expert_tokens_num_type 0 (cumsum) and 1 (count) are emulated")
    check(row_idx_type in (0, 1), f"row_idx_type must be 0 or 1, got {row_idx_type}")
    start, end = active_expert_range if active_expert_range else (0, expert_num)
    flat = expert_idx.reshape(-1).long()
    check(bool(((flat >= 0) & (flat < expert_num)).all()), f"expert ids must be in [0, expert_num={expert_num})")
    check((start, end) == (0, expert_num), "only the full expert range is emulated")
    order = flat.sort(stable=True).indices
    k = expert_idx.shape[1]
    expanded_x = x[order // k]
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    row_idx = position if row_idx_type == 0 else order
    counts = torch.bincount(flat, minlength=expert_num)
    tokens = counts if expert_tokens_num_type == 1 else counts.cumsum(0)
    return expanded_x, row_idx.to(torch.int32), tokens.to(torch.int64), torch.zeros(order.numel())


def npu_grouped_matmul(
    x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
    per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
    activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
    tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
    per_token_scale_dtype=None,
):
    """The MoE form: x = [x [M, K]], weight = [w [E, K, N]], split_item 2/3, group_type 0 (split M),
    group_list [E] int64 (group_list_type 0 cumulative, 1 counts) -> [y [M, N]] in x's dtype,
    ``y[rows of group e] = x[rows] @ w[e]`` (non-quantised formula 1, fp32 accumulation)."""
    check(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), "x and weight must be lists of tensors")
    check(len(x) == 1 and len(weight) == 1, "only the single-tensor MoE form (one x, one stacked weight) is emulated")
    a, w = x[0], weight[0]
    on_device("x[0]", a)
    on_device("weight[0]", w)
    check(split_item in (2, 3), f"the single-tensor form needs split_item 2 or 3, got {split_item}")
    check(group_type == 0, f"group_type must be 0 (group along M), got {group_type}")
    check(all(v is None for v in (bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale)),
          "only the non-quantised formula (no bias/scale/offset) is emulated")
    check(a.dim() == 2 and w.dim() == 3, f"x[0] must be 2-D and weight[0] 3-D, got {a.dim()}-D and {w.dim()}-D")
    check(a.dtype in _FLOATS and w.dtype == a.dtype, f"x and weight must share a float dtype, got {a.dtype} and {w.dtype}")
    check(a.shape[1] == w.shape[1], f"x[0] is [M, K={a.shape[1]}] but weight[0] is [E, K={w.shape[1]}, N]")
    check(group_list is not None and group_list.dim() == 1 and group_list.shape[0] == w.shape[0],
          f"group_list must be [E={w.shape[0]}]")
    check(group_list.dtype == torch.int64, f"group_list must be int64, got {group_list.dtype}")
    check(group_list_type in (0, 1), f"group_list_type must be 0 (cumsum) or 1 (count), got {group_list_type}")
    ends = group_list.cumsum(0) if group_list_type == 1 else group_list
    check(int(ends[-1]) <= a.shape[0], f"group_list covers {int(ends[-1])} rows, x[0] has {a.shape[0]}")
    y = torch.zeros(a.shape[0], w.shape[2], dtype=a.dtype)
    begin = 0
    for e, end in enumerate(ends.tolist()):
        y[begin:end] = (a[begin:end].float() @ w[e].float()).to(a.dtype)
        begin = end
    return [y]


def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    """out[t] = sum_j permuted_tokens[sorted_indices[t*K + j]] * probs[t, j] (K = probs' second dim,
    1 without probs): bf16 rows, fp32 sum, bf16 result."""
    on_device("permuted_tokens", permuted_tokens)
    check(permuted_tokens.dim() == 2, "The dims of input permuted_tokens should be 2 dimensional")
    check(sorted_indices.dim() == 1, "The dims of input sorted_indices should be 1 dimensional")
    check(permuted_tokens.dtype == torch.bfloat16, f"permuted_tokens must be bfloat16, got {permuted_tokens.dtype}")
    check(sorted_indices.dtype == torch.int64, f"sorted_indices must be int64, got {sorted_indices.dtype}")
    check(not padded_mode, "only padded_mode=False is supported")
    k = 1
    if probs is not None:
        check(probs.dim() == 2, "The dims of input probs should be 2 dimensional")
        check(probs.dtype == torch.bfloat16, f"probs must be bfloat16, got {probs.dtype}")
        k = probs.shape[1]
    check(sorted_indices.shape[0] % k == 0, f"sorted_indices length {sorted_indices.shape[0]} is not a multiple of topK={k}")
    rows = permuted_tokens[sorted_indices].float().view(-1, k, permuted_tokens.shape[1])
    weights = probs.float()[..., None] if probs is not None else 1.0
    return (rows * weights).sum(1).to(torch.bfloat16)
