"""RoPE reference (v4_ops.md §4) against explicit per-pair rotations, its algebra, YaRN and transformers."""

from __future__ import annotations

import math

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference.rope import rope
from seahal.hal.ops.rope import Yarn, rope_frequencies

from hf_v4 import transformers_v4

BF16_ULP = 2.0**-8  # bf16 keeps 8 significant bits: one rounding is within 2^-9 relative, two ulps 2^-7


def _inputs(dtype, batch=2, seq=5, heads=3, dim=12, pairs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, heads, dim, generator=g, dtype=torch.float64).to(dtype)
    positions = torch.randint(0, 300, (batch, seq), generator=g)
    freqs = rope_frequencies(2 * pairs, 10000.0)
    return x, positions, freqs


def _rope_loop(x, positions, freqs, inverse=False):
    """Pair by pair with Python floats: (a, b) -> (a cos - b sin, a sin + b cos), angle pos * f."""
    out = x.double().clone()
    nope = x.shape[-1] - 2 * len(freqs)
    sign = -1.0 if inverse else 1.0
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            for h in range(x.shape[2]):
                for i, f in enumerate(freqs.tolist()):
                    angle = sign * positions[b, s].item() * f
                    a, c = x[b, s, h, nope + 2 * i].item(), x[b, s, h, nope + 2 * i + 1].item()
                    out[b, s, h, nope + 2 * i] = a * math.cos(angle) - c * math.sin(angle)
                    out[b, s, h, nope + 2 * i + 1] = a * math.sin(angle) + c * math.cos(angle)
    return out


@pytest.mark.parametrize("inverse", [False, True])
def test_matches_per_pair_loop_fp64(inverse):
    x, pos, freqs = _inputs(torch.float64)
    out = rope(x, pos, freqs, inverse)
    assert out.dtype == torch.float64
    # fp64 both sides; the loop uses libm cos/sin of the same fp64 angle: agreement to ~1e-15
    torch.testing.assert_close(out, _rope_loop(x, pos, freqs, inverse), rtol=0, atol=1e-12)


def test_matches_per_pair_loop_fp32_and_bf16():
    x, pos, freqs = _inputs(torch.float32)
    # fp32 math: angle pos*f rounded to fp32 (pos < 300 -> |angle error| < 300 * 2^-24), products ~2^-24
    torch.testing.assert_close(rope(x, pos, freqs), _rope_loop(x, pos, freqs).float(), rtol=1e-5, atol=1e-4)
    xb = x.to(torch.bfloat16)
    out = rope(xb, pos, freqs)
    assert out.dtype == torch.bfloat16
    # one final bf16 rounding of the fp32 result: within half an ulp (2^-9 relative), allow one ulp
    expected = _rope_loop(xb, pos, freqs)
    torch.testing.assert_close(out.double(), expected, rtol=BF16_ULP, atol=1e-6)


def test_nope_dims_pass_through_and_output_is_fresh():
    x, pos, freqs = _inputs(torch.bfloat16)
    out = rope(x, pos, freqs)
    nope = x.shape[-1] - 2 * len(freqs)
    assert torch.equal(out[..., :nope], x[..., :nope])
    assert out.data_ptr() != x.data_ptr()
    no_rope = rope(x, pos, freqs[:0])
    assert torch.equal(no_rope, x) and no_rope.data_ptr() != x.data_ptr()


def test_inverse_undoes_forward():
    x, pos, freqs = _inputs(torch.float64)
    # rotations compose exactly up to fp64 rounding
    torch.testing.assert_close(rope(rope(x, pos, freqs), pos, freqs, inverse=True), x, rtol=0, atol=1e-12)
    # and inverse(t) == forward(-t)
    torch.testing.assert_close(rope(x, pos, freqs, inverse=True), rope(x, -pos, freqs), rtol=0, atol=1e-12)


def test_dot_products_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    freqs = rope_frequencies(16, 10000.0)

    def score(t, s):
        qt = rope(q, torch.tensor([[t]]), freqs)
        ks = rope(k, torch.tensor([[s]]), freqs)
        return (qt * ks).sum().item()

    for t, s in [(0, 3), (5, 9), (17, 2), (40, 40)]:
        for shift in (1, 7, 123):
            assert score(t + shift, s + shift) == pytest.approx(score(t, s), abs=1e-12)
    # and it does depend on s - t (the check above is not vacuous)
    assert abs(score(0, 3) - score(0, 4)) > 1e-3


def test_yarn_frequencies_v4_compress_table():
    """base 160000, 64 rope dims, factor 16, L0 65536: lo = 15, hi = 25 (v4_ops.md §4)."""
    freqs = rope_frequencies(64, 160000.0, Yarn(factor=16.0, original_seq_len=65536))
    plain = torch.tensor([160000.0 ** (-2 * i / 64) for i in range(32)], dtype=torch.float64)
    ratio = freqs.double() / plain
    # fp32 table: one rounding, 2^-24 relative
    for i in range(32):
        if i <= 15:
            expected = 1.0
        elif i >= 25:
            expected = 1.0 / 16
        else:  # linear ramp (i - 15) / 10 between full and 1/16 frequency
            ramp = (i - 15) / 10
            expected = ramp / 16 + (1 - ramp)
        assert ratio[i].item() == pytest.approx(expected, rel=1e-6), i
    # without YaRN the plain table
    torch.testing.assert_close(rope_frequencies(64, 160000.0).double(), plain, rtol=1e-6, atol=0)


def test_yarn_matches_transformers_and_rotation_matches_apply_rotary_pos_emb():
    hf = transformers_v4()
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    config = DeepseekV4Config(
        head_dim=128,
        qk_rope_head_dim=64,
        num_hidden_layers=2,
        max_position_embeddings=65536 * 16,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    )
    rotary = hf.DeepseekV4RotaryEmbedding(config)
    freqs = rope_frequencies(64, 160000.0, Yarn(factor=16.0, original_seq_len=65536))
    # same formula; ours rounds an fp64 table once, HF computes in fp32: a few fp32 ulps (2^-23 each)
    torch.testing.assert_close(freqs, rotary.compress_inv_freq, rtol=2**-21, atol=0)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 3, 128, generator=g)
    pos = torch.randint(0, 5000, (2, 6), generator=g)
    cos, sin = rotary(x, pos, layer_type="compress")
    expected = hf.apply_rotary_pos_emb(x.transpose(1, 2), cos, sin).transpose(1, 2)
    # same fp32 table and the same fp32 angles pos * f on both sides: only the rotation arithmetic
    # differs (fp32, a few ulps of values ~4)
    torch.testing.assert_close(rope(x, pos, rotary.compress_inv_freq), expected, rtol=1e-5, atol=1e-5)


def test_through_plan():
    x, pos, freqs = _inputs(torch.float32)
    p = hal.plan("cpu", ops=["rope"], announce=False)
    expected = _rope_loop(x, pos, freqs, inverse=True).float()
    torch.testing.assert_close(p.ops.rope(x, pos, freqs, True), expected, rtol=1e-5, atol=1e-4)


def test_portable_no_host_sync():
    """Runs on meta tensors, where any host synchronisation (.item(), .tolist(), nonzero) raises."""
    x = torch.empty(2, 3, 4, 16, device="meta", dtype=torch.bfloat16)
    out = rope(x, torch.empty(2, 3, device="meta", dtype=torch.int64), torch.empty(4, device="meta"), True)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
