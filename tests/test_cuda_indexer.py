"""The cuda backend's Triton lightning indexer (op ``indexer_topk``): under the Triton interpreter on CPU.

Three independent judges: the CPU reference kernel (the selection must equal it: these seeded
cases have no near-ties), a float64 brute force of the formula (per query, visible entries sorted
by (-score, index)) written out here, and the conformance suite's selection check (near-ties may
differ, exact ties must go to the smaller index). Interpreter tests run in a subprocess with
TRITON_INTERPRET=1 (see test_cuda_interpret.py for why); the GPU test needs a CUDA device.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from seahal.backends.cpu.reference.indexer import indexer_topk as reference

from seahal.testing import triton_interpreter
from seahal.testing.tolerances import checks_for

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in test_under_interpreter's subprocess")
on_gpu = pytest.mark.skipif(IN_INTERPRETER or not torch.cuda.is_available(), reason="needs a CUDA device")


def test_under_interpreter():
    triton_interpreter.rerun_test_file(__file__)


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
    # one query over 300 entries: 10 splits of the scores, six merge rounds of the top-k (chunk 16);
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
    # five equal keys spread over splits and sort chunks; query 1 is zero (every score ties at 0)
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


@interpreted
def test_select_chunk_must_hold_twice_top_k(indexer):
    ranking = torch.zeros(1, 40, dtype=torch.int64)
    with pytest.raises(ValueError, match="chunk"):
        indexer.select_topk(ranking, 8, torch.empty(1, 1, 8, dtype=torch.int32), 8)


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
