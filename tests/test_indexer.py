"""Lightning-indexer top-k reference (v4_ops.md §8): brute force, visibility, ties, transformers."""

from __future__ import annotations


import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference.compressor import kv_compress
from seahal.backends.cpu.reference.indexer import indexer_topk
from seahal.backends.cpu.reference.rope import rope
from seahal.hal.ops.compressor import compressor_state

from hf_v4 import randomize_, tiny_config, transformers_v4


def _inputs(batch, seq, heads, dim, n_entries, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, dim, generator=g, dtype=torch.float64).to(dtype)
    weights = torch.randn(batch, seq, heads, generator=g, dtype=torch.float64)
    keys = torch.randn(batch, n_entries, dim, generator=g, dtype=torch.float64).to(dtype)
    return q, weights.to(torch.float64 if dtype == torch.float64 else torch.float32), keys


def _scores_brute_force(q, weights, keys):
    """I[b][s][j] = sum_h w_h * max(0, sum_i q_hi K_ji), Python floats."""
    q, w, k = (t.double().tolist() for t in (q, weights, keys))

    def score(b, s, k_j):
        return sum(w_h * max(0.0, sum(a * c for a, c in zip(q_h, k_j))) for w_h, q_h in zip(w[b][s], q[b][s]))

    return [[[score(b, s, k_j) for k_j in k[b]] for s in range(len(q[b]))] for b in range(len(q))]


