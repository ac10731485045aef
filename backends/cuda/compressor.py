"""Triton KV compressor (op ``kv_compress``; v4_ops.md §7): gated softmax pooling, RMSNorm, RoPE,
and the streaming state's update, in one launch.

The timeline of a call (the reference's picture): the state's ``held = (coff-1)·m + start_pos mod m``
slots (the previous complete block when overlapped, then the incomplete block), then the S tokens;
it starts at a block boundary. A slot is read straight from where it lives — the carried state
below ``held``, token ``u - held`` after it, with ``z = score + ape[u mod m]`` (``held ≡ start_pos
mod m``) — so the token stream is never concatenated; ``start_pos == 0`` reads the state's slots as
empty (kv 0, z -inf).

Entry k of the call (global index ``j = start_pos // m + k``) pools timeline slots ``u = k·m + i``
for ``i < coff·m``, slot i reading channels ``[(i // m)·d, +d)``: the a-halves of block k and the
b-halves of block k+1 when overlapped, the d channels of block k otherwise. Per channel, an online
softmax over the slots (in chunks of SLOT_BLOCK, one chunk for CSA's 8 slots) pools the values;
the d-vector stays in registers for the norm and the rotation (split by channels, below: it meets
in an L2 workspace). Then, as the reference: ``x = out(pooled)``, ``y = out(w · x · rsqrt(mean(x²)
+ eps))``, the last r dims of y rotated in interleaved pairs by ``fp32(j·m) · f``, cast to
out_dtype (RNE, :func:`cast_rne`).

The new state is timeline slots ``n_new·m + s`` (the last ``coff - 1`` complete blocks and the
incomplete one), then empty slots. Only the first ``lead = min(n_new, ceil(held / m))`` entries
reach into a carried state (none from a reset), so one program per sequence computes those
entries, then writes the state after a barrier: no other program reads the state, and within the
program every slot is read before it is overwritten. The other ``n_new - lead`` programs of the
sequence compute one entry each.

Channel split (decode, short chunks, HCA prefill). Pooling and the state are per channel; only the
entry's RMS norm needs all d of them. When a call has few entries a sequence (the most,
``ceil(S / m)``, is what counts), each of those programs is cut into CSPLIT programs of d / CSPLIT
channels (:func:`channel_split`; a power of two, channel blocks of >= 32): program (b, q, c)
pools its channels of each entry, writes its channels of the state (slots of both halves at once),
and stores the pooled channels to an fp32 workspace row; the last of an entry's CSPLIT programs to
arrive (a counter per entry, reset by it: the split-K pattern of :mod:`._gemm`) reads the row back
through L2 and finishes the entry (norm, rotation, store or record). Each state channel still has
one program that reads and writes it, so the ordering above holds per channel. An HCA decode
step (128 slots x 512 channels of kv and score read, 127 slots emptied: 1 MB) is 16 programs of
64 KB instead of one; a CSA step 16 of ~6 KB. CSPLIT depends on d, m and S only, never on B or
start_pos: a sequence's entries have the same bits whatever is batched with it and however its
position is given; calls of different S may pool in other tile shapes (fp32 rounding order only).

Precondition of ``start_pos > 0``: the state's slots from ``held`` on are empty, as in every state
this op or :func:`compressor_state` leaves. Only slots that change are written then (a decode step
without a new entry writes one slot, not coff·m); the reference rewrites every slot, so a carried
state with data in its unused slots would keep it here (entries are unaffected: no call reads
them). Numerics differ from the reference only in fp32 rounding order (online softmax,
sum(p·kv)/sum(p) instead of normalised weights, the RMS sum) and in cos/sin: within the
conformance tolerance of ``kv_compress``; the state is bitwise (copies and one fp32 add).

The position as data (CUDA-graph decode): ``start_pos`` may be an int32/int64 tensor on kv's device,
0-d (every sequence at that position) or [B] (sequence b at ``start_pos[b]``: sequences of
different lengths decoding together), read only by the kernel (POS_FROM_PTR, at ``pos_ptr + b *
stride``, stride 0 for a 0-d tensor), so one captured launch serves every position. The host
cannot know how many entries the call completes, so the output has ``ceil(S / m)`` rows (the most
any position completes) and the grid one program per row plus the state's: sequence b's rows past
``new_entries(p_b, S, m)`` are zeros, its first ones and its state exactly the int path's on its
slice at p_b (its own reset at p_b = 0). The lead,
held and changed-slot scalars are computed in the kernel (:func:`_timeline`); the int path's launch
is unchanged. Cost: one compiled variant serves every position (no reset-only variant without the
state loads), and a decode step runs two programs a sequence (each cut by channels) instead of one:
the second writes the zero row when no block completes and is idle when one does (the first
computes that entry).

``kv_compress_fp8`` is the same launch with the record constexprs set: the entry, rounded to bf16
as kv_compress would store it, is packed in registers into the FP8 KV record (v4_ops.md §12) by the
device functions of :mod:`.quant`'s ``kv_cache_pack``, so it equals ``kv_cache_pack(kv_compress(
..., out_dtype=bf16))`` of this backend bit for bit, without the bf16 round trip through memory.
``kv_compress_store`` is that launch writing each record to the store's row its slot names
(``STORE``) instead of to a fresh output: the records a captured step would otherwise scatter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from seahal.hal.ops.compressor import compress_then_store, compressor_width
from seahal.hal.ops.quant import kv_record_bytes

from ._cache_keys import settle_cache_keys
from ._gemm import arrival_counters, reset_arrival_counter
from ._host import cdiv, next_power_of_2
from ._numerics import cast_rne, fp8_quantize_tiles
from ._pdl import pdl_options, wait_for_prior_grid
from ._position import load_position, position_stride
from .quant import bf16_bytes, e8m0_bytes, slot_rows

ELEMENTS_PER_CHUNK = 4096
"""Slot-chunk size in elements (slots x channels of a program) of the entries' pooling: CSA's
8 x 512 in one chunk, HCA's 128 slots in 16 (in one at 32 channels a program). The state is
written in chunks of half as many elements (slots x both halves' channels): its loads stay live
across a barrier (ptxas for sm_90, CSA d=512 from a reset: 186 registers a thread with whole
chunks, 111 with halves, 90 without the state write). Not measured on a GPU yet (TUNING.md)."""
CHANNEL_PROGRAMS = 1024
"""A call's programs per sequence that :func:`channel_split` aims at (entries x channel blocks):
a decode step takes the most channel blocks; HCA prefill of 8192 tokens (64 entries) 8 blocks of
64; CSA prefill (2048 entries and more) none."""
MIN_CHANNEL_BLOCK = 32
"""Narrowest channel block on the GPU: a slot's channels are one 128-byte line of fp32."""


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
    start_pos: int | torch.Tensor,
    norm_eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Compress tokens [start_pos, start_pos + S) into the entries their blocks complete.

    kv, score: [B, S, coff·d] fp32 (any strides), ape: [m, coff·d] fp32, norm_weight: [d] fp32/bf16,
    rope_freqs: [r/2] fp32, kv_state, score_state: [B, coff·m, coff·d] fp32 (updated in place),
    start_pos: an int, or an int32/int64 tensor on kv's device, 0-d or [B] (a position per
    sequence) -> [B, new_entries, d] in out_dtype (bf16 or fp32; default bf16), at a tensor
    position [B, ceil(S / m), d] with zero rows after each sequence's new entries. Semantics: the
    module docstring.
    """
    dtype = torch.bfloat16 if out_dtype is None else out_dtype
    return _compress(
        "kv_compress", (kv, score, ape, norm_weight, rope_freqs, kv_state, score_state), ratio, overlap, start_pos,
        norm_eps, lambda d: (d, dtype), {},
    )


def kv_compress_fp8(
    kv: torch.Tensor,
    score: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    rope_freqs: torch.Tensor,
    kv_state: torch.Tensor,
    score_state: torch.Tensor,
    ratio: int,
    overlap: bool,
    start_pos: int | torch.Tensor,
    norm_eps: float = 1e-6,
    rope_dim: int = 64,
    tile: int = 64,
) -> torch.Tensor:
    """kv_compress with its bf16 entries packed in registers into FP8 KV records, in the same launch.

    Arguments as :func:`kv_compress`; -> [B, new_entries, kv_record_bytes(d, rope_dim, tile)] uint8
    (ceil(S / m) rows at a tensor position, zero bytes after each sequence's new entries),
    bit for bit ``quant.kv_cache_pack(kv_compress(..., out_dtype=bf16), rope_dim, tile)``: the entry is
    rounded to bf16 as kv_compress stores it, then quantised by the same device functions. tile must
    be a power of two (the entry is split into tiles by a register reshape).
    """
    return _compress_records("kv_compress_fp8", (kv, score, ape, norm_weight, rope_freqs, kv_state, score_state),
                             ratio, overlap, start_pos, norm_eps, rope_dim, tile)


def kv_compress_store(
    kv: torch.Tensor,
    score: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    rope_freqs: torch.Tensor,
    kv_state: torch.Tensor,
    score_state: torch.Tensor,
    ratio: int,
    overlap: bool,
    start_pos: int | torch.Tensor,
    store: torch.Tensor,
    slots: torch.Tensor,
    norm_eps: float = 1e-6,
    rope_dim: int = 64,
    tile: int = 64,
) -> None:
    """:func:`kv_compress_fp8` whose records go straight to their rows: ``store[b, slots[b, i]] =
    record i of sequence b``, in the same launch (the kernel's STORE: each row's pointer from its
    slot), where the records then a scatter take two (a compressed layer's decode step writes its
    entry this way). store: [B, N, record] uint8 with contiguous records (else the records, then
    torch's scatter), slots: [B or 1, rows] int32/int64, rows as kv_compress_fp8 returns them."""
    tensors = (kv, score, ape, norm_weight, rope_freqs, kv_state, score_state)
    if store.stride(-1) != 1:
        _records_then_scatter(*tensors, ratio, overlap, start_pos, store, slots, norm_eps, rope_dim, tile)
        return
    rows = {**slot_rows(slots, store), "STORE": True}
    _compress_records("kv_compress_store", tensors, ratio, overlap, start_pos, norm_eps, rope_dim, tile, (store, rows))


_records_then_scatter = compress_then_store(kv_compress_fp8)
"""kv_compress_store as this backend's kv_compress_fp8, then torch's scatter (records not contiguous)."""


def _compress_records(
    op: str, tensors: tuple[torch.Tensor, ...], ratio: int, overlap: bool, start_pos: int | torch.Tensor,
    norm_eps: float, rope_dim: int, tile: int, store: tuple[torch.Tensor, dict] | None = None,
) -> torch.Tensor:
    """:func:`_compress` of FP8 records (kv_compress_fp8, kv_compress_store)."""
    if tile & (tile - 1):
        raise NotImplementedError(f"cuda.triton {op}: tile must be a power of two, got {tile}")

    def geometry(d: int) -> tuple[int, torch.dtype]:
        return kv_record_bytes(d, rope_dim, tile), torch.uint8

    return _compress(op, tensors, ratio, overlap, start_pos, norm_eps, geometry, {"ROPE": rope_dim, "TILE": tile}, store)


def _compress(
    op: str, tensors: tuple[torch.Tensor, ...], ratio: int, overlap: bool, start_pos: int | torch.Tensor,
    norm_eps: float, out_row: Callable[[int], tuple[int, torch.dtype]], record: dict[str, int],
    store: tuple[torch.Tensor, dict] | None = None,
) -> torch.Tensor:
    """Launch the kernel for ``op``: ``out_row(d)`` gives an output row's width and dtype; ``record``
    (ROPE, TILE) asks for packed FP8 records instead of entries (empty: entries); ``store`` (a
    store and the kernel's row arguments, :func:`kv_compress_store`) has the rows written into the
    store, which is returned, instead of a fresh output. A tensor ``start_pos`` is read by the
    kernel only (module docstring: the position as data)."""
    kv, score, ape, norm_weight, rope_freqs, kv_state, score_state = tensors
    for name, t in (("kv", kv), ("score", score), ("ape", ape), ("rope_freqs", rope_freqs)):
        if t.dtype != torch.float32:
            raise NotImplementedError(f"cuda.triton {op}: {name} must be float32, got {t.dtype} (fp32 math)")
    batch, seq_len, channels = kv.shape
    coff = compressor_width(ratio, overlap)
    d = channels // coff
    if d % 2:
        raise NotImplementedError(f"cuda.triton {op}: d must be even (rope pairs), got {d}")
    if isinstance(start_pos, torch.Tensor):
        # every position's launch: ceil(S / m) rows (the most a chunk completes), one program per row
        pos_stride = position_stride(op, start_pos, batch, kv.device)
        pos_ptr, carried, rows = start_pos, False, cdiv(seq_len, ratio)
        lead = held = first_entry = lo = hi = 0  # derived in the kernel (_timeline)
        programs = 1 + rows
    else:
        pos_ptr, pos_stride, carried = None, None, start_pos > 0
        held = (coff - 1) * ratio + start_pos % ratio
        rows = n_new = (held + seq_len) // ratio - (coff - 1)
        lead = min(n_new, -(-held // ratio)) if carried else 0
        lo, hi = _changed_slots(held, seq_len, n_new, ratio, coff * ratio, carried)
        first_entry = start_pos // ratio
        programs = 1 + n_new - lead
    width, dtype = out_row(d)
    out, destination = store if store is not None else (torch.empty((batch, rows, width), dtype=dtype, device=kv.device), {})
    if batch > 0:
        d_p2 = next_power_of_2(d)
        split = channel_split(d, seq_len, ratio, kv.device)
        block = d_p2 // split
        slot_block = min(next_power_of_2(coff * ratio), max(1, ELEMENTS_PER_CHUNK // block))
        state_block = min(next_power_of_2(coff * ratio), max(1, ELEMENTS_PER_CHUNK // (2 * coff * block)))
        entries = batch * rows if split > 1 else 0  # entries finished through the workspace
        pooled = torch.empty((entries, d_p2), dtype=torch.float32, device=kv.device)
        _kv_compress_kernel[(batch * programs, split)](
            kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, out, pooled,
            arrival_counters(entries, kv.device), pos_ptr,
            pos_stride, rows, lead, held, seq_len, first_entry, lo, hi, norm_eps,
            *kv.stride(), *score.stride(), *ape.stride(), norm_weight.stride(0), rope_freqs.stride(0),
            *kv_state.stride(), *score_state.stride(),
            RATIO=ratio, COFF=coff, D=d, D_P2=d_p2, PAIRS=rope_freqs.shape[0], SPLIT=split, BLOCK=block,
            SLOT_BLOCK=slot_block, STATE_BLOCK=state_block, CARRIED=carried,
            POS_FROM_PTR=pos_ptr is not None, ROW=width, ROPE=record.get("ROPE", 0), TILE=record.get("TILE", 0),
            **destination, **pdl_options(),
        )
    return out


def channel_split(d: int, seq_len: int, ratio: int, device: torch.device) -> int:
    """Programs an entry's (and the state's) channels are cut into: the largest power of two that
    keeps blocks of >= :data:`MIN_CHANNEL_BLOCK` channels and ``(ceil(S / m) + 1) x split <=
    CHANNEL_PROGRAMS``. On CPU (the interpreter) at most 4 blocks of >= 8, so the tests split
    small vectors and V4's stay quick.

    V4 (d = 512): a decode step 16 (HCA and CSA), HCA prefill of 8192 tokens 8, CSA prefill of
    8192 tokens 1; the indexer's compressor (d = 128) decodes in 4. Depends on the call's geometry
    and S only (module docstring: the bits of an entry)."""
    d_p2 = next_power_of_2(d)
    widest = max(1, d_p2 // MIN_CHANNEL_BLOCK if device.type == "cuda" else min(4, d_p2 // 8))
    per_sequence = cdiv(seq_len, ratio) + 1
    split = 1
    while 2 * split <= widest and per_sequence * 2 * split <= CHANNEL_PROGRAMS:
        split *= 2
    return split


def _changed_slots(held: int, seq_len: int, n_new: int, ratio: int, slots: int, carried: bool) -> tuple[int, int]:
    """The state slots [lo, hi) a call rewrites.

    The new state keeps ``held + S - n_new·m`` timeline slots, then empty ones. From a reset, all
    ``slots``. A carried state is empty from ``held`` on (the precondition), so: with no new entry
    slots [0, held) stay and the S tokens go to [held, held + S); otherwise the kept slots move
    to the front and what is left of the old ``held`` slots is emptied. (:func:`_timeline`: the same
    in the kernel, from a position in memory.)
    """
    if not carried:
        return 0, slots
    kept = held + seq_len - n_new * ratio
    return (held, kept) if n_new == 0 else (0, max(kept, held))


@triton.jit
def _timeline(start_pos, SEQ, RATIO: tl.constexpr, SLOTS: tl.constexpr):
    """(carried, held, n_new, lead, first entry, state lo, state hi) of a call at start_pos: what
    :func:`_compress` and :func:`_changed_slots` compute on the host for an int position."""
    carried = start_pos > 0
    held = SLOTS - RATIO + start_pos % RATIO
    n_new = (held + SEQ) // RATIO - (SLOTS // RATIO - 1)
    lead = tl.where(carried, tl.minimum(n_new, tl.cdiv(held, RATIO)), 0)
    kept = held + SEQ - n_new * RATIO
    lo = tl.where(carried & (n_new == 0), held, 0)
    hi = tl.where(carried, tl.where(n_new == 0, kept, tl.maximum(kept, held)), SLOTS)
    return carried, held, n_new, lead, start_pos // RATIO, lo, hi


@triton.jit(do_not_specialize=["stride_pos", "HELD", "FIRST_ENTRY", "STATE_LO", "STATE_HI"])
def _kv_compress_kernel(
    kv_ptr, score_ptr, ape_ptr, w_ptr, freq_ptr, kv_state_ptr, score_state_ptr, out_ptr, pooled_ptr, counter_ptr,
    pos_ptr, stride_pos, ROWS, LEAD, HELD, SEQ, FIRST_ENTRY, STATE_LO, STATE_HI, eps,
    stride_kb, stride_ks, stride_kc, stride_zb, stride_zs, stride_zc, stride_am, stride_ac, stride_n, stride_f,
    stride_vb, stride_vs, stride_vc, stride_wb, stride_ws, stride_wc,
    RATIO: tl.constexpr, COFF: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, PAIRS: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK: tl.constexpr, SLOT_BLOCK: tl.constexpr, STATE_BLOCK: tl.constexpr,
    CARRIED: tl.constexpr, POS_FROM_PTR: tl.constexpr, ROW: tl.constexpr, ROPE: tl.constexpr, TILE: tl.constexpr,
    PDL: tl.constexpr = False, slot_ptr=None, stride_sb=0, stride_sn=0, stride_ob=0, stride_or=0,
    STORE: tl.constexpr = False,
):
    """Program (b, 0, c): entries [0, lead) of sequence b (all that read its carried state), then its
    state slots [lo, hi); program (b, q > 0, c): entry lead + q - 1; each for the channels of block c
    (BLOCK of D_P2; SPLIT blocks). Out has ROWS rows a sequence.

    The scalars that move with start_pos every decode step are not specialised on their values:
    decode compiles two variants, with and without an entry (SEQ is 1, ROWS = n_new and LEAD 0 or
    1). POS_FROM_PTR: they come from sequence b's position at ``pos_ptr + b * stride_pos`` instead
    (:func:`_timeline`; the host's are unused; stride 0: one position for all) and ROWS is
    ceil(S / m): one variant for every position, and programs past the n_new entries write zero rows
    (channel block 0 the whole row). STORE (kv_compress_store): out is the store [B, N, ROW] and
    row k of sequence b goes to its row ``slots[b, k]`` (:func:`_out_row`).
    """
    wait_for_prior_grid(PDL)
    SLOTS: tl.constexpr = COFF * RATIO
    programs = ROWS + 1 if POS_FROM_PTR else ROWS - LEAD + 1
    b = (tl.program_id(0) // programs).to(tl.int64)
    q = tl.program_id(0) % programs
    block = tl.program_id(1) if SPLIT > 1 else 0
    if POS_FROM_PTR:
        start_pos = load_position(pos_ptr, stride_pos, b)
        carried, held, n_new, lead, first_entry, lo, hi = _timeline(start_pos, SEQ, RATIO, SLOTS)
    else:
        carried, held, n_new, lead, first_entry, lo, hi = CARRIED, HELD, ROWS, LEAD, FIRST_ENTRY, STATE_LO, STATE_HI
    first = tl.where(q == 0, 0, lead + q - 1)
    last = tl.where(q == 0, lead, lead + q)
    if POS_FROM_PTR:  # rows [n_new, ROWS): this position completes fewer entries than the most a chunk can
        if block == 0:
            for k in tl.range(tl.maximum(first, n_new), tl.minimum(last, ROWS)):
                row = _out_row(out_ptr, b, k, ROWS, slot_ptr, stride_sb, stride_sn, stride_ob, stride_or, ROW, STORE)
                _zero_row(row, D_P2, ROW)
        last = tl.minimum(last, n_new)
    for k in tl.range(first, last):
        _write_entry(
            kv_ptr, score_ptr, ape_ptr, w_ptr, freq_ptr, kv_state_ptr, score_state_ptr,
            _out_row(out_ptr, b, k, ROWS, slot_ptr, stride_sb, stride_sn, stride_ob, stride_or, ROW, STORE),
            pooled_ptr, counter_ptr, b * ROWS + k, b, k, block, held, SEQ, first_entry, carried, eps,
            stride_kb, stride_ks, stride_kc, stride_zb, stride_zs, stride_zc, stride_am, stride_ac, stride_n,
            stride_f, stride_vb, stride_vs, stride_vc, stride_wb, stride_ws, stride_wc,
            RATIO, SLOTS, D, D_P2, PAIRS, SPLIT, BLOCK, SLOT_BLOCK, ROW, ROPE, TILE,
        )
    if q == 0:
        _write_state(
            kv_ptr, score_ptr, ape_ptr, kv_state_ptr, score_state_ptr,
            b, block, n_new * RATIO, held, SEQ, lo, hi, carried,
            stride_kb, stride_ks, stride_kc, stride_zb, stride_zs, stride_zc, stride_am, stride_ac,
            stride_vb, stride_vs, stride_vc, stride_wb, stride_ws, stride_wc,
            RATIO, COFF, D, BLOCK, STATE_BLOCK,
        )


@triton.jit
def _out_row(
    out_ptr, b, k, ROWS, slot_ptr, stride_sb, stride_sn, stride_ob, stride_or, ROW: tl.constexpr, STORE: tl.constexpr
):
    """Where row k of sequence b goes: row k of out [B, ROWS, ROW] (contiguous), or (STORE) the
    store's row ``slots[b, k]`` (store [B, N, ROW] with rows stride_or apart, slots [B or 1, ROWS]
    with stride_sb 0 for one row the batch shares)."""
    if STORE:
        slot = tl.load(slot_ptr + b * stride_sb + k * stride_sn).to(tl.int64)
        return out_ptr + b * stride_ob + slot * stride_or
    else:
        return out_ptr + (b * ROWS + k) * ROW


@triton.jit
def _zero_row(row, D_P2: tl.constexpr, ROW: tl.constexpr):
    """ROW zero elements (bytes of a record) of out's dtype at row, D_P2 at a time."""
    for c0 in tl.static_range(0, ROW, D_P2):
        c = c0 + tl.arange(0, D_P2)
        tl.store(row + c, tl.zeros((D_P2,), row.dtype.element_ty), mask=c < ROW)


@triton.jit
def _load_slots(
    kv_ptr, score_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, u, col, live, HELD, SEQ, carried,
    stride_kb, stride_ks, stride_kc, stride_zb, stride_zs, stride_zc, stride_am, stride_ac,
    stride_vb, stride_vs, stride_vc, stride_wb, stride_ws, stride_wc,
    RATIO: tl.constexpr,
):
    """(kv, z) of timeline slots u ([n, 1] int64) at channels col where live: the carried state
    below HELD, token u - HELD with z = score + ape[u mod m] below HELD + SEQ, else empty (0, -inf)."""
    in_state = tl.where(carried, live & (u < HELD), False)  # start_pos 0: empty slots, whatever the state holds
    in_tokens = live & (u >= HELD) & (u < HELD + SEQ)
    t = u - HELD
    kv_v = tl.load(kv_state_ptr + b * stride_vb + u * stride_vs + col * stride_vc, mask=in_state, other=0.0)
    z_v = tl.load(score_state_ptr + b * stride_wb + u * stride_ws + col * stride_wc, mask=in_state,
                  other=float("-inf"))
    kv_t = tl.load(kv_ptr + b * stride_kb + t * stride_ks + col * stride_kc, mask=in_tokens, other=0.0)
    z_t = tl.load(score_ptr + b * stride_zb + t * stride_zs + col * stride_zc, mask=in_tokens, other=0.0)
    z_t += tl.load(ape_ptr + (u % RATIO) * stride_am + col * stride_ac, mask=in_tokens, other=0.0)
    return tl.where(in_tokens, kv_t, kv_v), tl.where(in_tokens, z_t, z_v)


@triton.jit
def _write_entry(
    kv_ptr, score_ptr, ape_ptr, w_ptr, freq_ptr, kv_state_ptr, score_state_ptr, row, pooled_ptr, counter_ptr,
    entry, b, k, block, HELD, SEQ, FIRST_ENTRY, carried, eps,
    stride_kb, stride_ks, stride_kc, stride_zb, stride_zs, stride_zc, stride_am, stride_ac, stride_n, stride_f,
    stride_vb, stride_vs, stride_vc, stride_wb, stride_ws, stride_wc,
    RATIO: tl.constexpr, SLOTS: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, PAIRS: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK: tl.constexpr, SLOT_BLOCK: tl.constexpr, ROW: tl.constexpr, ROPE: tl.constexpr,
    TILE: tl.constexpr,
):
    """The output row at ``row`` (entry k of sequence b, the call's ``entry``-th) = rope(norm(pool(
    slots of entry k))). This program pools the channels of its block; SPLIT > 1: it stores them to
    the workspace row ``entry`` and the last of the SPLIT programs to arrive finishes the row
    (:func:`_finish_entry`)."""
    c = block * BLOCK + tl.arange(0, BLOCK)
    c_ok = c < D
    run_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK,), tl.float32)
    for s0 in tl.range(0, SLOTS, SLOT_BLOCK):
        i = s0 + tl.arange(0, SLOT_BLOCK)
        u = (k * RATIO + i).to(tl.int64)[:, None]  # timeline slot (64-bit: t * stride may pass 2^31 at 1M tokens)
        col = (i // RATIO * D)[:, None] + c[None, :]  # a-half (i < m) or b-half channels
        live = (i < SLOTS)[:, None] & c_ok[None, :]
        values, z = _load_slots(
            kv_ptr, score_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, u, col, live, HELD, SEQ, carried,
            stride_kb, stride_ks, stride_kc, stride_zb, stride_zs, stride_zc, stride_am, stride_ac,
            stride_vb, stride_vs, stride_vc, stride_wb, stride_ws, stride_wc, RATIO,
        )
        # online softmax over slots, per channel; a channel with only empty slots so far keeps 0s
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp(z - shift[None, :])
        scale = tl.exp(run_max - shift)
        run_sum = run_sum * scale + tl.sum(p, axis=0)
        acc = acc * scale + tl.sum(p * values, axis=0)
        run_max = new_max
    pooled = acc / tl.where(c_ok, run_sum, 1.0)  # padding lanes: 0 / 1
    if SPLIT == 1:
        _finish_entry(pooled, row, w_ptr, freq_ptr, FIRST_ENTRY + k, eps, stride_n, stride_f,
                      RATIO, D, D_P2, PAIRS, ROW, ROPE, TILE)
    else:
        workspace = pooled_ptr + entry * D_P2
        tl.store(workspace + c, pooled)
        tl.debug_barrier()
        if tl.atomic_add(counter_ptr + entry, 1, sem="acq_rel") == SPLIT - 1:
            reset_arrival_counter(counter_ptr + entry)
            whole = tl.load(workspace + tl.arange(0, D_P2), cache_modifier=".cg")  # the other programs' blocks too
            _finish_entry(whole, row, w_ptr, freq_ptr, FIRST_ENTRY + k, eps, stride_n, stride_f,
                          RATIO, D, D_P2, PAIRS, ROW, ROPE, TILE)


@triton.jit
def _finish_entry(
    pooled, row, w_ptr, freq_ptr, j, eps, stride_n, stride_f,
    RATIO: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, PAIRS: tl.constexpr, ROW: tl.constexpr,
    ROPE: tl.constexpr, TILE: tl.constexpr,
):
    """The output row at ``row`` from the pooled entry j ([D_P2] fp32, 0 past D), as the reference:
    ``x = out(pooled)``, ``y = out(w · x · rsqrt(mean(x²) + eps))``, the last 2·PAIRS dims of y
    rotated by ``fp32(j·m) · f``: the entry in out's dtype, or (TILE > 0) its bf16 rounding packed
    into a ROW-byte FP8 record."""
    c = tl.arange(0, D_P2)
    c_ok = c < D
    out_dtype = tl.bfloat16 if TILE > 0 else row.dtype.element_ty  # records pack the bf16 entry
    x = cast_rne(pooled, out_dtype).to(tl.float32)
    w = tl.load(w_ptr + c * stride_n, mask=c_ok, other=0.0).to(tl.float32)
    y = cast_rne(w * x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps), out_dtype).to(tl.float32)
    # interleaved RoPE of the last 2·PAIRS dims at position j·m
    a, bb = tl.split(tl.reshape(y, (D_P2 // 2, 2)))
    pair = tl.arange(0, D_P2 // 2) - (D // 2 - PAIRS)  # rope pair index, negative in the nope part
    rotated = (pair >= 0) & (pair < PAIRS)
    freq = tl.load(freq_ptr + pair * stride_f, mask=rotated, other=0.0)
    theta = (j * RATIO).to(tl.float32) * freq
    cos = tl.cos(theta)
    sin = tl.sin(theta)
    a, bb = tl.where(rotated, a * cos - bb * sin, a), tl.where(rotated, a * sin + bb * cos, bb)
    entry = cast_rne(tl.reshape(tl.join(a, bb), (D_P2,)), out_dtype)
    if TILE > 0:
        _store_record(row, entry.to(tl.float32), D, D_P2, ROPE, TILE, ROW)
    else:
        tl.store(row + c, entry, mask=c_ok)


@triton.jit
def _store_record(
    row, x, D: tl.constexpr, D_P2: tl.constexpr, ROPE: tl.constexpr, TILE: tl.constexpr, ROW: tl.constexpr
):
    """x [D_P2] fp32 (bf16 values, padding lanes past D) as the kv_cache_pack record at row:
    e4m3 codes of the nope dims in TILE-wide ue8m0 tiles, the RoPE dims as bf16 bytes, the tiles'
    e8m0 scale bytes, zero padding to ROW. The tiles are a register reshape of x (TILE a power of
    two); the lanes past the nope dims form tiles whose codes and scales are not stored."""
    NOPE: tl.constexpr = D - ROPE
    N_TILES: tl.constexpr = NOPE // TILE
    c = tl.arange(0, D_P2)
    nope = c < NOPE
    q, s = fp8_quantize_tiles(tl.reshape(tl.where(nope, x, 0.0), (D_P2 // TILE, TILE)), True)
    tl.store(row + c, tl.reshape(q, (D_P2,)).to(tl.uint8, bitcast=True), mask=nope)
    rope = (c >= NOPE) & (c < D)
    byte = tl.arange(0, 2)[None, :]
    tl.store(row + NOPE + 2 * (c - NOPE)[:, None] + byte, bf16_bytes(x), mask=rope[:, None])
    tiles = tl.arange(0, D_P2 // TILE)
    tl.store(row + NOPE + 2 * ROPE + tiles, e8m0_bytes(s).to(tl.uint8), mask=tiles < N_TILES)
    pad = N_TILES + tl.arange(0, 8)  # fewer than 8 padding bytes
    tl.store(row + NOPE + 2 * ROPE + pad, tl.zeros((8,), tl.uint8), mask=NOPE + 2 * ROPE + pad < ROW)


@triton.jit
def _write_state(
    kv_ptr, score_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, block, SHIFT, HELD, SEQ, LO, HI, carried,
    stride_kb, stride_ks, stride_kc, stride_zb, stride_zs, stride_zc, stride_am, stride_ac,
    stride_vb, stride_vs, stride_vc, stride_wb, stride_ws, stride_wc,
    RATIO: tl.constexpr, COFF: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, STATE_BLOCK: tl.constexpr,
):
    """State slots s in [LO, HI) <- timeline slot SHIFT + s (SHIFT = n_new·m), at the channels of
    ``block`` in each of the COFF halves, in ascending chunks of STATE_BLOCK slots.

    A chunk's sources (at or above its targets) are all read before the barrier, its targets
    written after it; later chunks read only above this chunk's targets. The first barrier also
    orders this program's entry reads before any write. The loop is not software-pipelined
    (num_stages=1): an asynchronous copy still in flight would not be ordered by the barrier.
    """
    lane = tl.arange(0, COFF * BLOCK)  # both halves' channels of the block: half * D + channel
    channel = block * BLOCK + lane % BLOCK
    col = (lane // BLOCK * D + channel)[None, :]
    for s0 in tl.range(LO - LO % STATE_BLOCK, HI, STATE_BLOCK, num_stages=1):
        s = s0 + tl.arange(0, STATE_BLOCK)
        u = (SHIFT + s).to(tl.int64)[:, None]
        rows = ((s >= LO) & (s < HI))[:, None] & (channel < D)[None, :]
        kv_v, z = _load_slots(
            kv_ptr, score_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, u, col, rows, HELD, SEQ, carried,
            stride_kb, stride_ks, stride_kc, stride_zb, stride_zs, stride_zc, stride_am, stride_ac,
            stride_vb, stride_vs, stride_vc, stride_wb, stride_ws, stride_wc, RATIO,
        )
        tl.debug_barrier()
        slot = s.to(tl.int64)[:, None]
        tl.store(kv_state_ptr + b * stride_vb + slot * stride_vs + col * stride_vc, kv_v, mask=rows)
        tl.store(score_state_ptr + b * stride_wb + slot * stride_ws + col * stride_wc, z, mask=rows)


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
