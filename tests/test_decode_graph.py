"""Decode steps with the position as data (model/decode_graph.py): the step a CUDA graph captures,
run eagerly here, against the ordinary decode; and the capture itself on a GPU."""

from __future__ import annotations

import re

import pytest
import torch

from seahal.model import load
from seahal.model.decode_graph import DecodeGraph
from seahal.model.tiny import write_tiny_checkpoint

from v4_checkpoints import CSA, HCA, SWA, make_hf_model, save_hf_checkpoint
from ragged_decode import TOLERANCE, ragged_decode_errors

PROMPT, STEPS = 9, 23
"""A prefill ending inside a CSA block, then decode steps completing CSA (m=4) and HCA (m=16)
entries, past the window (16 in the test checkpoints)."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf_checkpoint(make_hf_model([SWA, CSA, HCA, CSA], seed=3), tmp_path_factory.mktemp("ckpt"))


def _decode_both_ways(
    model, ids: torch.Tensor, capture: bool, min_bucket: int = 1024, chunks: tuple[int, ...] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple]:
    """Logits of each decode step of ``ids[:, PROMPT:]`` after a prefill, through the ordinary call
    and through :class:`DecodeGraph`, each on its own cache (64 positions); and the two caches.
    ``chunks``: the prompt goes in steps of these lengths both ways, the graph's steps of several
    tokens included (their last logits lead both lists); else both caches take it in one call."""
    ordinary, generic = model.new_cache(ids.shape[0], 64), model.new_cache(ids.shape[0], 64)
    graph = None
    expected, got = [], []
    if chunks is None:
        for cache in (ordinary, generic):
            model(ids[:, :PROMPT], cache=cache)
    else:
        assert sum(chunks) == PROMPT
        graph = DecodeGraph(model, generic, capture=capture, min_bucket=min_bucket)
        t = 0
        for n in chunks:
            expected.append(model(ids[:, t : t + n], cache=ordinary, last_only=True))
            got.append(graph.step(ids[:, t : t + n]).clone())
            t += n
            assert generic.pos == ordinary.pos == t
    graph = graph or DecodeGraph(model, generic, capture=capture, min_bucket=min_bucket)
    for t in range(PROMPT, PROMPT + STEPS):
        expected.append(model(ids[:, t : t + 1], cache=ordinary, last_only=True))
        got.append(graph.step(ids[:, t : t + 1]).clone())
        assert generic.pos == ordinary.pos == t + 1
        assert [lc.n_compressed for lc in generic.layers] == [lc.n_compressed for lc in ordinary.layers]
    return expected, got, (ordinary, generic)


@pytest.mark.parametrize("cache_format", ["dense", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("min_bucket", [1024, 16, 10])
def test_position_generic_step_equals_the_ordinary_decode(checkpoint, cache_format, dtype, min_bucket):
    """Bit for bit: the generic step offers attention every compressed row of its bucket (masked
    by position) and the indexer every key row (invisible ones masked), which selects and weighs
    exactly the ordinary step's rows. The compressor's row is stored whether it holds an entry or
    padding, which lands in the entry after the valid ones; the step completing that entry
    overwrites it, and the last step (31) completes one in every layer, so the whole caches then
    agree. min_bucket 1024: one bucket, the whole cache (64 positions); 16: buckets of 16 and then
    32 positions as the sequences grow from 10 to 32 tokens; 10: buckets of 10, 20 and 40, no
    multiples of 16 (nor of 4 for 10), whose last rows hold no entry their positions complete: the
    step at 9 stores its padding there (CSA entry 2, HCA entry 0), the one at 19 too (HCA entry 1)."""
    model = load(checkpoint, device="cpu", dtype=dtype, announce=False, cache_format=cache_format)
    ids = torch.randint(0, 512, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(0))
    expected, got, (ordinary, generic) = _decode_both_ways(model, ids, capture=False, min_bucket=min_bucket)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), (cache_format, dtype, step)
    for name, tensor in ordinary.named_tensors().items():
        assert torch.equal(tensor, generic.named_tensors()[name]), name


@pytest.mark.parametrize("chunks", [(9,), (4, 5), (1, 2, 6)])
@pytest.mark.parametrize("cache_format", ["dense", "fp8"])
def test_prompt_chunks_through_the_generic_step_equal_the_ordinary_forward(checkpoint, cache_format, chunks):
    """Steps of several tokens a sequence (a prefill in chunks) are the same position-generic
    forward: bit for bit the ordinary chunks' last logits, then the decode steps', and the whole
    caches at the end. min_bucket 4: the chunks cross buckets (4, 8, 16), and a 9-token step from 0
    runs over a 16-position view."""
    model = load(checkpoint, device="cpu", dtype=torch.bfloat16, announce=False, cache_format=cache_format)
    ids = torch.randint(0, 512, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    expected, got, (ordinary, generic) = _decode_both_ways(model, ids, capture=False, min_bucket=4, chunks=chunks)
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), (chunks, step)
    for name, tensor in ordinary.named_tensors().items():
        assert torch.equal(tensor, generic.named_tensors()[name]), name


def _graph_steps(graph: DecodeGraph, ids: torch.Tensor, chunks: tuple[int, ...]) -> list[torch.Tensor]:
    """The last logits of each step through ``graph``: ``ids``' first tokens in ``chunks``, then one
    token a step."""
    spans = [*chunks, *[1] * (ids.shape[1] - sum(chunks))]
    starts = [sum(spans[:i]) for i in range(len(spans))]
    return [graph.step(ids[:, t : t + n]).clone() for t, n in zip(starts, spans)]


@pytest.mark.parametrize("cache_format", ["dense", "fp8"])
def test_a_restarted_graph_serves_a_new_prompt_as_a_fresh_cache_would(checkpoint, cache_format):
    """restart() clears nothing: every row, entry and compressor state a step of the second prompt
    reads at or past its position holds the first prompt's values, and the masks by position keep
    them out, so the logits are a fresh cache's, bit for bit."""
    model = load(checkpoint, device="cpu", dtype=torch.bfloat16, announce=False, cache_format=cache_format)
    ids = torch.randint(0, 512, (2, 2 * (PROMPT + STEPS)), generator=torch.Generator().manual_seed(2))
    first, second = ids[:, : PROMPT + STEPS], ids[:, PROMPT + STEPS :]
    used = DecodeGraph(model, model.new_cache(2, 64), capture=False, min_bucket=4)
    _graph_steps(used, first, (4, 5))
    used.restart()
    assert used.positions == [0, 0] and used.cache.pos == 0 and used.position.tolist() == [0, 0]
    fresh = DecodeGraph(model, model.new_cache(2, 64), capture=False, min_bucket=4)
    for step, (a, b) in enumerate(zip(_graph_steps(used, second, (3, 6)), _graph_steps(fresh, second, (3, 6)))):
        assert torch.equal(a, b), step
    with pytest.raises(ValueError, match=re.escape("positions must be 2 ints in [0, 64], got [0]")):
        used.restart([0])


