"""The cuda backend's Triton GEMMs on a real GPU, through a plan, against the CPU reference kernel.

Skipped without a CUDA device (CI); run on the device machine. The reference kernel is portable,
so it runs on the same GPU tensors.
"""

from __future__ import annotations

import pytest
import torch

from seahal.testing.triton_interpreter import require_triton

require_triton()
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from seahal import hal  # noqa: E402
from seahal.backends.cpu.reference import gemm as reference  # noqa: E402
from seahal.hal.formats import fp4_quantize, fp8_quantize, ue8m0_encode  # noqa: E402
from seahal.backends.cuda._gemm import GemmConfig  # noqa: E402
from seahal.backends.cuda.fp8_gemm import launch_fp8_gemm  # noqa: E402
from seahal.bench.cuda_gemm import fp8_weight  # noqa: E402

BF16_TOL = 2**-8
"""bf16 output: 8 significant bits, each element within 2^-9 relative of its fp32 value."""
FP32_TOL = 1e-3
"""fp32 output: Hopper's FP8 tensor cores accumulate each 128-term block product with only ~14
significant bits (DeepSeek-V3 report, §3.3.2; DeepGEMM has the same per-block promotion), so the
error is ~2^-13..2^-11 relative, not fp32's 2^-24."""


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def plan():
    p = hal.plan("cuda", ops=["fp8_gemm", "fp4_gemm"], announce=False)
    assert p["fp8_gemm"].kernel.qualified_name == "cuda.triton", p.table()
    assert p["fp4_gemm"].kernel.qualified_name == "cuda.triton", p.table()
    return p


