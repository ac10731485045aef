"""The cuda backend's Triton lightning indexer (ops ``indexer_topk``, ``indexer_topk_packed``): under
the Triton interpreter on CPU.

Three independent judges: the CPU reference kernel (the selection must equal it: these seeded
cases have no near-ties), a float64 brute force of the formula (per query, visible entries sorted
by (-score, index)) written out here, and the conformance suite's selection check (near-ties may
differ, exact ties must go to the smaller index). Packed FP4 / FP8 keys: the in-register decode
equals ``index_key_unpack`` bit for bit on every code and scale byte, and the packed kernel's
ranking keys equal the dense kernel's on the unpacked keys bit for bit. The top-k selection alone
(``select_topk``) against a stable sort of adversarial keys (ties, equal rows, keys one apart,
the extremes), at the interpreter's launch sizes and at the GPU's. Interpreter tests run in a
subprocess with TRITON_INTERPRET=1 (see test_cuda_interpret.py for why); the launches a call makes
are recorded as an H100 would see them in a subprocess without it; the GPU test needs a CUDA device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from seahal.testing.triton_interpreter import require_triton

triton = require_triton()
import triton.language as tl  # noqa: E402

from seahal.backends.cpu.reference.indexer import indexer_topk as reference
from seahal.backends.cpu.reference.indexer import indexer_topk_packed as reference_packed
from seahal.backends.cuda.indexer import _key_tile
from seahal.hal.formats import index_key_bytes, index_key_pack, index_key_unpack

from seahal.testing import triton_interpreter
from seahal.testing.tolerances import checks_for

from cuda_marks import IN_INTERPRETER, interpreted, on_gpu  # noqa: E402


def test_under_interpreter():
    run = triton_interpreter.rerun_test_file(__file__)
    assert run.passed(), run.report


@pytest.fixture(scope="module")
def indexer():
    """The kernel module, imported under the interpreter, with its bf16 dot corrected."""
    from seahal.backends.cuda import indexer

    with triton_interpreter.bf16_dot_fix():
        yield indexer


def _brute_force(q, weights, keys, ratio, start_pos, topk) -> torch.Tensor:
    """int64 [B, S, topk]: per query t, its visible entries sorted by (-float64 score, index), -1 after."""
    batch, seq_len, _, _ = q.shape
    out = torch.full((batch, seq_len, topk), -1, dtype=torch.int64)
    for b in range(batch):
        for s in range(seq_len):
            visible = min(keys.shape[1], (start_pos + s + 1) // ratio)
            logits = q[b, s].double() @ keys[b, :visible].double().T  # [H, visible]
            scores = (weights[b, s].double()[:, None] * logits.clamp(min=0)).sum(0).tolist()
            picked = sorted(range(visible), key=lambda j: (-scores[j], j))[:topk]
            out[b, s, : len(picked)] = torch.tensor(picked, dtype=torch.int64)
    return out


def _inputs(b, s, h, d, n, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=gen).to(dtype)
    keys = torch.randn(b, n, d, generator=gen).to(dtype)
    weights = torch.randn(b, s, h, generator=gen) * (h * d) ** -0.5
    return q, weights, keys


def _selection_ok(got, args) -> None:
    """The conformance suite's judgement of the indices (its tolerance and tie rules)."""
    (compared,) = checks_for("indexer_topk", args)
    verdict = compared.check.compare(got, reference(*args))
    assert verdict.ok, verdict.detail


def _check(indexer, args) -> torch.Tensor:
    got = indexer.indexer_topk(*args)
    topk = args[-1]
    assert got.dtype == torch.int32 and got.shape == (*args[0].shape[:2], topk)
    assert torch.equal(got, reference(*args))
    assert torch.equal(got.long(), _brute_force(*args))
    _selection_ok(got, args)
    return got


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, start_pos", [(300, 1500), (320, 1000)])
def test_decode_long_key_list(indexer, dtype, n, start_pos):
    # one query over 300 entries: 10 splits of the scores, six selection rounds of the top-k (chunk 16);
    # N=320 at t=1000 sees 250: the cache holds future entries
    q, weights, keys = _inputs(2, 1, 4, 32, n, seed=n, dtype=dtype)
    _check(indexer, (q, weights, keys, 4, start_pos, 8))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_causal_visibility(indexer, dtype):
    # 3 heads and d=24: padded heads and columns; 25 queries: a partial query block; early queries
    # see fewer than top-k entries (-1 slots), queries 0..2 see none
    q, weights, keys = _inputs(2, 25, 3, 24, 9, seed=1, dtype=dtype)
    got = _check(indexer, (q, weights, keys, 4, 0, 3))
    assert (got[:, :3] == -1).all() and (got[:, 3, 1:] == -1).all() and (got[:, 11:] >= 0).all()