def test_restart_serves_a_new_prompt_in_one_row_and_refuses_a_rewind(checkpoint):
    """One sequence goes on decoding while the other row takes a new prompt from 0: each as a
    fresh cache of its own tokens would give. Going back to an earlier position of its own is
    refused: a rewind by 2 in a window of 16 would attend to rows the later tokens overwrote (a
    random campaign of rewinds found logits 6-34% off before restart refused them)."""
    model = load(checkpoint, device="cpu", announce=False)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    graph = DecodeGraph(model, model.new_cache(2, 64), capture=False, min_bucket=4)
    _graph_steps(graph, ids[:, :20], (5, 5, 5, 5))
    with pytest.raises(ValueError, match=re.escape("sequence(s) [0] cannot go to another position")):
        graph.restart([18, 20])
    with pytest.raises(ValueError, match=re.escape("sequence(s) [1] cannot go to another position")):
        graph.restart([0, 21])
    graph.restart([20, 0])
    new_prompt = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(5))
    tokens = torch.cat([ids[:1, 20:], new_prompt])
    got = _graph_steps(graph, tokens, (3, 1, 6))
    for row, sequence in ((0, ids[0]), (1, new_prompt[0])):
        alone = DecodeGraph(model, model.new_cache(1, 64), capture=False, min_bucket=4)
        start = 20 if row == 0 else 0
        if start:
            _graph_steps(alone, sequence[None, :start], (start,))
        want = _graph_steps(alone, sequence[None, start:], (3, 1, 6))
        assert len(want) == len(got) == 13
        for step, (a, b) in enumerate(zip(got, want)):
            error = ((a[row] - b[0]).abs().max() / b.abs().max()).item()
            assert error < TOLERANCE["dense"], (row, step, error)


