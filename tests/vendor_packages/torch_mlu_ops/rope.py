"""``apply_rotary``: rotary embedding of Q or K from full-width sin/cos tables.

From the Torch-MLU-Ops manual v1.3.2, section 5.1.2. ``input`` is [batch, seq, heads, head_size]
(pad mode) or, with ``cu_seqlens`` [batch+1] int32, [total_seqlen, heads, head_size] (pack
mode). ``sin_cache`` and ``cos_cache`` are [rotary_seq_len, rotary_dim]
([batch, rotary_seq_len, rotary_dim] when ``dynamic_ntk``). They are full width: the angle of
pair i sits at both dims it rotates. Only the first ``rotary_dim`` dims of each head are rotated;
the rest pass through. The table row of a token is ``position_ids[t]`` when ``discrete``
(position_ids [total_seqlen] int32). Otherwise it is ``start_b + i`` for the i-th token of
sequence b, with start_b = position_ids[b] ([batch]), or 0 without position_ids.

Cross mode (``interleaved=True``) rotates pairs (2i, 2i+1); fold mode rotates (i, i + rotary_dim/2):
``out = x * cos + rotate(x) * sin`` with ``rotate`` giving (-x_second, x_first) per pair, in fp32.
The manual returns the result as [total_seqlen, heads, head_size]. This emulation also writes it into
``input``, which callers rely on (vllm-mlu's ``MLURotaryEmbedding.forward_oot`` ignores the
returned tensor). Dtypes: the manual lists fp16/bf16 for input and tables and int32 for the
index tensors. float32 is accepted from release 1.12 (``_emulation.FP32_ROTARY_FROM``).
Every caller passes the tables in the input's dtype, and so must the caller here.
"""

from __future__ import annotations

import torch

from ._emulation import check, check_dtype, recorded, settings


def _rows(batch: int, lengths: torch.Tensor, position_ids, discrete: bool, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, table row) of each of the ``total`` tokens."""
    sequence = torch.repeat_interleave(torch.arange(batch), lengths)
    if discrete:
        check(position_ids is not None, "position_ids is required when discrete=True")
        check(position_ids.shape == (total,), f"position_ids must be [{total}] when discrete, got {list(position_ids.shape)}")
        return sequence, position_ids.long()
    starts = torch.zeros(batch, dtype=torch.long) if position_ids is None else position_ids.long()
    check(starts.shape == (batch,), f"position_ids must be [{batch}] when not discrete, got {list(starts.shape)}")
    first = torch.cumsum(lengths, 0) - lengths
    return sequence, starts[sequence] + torch.arange(total) - first[sequence]


@recorded
def apply_rotary(input, sin_cache, cos_cache, position_ids, cu_seqlens, interleaved, discrete, dynamic_ntk,
                 max_seqlen):
    dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if settings["fp32_rotary"] else ())
    check_dtype("input", input, dtypes)
    for name, table in (("sin_cache", sin_cache), ("cos_cache", cos_cache)):
        check(table.dtype == input.dtype, f"{name} dtype must equal input dtype {input.dtype}, but got {table.dtype}")
    check(sin_cache.shape == cos_cache.shape, f"sin_cache {list(sin_cache.shape)} and cos_cache {list(cos_cache.shape)} differ")
    if position_ids is not None:
        check_dtype("position_ids", position_ids, (torch.int32,))
    if cu_seqlens is None:
        check(input.dim() == 4, f"input must be [batch, seq, heads, head_size] without cu_seqlens, got {input.dim()}-D")
        batch, seq = input.shape[:2]
        check(max_seqlen == seq, f"max_seqlen must equal the padded seq_len {seq} in pad mode, got {max_seqlen}")
        lengths = torch.full((batch,), seq)
    else:
        check(input.dim() == 3, f"input must be [total_seqlen, heads, head_size] with cu_seqlens, got {input.dim()}-D")
        check_dtype("cu_seqlens", cu_seqlens, (torch.int32,))
        lengths = cu_seqlens.long().diff()
        batch = lengths.numel()
        check(int(cu_seqlens[-1]) == input.shape[0], "cu_seqlens[-1] must equal input's total_seqlen")
        check(int(lengths.max()) <= max_seqlen, f"a sequence is longer than max_seqlen={max_seqlen}")
    heads, head_size = input.shape[-2:]
    tokens = input.reshape(-1, heads, head_size)
    check(sin_cache.dim() == (3 if dynamic_ntk else 2),
          f"sin_cache/cos_cache must be {'[batch, ' if dynamic_ntk else '['}rotary_seq_len, rotary_dim], "
          f"got {list(sin_cache.shape)}")
    rows, dim = sin_cache.shape[-2:]
    check(dim % 2 == 0 and dim <= head_size, f"rotary_dim {dim} must be even and at most head_size {head_size}")
    sequence, row = _rows(batch, lengths, position_ids, discrete, tokens.shape[0])
    check(bool(((row >= 0) & (row < rows)).all()), f"table rows must lie in [0, rotary_seq_len={rows})")
    if dynamic_ntk:
        check(sin_cache.shape[0] == batch, f"dynamic_ntk tables must have {batch} batches, got {sin_cache.shape[0]}")
        sin, cos = sin_cache[sequence, row], cos_cache[sequence, row]
    else:
        sin, cos = sin_cache[row], cos_cache[row]

    x = tokens[..., :dim].float()
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        first, second = x.chunk(2, dim=-1)
        turned = torch.cat((-second, first), dim=-1)
    rotated = x * cos.float()[:, None] + turned * sin.float()[:, None]
    input[..., :dim] = rotated.to(input.dtype).reshape(*input.shape[:-1], dim)
    return input.reshape(-1, heads, head_size)
