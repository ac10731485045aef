"""The cuda backend's ``grouped_linear`` (the FP8 GEMV, the tensor-core path and the one-launch
dequantisation) under the Triton interpreter and on a GPU, each judged by the conformance rule
(``seahal.testing.tolerances``) against a float64 brute force and against the reference in the
call's own dtype. Interpreter tests run in a subprocess with TRITON_INTERPRET=1 (see
test_cuda_interpret.py for why).
"""

from __future__ import annotations

import pytest
import torch

from seahal.backends.cpu.reference.linear import grouped_linear as reference
from seahal.hal.formats import dequantize_weight
from seahal.testing.tolerances import checks_for
from seahal.testing.triton_interpreter import require_triton

from cuda_marks import interpreted, on_gpu
from test_grouped_linear import BF16, F32, _check, _weight, _x

# -- the cuda kernels under the interpreter ------------------------------------------------------


def test_under_interpreter():
    require_triton()
    from seahal.testing import triton_interpreter

    run = triton_interpreter.rerun_test_file(__file__)
    assert run.passed(skipped=12), run.report  # itself and the GPU tests


@pytest.fixture(scope="module")
def linear():
    """The linear module, with the interpreter's bf16 dot fix (the tensor-core path's bf16 MMAs)."""
    from seahal.backends.cuda import linear
    from seahal.testing import triton_interpreter

    with triton_interpreter.bf16_dot_fix():
        yield linear


CASES = [  # (leading dims, G, R, I, x dtype, scale format): V4's wo_a in proportion, and the edges
    ((1, 1), 8, 128, 512, BF16, "e8m0"),  # decode, one sequence: 8 groups as V4-Flash
    ((2, 1), 4, 64, 256, BF16, "fp32"),  # two sequences; groups share a scale block; W rounded to bf16
    ((3,), 2, 96, 384, F32, "e8m0"),  # three tokens in a 4-token block; groups straddle scale blocks
    ((4,), 3, 40, 128, F32, "fp32"),  # the most tokens the GEMV takes; R = 40 (8-row programs)
    ((5, 1), 4, 128, 256, BF16, "e8m0"),  # a decode batch on the tensor cores: 16-token blocks, 64-row programs
    ((2, 33), 2, 64, 384, BF16, "fp32"),  # 66 tokens of a prefill: beyond the tensor-core path
    ((9,), 2, 128, 128, F32, "e8m0"),  # fp32 x beyond the GEMV: dequantised in one launch, then the batched GEMM
]


@interpreted
@pytest.mark.parametrize("lead, g, r, i, dtype, scale_fmt", CASES)
def test_kernel_matches_brute_force_and_reference(linear, lead, g, r, i, dtype, scale_fmt):
    x, (w, s) = _x(lead, g, i, dtype, r), _weight(g * r, i, scale_fmt, r)
    out = linear.grouped_linear(x, w, s)
    _check(x, w, s, out)
    for compared in checks_for("grouped_linear", (x, w, s)):
        assert compared.check.compare(out, reference(x, w, s)).ok


@interpreted
@pytest.mark.parametrize("tokens", [2, 8, 70])
def test_kernel_weight_is_the_official_bf16_weight(linear, tokens):
    """Each path (the GEMV at 2 tokens, the tensor cores at 8, the dequantising launch at 70): with
    fp32 scales W' = bf16(e4m3 x s) (what the official code installs), which the rule's
    weight term would also allow unrounded: against the reference in bf16 (the same products, in
    another order) all but a few outputs must be the same bf16 value; an unrounded W' moves the
    sums by ~2^-9 relative and changes about a quarter of them."""
    x, (w, s) = _x((tokens,), 4, 512, BF16, 5), _weight(4 * 64, 512, "fp32", 5)
    same = (linear.grouped_linear(x, w, s) == reference(x, w, s)).float().mean()
    assert same >= 0.97, f"{same:.3f} of the outputs equal the reference's"