@pytest.mark.parametrize("cache_format", ["dense", "fp8"])
def test_prefill_puts_a_prompt_of_its_own_length_in_one_row(checkpoint, cache_format):
    """A row takes a new 37-token prompt (past the window of 16 twice, two HCA blocks of 16) while
    the other stands at 20 and goes on: the prompt's logits are the ordinary forward's over a fresh
    cache, bit for bit, and every later step of each row is what the ordinary decode of its own
    tokens gives."""
    model = load(checkpoint, device="cpu", announce=False, cache_format=cache_format)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(6))
    graph = DecodeGraph(model, model.new_cache(2, 64), capture=False, min_bucket=4)
    _graph_steps(graph, ids, (5, 5))
    prompt = torch.randint(0, 512, (1, 37), generator=torch.Generator().manual_seed(7))
    fresh = model.new_cache(1, 64)
    assert torch.equal(graph.prefill(1, prompt), model(prompt, cache=fresh, last_only=True))
    assert graph.positions == [20, 37] and graph.position.tolist() == [20, 37]
    follow = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(8))
    got = _graph_steps(graph, follow, ())
    before = model.new_cache(1, 64)
    model(ids[:1], cache=before, last_only=True)
    for row, cache in ((0, before), (1, fresh)):
        for step in range(follow.shape[1]):
            want = model(follow[row : row + 1, step : step + 1], cache=cache, last_only=True)
            error = ((got[step][row] - want[0]).abs().max() / want.abs().max()).item()
            assert error < TOLERANCE[cache_format], (row, step, error)
    with pytest.raises(ValueError, match=re.escape("row must be in [0, 2), got 2")):
        graph.prefill(2, prompt)
    with pytest.raises(ValueError, match=re.escape("tokens must be [1, n] with 1 <= n <= 64, got [2, 37]")):
        graph.prefill(0, torch.cat([prompt, prompt]))


@pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < (2, 6),
                    reason="torch 2.5's export cannot trace the step (seahal.onnx.export.MIN_TORCH)")
@pytest.mark.parametrize("tokens", [1, 5])
def test_the_step_traces_as_one_graph_at_per_sequence_positions(tmp_path, tokens):
    """What a capture needs of the model's code, checked without a GPU: torch.export traces the
    step (one token a sequence, or a prompt chunk of 5) over a bucket view with per-sequence
    positions as inputs, which fails on any host read of a tensor (``.item()``, ``int()``,
    ``.tolist()``), value-dependent shape or Python branch on a value. (The HAL ops are opaque
    there; their Triton wrappers are checked the same way by tests/test_cuda_compile.py, on meta
    tensors posing as an H100.)"""
    model = load(write_tiny_checkpoint(tmp_path), device="cpu", dtype=torch.bfloat16, announce=False,
                 cache_format="fp8")
    view = model.new_cache(3, 64).truncated(32)
    names = list(view.named_tensors())

    class Step(torch.nn.Module):
        def forward(self, tokens, positions, *tensors):
            return model(tokens, cache=view.with_tensors(dict(zip(names, tensors)), positions), last_only=True)

    args = (torch.zeros(3, tokens, dtype=torch.long), torch.tensor([3, 9, 14]), *view.named_tensors().values())
    program = torch.export.export(Step(), args)
    hal_calls = {str(n.target) for n in program.graph.nodes if str(n.target).startswith("seahal.")}
    assert any("kv_compress" in t and t.endswith("_at.default") for t in hal_calls), hal_calls  # the tensor-position twins
    assert any("indexer_topk" in t and t.endswith("_at.default") for t in hal_calls), hal_calls


