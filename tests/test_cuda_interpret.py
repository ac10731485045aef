"""The cuda backend's Triton GEMMs, run by the Triton interpreter on CPU tensors.

The kernels are checked against two independent figures: the CPU reference kernel (same
per-block fp32 accumulation, different code) and a float64 product of the dequantised operands.
Triton reads TRITON_INTERPRET when it is imported and when each kernel is decorated, so in a
normal pytest run ``test_under_interpreter`` runs this file again in a subprocess with the
variable set; the kernel tests run there (and are skipped in the parent). Other test files never
see the variable.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from seahal.backends.cpu.reference import gemm as reference  # noqa: E402
from seahal.hal.formats import (  # noqa: E402
    decode_scale,
    fp4_dequantize,
    fp4_quantize,
    fp8_dequantize,
    fp8_quantize,
    ue8m0_encode,
)
from seahal.hal import get_spec  # noqa: E402
from seahal.testing import triton_interpreter  # noqa: E402

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in test_under_interpreter's subprocess")


def test_under_interpreter():
    triton_interpreter.rerun_test_file(__file__, skipped=2)


FP32_TOL = 1e-5
"""fp32 accumulation in a different order than the reference: ~2^-24 * sqrt(K) relative, K <= 512."""
BF16_TOL = 2**-8
"""bf16 output: 8 significant bits, so each element is within 2^-9 relative of the fp32 result."""


@pytest.fixture(scope="module")
def kernels():
    """(fp8_gemm module, fp4_gemm module), imported under the interpreter."""
    from seahal.backends.cuda import fp4_gemm, fp8_gemm

    with triton_interpreter.bf16_dot_fix():
        yield fp8_gemm, fp4_gemm


def _fp8_weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 weight [N, K] and random fp32 128x128 block scales (not powers of two)."""
    codes = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-n // 128), k // 128, generator=gen) * 1e-3 + 1e-4
    return codes, scale