def _topk_from_scores(scores, ratio, start_pos, topk):
    """Visible j < min(N, (t+1)//m), ordered by (score desc, index asc), padded with -1."""
    rows = []
    for scores_b in scores:
        rows_b = []
        for s, scores_s in enumerate(scores_b):
            visible = min(len(scores_s), (start_pos + s + 1) // ratio)
            order = sorted(range(visible), key=lambda j: (-scores_s[j], j))[:topk]
            rows_b.append(order + [-1] * (topk - len(order)))
        rows.append(rows_b)
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("start_pos", [0, 5, 13])
@pytest.mark.parametrize("topk", [3, 8])
def test_matches_brute_force_fp64(start_pos, topk):
    q, w, keys = _inputs(2, 9, 3, 8, 6)
    got = indexer_topk(q, w, keys, 4, start_pos, topk)
    assert got.dtype == torch.int32 and got.shape == (2, 9, topk)
    # fp64 on both sides; random scores have gaps far above 1e-15: the same order
    assert torch.equal(got, _topk_from_scores(_scores_brute_force(q, w, keys), 4, start_pos, topk))


def test_matches_brute_force_bf16_inputs():
    q, w, keys = _inputs(2, 12, 4, 16, 5, dtype=torch.bfloat16, seed=1)
    got = indexer_topk(q, w, keys, 4, 3, 4)
    # fp32 math on bf16 values vs fp64 on the same values: ~1e-6 relative score error, far below the
    # gaps between random scores (seeded): the same order
    assert torch.equal(got, _topk_from_scores(_scores_brute_force(q, w, keys), 4, 3, 4))


def test_visibility_boundaries():
    """Scores grow with j, so the top-1 is always the newest visible entry: (t+1)//m - 1, or -1."""
    ratio, n_entries, start_pos, seq = 4, 5, 0, 24
    keys = torch.zeros(1, n_entries, 2)
    keys[0, :, 0] = torch.arange(1, n_entries + 1)
    q = torch.zeros(1, seq, 1, 2)
    q[..., 0] = 1.0
    w = torch.ones(1, seq, 1)
    got = indexer_topk(q, w, keys, ratio, start_pos, 2)
    for s in range(seq):
        t = start_pos + s
        newest = min(n_entries, (t + 1) // ratio) - 1  # t = 3 sees entry 0, t = 7 entry 1, ...
        expected = [newest, newest - 1] if newest >= 1 else [newest, -1]
        assert got[0, s].tolist() == expected, t
    # chunked: queries at positions 6..9 (the boundary t + 1 = 8 inside the chunk)
    got = indexer_topk(q[:, :4], w[:, :4], keys, ratio, 6, 1)
    assert got[0, :, 0].tolist() == [0, 1, 1, 1]


def test_topk_beyond_visible_pads_with_minus_one_at_the_end():
    q, w, keys = _inputs(1, 6, 2, 4, 3, seed=2)
    got = indexer_topk(q, w, keys, 2, 0, 5)
    for s in range(6):
        visible = min(3, (s + 1) // 2)
        row = got[0, s].tolist()
        assert sorted(row[:visible]) == list(range(visible))
        assert row[visible:] == [-1] * (5 - visible)


def test_ties_go_to_the_smaller_index():
    # entries 0, 2, 4 are the same key; 1 and 3 another, better-scoring key
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])
    keys = torch.stack((a, b, a, b, a))[None]
    q = torch.tensor([1.0, 0.0]).expand(1, 1, 1, 2)
    w = torch.ones(1, 1, 1)
    assert indexer_topk(q, w, keys, 4, 100, 5)[0, 0].tolist() == [1, 3, 0, 2, 4]
    # every score 0 (relu of negative logits): plain index order
    assert indexer_topk(-q, w, keys, 4, 100, 3)[0, 0].tolist() == [0, 1, 2]


def test_no_entries():
    q, w, keys = _inputs(1, 3, 2, 4, 0)
    assert torch.equal(indexer_topk(q, w, keys, 4, 10, 2), torch.full((1, 3, 2), -1, dtype=torch.int32))


def test_through_plan():
    q, w, keys = _inputs(1, 5, 2, 8, 4, dtype=torch.float32, seed=3)
    p = hal.plan("cpu", ops=["indexer_topk"], announce=False)
    got = p.ops.indexer_topk(q, w, keys, 4, 7, 3)
    assert torch.equal(got, _topk_from_scores(_scores_brute_force(q, w, keys), 4, 7, 3))


# ---------------------------------------------------------------------------------------------
# transformers' DeepseekV4IndexerScorer / DeepseekV4Indexer as an oracle (full sequence)
# ---------------------------------------------------------------------------------------------


def _hf_indexer(seed):
    hf = transformers_v4()

    config = tiny_config()
    return config, randomize_(hf.DeepseekV4Indexer(config), seed).eval()


def test_matches_transformers_scorer():
    """Same q, keys, x: our order == HF scores ordered by (score desc, index asc) over visible entries."""
    config, indexer = _hf_indexer(seed=5)
    batch, seq, n_entries, heads, dim = 2, 30, 7, config.index_n_heads, config.index_head_dim
    g = torch.Generator().manual_seed(6)
    x = torch.randn(batch, seq, config.hidden_size, generator=g, dtype=torch.float64)
    q = torch.randn(batch, seq, heads, dim, generator=g, dtype=torch.float64)
    keys = torch.randn(batch, n_entries, dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        hf_scores = indexer.scorer(q, keys, x)  # [B, S, T]
        weights = indexer.scorer.weights_proj(x) * (heads**-0.5 * dim**-0.5)
    got = indexer_topk(q, weights, keys, 4, 0, config.index_topk)
    # fp64 both sides, random data: no near-ties, so the order is the same
    assert torch.equal(got, _topk_from_scores(hf_scores.tolist(), 4, 0, config.index_topk))


def test_matches_transformers_indexer_full_sequence():
    """HF indexer (own compressor, roped q, scorer, causal top-k) vs kv_compress -> rope -> indexer_topk.

    Our keys are bf16 (the compressor's output format) while HF keeps fp64, so selections may differ
    only between entries whose HF scores are within the key rounding error of the k-th best.
    """
    config, indexer = _hf_indexer(seed=7)
    batch, seq, heads, dim, ratio = 2, 37, config.index_n_heads, config.index_head_dim, 4
    g = torch.Generator().manual_seed(8)
    x = torch.randn(batch, seq, config.hidden_size, generator=g, dtype=torch.float64)
    q_residual = torch.randn(batch, seq, config.q_lora_rank, generator=g, dtype=torch.float64)
    positions = torch.arange(seq).expand(batch, seq)
    captured = {}
    indexer.scorer.register_forward_hook(lambda module, args, out: captured.update(scores=out))
    with torch.no_grad():
        hf_indices = indexer(x, q_residual, positions, None, 0)

        freqs = indexer.rotary_emb.compress_inv_freq
        kv, score = x @ indexer.kv_proj.weight.T, x @ indexer.gate_proj.weight.T
        state = compressor_state(batch, ratio, dim, True)
        norm = (indexer.kv_norm.weight, freqs, *state, ratio, True, 0, config.rms_norm_eps)
        keys = kv_compress(kv, score, indexer.position_bias, *norm)
        q = rope((q_residual @ indexer.q_b_proj.weight.T).view(batch, seq, heads, dim), positions, freqs)
        weights = indexer.scorer.weights_proj(x) * (heads**-0.5 * dim**-0.5)
        got = indexer_topk(q, weights, keys, ratio, 0, config.index_topk)

    hf_scores = captured["scores"]
    # score error from keys rounded to bf16 (3 roundings, < 2^-7 relative per pair):
    # |dI| <= sum_h |w_h| |q_h| |dK| <= 2^-7 * sum_h |w_h| |q_h| max_j |K_j|
    bound = 2**-7 * (weights.abs() * q.norm(dim=-1)).sum(-1) * keys.double().norm(dim=-1).amax(-1)[:, None]
    exact = 0
    for b in range(batch):
        for s in range(seq):
            ours = {j for j in got[b, s].tolist() if j >= 0}
            theirs = {j for j in hf_indices[b, s].tolist() if j >= 0}
            assert len(ours) == len(theirs) == min(config.index_topk, (s + 1) // ratio), (b, s)
            exact += ours == theirs
            if ours != theirs:
                kth = min(hf_scores[b, s, j].item() for j in theirs)
                for j in ours ^ theirs:
                    assert abs(hf_scores[b, s, j].item() - kth) <= bound[b, s].item(), (b, s, j)
    assert exact >= 0.9 * batch * seq  # the tolerance path is for rare near-ties only


def test_portable_no_host_sync():
    """Runs on meta tensors, where any host synchronisation (.item(), .tolist(), nonzero) raises."""
    q = torch.empty(2, 5, 3, 8, device="meta", dtype=torch.bfloat16)
    keys = torch.empty(2, 4, 8, device="meta", dtype=torch.bfloat16)
    out = indexer_topk(q, torch.empty(2, 5, 3, device="meta"), keys, 4, 6, 6)
    assert out.shape == (2, 5, 6) and out.dtype == torch.int32
