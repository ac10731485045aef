"""KV compressor reference (v4_ops.md §7): brute force, streaming, reset, state layout, transformers."""

from __future__ import annotations

import math

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference.compressor import kv_compress
from seahal.hal.ops.compressor import compressor_state, new_entries
from seahal.hal.ops.rope import Yarn, rope_frequencies

from hf_v4 import randomize_, tiny_config, transformers_v4

# Tiny compressed-RoPE table of v4_ops.md §14: 8 rope dims, base 160000, YaRN factor 4 over 64.
FREQS = rope_frequencies(8, 160000.0, Yarn(factor=4.0, original_seq_len=64))
EPS = 1e-6


def _bf16(v: float) -> float:
    return torch.tensor(v, dtype=torch.float64).to(torch.bfloat16).item()


def _inputs(batch, seq, ratio, overlap, d, dtype=torch.float32, seed=0):
    """Random projections, ape and norm weight; gate scores spread (std 2) so pooling is not uniform."""
    g = torch.Generator().manual_seed(seed)
    channels = (2 if overlap else 1) * d
    kv = torch.randn(batch, seq, channels, generator=g, dtype=torch.float64).to(dtype)
    score = (2 * torch.randn(batch, seq, channels, generator=g, dtype=torch.float64)).to(dtype)
    ape = torch.randn(ratio, channels, generator=g, dtype=torch.float64).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)).to(dtype)
    return kv, score, ape, norm_weight


def _brute_force(kv, score, ape, norm_weight, freqs, ratio, overlap, rounding=_bf16):
    """Every entry of a sequence starting at position 0, with Python loops over entries, channels, slots.

    Entry j, channel c: slots are (overlap, j > 0) the a-halves of block j-1 then the b-halves of
    block j, else the m tokens of block j; ``sum softmax(z) * kv`` with z = score + ape[t mod m];
    then round (bf16), RMSNorm, round, rotate pair i of the last 2*len(freqs) dims by (j*m)*f_i, round.
    """
    kv, score, ape, w, f = (t.double().tolist() for t in (kv, score, ape, norm_weight, freqs))
    d = len(w)
    rope_start = d - 2 * len(f)
    out = []
    for kv_b, score_b in zip(kv, score):
        entries = []
        for j in range(len(kv_b) // ratio):
            pooled = []
            for c in range(d):
                slots = []
                if overlap and j > 0:
                    previous = range((j - 1) * ratio, j * ratio)
                    slots += [(kv_b[t][c], score_b[t][c] + ape[t % ratio][c]) for t in previous]
                cb = c + d if overlap else c
                current = range(j * ratio, (j + 1) * ratio)
                slots += [(kv_b[t][cb], score_b[t][cb] + ape[t % ratio][cb]) for t in current]
                top = max(z for _, z in slots)
                weights = [math.exp(z - top) for _, z in slots]
                pooled.append(sum(wt * v for wt, (v, _) in zip(weights, slots)) / sum(weights))
            x = [rounding(v) for v in pooled]
            inv_rms = 1 / math.sqrt(sum(v * v for v in x) / d + EPS)
            y = [rounding(w[c] * x[c] * inv_rms) for c in range(d)]
            for i, fi in enumerate(f):
                angle = j * ratio * fi
                a, b = y[rope_start + 2 * i], y[rope_start + 2 * i + 1]
                y[rope_start + 2 * i] = a * math.cos(angle) - b * math.sin(angle)
                y[rope_start + 2 * i + 1] = a * math.sin(angle) + b * math.cos(angle)
            entries.append([rounding(v) for v in y])
        out.append(entries)
    return torch.tensor(out, dtype=torch.float64).reshape(len(kv), -1, d)


def _assert_entries_close(got: torch.Tensor, expected: torch.Tensor, spread_ulps: float) -> None:
    """bf16 entries vs an fp64 oracle: the final bf16 rounding (half an ulp, rtol 2^-8) plus errors
    of earlier roundings that the rotation spreads over a pair, bounded by spread_ulps bf16 ulps
    (2^-8 relative) of the largest entry value."""
    atol = spread_ulps * 2**-8 * expected.abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=2**-8, atol=atol)


