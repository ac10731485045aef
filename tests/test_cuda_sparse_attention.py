"""The cuda backend's Triton sparse attention (op ``sparse_attention``): under the Triton interpreter on CPU.

Two independent figures: the CPU reference kernel (the same formula in fp32, keys gathered then
dense) and a float64 brute force written out here (one query at a time, a softmax over the valid
logits and the sink). Interpreter tests run in a subprocess with TRITON_INTERPRET=1 (see
test_cuda_interpret.py for why); the GPU test needs a CUDA device (not run in this repository's CI).
"""

from __future__ import annotations

import pytest
import torch

from seahal.testing.triton_interpreter import require_triton

triton = require_triton()

from seahal.backends.cpu.reference import attention as reference_attention
from seahal.backends.cpu.reference.attention import sparse_attention as reference
from seahal.backends.cpu.reference.quant import kv_cache_pack, kv_cache_unpack
from seahal.backends.cuda._alignment import row_alignment
from seahal.hal import get_spec

from seahal.testing import triton_interpreter

from cuda_marks import IN_INTERPRETER, interpreted, on_gpu  # noqa: E402

FP32_TOL = (0.0, 2**-16)
"""(rtol, atol / max|kv|) for fp32: logits (|s| <= ~10 here) summed over D <= 128 in another order
are off by ~2^-24 sqrt(D) |s| ~ 2^-17; exp makes that a relative error of each probability, in the
numerator and the denominator; the output is a sub-convex mix of kv rows, so errors scale with max|kv|."""
BF16_TOL = (2**-7, 2**-8 + FP32_TOL[1])
"""bf16 (unit roundoff 2^-8): the probabilities are rounded to nearest bf16 before the PV product (as
FlashMLA; under the interpreter too, by ``_numerics.cast_rne``), each within 2^-8 relative, which
moves the output by <= 2^-8 max|kv| on top of fp32's error; the output and the reference's are each
rounded to bf16, so they may land on neighbours: one ulp, <= 2^-7 relative."""


def test_under_interpreter():
    run = triton_interpreter.rerun_test_file(__file__)
    assert run.passed(), run.report


@pytest.fixture(scope="module")
def attention():
    """The kernel module, imported under the interpreter, with its bf16 dot corrected."""
    from seahal.backends.cuda import sparse_attention

    with triton_interpreter.bf16_dot_fix():
        yield sparse_attention


