"""generate(): batched prompts of different lengths against brute-force repeated full forwards,
eos, seeded sampling and top-p, on the dense tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from seahal.model import load
from seahal.model.generate import generate, sample
from seahal.model.tiny import write_tiny_checkpoint

# Lengths 13, 5, 13: two groups; 13 + 4 new tokens crosses the window (16) and the HCA ratio (16)
# while decoding, and every prompt crosses CSA block boundaries (4).
PROMPTS = [list(range(40, 53)), [7, 300, 12, 99, 5], list(range(200, 213))]
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-dense"), seed=5, quantise=False)
    return load(path, device="cpu", announce=False)


@pytest.fixture(scope="module")
def greedy(model):
    streamed: list[tuple[int, int]] = []
    out = generate(model, PROMPTS, NEW_TOKENS, greedy=True, stream=lambda i, t: streamed.append((i, t)))
    return out, streamed


def _brute_force_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Argmax of a stateless full forward over the whole sequence so far, n times."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_equals_argmax_of_repeated_full_forwards(model, greedy):
    out, streamed = greedy
    assert out == [_brute_force_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    assert [[t for i, t in streamed if i == row] for row in range(len(PROMPTS))] == out
    stats = out.stats
    assert (stats.prompt_tokens, stats.new_tokens, stats.decoded_tokens) == (31, 12, 9)
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0
    assert stats.cache_bytes > 0 and stats.cached_tokens == 2 * (13 + 3) + (5 + 3)


def test_eos_stops_each_sequence_after_emitting_it(model, greedy):
    out, _ = greedy
    eos = out[0][1]
    expected = [seq[: seq.index(eos) + 1] if eos in seq else seq for seq in out]
    assert generate(model, PROMPTS, NEW_TOKENS, greedy=True, eos_token_id=eos) == expected
    assert len(expected[0]) == 2


def test_tiny_top_p_is_greedy(model, greedy):
    out, _ = greedy
    assert generate(model, PROMPTS, NEW_TOKENS, temperature=1.0, top_p=1e-6, seed=3) == out


def test_seeded_sampling_is_reproducible(model):
    prompts = torch.tensor([[3, 4, 5, 6, 7], [9, 8, 7, 6, 5]])
    first = generate(model, prompts, NEW_TOKENS, temperature=1.5, seed=11)
    assert generate(model, prompts.tolist(), NEW_TOKENS, temperature=1.5, seed=11) == first
    assert generate(model, prompts, NEW_TOKENS, temperature=1.5, seed=12) != first


def test_sample_keeps_the_smallest_top_p_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(4000, 3)
    g = torch.Generator().manual_seed(0)
    kept = sample(logits, 1.0, 0.7, False, g)  # 0.5 < 0.7 <= 0.8: tokens 0 and 1, renormalised
    assert set(kept.tolist()) == {0, 1}
    # P(0) = 0.5 / 0.8 = 0.625; 4000 draws: std 0.0077, allow 4 std
    assert abs((kept == 0).float().mean().item() - 0.625) < 0.031
    everything = sample(logits, 1.0, 1.0, False, g)
    assert abs((everything == 2).float().mean().item() - 0.2) < 0.026
    assert sample(logits[:1] * 0, 1.0, 1.0, True, g).item() == 0  # greedy ties: first index


def test_length_beyond_max_seq_len_is_rejected(model):
    with pytest.raises(ValueError, match="max_seq_len=256"):
        generate(model, [[1] * 250], 10)