def test_capture_is_refused_where_it_cannot_work(checkpoint):
    model = load(checkpoint, device="cpu", announce=False)
    with pytest.raises(ValueError, match="capture=True needs a CUDA model, got one on cpu"):
        DecodeGraph(model, model.new_cache(1, 32), capture=True)
    assert not DecodeGraph.capturable(model)
    graph = DecodeGraph(model, model.new_cache(1, 32), min_bucket=4)
    assert not graph.captured  # off a GPU the step runs eagerly
    assert [graph.bucket(n) for n in (1, 4, 5, 9, 17, 32)] == [4, 4, 8, 16, 32, 32]
    for bad in ((2, 1), (1, 0), (3,)):
        with pytest.raises(ValueError, match=re.escape(f"tokens must be [1, S] with S >= 1, got {list(bad)}")):
            graph.step(torch.zeros(bad, dtype=torch.long))
    with pytest.raises(RuntimeError, match="cache holds 32 tokens; a sequence at 0 cannot take 33 more"):
        graph.step(torch.zeros(1, 33, dtype=torch.long))


def test_generate_decodes_the_same_through_the_generic_step(checkpoint, monkeypatch):
    """generate() decodes every prompt in one DecodeGraph step, each at its own position, wherever
    a graph can be captured; forced onto the eager generic step here, its tokens (greedy, and
    sampled from the same seed) are those of the ordinary decode, group by group."""
    model = load(checkpoint, device="cpu", announce=False)
    prompts = [[5, 7, 11, 13, 17], [2, 3], [19, 23, 29, 31, 37], [41] * 9]
    ordinary = model.generate(prompts, 12, greedy=True)
    eos = model.generate(prompts, 12, temperature=0.8, top_p=0.9, seed=4)[1][2]  # prompt 1 stops by its 3rd token
    sampled = model.generate(prompts, 12, temperature=0.8, top_p=0.9, seed=4, eos_token_id=eos)
    monkeypatch.setattr(DecodeGraph, "capturable", staticmethod(lambda model: True))
    monkeypatch.setattr(DecodeGraph, "__init__", _eager_init)
    generic = model.generate(prompts, 12, greedy=True)
    assert generic == ordinary and generic.stats.cached_tokens == ordinary.stats.cached_tokens
    assert model.generate(prompts, 12, temperature=0.8, top_p=0.9, seed=4, eos_token_id=eos) == sampled
    assert len(sampled[1]) <= 3 and len(sampled[0]) == 12  # a group stopped early, and sampled no more


_original_init = DecodeGraph.__init__


def _eager_init(self, model, cache, capture=None, positions=None):
    _original_init(self, model, cache, capture=False, positions=positions)


@pytest.mark.parametrize("cache_format", ["dense", "fp8"])
@pytest.mark.parametrize("chunk, steps", [(1, 20), (4, 6)])
def test_sequences_at_different_positions_decode_in_one_step(checkpoint, chunk, steps, cache_format):
    """Each sequence's logits are those of stepping it alone, one token a step (decode) or a
    4-token chunk of each prompt a step (chunked prefill of sequences at different positions). Not
    bit for bit: the batch of 3 runs the fp32 projections as other GEMM shapes (another summation
    order), and an FP8 cache may round a KV code the other way (ragged_decode.TOLERANCE); a sequence
    decoded one position off is 0.06 off here."""
    model = load(checkpoint, device="cpu", announce=False, cache_format=cache_format)
    errors = ragged_decode_errors(model, capture=False, steps=steps, chunk=chunk)
    assert max(errors) < TOLERANCE[cache_format], errors


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the capture itself)")
def test_captured_prompt_chunks_replay_the_ordinary_forward_on_a_gpu(tmp_path):
    """The prompt in captured steps of 4 and 5 tokens, then captured decode steps, against the
    ordinary eager chunks and steps; 2e-2 of the logit scale for what capturing changes (cuBLAS's
    algorithms, as above)."""
    model = load(write_tiny_checkpoint(tmp_path), device="cuda", dtype=torch.bfloat16, announce=False)
    if not DecodeGraph.capturable(model):
        pytest.skip(f"the plan reads positions on the host: {model.plan.host_position_ops}")
    ids = torch.randint(0, 512, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(0)).cuda()
    expected, got, _ = _decode_both_ways(model, ids, capture=True, chunks=(4, 5))
    for step, (a, b) in enumerate(zip(expected, got)):
        error = ((a - b).abs().max() / a.abs().max()).item()
        assert error < 2e-2, (step, error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the capture itself)")
