"""DSA-style sparse attention: npu_lightning_indexer and npu_sparse_flash_attention (emulated from
the torch_npu 2.14 docs; layouts TND queries, BSND / PA_BSND keys)."""

from __future__ import annotations

import torch

from ._emulation import check, older_than, on_device

_HALF = (torch.bfloat16, torch.float16)
_INDEXER_QUERY_HEADS = 64
"""TND queries: at most 64 heads (vllm-ascend csrc/attention/lightning_indexer/README.md)."""
_INDEXER_HEAD_DIM = 128
_SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}


def _contiguous_half(name: str, t: torch.Tensor) -> None:
    on_device(name, t)
    check(t.dtype in _HALF, f"{name} must be bfloat16 or float16, got {t.dtype}")
    check(t.is_contiguous(), f"{name} must be contiguous (non-contiguous tensors are not supported)")


def _batches(actual_seq_lengths_query: torch.Tensor | None, tokens: int) -> torch.Tensor:
    """Batch of each TND query token from the cumulative lengths (required for TND)."""
    check(actual_seq_lengths_query is not None, "actual_seq_lengths_query is required when layout_query is TND")
    check(actual_seq_lengths_query.dtype == torch.int32, "actual_seq_lengths_query must be int32")
    ends = actual_seq_lengths_query.long()
    check(bool((ends[1:] >= ends[:-1]).all()) and int(ends[-1]) == tokens,
          f"actual_seq_lengths_query must be non-decreasing prefix sums ending at T={tokens}, got {ends.tolist()}")
    return torch.searchsorted(ends, torch.arange(tokens), right=True)


def _paged_keys(key: torch.Tensor, block_table: torch.Tensor, batch: int) -> torch.Tensor:
    """PA_BSND [blocks, block_size, N2, D] -> this batch's [S2_max, N2, D] through its block-table row."""
    return key[block_table[batch].long()].flatten(0, 1)


def npu_lightning_indexer(
    query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None, block_table=None,
    layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3, pre_tokens=9223372036854775807,
    next_tokens=9223372036854775807, return_value=False,
):
    """Top-``sparse_count`` keys per query token by ``I(t, s) = sum_h w[t, h] relu(q[t, h] . k[s])``.

    Emulated layouts: query TND [T, N1, 128], key PA_BSND [blocks, block_size, 1, 128] with
    block_table [B, max_blocks], weights [T, N1] -> (sparse_indices [T, 1, sparse_count] int32,
    -1 past the key length; values (empty unless return_value)). sparse_mode 0 sees all
    actual_seq_lengths_key[b] keys; 3 is right-down causal. Equal scores keep the lower index
    first (unspecified by the vendor).
    """
    check(layout_query == "TND" and layout_key == "PA_BSND", "only layout_query='TND' with layout_key='PA_BSND' is emulated")
    for name, t in (("query", query), ("key", key), ("weights", weights)):
        _contiguous_half(name, t)
    check(query.dim() == 3 and key.dim() == 4 and weights.dim() == 2, "query must be [T, N1, D], key [blocks, block_size, N2, D], weights [T, N1]")
    tokens, heads, dim = query.shape
    check(heads <= _INDEXER_QUERY_HEADS, f"query heads must be <= {_INDEXER_QUERY_HEADS} for TND, got {heads}")
    check(dim == _INDEXER_HEAD_DIM and key.shape[3] == dim, f"head dim must be {_INDEXER_HEAD_DIM}, got query {dim}, key {key.shape[3]}")
    check(key.shape[2] == 1, f"key heads N2 must be 1, got {key.shape[2]}")
    check(tuple(weights.shape) == (tokens, heads) and weights.dtype == query.dtype, "weights must be [T, N1] in query's dtype")
    check(sparse_count in _SPARSE_COUNTS, f"sparse_count must be 1-2048 or one of 3072..8192, got {sparse_count}")
    check(sparse_mode in (0, 3), f"sparse_mode must be 0 or 3, got {sparse_mode}")
    check(pre_tokens == 9223372036854775807 and next_tokens == 9223372036854775807, "pre_tokens/next_tokens only support the default")
    check(block_table is not None and block_table.dtype == torch.int32 and block_table.dim() == 2, "PA_BSND needs a 2-D int32 block_table")
    check(actual_seq_lengths_key is not None and actual_seq_lengths_key.dtype == torch.int32, "actual_seq_lengths_key (int32) is required")
    batch_of = _batches(actual_seq_lengths_query, tokens)
    check(block_table.shape[0] == actual_seq_lengths_key.shape[0] == actual_seq_lengths_query.shape[0],
          "block_table, actual_seq_lengths_key and actual_seq_lengths_query must have B rows")
    check(int(actual_seq_lengths_key.max()) <= block_table.shape[1] * key.shape[1],
          "block_table has fewer blocks than the longest actual_seq_lengths_key needs")

    starts = torch.cat((torch.zeros(1, dtype=torch.long), actual_seq_lengths_query.long()[:-1]))
    out = torch.full((tokens, 1, sparse_count), -1, dtype=torch.int32)
    for t in range(tokens):
        b = int(batch_of[t])
        n_keys = int(actual_seq_lengths_key[b])
        if sparse_mode == 3:
            s1 = int(actual_seq_lengths_query[b]) - int(starts[b])
            n_keys = min(n_keys, n_keys - s1 + (t - int(starts[b])) + 1)
        if n_keys <= 0:
            continue
        keys = _paged_keys(key, block_table, b)[:n_keys, 0].float()
        scores = (query[t].float() @ keys.T).relu().mul(weights[t].float()[:, None]).sum(0)
        order = scores.sort(descending=True, stable=True).indices[:sparse_count]
        out[t, 0, : order.numel()] = order.to(torch.int32)
    values = torch.empty(0, dtype=query.dtype)
    return out, values


