"""KV compressor: gated softmax pooling of m tokens per entry (CSA overlapped, HCA plain)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..checks import Contract
from ..formats import scatter_rows
from ..spec import Out, define_op
from .quant import check_slots, kv_geometry, kv_record_bytes

F32 = (torch.float32, torch.float64)


def compressor_width(ratio: int, overlap: bool) -> int:
    """coff: 2 for the overlapped CSA compressor (a and b halves), else 1."""
    return 2 if overlap else 1


def compressor_state(batch: int, ratio: int, dim: int, overlap: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh (reset) streaming state: ``kv_state`` zeros and ``score_state`` -inf, both
    ``[batch, coff*ratio, coff*dim]`` fp32."""
    coff = compressor_width(ratio, overlap)
    shape = (batch, coff * ratio, coff * dim)
    kv = torch.zeros(shape, dtype=torch.float32, device=device)
    score = torch.full(shape, float("-inf"), dtype=torch.float32, device=device)
    return kv, score


def new_entries(start_pos: int | torch.Tensor, seq_len: int, ratio: int) -> int | torch.Tensor:
    """Entries completed by tokens [start_pos, start_pos + seq_len): floor((start+S)/m) - floor(start/m),
    computed as floor((start mod m + S)/m), equal for start >= 0 (a tensor for a tensor start_pos:
    three device ops a ratio in a decode step's graph instead of four)."""
    return (start_pos % ratio + seq_len) // ratio


