"""The cuda backend's Triton GEMMs, run by the Triton interpreter on CPU tensors.

The kernels are checked against two independent figures: the CPU reference kernel (same
per-block fp32 accumulation, different code) and a float64 product of the dequantised operands.
Triton reads TRITON_INTERPRET when it is imported and when each kernel is decorated, so in a
normal pytest run ``test_under_interpreter`` runs this file again in a subprocess with the
variable set; the kernel tests run there (and are skipped in the parent). Other test files never
see the variable.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from seahal.testing.triton_interpreter import require_triton

triton = require_triton()

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

from cuda_marks import IN_INTERPRETER, interpreted  # noqa: E402


def test_under_interpreter():
    run = triton_interpreter.rerun_test_file(__file__)
    assert run.passed(skipped=2), run.report


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


# (block_m, block_n, split_k, persistent, tma): the decode tiles with and without K splits, an N edge
# tile, a persistent grid, and a TMA config (the quantising launch loads through pointers instead).
QUANTISING_CONFIGS = [(16, 64, 1, 0, False), (16, 32, 3, 0, False), (16, 128, 2, 1, False), (16, 64, 2, 0, True)]


@interpreted
@pytest.mark.parametrize("block_m, block_n, split_k, persistent, tma", QUANTISING_CONFIGS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_quantising_fp8_gemm_is_the_two_launches_bit_for_bit(kernels, block_m, block_n, split_k, persistent, tma,
                                                             x_dtype):
    """act_quant_gemm's one launch (the GEMM quantising x's blocks as it loads them) gives the bits
    of fp8_act_quant's kernel then the GEMM under the same config, and the reference's numbers."""
    from seahal.backends.cuda._gemm import GemmConfig
    from seahal.backends.cuda.quant import fp8_act_quant

    fp8, _ = kernels
    gen = torch.Generator().manual_seed(block_n + split_k)
    m, n, k = 5, 200, 384
    x = (torch.randn(m, k, generator=gen) * torch.exp(3 * torch.randn(m, k // 128, generator=gen)).repeat_interleave(
        128, 1)).to(x_dtype)
    x[1, 128:256] = 0  # an all-zero block: the 1e-4 amax floor
    x[2, :128] *= 1e30 if x_dtype == torch.float32 else 1e20  # a block far above e4m3's range
    b, b_scale = _fp8_weight(n, k, gen)
    config = GemmConfig(block_m, block_n, 4, 2, split_k, tma=tma, persistent=persistent)
    fused, unfused = torch.full((m, n), float("nan")), torch.full((m, n), float("nan"))
    fp8.launch_fp8_gemm(x, None, b, b_scale, fused, config)
    fp8.launch_fp8_gemm(*fp8_act_quant(x), b, b_scale, unfused, config)
    assert torch.equal(fused, unfused)
    assert _rel(fused, reference.act_quant_gemm(x, b, b_scale, torch.float32)) < FP32_TOL


@interpreted
@pytest.mark.parametrize("m", [1, 16, 17])
def test_act_quant_gemm_launches(kernels, m, monkeypatch):
    """Up to FUSED_QUANT_ROWS rows with FP8 weights one launch quantises x in the GEMM; more rows,
    FP4 weights and fp64 x quantise first: each the two launches' bits, in the contract's shape."""
    from seahal.backends.cuda import _gemm, fp4_gemm
    from seahal.backends.cuda.quant import fp8_act_quant

    fp8, _ = kernels
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=gen).to(torch.bfloat16)
    b, b_scale = _fp8_weight(130, 256, gen)
    b_scale = ue8m0_encode(b_scale).view(torch.float8_e8m0fnu)
    b4, b4_scale = fp4_quantize(torch.randn(64, 256, generator=gen))
    launched = []
    monkeypatch.setattr(fp8, "launch", lambda kernel, a, a_scale, *rest: launched.append(a_scale is None)
                        or _gemm.launch(kernel, a, a_scale, *rest))
    out = fp8.act_quant_gemm(x, b, b_scale)
    assert launched == [m <= fp8.FUSED_QUANT_ROWS]
    assert get_spec("act_quant_gemm").check(x, b, b_scale) == (tuple(out.shape), out.dtype)
    assert torch.equal(out, fp8.fp8_gemm(*fp8_act_quant(x), b, b_scale))
    assert torch.equal(fp8.act_quant_gemm(x, b4, b4_scale, torch.float32),
                       fp4_gemm.fp4_gemm(*fp8_act_quant(x), b4, b4_scale, torch.float32))
    x64 = x.double()
    assert torch.equal(fp8.act_quant_gemm(x64, b, b_scale), fp8.fp8_gemm(*fp8_act_quant(x64), b, b_scale))


@interpreted
@pytest.mark.parametrize("block_n, split_k, e8m0", [(32, 1, False), (16, 3, True), (64, 2, True), (64, 1, False)])
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
def test_fp4_gemm_reads_codes_as_words_only_from_aligned_rows(kernels, monkeypatch):
    """Weights first with e8m0 scales, B's codes load as 4-byte words where every row starts 4-byte
    aligned, else a byte at a time (rows of 191 bytes here): both the exact products, summed in
    other orders."""
    _, fp4 = kernels
    from seahal.backends.cuda._gemm import GemmConfig

    gen = torch.Generator().manual_seed(11)
    m, n, k = 3, 24, 384
    a, a_scale = _activation(m, k, gen)
    b, b_scale = fp4_quantize(torch.randn(n, k, generator=gen))
    b_scale = ue8m0_encode(b_scale).view(torch.float8_e8m0fnu)
    padded = torch.zeros(n, k // 2 + 1, dtype=torch.uint8)
    padded[:, 1:] = b
    kernel, words = fp4._fp4_gemm_kernel, []
    spy = type("Spy", (), {"__getitem__": lambda _, grid: lambda *args, **kw: words.append(kw.get("FP4_WORDS", False))
                           or kernel[grid](*args, **kw), "arg_names": kernel.arg_names})()
    monkeypatch.setattr(fp4, "_fp4_gemm_kernel", spy)
    ref64 = fp8_dequantize(a, a_scale, 128, torch.float64) @ fp4_dequantize(b, b_scale, 32, torch.float64).T
    for codes, as_words in ((b, True), (padded[:, 1:], False)):
        out = torch.full((m, n), float("nan"))
        fp4.launch_fp4_gemm(a, a_scale, codes, b_scale, out, GemmConfig(16, 64, 4, 2, 1))
        assert words[-1] == as_words
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


def _fp4_weight_spread(n: int, k: int, binades: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 weight [N, K] with e8m0 1x32 scales whose groups' magnitudes span ``binades`` (2^±binades/2)."""
    half = binades // 2
    spread = torch.exp2(torch.randint(-half, half + 1, (n, k // 32), generator=gen).float()).repeat_interleave(32, 1)
    b, scale = fp4_quantize(torch.randn(n, k, generator=gen) * spread)
    return b, ue8m0_encode(scale).view(torch.float8_e8m0fnu)


@interpreted
@pytest.mark.parametrize("binades", [10, 40])
@pytest.mark.parametrize("split_k", [1, 2])
def test_fp4_gemm_mx_form_is_the_bf16_form(kernels, binades, split_k):
    """``fp4_mx``: ``tl.dot_scaled`` on the e2m1 codes and e8m0 scales (the product formed
    transposed, weight rows first) and the bf16 decode sum the same exact products in fp32: equal
    to each other and to the float64 product up to fp32 accumulation order (FP32_TOL), with group
    scales spread over 2^±5 and 2^±20; an e8m0 NaN scale (255) makes its output column NaN in both."""
    _, fp4 = kernels
    from seahal.backends.cuda._gemm import GemmConfig

    gen = torch.Generator().manual_seed(split_k)
    m, n, k = 37, 96, 512
    a, a_scale = _activation(m, k, gen)
    b, b_scale = _fp4_weight_spread(n, k, binades, gen)
    b_scale.view(torch.uint8)[5, 3] = 255
    out = {}
    for mx in (False, True):
        out[mx] = torch.full((m, n), float("nan"))
        fp4.launch_fp4_gemm(a, a_scale, b, b_scale, out[mx], GemmConfig(16, 32, 4, 2, split_k, fp4_mx=mx))
    nan_column = torch.arange(n) == 5
    for mx in (False, True):
        assert out[mx][:, nan_column].isnan().all() and not out[mx][:, ~nan_column].isnan().any()
    assert _rel(out[True][:, ~nan_column], out[False][:, ~nan_column]) < FP32_TOL
    ref64 = fp8_dequantize(a, a_scale, 128, torch.float64) @ fp4_dequantize(b, b_scale, 32, torch.float64).T
    assert _rel(out[True][:, ~nan_column], ref64[:, ~nan_column]) < FP32_TOL


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
    """The gate for a kernel never run on a GPU rejects an sm90 plan (with the reason and the
    switch) and accepts one with SEAHAL_CUDA_UNVERIFIED=1 or under the interpreter (no chip); the
    kernels marked GPU-verified are never gated."""
    from seahal.backends import cuda
    from seahal.hal import PlanContext
    from seahal.hal.registry import REGISTRY

    monkeypatch.delenv(cuda.UNVERIFIED_VARIABLE, raising=False)
    on_h100, interpreted = PlanContext("cuda", "sm90", {}), PlanContext("cuda", None, {})
    why = cuda._verified_or_opted_in(on_h100)
    assert why is not None and cuda.UNVERIFIED_VARIABLE in why
    assert cuda._verified_or_opted_in(interpreted) is None
    kernels = {op: next(k for k in REGISTRY.kernels_for(op) if k.qualified_name == "cuda.triton") for op in cuda.KERNELS}
    for op, (_, _, gpu_verified) in cuda.KERNELS.items():
        if gpu_verified:
            assert kernels[op].rejection(on_h100) is None, op
        else:
            assert cuda.UNVERIFIED_VARIABLE in (kernels[op].rejection(on_h100) or ""), op
            assert kernels[op].rejection(interpreted) is None, op
    # every kernel passed the conformance suite on the H100 at 14a3a20 (docs/measurements/2026-11-27-h100)
    # but grouped_linear, written since, the FP4 decodes changed since to read codes as words, and
    # the kernels whose arrival counters reset relaxed since (and the mHC mix's one-trip tail), and
    # rms_norm_rope's one pass and act_quant_gemm's quantising GEMM, written since, and moe_gate,
    # whose logits over an fp32 W now take W's three bf16 parts on the tensor cores, and the
    # attention, whose store rotates the output back when given positions, and hc_post, which adds
    # the sub-layer output's two parts as it reads them, and kv_cache_store and index_key_store,
    # written since, and hadamard_rotate, which rotates the indexer query's RoPE dims first, and
    # hc_post_pre and kv_compress_store, written since, and the indexers, which scale their head
    # weights and offset their picks since
    assert {op for op, (_, _, verified) in cuda.KERNELS.items() if not verified} == {
        "grouped_linear", "moe_experts", "fp4_gemm", "indexer_topk_packed", "fp8_gemm", "kv_compress",
        "kv_compress_fp8", "hc_pre", "hc_head", "rms_norm_rope", "act_quant_gemm", "moe_gate",
        "sparse_attention", "sparse_attention_fp8", "hc_post", "kv_cache_store", "index_key_store",
        "hadamard_rotate", "hc_post_pre", "kv_compress_store", "indexer_topk"}
    # a fused op's verified kernels in turn serve where its one pass is gated (not the reference)
    for op in cuda.UNFUSED_KERNELS:
        unfused = next(k for k in REGISTRY.kernels_for(op) if k.qualified_name == "cuda.triton_unfused")
        assert unfused.rejection(on_h100) is None and unfused.priority < kernels[op].priority, op
    monkeypatch.setenv(cuda.UNVERIFIED_VARIABLE, "1")
    assert cuda._verified_or_opted_in(on_h100) is None
    assert all(k.rejection(on_h100) is None for k in kernels.values())


def test_weights_of_an_unserved_kernel_are_converted_at_load(monkeypatch):
    """While grouped_linear's FP8 kernel does not serve a GPU plan (not yet verified, no opt-in),
    the plan dequantises wo_a at load as before the op (its fallback then reads bf16); under the
    interpreter or with SEAHAL_CUDA_UNVERIFIED=1 the kernel serves and the FP8 bytes stay."""
    from seahal.backends import cuda

    monkeypatch.delenv(cuda.UNVERIFIED_VARIABLE, raising=False)
    assert not cuda.KERNELS["grouped_linear"][2]  # verified: this test's conversions become {}
    assert cuda._weight_conversions("sm90") == {"grouped_linear": "bfloat16"}
    assert cuda._weight_conversions(None) == {}
    monkeypatch.setenv(cuda.UNVERIFIED_VARIABLE, "1")
    assert cuda._weight_conversions("sm90") == {}
    monkeypatch.setitem(cuda.KERNELS, "grouped_linear", (*cuda.KERNELS["grouped_linear"][:2], True))
    monkeypatch.delenv(cuda.UNVERIFIED_VARIABLE)
    assert cuda._weight_conversions("sm90") == {}


def test_outgrown_arrival_counters_stay_alive():
    """A call that needs more counters than the stream's buffer holds gets a new buffer; the old one
    is never freed, since a CUDA graph captured on it keeps no reference and may replay on it."""
    import gc
    import weakref

    from seahal.backends.cuda._gemm import arrival_counters

    device = torch.device("cpu")
    old = arrival_counters(8, device)
    alive = weakref.ref(old)
    grown = arrival_counters(old.numel() + 1, device)
    assert grown.numel() > old.numel() and not grown.any()
    assert arrival_counters(8, device) is grown  # the larger buffer serves every smaller call after
    del old
    gc.collect()
    assert alive() is not None