@interpreted
@pytest.mark.parametrize("ratio, start_pos", [(4, 5), (128, 250)])
def test_chunk_at_start_pos(indexer, ratio, start_pos):
    q, weights, keys = _inputs(1, 12, 4, 16, 5, seed=ratio)
    _check(indexer, (q, weights, keys, ratio, start_pos, 2))


@interpreted
def test_nothing_visible(indexer):
    q, weights, keys = _inputs(2, 3, 4, 16, 1, seed=2)
    assert (indexer.indexer_topk(q, weights, keys, 4, 0, 4) == -1).all()


@interpreted
def test_exact_ties_go_to_the_smaller_entry(indexer):
    # five equal keys spread over splits and selection chunks; query 1 is zero (every score ties at 0)
    q, weights, keys = _inputs(2, 4, 4, 16, 90, seed=3)
    tied = [3, 17, 40, 41, 77]
    keys[:, tied] = keys[:, 3:4].clone()
    q[:, 1] = 0.0
    args = (q, weights, keys, 4, 356, 8)
    got = _check(indexer, args)
    for row in got.flatten(0, 1).tolist():
        picks = [j for j in row if j in tied]
        assert picks == tied[: len(picks)]
    assert got[:, 1].tolist() == [list(range(8))] * 2


@interpreted
def test_negative_weights_and_zero_scores(indexer):
    # every score <= 0, many exactly 0 (relu kills every head): -0.0 and +0.0 must tie
    q, weights, keys = _inputs(2, 13, 2, 16, 40, seed=4)
    _check(indexer, (q, -weights.abs(), keys, 4, 150, 6))


@interpreted
def test_strided_inputs(indexer):
    q, weights, keys = _inputs(2, 10, 4, 32, 6, seed=5, dtype=torch.bfloat16)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # heads and tokens swapped in memory
    keys_sliced = torch.zeros(2, 6, 48, dtype=keys.dtype)[:, :, 8:40]
    keys_sliced.copy_(keys)
    weights_t = weights.transpose(1, 2).contiguous().transpose(1, 2)
    _check(indexer, (q_t, weights_t, keys_sliced, 4, 20, 4))


@interpreted
def test_query_passes(indexer, monkeypatch):
    # a workspace of 3 query rows: 9 queries in 3 passes, each with its own visible count
    q, weights, keys = _inputs(1, 9, 4, 16, 12, seed=6)
    monkeypatch.setattr(indexer, "WORKSPACE_BYTES", 3 * 8 * 12)
    _check(indexer, (q, weights, keys, 4, 30, 5))


# -- the top-k selection on its own ---------------------------------------------------------------

NOT_VISIBLE = -(2**31)


def _stable_sort_selection(ranking: torch.Tensor, topk: int) -> torch.Tensor:
    """int64 [rows, topk]: per row the entries j with key > NOT_VISIBLE sorted by (-key, j), -1 after."""
    out = torch.full((ranking.shape[0], topk), -1, dtype=torch.int64)
    for row, keys in enumerate(ranking.tolist()):
        picked = sorted((j for j, key in enumerate(keys) if key != NOT_VISIBLE), key=lambda j: (-keys[j], j))[:topk]
        out[row, : len(picked)] = torch.tensor(picked, dtype=torch.int64)
    return out


