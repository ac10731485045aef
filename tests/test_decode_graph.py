"""Decode steps with the position as data (model/decode_graph.py): the step a CUDA graph captures,
run eagerly here, against the ordinary decode; and the capture itself on a GPU."""

from __future__ import annotations

import pytest
import torch

from seahal.model import load
from seahal.model.decode_graph import DecodeGraph
from seahal.model.tiny import write_tiny_checkpoint

from v4_checkpoints import CSA, HCA, SWA, make_hf_model, save_hf_checkpoint

PROMPT, STEPS = 9, 23
"""A prefill ending inside a CSA block, then decode steps completing CSA (m=4) and HCA (m=16)
entries, past the window (16 in the test checkpoints)."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf_checkpoint(make_hf_model([SWA, CSA, HCA, CSA], seed=3), tmp_path_factory.mktemp("ckpt"))


def _decode_both_ways(model, ids: torch.Tensor, capture: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple]:
    """Logits of each decode step of ``ids[:, PROMPT:]`` after a prefill, through the ordinary call
    and through :class:`DecodeGraph`, each on its own cache; and the two caches."""
    ordinary, generic = model.new_cache(ids.shape[0], 64), model.new_cache(ids.shape[0], 64)
    for cache in (ordinary, generic):
        model(ids[:, :PROMPT], cache=cache)
    graph = DecodeGraph(model, generic, capture=capture)
    expected, got = [], []
    for t in range(PROMPT, PROMPT + STEPS):
        expected.append(model(ids[:, t : t + 1], cache=ordinary, last_only=True))
        got.append(graph.step(ids[:, t : t + 1]).clone())
        assert generic.pos == ordinary.pos == t + 1
        assert [lc.n_compressed for lc in generic.layers] == [lc.n_compressed for lc in ordinary.layers]
    return expected, got, (ordinary, generic)


@pytest.mark.parametrize("cache_format", ["dense", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_position_generic_step_equals_the_ordinary_decode(checkpoint, cache_format, dtype):
    """Bit for bit: the generic step offers attention every compressed row (masked by position)
    and the indexer every key row (invisible ones masked), which selects and weighs exactly the
    ordinary step's rows; the compressor's padded row is written only when it holds an entry."""
    model = load(checkpoint, device="cpu", dtype=dtype, announce=False, cache_format=cache_format)
    ids = torch.randint(0, 512, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(0))
    expected, got, (ordinary, generic) = _decode_both_ways(model, ids, capture=False)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), (cache_format, dtype, step)
    for name, tensor in ordinary.named_tensors().items():
        assert torch.equal(tensor, generic.named_tensors()[name]), name


def test_capture_is_refused_where_it_cannot_work(checkpoint):
    model = load(checkpoint, device="cpu", announce=False)
    with pytest.raises(ValueError, match="capture=True needs a CUDA model, got one on cpu"):
        DecodeGraph(model, model.new_cache(1, 32), capture=True)
    assert not DecodeGraph.capturable(model)
    graph = DecodeGraph(model, model.new_cache(1, 32))
    assert graph.graph is None  # off a GPU the step runs eagerly
    with pytest.raises(ValueError, match=r"tokens must be \[1, 1\], got \[2, 1\]"):
        graph.step(torch.zeros(2, 1, dtype=torch.long))


def test_generate_decodes_the_same_through_the_generic_step(checkpoint, monkeypatch):
    """generate() replays a DecodeGraph wherever one can be captured; forced onto the eager
    generic step here, its greedy tokens are the ordinary decode's."""
    model = load(checkpoint, device="cpu", announce=False)
    prompts = [[5, 7, 11, 13, 17], [2, 3], [19, 23, 29, 31, 37]]
    ordinary = model.generate(prompts, 12, greedy=True)
    monkeypatch.setattr(DecodeGraph, "capturable", staticmethod(lambda model: True))
    monkeypatch.setattr(DecodeGraph, "__init__", _eager_init)
    assert model.generate(prompts, 12, greedy=True) == ordinary


_original_init = DecodeGraph.__init__


def _eager_init(self, model, cache, capture=None):
    _original_init(self, model, cache, capture=False)


@pytest.mark.parametrize("cache_format", ["dense", "fp8"])
def test_release_layout_generic_step_equals_the_ordinary_decode(tmp_path_factory, cache_format):
    """The same with the release layout's FP8 linears and FP4 experts (seahal's tiny checkpoint,
    the one the GPU test below captures): the weights' format does not touch the position."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    model = load(path, device="cpu", dtype=torch.bfloat16, announce=False, cache_format=cache_format)
    ids = torch.randint(0, 512, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    expected, got, _ = _decode_both_ways(model, ids, capture=False)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the capture itself)")
def test_captured_graph_replays_the_ordinary_decode_on_a_gpu(tmp_path):
    """One capture, STEPS replays at moving positions, against the ordinary eager decode. Not bit
    for bit: cuBLAS may pick other algorithms inside a capture, and a bf16 output one ulp apart
    (2^-8 relative) grows through 4 layers and the head; 2e-2 of the logit scale allows that and
    is far below what a step at a wrong position gives (another token's logits: O(1))."""
    model = load(write_tiny_checkpoint(tmp_path), device="cuda", dtype=torch.bfloat16, announce=False)
    if not DecodeGraph.capturable(model):
        pytest.skip(f"the plan reads positions on the host: {model.plan.host_position_ops}")
    ids = torch.randint(0, 512, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(0)).cuda()
    expected, got, _ = _decode_both_ways(model, ids, capture=True)
    for step, (a, b) in enumerate(zip(expected, got)):
        error = ((a - b).abs().max() / a.abs().max()).item()
        assert error < 2e-2, (step, error)
