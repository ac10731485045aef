"""The model's position-generic steps (what a CUDA graph captures: prompt chunks, then decode) through
the cuda backend's position-taking kernels, run by the Triton interpreter on CPU tensors: the
tensor position the kernels load themselves gives the ordinary forward's logits and cache, bit for bit.

Only kv_compress(_fp8) and indexer_topk(_packed) run as Triton here (the ops whose position moves
into the kernel); the rest of the tiny model runs the CPU reference, which keeps it fast.
"""

from __future__ import annotations

import pytest
import torch

from seahal.testing.triton_interpreter import require_triton

triton = require_triton()

from seahal.hal import get_spec  # noqa: E402
from seahal.hal.plan import BoundOp  # noqa: E402
from seahal.hal.registry import REGISTRY  # noqa: E402
from seahal.model import load  # noqa: E402
from seahal.model.decode_graph import DecodeGraph  # noqa: E402
from seahal.model.tiny import write_tiny_checkpoint  # noqa: E402
from seahal.testing import triton_interpreter  # noqa: E402

from cuda_marks import IN_INTERPRETER  # noqa: E402

POSITION_OPS = ("kv_compress", "kv_compress_fp8", "indexer_topk", "indexer_topk_packed")


def test_under_interpreter():
    run = triton_interpreter.rerun_test_file(__file__, timeout=900)
    assert run.passed(), run.report


def _on_cuda_kernels(model) -> None:
    """Bind the model's position-taking ops to the cuda backend's Triton kernels and its other ops
    to the CPU reference. Not the plan's native CPU kernels: they pick their summation order by
    token count (grouped_linear's GEMV up to 8 tokens, a GEMM above), so a batch of sequences
    differs from each stepped alone in the last bits (~3e-7 relative), which this tiny model with
    an FP8 KV cache turns into 2-3% of the logits by the next step (with a dense cache it stays
    ~2e-7): not the position semantics these tests check."""
    for op in vars(model.plan.ops):
        backend, name = ("cuda", None) if op in POSITION_OPS else ("cpu", "reference")
        kernel = next(k for k in REGISTRY.kernels_for(op) if k.backend == backend and name in (None, k.name))
        assert kernel.device_position or op not in POSITION_OPS
        setattr(model.plan.ops, op, BoundOp(get_spec(op), kernel))


@pytest.mark.skipif(not IN_INTERPRETER, reason="runs in test_under_interpreter's subprocess")
@pytest.mark.parametrize("cache_format", ["dense", "fp8"])
def test_generic_steps_through_triton_kernels_equal_the_ordinary_forward(tmp_path, cache_format):
    model = load(write_tiny_checkpoint(tmp_path), device="cpu", dtype=torch.bfloat16, announce=False,
                 cache_format=cache_format)
    _on_cuda_kernels(model)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    ordinary, generic = model.new_cache(2, 32), model.new_cache(2, 32)
    # buckets of 16 then 32 positions: the kernels read views of the stores with their batch stride
    graph = DecodeGraph(model, generic, capture=False, min_bucket=16)
    for start, end in ((0, 3), (3, 7)):  # the prompt in steps of 3 and 4 tokens (a CSA entry completed)
        expected = model(ids[:, start:end], cache=ordinary, last_only=True)
        assert torch.equal(graph.step(ids[:, start:end]), expected), (start, end)
    for t in range(7, 32):  # CSA (m=4) and HCA (m=16) entries completed, the window (16) wrapped
        expected = model(ids[:, t : t + 1], cache=ordinary, last_only=True)
        assert torch.equal(graph.step(ids[:, t : t + 1]), expected), t
    # the generic step stores its padding in the entry after the valid ones; the last step (31)
    # completes the last entry of every store, so every such row now holds its entry
    for name, tensor in ordinary.named_tensors().items():
        assert torch.equal(tensor, generic.named_tensors()[name]), name


@pytest.mark.skipif(not IN_INTERPRETER, reason="runs in test_under_interpreter's subprocess")
@pytest.mark.parametrize("chunk, steps", [(1, 20), (4, 6)])
def test_sequences_at_their_own_positions_through_triton_kernels(tmp_path, chunk, steps):
    """Three sequences stepped together, each at its own position (its compressed blocks
    completing at other steps), one token or a 4-token chunk each a step, through the Triton
    kernels' per-sequence positions, against each sequence stepped alone. fp32 on the CPU, an FP8
    cache: the batch of 3 and of 1 sum the reference's projections in other orders, and a KV code may
    round the other way (ragged_decode.TOLERANCE), while one position off is 0.06 off
    (tests/test_decode_graph.py). Dense weights: an FP8 linear quantises its input to e4m3 every
    call, where the same last-bit differences flip codes of every layer's activations (this
    machine, 2026-11-28: 3% of the logits by the second 4-token step), which is not what this
    checks."""
    from ragged_decode import TOLERANCE, ragged_decode_errors

    checkpoint = write_tiny_checkpoint(tmp_path, quantise=False)
    model = load(checkpoint, device="cpu", announce=False, cache_format="fp8")
    _on_cuda_kernels(model)
    errors = ragged_decode_errors(model, capture=False, steps=steps, chunk=chunk)
    assert max(errors) < TOLERANCE["fp8"], errors