def test_captured_graph_decodes_sequences_at_different_positions_on_a_gpu(tmp_path):
    """One captured step for three sequences at their own positions against the same step run
    eagerly: what capturing changes (cuBLAS may pick other algorithms inside a capture: a bf16
    output one ulp apart grows through 4 layers and the head, hence 2e-2 of the logit scale, as
    above). That each sequence decodes as if alone is checked in fp32 on the CPU reference (above)
    and through the Triton kernels (tests/test_cuda_decode_graph.py): in bf16 on a GPU, batch 3 and
    batch 1 take near-ties (a routed expert, an indexer pick) apart now and then, which is no
    error (measured on an H200: 0.021 at one step, 1e-7 at the others; the bf16 CPU reference gives
    0.015)."""
    model = load(write_tiny_checkpoint(tmp_path), device="cuda", dtype=torch.bfloat16, announce=False)
    if not DecodeGraph.capturable(model):
        pytest.skip(f"the plan reads positions on the host: {model.plan.host_position_ops}")
    errors = ragged_decode_errors(model, capture=True, against="eager")
    assert max(errors) < 2e-2, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the capture itself)")
def test_pdl_launches_decode_the_same_on_a_gpu(tmp_path, monkeypatch):
    """SEAHAL_CUDA_PDL=1 changes when the cuda backend's kernels start, never what they compute:
    each waits for the grid ahead of it before touching memory. A graph captured with it replays
    the same logits, bit for bit, as one captured without (a race would show as a difference)."""
    from seahal.backends.cuda._pdl import PDL_VARIABLE

    model = load(write_tiny_checkpoint(tmp_path), device="cuda", dtype=torch.bfloat16, announce=False)
    if not DecodeGraph.capturable(model) or model.plan.backend.name != "cuda":
        pytest.skip("needs the cuda plan with positions on the device")
    ids = torch.randint(0, 512, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(0)).cuda()
    _, plain, _ = _decode_both_ways(model, ids, capture=True)
    monkeypatch.setenv(PDL_VARIABLE, "1")
    _, with_pdl, _ = _decode_both_ways(model, ids, capture=True)
    for step, (a, b) in enumerate(zip(plain, with_pdl)):
        assert torch.equal(a, b), step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the capture itself)")
def test_shared_experts_on_a_side_stream_decode_the_same_on_a_gpu(tmp_path, monkeypatch):
    """SEAHAL_SIDE_STREAM=1 runs each layer's shared expert on a side stream beside its gate and
    routed experts: the same kernels on the same inputs, so the graph captured with it (two
    branches a layer) replays the same logits, bit for bit, as one captured without, and so does
    the eager decode (a missing fork or join would show as a difference)."""
    from seahal.hal.streams import SIDE_STREAM_VARIABLE

    model = load(write_tiny_checkpoint(tmp_path), device="cuda", dtype=torch.bfloat16, announce=False)
    if not DecodeGraph.capturable(model):
        pytest.skip(f"the plan reads positions on the host: {model.plan.host_position_ops}")
    ids = torch.randint(0, 512, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(0)).cuda()
    eager, plain, _ = _decode_both_ways(model, ids, capture=True)
    monkeypatch.setenv(SIDE_STREAM_VARIABLE, "1")
    eager_beside, beside, _ = _decode_both_ways(model, ids, capture=True)
    for step, (a, b, c, d) in enumerate(zip(plain, beside, eager, eager_beside)):
        assert torch.equal(a, b) and torch.equal(c, d), step