def _ranking(kind: str, rows: int, n: int, seed: int) -> torch.Tensor:
    """int32 ranking keys [rows, n]: row r hides a fraction r / rows of its entries (NOT_VISIBLE)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "scores":  # the order-preserving bits of fp32 scores, as the scores kernel stores them
        bits = (torch.randn(rows, n, generator=gen) * 5 + 1).view(torch.int32)
        keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    elif kind == "ties":  # few values: long runs of exact ties at the k-th key
        values = torch.tensor([-7, 0, 1, 2**20, 2**20 + 1])
        keys = values[torch.randint(0, len(values), (rows, n), generator=gen)]
    elif kind == "one apart":  # neighbours differ in the last bit: every bit must be fixed
        keys = 1000 + torch.randint(0, 4, (rows, n), generator=gen)
    elif kind == "extremes":  # the lowest keys above NOT_VISIBLE and the highest
        values = torch.tensor([NOT_VISIBLE + 1, NOT_VISIBLE + 2, NOT_VISIBLE + 3, 2**31 - 2, 2**31 - 1])
        keys = values[torch.randint(0, len(values), (rows, n), generator=gen)]
    else:  # "equal"
        keys = torch.full((rows, n), 5)
    keys = keys.to(torch.int32)
    hidden = torch.rand(rows, n, generator=gen) < (torch.arange(rows) / rows)[:, None]
    return keys.masked_fill(hidden, NOT_VISIBLE)


def _select(indexer, ranking: torch.Tensor, topk: int, config) -> torch.Tensor:
    """select_topk's indices [rows, topk] into an output poisoned first: every slot must be written."""
    out = torch.full((1, ranking.shape[0], topk), 12345, dtype=torch.int32)
    indexer.select_topk(ranking, topk, out, config)
    return out[0].long()


@interpreted
@pytest.mark.parametrize("kind", ["scores", "ties", "one apart", "extremes", "equal"])
def test_selection_is_a_stable_sort(indexer, kind):
    # 4 rows of 100 keys, top 7, chunks of 16: four selection rounds, two ranking programs a row;
    # rows with all, 3/4 and 1/2 of their entries seen, the last with 5 at most (fewer than 7)
    ranking = _ranking(kind, 4, 100, seed=len(kind))
    ranking[3, 5:] = NOT_VISIBLE
    config = indexer.indexer_config(1, 4, 100, 7, 4, ranking.device)
    assert torch.equal(_select(indexer, ranking, 7, config), _stable_sort_selection(ranking, 7))


@interpreted
@pytest.mark.parametrize("kind", ["scores", "ties"])
def test_selection_at_the_gpu_launch_sizes(indexer, kind):
    # V4-Flash decode's top 512 over 20000 entries under the GPU's launch config: five chunks of
    # 4096, then one of 2560 candidates (chunk 4096), then 32 ranking programs of 16 a row
    ranking = _ranking(kind, 2, 20000, seed=7)
    with mock.patch("torch.cuda.get_device_properties", lambda *_: SimpleNamespace(multi_processor_count=132)):
        config = indexer.indexer_config(1, 64, 20000, 512, 2, torch.device("cuda"))
    assert (config.chunk, config.rank_block, config.rank_chunk) == (4096, 16, 1024)
    assert torch.equal(_select(indexer, ranking, 512, config), _stable_sort_selection(ranking, 512))


@interpreted
def test_select_chunk_must_hold_twice_top_k(indexer):
    ranking = torch.zeros(1, 40, dtype=torch.int32)
    config = indexer.IndexerConfig(block_s=2, block_n=16, split_len=32, chunk=8, rank_block=4)
    with pytest.raises(ValueError, match="chunk"):
        indexer.select_topk(ranking, 8, torch.empty(1, 1, 8, dtype=torch.int32), config)


# -- packed FP4 / FP8 keys -------------------------------------------------------------------------

@triton.jit
def _key_tile_kernel(rec_ptr, out_ptr, n, stride_rn, stride_rb, HEAD_DIM: tl.constexpr, KEY_FORMAT: tl.constexpr,
                     BLOCK_N: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """A kernel of the test's own around the scores kernel's key decode: records [n] -> out [n, HEAD_DIM]."""
    entries = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)
    records = rec_ptr + tl.multiple_of(entries * stride_rn, ROW_ALIGN)
    tile = _key_tile(records, entries < n, stride_rb, out_ptr.dtype.element_ty, KEY_FORMAT, HEAD_DIM, HEAD_DIM,
                     BLOCK_N, ROW_ALIGN)
    tl.store(out_ptr + entries[:, None] * HEAD_DIM + cols[None, :], tile, mask=entries[:, None] < n)