@interpreted
@pytest.mark.parametrize("tokens", [1, 20])
@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_split_k_sums_the_same_products_in_a_fixed_order(linear, tokens, split_k):
    """Every K split of the GEMV (1 token) and of the tensor-core path (20 tokens: two token
    blocks) gives the product within the rule, and the same bits each launch: the last split to
    arrive sums the partials in split order (the counters reset for the next launch)."""
    x, (w, s) = _x((tokens,), 4, 512, BF16, 3), _weight(512, 512, "e8m0", 3)
    first = linear.grouped_linear(x, w, s, split_k=split_k)
    _check(x, w, s, first)
    assert torch.equal(first, linear.grouped_linear(x, w, s, split_k=split_k))


@interpreted
@pytest.mark.parametrize("tokens, dtype, rows, weight, path", [
    (1, BF16, 128, "fp8", ["gemv"]), (4, F32, 128, "fp8", ["gemv"]), (5, BF16, 128, "fp8", ["mma"]),
    (64, BF16, 128, "fp8", ["mma"]), (65, BF16, 128, "fp8", ["dequantize"]), (5, F32, 128, "fp8", ["dequantize"]),
    (5, BF16, 96, "fp8", ["dequantize"]), (1, BF16, 128, "bf16", []), (3, BF16, 128, "fp32", []),
])
def test_token_count_and_weight_format_pick_the_path(linear, monkeypatch, tokens, dtype, rows, weight, path):
    """The FP8 GEMV up to 4 tokens; a bf16 decode batch up to 64 tokens on the tensor cores (R a
    multiple of their 64-row programs); beyond, or with fp32 x, one dequantising launch and cuBLAS;
    dense weights go straight to the batched GEMM (no Triton launch)."""
    ran = []
    for name, kernel in (("gemv", linear._grouped_gemv_kernel), ("mma", linear._grouped_mma_kernel),
                         ("dequantize", linear._dequantize_kernel)):
        run = kernel.run
        monkeypatch.setattr(kernel, "run", lambda *a, name=name, run=run, **k: ran.append(name) or run(*a, **k))
    x = _x((tokens,), 2, 128, dtype, tokens)
    w, s = _weight(2 * rows, 128, "e8m0", tokens)
    if weight != "fp8":
        w, s = dequantize_weight(w, s, BF16 if weight == "bf16" else F32), None
    _check(x, w, s, linear.grouped_linear(x, w, s))
    assert ran == path


@interpreted
def test_gemv_rows_are_one_groups(linear):
    """A program's rows never cross a group: 32 rows at one token, fewer where R needs it."""
    assert [linear.grouped_rows(1, r) for r in (1024, 96, 40, 7)] == [32, 32, 8, 1]
    assert [linear.grouped_rows(t, 1024) for t in (1, 2, 3, 4)] == [32, 16, 8, 8]


@interpreted
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("scale_fmt", ["e8m0", "fp32"])
def test_dequantize_is_the_formats_dequantisation_bit_for_bit(linear, dtype, scale_fmt):
    """Rows not a multiple of the 32-row programs or of the 128-row scale blocks."""
    w, s = _weight(200, 256, scale_fmt, 4)
    got = linear.dequantize_fp8_weight(w, s, dtype)
    assert torch.equal(got.view(torch.int16 if dtype == BF16 else torch.int32),
                       dequantize_weight(w, s, dtype).view(torch.int16 if dtype == BF16 else torch.int32))


# -- on a GPU -------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("lead, g, r, i, dtype, scale_fmt", CASES + [
    ((1, 1), 8, 1024, 4096, BF16, "e8m0"),  # V4-Flash's wo_a at decode (8192 x 4096, 32 MB in FP8)
    ((4, 1), 16, 1024, 4096, BF16, "e8m0"),  # V4-Pro's, four sequences
    ((64, 1), 8, 1024, 4096, BF16, "e8m0"),  # V4-Flash's, a decode batch of 64 on the tensor cores
    ((1, 512), 8, 1024, 4096, BF16, "fp32"),  # a prefill chunk
])
def test_gpu_matches_brute_force_and_reference(lead, g, r, i, dtype, scale_fmt):
    from seahal.backends.cuda import linear

    x, (w, s) = _x(lead, g, i, dtype, r, "cuda"), _weight(g * r, i, scale_fmt, r, "cuda")
    out = linear.grouped_linear(x, w, s)
    _check(x, w, s, out)
    for compared in checks_for("grouped_linear", (x, w, s)):
        assert compared.check.compare(out.cpu(), reference(x.cpu(), w.cpu(), s.cpu())).ok
