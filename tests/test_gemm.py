"""CPU reference of the block-scaled GEMMs (fp8_gemm, fp4_gemm) against independent references:
explicit loops, float64 products of the dequantised operands, and hand-computed values."""

from __future__ import annotations

import itertools

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference.gemm import fp4_gemm, fp8_gemm
from seahal.hal.formats import e8m0_scales

FP32_U = 2.0**-24  # fp32 unit roundoff (24 significant bits)
BF16_U = 2.0**-8  # bf16 unit roundoff (8 significant bits)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_NAN_BYTES = (0x7F, 0xFF)


def _random_e4m3(shape, gen: torch.Generator) -> torch.Tensor:
    """Every finite e4m3 code equally likely (all binades, subnormals, signed zeros)."""
    raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    raw = torch.where((raw == E4M3_NAN_BYTES[0]) | (raw == E4M3_NAN_BYTES[1]), 0, raw)
    return raw.view(torch.float8_e4m3fn)


def _random_scales(shape, gen: torch.Generator, e8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale tensor as passed to the kernel, its float64 value): e8m0 bytes 2^(e-127) or random fp32."""
    if e8m0:
        exponent = torch.randint(120, 135, shape, generator=gen, dtype=torch.uint8)
        return e8m0_scales(exponent), torch.exp2(exponent.double() - 127)
    scale = torch.rand(shape, generator=gen) * 3 + 0.01
    return scale, scale.double()


def _e2m1_value(code: int) -> float:
    return (-1.0 if code & 8 else 1.0) * E2M1[code & 7]


def _unpack_fp4_double(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] bytes -> [N, K] float64 e2m1 values; element 2i is the low nibble of byte i."""
    table = torch.tensor([_e2m1_value(c) for c in range(16)], dtype=torch.float64)
    low, high = table[(packed & 0xF).long()], table[(packed >> 4).long()]
    return torch.stack((low, high), dim=-1).flatten(-2)


def _assert_close_to_exact(c: torch.Tensor, exact: torch.Tensor, abs_terms: torch.Tensor, n_terms: int) -> None:
    """Forward-error bound of an fp32-accumulated sum, plus the output rounding.

    Any summation order of n terms in fp32 errs by at most ``n u sum|terms|`` (u = 2^-24); the
    scale multiplications add a few more roundings (``+4``); a bf16 output rounds once more with
    relative error <= 2^-8.
    """
    bound = (n_terms + 4) * FP32_U * abs_terms
    if c.dtype == torch.bfloat16:
        bound = bound + BF16_U * exact.abs() * (1 + 1e-6)
    err = (c.double() - exact).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


def _dequantised_fp8_product(a, a_scale64, b, b_scale64):
    """float64 ``(A sA) @ (B sB)^T`` and ``|A sA| @ |B sB|^T`` with scales expanded per element."""
    n = b.shape[0]
    a64 = a.double() * a_scale64.repeat_interleave(128, dim=1)
    b64 = b.double() * b_scale64.repeat_interleave(128, dim=0)[:n].repeat_interleave(128, dim=1)
    return a64 @ b64.T, a64.abs() @ b64.abs().T