def _every_byte(fmt: str, d: int, n: int = 128) -> torch.Tensor:
    """n records [n, index_key_bytes(d, fmt)]: every code byte (both nibbles of each) at several
    columns and, as scales, every e8m0 byte (fp4: d/32 per record, n * d/32 >= 256) or fp32 scales
    from 2^-140 (subnormal) to 2^126, then inf (fp8)."""
    code_bytes = d // 2 if fmt == "fp4" else d
    records = torch.zeros(n, index_key_bytes(d, fmt), dtype=torch.uint8)
    records[:, :code_bytes] = (torch.arange(n * code_bytes) % 256).to(torch.uint8).view(n, code_bytes)
    if fmt == "fp4":
        records[:, code_bytes:] = (torch.arange(n * (d // 32)) % 256).to(torch.uint8).view(n, d // 32)
    else:
        scale = torch.exp2(torch.linspace(-140, 126, n)) * torch.linspace(1, 1.9, n)
        scale[-1] = float("inf")
        records[:, code_bytes:] = scale[:, None].view(torch.uint8)
    return records


@pytest.mark.skipif(not IN_INTERPRETER and not torch.cuda.is_available(),
                    reason="runs in test_under_interpreter's subprocess, or on a CUDA device")
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # scales near 2^127: inf
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("aligned", [True, False])
def test_key_decode_is_index_key_unpack_on_every_byte(fmt, dtype, aligned):
    """The in-register decode of the scores kernel against the reference codec: every code byte,
    every e8m0 exponent (255: NaN) / fp32 scales across the exponent range, rounded to q's dtype.
    In the interpreter and, on a GPU, compiled (there FP8 codes take the hardware conversion).
    ``aligned``: the rows' alignment as the kernel is told it (d = 64: FP8's 68-byte records
    read their scale as one word, FP4's 34-byte ones are 2-aligned), else 1 (byte loads)."""
    from seahal.backends.cuda._alignment import row_alignment

    d = 64
    records = _every_byte(fmt, d)
    device = "cpu" if IN_INTERPRETER else "cuda"
    out = torch.empty(records.shape[0], d, dtype=dtype, device=device)
    records = records.to(device)
    if aligned:
        assert row_alignment(records) == (4 if fmt == "fp8" else 2)
    _key_tile_kernel[(1,)](records, out, records.shape[0], *records.stride(), HEAD_DIM=d, KEY_FORMAT=fmt,
                           BLOCK_N=records.shape[0], ROW_ALIGN=row_alignment(records) if aligned else 1)
    records = records.cpu()
    out = out.cpu()
    want = index_key_unpack(records, d, fmt, dtype)
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
    both_nan = out.isnan() & want.isnan()
    assert both_nan.any() and want.isinf().any() and (want != 0).sum() > want.numel() // 2
    assert ((out.view(bits) == want.view(bits)) | both_nan).all()  # NaN payloads aside


def _packed_inputs(fmt, b, s, h, d, n, seed, dtype):
    """Indexer inputs with keys of varied magnitudes (per key and per 32-block), a zero key, packed."""
    q, weights, keys = _inputs(b, s, h, d, n, seed, torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    keys = keys.view(b, n, d // 32, 32) * torch.exp2(torch.randint(-8, 9, (b, n, d // 32, 1), generator=gen).float())
    keys = keys.view(b, n, d)
    keys[:, 1] = 0.0
    return q.to(dtype), weights, index_key_pack(keys, fmt)


@interpreted
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s, n, start_pos", [(1, 100, 700), (9, 12, 30)])
def test_packed_keys_rank_as_their_unpacked_values(indexer, fmt, dtype, s, n, start_pos):
    """Bit for bit: the ranking keys (fp32 scores) of packed keys equal those of the dense kernel on
    index_key_unpack(keys, d, fmt, q.dtype) under the same launch (and the top-k code after them is
    shared); the indices equal the reference's and the brute force's. Decode over 100 entries:
    four score splits and several selection rounds; prefill: causal visibility, -1 slots."""
    q, weights, packed = _packed_inputs(fmt, 2, s, 4, 64, n, seed=n + s, dtype=dtype)
    dense = index_key_unpack(packed, 64, fmt, dtype)
    visible = min(n, (start_pos + s) // 4)
    config = indexer.indexer_config(s, 4, visible, 8, 2 * s, q.device)
    ranked = indexer.ranking_keys(q, weights, packed, 4, start_pos, visible, config, fmt)
    assert torch.equal(ranked, indexer.ranking_keys(q, weights, dense, 4, start_pos, visible, config))
    args = (q, weights, packed, fmt, 4, start_pos, 8)
    got = indexer.indexer_topk_packed(*args)
    assert torch.equal(got, reference_packed(*args))
    assert torch.equal(got.long(), _brute_force(q, weights, dense, 4, start_pos, 8))
    (compared,) = checks_for("indexer_topk_packed", args)
    assert compared.check.compare(got, reference_packed(*args)).ok


@interpreted
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("s, n, start_pos", [(1, 100, 700), (9, 12, 30)])
def test_fp4_keys_of_128_dims_score_in_lane_order(indexer, s, n, start_pos, aligned):
    """bf16 queries over FP4 keys of V4's 128 dims: the key tile decodes in lane order (a lane's 16
    bytes consecutive: ``_e2m1.word_lane_order`` from 4-byte words where the 68-byte records are
    4-byte aligned, else ``_e2m1.lane_order``) and the query's dims are permuted alike, so the
    scores are the dense kernel's on both operands' dims in that order, bit for bit; the indices
    are the reference's and the brute force's."""
    from seahal.backends.cuda._e2m1 import lane_order_columns, word_lane_order_columns

    q, weights, packed = _packed_inputs("fp4", 2, s, 4, 128, n, seed=n + s, dtype=torch.bfloat16)
    dense = index_key_unpack(packed, 128, "fp4", torch.bfloat16)
    if not aligned:  # records 2 bytes into rows of 70
        packed = torch.zeros(*packed.shape[:-1], 70, dtype=torch.uint8)[..., 2:].copy_(packed)
    lanes = (word_lane_order_columns if aligned else lane_order_columns)()
    visible = min(n, (start_pos + s) // 4)
    config = indexer.indexer_config(s, 4, visible, 8, 2 * s, q.device)
    ranked = indexer.ranking_keys(q, weights, packed, 4, start_pos, visible, config, "fp4")
    permuted = indexer.ranking_keys(q[..., lanes].contiguous(), weights, dense[..., lanes].contiguous(), 4,
                                    start_pos, visible, config)
    assert torch.equal(ranked, permuted)
    args = (q, weights, packed, "fp4", 4, start_pos, 8)
    got = indexer.indexer_topk_packed(*args)
    assert torch.equal(got, reference_packed(*args))
    assert torch.equal(got.long(), _brute_force(q, weights, dense, 4, start_pos, 8))


@interpreted
@pytest.mark.parametrize("fmt", ["dense", "fp4"])
@pytest.mark.parametrize("s, n, start_pos", [(1, 100, 700), (9, 12, 30)])
def test_head_weights_scaled_and_picks_offset_in_the_kernels(indexer, fmt, s, n, start_pos):
    """bf16 head weights with ``weights_scale`` (V4's 128^-0.5 * 64^-0.5, as the model passes its
    projection) rank bit for bit as their fp32 product made before the call (the model's former
    separate kernel); ``offset`` shifts every pick and keeps each -1 gap. The indices equal the
    reference's, at an int position and at per-sequence tensor positions."""
    q, weights, packed = _packed_inputs("fp4", 2, s, 4, 64, n, seed=n + s, dtype=torch.bfloat16)
    keys = index_key_unpack(packed, 64, "fp4", torch.bfloat16) if fmt == "dense" else packed
    weights, scale, offset = weights.to(torch.bfloat16), 128**-0.5 * 64**-0.5, 144
    visible = min(n, (start_pos + s) // 4)
    config = indexer.indexer_config(s, 4, visible, 8, 2 * s, q.device, key_format=fmt)
    ranked = indexer.ranking_keys(q, weights, keys, 4, start_pos, visible, config, fmt, 0, scale)
    assert torch.equal(ranked, indexer.ranking_keys(q, weights.float() * scale, keys, 4, start_pos, visible, config, fmt))

    def topk(position, *extra):
        if fmt == "dense":
            return indexer.indexer_topk(q, weights, keys, 4, position, 8, *extra), reference(
                q, weights, keys, 4, position, 8, *extra)
        return indexer.indexer_topk_packed(q, weights, keys, fmt, 4, position, 8, *extra), reference_packed(
            q, weights, keys, fmt, 4, position, 8, *extra)

    for position in (start_pos, torch.tensor([start_pos, start_pos - 3])):
        plain, _ = topk(position, scale)
        got, want = topk(position, scale, offset)
        assert torch.equal(got, want) and torch.equal(got, torch.where(plain >= 0, plain + offset, -1))
        assert (got >= offset).any() and ((got == -1).any() or s == 1)


@interpreted
def test_packed_strided_records(indexer):
    """Records as a column slice of wider rows (a paged layout's view) and a transposed q."""
    q, weights, packed = _packed_inputs("fp8", 2, 6, 4, 32, 10, seed=7, dtype=torch.bfloat16)
    wide = torch.zeros(2, 10, 3 * packed.shape[-1], dtype=torch.uint8)[:, :, 5 : 5 + packed.shape[-1]]
    wide.copy_(packed)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    got = indexer.indexer_topk_packed(q_t, weights, wide, "fp8", 4, 20, 4)
    assert torch.equal(got, reference_packed(q, weights, packed, "fp8", 4, 20, 4))


@interpreted
def test_packed_rejects_float64_q(indexer):
    q, weights, packed = _packed_inputs("fp4", 1, 2, 2, 32, 3, seed=8, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="indexer_topk_packed takes bf16 or fp32 q"):
        indexer.indexer_topk_packed(q, weights, packed, "fp4", 4, 8, 2)


# -- start_pos as a 0-d device tensor (CUDA-graph decode) -----------------------------------------


def _at_both_positions(op, args: tuple) -> torch.Tensor:
    """``op(*args)`` at the int start_pos (args[-2]) and at ``torch.tensor(start_pos)``: the indices
    must be equal bit for bit (the tensor run ranks all N keys, masked by the loaded position)."""
    at_int = op(*args)
    at_tensor = op(*args[:-2], torch.tensor(args[-2]), args[-1])
    assert at_tensor.dtype == at_int.dtype and torch.equal(at_tensor, at_int), (at_tensor, at_int)
    return at_tensor


@interpreted
@pytest.mark.parametrize("fmt", ["dense", "fp4", "fp8"])
@pytest.mark.parametrize(
    "s, n, start_pos",
    [
        (1, 40, 2),  # nothing visible yet: all -1, though 40 masked keys pass three selection chunks
        (1, 40, 3),  # exactly at the first visibility boundary: entry 0 only
        (1, 40, 10),  # 2 of 40 visible: the masked rest spans two splits and the selection rounds
        (1, 6, 40),  # past the key store: all 6 visible
        (6, 40, 1),  # prefill chunk: queries at 1..6 see 0, 0, 1, 1, 1, 1 entries
        (5, 6, 13),  # prefill chunk across the boundaries 15 and 19
    ],
)
def test_position_as_tensor(indexer, fmt, s, n, start_pos):
    if fmt == "dense":
        q, weights, keys = _inputs(2, s, 2, 32, n, seed=s + n)
        got = _at_both_positions(indexer.indexer_topk, (q, weights, keys, 4, start_pos, 4))
        assert torch.equal(got, reference(q, weights, keys, 4, start_pos, 4))
    else:
        q, weights, packed = _packed_inputs(fmt, 2, s, 2, 32, n, seed=s + n, dtype=torch.float32)
        got = _at_both_positions(indexer.indexer_topk_packed, (q, weights, packed, fmt, 4, start_pos, 4))
        assert torch.equal(got, reference_packed(q, weights, packed, fmt, 4, start_pos, 4))
    visible = torch.tensor([min(n, (start_pos + i + 1) // 4) for i in range(s)])
    assert torch.equal((got >= 0).sum(-1), visible.clamp(max=4).expand(2, s))


@interpreted
def test_position_as_tensor_in_query_passes(indexer, monkeypatch):
    # a workspace of 2 query rows of all N = 12 keys: 9 queries in 5 passes, each loading the
    # position and adding its first query's offset (positions 30..38 see 7..9 entries)
    q, weights, keys = _inputs(1, 9, 4, 16, 12, seed=6)
    monkeypatch.setattr(indexer, "WORKSPACE_BYTES", 2 * 8 * 12)
    got = _at_both_positions(indexer.indexer_topk, (q, weights, keys, 4, 30, 5))
    assert torch.equal(got, reference(q, weights, keys, 4, 30, 5))


# -- one position per sequence: start_pos [B] ------------------------------------------------------


def _at_sequence_positions(op, args: tuple, positions: list[int], judge) -> torch.Tensor:
    """``op(*args)`` with start_pos (args[-2]) an int32 [B] tensor holding ``positions``, every other
    element of a buffer (stride 2; the others -1), against the int path on each sequence's slice
    (every tensor argument's [b:b+1]) at its position, bit for bit, and against ``judge`` (the CPU
    reference) called the same way."""
    buffer = torch.tensor([[p, -1] for p in positions], dtype=torch.int32)
    got = op(*args[:-2], buffer[:, 0], args[-1])
    for b, p in enumerate(positions):
        one = tuple(a[b : b + 1] if torch.is_tensor(a) else a for a in args[:-2]) + (p, args[-1])
        want = op(*one)
        assert torch.equal(got[b : b + 1], want), (b, p, got[b], want[0])
        assert torch.equal(want, judge(*one)), (b, p)
    return got


@interpreted
@pytest.mark.parametrize("fmt", ["dense", "fp4", "fp8"])
@pytest.mark.parametrize(
    "s, n, positions",
    [
        (1, 40, [2, 10, 40]),  # decode: nothing visible, 2 visible, all 10 of the first 40
        (1, 6, [41, 3, 2]),  # past the key store (all 6), the first boundary (entry 0), nothing
        (3, 40, [13, 0, 30]),  # prefill chunk: 3..4 visible, nothing (queries at 0..2), 7..8
        (6, 12, [1, 17, 44]),  # prefill chunk: 0..1 visible (a partial query block), 4..5, 11..12
    ],
)
def test_sequence_positions(indexer, fmt, s, n, positions):
    if fmt == "dense":
        q, weights, keys = _inputs(3, s, 2, 32, n, seed=s + n)
        got = _at_sequence_positions(indexer.indexer_topk, (q, weights, keys, 4, None, 4), positions, reference)
    else:
        q, weights, packed = _packed_inputs(fmt, 3, s, 2, 32, n, seed=s + n, dtype=torch.float32)
        got = _at_sequence_positions(
            indexer.indexer_topk_packed, (q, weights, packed, fmt, 4, None, 4), positions, reference_packed
        )
    visible = torch.tensor([[min(n, (p + i + 1) // 4) for i in range(s)] for p in positions])
    assert torch.equal((got >= 0).sum(-1), visible.clamp(max=4))


@interpreted
def test_sequence_positions_in_query_passes(indexer, monkeypatch):
    # a workspace of 2 query rows of all N = 12 keys: 7 queries in passes, each adding its first
    # query's offset to every sequence's loaded position (0..6 see 0..1 entries, 30..36 see 7..9)
    q, weights, keys = _inputs(2, 7, 4, 16, 12, seed=7)
    monkeypatch.setattr(indexer, "WORKSPACE_BYTES", 2 * 2 * 8 * 12)
    got = _at_sequence_positions(indexer.indexer_topk, (q, weights, keys, 4, None, 5), [30, 0], reference)
    visible = torch.tensor([[min(12, (p + i + 1) // 4) for i in range(7)] for p in (30, 0)])
    assert torch.equal((got >= 0).sum(-1), visible.clamp(max=5))


@interpreted
@pytest.mark.parametrize(
    "start_pos",
    [torch.zeros(3, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, dtype=torch.int16)],
    ids=["3 positions for 2 sequences", "2-d", "int16"],
)
def test_rejects_position_shapes(indexer, start_pos):
    q, weights, keys = _inputs(2, 1, 2, 16, 8, seed=0)
    with pytest.raises(ValueError, match=r"start_pos must be 0-d or \[B=2\] int32/int64"):
        indexer.indexer_topk(q, weights, keys, 4, start_pos, 2)


# -- launches (recorded as an H100 would see them, no GPU) -----------------------------------------

DECODE_CALLS = {  # name: (batch, context, top-k, key format)
    "V4-Flash B=1 ctx=4k": (1, 4096, 512, "dense"),
    "V4-Flash B=1 ctx=64k": (1, 65536, 512, "dense"),
    "V4-Flash B=1 ctx=1M": (1, 2**20, 512, "dense"),
    "V4-Flash B=64 ctx=1M": (64, 2**20, 512, "dense"),
    "V4-Pro B=1 ctx=1M": (1, 2**20, 1024, "dense"),
    "V4-Flash B=1 ctx=1M fp4 keys": (1, 2**20, 512, "fp4"),
}
"""Decode calls (64 index heads of 128, ratio 4, the position at the context's last token) whose
launches are recorded."""


def launches_per_call() -> dict[str, tuple[list[tuple[str, list[int]]], list[str]]]:
    """For each of :data:`DECODE_CALLS`: (its Triton launches as (kernel, grid), the other aten ops
    that would launch a device kernel), recorded as an H100 would see them (capture_launches: meta
    tensors posing as cuda:0). Needs compiled (not interpreted) kernels: run in a process without
    TRITON_INTERPRET (:func:`recorded_launches` starts one)."""
    from seahal.backends.cuda import indexer
    from seahal.testing.triton_compile import AtenKernels, capture_launches

    recorded = {}
    for name, (batch, context, topk, key_format) in DECODE_CALLS.items():
        with capture_launches() as launches, AtenKernels() as aten:
            q = torch.empty(batch, 1, 64, 128, dtype=torch.bfloat16, device="cuda")
            weights = torch.empty(batch, 1, 64, device="cuda")
            if key_format == "dense":
                keys = torch.empty(batch, context // 4, 128, dtype=torch.bfloat16, device="cuda")
                indexer.indexer_topk(q, weights, keys, 4, context - 1, topk)
            else:
                keys = torch.empty(batch, context // 4, 68, dtype=torch.uint8, device="cuda")
                indexer.indexer_topk_packed(q, weights, keys, key_format, 4, context - 1, topk)
        recorded[name] = ([(launch.name, list(launch.grid)) for launch in launches], aten.ops)
    return recorded


@pytest.fixture(scope="module")
def recorded_launches() -> dict:
    """:func:`launches_per_call` in a fresh process: an earlier test of this session may have
    imported the kernels under TRITON_INTERPRET, and Triton decides at import what a kernel is."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(IN_INTERPRETER, reason="runs in the main pytest process (it starts its own)")
@pytest.mark.parametrize("call, rounds", [
    ("V4-Flash B=1 ctx=4k", [[1, 1]]),  # 1024 entries: one chunk
    ("V4-Flash B=1 ctx=64k", [[1, 4], [1, 1]]),  # 16k entries: 4 chunks of 4096, then 2048 candidates
    ("V4-Flash B=1 ctx=1M", [[1, 64], [1, 8], [1, 1]]),  # 256k: 64 chunks, 32k candidates, 4096
    ("V4-Flash B=64 ctx=1M", [[64, 64], [64, 8], [64, 1]]),
    ("V4-Pro B=1 ctx=1M", [[1, 32], [1, 4], [1, 1]]),  # top 1024, chunks of 8192: 32k, then 4096 candidates
    ("V4-Flash B=1 ctx=1M fp4 keys", [[1, 64], [1, 8], [1, 1]]),
])
def test_decode_launches(recorded_launches, call, rounds):
    # the scores, the selection rounds, the ranking, and no other kernel (the output is not filled
    # first); the scores run on every SM of 132 once there are as many key tiles of 64
    launches, other_kernels = recorded_launches[call]
    batch, context, topk, _ = DECODE_CALLS[call]
    assert [name for name, _ in launches] == ["_scores_kernel"] + ["_select_kernel"] * len(rounds) + ["_rank_kernel"]
    assert [grid for name, grid in launches if name == "_select_kernel"] == rounds
    assert launches[-1][1] == [batch, topk // 16]  # one-warp ranking programs of 16 winners
    scores_programs = launches[0][1][0] * launches[0][1][1]
    assert scores_programs >= min(132, context // 4 // 64)
    assert other_kernels == []


# -- GPU ------------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("s, start_pos", [(1, 65535), (1, 2**20 - 1), (64, 4096)])
def test_gpu_plan(s, start_pos):
    from seahal import hal

    p = hal.plan("cuda", ops=["indexer_topk"], announce=False)
    assert p["indexer_topk"].kernel.qualified_name == "cuda.triton", p.table()
    q, weights, keys = (v.cuda() for v in _inputs(1, s, 64, 128, (start_pos + s) // 4, seed=s, dtype=torch.bfloat16))
    args = (q, weights, keys, 4, start_pos, 1024)
    _selection_ok(p.ops.indexer_topk(*args).cpu(), tuple(a.cpu() if torch.is_tensor(a) else a for a in args))


if __name__ == "__main__":
    print(json.dumps(launches_per_call()))
