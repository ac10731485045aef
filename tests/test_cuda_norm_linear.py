"""The cuda backend's dense helpers around the model's layers: RMSNorm (``rms_norm``) and the
fp32 linear layers of the head and the compressors (``fp32_linear``), under the Triton interpreter
and on a GPU.

Each against a float64 brute force of its formula within the conformance rule
(``seahal.testing.tolerances``) and against the CPU reference. Interpreter tests run in a
subprocess with TRITON_INTERPRET=1 (see test_cuda_interpret.py for why).
"""

from __future__ import annotations

import pytest
import torch

from seahal.testing.triton_interpreter import require_triton

triton = require_triton()

from seahal.backends.cpu.reference.norm import rms_norm as reference  # noqa: E402
from seahal.testing import triton_interpreter  # noqa: E402
from seahal.testing.tolerances import checks_for  # noqa: E402

from cuda_marks import interpreted, on_gpu  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16


def test_under_interpreter():
    run = triton_interpreter.rerun_test_file(__file__)
    assert run.passed(skipped=17), run.report  # itself and the GPU tests


@pytest.fixture(scope="module")
def norm():
    from seahal.backends.cuda import norm

    return norm


@pytest.fixture(scope="module")
def linear():
    """The linear module, with the interpreter's bf16 dot fix (the split-x kernel's bf16 MMAs)."""
    from seahal.backends.cuda import linear

    with triton_interpreter.bf16_dot_fix():
        yield linear


# -- rms_norm ----------------------------------------------------------------------------------


