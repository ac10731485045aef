"""The cuda backend's Triton ``kv_cache_unpack`` and ``kv_compress`` against the CPU reference.

Unpacking is exact (an e4m3 code times a power of two, rounded to bf16; the rope bytes copied), so
those checks are bitwise, plus a decode of the §12 layout by hand in float64. The compressor
differs from the reference only in fp32 rounding order and in cos/sin, so its entries are held
to a tolerance derived from the bf16 output format (below) and its streaming state is bitwise.
The same tests run under the Triton interpreter on CPU tensors (in test_under_interpreter's
subprocess) and, on a machine with a GPU, on CUDA tensors. Both ways of finishing an entry run:
its channels cut into blocks whose last program to arrive finishes it (what ``channel_split``
picks for these short calls) and one program for all its channels (``whole``: what long prefills
get).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from seahal.testing.triton_interpreter import require_triton

triton = require_triton()

from seahal.testing import triton_interpreter  # noqa: E402

from seahal.backends.cpu.reference import compressor as ref_compressor
from seahal.backends.cpu.reference import quant as ref_quant
from seahal.hal.ops.compressor import compressor_state, new_entries
from seahal.hal.ops.quant import kv_record_bytes

from cuda_marks import IN_INTERPRETER, kernels  # noqa: E402

DEVICE = "cpu" if IN_INTERPRETER else "cuda"


def test_under_interpreter():
    run = triton_interpreter.rerun_test_file(__file__)
    assert run.passed(), run.report


@pytest.fixture(scope="module")
def cuda_ops():
    from seahal.backends.cuda import compressor, kv_unpack, quant

    return kv_unpack.kv_cache_unpack, compressor.kv_compress, quant.kv_cache_pack


@pytest.fixture(params=["blocks", "whole"])
def channels(request, monkeypatch):
    """How the compressor cuts an entry's channels: its own choice (blocks, at these sizes) or one
    program for them all (as in a long prefill)."""
    if request.param == "whole":
        from seahal.backends.cuda import compressor

        monkeypatch.setattr(compressor, "channel_split", lambda d, seq_len, ratio, device: 1)
    return request.param


# --------------------------------------------------------------------------------------------
# kv_cache_unpack
# --------------------------------------------------------------------------------------------


def _assert_same_bf16(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Bitwise equal, except that NaN need only be NaN (payloads differ: 0x7FC0 vs torch's 0xFFFF)."""
    assert ours.dtype == ref.dtype == torch.bfloat16 and ours.shape == ref.shape, (ours.dtype, ours.shape, ref.shape)
    ours, ref = ours.cpu(), ref.cpu()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours), nan)
    differ = (ours.view(torch.int16) != ref.view(torch.int16)) & ~nan
    assert not differ.any(), f"{differ.sum().item()} of {ref.numel()} differ, first at {differ.nonzero()[0].tolist()}"