def most_new_entries(seq_len: int, ratio: int) -> int:
    """The most entries S tokens complete at any position: ceil(S/m) (a block boundary inside
    every m tokens); the rows of kv_compress's output at a tensor start_pos."""
    return -(-seq_len // ratio)


@define_op(
    "kv_compress",
    family="compressor",
    schema=(
        "(Tensor kv, Tensor score, Tensor ape, Tensor norm_weight, Tensor rope_freqs, "
        "Tensor(a!) kv_state, Tensor(b!) score_state, int ratio, bool overlap, int start_pos, "
        "float norm_eps=1e-6, ScalarType? out_dtype=None) -> Tensor"
    ),
    mutates=("kv_state", "score_state"),
    position="start_pos",
)
def kv_compress(
    kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, ratio, overlap, start_pos, norm_eps=1e-6,
    out_dtype=None,
):
    """Compress tokens [start_pos, start_pos + S) into the entries their blocks complete.

    kv, score: [B, S, coff*d] fp32 (the projections ``x Wkv^T`` and ``x Wgate^T``),
    ape: [m, coff*d] fp32, norm_weight: [d], rope_freqs: [r/2] fp32 (r = rope dims, the last r of d),
    kv_state, score_state: [B, coff*m, coff*d] fp32, updated in place
    -> entries: [B, new_entries(start_pos, S, m), d] in out_dtype (default bf16, the official precision)

    ``start_pos``: an int, or an integer tensor on the inputs' device (the position as data, for
    captured or traced graphs), 0-d or [B] (sequence b at start_pos[b], its own reset and state):
    then entries has ``most_new_entries(S, m)`` rows, each sequence's new entries first and zeros
    after.

    Token t has gate score ``z_t = score_t + ape[t mod m]``. Entry j pools per channel with a
    softmax over its slots: plain (HCA) over the m tokens of block j; overlapped (CSA, coff=2) over
    the a-halves of block j-1 (zero weight for j=0) and the b-halves of block j. Each pooled
    vector is cast to out_dtype, RMS-normed with norm_weight, and its last r dims are rotated
    (interleaved pairs) at position ``j*m``. The state keeps the incomplete block (slots
    ``[coff*m - m + t mod m]``) and, when overlapped, the previous complete block (slots [0, m));
    ``start_pos == 0`` ignores the incoming state (a reset). Empty slots are kv=0, score=-inf.
    For ``start_pos > 0`` the incoming state must be one this op left (or a fresh one): the slots
    past the held tokens empty. Kernels may rely on it and rewrite only the slots that change.
    """
    c = Contract("kv_compress")
    batch, n_new, d = _check_compress(
        c, kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, ratio, overlap, start_pos
    )
    dtype = torch.bfloat16 if out_dtype is None else out_dtype
    c.choice("out_dtype", dtype, (torch.bfloat16, torch.float32, torch.float64))
    return Out((batch, n_new, d), dtype)


def _check_compress(
    c: Contract, kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, ratio, overlap, start_pos
) -> tuple[int, int, int]:
    """The checks kv_compress and kv_compress_fp8 share -> (B, new entries, d)."""
    c.positive("ratio", ratio)
    coff = compressor_width(ratio, overlap)
    c.tensor("kv", kv, ["B", "S", "C"], F32)
    c.tensor("score", score, ["B", "S", "C"], F32)
    c.require(c.dims["C"] % coff == 0, f"kv's last dim must be {coff}*d, got {c.dims['C']}")
    d = c.dims["C"] // coff
    c.tensor("ape", ape, [ratio, "C"], F32)
    c.tensor("norm_weight", norm_weight, [d], (torch.float32, torch.bfloat16, torch.float64))
    c.tensor("rope_freqs", rope_freqs, ["R"], F32)
    c.require(2 * c.dims["R"] <= d, f"rope_freqs covers {2 * c.dims['R']} dims, more than d={d}")
    c.tensor("kv_state", kv_state, ["B", coff * ratio, "C"], (torch.float32,))
    c.tensor("score_state", score_state, ["B", coff * ratio, "C"], (torch.float32,))
    position = c.position("start_pos", start_pos)
    seq_len = c.dims["S"]
    rows = most_new_entries(seq_len, ratio) if position is None else new_entries(position, seq_len, ratio)
    return c.dims["B"], rows, d


@define_op(
    "kv_compress_fp8",
    family="compressor",
    schema=(
        "(Tensor kv, Tensor score, Tensor ape, Tensor norm_weight, Tensor rope_freqs, "
        "Tensor(a!) kv_state, Tensor(b!) score_state, int ratio, bool overlap, int start_pos, "
        "float norm_eps=1e-6, int rope_dim=64, int tile=64) -> Tensor"
    ),
    mutates=("kv_state", "score_state"),
    position="start_pos",
)
def kv_compress_fp8(
    kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, ratio, overlap, start_pos, norm_eps=1e-6,
    rope_dim=64, tile=64,
):
    """kv_compress whose new entries come as packed FP8 KV cache records (v4_ops.md §7 then §12).

    Arguments and state update as :func:`kv_compress`; rope_dim, tile: the record geometry (V4:
    64, 64) -> records: [B, new_entries(start_pos, S, m), kv_record_bytes(d, rope_dim, tile)] uint8
    (584 bytes for d = 512); at a tensor start_pos most_new_entries(S, m) rows, zero bytes after the
    new ones.

    ``records = kv_cache_pack(kv_compress(..., out_dtype=bf16), rope_dim, tile)``: each entry is
    rounded to bf16 (the official precision) at every step kv_compress rounds, then its first
    ``d - rope_dim`` dims are quantised to e4m3 in 1 x tile ue8m0 tiles and its last rope_dim dims
    stored as bf16 bytes. A kernel may fuse the two (the entry never leaves registers).
    """
    c = Contract("kv_compress_fp8")
    batch, n_new, d = _check_compress(
        c, kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, ratio, overlap, start_pos
    )
    kv_geometry(c, "d", d, rope_dim, tile)
    return Out((batch, n_new, kv_record_bytes(d, rope_dim, tile)), torch.uint8)


@define_op(
    "kv_compress_store",
    family="compressor",
    schema=(
        "(Tensor kv, Tensor score, Tensor ape, Tensor norm_weight, Tensor rope_freqs, "
        "Tensor(a!) kv_state, Tensor(b!) score_state, int ratio, bool overlap, int start_pos, "
        "Tensor(c!) store, Tensor slots, float norm_eps=1e-6, int rope_dim=64, int tile=64) -> ()"
    ),
    mutates=("kv_state", "score_state", "store"),
    position="start_pos",
)
def kv_compress_store(
    kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, ratio, overlap, start_pos, store, slots,
    norm_eps=1e-6, rope_dim=64, tile=64,
):
    """kv_compress_fp8 whose records go straight into their cache rows: the compressed layer's
    cache write, as ``kv_cache_store`` is the window's (a step's records need no scatter of their own).

    Arguments and state update as :func:`kv_compress_fp8`; store: [B, N, kv_record_bytes(d,
    rope_dim, tile)] uint8 (any strides), slots: [B or 1, n] int32/int64 with n the rows
    kv_compress_fp8 returns (new_entries(start_pos, S, m), at a tensor start_pos most_new_entries(S,
    m)) -> nothing; ``store[b, slots[b, i]] = kv_compress_fp8(...)[b, i]``, the other rows
    untouched. At a tensor position a sequence's rows past its new entries are zero bytes, stored
    too (the model gives them the row after its valid entries, which the next entry overwrites).

    Each sequence's slots must be distinct and in [0, N): as for ``kv_cache_store``, their values
    are data the contract never reads; the reference raises on a slot out of range, a kernel must
    not write there.
    """
    c = Contract("kv_compress_store")
    _, n_new, d = _check_compress(
        c, kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, ratio, overlap, start_pos
    )
    kv_geometry(c, "d", d, rope_dim, tile)
    c.tensor("store", store, ["B", "N", kv_record_bytes(d, rope_dim, tile)], (torch.uint8,))
    check_slots(c, slots, n_new)
    return ()


def compress_then_store(kv_compress_fp8: Callable[..., torch.Tensor]) -> Callable[..., None]:
    """kv_compress_store from a kernel of kv_compress_fp8: its records, scattered into their rows
    (:func:`seahal.hal.formats.scatter_rows`); zero rows appended first where the kernel returned
    fewer rows than the slots name (one that took a tensor position as an int, read on the host,
    returns that int position's rows). A backend without a fused kernel registers this of its own
    kv_compress_fp8."""

    def kv_compress_store(
        kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, ratio, overlap, start_pos, store, slots,
        norm_eps=1e-6, rope_dim=64, tile=64,
    ) -> None:
        records = kv_compress_fp8(kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, ratio, overlap,
                                  start_pos, norm_eps, rope_dim, tile)
        missing = slots.shape[1] - records.shape[1]
        if missing:
            records = torch.nn.functional.pad(records, (0, 0, 0, missing))
        scatter_rows(store, slots, records)

    return kv_compress_store