@pytest.mark.parametrize("e8m0", [False, True])
def test_fp8_gemm_matches_explicit_loop(e8m0):
    """Tiny case against the formula written as loops over m, n, K blocks and k (float64)."""
    gen = torch.Generator().manual_seed(1)
    m_size, n_size, k_size = 2, 3, 256
    a, b = _random_e4m3((m_size, k_size), gen), _random_e4m3((n_size, k_size), gen)
    a_scale, a_scale64 = _random_scales((m_size, 2), gen, e8m0=False)
    b_scale, b_scale64 = _random_scales((1, 2), gen, e8m0)
    out = fp8_gemm(a, a_scale, b, b_scale, torch.float32)
    av, bv = a.double().tolist(), b.double().tolist()
    exact = torch.zeros(m_size, n_size, dtype=torch.float64)
    abs_terms = torch.zeros_like(exact)
    for m, n in itertools.product(range(m_size), range(n_size)):
        for kb in range(k_size // 128):
            scale = a_scale64[m, kb].item() * b_scale64[n // 128, kb].item()
            block = [av[m][k] * bv[n][k] for k in range(kb * 128, (kb + 1) * 128)]
            exact[m, n] += scale * sum(block)
            abs_terms[m, n] += scale * sum(abs(t) for t in block)
    _assert_close_to_exact(out, exact, abs_terms, k_size)


@pytest.mark.parametrize("e8m0", [False, True])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_fp8_gemm_matches_dequantised_product(e8m0, out_dtype):
    """N = 200 spans a full and a partial 128-row weight block; K = 384 is three scale blocks."""
    gen = torch.Generator().manual_seed(2)
    m_size, n_size, k_size = 5, 200, 384
    a, b = _random_e4m3((m_size, k_size), gen), _random_e4m3((n_size, k_size), gen)
    a_scale, a_scale64 = _random_scales((m_size, 3), gen, e8m0=False)
    b_scale, b_scale64 = _random_scales((2, 3), gen, e8m0)
    out = fp8_gemm(a, a_scale, b, b_scale, out_dtype)
    assert out.shape == (m_size, n_size)
    assert out.dtype == (torch.bfloat16 if out_dtype is None else out_dtype)
    exact, abs_terms = _dequantised_fp8_product(a, a_scale64, b, b_scale64)
    _assert_close_to_exact(out, exact, abs_terms, k_size)


def test_fp8_gemm_e8m0_scales_equal_their_fp32_values():
    gen = torch.Generator().manual_seed(3)
    a, b = _random_e4m3((4, 256), gen), _random_e4m3((130, 256), gen)
    a_scale, _ = _random_scales((4, 2), gen, e8m0=False)
    b_scale, b_scale64 = _random_scales((2, 2), gen, e8m0=True)
    via_e8m0 = fp8_gemm(a, a_scale, b, b_scale, torch.float32)
    via_fp32 = fp8_gemm(a, a_scale, b, b_scale64.float(), torch.float32)
    assert torch.equal(via_e8m0, via_fp32)


def test_fp8_gemm_accumulates_scaled_k_blocks_in_fp32_in_k_order():
    """Partial sums 2^24, 1, -2^24: fp32 in K order gives (2^24 + 1) - 2^24 = 0 (the 1 is lost to
    round-to-even), while the exact result is 1. Pins the per-K-block fp32 accumulation of §11.2."""
    a = torch.ones(1, 384).to(torch.float8_e4m3fn)
    b = torch.cat((torch.ones(1, 256), -torch.ones(1, 128)), dim=1).to(torch.float8_e4m3fn)
    a_scale = torch.tensor([[2.0**17, 2.0**-7, 2.0**17]])  # block sums are 128 = 2^7
    b_scale = torch.ones(1, 3)
    assert fp8_gemm(a, a_scale, b, b_scale, torch.float32).item() == 0.0
    exact, _ = _dequantised_fp8_product(a, a_scale.double(), b, b_scale.double())
    assert exact.item() == 1.0


def test_fp8_gemm_through_plan():
    gen = torch.Generator().manual_seed(4)
    a, b = _random_e4m3((3, 128), gen), _random_e4m3((7, 128), gen)
    a_scale, a_scale64 = _random_scales((3, 1), gen, e8m0=False)
    b_scale, b_scale64 = _random_scales((1, 1), gen, e8m0=True)
    plan = hal.plan("cpu", ops=["fp8_gemm"], announce=False, environ={"SEAHAL_OPS": "fp8_gemm=cpu.reference"})
    out = plan.ops.fp8_gemm(a, a_scale, b, b_scale)
    exact, abs_terms = _dequantised_fp8_product(a, a_scale64, b, b_scale64)
    _assert_close_to_exact(out, exact, abs_terms, 128)


@pytest.mark.parametrize("e8m0", [False, True])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_fp4_gemm_matches_dequantised_product(e8m0, out_dtype):
    """Weight scales change every 32 K, activation scales every 128 K."""
    gen = torch.Generator().manual_seed(5)
    m_size, n_size, k_size = 6, 40, 256
    a = _random_e4m3((m_size, k_size), gen)
    b = torch.randint(0, 256, (n_size, k_size // 2), generator=gen, dtype=torch.uint8)
    a_scale, a_scale64 = _random_scales((m_size, k_size // 128), gen, e8m0=False)
    b_scale, b_scale64 = _random_scales((n_size, k_size // 32), gen, e8m0)
    out = fp4_gemm(a, a_scale, b, b_scale, out_dtype)
    assert out.dtype == (torch.bfloat16 if out_dtype is None else out_dtype)
    a64 = a.double() * a_scale64.repeat_interleave(128, dim=1)
    b64 = _unpack_fp4_double(b) * b_scale64.repeat_interleave(32, dim=1)
    _assert_close_to_exact(out, a64 @ b64.T, a64.abs() @ b64.abs().T, k_size)


def test_fp4_gemm_hand_built_case_is_bit_exact():
    """Byte 0x21 = (0.5, 1.0) low nibble first; 0x9F = (-6, -0.5); 0x07 = (6, 0).

    row 0: (2*0.5 + 3*1.0) * sA 0.5 * sB 2          = 4
    row 1: (2*-6 + 3*-0.5) * 0.5 * 2 + 1*6 * 0.5 * 2^-3 = -13.5 + 0.375 = -13.125 (exact in bf16)
    """
    a = torch.zeros(1, 128)
    a[0, 0], a[0, 1], a[0, 32] = 2.0, 3.0, 1.0
    b = torch.zeros(2, 64, dtype=torch.uint8)
    b[0, 0], b[1, 0], b[1, 16] = 0x21, 0x9F, 0x07
    b_scale = torch.full((2, 4), 127, dtype=torch.uint8)  # e8m0 127 = 1.0
    b_scale[:, 0], b_scale[1, 1] = 128, 124  # 2.0 and 2^-3
    out = fp4_gemm(a.to(torch.float8_e4m3fn), torch.tensor([[0.5]]), b, e8m0_scales(b_scale))
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [[4.0, -13.125]]


def test_fp4_gemm_through_plan():
    gen = torch.Generator().manual_seed(6)
    a = _random_e4m3((2, 128), gen)
    b = torch.randint(0, 256, (3, 64), generator=gen, dtype=torch.uint8)
    a_scale, a_scale64 = _random_scales((2, 1), gen, e8m0=False)
    b_scale, b_scale64 = _random_scales((3, 4), gen, e8m0=True)
    plan = hal.plan("cpu", ops=["fp4_gemm"], announce=False, environ={"SEAHAL_OPS": "fp4_gemm=cpu.reference"})
    out = plan.ops.fp4_gemm(a, a_scale, b, b_scale, torch.float32)
    a64 = a.double() * a_scale64.repeat_interleave(128, dim=1)
    b64 = _unpack_fp4_double(b) * b_scale64.repeat_interleave(32, dim=1)
    _assert_close_to_exact(out, a64 @ b64.T, a64.abs() @ b64.abs().T, 128)