def _random_records(lead: tuple[int, ...], dim: int, rope_dim: int, tile: int, seed: int) -> torch.Tensor:
    """Records of random bytes: every e4m3 code (NaN too), every exponent 0..255, random rope bits."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*lead, kv_record_bytes(dim, rope_dim, tile)), dtype=torch.uint8, generator=gen)


@kernels
def test_unpack_v4_record_by_hand(cuda_ops):
    # independent decode of §12: codes 0..255 in every tile, exponents 120..126 (one per tile)
    unpack = cuda_ops[0]
    record = torch.zeros(256, 584, dtype=torch.uint8)
    record[:, :448] = ((torch.arange(256)[:, None] + torch.arange(448)[None, :]) % 256).to(torch.uint8)
    record[:, 448:576] = torch.randn(256, 64).bfloat16().view(torch.uint8)
    record[:, 576:583] = torch.arange(120, 127, dtype=torch.uint8)
    out = unpack(record.to(DEVICE), 512).cpu()
    e4m3 = record[:, :448].view(torch.float8_e4m3fn).double()
    expected = e4m3 * torch.exp2(torch.arange(120, 127).double() - 127).repeat_interleave(64)
    finite = ~torch.isnan(expected)
    assert torch.equal(out[:, :448].double()[finite], expected[finite])  # e4m3 x 2^-7..2^-1 fits bf16
    assert torch.isnan(out[:, :448][~finite].float()).all()
    assert torch.equal(out[:, 448:], record[:, 448:576].view(torch.bfloat16))


@kernels
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # 448 * 2^127 -> inf
@pytest.mark.parametrize(
    ("dim", "rope_dim", "tile"),
    [(512, 64, 64), (96, 32, 32), (320, 0, 32), (72, 24, 16), (200, 8, 96)],
)
def test_unpack_every_byte_value(cuda_ops, dim, rope_dim, tile):
    # random bytes hit exponent 0 (2^-127: fp32 subnormal products, rounded to bf16), 255 (NaN),
    # products past fp32 (inf) and the NaN codes; (320, 0, 32): no rope; (200, 8, 96): tile 96
    unpack = cuda_ops[0]
    records = _random_records((9, 5), dim, rope_dim, tile, seed=dim).to(DEVICE)
    _assert_same_bf16(unpack(records, dim, rope_dim, tile), ref_quant.kv_cache_unpack(records, dim, rope_dim, tile))


@kernels
@pytest.mark.parametrize("layout", ["sliced rows", "permuted leading dims", "strided last dim", "empty"])
def test_unpack_layouts(cuda_ops, layout):
    unpack = cuda_ops[0]
    base = _random_records((4, 6), 128, 64, 64, seed=1).to(DEVICE)  # 136-byte records
    records = {
        "sliced rows": base[:, ::2],
        "permuted leading dims": base.transpose(0, 1),
        "strided last dim": base.transpose(-1, -2).contiguous().transpose(-1, -2),
        "empty": base[:, :0],
    }[layout]
    out = unpack(records, 128)
    assert out.shape == (*records.shape[:-1], 128)
    _assert_same_bf16(out, ref_quant.kv_cache_unpack(records, 128))


@kernels
def test_unpack_inverts_pack(cuda_ops):
    # cuda pack then cuda unpack == the reference's quant-dequant of §11.3 (7 FP8 tiles, bf16 rope)
    unpack, _, pack = cuda_ops
    kv = (torch.randn(33, 512, generator=torch.Generator().manual_seed(5)) * 3).bfloat16().to(DEVICE)
    _assert_same_bf16(unpack(pack(kv), 512), ref_quant.kv_cache_unpack(ref_quant.kv_cache_pack(kv), 512))


# --------------------------------------------------------------------------------------------
# kv_compress
# --------------------------------------------------------------------------------------------


def _stream(b: int, total: int, ratio: int, d: int, rope: int, overlap: bool, seed: int, token_major: bool = False):
    """A token stream's projections (kv, score as the two halves of one [.., 2·coff·d] tensor; made
    [total, b, ..] and transposed when token_major), ape, a strided norm weight and rope
    frequencies ``160000^(-2i/r)`` (magnitude <= 1)."""
    gen = torch.Generator().manual_seed(seed)
    coff = 2 if overlap else 1
    if token_major:
        projection = torch.randn(total, b, 2 * coff * d, generator=gen).transpose(0, 1)
    else:
        projection = torch.randn(b, total, 2 * coff * d, generator=gen)
    ape = torch.randn(ratio, coff * d, generator=gen) * 0.5
    weight = (1 + torch.randn(2 * d, generator=gen) * 0.1)[::2]  # strided: the kernel must use its stride
    freqs = 160000.0 ** (-torch.arange(rope // 2, dtype=torch.float32) * 2 / rope)
    return projection[..., : coff * d], projection[..., coff * d :], ape, weight, freqs


def _assert_entries_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Entries within a few output ulps of each vector's scale (max |ref| over its d dims).

    bf16: the pooled and the normed vector are each rounded to bf16, so an fp32 difference of a
    few ulp (softmax order, RMS sum, cos/sin) can flip either rounding by one bf16 ulp (2^-8
    relative); the flip passes through the norm and the rotation mixes a pair: <= 4 ulp of the
    scale, and most elements must be identical. fp32: no such rounding; pooling and the RMS sum
    over <= 2m + d terms and the angle j·m·f (<= 60 here) rounded to fp32 give < 1e-5 of the scale.
    """
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (ours.dtype, ours.shape, ref.shape)
    if ref.numel() == 0:
        return
    ours, ref, bf16 = ours.cpu().float(), ref.cpu().float(), ref.dtype == torch.bfloat16
    error = (ours - ref).abs() / ref.abs().amax(-1, keepdim=True)
    assert error.max() <= (4 * 2.0**-8 if bf16 else 1e-5), error.max()
    if bf16:
        assert (ours == ref).float().mean() > 0.9, (ours == ref).float().mean()


