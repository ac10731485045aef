"""The native CPU ``grouped_linear`` (csrc/gemm.cpp) over an FP8 weight: wo_a read as stored.

Against a float64 brute force within the conformance rule, against the reference (the same W' and
fp32 sums in another order: all but a few bf16 outputs equal), and its dequantisation bit for bit
against ``hal.formats.dequantize_weight``, on each SIMD variant the CPU has.
"""

from __future__ import annotations

import pytest
import torch

from seahal import hal
from seahal.backends.cpu import native
from seahal.backends.cpu.reference.linear import grouped_linear as reference
from seahal.hal.formats import dequantize_weight, e8m0_scales
from seahal.testing.tolerances import checks_for

from test_grouped_linear import BF16, F32, _brute_force, _weight, _x
from test_native_gemm import random_e4m3, simd  # noqa: F401  (simd: the fixture)

pytestmark = pytest.mark.skipif(native.native_module() is None, reason="seahal._native is not built")

CASES = [  # (leading dims, G, R, I, x dtype, scale format)
    ((1, 1), 8, 128, 512, BF16, "e8m0"),  # decode, V4-Flash's 8 groups in proportion
    ((3,), 4, 40, 256, F32, "fp32"),  # R not a multiple of the 8-row work items
    ((2, 4), 2, 64, 384, BF16, "fp32"),  # 8 tokens, the most the GEMV takes; W' rounded to bf16
    ((17,), 3, 96, 128, BF16, "e8m0"),  # beyond: dequantised natively, W' whole (R not on scale blocks)
    ((5, 4), 3, 128, 256, BF16, "e8m0"),  # and one group's W' at a time into one buffer
    ((20,), 2, 256, 128, F32, "fp32"),
]


@pytest.mark.parametrize("lead, g, r, i, dtype, scale_fmt", CASES)
def test_matches_brute_force_and_reference(simd, lead, g, r, i, dtype, scale_fmt):  # noqa: F811
    x, (w, s) = _x(lead, g, i, dtype, r), _weight(g * r, i, scale_fmt, r)
    out = native.grouped_linear(x, w, s)
    assert out.shape == (*lead, g, r) and out.dtype == dtype
    for compared in checks_for("grouped_linear", (x, w, s)):
        assert compared.check.compare(out, _brute_force(x, w, s)).ok
        assert compared.check.compare(out, reference(x, w, s)).ok
    if dtype == BF16:  # the same bf16 W' and fp32 sums as the reference: only the order differs
        same = (out == reference(x, w, s)).float().mean()
        assert same >= 0.97, f"{same:.3f} of the outputs equal the reference's"


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("scale_fmt", ["e8m0", "fp32", "extreme e8m0"])
def test_dequantisation_is_the_formats_bit_for_bit(simd, dtype, scale_fmt):  # noqa: F811
    """Every e4m3 code, 200 rows (not a multiple of 8 or 128); "extreme e8m0": exponents at both
    ends (2^-127 ... 2^-124, 2^120 ... 2^127), where e4m3 x scale leaves bf16's exact range and
    must be rounded (to subnormals, or to inf) as the formats round it."""
    gen = torch.Generator().manual_seed(7)
    w = random_e4m3((200, 256), gen)
    if scale_fmt == "extreme e8m0":
        exponents = torch.tensor([0, 1, 2, 3, 247, 250, 254, 127], dtype=torch.uint8)
        s = e8m0_scales(exponents[torch.randint(0, 8, (2, 2), generator=gen)])
    else:
        s = _weight(200, 256, scale_fmt, 7)[1]
    dense = torch.empty(200, 256, dtype=dtype)
    module = native.native_module()
    module.fp8_dequantize(w.data_ptr(), s.data_ptr(), s.dtype != torch.float32, dense.data_ptr(), 200, 256,
                          dtype == BF16, 2)
    bits = torch.int16 if dtype == BF16 else torch.int32
    assert torch.equal(dense.view(bits), dequantize_weight(w, s, dtype).view(bits))


def test_extreme_scales_round_the_gemv_weight_as_the_formats():
    """The GEMV's W' takes the same rounding: a weight of one row is read back through x = e_k."""
    w = torch.tensor([[1, 9, 0x3F, 0x7E] * 32], dtype=torch.uint8).view(torch.float8_e4m3fn).repeat(128, 1)
    s = e8m0_scales(torch.tensor([[1]], dtype=torch.uint8))  # 2^-126: into bf16 subnormals
    tokens = native.GROUPED_GEMV_MAX_TOKENS
    x = torch.eye(128, dtype=BF16)[:tokens].reshape(tokens, 1, 128)  # token t reads column t of every row
    got = native.grouped_linear(x, w, s)[:, 0, 0]
    assert torch.equal(got.view(torch.int16), dequantize_weight(w, s, BF16)[0, :tokens].view(torch.int16))


def test_tiny_activations_keep_their_products(simd):  # noqa: F811
    """x of 2^-125 by weights of 1/4: products of 2^-127, below fp32's normals, which the
    avx512bf16 variant's VDPBF16PS would flush to zero. Such a call must take the fp32 form: each
    output is 512 of them, exactly 2^-118. (torch's own bf16 einsum, the reference, flushes them on
    a CPU with AVX512-BF16: it gives 0 there.)"""
    x = torch.full((1, 2, 512), 2.0**-125, dtype=BF16)
    w = torch.full((2 * 16, 512), 0.25).to(torch.float8_e4m3fn)
    s = e8m0_scales(torch.full((1, 4), 127, dtype=torch.uint8))
    assert (native.grouped_linear(x, w, s) == 2.0**-118).all()


def test_threads_do_not_change_the_result():
    x, (w, s) = _x((5,), 4, 256, BF16, 1), _weight(4 * 72, 256, "fp32", 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.grouped_linear(x, w, s)
        torch.set_num_threads(3)
        three = native.grouped_linear(x, w, s)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_dense_weights_and_float64_run_the_reference():
    x, w = _x((2,), 2, 128, BF16, 2), torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    assert torch.equal(native.grouped_linear(x, w), reference(x, w))
    x64, (w8, s8) = _x((2,), 2, 128, torch.float64, 3), _weight(128, 128, "e8m0", 3)
    assert torch.equal(native.grouped_linear(x64, w8, s8), reference(x64, w8, s8))


def test_cpu_plan_binds_it_and_keeps_wo_a_in_fp8():
    plan = hal.plan("cpu", ops=["grouped_linear"], announce=False)
    assert plan["grouped_linear"].kernel.qualified_name == "cpu.native"
    assert plan.weight_conversions == {}  # the FP8 bytes stay: nothing reads wo_a dequantised
    x, (w, s) = _x((1, 1), 2, 128, BF16, 4), _weight(256, 128, "e8m0", 4)
    assert torch.equal(plan["grouped_linear"](x, w, s), native.grouped_linear(x, w, s))