@pytest.mark.parametrize("m, n, k", [(1, 4096, 8192), (33, 200, 512), (300, 1024, 1024), (4100, 768, 2048)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float8_e8m0fnu])
def test_fp8_gemm_plan(plan, m, n, k, scale_dtype):
    torch.manual_seed(m + n)
    a, a_scale = fp8_quantize(torch.randn(m, k, device="cuda"), 128)
    b, b_scale = fp8_weight(-(-n // 128) * 128, k, torch.device("cuda"))
    b, b_scale = b[:n].contiguous(), b_scale
    if scale_dtype != torch.float32:
        b_scale = ue8m0_encode(b_scale).view(scale_dtype)
    ref = reference.fp8_gemm(a, a_scale, b, b_scale, torch.float32)
    err_bf16 = _rel(plan.ops.fp8_gemm(a, a_scale, b, b_scale), ref)
    err_fp32 = _rel(plan.ops.fp8_gemm(a, a_scale, b, b_scale, torch.float32), ref)
    assert err_bf16 < BF16_TOL and err_fp32 < FP32_TOL, (err_bf16, err_fp32)


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("n, k", [(1536, 4096), (40960, 1024), (4096, 8192)])  # [wq_a; wkv], [wq_b; idx wq_b], wo_b
def test_act_quant_gemm_is_the_quantiser_then_the_gemm(m, n, k):
    """act_quant_gemm at V4-Flash's linears: up to FUSED_QUANT_ROWS rows the GEMM quantises x
    itself; every M gives the bits of the plan's fp8_act_quant then its fp8_gemm."""
    p = hal.plan("cuda", ops=["act_quant_gemm", "fp8_act_quant", "fp8_gemm"], announce=False)
    assert {e.label for e in p.entries.values()} == {"cuda.triton"}, p.table()
    torch.manual_seed(m + n)
    x = (torch.randn(m, k, device="cuda") * torch.randn(m, k // 128, device="cuda").exp().repeat_interleave(128, 1))
    x = x.to(torch.bfloat16)
    b, b_scale = fp8_weight(n, k, torch.device("cuda"))
    out = p.ops.act_quant_gemm(x, b, b_scale)
    assert torch.equal(out, p.ops.fp8_gemm(*p.ops.fp8_act_quant(x), b, b_scale))
    assert _rel(out, reference.act_quant_gemm(x, b, b_scale, torch.float32)) < BF16_TOL


def test_fp8_split_k_is_deterministic():
    torch.manual_seed(0)
    a, a_scale = fp8_quantize(torch.randn(16, 8192, device="cuda"), 128)
    b, b_scale = fp8_weight(4096, 8192, torch.device("cuda"))
    runs = []
    for split in (8, 8, 1):
        out = torch.full((16, 4096), float("nan"), device="cuda")
        runs.append(launch_fp8_gemm(a, a_scale, b, b_scale, out, GemmConfig(16, 64, 4, 5, split)))
    assert torch.equal(runs[0], runs[1])  # fixed-order reduction of the K splits
    assert _rel(runs[0], runs[2]) < 1e-6  # fp32 sums of the same block products, another order


@pytest.mark.parametrize("block_m, block_n, split_k", [(16, 64, 1), (64, 128, 2), (128, 128, 1)])
def test_fp8_tma_matches_pointer_loads(block_m, block_n, split_k):
    torch.manual_seed(block_m)
    a, a_scale = fp8_quantize(torch.randn(70, 1024, device="cuda"), 128)
    b, b_scale = fp8_weight(384, 1024, torch.device("cuda"))
    b = b[:200]  # edge tiles in both M and N
    outs = []
    for tma in (False, True):
        out = torch.full((70, 200), float("nan"), device="cuda")
        outs.append(launch_fp8_gemm(a, a_scale, b, b_scale, out, GemmConfig(block_m, block_n, 4, 3, split_k, tma=tma)))
    assert not outs[1].isnan().any()
    assert _rel(outs[1], outs[0]) < 1e-6  # same block products and scales


@pytest.mark.parametrize("op, block_m, block_n, warps, split_k, tma", [
    ("fp8_gemm", 64, 128, 4, 1, True), ("fp8_gemm", 128, 128, 8, 1, False), ("fp8_gemm", 64, 64, 4, 2, False),
    ("fp4_gemm", 64, 128, 4, 1, False), ("fp4_gemm", 128, 128, 8, 1, False),
])
def test_persistent_launch_is_bitwise_equal(op, block_m, block_n, warps, split_k, tma):
    """A persistent grid runs the same tile code, >= 2 tiles per program at 2000 x 2000 (edge tiles
    in both): the same bits as one program per tile."""
    from seahal.backends.cuda.fp4_gemm import launch_fp4_gemm

    torch.manual_seed(block_n)
    m, n, k = 2000, 2000, 1024
    a, a_scale = fp8_quantize(torch.randn(m, k, device="cuda"), 128)
    if op == "fp8_gemm":
        b, b_scale = fp8_weight(2048, k, torch.device("cuda"))
        b, launch = b[:n], launch_fp8_gemm
    else:
        b, b_scale = fp4_quantize(torch.randn(n, k, device="cuda"))
        launch = launch_fp4_gemm
    outs = []
    for persistent in (0, 1):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        config = GemmConfig(block_m, block_n, warps, 3, split_k, tma=tma, persistent=persistent)
        outs.append(launch(a, a_scale, b, b_scale, out, config))
    assert not outs[1].isnan().any()
    assert torch.equal(outs[1], outs[0])



@pytest.mark.parametrize("block_n, stages", [(128, 4), (64, 6)])
@pytest.mark.parametrize("scale_dtype, out_dtype", [(torch.float32, torch.bfloat16), (torch.float8_e8m0fnu, torch.float32)])
def test_pingpong_gemm_is_the_triton_product(block_n, stages, scale_dtype, out_dtype):
    """The Gluon ping-pong kernel forms the same K-block products (wgmma m64nBLOCK_Nk32, four a
    block, one warpgroup per 64 rows) and promotes them with the same multiply-add as the Triton
    kernel's 128-row tiles: the same bits, here with edge tiles in M and N and 8 K blocks through
    fewer slots (each reused); and within the output format of the reference."""
    torch.manual_seed(block_n)
    m, n, k = 2000, 1000, 1024
    a, a_scale = fp8_quantize(torch.randn(m, k, device="cuda"), 128)
    b, b_scale = fp8_weight(1024, k, torch.device("cuda"))
    b = b[:n]
    if scale_dtype != torch.float32:
        b_scale = ue8m0_encode(b_scale).view(scale_dtype)
    outs = []
    for config in (GemmConfig(128, block_n, 8, 3, tma=True), GemmConfig(128, block_n, 4, stages, pingpong=True)):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=out_dtype)
        outs.append(launch_fp8_gemm(a, a_scale, b, b_scale, out, config))
    assert not outs[1].isnan().any()
    assert torch.equal(outs[1], outs[0])
    ref = reference.fp8_gemm(a, a_scale, b, b_scale, torch.float32)
    assert _rel(outs[1], ref) < (BF16_TOL if out_dtype == torch.bfloat16 else FP32_TOL)

@pytest.mark.parametrize("m, n, k", [(1, 2048, 4096), (70, 4096, 2048), (1000, 512, 1024)])
def test_fp4_gemm_plan(plan, m, n, k):
    torch.manual_seed(m)
    a, a_scale = fp8_quantize(torch.randn(m, k, device="cuda"), 128)
    b, b_scale = fp4_quantize(torch.randn(n, k, device="cuda"))
    b_scale = ue8m0_encode(b_scale).view(torch.float8_e8m0fnu)
    ref = reference.fp4_gemm(a, a_scale, b, b_scale, torch.float32)
    err_bf16 = _rel(plan.ops.fp4_gemm(a, a_scale, b, b_scale), ref)
    err_fp32 = _rel(plan.ops.fp4_gemm(a, a_scale, b, b_scale, torch.float32), ref)
    assert err_bf16 < BF16_TOL and err_fp32 < 1e-5, (err_bf16, err_fp32)  # bf16 MMA: exact products, fp32 sums


@pytest.mark.parametrize("block_m, block_n, warps, split_k", [(16, 64, 4, 8), (64, 128, 4, 1), (128, 128, 8, 1)])
@pytest.mark.parametrize("binades", [10, 40])
def test_fp4_mx_form(block_m, block_n, warps, split_k, binades):
    """``fp4_mx`` (``tl.dot_scaled``) and the bf16 decode (the committed tables' form): both form
    exact products and sum them in fp32, so each is the float64-exact reference's to fp32
    accumulation order, with 1x32 group scales over 2^±5 and 2^±20."""
    from seahal.backends.cuda.fp4_gemm import launch_fp4_gemm

    torch.manual_seed(binades + block_m)
    m, n, k = 300, 1000, 2048
    a, a_scale = fp8_quantize(torch.randn(m, k, device="cuda"), 128)
    half = binades // 2
    groups = torch.exp2(torch.randint(-half, half + 1, (n, k // 32), device="cuda").float()).repeat_interleave(32, 1)
    b, b_scale = fp4_quantize(torch.randn(n, k, device="cuda") * groups)
    b_scale = ue8m0_encode(b_scale).view(torch.float8_e8m0fnu)
    ref = reference.fp4_gemm(a, a_scale, b, b_scale, torch.float32)
    for mx in (False, True):
        out = torch.full((m, n), float("nan"), device="cuda")
        launch_fp4_gemm(a, a_scale, b, b_scale, out, GemmConfig(block_m, block_n, warps, 3, split_k, fp4_mx=mx))
        assert not out.isnan().any()
        assert _rel(out, ref) < 1e-5, mx
