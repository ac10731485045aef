"""Native CPU GEMMs (csrc/gemm.cpp) against the reference kernels (backends/cpu/reference/gemm.py).

Both compute the same exact products in fp32 (e4m3 x e4m3 and e4m3 x e2m1 products are exact,
and e8m0 scales are powers of two) and differ only in the order of the fp32 sums, so the two
results may differ by at most the sum of their forward-error bounds: each sum of n terms errs by
at most ``n u S`` with u = 2^-24 and S = sum_k |A sA| |B sB|, plus a few roundings of the scale
products. Every case runs on each SIMD variant the CPU has (baseline, AVX2, AVX512-BF16, whose
bf16 products are exact too).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from seahal import hal
from seahal.backends.cpu import native
from seahal.backends.cpu.reference import gemm as reference
from seahal.hal.formats import decode_scale, e2m1_decode, e8m0_scales, fp4_unpack

pytestmark = pytest.mark.skipif(native.native_module() is None, reason="seahal._native is not built")

FP32_U = 2.0**-24  # fp32 unit roundoff
E4M3_NAN = (0x7F, 0xFF)
MS = (1, 3, 16, 130)
N = 200  # not a multiple of 128 (nor of the native tile sizes)
KS = (128, 384, 1024)


SIMD_VARIANTS = ("baseline", "avx2+fma+f16c", "avx512bf16")


@pytest.fixture(params=SIMD_VARIANTS)
def simd(request):
    """Run under each instruction-set variant this CPU has (the others skip)."""
    module = native.native_module()
    variants = module.simd_variants()
    if request.param not in variants:
        pytest.skip(f"this CPU runs {variants[-1]} at most")
    module.set_simd(request.param)
    yield module.simd_variant()
    module.set_simd(variants[-1])


def random_e4m3(shape, gen: torch.Generator) -> torch.Tensor:
    """Every finite e4m3 code equally likely (all binades, subnormals, signed zeros)."""
    raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    raw = torch.where((raw == E4M3_NAN[0]) | (raw == E4M3_NAN[1]), 0, raw)
    return raw.view(torch.float8_e4m3fn)


def random_scales(shape, gen: torch.Generator, e8m0: bool) -> torch.Tensor:
    """e8m0 scales 2^(e-127) for e in [120, 135), or arbitrary positive fp32 scales."""
    if e8m0:
        return e8m0_scales(torch.randint(120, 135, shape, generator=gen, dtype=torch.uint8))
    return torch.rand(shape, generator=gen) * 3 + 0.01


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other column of a wider buffer)."""
    raw = t.view(torch.uint8) if t.element_size() == 1 else t
    wide = torch.zeros(raw.shape[0], 2 * raw.shape[1], dtype=raw.dtype)
    wide[:, ::2] = raw
    out = wide[:, ::2]
    return out.view(t.dtype) if t.element_size() == 1 else out