def _compress_in_chunks(kv, score, ape, norm_weight, ratio, overlap, chunks, state=None):
    """Feed the sequence as consecutive calls of the given sizes; returns (all entries, final state)."""
    d = norm_weight.shape[0]
    kv_state, score_state = state or compressor_state(kv.shape[0], ratio, d, overlap)
    entries, pos = [], 0
    for n in chunks:
        args = (kv[:, pos : pos + n], score[:, pos : pos + n], ape, norm_weight, FREQS, kv_state, score_state)
        out = kv_compress(*args, ratio, overlap, pos)
        assert out.shape == (kv.shape[0], new_entries(pos, n, ratio), d) and out.dtype == torch.bfloat16
        entries.append(out)
        pos += n
    return torch.cat(entries, dim=1), (kv_state, score_state)


@pytest.mark.parametrize(
    "ratio, overlap, d, seq",
    [(4, True, 16, 19), (4, True, 16, 4), (16, False, 16, 35), (128, False, 8, 260)],
    ids=["csa", "csa-one-block", "hca16", "hca128"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_brute_force(ratio, overlap, d, seq, dtype):
    kv, score, ape, w = _inputs(2 if ratio < 128 else 1, seq, ratio, overlap, d, dtype)
    got, _ = _compress_in_chunks(kv, score, ape, w, ratio, overlap, [seq])
    expected = _brute_force(kv, score, ape, w, FREQS, ratio, overlap)
    assert got.shape[1] == seq // ratio
    # Same roundings to bf16 on both sides; the fp64 (fp32) math before them can only flip one where
    # a value lies within ~1e-16 (~2^-24) relative of a rounding boundary: one ulp.
    _assert_entries_close(got, expected, spread_ulps=1)


@pytest.mark.parametrize("ratio, overlap, d", [(4, True, 16), (16, False, 8)])
def test_fp64_entries_match_brute_force_tightly(ratio, overlap, d):
    """out_dtype=float64 removes the bf16 roundings: the pooling, norm and rotation math itself."""
    kv, score, ape, w = _inputs(2, 2 * ratio + 3, ratio, overlap, d, torch.float64)
    state = compressor_state(2, ratio, d, overlap)
    got = kv_compress(kv, score, ape, w, FREQS, *state, ratio, overlap, 0, EPS, torch.float64)
    assert got.dtype == torch.float64
    expected = _brute_force(kv, score, ape, w, FREQS, ratio, overlap, rounding=float)
    # fp64 both sides, different summation order and libm vs torch exp: ~1e-15
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_overlap_boundary_entry_zero_ignores_a_halves():
    """Entry 0 has no previous block: changing every a-half leaves it, and only it, unchanged."""
    d = 8
    kv, score, ape, w = _inputs(1, 12, 4, True, d)
    base, _ = _compress_in_chunks(kv, score, ape, w, 4, True, [12])
    kv2 = kv.clone()
    kv2[..., :d] += 5.0
    moved, _ = _compress_in_chunks(kv2, score, ape, w, 4, True, [12])
    assert torch.equal(moved[:, 0], base[:, 0])
    assert not torch.equal(moved[:, 1], base[:, 1]) and not torch.equal(moved[:, 2], base[:, 2])


def _streaming_cases(ratio):
    """Sequence lengths around the first block boundaries and split points k before the end."""
    lengths = {s for b in (ratio, 2 * ratio) for s in (b - 1, b, b + 1)}
    if ratio == 4:
        lengths |= {1, 2, 3, 5}
    lengths = sorted(lengths)
    return [(s, k) for s in lengths for k in (1, 2, 3, ratio + 1) if k <= s]


@pytest.mark.parametrize("ratio, overlap", [(4, True), (16, False), (128, False)], ids=["csa", "hca16", "hca128"])
def test_streaming_equals_prefill(ratio, overlap):
    """prefill(S) == prefill(S-k) + k one-token calls == irregular chunks: same entries, same state."""
    d = 8
    seq_max = 2 * ratio + 9
    kv, score, ape, w = _inputs(2, seq_max, ratio, overlap, d)
    for seq, k in _streaming_cases(ratio):
        args = (kv[:, :seq], score[:, :seq], ape, w, ratio, overlap)
        prefill, prefill_state = _compress_in_chunks(*args, [seq])
        streamed, streamed_state = _compress_in_chunks(*args, [seq - k] + [1] * k)
        # identical fp32 values pooled over the same slots in the same order: bit-identical
        assert torch.equal(streamed, prefill), (seq, k)
        assert all(torch.equal(a, b) for a, b in zip(streamed_state, prefill_state)), (seq, k)
    chunks = [3, 1, ratio + 2, 2, ratio - 1]
    chunks.append(seq_max - sum(chunks))
    chunked, _ = _compress_in_chunks(kv, score, ape, w, ratio, overlap, chunks)
    prefill, _ = _compress_in_chunks(kv, score, ape, w, ratio, overlap, [seq_max])
    assert torch.equal(chunked, prefill)


def test_empty_call_keeps_state():
    kv, score, ape, w = _inputs(1, 6, 4, True, 8)
    _, state = _compress_in_chunks(kv, score, ape, w, 4, True, [6])
    before = tuple(s.clone() for s in state)
    out = kv_compress(kv[:, :0], score[:, :0], ape, w, FREQS, *state, 4, True, 6)
    assert out.shape == (1, 0, 8)
    assert all(torch.equal(a, b) for a, b in zip(state, before))


@pytest.mark.parametrize("ratio, overlap", [(4, True), (16, False)])
def test_start_pos_zero_resets_dirty_state(ratio, overlap):
    d = 8
    kv, score, ape, w = _inputs(2, ratio + 3, ratio, overlap, d)
    clean, clean_state = _compress_in_chunks(kv, score, ape, w, ratio, overlap, [ratio + 3])
    dirty = tuple(torch.randn_like(s) for s in compressor_state(2, ratio, d, overlap))
    got, dirty_state = _compress_in_chunks(kv, score, ape, w, ratio, overlap, [ratio + 3], state=dirty)
    assert torch.equal(got, clean)
    assert all(torch.equal(a, b) for a, b in zip(dirty_state, clean_state))
    # and at start_pos > 0 the state is used (the reset is only at 0): finish block 1 from m + 1
    dirty = tuple(torch.randn_like(s) for s in compressor_state(2, ratio, d, overlap))
    rest = (kv[:, : ratio - 1], score[:, : ratio - 1], ape, w, FREQS)
    carried = kv_compress(*rest, *dirty, ratio, overlap, ratio + 1)
    fresh = kv_compress(*rest, *clean_state, ratio, overlap, ratio + 1)
    assert carried.shape == fresh.shape == (2, 1, d)
    assert not torch.equal(carried, fresh)


def test_state_layout_after_prefill():
    """Overlap: slots [0, m) = last complete block, [m, m + r) = remainder; unused slots 0 / -inf."""
    d, m = 8, 4
    kv, score, ape, w = _inputs(1, 10, m, True, d)
    _, (kv_state, score_state) = _compress_in_chunks(kv, score, ape, w, m, True, [10])
    z = score + ape[torch.arange(10) % m]
    assert torch.equal(kv_state[0, :6], kv[0, 4:10]) and torch.equal(score_state[0, :6], z[0, 4:10])
    assert torch.equal(kv_state[0, 6:], torch.zeros(2, 2 * d))
    assert torch.equal(score_state[0, 6:], torch.full((2, 2 * d), float("-inf")))
    # plain (m = 16): slots [0, r) = the incomplete block
    kv, score, ape, w = _inputs(1, 20, 16, False, d)
    _, (kv_state, score_state) = _compress_in_chunks(kv, score, ape, w, 16, False, [20])
    assert torch.equal(kv_state[0, :4], kv[0, 16:]) and torch.equal(score_state[0, :4], score[0, 16:] + ape[:4])
    assert torch.equal(kv_state[0, 4:], torch.zeros(12, d))
    assert torch.isneginf(score_state[0, 4:]).all()


def test_through_plan_mutates_state():
    d = 8
    kv, score, ape, w = _inputs(1, 7, 4, True, d)
    kv_state, score_state = compressor_state(1, 4, d, True)
    p = hal.plan("cpu", ops=["kv_compress"], announce=False)
    got = p.ops.kv_compress(kv, score, ape, w, FREQS, kv_state, score_state, 4, True, 0)
    expected, (ref_kv_state, ref_score_state) = _compress_in_chunks(kv, score, ape, w, 4, True, [7])
    assert torch.equal(got, expected)
    assert torch.equal(kv_state, ref_kv_state) and torch.equal(score_state, ref_score_state)


# ---------------------------------------------------------------------------------------------
# transformers' DeepseekV4CSACompressor / DeepseekV4HCACompressor as an oracle (full sequence)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_matches_transformers_full_sequence(kind):
    hf = transformers_v4()

    config = tiny_config()
    module_cls = hf.DeepseekV4CSACompressor if kind == "csa" else hf.DeepseekV4HCACompressor
    module = randomize_(module_cls(config), seed=3).eval()
    ratio, overlap = (4, True) if kind == "csa" else (16, False)
    batch, seq = 2, 37
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, seq, config.hidden_size, generator=g, dtype=torch.float64)
    q_residual = torch.randn(batch, seq, config.q_lora_rank, generator=g, dtype=torch.float64)
    positions = torch.arange(seq).expand(batch, seq)
    with torch.no_grad():
        expected = module(x, q_residual, positions, None, 0)[0].squeeze(1)  # [B, T, head_dim] fp64

        kv, score = x @ module.kv_proj.weight.T, x @ module.gate_proj.weight.T
        freqs = module.rotary_emb.compress_inv_freq
        state = compressor_state(batch, ratio, config.head_dim, overlap)
        args = (kv, score, module.position_bias, module.kv_norm.weight, freqs, *state, ratio, overlap, 0)
        got = kv_compress(*args, config.rms_norm_eps)
    assert got.shape == expected.shape == (batch, seq // ratio, config.head_dim)
    # HF keeps fp64 throughout; REF rounds to bf16 three times (pooled, normed, rotated), each 2^-9
    # relative. The first two move a rotated pair by up to 2 * 2^-9 of its length (<= sqrt(2) max|e|),
    # i.e. < 1.5 ulps of the largest value; the last one is within rtol.
    _assert_entries_close(got, expected, spread_ulps=2)
    # without the bf16 roundings (out_dtype fp64) the same math as HF, which however runs its RMSNorm
    # and cos/sin in fp32 even in an fp64 module: a few fp32 ulps (2^-24) of values <= ~4
    state = compressor_state(batch, ratio, config.head_dim, overlap)
    unrounded = kv_compress(*args[:5], *state, ratio, overlap, 0, config.rms_norm_eps, torch.float64)
    torch.testing.assert_close(unrounded, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ratio, overlap", [(4, True), (16, False)])
def test_portable_no_host_sync(ratio, overlap):
    """Runs on meta tensors, where any host synchronisation (.item(), .tolist(), nonzero) raises."""
    d, coff = 8, 2 if overlap else 1
    kv = torch.empty(2, 9, coff * d, device="meta")
    state = compressor_state(2, ratio, d, overlap, device="meta")
    args = (kv, kv, torch.empty(ratio, coff * d, device="meta"), torch.empty(d, device="meta"), FREQS.to("meta"))
    out = kv_compress(*args, *state, ratio, overlap, 3)
    assert out.shape == (2, new_entries(3, 9, ratio), d) and out.dtype == torch.bfloat16


def test_new_entries_counts_the_block_boundaries_crossed():
    """new_entries(p, S, m) is floor((p+S)/m) - floor(p/m), the block ends in [p, p+S), for ints and
    tensors of positions alike."""
    for ratio in (1, 4, 128):
        positions = torch.arange(0, 3 * ratio + 2)
        for seq_len in (0, 1, ratio - 1, ratio, 2 * ratio + 3):
            boundaries = [sum((t + 1) % ratio == 0 for t in range(p, p + seq_len)) for p in positions.tolist()]
            assert [new_entries(p, seq_len, ratio) for p in positions.tolist()] == boundaries
            assert new_entries(positions, seq_len, ratio).tolist() == boundaries