def _device_state(state: tuple[torch.Tensor, torch.Tensor], fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The state on DEVICE; fused: kv_state and score_state as the two halves of one buffer's last dim."""
    if not fused:
        return tuple(s.to(DEVICE) for s in state)
    buffer = torch.cat(state, dim=-1).to(DEVICE)
    width = state[0].shape[-1]
    return buffer[..., :width], buffer[..., width:]


def _run_stream(kv_compress, chunks, ratio, overlap, d=64, rope=16, b=2, stale=False, out_dtype=None, seed=0,
                strided=False):
    """Feed the chunks to the kernel and to the reference, each with its own state; after every
    call compare the entries and the states (bitwise). strided: token-major kv and score, and the
    two states halves of one buffer. Returns the number of entries compared."""
    from seahal.backends.cuda._gemm import arrival_counters as counters

    kv, score, ape, weight, freqs = _stream(b, sum(chunks), ratio, d, rope, overlap, seed, token_major=strided)
    states = [compressor_state(b, ratio, d, overlap) for _ in range(2)]
    if stale:
        for kv_state, score_state in states:
            kv_state.normal_(generator=torch.Generator().manual_seed(1))
            score_state.normal_(generator=torch.Generator().manual_seed(2))
    ours_state = _device_state(states[0], fused=strided)
    params = (ape.to(DEVICE), weight.to(DEVICE), freqs.to(DEVICE))
    start, compared = 0, 0
    for call, size in enumerate(chunks):
        window = slice(start, start + size)
        ours = kv_compress(kv[:, window].to(DEVICE), score[:, window].to(DEVICE), *params, *ours_state, ratio, overlap,
                           start, 1e-6, out_dtype)
        ref = ref_compressor.kv_compress(kv[:, window], score[:, window], ape, weight, freqs, *states[1], ratio,
                                         overlap, start, 1e-6, out_dtype)
        _assert_entries_close(ours, ref)
        where = f"call {call} (start_pos {start}, S {size})"
        for name, mine, theirs in zip(("kv_state", "score_state"), ours_state, states[1], strict=True):
            differ = (mine.cpu() != theirs).any(-1)
            assert not differ.any(), f"{where}: {name} differs at [b, slot] {differ.nonzero().tolist()}"
        assert not counters(1, torch.device(DEVICE)).any(), f"{where}: an entry's counter was not reset"
        compared += ref.shape[1]
        start += size
    return compared


@kernels
@pytest.mark.parametrize("overlap", [True, False], ids=["CSA", "plain"])
def test_compress_prefill_then_decode(cuda_ops, channels, overlap):
    # every prefill offset mod m, then decode steps through two block boundaries
    for prefill in (1, 3, 4, 6):
        assert _run_stream(cuda_ops[1], (prefill,) + (1,) * 6, 4, overlap, seed=prefill) == (prefill + 6) // 4


@kernels
def test_compress_v4_csa_and_hca_shapes(cuda_ops, channels):
    # V4 main compressor: d 512, rope 64; CSA m=4 (8 slots, one chunk) and HCA m=128 (16 slot chunks)
    assert _run_stream(cuda_ops[1], (19, 1, 1), 4, True, d=512, rope=64, b=1, seed=3) == 5
    assert _run_stream(cuda_ops[1], (130, 125, 1, 1), 128, False, d=512, rope=64, b=1, seed=4) == 2


@kernels
def test_compress_chunked_prefill_stale_state_fp32(cuda_ops):
    assert _run_stream(cuda_ops[1], (3, 3, 5, 2, 9), 4, True, seed=5) == 5  # chunks across block boundaries
    assert _run_stream(cuda_ops[1], (6, 1), 4, True, stale=True, seed=6) == 1  # start_pos 0 ignores the state
    assert _run_stream(cuda_ops[1], (13, 1, 1, 1), 8, False, stale=True, seed=7) == 2
    assert _run_stream(cuda_ops[1], (10, 1, 1), 4, True, out_dtype=torch.float32, seed=8) == 3


@kernels
@pytest.mark.parametrize(("ratio", "overlap"), [(4, True), (128, False)], ids=["CSA", "HCA"])
def test_compress_decode_steps_strided(cuda_ops, ratio, overlap):
    # one token a call from position 0 through two block completions (2m calls), entries and states
    # checked after every call: the in-launch state update at each offset mod m; B=2, strided
    assert _run_stream(cuda_ops[1], (1,) * (2 * ratio), ratio, overlap, d=16, rope=8, strided=True, seed=9) == 2


@kernels
@pytest.mark.parametrize(
    ("ratio", "overlap", "chunks"),
    [
        # start_pos 3: 3 entries, the first 2 read the carried state; 12: S=0; 12, 16: carried block
        # boundary (only entry 0 reads the state); 26: completes one entry, the kept slots move
        # down and the rest of the old ones are emptied; 31: 2 entries reading the state
        (4, True, (3, 9, 0, 4, 8, 2, 2, 3, 5)),
        # 100: completes block 0; 128: carried state empty (held 0); 188: 2 entries, S=0 before;
        # 384: a whole block from an empty state
        (128, False, (100, 28, 60, 0, 196, 128, 3)),
    ],
    ids=["CSA", "HCA"],
)
def test_compress_prefill_chunks_across_blocks(cuda_ops, ratio, overlap, chunks):
    assert _run_stream(cuda_ops[1], chunks, ratio, overlap, d=16, rope=8, strided=True, seed=10) == sum(chunks) // ratio


@kernels
@pytest.mark.parametrize(("split", "elements"), [(1, 2 * 32), (4, 2 * 8)], ids=["whole", "4 blocks"])
def test_compress_slot_chunks_of_two(cuda_ops, monkeypatch, split, elements):
    # SLOT_BLOCK 2 (d=32, one program or four of 8 channels): entries pool over 4 chunks of slots,
    # the state is written one slot a chunk, in ascending order; at start_pos 3 and 15 (CSA) the
    # kept block moves down by m
    from seahal.backends.cuda import compressor

    monkeypatch.setattr(compressor, "channel_split", lambda d, seq_len, ratio, device: split)
    monkeypatch.setattr(compressor, "ELEMENTS_PER_CHUNK", elements)
    assert _run_stream(cuda_ops[1], (3, 1, 2, 9, 1, 1), 4, True, d=32, rope=8, seed=11) == 4
    assert _run_stream(cuda_ops[1], (13, 1, 1, 1, 6), 8, False, d=32, rope=8, seed=12) == 2


@kernels
@pytest.mark.parametrize(
    ("d", "seq_len", "ratio", "split"),
    [(512, 1, 128, 16), (512, 1, 4, 16), (128, 1, 4, 4), (512, 300, 4, 8), (512, 8192, 128, 8),
     (512, 8192, 4, 1), (512, 65536, 128, 1), (32, 1, 4, 1)],
)
def test_channel_split_on_the_gpu(d, seq_len, ratio, split):
    # decode cuts V4's 512 channels into 16 blocks of 32 (HCA: 16 programs of 64 KB instead of one
    # of 1 MB), HCA prefill of 8192 tokens (64 entries) into 8; CSA prefill and long HCA prefill
    # keep one program an entry; blocks stay >= 32 channels (d 32: one block)
    from seahal.backends.cuda import compressor

    assert compressor.channel_split(d, seq_len, ratio, torch.device("cuda")) == split


# --------------------------------------------------------------------------------------------
# kv_compress_fp8: the entries packed into FP8 records in the same launch
# --------------------------------------------------------------------------------------------


def _run_fp8_stream(chunks, ratio, overlap, d, rope, tile, seed):
    """Feed the chunks to ``kv_compress_fp8`` and to ``kv_cache_pack(kv_compress(...))`` of this
    backend, each with its own state (token-major kv, fused state buffers): records and states
    bitwise equal after every call. The fused kernel rounds the entry to bf16 as kv_compress stores
    it, then packs it with kv_cache_pack's device functions, so no rounding may differ. (Against the
    CPU reference: ``seahal conformance --backend cuda --interpret --ops kv_compress_fp8``.) Returns
    the number of records compared."""
    from seahal.backends.cuda import compressor, quant

    kv, score, ape, weight, freqs = _stream(2, sum(chunks), ratio, d, rope, overlap, seed, token_major=True)
    fused_state, split_state = (_device_state(compressor_state(2, ratio, d, overlap), fused=True) for _ in range(2))
    params = (ape.to(DEVICE), weight.to(DEVICE), freqs.to(DEVICE))
    start, completed = 0, 0
    for call, size in enumerate(chunks):
        tokens = (kv[:, start : start + size].to(DEVICE), score[:, start : start + size].to(DEVICE))
        where = f"call {call} (start_pos {start}, S {size})"
        records = compressor.kv_compress_fp8(*tokens, *params, *fused_state, ratio, overlap, start, 1e-6, rope, tile)
        entries = compressor.kv_compress(*tokens, *params, *split_state, ratio, overlap, start, 1e-6)
        want = quant.kv_cache_pack(entries, rope, tile)
        assert records.dtype == torch.uint8 and records.shape == want.shape, (where, records.shape, want.shape)
        differ = (records.cpu() != want.cpu()).any(-1)
        assert not differ.any(), f"{where}: records differ at [b, entry] {differ.nonzero().tolist()}"
        for name, mine, theirs in zip(("kv_state", "score_state"), fused_state, split_state, strict=True):
            assert torch.equal(mine.cpu(), theirs.cpu()), f"{where}: {name} differs"
        completed += records.shape[1]
        start += size
    return completed


@kernels
@pytest.mark.parametrize(("ratio", "overlap"), [(4, True), (16, False)], ids=["CSA", "HCA"])
def test_compress_fp8_is_pack_of_entries(ratio, overlap):
    # decode steps through two block completions, then prefill chunks across blocks; records of a
    # small geometry (d 32: 2 nope tiles of 8 + 16 RoPE dims, 4 padding bytes)
    chunks = (1,) * (2 * ratio) + (3, 2 * ratio + 1, 0, 5)
    assert _run_fp8_stream(chunks, ratio, overlap, d=32, rope=16, tile=8, seed=13) == sum(chunks) // ratio


@kernels
@pytest.mark.parametrize(("ratio", "overlap"), [(4, True), (128, False)], ids=["CSA", "HCA"])
def test_compress_fp8_v4_records(channels, ratio, overlap):
    # V4's 584-byte records (d 512, rope 64, tile 64): a prefill, then decode steps
    chunks = (ratio + 3, 1, 1)
    assert _run_fp8_stream(chunks, ratio, overlap, d=512, rope=64, tile=64, seed=14) == sum(chunks) // ratio


# --------------------------------------------------------------------------------------------
# start_pos as a 0-d device tensor (CUDA-graph decode): one launch for every position
# --------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of t (bitwise comparison of any dtype: -0.0 differs from 0.0, -inf rows match)."""
    return t.cpu().contiguous().view(torch.uint8)


def _run_at_tensor_positions(op, chunks, ratio, overlap, d, rope, seed, reference=None, **options):
    """Feed the chunks to ``op`` (a cuda compressor function) twice, each run with its own state,
    at int start_pos and at ``torch.tensor(start_pos)``; both states start dirty (random), so the
    first call (start_pos 0) must ignore them. After every call: the tensor run's output has
    ceil(S / m) rows, its first new_entries equal the int run's bit for bit, the rest are zeros;
    the states are equal bit for bit. reference: the CPU reference op, run beside with a third
    state (entries within :func:`_assert_entries_close`, state bitwise). Returns the number of new
    entries compared."""
    kv, score, ape, weight, freqs = _stream(2, sum(chunks), ratio, d, rope, overlap, seed, token_major=True)
    states = []
    for run in range(3):
        kv_state, score_state = compressor_state(2, ratio, d, overlap)
        kv_state.normal_(generator=torch.Generator().manual_seed(1))
        score_state.normal_(generator=torch.Generator().manual_seed(2))
        states.append((kv_state, score_state) if run == 2 else _device_state((kv_state, score_state), fused=True))
    params = (ape.to(DEVICE), weight.to(DEVICE), freqs.to(DEVICE))
    start, compared = 0, 0
    for call, size in enumerate(chunks):
        window = slice(start, start + size)
        tokens = (kv[:, window].to(DEVICE), score[:, window].to(DEVICE))
        where = f"call {call} (start_pos {start}, S {size})"
        at_int = op(*tokens, *params, *states[0], ratio, overlap, start, 1e-6, **options)
        position = torch.tensor(start, device=DEVICE)
        at_tensor = op(*tokens, *params, *states[1], ratio, overlap, position, 1e-6, **options)
        n_new = new_entries(start, size, ratio)
        assert at_int.shape[1] == n_new, where
        assert at_tensor.dtype == at_int.dtype, where
        assert at_tensor.shape == (2, -(-size // ratio), at_int.shape[2]), (where, at_tensor.shape)
        assert torch.equal(_bits(at_tensor[:, :n_new]), _bits(at_int)), f"{where}: entries differ"
        assert not _bits(at_tensor[:, n_new:]).any(), f"{where}: rows past the new entries are not zero"
        for name, mine, theirs in zip(("kv_state", "score_state"), states[1], states[0], strict=True):
            assert torch.equal(_bits(mine), _bits(theirs)), f"{where}: {name} differs from the int position's"
        if reference is not None:
            want = reference(kv[:, window], score[:, window], ape, weight, freqs, *states[2], ratio, overlap, start,
                             1e-6, **options)
            _assert_entries_close(at_tensor[:, :n_new], want)
            for name, mine, theirs in zip(("kv_state", "score_state"), states[1], states[2], strict=True):
                assert torch.equal(_bits(mine), _bits(theirs)), f"{where}: {name} differs from the reference's"
        compared += n_new
        start += size
    return compared


POSITION_CHUNKS = (6,) + (1,) * 9 + (3, 0, 5, 2)
"""A prefill from position 0 (a dirty state: the reset), decode steps 6..14 across the block
boundaries 8 and 12, then chunks at positions off a boundary: 15 (3 tokens, one entry), 18 (S=0),
18 (5 tokens: one entry and one zero row), 23 (2 tokens, one entry)."""


@kernels
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("overlap", [True, False], ids=["CSA", "plain"])
def test_compress_at_tensor_positions(overlap, out_dtype):
    from seahal.backends.cuda import compressor

    compared = _run_at_tensor_positions(compressor.kv_compress, POSITION_CHUNKS, 4, overlap, d=16, rope=8, seed=15,
                                        reference=ref_compressor.kv_compress, out_dtype=out_dtype)
    assert compared == sum(POSITION_CHUNKS) // 4


@kernels
@pytest.mark.parametrize("overlap", [True, False], ids=["CSA", "plain"])
def test_compress_fp8_at_tensor_positions(overlap):
    # zero rows are zero bytes: the records' width (d 32: 2 nope tiles of 8 + 16 RoPE dims, 4 padding)
    from seahal.backends.cuda import compressor

    compared = _run_at_tensor_positions(compressor.kv_compress_fp8, POSITION_CHUNKS, 4, overlap, d=32, rope=16,
                                        seed=16, rope_dim=16, tile=8)
    assert compared == sum(POSITION_CHUNKS) // 4


def _positions(values: list[int], dtype: torch.dtype, strided: bool) -> torch.Tensor:
    """[B] positions on DEVICE; strided: every other element of a [2B] buffer (stride 2), the other
    elements -1 (a kernel ignoring the stride would read them)."""
    if not strided:
        return torch.tensor(values, dtype=dtype, device=DEVICE)
    return torch.tensor([[p, -1] for p in values], dtype=dtype, device=DEVICE)[:, 0]


def _run_at_sequence_positions(op, offsets, chunks, ratio, overlap, d, rope, seed, positions, **options):
    """Sequences b = 0..B-1 at different positions in one call with a [B] start_pos, against the int
    path on each sequence's slice (kv[b:b+1], its state rows), bit for bit.

    Every state starts dirty (random); sequence b is first brought to offsets[b] by int calls on
    its slice (its first one from 0 ignores the dirt), so a sequence at offset 0 meets the batched
    call with a dirty state it must reset. Then the chunks run at ``positions(p)`` (p the
    sequences' positions): after every call sequence b's first new_entries(p_b, S, m) rows equal its
    int call's, the rest of the ceil(S / m) rows are zeros, and the states equal bit for bit.
    Returns the number of new entries compared, over all sequences.
    """
    batch = len(offsets)
    kv, score, ape, weight, freqs = _stream(batch, max(offsets) + sum(chunks), ratio, d, rope, overlap, seed,
                                            token_major=True)
    kv_state, score_state = compressor_state(batch, ratio, d, overlap)
    kv_state.normal_(generator=torch.Generator().manual_seed(1))
    score_state.normal_(generator=torch.Generator().manual_seed(2))
    at_int = _device_state((kv_state, score_state), fused=True)  # sliced per sequence: views of these
    params = (ape.to(DEVICE), weight.to(DEVICE), freqs.to(DEVICE))

    def int_call(b: int, start: int, size: int) -> torch.Tensor:
        tokens = (kv[b : b + 1, start : start + size].to(DEVICE), score[b : b + 1, start : start + size].to(DEVICE))
        state = (at_int[0][b : b + 1], at_int[1][b : b + 1])
        return op(*tokens, *params, *state, ratio, overlap, start, 1e-6, **options)

    for b, offset in enumerate(offsets):
        if offset:
            int_call(b, 0, offset)
    at_tensor = tuple(s.clone() for s in at_int)
    pos, compared = list(offsets), 0
    for call, size in enumerate(chunks):
        where = f"call {call} (positions {pos}, S {size})"
        tokens = torch.stack([kv[b, p : p + size] for b, p in enumerate(pos)]).to(DEVICE), torch.stack(
            [score[b, p : p + size] for b, p in enumerate(pos)]
        ).to(DEVICE)
        got = op(*tokens, *params, *at_tensor, ratio, overlap, positions(pos), 1e-6, **options)
        assert got.shape[:2] == (batch, -(-size // ratio)), (where, got.shape)
        for b, p in enumerate(pos):
            want, n_new = int_call(b, p, size), new_entries(p, size, ratio)
            assert got.dtype == want.dtype and want.shape[1] == n_new, where
            assert torch.equal(_bits(got[b, :n_new]), _bits(want[0])), f"{where}: sequence {b}'s entries differ"
            assert not _bits(got[b, n_new:]).any(), f"{where}: sequence {b}'s rows past its entries are not zero"
            compared += n_new
        for name, mine, theirs in zip(("kv_state", "score_state"), at_tensor, at_int, strict=True):
            differ = (_bits(mine) != _bits(theirs)).flatten(-2).any(-1)
            assert not differ.any(), f"{where}: {name} differs in sequences {differ.nonzero().flatten().tolist()}"
        pos = [p + size for p in pos]
    return compared


SEQUENCE_OFFSETS = (0, 7, 8)
"""Sequences at 0 (a dirty state: its own reset), mid-block (7 = 4 + 3) and a block boundary (8)."""
SEQUENCE_CHUNKS = (6,) + (1,) * 4 + (2,)
"""A 6-token chunk (the sequences complete 1, 2 and 1 entries of 2 rows), four decode steps from
positions 6, 13, 14 (entries at 7; 15; 15: sequence 1 one step after the others), then a 2-token
chunk at 10, 17, 18 (1, 0 and 1 entries of 1 row)."""
SEQUENCE_ENTRIES = sum((offset + sum(SEQUENCE_CHUNKS)) // 4 - offset // 4 for offset in SEQUENCE_OFFSETS)
"""Entries the three sequences complete over SEQUENCE_CHUNKS at m = 4: 3 each."""


@kernels
@pytest.mark.parametrize("overlap", [True, False], ids=["CSA", "plain"])
def test_compress_at_sequence_positions(overlap):
    from seahal.backends.cuda import compressor

    compared = _run_at_sequence_positions(
        compressor.kv_compress, SEQUENCE_OFFSETS, SEQUENCE_CHUNKS, 4, overlap, d=16, rope=8, seed=17,
        positions=lambda pos: _positions(pos, torch.int64, strided=False),
    )
    assert compared == SEQUENCE_ENTRIES


@kernels
@pytest.mark.parametrize("overlap", [True, False], ids=["CSA", "plain"])
def test_compress_fp8_at_sequence_positions(overlap):
    # int32 positions, every other element of a buffer (stride 2)
    from seahal.backends.cuda import compressor

    compared = _run_at_sequence_positions(
        compressor.kv_compress_fp8, SEQUENCE_OFFSETS, SEQUENCE_CHUNKS, 4, overlap, d=32, rope=16, seed=18,
        positions=lambda pos: _positions(pos, torch.int32, strided=True), rope_dim=16, tile=8,
    )
    assert compared == SEQUENCE_ENTRIES


# --------------------------------------------------------------------------------------------
# kv_compress_store: the records stored at their slots' rows by the same launch
# --------------------------------------------------------------------------------------------


@kernels
@pytest.mark.parametrize(
    ("ratio", "overlap", "position", "slots_shared"),
    [(4, True, "int", False), (4, True, "per sequence", True), (8, False, "per sequence", False),
     (8, False, "int", True)],
    ids=["CSA-int", "CSA-per sequence-shared slots", "HCA-per sequence", "HCA-int-shared slots"],
)
def test_compress_store_puts_the_records_at_their_slots(ratio, overlap, position, slots_shared):
    """kv_compress_store against kv_compress_fp8 of this backend (each with its own state), bit for
    bit: after every call the store's rows at the slots are the records (at a tensor position the
    zero rows past a sequence's entries too), every other row keeps its random bytes, and the
    states are equal. The store is a view past 5 rows of a wider buffer (as the model's cache holds
    its compressed entries past the window ring); the slots run backwards, per sequence or (shared)
    one row for the batch. Sequences at 0 and 7 (per sequence) or both at 0 (int)."""
    from seahal.backends.cuda import compressor

    d, rope, tile, batch = 32, 16, 8, 2
    chunks = (6,) + (1,) * (ratio + 1) + (3, 0, 2 * ratio + 1)
    offsets = (0, 7) if position == "per sequence" else (0, 0)
    kv, score, ape, weight, freqs = _stream(batch, max(offsets) + sum(chunks), ratio, d, rope, overlap, seed=21,
                                            token_major=True)
    params = (ape.to(DEVICE), weight.to(DEVICE), freqs.to(DEVICE))
    fp8_state, store_state = (_device_state(compressor_state(batch, ratio, d, overlap), fused=True) for _ in range(2))
    width, rows = kv_record_bytes(d, rope, tile), 64
    buffer = torch.randint(0, 256, (batch, 5 + rows, width), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(3)).to(DEVICE)
    store, head = buffer[:, 5:], buffer[:, :5].clone()
    pos, written = list(offsets), 0
    for call, size in enumerate(chunks):
        where = f"call {call} (positions {pos}, S {size})"
        tokens = (torch.stack([kv[b, p : p + size] for b, p in enumerate(pos)]).to(DEVICE),
                  torch.stack([score[b, p : p + size] for b, p in enumerate(pos)]).to(DEVICE))
        start = torch.tensor(pos, device=DEVICE) if position == "per sequence" else pos[0]
        records = compressor.kv_compress_fp8(*tokens, *params, *fp8_state, ratio, overlap, start, 1e-6, rope, tile)
        n = records.shape[1]
        first = rows - 1 - written  # rows never written before: a lost write keeps random bytes
        slots = torch.arange(first, first - n, -1).expand(1 if slots_shared else batch, n).to(DEVICE)
        before = store.clone()
        compressor.kv_compress_store(*tokens, *params, *store_state, ratio, overlap, start, store, slots, 1e-6,
                                     rope, tile)
        want = before.clone()
        want[:, first - n + 1 : first + 1] = records.flip(1)
        differ = (_bits(store) != _bits(want)).any(-1)
        assert not differ.any(), f"{where}: store rows differ at [b, row] {differ.nonzero().tolist()}"
        for name, mine, theirs in zip(("kv_state", "score_state"), store_state, fp8_state, strict=True):
            assert torch.equal(_bits(mine), _bits(theirs)), f"{where}: {name} differs"
        written += n
        pos = [p + size for p in pos]
    assert torch.equal(buffer[:, :5], head), "the rows before the store's view were written"
    n_rows = [-(-size // ratio) for size in chunks] if position == "per sequence" else [
        new_entries(sum(chunks[:call]), size, ratio) for call, size in enumerate(chunks)]
    assert written == sum(n_rows) >= 3, (written, n_rows)


@kernels
@pytest.mark.parametrize(
    "start_pos",
    [torch.zeros(3, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, dtype=torch.float32)],
    ids=["3 positions for 2 sequences", "2-d", "float"],
)
def test_compress_rejects_position_shapes(cuda_ops, start_pos):
    kv, score, ape, weight, freqs = _stream(2, 4, 4, 8, 4, False, seed=0)
    with pytest.raises(ValueError, match=r"start_pos must be 0-d or \[B=2\] int32/int64"):
        cuda_ops[1](kv.to(DEVICE), score.to(DEVICE), ape.to(DEVICE), weight.to(DEVICE), freqs.to(DEVICE),
                    *(s.to(DEVICE) for s in compressor_state(2, 4, 8, False)), 4, False, start_pos.to(DEVICE))


ONE_LAUNCH_CALLS = {
    f"{step}-{kind}": (ratio, overlap, start_pos, seq_len)
    for step, (start_pos, seq_len) in {"decode": (4094, 1), "decode-entry": (4095, 1), "prefill": (0, 8192),
                                       "chunk": (4093, 300)}.items()
    for kind, (ratio, overlap) in {"CSA": (4, True), "HCA": (128, False)}.items()
}
"""kv_compress calls whose launches are counted: decode with and without a completed entry, a
prefill from position 0 and a carried chunk, for CSA and HCA at d = 512."""


def launches_per_call() -> dict[str, tuple[list[str], list[str]]]:
    """For each call of :data:`ONE_LAUNCH_CALLS`: (the Triton kernels it launches, the other aten
    ops that would launch a device kernel), recorded as an H100 would see them (capture_launches,
    meta tensors posing as cuda:0), no GPU needed. Needs compiled (not interpreted) kernels: run in
    a process without TRITON_INTERPRET (:func:`test_compress_is_one_launch` starts one)."""
    from seahal.backends.cuda import compressor
    from seahal.backends.cuda._gemm import arrival_counters
    from seahal.testing.triton_compile import AtenKernels, capture_launches

    counts = {}
    with capture_launches():  # the arrival counters: zeroed once per stream, then reset by the kernel
        arrival_counters(1, torch.empty(1, device="cuda").device)
    for name, (ratio, overlap, start_pos, seq_len) in ONE_LAUNCH_CALLS.items():
        coff, d = (2 if overlap else 1), 512
        with capture_launches() as launches, AtenKernels() as aten:
            def empty(*shape):
                return torch.empty(shape, device="cuda")

            compressor.kv_compress(
                empty(1, seq_len, coff * d), empty(1, seq_len, coff * d), empty(ratio, coff * d), empty(d),
                empty(32), empty(1, coff * ratio, coff * d), empty(1, coff * ratio, coff * d), ratio, overlap,
                start_pos,
            )
        counts[name] = ([launch.name for launch in launches], aten.ops)
    return counts


@pytest.fixture(scope="module")
def recorded_launches() -> dict[str, list[list[str]]]:
    """:func:`launches_per_call` in a fresh process: an earlier test of this session may have
    imported the kernels under TRITON_INTERPRET, and Triton decides at import what a kernel is."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(IN_INTERPRETER, reason="runs in the main pytest process (it starts its own)")
@pytest.mark.parametrize("call", ONE_LAUNCH_CALLS)
def test_compress_is_one_launch(recorded_launches, call):
    # entries and the state update in one Triton launch, no other device kernel (the output is allocated)
    triton_kernels, other_kernels = recorded_launches[call]
    assert triton_kernels == ["_kv_compress_kernel"]
    assert other_kernels == []


@kernels
def test_compress_rejects_float64(cuda_ops):
    kv, score, ape, weight, freqs = _stream(1, 4, 4, 8, 4, False, seed=0)
    with pytest.raises(NotImplementedError, match="kv must be float32"):
        cuda_ops[1](kv.double().to(DEVICE), score.to(DEVICE), ape.to(DEVICE), weight.to(DEVICE), freqs.to(DEVICE),
                    *(s.to(DEVICE) for s in compressor_state(1, 4, 8, False)), 4, False, 0)


if __name__ == "__main__":
    print(json.dumps(launches_per_call()))