def _brute_force(q, kv, indices, sink, softmax_scale) -> torch.Tensor:
    """float64 [B, S, H, D]: per query, softmax over (valid logits, sink) applied to the valid rows."""
    batch, seq_len, heads, dim = q.shape
    out = torch.zeros(batch, seq_len, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for s in range(seq_len):
            rows = kv[b, indices[b, s][indices[b, s] >= 0].long()].double()  # [n_valid, D]
            if rows.shape[0] == 0:
                continue
            logits = q[b, s].double() @ rows.T * softmax_scale  # [H, n_valid]
            with_sink = torch.cat((logits, sink.double()[:, None]), dim=1)
            probs = torch.softmax(with_sink, dim=1)[:, :-1]  # NaN for a +inf sink, whose limit is 0
            out[b, s] = torch.where(sink[:, None] == float("inf"), 0.0, probs) @ rows
    return out


def _inputs(b, s, h, d, n, k, dtype, gen, empty=0.25):
    """Normal q [B, S, H, D] and kv [B, N, D] in dtype, int32 indices with a fraction -1, sinks [H]."""
    q = torch.randn(b, s, h, d, generator=gen).to(dtype)
    kv = torch.randn(b, n, d, generator=gen).to(dtype)
    indices = torch.randint(0, n, (b, s, k), generator=gen, dtype=torch.int32)
    indices = torch.where(torch.rand(b, s, k, generator=gen) < empty, -1, indices)
    return q, kv, indices, torch.randn(h, generator=gen)


def _check(attention, q, kv, indices, sink, config=None, splits=None) -> torch.Tensor:
    """Run the kernel into a NaN-poisoned output and hold it against the reference and the brute force."""
    scale = q.shape[-1] ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    attention.launch_sparse_attention(q, kv, indices, sink, scale, out, config, splits=splits)
    assert not out.isnan().any(), "some output elements were not written"
    assert get_spec("sparse_attention").check(q, kv, indices, sink, scale) == (tuple(out.shape), out.dtype)
    rtol, atol = BF16_TOL if q.dtype == torch.bfloat16 else FP32_TOL
    atol *= float(kv.double().abs().max()) if kv.numel() else 0.0
    for want in (reference(q, kv, indices, sink, scale), _brute_force(q, kv, indices, sink, scale)):
        torch.testing.assert_close(out.double(), want.double(), rtol=rtol, atol=atol)
    return out


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_many_heads_many_slots(attention, dtype):
    # S = 1; H = 20: a full and a partial block of 16 heads; K = 37: three index blocks, the last partial.
    gen = torch.Generator().manual_seed(0)
    _check(attention, *_inputs(3, 1, 20, 64, 50, 37, dtype, gen))


@interpreted
def test_prefill_window_and_compressed_layout(attention):
    # The model's prefill layout (v4_ops.md §9): window of 4 raw tokens padded with -1, then the
    # compressed entries S + j with j < (t + 1) // 4, padded with -1. fp32, D = 128: four D chunks.
    s, window, entries = 9, 4, 2
    gen = torch.Generator().manual_seed(1)
    q, kv, _, sink = _inputs(2, s, 5, 128, s + entries, 1, torch.float32, gen)
    rows = []
    for t in range(s):
        raw = [p for p in range(t - window + 1, t + 1) if p >= 0]
        compressed = [s + j for j in range((t + 1) // 4)]
        rows.append(raw + [-1] * (window - len(raw)) + compressed + [-1] * (entries - len(compressed)))
    indices = torch.tensor(rows, dtype=torch.int32).expand(2, s, -1).contiguous()
    _check(attention, q, kv, indices, sink)


@interpreted
def test_empty_queries_repeated_keys_and_infinite_sinks(attention):
    gen = torch.Generator().manual_seed(2)
    q, kv, indices, sink = _inputs(2, 4, 3, 64, 10, 6, torch.bfloat16, gen)
    indices[0, 0] = -1  # no valid slot, finite sink: 0
    indices[1, 2] = -1  # no valid slot, and head 0's sink is -inf: 0, not 0/0
    indices[1, 1] = 7  # one key six times: six equal logits, o = 6 e kv / (6 e + e^sink)
    indices[0, 3, 3:] = indices[0, 3, :3]
    sink[0] = float("-inf")
    sink[2] = 30.0  # dominates every logit: o ~ 0
    out = _check(attention, q, kv, indices, sink)
    assert out[0, 0].abs().max() == 0 and out[1, 2].abs().max() == 0


@interpreted
def test_head_dim_512_few_keys(attention):
    gen = torch.Generator().manual_seed(3)
    _check(attention, *_inputs(1, 2, 3, 512, 8, 5, torch.bfloat16, gen))


@interpreted
def test_strided_inputs_and_int64_indices(attention):
    # q with heads outermost in memory, kv a prefix of a longer cache, indices a column slice, fp64 sinks.
    gen = torch.Generator().manual_seed(4)
    q, kv, indices, sink = _inputs(2, 3, 4, 64, 14, 11, torch.float32, gen)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    kv = torch.cat((kv, torch.randn(2, 5, 64, generator=gen)), dim=1)[:, :9]
    indices = torch.where(indices < 9, indices, -1).long()[..., 2:]
    _check(attention, q, kv, indices, sink.double())


@interpreted
@pytest.mark.parametrize("block_h, block_n", [(32, 16), (16, 32)])
def test_launch_configs(attention, block_h, block_n):
    # D = 80: 48 padding columns in the 128-wide column space; H = 17 and K = 33 end in partial blocks.
    gen = torch.Generator().manual_seed(block_h)
    config = attention.AttentionConfig(block_h, block_n)
    _check(attention, *_inputs(2, 2, 17, 80, 40, 33, torch.bfloat16, gen), config=config)


@interpreted
def test_rejects_float64(attention):
    q, kv, indices, sink = _inputs(1, 1, 1, 16, 2, 2, torch.float64, torch.Generator().manual_seed(5))
    with pytest.raises(NotImplementedError, match="bf16 or fp32"):
        attention.sparse_attention(q, kv, indices, sink, 0.25)


def _records(b, n, d, rope_dim, tile, gen) -> torch.Tensor:
    """FP8 records [B, N, kv_record_bytes] of normal vectors whose nope tiles are scaled by 2^-12..2^12
    (tile exponents 115..139 and subnormal codes), packed by the CPU reference."""
    kv = torch.randn(b, n, d, generator=gen)
    tiles = (d - rope_dim) // tile
    scale = 2.0 ** torch.randint(-12, 13, (b, n, tiles), generator=gen).float()
    kv[..., : d - rope_dim] *= scale.repeat_interleave(tile, dim=-1)
    return kv_cache_pack(kv, rope_dim, tile)


def _check_fp8(attention, q, records, indices, sink, rope_dim, tile, config=None, splits=None) -> None:
    """The FP8 read equals the dense kernel on the reference-decoded rows bit for bit (same launch:
    the decode is exact and the rest is the same code), and hence meets the dense tolerances
    against the reference and the brute force on those rows (checked by :func:`_check`)."""
    scale = q.shape[-1] ** -0.5
    kv = kv_cache_unpack(records, q.shape[-1], rope_dim, tile).to(q.dtype)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    attention.launch_sparse_attention(
        q, records, indices, sink, scale, out, config, rope_dim=rope_dim, tile=tile, splits=splits,
    )
    dense = _check(attention, q, kv, indices, sink, config, splits)
    assert torch.equal(out, dense), (out - dense).abs().max()
    if config is None and splits is None:
        assert torch.equal(attention.sparse_attention_fp8(q, records, indices, sink, scale, rope_dim, tile), dense)


@interpreted
def test_fp8_records_v4_layout(attention):
    # The 584-byte records of V4 (D = 512, rope 64, tile 64), decode shape (S = 1) with three heads.
    gen = torch.Generator().manual_seed(7)
    q, _, indices, sink = _inputs(2, 1, 3, 512, 9, 6, torch.bfloat16, gen)
    records = _records(2, 9, 512, 64, 64, gen)
    assert records.shape[-1] == 584
    _check_fp8(attention, q, records, indices, sink, 64, 64)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_records_rope_boundary_inside_tiles(attention, dtype):
    # D = 80, rope 24, tile 8: a [16 tiles, 8] column brick whose tiles 7-9 are rope; seven tile
    # scales and a pad byte (112-byte records). Records are every other row of a longer buffer (row
    # stride 224 bytes: the rope read as 2-byte words).
    gen = torch.Generator().manual_seed(8)
    q, _, indices, sink = _inputs(2, 3, 5, 80, 12, 13, dtype, gen)
    records = _records(2, 24, 80, 24, 8, gen)[:, ::2]
    assert records.shape[-1] == 112 and records.stride(1) == 224 and row_alignment(records) == 16
    _check_fp8(attention, q, records, indices, sink, 24, 8, attention.AttentionConfig(16, 16))


@interpreted
@pytest.mark.parametrize("row_bytes, offset, align", [(123, 0, 1), (123, 1, 1), (122, 2, 2)])
def test_fp8_records_odd_tile_and_unaligned_rows(attention, row_bytes, offset, align):
    # D = 80, rope 32, tile 12 (not a power of two): four 12-wide nope tiles in 16-wide brick tiles,
    # so the column space has padding columns between tiles; the rope (columns 48..79) starts in
    # brick tile 4 and crosses into 5-6. 120-byte records inside longer rows, from byte `offset` of
    # each: rows starting at odd bytes read the rope and the exponents byte by byte; at even ones
    # the rope as 2-byte words and the exponents still bytewise (4-byte words need 4-byte rows).
    gen = torch.Generator().manual_seed(30 + offset)
    q, _, indices, sink = _inputs(2, 2, 3, 80, 9, 7, torch.bfloat16, gen)
    packed = _records(2, 9, 80, 32, 12, gen)
    assert packed.shape[-1] == 120
    rows = torch.zeros(2, 9, row_bytes, dtype=torch.uint8)
    rows[..., offset : offset + 120] = packed
    records = rows[..., offset : offset + 120]
    assert row_alignment(records) == align
    _check_fp8(attention, q, records, indices, sink, 32, 12)


@interpreted
def _decode_rows(n, gen) -> torch.Tensor:
    """int32 [1, 3, 640]: V4's decode row, a 128-slot window then 512 top-k slots, for three queries:
    0 with -1 runs covering whole split chunks (slots 150..599), 1 whose only valid key is slot 639
    (the last split's last slot), 2 with no valid key."""
    rows = torch.randint(0, n, (3, 640), generator=gen, dtype=torch.int32)
    rows[0, 150:600] = -1
    rows[1, :639] = -1
    rows[2] = -1
    return rows[None]


@interpreted
@pytest.mark.parametrize("splits", [1, 3, 10, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_k_decode_640_slots(attention, dtype, splits):
    # K = 640 in 40 blocks of 16: 3 splits are uneven chunks of 224, 224 and 192 slots, 10 are 64 each,
    # 40 are one block each (the merge launch sums them in two chunks of 32 splits); sinks -inf, +inf,
    # dominant and ordinary over the four heads.
    gen = torch.Generator().manual_seed(11 + splits)
    q, kv, _, sink = _inputs(1, 3, 4, 64, 700, 1, dtype, gen)
    sink[:3] = torch.tensor([float("-inf"), float("inf"), 30.0])
    out = _check(attention, q, kv, _decode_rows(700, gen), sink, splits=splits)
    assert out[0, 2].abs().max() == 0 and out[:, :, 1].abs().max() == 0


@interpreted
@pytest.mark.parametrize("splits", [3, 10])
def test_split_k_fp8_records(attention, splits):
    gen = torch.Generator().manual_seed(21 + splits)
    q, _, _, sink = _inputs(1, 3, 3, 128, 700, 1, torch.bfloat16, gen)
    records = _records(1, 700, 128, 64, 64, gen)
    _check_fp8(attention, q, records, _decode_rows(700, gen), sink, 64, 64, splits=splits)


@interpreted
@pytest.mark.parametrize("name, splits", [("DECODE", 20), ("WIDE", 1), ("HEADS64", 2), ("HEADS64_WIDE", 1)])
@pytest.mark.parametrize("kv_format", ["dense", "fp8"])
def test_gpu_launches_decode_640_slots(attention, name, splits, kv_format):
    # The GPU's tiles on V4's decode row: DECODE (16 heads, 32 slots) in 20 one-block splits as at
    # batch 1, WIDE (32 heads, 64 slots) unsplit, HEADS64 (64 heads, 32 slots) in two splits as FP8
    # records at batch 64, HEADS64_WIDE (64 heads, 64 slots) unsplit as at prefill; H = 40 ends in a
    # partial head block (HEADS64: one, 24 heads empty).
    gen = torch.Generator().manual_seed(40 + splits)
    q, kv, _, sink = _inputs(1, 3, 40, 128, 700, 1, torch.bfloat16, gen)
    indices, config = _decode_rows(700, gen), getattr(attention, name)
    if kv_format == "dense":
        _check(attention, q, kv, indices, sink, config, splits)
    else:
        _check_fp8(attention, q, _records(1, 700, 128, 64, 64, gen), indices, sink, 64, 64, config, splits)


def test_launch_heuristic_decode_vs_prefill():
    # On an H100's 132 SMs. Batch-1 decode: DECODE tiles (16 heads, two programs an SM), split to
    # one wave: V4-Flash (64 heads, 128 + 512 slots) 4 head blocks x min(264 // 4, 20 blocks of 32)
    # splits; V4-Pro (128 heads, 128 + 1024 slots) 8 x min(264 // 8, 36). Batch 64 and a
    # 4096-query prefill over dense rows: WIDE or HEADS64 tiles (one program an SM), no split.
    # FP8 records: HEADS64 once queries x head blocks x slot blocks reach the SMs (V4-Flash from
    # 7 queries, V4-Pro from 2), at batch 64 split to one wave (V4-Flash 64 programs x 2). Dense
    # rows take HEADS64 too once its unsplit grid fills half the SMs (V4-Pro at batch 64, every
    # 4096-query prefill; measured faster there on the H100), V4-Flash at batch 64 WIDE over CSA's
    # 640 slots. Where HEADS64 runs unsplit (more than 66 programs), its 64-slot form HEADS64_WIDE.
    from seahal.backends.cuda.sparse_attention import (
        DECODE,
        HEADS64,
        HEADS64_WIDE,
        WIDE,
        attention_config,
        attention_splits,
    )

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert attention_config(1, 64, 640, bf16, cuda, 132) == DECODE
    assert attention_splits(1, 64, 640, DECODE, 132) == 20
    assert attention_splits(1, 128, 1152, DECODE, 132) == 33
    assert attention_splits(32, 64, 640, DECODE, 132) == 2  # 128 programs: a second one on each SM
    for queries, heads, slots, dense, fp8 in (
        (64, 64, 640, WIDE, HEADS64), (64, 128, 1152, HEADS64_WIDE, HEADS64_WIDE), (66, 64, 640, HEADS64, HEADS64),
        (67, 64, 640, HEADS64_WIDE, HEADS64_WIDE), (4096, 64, 640, HEADS64_WIDE, HEADS64_WIDE),
        (4096, 128, 1152, HEADS64_WIDE, HEADS64_WIDE), (32, 64, 640, DECODE, HEADS64), (40, 64, 640, WIDE, HEADS64),
    ):
        assert attention_config(queries, heads, slots, bf16, cuda, 132) == dense, (queries, heads)
        assert attention_config(queries, heads, slots, bf16, cuda, 132, fp8=True) == fp8, (queries, heads)
    # V4-Flash HCA rows at batch 64 from 256k context (2176 slots; 1M: 8320) take HEADS64 in two
    # splits (measured faster there), not at 4k (160 slots) nor at batch 32 or 1
    for queries, slots, dense in ((64, 2176, HEADS64), (64, 8320, HEADS64), (33, 1024, HEADS64), (64, 160, WIDE),
                                  (32, 8320, DECODE), (1, 8320, DECODE)):
        assert attention_config(queries, 64, slots, bf16, cuda, 132) == dense, (queries, slots)
    assert attention_splits(64, 64, 640, WIDE, 132) == 1
    assert attention_splits(64, 64, 640, HEADS64, 132) == 2
    assert attention_splits(64, 128, 1152, HEADS64, 132) == 1
    assert attention_splits(4096, 64, 640, HEADS64, 132) == 1
    for queries, heads, fp8_config in ((1, 64, DECODE), (6, 64, DECODE), (7, 64, HEADS64), (1, 128, DECODE),
                                       (2, 128, HEADS64), (64, 40, DECODE)):
        slots = 640 if heads <= 64 else 1152
        assert attention_config(queries, heads, slots, bf16, cuda, 132, fp8=True) == fp8_config, (queries, heads)


def test_row_alignment():

    records = torch.zeros(2, 10, 584, dtype=torch.uint8)
    assert row_alignment(records) == 8  # 584 = 8 x 73
    assert row_alignment(records[:1, :1].expand(3, 10, -1)) == 16  # one row, batch stride 0: only the base counts
    assert row_alignment(records[:, 1:]) == 8
    assert row_alignment(records[..., 2:]) == 2
    assert row_alignment(torch.zeros(2, 10, 512, dtype=torch.bfloat16)) == 16
    assert row_alignment(torch.zeros(2, 512, 10, dtype=torch.bfloat16).transpose(1, 2)) == 1


def _rotation(b, s, rope_pairs, gen, position_dtype=torch.int64):
    """Positions [B, S] up to 2^12 and V4-like frequencies [rope_pairs] (10000^(-2i/r))."""
    positions = torch.randint(0, 1 << 12, (b, s), generator=gen).to(position_dtype)
    return positions, 10000.0 ** -(torch.arange(rope_pairs, dtype=torch.float32) / rope_pairs)


# (kv format, dtype, splits, rope pairs): the unsplit kernel's store and the merge's (splits > 1),
# dense and FP8 records (V4's 584 bytes), bf16 and fp32, V4's 32 rope pairs of 512 columns and 8
# of 64 columns.
ROTATED_CASES = [
    ("dense", torch.bfloat16, 1, 8), ("dense", torch.float32, 3, 8), ("fp8", torch.bfloat16, 1, 32),
    ("fp8", torch.bfloat16, 4, 32),
]


@interpreted
@pytest.mark.parametrize("kv_format, dtype, splits, rope_pairs", ROTATED_CASES)
def test_rotated_output_is_the_attention_then_the_inverse_rope(attention, kv_format, dtype, splits, rope_pairs):
    """With positions and freqs, the stored output is the unrotated output rotated back by rope's
    kernel, bit for bit (the same rounding to q's dtype, then the same fp32 arithmetic), whichever
    launch stores it; int32 positions given as a [1, S] row expanded over the batch."""
    from seahal.backends.cuda import rope

    gen = torch.Generator().manual_seed(rope_pairs + splits)
    d = 512 if kv_format == "fp8" else 64
    q, kv, indices, sink = _inputs(2, 3, 5, d, 40, 70, dtype, gen)
    if kv_format == "fp8":
        kv = _records(2, 40, d, 64, 64, gen)
    positions, freqs = _rotation(1, 3, rope_pairs, gen, torch.int32)
    positions = positions.expand(2, 3)
    geometry = {"rope_dim": 64, "tile": 64} if kv_format == "fp8" else {}
    plain, rotated = torch.empty_like(q), torch.empty_like(q)
    attention.launch_sparse_attention(q, kv, indices, sink, 0.125, plain, splits=splits, **geometry)
    attention.launch_sparse_attention(q, kv, indices, sink, 0.125, rotated, splits=splits, **geometry,
                                      positions=positions, freqs=freqs)
    assert torch.equal(rotated, rope.rope(plain, positions, freqs, inverse=True))
    assert torch.equal(rotated[..., : d - 2 * rope_pairs], plain[..., : d - 2 * rope_pairs])
    assert not torch.equal(rotated, plain)


@interpreted
def test_rotated_output_through_the_ops(attention):
    """The ops' entry points pass the rotation on: within the conformance rules of the reference,
    and bit for bit the verified kernels in turn that GPU plans run until this one is verified
    (``cuda.triton_unfused``)."""
    from seahal.testing.tolerances import checks_for

    gen = torch.Generator().manual_seed(3)
    q, kv, indices, sink = _inputs(1, 2, 4, 512, 30, 20, torch.bfloat16, gen)
    records = _records(1, 30, 512, 64, 64, gen)
    positions, freqs = _rotation(1, 2, 32, gen)
    for op, args in (("sparse_attention", (q, kv, indices, sink, 0.125, positions, freqs)),
                     ("sparse_attention_fp8", (q, records, indices, sink, 0.125, 64, 64, positions, freqs))):
        got = getattr(attention, op)(*args)
        assert torch.equal(got, getattr(attention, f"{op}_then_rope")(*args))
        want = getattr(reference_attention, op)(*args)
        for compared in checks_for(op, args):
            verdict = compared.check.compare(got, want)
            assert verdict.ok, f"{op} {compared.label}: {verdict.detail}"


@interpreted
def test_fp8_records_rejected_with_their_shape(attention):
    gen = torch.Generator().manual_seed(9)
    q, _, indices, sink = _inputs(1, 1, 2, 128, 4, 3, torch.bfloat16, gen)
    records = _records(1, 4, 128, 64, 64, gen)  # 64 + 128 + 8 = 200 bytes
    with pytest.raises(ValueError, match=r"uint8 \[B=1, N, 200\].*torch.uint8 \[1, 4, 199\]"):
        attention.sparse_attention_fp8(q, records[..., :199], indices, sink, 0.1)
    with pytest.raises(ValueError, match="do not split q's head dim 128"):
        attention.sparse_attention_fp8(q, records, indices, sink, 0.1, rope_dim=64, tile=48)


def test_registered_for_dense_kv_only():
    if IN_INTERPRETER:
        pytest.skip("checked by the parent run")
    from seahal.hal.registry import REGISTRY

    (kernel,) = [k for k in REGISTRY.kernels_for("sparse_attention") if k.qualified_name == "cuda.triton"]
    assert kernel.capabilities["kv_format"] == ("dense",)
    assert set(kernel.capabilities["dtype"]) == {"bfloat16", "float32"}


def test_fp8_records_registered_as_the_fp8_op():
    if IN_INTERPRETER:
        pytest.skip("checked by the parent run")
    from seahal.hal.registry import REGISTRY

    (kernel,) = [k for k in REGISTRY.kernels_for("sparse_attention_fp8") if k.qualified_name == "cuda.triton"]
    assert kernel.impl == "seahal.backends.cuda.sparse_attention:sparse_attention_fp8"
    assert kernel.capabilities["kv_format"] == ("fp8",)
    assert set(kernel.capabilities["dtype"]) == {"bfloat16", "float32"}


@on_gpu
@pytest.mark.parametrize("batch", [4, 64])
def test_v4_flash_decode_shape_on_gpu(batch):
    # batch 4: DECODE tiles split over the keys (and merged); batch 64: WIDE tiles, unsplit
    from seahal.backends.cuda.sparse_attention import sparse_attention

    gen = torch.Generator().manual_seed(6)
    q, kv, indices, sink = (t.cuda() for t in _inputs(batch, 1, 64, 512, 1024, 640, torch.bfloat16, gen, empty=0.05))
    out = sparse_attention(q, kv, indices, sink, 512**-0.5)
    want = reference(q, kv, indices, sink, 512**-0.5)
    rtol, atol = BF16_TOL
    torch.testing.assert_close(out.double(), want.double(), rtol=rtol, atol=atol * float(kv.abs().max()))


@on_gpu
@pytest.mark.parametrize("batch", [4, 64])
def test_v4_flash_decode_fp8_records_on_gpu(batch):
    # FP8 records take DECODE tiles at batch 4 and HEADS64 at batch 64; the dense call is given
    # the same tiles (it would take WIDE at 64) to compare bit for bit
    from seahal.backends.cuda.sparse_attention import (
        attention_config,
        launch_sparse_attention,
        sparse_attention_fp8,
    )

    gen = torch.Generator().manual_seed(10)
    q, _, indices, sink = (t.cuda() for t in _inputs(batch, 1, 64, 512, 1024, 640, torch.bfloat16, gen, empty=0.05))
    records = _records(batch, 1024, 512, 64, 64, gen).cuda()
    kv = kv_cache_unpack(records, 512)
    out = sparse_attention_fp8(q, records, indices, sink, 512**-0.5)
    dense = torch.empty_like(q)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    config = attention_config(batch, 64, 640, torch.bfloat16, q.device, sms, fp8=True)
    launch_sparse_attention(q, kv, indices, sink, 512**-0.5, dense, config)
    assert torch.equal(out, dense)
    rtol, atol = BF16_TOL
    want = reference(q, kv, indices, sink, 512**-0.5)
    torch.testing.assert_close(out.double(), want.double(), rtol=rtol, atol=atol * float(kv.abs().max()))


@on_gpu
@pytest.mark.parametrize("batch, s", [(4, 1), (1, 256)])
def test_gpu_rotated_output_within_the_rules(batch, s):
    """The model's call on a GPU, FP8 records at V4-Flash's heads: decode (split-K, the output
    rotated back in the merge) and a prefill chunk (unsplit), within the conformance rules of the
    reference; the columns before the rope part are the unrotated output's, bit for bit."""
    from seahal.backends.cuda.sparse_attention import sparse_attention_fp8
    from seahal.testing.tolerances import checks_for

    gen = torch.Generator().manual_seed(batch + s)
    q, _, indices, sink = _inputs(batch, s, 64, 512, 1024, 640, torch.bfloat16, gen, empty=0.05)
    records = _records(batch, 1024, 512, 64, 64, gen)
    positions, freqs = _rotation(batch, s, 32, gen)
    args = (q, records, indices, sink, 512**-0.5, 64, 64, positions, freqs)
    on_gpu_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    got = sparse_attention_fp8(*on_gpu_args).cpu()
    assert torch.equal(got[..., :448], sparse_attention_fp8(*on_gpu_args[:7]).cpu()[..., :448])
    want = reference_attention.sparse_attention_fp8(*args)
    for compared in checks_for("sparse_attention_fp8", args):
        verdict = compared.check.compare(got, want)
        assert verdict.ok, f"{compared.label}: {verdict.detail}"
