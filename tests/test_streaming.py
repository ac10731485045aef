"""Streaming property of the stateful ops: a prefill of S tokens equals a prefill of S-k tokens
followed by k single-token steps, for the compressor (CSA and HCA), the indexer and the sparse
attention, composed as one attention layer does, for S around every multiple of 4 and 16."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seahal import hal
from seahal.model.attention import Attention
from seahal.model.cache import Cache
from seahal.model.config import ModelConfig

RATIOS = {"csa": 4, "hca": 16}


def _layer(kind: str) -> tuple[Attention, ModelConfig]:
    config = ModelConfig(
        vocab_size=64, dim=128, n_layers=1, n_heads=2, head_dim=128, rope_head_dim=64, q_lora_rank=128,
        o_groups=1, o_lora_rank=128, window_size=8, compress_ratios=[RATIOS[kind]], index_n_heads=2,
        index_head_dim=128, index_topk=3, original_seq_len=64, rope_factor=4.0,
        # FP8/FP4 rounding is per vector and chunk-independent, but a projection computed for 3
        # rows or for 4 can differ in its last fp32 bit and land on the other side of a rounding
        # boundary; without the simulation the property is exact up to fp32 summation order.
        simulate_fp8_kv=False, simulate_fp4_indexer=False,
    )
    plan = hal.plan("cpu", announce=False, environ={})
    torch.manual_seed(RATIOS[kind])
    layer = Attention(config, 0, plan.ops)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    return layer, config


LAYERS = {kind: _layer(kind) for kind in RATIOS}


def _run(kind: str, x: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    layer, config = LAYERS[kind]
    cache = Cache.new(config, x.shape[0], 64, torch.float32, "cpu", layer.ops)
    outs, start = [], 0
    for n in chunks:
        outs.append(layer(x[:, start : start + n], cache.layers[0], start))
        start += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind", list(RATIOS))
@settings(max_examples=12, deadline=None, derandomize=True)
@given(data=st.data())
def test_prefill_equals_prefill_then_single_steps(kind, data):
    m = RATIOS[kind]
    boundary = data.draw(st.sampled_from([m, 2 * m, 3 * m, 16, 32]), label="multiple")
    seq = boundary + data.draw(st.integers(-2, 2), label="offset")
    k = data.draw(st.integers(1, min(6, seq - 1)), label="steps")
    x = torch.randn(2, seq, 128, generator=torch.Generator().manual_seed(seq * 7 + k))
    prefill = _run(kind, x, [seq])
    streamed = _run(kind, x, [seq - k] + [1] * k)
    # the same fp32 math on the same values, chunked differently: only summation order changes.
    torch.testing.assert_close(streamed, prefill, rtol=1e-4, atol=1e-5)
