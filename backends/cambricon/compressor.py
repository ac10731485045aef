"""kv_compress on tmo: ``fused_compress_multi_kv`` pools a prefill; norm and RoPE follow in torch.

``tmo.fused_compress_multi_kv(kv, score, kv_state, score_state, cu_seqlens, batch_ids, ape,
max_seqlen, overlap, compressed_kv)`` is the prefill half of Cambricon's V4 compressor (vllm-mlu's
``Compressor.forward_prefill``): sequences packed as ``[sum S_b, coff*d]`` rows with ``cu_seqlens``,
``batch_ids`` naming each sequence's state row, the pooled (pre-norm) entries written to
``compressed_kv [sum S_b // m, d]`` and the states left holding the tail, all from position 0. As
there, the entries are then cast to ``out_dtype``, RMS-normed and rotated at ``j*m`` in torch.

Decode steps (``start_pos > 0``) run on the portable path: tmo's decode kernel
``fused_compress_single_kv`` fuses norm, RoPE, the Hadamard rotation and the paged-cache write,
which has no seahal op boundary to match (the cache write belongs to the model here).
"""

from __future__ import annotations

import torch
from seahal.backends.cpu.reference.rope import rotate_pairs

from . import tmo
from .route import portable

_DTYPES = (torch.float32, torch.bfloat16)


def _finish(pooled: torch.Tensor, norm_weight: torch.Tensor, rope_freqs: torch.Tensor, ratio: int, eps: float,
            out_dtype: torch.dtype) -> torch.Tensor:
    """pooled [B, n, d] fp32 -> out_dtype -> RMSNorm -> out_dtype -> RoPE at ``j*m`` -> out_dtype."""
    x = pooled.to(out_dtype).float()
    normed = (norm_weight.float() * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)).to(out_dtype)
    positions = torch.arange(pooled.shape[1], device=pooled.device, dtype=torch.float32) * ratio
    return rotate_pairs(normed.float(), positions[:, None] * rope_freqs.float()).to(out_dtype)


def kv_compress(
    kv: torch.Tensor,
    score: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    rope_freqs: torch.Tensor,
    kv_state: torch.Tensor,
    score_state: torch.Tensor,
    ratio: int,
    overlap: bool,
    start_pos: int,
    norm_eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Compress tokens [start_pos, start_pos + S) (contract: ``hal.ops.compressor.kv_compress``).

    kv, score: [B, S, coff*d] fp32, ape: [m, coff*d], kv_state/score_state: [B, coff*m, coff*d]
    fp32 (updated in place) -> [B, new entries, d] in out_dtype (default bf16).
    """
    out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
    why = tmo.lacks("fused_compress_multi_kv")
    if start_pos != 0:
        why = "decode step (start_pos > 0): fused_compress_single_kv writes the paged cache itself"
    elif kv.dtype not in _DTYPES or score.dtype != kv.dtype or out_dtype not in _DTYPES:
        why = f"kv/score {kv.dtype}/{score.dtype}, out_dtype {out_dtype} (tmo: fp32/bf16)"
    if why is not None:
        return portable("kv_compress", why)(
            kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, ratio, overlap, start_pos, norm_eps,
            out_dtype,
        )
    batch, seq, channels = kv.shape
    d = channels // (2 if overlap else 1)
    per_seq = seq // ratio
    lengths = torch.full((batch,), seq, dtype=torch.int32, device=kv.device)
    cu_seqlens = torch.cat((lengths.new_zeros(1), lengths.cumsum(0, dtype=torch.int32)))
    pooled = torch.empty(batch * per_seq, d, dtype=kv.dtype, device=kv.device)
    tmo.call(
        "fused_compress_multi_kv",
        kv=kv.reshape(batch * seq, channels).contiguous(),
        score=score.reshape(batch * seq, channels).contiguous(),
        kv_state=kv_state,
        score_state=score_state,
        cu_seqlens=cu_seqlens,
        batch_ids=torch.arange(batch, dtype=torch.int32, device=kv.device),
        ape=ape.float().contiguous(),
        max_seqlen=seq,
        overlap=overlap,
        compressed_kv=pooled,
    )
    return _finish(pooled.float().reshape(batch, per_seq, d), norm_weight, rope_freqs, ratio, norm_eps, out_dtype)