def npu_sparse_flash_attention(
    query, key, value, sparse_indices, scale_value, *, block_table=None, actual_seq_lengths_query=None,
    actual_seq_lengths_kv=None, query_rope=None, key_rope=None, sparse_block_size=1, layout_query="BSND",
    layout_kv="BSND", sparse_mode=3, pre_tokens=9223372036854775807, next_tokens=9223372036854775807,
    attention_mode=0, return_softmax_lse=False, sinks=None,
):
    """Attention of each query token over the keys its sparse_indices pick, one softmax with an
    optional per-head sink ``exp(sinks[h])`` in the denominator.

    Emulated layouts: query TND [T, N1, D], key = value BSND [B, S2, 1, D], sparse_indices
    [T, 1, K] int32 with the valid indices first and -1 after (the vendor requires it),
    sinks [N1] fp32 (torch-npu >= 2.13) -> (out [T, N1, D] in query's dtype, softmax_max, softmax_sum
    (empty unless return_softmax_lse)). ``s_j = scale_value q . k_j`` in fp32; a query with no valid
    index gets 0.
    """
    if sinks is not None and older_than(2, 13):
        raise TypeError("npu_sparse_flash_attention() got an unexpected keyword argument 'sinks'")
    check(layout_query == "TND" and layout_kv == "BSND", "only layout_query='TND' with layout_kv='BSND' is emulated")
    check(value is not None, "value=None is only supported with CANN >= 9.2.0")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _contiguous_half(name, t)
        check(t.numel() > 0, f"Input {name} should not be empty.")
    check(query.dim() == 3, f"When the layout of query is TND, the query dimension must be 3, but got {query.dim()}")
    check(key.dim() == 4 and key.shape[2] == 1, f"key must be BSND [B, S2, 1, D], got {list(key.shape)}")
    check(value.shape == key.shape and value.dtype == query.dtype == key.dtype, "key and value must match query's dtype and each other's shape")
    check(query_rope is None and key_rope is None and attention_mode == 0, "only attention_mode=0 without rope splits is emulated")
    check(sparse_block_size == 1, f"sparse_block_size must be 1, got {sparse_block_size}")
    check(sparse_mode in (0, 3), f"sparse_mode must be 0 or 3, got {sparse_mode}")
    check(sparse_indices.dtype == torch.int32 and sparse_indices.dim() == 3 and sparse_indices.is_contiguous(),
          "sparse_indices must be a contiguous [T, KV_N, sparse_size] int32 tensor")
    tokens, heads, dim = query.shape
    check(sparse_indices.shape[:2] == (tokens, 1), f"sparse_indices must be [T={tokens}, 1, K], got {list(sparse_indices.shape)}")
    valid = sparse_indices[:, 0] >= 0
    check(bool((valid[:, 1:] <= valid[:, :-1]).all()), "sparse_indices: each row's valid indices must come first, -1 after")
    batch_of = _batches(actual_seq_lengths_query, tokens)
    lengths = actual_seq_lengths_kv.long() if actual_seq_lengths_kv is not None else torch.full((key.shape[0],), key.shape[1])
    check(bool((sparse_indices[:, 0].long() < lengths[batch_of][:, None]).all()), "sparse_indices out of the key length")
    if sinks is not None:
        check(sinks.dtype == torch.float32 and tuple(sinks.shape) == (heads,), f"sinks must be [N1={heads}] float32")

    out = torch.zeros(tokens, heads, dim, dtype=query.dtype)
    for t in range(tokens):
        picked = sparse_indices[t, 0][valid[t]].long()
        if picked.numel() == 0:
            continue
        k = key[batch_of[t], picked, 0].float()
        v = value[batch_of[t], picked, 0].float()
        s = scale_value * (query[t].float() @ k.T)
        m = s.amax(-1, keepdim=True)
        if sinks is not None:
            m = torch.maximum(m, sinks[:, None])
        p = (s - m).exp()
        denominator = p.sum(-1, keepdim=True) + ((sinks[:, None] - m).exp() if sinks is not None else 0.0)
        out[t] = (p @ v / denominator).to(query.dtype)
    empty = torch.empty(0, dtype=torch.float32)
    return out, empty, empty
