"""Sparse attention reference (v4_ops.md §9) against a dense masked softmax with an explicit sink column."""

from __future__ import annotations

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference.attention import sparse_attention


def _inputs(dtype, batch=2, seq=5, heads=3, dim=16, n_keys=7, k=6, seed=0):
    """Random q, kv, sinks; indices with -1 slots, duplicates, and one query with no valid slot."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, dim, generator=g, dtype=torch.float64).to(dtype)
    kv = torch.randn(batch, n_keys, dim, generator=g, dtype=torch.float64).to(dtype)
    sink = torch.randn(heads, generator=g, dtype=torch.float64)
    sink = sink if dtype == torch.float64 else sink.float()
    indices = torch.randint(-1, n_keys, (batch, seq, k), generator=g, dtype=torch.int32)
    indices[0, 0, :3] = 2  # a key selected three times
    indices[1, 2] = -1  # no valid key at all
    return q, kv, indices, sink


def _dense_reference(q, kv, indices, sink, scale):
    """fp64 softmax over ALL N keys plus a sink column whose value is zero.

    A key selected c times enters with logit s + log(c) (c copies of exp(s)); unselected keys get
    log(0) = -inf. Multiplicities are counted with explicit loops.
    """
    batch, seq, k = indices.shape
    counts = torch.zeros(batch, seq, kv.shape[1], dtype=torch.float64)
    for b in range(batch):
        for s in range(seq):
            for slot in range(k):
                j = int(indices[b, s, slot])
                if j >= 0:
                    counts[b, s, j] += 1
    logits = torch.einsum("bshd,bnd->bshn", q.double(), kv.double()) * scale + counts.log()[:, :, None]
    sink_column = sink.double()[None, None, :, None].expand(batch, seq, -1, 1)
    probs = torch.softmax(torch.cat((logits, sink_column), dim=-1), dim=-1)
    values = torch.cat((kv.double(), torch.zeros(batch, 1, kv.shape[-1], dtype=torch.float64)), dim=1)
    return torch.einsum("bshn,bnd->bshd", probs, values)


def test_matches_dense_fp64():
    q, kv, idx, sink = _inputs(torch.float64)
    out = sparse_attention(q, kv, idx, sink, 0.25)
    assert out.dtype == torch.float64 and out.shape == q.shape
    # both fp64, different summation order: ~1e-16
    torch.testing.assert_close(out, _dense_reference(q, kv, idx, sink, 0.25), rtol=0, atol=1e-12)
    assert torch.equal(out[1, 2], torch.zeros_like(out[1, 2]))  # no valid key -> 0


def test_matches_dense_fp32_int64_indices():
    q, kv, idx, sink = _inputs(torch.float32, seed=1)
    out = sparse_attention(q, kv, idx.long(), sink, 0.3)
    assert out.dtype == torch.float32
    # fp32 exp and sums over <= 7 terms of O(1) values: a few ulps (2^-24)
    torch.testing.assert_close(out.double(), _dense_reference(q, kv, idx, sink, 0.3), rtol=1e-5, atol=1e-6)


def test_matches_dense_bf16():
    q, kv, idx, sink = _inputs(torch.bfloat16, seed=2, dim=64)
    out = sparse_attention(q, kv, idx, sink, 64**-0.5)
    assert out.dtype == torch.bfloat16
    # fp32 math on the same bf16 values, then one bf16 rounding: half an ulp (2^-9) relative; the
    # atol covers outputs near 0 (a convex mix of values of size <= max|kv|)
    expected = _dense_reference(q, kv, idx, sink, 64**-0.5)
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=2**-10)


def test_hand_computed_single_key_and_sink():
    """One key with logit 0 and a sink of 0: half of the key's value (the sink takes the other half)."""
    q = torch.zeros(1, 1, 2, 4)
    kv = torch.tensor([[[1.0, -2.0, 3.0, 4.0]]])
    idx = torch.tensor([[[0, -1]]], dtype=torch.int32)
    sink = torch.tensor([0.0, float("-inf")])
    out = sparse_attention(q, kv, idx, sink, 1.0)
    assert torch.equal(out[0, 0, 0], kv[0, 0] / 2)  # exp(0) / (exp(0) + exp(0))
    assert torch.equal(out[0, 0, 1], kv[0, 0])  # -inf sink: plain softmax over one key


def test_no_valid_key_with_minus_inf_sink_gives_zero():
    q, kv, idx, _ = _inputs(torch.float32, seed=3)
    idx[:] = -1
    out = sparse_attention(q, kv, idx, torch.full((q.shape[2],), float("-inf")), 0.5)
    assert torch.equal(out, torch.zeros_like(out))


def test_large_logits_and_dominant_sink_stay_finite():
    q, kv, idx, sink = _inputs(torch.float32, seed=4)
    # logits ~ +-500: exp overflows fp32 without the max shift
    out = sparse_attention(q * 30, kv, idx, sink, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _dense_reference(q * 30, kv, idx, sink, 1.0), rtol=1e-4, atol=1e-4)
    big_sink = torch.full_like(sink, 80.0)  # exp(80) overflows fp32 too
    out = sparse_attention(q, kv, idx, big_sink, 0.1)
    expected = _dense_reference(q, kv, idx, big_sink, 0.1)
    assert torch.isfinite(out).all() and expected.abs().max() < 1e-30
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_through_plan(dtype):
    q, kv, idx, sink = _inputs(dtype, seed=5)
    p = hal.plan("cpu", ops=["sparse_attention"], announce=False)
    out = p.ops.sparse_attention(q, kv, idx, sink, 0.2)
    assert out.dtype == dtype
    # bf16: one output rounding (2^-9 relative); fp32: a few ulps
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), _dense_reference(q, kv, idx, sink, 0.2), rtol=tol, atol=tol / 4)


def test_portable_no_host_sync():
    """Runs on meta tensors, where any host synchronisation (.item(), .tolist(), nonzero) raises."""
    q = torch.empty(2, 5, 3, 8, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(2, 7, 8, device="meta", dtype=torch.bfloat16)
    idx = torch.empty(2, 5, 4, device="meta", dtype=torch.int32)
    out = sparse_attention(q, kv, idx, torch.empty(3, device="meta"), 0.5)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