def _brute_force(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xd = x.double()
    y = xd / torch.sqrt((xd * xd).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return y * weight.double() if weight is not None else y


def _check_norm(x: torch.Tensor, weight: torch.Tensor | None, out: torch.Tensor) -> None:
    assert out.shape == x.shape and out.dtype == x.dtype
    for compared in checks_for("rms_norm", (x, weight, 1e-6)):
        verdict = compared.check.compare(out, _brute_force(x, weight, 1e-6))
        assert verdict.ok, f"rms_norm {compared.label}: {verdict.detail}"


def _rows(lead: tuple[int, ...], d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """N(0, 1) rows, each times a magnitude in 2^-8..2^8."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-8, 9, (*lead, 1), generator=gen).float())
    return (torch.randn(*lead, d, generator=gen) * scale).to(dtype)


SHAPES = [  # (leading dims, D, dtype, weighted): the model's norms and the kernel's edges
    ((1,), 4096, BF16, True),  # attn / ffn norm at decode, V4-Flash
    ((3, 7), 1024, BF16, True),  # q norm (q_lora 1024), several tokens
    ((2, 3, 64), 512, BF16, False),  # per-head q norm: 64 heads of 512, unweighted (8 rows a program)
    ((1,), 7168, F32, True),  # V4-Pro dim, fp32 model
    ((9,), 5, F32, False),  # odd width: masked lanes
    ((33,), 96, BF16, True),  # row count not a multiple of the rows per program
]


@interpreted
@pytest.mark.parametrize("lead, d, dtype, weighted", SHAPES)
def test_norm_matches_brute_force_and_reference(norm, lead, d, dtype, weighted):
    x = _rows(lead, d, dtype, seed=d)
    weight = torch.rand(d, generator=torch.Generator().manual_seed(1)) + 0.5 if weighted else None
    out = norm.rms_norm(x, weight, 1e-6)
    _check_norm(x, weight, out)
    for compared in checks_for("rms_norm", (x, weight, 1e-6)):
        assert compared.check.compare(out, reference(x, weight, 1e-6)).ok


@interpreted
def test_norm_strided_rows_and_zero_rows(norm):
    """A transposed view (last dim not unit stride) is copied once; an all-zero row gives zeros
    (eps alone under the root), not NaN."""
    x = _rows((4,), 64, BF16, seed=3).T.contiguous().T
    x[1] = 0
    assert x.stride(-1) != 1
    out = norm.rms_norm(x, None, 1e-6)
    _check_norm(x, None, out)
    assert not out[1].any() and not out.isnan().any()


@interpreted
@pytest.mark.parametrize("lead", [(2, 3), (1, 5), (3, 1)])
def test_norm_of_heads_sliced_from_wider_rows_reads_them_in_place(norm, monkeypatch, lead):
    """Per-head rows of a column slice of wider rows ([..., :H*D] of [..., H*D + more], viewed as
    [..., H, D]: the attention's query heads from a stacked projection) do not flatten to one row
    stride; the kernel reads them at two strides instead of through a copy: the same bits as the
    norm of the contiguous copy."""
    wide = _rows(lead, 4 * 64 + 96, BF16, seed=sum(lead))
    heads = wide[..., : 4 * 64].view(*lead, 4, 64)
    copies = []
    contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(t.shape) or contiguous(t, *a, **k))
    out = norm.rms_norm(heads, None, 1e-6)
    assert copies == []
    monkeypatch.undo()
    assert torch.equal(out, norm.rms_norm(heads.contiguous(), None, 1e-6))
    _check_norm(heads, None, out)


@interpreted
def test_norm_refuses_what_it_does_not_compute(norm):
    with pytest.raises(NotImplementedError, match="float64 runs on the reference"):
        norm.rms_norm(torch.ones(2, 8, dtype=torch.float64), None, 1e-6)
    with pytest.raises(NotImplementedError, match="at most 16384"):
        norm.rms_norm(torch.ones(1, 16385), None, 1e-6)


@on_gpu
@pytest.mark.parametrize("lead, d, dtype, weighted", SHAPES + [((4096,), 4096, BF16, True)])
def test_gpu_norm_matches_brute_force(lead, d, dtype, weighted):
    from seahal.backends.cuda import norm

    x = _rows(lead, d, dtype, seed=d).cuda()
    weight = (torch.rand(d, generator=torch.Generator().manual_seed(1)) + 0.5).cuda() if weighted else None
    _check_norm(x.cpu(), None if weight is None else weight.cpu(), norm.rms_norm(x, weight, 1e-6).cpu())


# -- fp32_linear -------------------------------------------------------------------------------


def _inputs(lead: tuple[int, ...], d: int, v: int, dtype, weight_dtype, device="cpu"):
    g = torch.Generator().manual_seed(d + v)
    x = torch.randn(*lead, d, generator=g).to(dtype)
    return x.to(device), (torch.randn(v, d, generator=g) * d**-0.5).to(weight_dtype).to(device)


def _check_logits(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    assert out.dtype == F32 and out.shape == (*x.shape[:-1], w.shape[0])
    want = x.double() @ w.double().T
    for compared in checks_for("fp32_linear", (x, w)):
        verdict = compared.check.compare(out, want)
        assert verdict.ok, f"fp32_linear {compared.label}: {verdict.detail}"


CASES = [  # (leading dims, D, V, x dtype, weight dtype)
    ((1, 1), 512, 200, F32, BF16),  # decode, GEMV: few rows, one program per 4, 1024 columns a step
    ((2,), 40, 8200, F32, BF16),  # many rows: one program per 16, the last partial
    ((2, 1), 300, 64, BF16, BF16),  # two sequences; D not a multiple of the 128-wide steps
    ((3,), 256, 33, F32, F32),  # three tokens in a 4-token block; an fp32 W
    ((4,), 100, 17, F32, BF16),  # the most tokens the GEMV takes
    ((5, 1), 200, 150, F32, BF16),  # split x on the tensor cores: a 16-token block, 64-row blocks
    ((100,), 130, 70, F32, BF16),  # two token blocks of 64, the last partial; D not a multiple of 64
    ((9,), 96, 40, BF16, BF16),  # bf16 x: hi is x itself, mid and lo are zero
]


@interpreted
@pytest.mark.parametrize("lead, d, v, dtype, weight_dtype", CASES)
def test_gemv_matches_the_widened_product(linear, lead, d, v, dtype, weight_dtype):
    x, w = _inputs(lead, d, v, dtype, weight_dtype)
    _check_logits(x, w, linear.fp32_linear(x, w))


@interpreted
@pytest.mark.parametrize("tokens, weight_dtype, path", [
    (1, BF16, "gemv"), (4, F32, "gemv"), (5, BF16, "split"), (128, BF16, "split"), (5, F32, "widened"),
    (1000, BF16, "split"),
])
def test_token_count_and_weight_dtype_pick_the_path(linear, monkeypatch, tokens, weight_dtype, path):
    """GEMV up to 4 tokens; beyond, split x on the tensor cores with a bf16 W (prefill: 16 token
    blocks here), fp32 GEMMs on widened row blocks of an fp32 W (no Triton launch)."""
    ran = []
    for name, kernel in (("gemv", linear._fp32_gemv_kernel), ("split", linear._split_x_kernel)):
        run = kernel.run
        monkeypatch.setattr(kernel, "run", lambda *a, name=name, run=run, **k: ran.append(name) or run(*a, **k))
    x, w = _inputs((tokens,), 64, 20, F32, weight_dtype)
    _check_logits(x, w, linear.fp32_linear(x, w))
    assert ran == ([] if path == "widened" else [path])


@interpreted
def test_few_rows_take_narrow_gemv_tiles(linear, monkeypatch):
    """The compressors' few rows run 4 rows a program (4x the programs, a quarter of the steps),
    the head's many 16; both keep 4096 running sums a program and give the exact product."""
    tiles = []
    run = linear._fp32_gemv_kernel.run
    monkeypatch.setattr(linear._fp32_gemv_kernel, "run",
                        lambda *a, **k: tiles.append((k["BLOCK_V"], k["BLOCK_D"])) or run(*a, **k))
    for v in (linear.FEW_ROWS - 1, linear.FEW_ROWS):
        x, w = _inputs((2,), 24, v, F32, BF16)
        _check_logits(x, w, linear.fp32_linear(x, w))
    assert tiles == [(4, 512), (16, 128)]


@interpreted
def test_outputs_past_int32_offsets_take_the_widened_gemm(linear, monkeypatch):
    """The split-x kernel's offsets are int32: where T*D or T*V would reach 2^31 (V4's head over
    every position of a 16k prompt), cuBLAS's GEMM on widened W runs instead, here at a lowered limit."""
    ran = []
    run = linear._split_x_kernel.run
    monkeypatch.setattr(linear._split_x_kernel, "run", lambda *a, **k: ran.append(1) or run(*a, **k))
    monkeypatch.setattr(linear, "INT32_OFFSETS", 64 * 20)
    x, w = _inputs((19,), 64, 20, F32, BF16)  # 19 * 64 < 1280: split
    _check_logits(x, w, linear.fp32_linear(x, w))
    x, w = _inputs((20,), 64, 20, F32, BF16)  # 20 * 64 = 1280: widened
    _check_logits(x, w, linear.fp32_linear(x, w))
    assert ran == [1]


@interpreted
def test_linear_refuses_float64(linear):
    x, w = _inputs((1,), 16, 8, torch.float64, BF16)
    with pytest.raises(NotImplementedError, match="float64 runs on the reference"):
        linear.fp32_linear(x, w)


@on_gpu
@pytest.mark.parametrize("lead, d, v, dtype, weight_dtype", CASES + [((1, 1), 4096, 129280, F32, BF16)])
def test_gpu_matches_the_widened_product(lead, d, v, dtype, weight_dtype):
    """Includes V4's head (129280 x 4096, 1.06 GB in bf16) at decode."""
    from seahal.backends.cuda import linear

    x, w = _inputs(lead, d, v, dtype, weight_dtype, device="cuda")
    _check_logits(x.cpu(), w.cpu(), linear.fp32_linear(x, w).cpu())