def fp8_case(m: int, n: int, k: int, e8m0: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    a = random_e4m3((m, k), gen)
    a_scale = decode_scale(random_scales((m, k // 128), gen, True))
    b = random_e4m3((n, k), gen)
    b_scale = random_scales((-(-n // 128), k // 128), gen, e8m0)
    return a, a_scale, b, b_scale


def fp4_case(m: int, n: int, k: int, e8m0: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    a = random_e4m3((m, k), gen)
    a_scale = decode_scale(random_scales((m, k // 128), gen, True))
    b = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    b_scale = random_scales((n, k // 32), gen, e8m0)
    return a, a_scale, b, b_scale


def abs_terms(op: str, a, a_scale, b, b_scale) -> torch.Tensor:
    """S[m, n] = sum_k |A sA| |B sB| in float64 (the scale of every summation error)."""
    k = a.shape[1]
    a_abs = (a.double().abs().view(a.shape[0], k // 128, 128) * a_scale.double()[..., None]).view(a.shape)
    if op == "fp8_gemm":
        rows = decode_scale(b_scale).double().repeat_interleave(128, dim=0)[: b.shape[0]]
        b_abs = (b.double().abs().view(b.shape[0], k // 128, 128) * rows[..., None]).view(b.shape)
    else:
        values = e2m1_decode(fp4_unpack(b)).double().abs()
        b_abs = (values.view(b.shape[0], k // 32, 32) * decode_scale(b_scale).double()[..., None]).view(values.shape)
    return a_abs @ b_abs.T


def assert_matches_reference(op: str, case, out_dtype) -> None:
    kernel, ref = getattr(native, op), getattr(reference, op)
    got = kernel(*case, out_dtype)
    assert got.dtype == (torch.bfloat16 if out_dtype is None else out_dtype)
    expected = ref(*case, torch.float32).double()
    k = case[0].shape[1]
    # Two fp32 sums of k terms in different orders, each within (k + 4) u S of the exact value.
    bound = 2 * (k + 4) * FP32_U * abs_terms(op, *case)
    exact_fp32 = kernel(*case, torch.float32)
    assert ((exact_fp32.double() - expected).abs() <= bound).all()
    if got.dtype == torch.bfloat16:
        # the bf16 output is the fp32 accumulator rounded to nearest even, nothing else
        assert torch.equal(got, exact_fp32.to(torch.bfloat16))


@pytest.mark.parametrize("m,k", list(itertools.product(MS, KS)))
@pytest.mark.parametrize("e8m0", [True, False], ids=["e8m0", "fp32-scales"])
def test_fp8_gemm_matches_reference(simd, m, k, e8m0):
    case = fp8_case(m, N, k, e8m0, seed=m * 1000 + k)
    assert_matches_reference("fp8_gemm", case, None)


@pytest.mark.parametrize("m,k", list(itertools.product(MS, KS)))
@pytest.mark.parametrize("e8m0", [True, False], ids=["e8m0", "fp32-scales"])
def test_fp4_gemm_matches_reference(simd, m, k, e8m0):
    case = fp4_case(m, N, k, e8m0, seed=m * 1000 + k + 1)
    assert_matches_reference("fp4_gemm", case, None)


@pytest.mark.parametrize("op,make", [("fp8_gemm", fp8_case), ("fp4_gemm", fp4_case)])
def test_fp32_output_and_non_contiguous_inputs(simd, op, make):
    a, a_scale, b, b_scale = make(16, 72, 256, True, seed=7)
    contiguous = getattr(native, op)(a, a_scale, b, b_scale, torch.float32)
    args = (strided(a), strided(a_scale), strided(b), strided(b_scale))
    assert not any(t.is_contiguous() for t in args)
    assert torch.equal(getattr(native, op)(*args, torch.float32), contiguous)
    assert_matches_reference(op, args, torch.float32)


@pytest.mark.parametrize("op,make", [("fp8_gemm", fp8_case), ("fp4_gemm", fp4_case)])
def test_many_rows_take_several_passes(simd, op, make):
    """M above the kernel's 256 rows per pass: every pass must land in its own output rows."""
    assert_matches_reference(op, make(600, 24, 128, True, seed=5), torch.float32)


@pytest.mark.parametrize("op,make", [("fp8_gemm", fp8_case), ("fp4_gemm", fp4_case)])
def test_threads_do_not_change_the_result(simd, op, make):
    """Tiles own whole output columns and sum in a fixed order: any thread count, same bits."""
    case = make(5, 520, 256, True, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = getattr(native, op)(*case, torch.float32)
        torch.set_num_threads(3)
        three = getattr(native, op)(*case, torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_fp8_hand_computed_block_sum():
    """Two K blocks: C = 1*2*128 * (0.5 * 4) + (-1.5)*1*128 * (2 * 0.25) = 512 - 96."""
    a = torch.cat((torch.ones(1, 128), -1.5 * torch.ones(1, 128)), dim=1).to(torch.float8_e4m3fn)
    b = torch.cat((2 * torch.ones(3, 128), torch.ones(3, 128)), dim=1).to(torch.float8_e4m3fn)
    a_scale = torch.tensor([[0.5, 2.0]])
    b_scale = e8m0_scales(torch.tensor([[129, 125]], dtype=torch.uint8))  # 4 and 0.25
    assert native.fp8_gemm(a, a_scale, b, b_scale, torch.float32).tolist() == [[416.0] * 3]


def test_fp4_hand_computed_low_nibble_first():
    """Bytes 0x21: element 0 is code 1 (0.5), element 1 is code 2 (1.0); A alternates 1, 2."""
    a = torch.tensor([1.0, 2.0] * 64).reshape(1, 128).to(torch.float8_e4m3fn)
    b = torch.full((1, 64), 0x21, dtype=torch.uint8)
    scales = torch.tensor([[1.0, 2.0, 4.0, 8.0]])  # 16 (0.5 * 1 + 1.0 * 2) = 40 per 32-step
    assert native.fp4_gemm(a, torch.ones(1, 1), b, scales, torch.float32).tolist() == [[40.0 * 15]]


@pytest.mark.parametrize("e8m0_range", [(1, 40), (11, 200)], ids=["down-to-2^-126", "the-exact-range"])
def test_fp4_scales_across_the_e8m0_range(simd, e8m0_range):
    """e8m0 scales from 2^-126 (sums below 2^128: no overflow for either order to meet): the
    avx512bf16 variant multiplies the decoded values by their scales only where every scale of the
    call keeps the products normal (bytes 11..242), else it scales each 32-wide step's sum; both
    must match the reference's fp32 products."""
    a, a_scale, b, _ = fp4_case(3, N, 384, True, seed=21)
    gen = torch.Generator().manual_seed(22)
    b_scale = e8m0_scales(torch.randint(*e8m0_range, (N, 384 // 32), generator=gen, dtype=torch.uint8))
    assert_matches_reference("fp4_gemm", (a, a_scale, b, b_scale), torch.float32)


def test_fp4_products_below_the_fp32_normals_are_kept(simd):
    """Activations 2^-9 (the least e4m3) by e2m1 values at scale 2^-122 (byte 5): products of
    2^-132 ... 3 * 2^-129, which VDPBF16PS would flush to zero. One such row among ordinary ones
    must make the whole call take the variant's per-step scaling (the reference keeps them)."""
    a = torch.full((2, 128), 1, dtype=torch.uint8).view(torch.float8_e4m3fn)
    gen = torch.Generator().manual_seed(23)
    b = torch.randint(0, 256, (16, 64), generator=gen, dtype=torch.uint8)
    codes = torch.full((16, 4), 127, dtype=torch.uint8)
    codes[5] = 5
    case = (a, torch.ones(2, 1), b, e8m0_scales(codes))
    got = native.fp4_gemm(*case, torch.float32)
    assert (got[:, 5] != 0).all()  # a flush would leave zeros
    assert_matches_reference("fp4_gemm", case, torch.float32)


def test_nan_codes_propagate(simd):
    a = torch.ones(2, 128).to(torch.float8_e4m3fn)
    b = torch.ones(9, 128).to(torch.float8_e4m3fn)
    b.view(torch.uint8)[4, 17] = 0xFF  # -NaN in e4m3fn
    c = native.fp8_gemm(a, torch.ones(2, 1), b, torch.ones(1, 1), torch.float32)
    assert c[:, 4].isnan().all() and not c[:, [0, 1, 2, 3, 5, 6, 7, 8]].isnan().any()


def test_flush_denormal_mode_does_not_flush_e4m3_subnormals(simd):
    """e4m3 codes 1..7 are subnormal; with torch's flush-denormal mode on they still count."""
    b = torch.tensor([1, 2, 3, 7, 0x81, 0x87, 5, 6] * 16, dtype=torch.uint8).repeat(8, 1).view(torch.float8_e4m3fn)
    a = torch.ones(1, 128).to(torch.float8_e4m3fn)
    expected = b.float().sum(dim=1, keepdim=True).T  # all products and sums exact
    assert torch.set_flush_denormal(True)
    try:
        c = native.fp8_gemm(a, torch.ones(1, 1), b, torch.ones(1, 1), torch.float32)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(c, expected)


def test_contract_errors_are_raised_before_the_kernel():
    a = torch.zeros(2, 100).to(torch.float8_e4m3fn)
    with pytest.raises(hal.SpecError):
        native.fp8_gemm(a, torch.ones(2, 1), a, torch.ones(1, 1))


@pytest.mark.parametrize("op", ["fp8_gemm", "fp4_gemm"])
def test_cpu_plan_binds_the_native_kernel(op):
    plan = hal.plan("cpu", ops=[op], announce=False)
    assert plan[op].kernel.qualified_name == "cpu.native"
    case = (fp8_case if op == "fp8_gemm" else fp4_case)(3, 40, 256, True, seed=11)
    assert torch.equal(plan[op](*case), getattr(native, op)(*case))