def _activation(m: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 activations with plain amax/448 scales whose magnitudes vary by row and block."""
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, k // 128, generator=gen)).repeat_interleave(128, 1)
    return fp8_quantize(x, 128, scale_fmt="fp32")


def _fp8_dequantised(a, a_scale, b, b_scale) -> torch.Tensor:
    """float64 (A sA) @ (B sB)^T built from the codecs, independent of both kernels."""
    rows = decode_scale(b_scale).double().repeat_interleave(128, dim=0)[: b.shape[0]]
    return fp8_dequantize(a, a_scale, 128, torch.float64) @ fp8_dequantize(b, rows, 128, torch.float64).T


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


# (block_m, block_n, split_k, tma): edge tiles in M and N, one scale row per tile (block_n <= 128),
# two scale rows per tile (block_n = 256), split-K with a remainder and with an empty split, and
# tensor-descriptor loads (zero-filled edge rows).
FP8_CONFIGS = [(16, 64, 1, False), (16, 32, 2, False), (16, 256, 2, False), (32, 128, 4, False), (16, 64, 2, True)]


@interpreted
@pytest.mark.parametrize("block_m, block_n, split_k, tma", FP8_CONFIGS)
def test_fp8_gemm_matches_reference(kernels, block_m, block_n, split_k, tma):
    fp8, _ = kernels
    from seahal.backends.cuda._gemm import GemmConfig

    gen = torch.Generator().manual_seed(block_n + split_k)
    m, n, k = 19, 200, 384  # N = 200: the last weight block row holds 72 rows; K: 3 scale blocks
    a, a_scale = _activation(m, k, gen)
    b, b_scale = _fp8_weight(n, k, gen)
    out = torch.full((m, n), float("nan"))
    fp8.launch_fp8_gemm(a, a_scale, b, b_scale, out, GemmConfig(block_m, block_n, 4, 2, split_k, tma=tma))
    assert not out.isnan().any(), "some output elements were not written"
    assert _rel(out, reference.fp8_gemm(a, a_scale, b, b_scale, torch.float32)) < FP32_TOL
    assert _rel(out, _fp8_dequantised(a, a_scale, b, b_scale)) < FP32_TOL


@interpreted
def test_fp8_gemm_e8m0_scales_bf16_output(kernels):
    fp8, _ = kernels
    gen = torch.Generator().manual_seed(1)
    a, a_scale = _activation(3, 256, gen)
    b, b_scale = _fp8_weight(130, 256, gen)
    b_scale = ue8m0_encode(b_scale).view(torch.float8_e8m0fnu)  # powers of two 2^-13 .. 2^-10
    b_scale.view(torch.uint8)[0, 0] = 0  # 2^-127: the subnormal corner of the e8m0 decode
    out = fp8.fp8_gemm(a, a_scale, b, b_scale)
    assert get_spec("fp8_gemm").check(a, a_scale, b, b_scale) == (tuple(out.shape), out.dtype)
    assert _rel(out, reference.fp8_gemm(a, a_scale, b, b_scale, torch.float32)) < BF16_TOL
    assert _rel(out, _fp8_dequantised(a, a_scale, b, b_scale)) < BF16_TOL


@interpreted
@pytest.mark.parametrize("block_n, split_k, e8m0", [(32, 1, False), (16, 3, True)])
def test_fp4_gemm_matches_reference(kernels, block_n, split_k, e8m0):
    _, fp4 = kernels
    from seahal.backends.cuda._gemm import GemmConfig

    gen = torch.Generator().manual_seed(split_k)
    m, n, k = 5, 40, 384
    a, a_scale = _activation(m, k, gen)
    # Magnitudes spread over 2^-20 .. 2^20 per 32-wide block: the 1x32 scales differ within a K block.
    w = torch.randn(n, k, generator=gen) * torch.exp2(torch.randint(-20, 21, (n, k // 32), generator=gen)).repeat_interleave(32, 1)
    b, b_scale = fp4_quantize(w)
    if e8m0:
        b_scale = ue8m0_encode(b_scale).view(torch.float8_e8m0fnu)
    out = torch.full((m, n), float("nan"))
    fp4.launch_fp4_gemm(a, a_scale, b, b_scale, out, GemmConfig(16, block_n, 4, 2, split_k))
    assert not out.isnan().any(), "some output elements were not written"
    ref64 = fp8_dequantize(a, a_scale, 128, torch.float64) @ fp4_dequantize(b, b_scale, 32, torch.float64).T
    assert _rel(out, reference.fp4_gemm(a, a_scale, b, b_scale, torch.float32)) < FP32_TOL
    assert _rel(out, ref64) < FP32_TOL


@interpreted
def test_fp4_gemm_default_config_bf16(kernels):
    _, fp4 = kernels
    gen = torch.Generator().manual_seed(7)
    a, a_scale = _activation(2, 256, gen)
    b, b_scale = fp4_quantize(torch.randn(24, 256, generator=gen))
    out = fp4.fp4_gemm(a, a_scale, b, b_scale)
    assert get_spec("fp4_gemm").check(a, a_scale, b, b_scale) == (tuple(out.shape), out.dtype)
    assert _rel(out, reference.fp4_gemm(a, a_scale, b, b_scale, torch.float32)) < BF16_TOL


if IN_INTERPRETER:  # the test's own kernel around the FP4 decoding helpers, decorated under the interpreter
    import triton.language as tl

    from seahal.backends.cuda._e2m1 import as_e4m3, e4m3_form_is_exact, unpack_codes

    @triton.jit
    def _e4m3_form_kernel(packed_ptr, exponent_ptr, values_ptr, exact_ptr):
        """Per weight row (one 128-wide K block): whether the e4m3 form is exact, and its values
        ``e4m3 · 2^(base - 127)`` in fp32."""
        row = tl.program_id(0)
        same_row = row + tl.zeros([16], dtype=tl.int32)  # 16 copies: the check takes a tile of rows
        tl.store(exact_ptr + row, e4m3_form_is_exact(exponent_ptr + same_row * 4, 0, 1, 1, 16).to(tl.int32))
        packed = tl.load(packed_ptr + row * 64 + tl.arange(0, 64))[None, :]
        exponents = tl.load(exponent_ptr + row * 4 + tl.arange(0, 4))[None, :].to(tl.int32)
        values, row_scale = as_e4m3(unpack_codes(packed, 1, 128), exponents, 1, 128)
        tl.store(values_ptr + row * 128 + tl.arange(0, 128)[None, :], values.to(tl.float32) * row_scale[:, None])


def _e4m3_form_fits(exponents: torch.Tensor) -> torch.Tensor:
    """The rule of ``_e2m1``, per row of e8m0 bytes [R, 4]: spread <= 14 binades, 7 <= max <= 252."""
    hi, lo = exponents.max(1).values, exponents.min(1).values
    return (hi - lo <= 14) & (hi >= 7) & (hi <= 252)


@interpreted
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # rows outside the rule overflow in their unused e4m3 values
def test_e4m3_form_is_exact_exactly_where_claimed():
    """Every e2m1 code under scales spanning 0-16 binades and at the ends of the e8m0 range: the
    kernel's check agrees with the rule, and where it holds the e4m3 form times its row scale is
    the FP4 value bit for bit (the float64 codec, which has no e4m3 step)."""
    gen = torch.Generator().manual_seed(5)
    spreads = [[127, 127 - s, 127 - s // 2, 127] for s in range(17)]
    ends = [[h, h, h - 3 if h >= 3 else 0, h] for h in (0, 3, 6, 7, 8, 20, 240, 250, 252, 253, 254, 255)]
    randoms = torch.randint(0, 256, (16, 4), generator=gen).tolist() + torch.randint(110, 140, (16, 4), generator=gen).tolist()
    exponents = torch.tensor(spreads + ends + randoms, dtype=torch.uint8)
    rows = exponents.shape[0]
    codes = torch.stack([torch.arange(16).repeat(8)[torch.randperm(128, generator=gen)] for _ in range(rows)])
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    values, exact = torch.empty(rows, 128), torch.empty(rows, dtype=torch.int32)
    _e4m3_form_kernel[(rows,)](packed, exponents, values, exact)
    fits = _e4m3_form_fits(exponents.int())
    assert torch.equal(exact.bool(), fits)
    assert fits[:15].all() and not fits[15:17].any(), "the boundary is 14 binades"
    expected = fp4_dequantize(packed, exponents.view(torch.float8_e8m0fnu), 32, torch.float64)
    assert torch.equal(values[fits].double(), expected[fits])


def _fp4_weight_spread(n: int, k: int, binades: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 weight [N, K] with e8m0 1x32 scales whose groups' magnitudes span ``binades`` (2^±binades/2)."""
    half = binades // 2
    spread = torch.exp2(torch.randint(-half, half + 1, (n, k // 32), generator=gen).float()).repeat_interleave(32, 1)
    b, scale = fp4_quantize(torch.randn(n, k, generator=gen) * spread)
    return b, ue8m0_encode(scale).view(torch.float8_e8m0fnu)


@interpreted
@pytest.mark.parametrize("scales", ["narrow", "wide", "mixed"])
@pytest.mark.parametrize("split_k", [1, 2])
def test_fp4_gemm_e4m3_form_is_the_bf16_form(kernels, scales, split_k):
    """``fp4_as_e4m3``: tiles whose scales allow it run the FP8 MMA on e4m3 values, the others
    the bf16 form; both sum the same exact products, so the output is the bf16 form's bit for bit
    (and the float64 product's to fp32 accumulation order). "mixed": rows 0-63 narrow, the rest
    wide, so with 32-row tiles and split K some tiles take each form."""
    _, fp4 = kernels
    from seahal.backends.cuda._gemm import GemmConfig

    gen = torch.Generator().manual_seed(split_k)
    m, n, k = 37, 96, 512
    a, a_scale = _activation(m, k, gen)
    narrow, wide = _fp4_weight_spread(n, k, 10, gen), _fp4_weight_spread(n, k, 40, gen)
    if scales == "mixed":
        b = torch.cat([narrow[0][:64], wide[0][64:]])
        b_scale = torch.cat([narrow[1][:64], wide[1][64:]])
    else:
        b, b_scale = narrow if scales == "narrow" else wide
    blocks = _e4m3_form_fits(b_scale.view(torch.uint8).int().reshape(n * k // 128, 4)).reshape(n, k // 128)
    assert blocks.all() if scales == "narrow" else not blocks.all()
    out = {}
    for e4m3 in (False, True):
        out[e4m3] = torch.full((m, n), float("nan"))
        fp4.launch_fp4_gemm(a, a_scale, b, b_scale, out[e4m3], GemmConfig(16, 32, 4, 2, split_k, fp4_as_e4m3=e4m3))
    assert not out[True].isnan().any(), "some output elements were not written"
    assert torch.equal(out[True], out[False])
    ref64 = fp8_dequantize(a, a_scale, 128, torch.float64) @ fp4_dequantize(b, b_scale, 32, torch.float64).T
    assert _rel(out[True], ref64) < FP32_TOL


# (op, block_m, block_n, split_k, tma, e8m0) on M=37, N=200, K=384: partial tiles in M and N and
# 8-24 work items for the 3 persistent programs of the interpreter (INTERPRETER_SMS x 1), with
# split-K (its counters and fixed-order sum), TMA loads and e8m0 scales.
PERSISTENT_CONFIGS = [
    ("fp8_gemm", 16, 64, 1, False, False),
    ("fp8_gemm", 16, 64, 2, True, False),
    ("fp8_gemm", 32, 32, 3, False, True),
    ("fp4_gemm", 16, 64, 1, False, True),
    ("fp4_gemm", 32, 32, 2, False, False),
]


@interpreted
@pytest.mark.parametrize("op, block_m, block_n, split_k, tma, e8m0", PERSISTENT_CONFIGS)
def test_persistent_launch_is_bitwise_equal(kernels, op, block_m, block_n, split_k, tma, e8m0):
    """A persistent program runs the same per-tile code over several tiles: the same bits as one
    program per tile, and the reference's numbers."""
    from seahal.backends.cuda._gemm import GemmConfig, launch_grid

    fp8, fp4 = kernels
    gen = torch.Generator().manual_seed(block_n + split_k)
    m, n, k = 37, 200, 384
    a, a_scale = _activation(m, k, gen)
    if op == "fp8_gemm":
        b, b_scale = _fp8_weight(n, k, gen)
        launch_gemm = fp8.launch_fp8_gemm
    else:
        b, b_scale = fp4_quantize(torch.randn(n, k, generator=gen))
        launch_gemm = fp4.launch_fp4_gemm
    if e8m0:
        b_scale = ue8m0_encode(b_scale).view(torch.float8_e8m0fnu)
    config = GemmConfig(block_m, block_n, 4, 2, split_k, tma=tma)
    persistent = GemmConfig(block_m, block_n, 4, 2, split_k, tma=tma, persistent=1)
    programs, _ = launch_grid(persistent, m, n, a.device)
    assert programs < -(-m // block_m) * -(-n // block_n) * split_k, "every program must loop"
    out, out_persistent = torch.full((m, n), float("nan")), torch.full((m, n), float("nan"))
    launch_gemm(a, a_scale, b, b_scale, out, config)
    launch_gemm(a, a_scale, b, b_scale, out_persistent, persistent)
    assert not out_persistent.isnan().any(), "some output elements were not written"
    assert torch.equal(out_persistent, out)
    assert _rel(out_persistent, getattr(reference, op)(a, a_scale, b, b_scale, torch.float32)) < FP32_TOL


@interpreted
def test_config_selection(kernels):
    from seahal.backends.cuda._gemm import GemmConfig, heuristic_config, m_class, select_config

    assert [m_class(m) for m in (1, 2, 16, 17, 64, 65, 512, 4096, 4097, 99999)] == [
        1, 16, 16, 64, 64, 512, 512, 4096, 16384, 16384,
    ]
    # Decode on a 4096 x 8192 weight: 64 tiles of 64 columns cannot fill 132 SMs: split K in 4 (>= 4 blocks each).
    assert heuristic_config(1, 4096, 8192, 132) == GemmConfig(16, 64, 4, 5, split_k=4)
    assert heuristic_config(4096, 4096, 8192, 132).split_k == 1
    table = {"sm90": {(16, 4096, 8192): GemmConfig(16, 32, 4, 6, 2)}}
    assert select_config(table, 7, 4096, 8192, torch.device("cpu")) == heuristic_config(7, 4096, 8192, 8)


def test_registration_does_not_import_triton():
    if IN_INTERPRETER:
        pytest.skip("checked by the parent run")
    code = (
        "import sys; from seahal.hal.registry import REGISTRY; "
        "names = [k.qualified_name for k in REGISTRY.kernels_for('fp8_gemm')]; "
        "assert 'cuda.triton' in names, names; assert 'triton' not in sys.modules; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def test_interpreter_only_kernels_serve_gpu_plans_only_on_request(monkeypatch):
    """A kernel never run on a GPU is rejected for an sm90 plan (with the reason and the switch),
    accepted with SEAHAL_CUDA_UNVERIFIED=1 and under the interpreter (no chip); GPU-verified
    kernels are never gated."""
    from seahal.backends import cuda
    from seahal.hal import PlanContext
    from seahal.hal.registry import REGISTRY

    monkeypatch.delenv(cuda.UNVERIFIED_VARIABLE, raising=False)
    on_h100 = PlanContext("cuda", "sm90", {})
    kernels = {op: next(k for k in REGISTRY.kernels_for(op) if k.backend == "cuda") for op in cuda.KERNELS}
    for op, (_, _, gpu_verified) in cuda.KERNELS.items():
        why = kernels[op].rejection(on_h100)
        if gpu_verified:
            assert why is None, op
        else:
            assert why is not None and cuda.UNVERIFIED_VARIABLE in why, (op, why)
            assert kernels[op].rejection(PlanContext("cuda", None, {})) is None, op
    assert {op for op, (_, _, verified) in cuda.KERNELS.items() if verified} == {"fp8_gemm", "fp4_gemm", "moe_gate"}
    monkeypatch.setenv(cuda.UNVERIFIED_VARIABLE, "1")
    assert all(k.rejection(on_h100) is None for k in kernels.values())
