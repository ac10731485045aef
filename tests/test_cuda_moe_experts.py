"""The cuda backend's Triton grouped experts (``moe_experts``), run by the Triton interpreter on CPU.

Checked against the CPU reference (per-expert masked loop over all tokens: different code, same
rounding points) and a float64 brute force that walks each token's distinct experts. As in
test_cuda_interpret.py, ``test_under_interpreter`` re-runs this file in a subprocess with
TRITON_INTERPRET=1; the kernel tests run there and are skipped in the parent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from seahal.testing.triton_interpreter import require_triton

triton = require_triton()

from seahal.backends.cpu.reference import moe as reference  # noqa: E402
from seahal.hal import get_spec  # noqa: E402
from seahal.hal.formats import (  # noqa: E402
    dequantize_weight,
    fp4_quantize,
    fp8_dequantize,
    fp8_quantize,
    ue8m0_encode,
)
from seahal.hal.ops.moe import expert_weight_format  # noqa: E402
from seahal.testing import triton_interpreter  # noqa: E402

from cuda_marks import IN_INTERPRETER, interpreted, on_gpu  # noqa: E402

E, TOP_K, D, I = 8, 2, 256, 256
EMPTY_EXPERT = 3
"""No token routes to this expert: it must own no row tile."""
LIMIT = 10.0

FP32_TOL = 1e-5
"""fp32 output: same rounding points as the reference, only the fp32 accumulation order of the
GEMMs differs (~2^-24 * sqrt(K) relative, K <= 256)."""
BF16_TOL = 2**-8
"""bf16 output: h and each expert output are rounded to bf16 (2^-9 relative), so a different fp32
accumulation order may flip a rounding by one bf16 ulp (2^-8 relative of that element)."""


def test_under_interpreter():
    run = triton_interpreter.rerun_test_file(__file__)
    assert run.passed(skipped=4), run.report


@pytest.fixture(scope="module")
def experts():
    """The moe_experts module, imported under the interpreter with its bf16 dot fix."""
    from seahal.backends.cuda import moe_experts

    with triton_interpreter.bf16_dot_fix():
        yield moe_experts


def _weights(rows: int, cols: int, fmt: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stacked expert weights [E, rows, cols] with entries ~ cols^-1/2, in ``fmt``:
    ``bf16``, ``fp32``, ``fp8`` / ``fp8-e8m0`` (random non-power-of-two / power-of-two 128x128
    block scales), ``fp4-e8m0`` (1x32 scales), ``fp4-e8m0-wide`` (1x32 groups' magnitudes spread
    over 2^-20 .. 2^20: a K block's four scales far apart)."""
    if fmt in ("bf16", "fp32"):
        dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
        return (torch.randn(E, rows, cols, generator=gen) * cols**-0.5).to(dtype), None
    if fmt.startswith("fp8"):
        codes = (torch.randn(E, rows, cols, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale = (torch.rand(E, -(-rows // 128), cols // 128, generator=gen) + 0.5) * (cols**-0.5 / 100)
        if fmt == "fp8-e8m0":
            scale = ue8m0_encode(torch.exp2(torch.round(torch.log2(scale)))).view(torch.float8_e8m0fnu)
        return codes, scale
    w = torch.randn(E, rows, cols, generator=gen) * cols**-0.5
    if fmt == "fp4-e8m0-wide":
        w *= torch.exp2(torch.randint(-20, 21, (E, rows, cols // 32), generator=gen).float()).repeat_interleave(32, 2)
    codes, scale = fp4_quantize(w)
    return codes, ue8m0_encode(scale).view(torch.float8_e8m0fnu)


def _routing(t: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two distinct experts per token, never EMPTY_EXPERT; with t >= 5 token 1 routes nowhere
    (both ids -1) and token 2 has one empty slot."""
    allowed = torch.tensor([e for e in range(E) if e != EMPTY_EXPERT])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:TOP_K]] for _ in range(t)])
    if t >= 5:
        ids[1] = -1
        ids[2, 1] = -1
    return torch.rand(t, TOP_K, generator=gen) * 0.9 + 0.1, ids.to(torch.int32)


def _case(t: int, fmt: str, dtype: torch.dtype, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, D, generator=gen) * 4).to(dtype)  # gate ~ N(0, 4): the clamp at 10 is hit
    topk_weights, topk_ids = _routing(t, gen)
    w1, s1 = _weights(I, D, fmt, gen)
    w3, s3 = _weights(I, D, fmt, gen)
    w2, s2 = _weights(D, I, fmt, gen)
    return x, topk_weights, topk_ids, w1, s1, w3, s3, w2, s2, LIMIT


if IN_INTERPRETER:  # a kernel of the test's own around the kernels' shared cast
    import triton.language as tl

    from seahal.backends.cuda._numerics import cast_rne

    @triton.jit
    def _cast_kernel(v_ptr, b_ptr, q_ptr, n):
        offs = tl.arange(0, 4096)
        v = tl.load(v_ptr + offs, mask=offs < n)
        tl.store(b_ptr + offs, cast_rne(v, tl.bfloat16), mask=offs < n)
        tl.store(q_ptr + offs, cast_rne(tl.clamp(v, -448.0, 448.0), tl.float8e4nv), mask=offs < n)


def _fp8_roundtrip(v: torch.Tensor) -> torch.Tensor:
    """v as the FP8 GEMM sees it: 1x128 ue8m0 tiles, back to float64."""
    q, s = fp8_quantize(v, 128)
    return fp8_dequantize(q, s, 128, torch.float64)


def _brute_force(x, topk_weights, topk_ids, w1, s1, w3, s3, w2, s2, limit) -> torch.Tensor:
    """float64 token by token over its distinct experts (a repeated expert's weights summed):
    ``sum_e x.dtype(W2 q(x.dtype(w_e silu(min(q(x) W1^T, L)) clamp(q(x) W3^T, -L, L))))``, q the
    1x128 FP8 round trip of the input of a GEMM with FP8/FP4 weights (identity for dense)."""
    def q(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _fp8_roundtrip(v) if expert_weight_format(w) != "dense" else v.double()

    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for e in sorted({int(i) for i in topk_ids[t] if 0 <= i < E}):
            w = float(topk_weights[t][topk_ids[t] == e].double().sum())
            xt = q(x[t : t + 1], w1)
            gate = xt @ dequantize_weight(w1[e], None if s1 is None else s1[e], torch.float64).T
            up = xt @ dequantize_weight(w3[e], None if s3 is None else s3[e], torch.float64).T
            h = (w * F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)).to(x.dtype)
            y = q(h, w2) @ dequantize_weight(w2[e], None if s2 is None else s2[e], torch.float64).T
            out[t] += y.to(x.dtype).double()[0]
    return out


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@interpreted
@pytest.mark.parametrize("t", [1, 5, 33])
@pytest.mark.parametrize("fmt", ["fp8", "fp8-e8m0", "fp4-e8m0", "bf16"])
def test_bf16_activations_match_reference_and_brute_force(experts, fmt, t):
    args = _case(t, fmt, torch.bfloat16, seed=t)
    out = experts.moe_experts(*args)
    assert get_spec("moe_experts").check(*args) == (tuple(out.shape), out.dtype)
    assert _rel(out, reference.moe_experts(*args)) < BF16_TOL
    assert _rel(out, _brute_force(*args)) < BF16_TOL
    if t >= 5:
        assert not out[1].any(), "a token routed nowhere must come out zero"


@interpreted
@pytest.mark.parametrize("fmt", ["fp8", "fp32"])
def test_fp32_activations(experts, fmt):
    args = _case(33, fmt, torch.float32, seed=7)
    out = experts.moe_experts(*args)
    assert out.dtype == torch.float32
    assert _rel(out, reference.moe_experts(*args)) < FP32_TOL
    assert _rel(out, _brute_force(*args)) < FP32_TOL


@interpreted
@pytest.mark.parametrize("up_fmt, down_fmt", [("fp8", "bf16"), ("bf16", "fp8-e8m0")])
def test_mixed_weight_formats(experts, up_fmt, down_fmt):
    """W1/W3 and W2 in different formats: h is FP8-quantised exactly when W2 is quantised."""
    args = list(_case(5, up_fmt, torch.bfloat16, seed=1))
    args[7], args[8] = _weights(D, I, down_fmt, torch.Generator().manual_seed(2))
    out = experts.moe_experts(*args)
    assert _rel(out, reference.moe_experts(*args)) < BF16_TOL
    assert _rel(out, _brute_force(*args)) < BF16_TOL


@interpreted
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # "-wide" gates reach -1e5: silu's exp(-gate) is inf
@pytest.mark.parametrize("fmt", ["fp4-e8m0", "fp4-e8m0-wide"])
def test_fp4_mx_form_is_the_bf16_form(experts, fmt):
    """FP4 experts with e8m0 scales: the ``tl.dot_scaled`` form and the default bf16 decode sum the
    same exact products in fp32, in different orders ("-wide": group scales over 2^±20). The
    outputs agree to bf16 rounding: an fp32 last-bit difference in h can move one of h's e4m3
    codes by a step, which the norm over all elements keeps far below BF16_TOL."""
    args = _case(5, fmt, torch.bfloat16, seed=4)
    config = experts.experts_config(10, "fp4", args[0].device)
    assert not config.fp4_mx, "the bf16 form is the default"
    out = experts.moe_experts(*args, config=dataclasses.replace(config, fp4_mx=True))
    bf16_form = experts.moe_experts(*args)
    assert _rel(out, bf16_form) < BF16_TOL
    assert _rel(out, reference.moe_experts(*args)) < BF16_TOL
    assert _rel(out, _brute_force(*args)) < BF16_TOL


def _spy_launches(monkeypatch, module, names, record) -> None:
    """Wrap ``module``'s Triton kernels ``names``: each launch calls ``record(name, kwargs)``, then runs."""
    for name in names:
        kernel = getattr(module, name)
        spy = type("Spy", (), {"__getitem__": lambda _, grid, name=name, kernel=kernel:
                               lambda *a, **kw: record(name, kw) or kernel[grid](*a, **kw)})()
        monkeypatch.setattr(module, name, spy)


@interpreted
@pytest.mark.parametrize("fmt", ["fp4-e8m0", "fp4"])
def test_weights_first_and_activations_first_agree(experts, monkeypatch, fmt):
    """16-row tiles form an FP4 expert's product weights first (the weight rows are the MMA's M,
    ``_gemm.weights_first``), 64-row tiles activations first: the same exact products summed in
    fp32 in different orders, so the outputs agree to bf16 rounding, with the reference and each
    other."""
    from seahal.backends.cuda.moe_experts import ExpertsConfig
    from seahal.backends.cuda._gemm import weights_first

    args = _case(5, fmt, torch.bfloat16, seed=6)
    assert weights_first(16, 128, fp4=True) and not weights_first(64, 128, fp4=True)
    assert not weights_first(16, 128, fp4=False)
    launched = []
    _spy_launches(monkeypatch, experts, ("_grouped_gemm_kernel",), lambda name, kw: launched.append(kw["WEIGHTS_FIRST"]))
    outs = []
    for block_m, expected in ((16, True), (64, False)):
        outs.append(experts.moe_experts(*args, config=ExpertsConfig(block_m, 128, fp4_mx=False)))
        assert launched[-2:] == [expected, expected]  # gate-up and down
        assert _rel(outs[-1], reference.moe_experts(*args)) < BF16_TOL
        assert _rel(outs[-1], _brute_force(*args)) < BF16_TOL
    assert _rel(outs[1], outs[0]) < BF16_TOL


@on_gpu
@pytest.mark.parametrize("t", [1, 16])
def test_gpu_fp4_words_and_one_expert(t):
    """On a GPU: FP4 codes read as words (the default) and a byte at a time (the bench's variant)
    give the reference's output to bf16 rounding, with group scales over 2^±20; one expert at top-1
    (no tables, no combine) equals, bit for bit, the routed path with a second expert no token
    picks, at one K split each."""
    from seahal.backends.cuda.moe_experts import ExpertsConfig, moe_experts, select_experts_config

    x, tw, ti, w1, s1, w3, s3, w2, s2, limit = (a.cuda() if isinstance(a, torch.Tensor) else a
                                                for a in _case(t, "fp4-e8m0-wide", torch.bfloat16, seed=t))
    ref = reference.moe_experts(x, tw, ti, w1, s1, w3, s3, w2, s2, limit)
    config = select_experts_config(t * TOP_K, "fp4", I, D, x.device)
    words = moe_experts(x, tw, ti, w1, s1, w3, s3, w2, s2, limit)
    bytes_config = dataclasses.replace(config, fp4_words=False)
    byte_wise = moe_experts(x, tw, ti, w1, s1, w3, s3, w2, s2, limit, config=bytes_config)
    assert _rel(words, ref) < BF16_TOL and _rel(byte_wise, ref) < BF16_TOL and _rel(words, byte_wise) < BF16_TOL
    ids = torch.zeros(t, 1, dtype=torch.int32, device="cuda")
    ids[1::3] = -1
    one_split = ExpertsConfig(16, 128, split_k=1)
    weights = (w1, s1, w3, s3, w2, s2)
    one = moe_experts(x, tw[:, :1], ids, *(w[:1] for w in weights), limit, config=one_split)
    two = moe_experts(x, tw[:, :1], ids, *(w[:2] for w in weights), limit, config=one_split)
    assert torch.equal(one, two)


@interpreted
@pytest.mark.parametrize("block_n", [128, 64])
@pytest.mark.parametrize("fmt, dtype", [("fp4-e8m0", torch.bfloat16), ("fp4-e8m0-wide", torch.bfloat16),
                                        ("fp4-e8m0", torch.float32)])
def test_round_trip_activations_are_the_default_product(experts, monkeypatch, fmt, dtype, block_n):
    """``ExpertsConfig.round_trip`` (FP4 weights, activations-first tiles): x and h enter the GEMMs
    as the bf16 values of their FP8 quantisation and the MMA sums the whole K, where the default
    scales each K block's product of the e4m3 codes: the same exact products summed in other
    orders, so both agree with each other and with the reference to bf16 rounding."""
    from seahal.backends.cuda.moe_experts import ExpertsConfig

    args = _case(33, fmt, dtype, seed=12)
    launched = []
    _spy_launches(monkeypatch, experts, ("_grouped_gemm_kernel",),
                  lambda name, kw: launched.append((kw["A_ROUND_TRIP"], kw["QUANT_A"], kw["WEIGHTS_FIRST"])))
    config = ExpertsConfig(64, block_n, quant_in_gemm=False)
    default = experts.moe_experts(*args, config=config)
    round_trip = experts.moe_experts(*args, config=dataclasses.replace(config, round_trip=True))
    assert launched == [(False, False, False)] * 2 + [(True, False, False)] * 2
    ref = reference.moe_experts(*args)
    assert _rel(round_trip, ref) < BF16_TOL and _rel(default, ref) < BF16_TOL
    assert _rel(round_trip, default) < BF16_TOL
    assert _rel(round_trip, _brute_force(*args)) < BF16_TOL


def _unaligned(codes: torch.Tensor) -> torch.Tensor:
    """The same packed codes in a tensor whose rows start at odd byte addresses."""
    padded = torch.zeros(*codes.shape[:-1], codes.shape[-1] + 1, dtype=codes.dtype)
    padded[..., 1:] = codes
    return padded[..., 1:]


@interpreted
@pytest.mark.parametrize("fmt", ["fp4-e8m0", "fp4-e8m0-wide"])
def test_fp4_codes_as_words_and_as_bytes_agree(experts, monkeypatch, fmt):
    """Weights first, FP4 codes load as 4-byte words where every row is 4-byte aligned
    (``_e2m1.e2m1_bf16_words``), else, or with ``ExpertsConfig.fp4_words`` off, a byte at a time:
    the same exact products in another K order, so the outputs agree to bf16 rounding, with the
    reference and each other."""
    x, tw, ti, w1, s1, w3, s3, w2, s2, limit = _case(5, fmt, torch.bfloat16, seed=8)
    launched = []
    _spy_launches(monkeypatch, experts, ("_grouped_gemm_kernel",), lambda name, kw: launched.append(kw["FP4_WORDS"]))
    words = experts.moe_experts(x, tw, ti, w1, s1, w3, s3, w2, s2, limit)
    assert launched == [True, True]  # gate-up and down
    unaligned = (x, tw, ti, _unaligned(w1), s1, _unaligned(w3), s3, _unaligned(w2), s2, limit)
    assert unaligned[3].data_ptr() % 2 == 1 and torch.equal(unaligned[3], w1)
    out = experts.moe_experts(*unaligned)
    assert launched[2:] == [False, False]
    config = dataclasses.replace(experts.experts_config(5 * TOP_K, "fp4", x.device), fp4_words=False)
    asked = experts.moe_experts(x, tw, ti, w1, s1, w3, s3, w2, s2, limit, config=config)  # the bench's variant
    assert launched[4:] == [False, False]
    ref = reference.moe_experts(x, tw, ti, w1, s1, w3, s3, w2, s2, limit)
    assert _rel(words, ref) < BF16_TOL and _rel(out, ref) < BF16_TOL
    assert _rel(words, out) < BF16_TOL
    assert torch.equal(asked, out)  # the same byte-wise launch over the same values


@interpreted
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("fmt", ["fp8-e8m0", "fp4-e8m0", "bf16"])
def test_one_expert_at_top_1_launches_only_the_two_gemms(experts, monkeypatch, fmt, ids_dtype):
    """One expert at top-1 (the model's shared expert): row t of both GEMMs is token t, so no
    routing tables are built and the down GEMM writes the output (``Routing.one_expert``): two
    launches, not four. A token whose id is not 0 gets 0, even with a NaN input. Each row's
    arithmetic is the routed path's, so the output equals, bit for bit, the same call with a
    second expert that no token picks (which builds the tables, sorts the routed rows together and
    combines); the model's stride-0 weights and ids are read in place."""
    x, tw, _, w1, s1, w3, s3, w2, s2, limit = _case(6, fmt, torch.bfloat16, seed=9)
    x[1] = float("nan")
    ids = torch.tensor([[0], [-1], [0], [5], [0], [0]], dtype=ids_dtype)  # 5: outside [0, E), nowhere

    def first(n):
        return [w if w is None else w[:n] for w in (w1, s1, w3, s3, w2, s2)]

    launched = []
    names = ("_grouped_gemm_kernel", "_combine_kernel", "_route_kernel")
    _spy_launches(monkeypatch, experts, names, lambda name, kw: launched.append(name))
    out = experts.moe_experts(x, tw[:, :1], ids, *first(1), limit)
    assert launched == ["_grouped_gemm_kernel"] * 2
    routed = experts.moe_experts(x, tw[:, :1], ids, *first(2), limit)
    assert launched[2:] == ["_route_kernel", "_grouped_gemm_kernel", "_grouped_gemm_kernel", "_combine_kernel"]
    assert torch.equal(out, routed)
    assert not out[[1, 3]].any()
    keep = [0, 2, 4, 5]
    ref = reference.moe_experts(x[keep], tw[keep, :1], ids[keep], *first(1), limit)
    assert _rel(out[keep], ref) < BF16_TOL
    # as the model calls it: weight 1 and id 0 expanded over the tokens (stride 0, read as they are)
    one, zero = torch.ones(1, 1), torch.zeros(1, 1, dtype=ids_dtype)
    expanded = experts.moe_experts(x[keep], one.expand(4, 1), zero.expand(4, 1), *first(1), limit)
    materialised = experts.moe_experts(x[keep], torch.ones(4, 1), torch.zeros(4, 1, dtype=ids_dtype), *first(1), limit)
    assert torch.equal(expanded, materialised)


@interpreted
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("fmt", ["fp8", "fp8-e8m0"])
def test_gemv_decode_is_the_tensor_core_product(experts, fmt, t):
    """``ExpertsConfig.gemv`` (decode on the CUDA cores, FP8 weights): the same exact products summed
    in fp32 in another order, h quantised by fp8_act_quant rather than the GEMM epilogue (the same
    function on the same bf16 h), so the output agrees with the tensor-core kernels and the
    reference to bf16 rounding; at t = 5 a token routes nowhere and another through one slot, as there."""
    args = _case(t, fmt, torch.bfloat16, seed=8 + t)
    tensor_cores = experts.experts_config(t * 2, "fp8", args[0].device)
    gemv = experts.moe_experts(*args, config=dataclasses.replace(experts.FP8_GEMV, block_n=16))
    assert _rel(gemv, experts.moe_experts(*args, config=tensor_cores)) < BF16_TOL
    assert _rel(gemv, reference.moe_experts(*args)) < BF16_TOL
    assert _rel(gemv, _brute_force(*args)) < BF16_TOL


@interpreted
@pytest.mark.parametrize("fmt", ["bf16", "fp4"])
def test_gemv_decode_refuses_other_weights(experts, fmt):
    args = _case(1, fmt, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="gemv takes FP8 weights"):
        experts.moe_experts(*args, config=experts.FP8_GEMV)


@interpreted
@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("fmt", ["fp4-e8m0", "fp8", "bf16"])
def test_k_splits(experts, fmt, split_k):
    """Decode's K splits (forced here; on a GPU ``decode_splits`` picks them): the last split of a
    tile sums the fp32 partials in split order, then the epilogue runs as unsplit. Only the fp32
    summation order differs from one launch, so both stay within bf16 rounding of the reference;
    the arrival counters are back at 0 for the next call (a stale count would skip the epilogue)."""
    from seahal.backends.cuda._gemm import arrival_counters

    args = _case(3, fmt, torch.bfloat16, seed=11)
    weight_format = "dense" if fmt == "bf16" else fmt.split("-")[0]
    config = dataclasses.replace(experts.experts_config(6, weight_format, args[0].device), split_k=split_k)
    for _ in range(2):
        out = experts.moe_experts(*args, config=config)
        assert not arrival_counters(1024, args[0].device).any()
        assert _rel(out, experts.moe_experts(*args)) < BF16_TOL
        assert _rel(out, reference.moe_experts(*args)) < BF16_TOL
        assert _rel(out, _brute_force(*args)) < BF16_TOL


def test_decode_splits():
    from seahal.backends.cuda.moe_experts import decode_splits

    assert decode_splits(6, 256, 16, 16, 32, 132) == 4  # one token's gate-up (6 experts x 16 column tiles, K 4096)
    assert decode_splits(6, 256, 16, 32, 16, 132) == 2  # its down GEMM (6 x 32 column tiles, K 2048)
    assert decode_splits(96, 256, 16, 16, 32, 132) == 1  # 16 tokens: ~96 experts fill the chip
    assert decode_splits(6, 256, 16, 1, 8, 132) == 2 and decode_splits(6, 256, 16, 1, 7, 132) == 1  # >= 4 K blocks a split
    # the shared expert (one expert, a row per token): split at decode, not where its row tiles fill the chip
    assert decode_splits(1, 1, 16, 16, 32, 132) == 8
    assert decode_splits(1024, 1, 64, 16, 32, 132) == 2  # 16 row tiles x 16 column tiles: 256 programs
    assert decode_splits(4096, 1, 64, 16, 32, 132) == 1  # 64 x 16: the grid fills the chip unsplit
    assert decode_splits(4096, 1, 64, 32, 16, 132) == 1  # its down GEMM


@interpreted
def test_repeated_expert_in_a_token_and_edge_tiles(experts):
    """Dense bf16 with D = 160, I = 96 (edge tiles and masked K blocks); token 0 picks expert 5
    twice: one row with the summed weight, as the reference applies it."""
    gen = torch.Generator().manual_seed(11)
    d, inter = 160, 96
    x = (torch.randn(6, d, generator=gen) * 4).to(torch.bfloat16)
    ids = torch.randint(0, E, (6, 3), generator=gen, dtype=torch.int32)
    ids[0] = torch.tensor([5, 2, 5])
    weights = torch.rand(6, 3, generator=gen)
    shapes = ((inter, d), (inter, d), (d, inter))
    w = [(torch.randn(E, r, c, generator=gen) * c**-0.5).to(torch.bfloat16) for r, c in shapes]
    args = (x, weights, ids, w[0], None, w[1], None, w[2], None, LIMIT)
    out = experts.moe_experts(*args)
    assert _rel(out, reference.moe_experts(*args)) < BF16_TOL
    assert _rel(out, _brute_force(*args)) < BF16_TOL


@interpreted
def test_many_rows_take_the_blocked_routing(experts, monkeypatch):
    """Past the one-launch routing's row limit the blocked routing builds the tables (here in
    blocks of 4 slots): the same tables, so the same output bit for bit."""
    args = _case(5, "fp8", torch.bfloat16, seed=3)
    one_launch = experts.moe_experts(*args)
    monkeypatch.setattr(experts, "ROUTE_KERNEL_MAX_ROWS", 4)
    monkeypatch.setattr(experts, "ROUTE_BLOCK", 4)
    out = experts.moe_experts(*args)
    assert torch.equal(out, one_launch)
    assert _rel(out, reference.moe_experts(*args)) < BF16_TOL


@interpreted
@pytest.mark.parametrize("fmt", ["fp8", "fp4-e8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_x_quantised_in_the_gemm_is_fp8_act_quant(experts, monkeypatch, fmt, dtype):
    """Few rows: the gate-up kernel FP8-quantises x itself (one launch fewer); many, or
    ``quant_in_gemm=False``: fp8_act_quant first. The same quantisation function and the same
    products: equal bit for bit."""
    args = _case(9, fmt, dtype, seed=7)
    quantised = []
    act_quant = experts.fp8_act_quant
    monkeypatch.setattr(experts, "fp8_act_quant", lambda v, block: quantised.append(v.shape) or act_quant(v, block))
    fused = experts.moe_experts(*args)
    assert quantised == []
    apart = experts.moe_experts(*args, config=dataclasses.replace(experts.experts_config(18, "fp8", args[0].device),
                                                                  quant_in_gemm=False))
    assert quantised == [(9, D)]
    monkeypatch.setattr(experts, "QUANT_IN_GEMM_MAX_ROWS", 0)
    assert torch.equal(fused, experts.moe_experts(*args)) and torch.equal(fused, apart)
    assert _rel(fused, reference.moe_experts(*args)) < (BF16_TOL if dtype == torch.bfloat16 else FP32_TOL)


@interpreted
@pytest.mark.parametrize("t, split_k", [(5, 1), (5, 2), (150, 1)])
@pytest.mark.parametrize("fmt", ["fp8", "fp4-e8m0"])
def test_narrow_column_tiles_quantise_h_after_the_gate_up(experts, monkeypatch, fmt, t, split_k):
    """64-column tiles leave h in x's dtype: the down kernel quantises it as it loads it (10 routed
    rows) or one fp8_act_quant launch does (300 rows, past QUANT_IN_GEMM_MAX_ROWS), with the
    function the 128-column gate-up epilogue applies to the same bf16 values. Same codes, scales
    and products per output element (K splits summed in the same order), so the output is the
    128-column launch's bit for bit."""
    args = _case(t, fmt, torch.bfloat16, seed=12)
    wide = experts.ExpertsConfig(16 if t < 50 else 64, 128, split_k=split_k)
    reference_out = experts.moe_experts(*args, config=wide)
    quantised = []
    act_quant = experts.fp8_act_quant
    monkeypatch.setattr(experts, "fp8_act_quant", lambda v, block: quantised.append(v.shape) or act_quant(v, block))
    narrow = experts.moe_experts(*args, config=dataclasses.replace(wide, block_n=64))
    rows = 2 * t
    assert quantised == ([] if rows <= experts.QUANT_IN_GEMM_MAX_ROWS else [(t, D), (rows, I)])  # x, then h
    assert torch.equal(narrow, reference_out)
    assert _rel(narrow, reference.moe_experts(*args)) < BF16_TOL


@interpreted
def test_quantised_weights_refuse_column_tiles_past_a_scale_block(experts):
    args = _case(2, "fp8", torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="block_n=256"):
        experts.moe_experts(*args, config=experts.ExpertsConfig(16, 256))


@interpreted
def test_routing_tables(experts):
    """Sorted rows grouped by expert; each expert's rows cut into BLOCK_M tiles that never straddle
    experts; the empty expert owns no tile; unused tiles are marked -1."""
    block_m = 4
    ids = torch.tensor([[0, 2], [2, 0], [2, -1], [-1, -1], [7, 2], [2, 2]], dtype=torch.int32)
    weights = torch.arange(12, dtype=torch.float32).view(6, 2) / 16
    r = experts.route(weights, ids, E, block_m)
    assert int(r.n_valid) == 8  # 12 slots: three -1 and one repeat (token 5's second 2) dropped
    assert r.slots[:8].tolist() == [0, 3, 1, 2, 4, 9, 10, 8]  # expert 0, then 2 (stable), then 7
    assert r.weights[:8].tolist() == [w / 16 for w in (0, 3, 1, 2, 4, 9, 10 + 11, 8)]
    expert, first, end = r.tiles.tolist()
    used = [(e, f, n) for e, f, n in zip(expert, first, end) if e >= 0]
    assert used == [(0, 0, 2), (2, 2, 7), (2, 6, 7), (7, 7, 8)]
    assert expert[len(used):] == [-1] * (len(expert) - len(used))
    assert r.tiles.shape[1] == 3 + 8  # the bound ceil(12 / 4) + min(E, 12)
    assert r.positions.tolist()[0] == [0, 2]  # token 0: expert 0's row, then expert 2's
    assert (r.positions[3] >= 8).all()  # token 3 routes nowhere


@interpreted
def test_cast_rounds_to_nearest_even():
    """The kernels' fp32 -> bf16 / e4m3 casts equal torch's, carries and subnormals included
    (the interpreter's own casts truncate or drop the carry)."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(4000, generator=gen) * torch.exp2(torch.randint(-12, 9, (4000,), generator=gen).float())
    v[:6] = torch.tensor([31.9, -31.9, 2.0**-10 * 1.5, 2.0**-9 * 2.5, 0.0, 447.9])  # carry, subnormal ties
    # a tie to even, a bf16 carry into inf, inf, NaN, a bf16 subnormal
    v[6:11] = torch.tensor([1 + 2.0**-8, 3.4e38, float("inf"), float("nan"), 2.0**-130 * 1.3])
    b = torch.empty(4000, dtype=torch.bfloat16)
    q = torch.empty(4000, dtype=torch.float8_e4m3fn)
    _cast_kernel[(1,)](v, b, q, 4000)
    nan = v.isnan()  # NaN payloads differ between torch, the GPU and the kernels: NaN-ness only
    assert b[nan].isnan().all()
    assert torch.equal(b.view(torch.int16)[~nan], v.to(torch.bfloat16).view(torch.int16)[~nan])
    codes = v.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(q.view(torch.uint8)[~nan], codes[~nan])  # e4m3 of [-448, 448] only


def _random_ids(t: int, k: int, n_experts: int, gen: torch.Generator) -> torch.Tensor:
    """[t, k] int32 ids drawn from [-2, E + 2) (out of range routes nowhere), distinct within a token
    but for pairs: slot j (odd) repeats slot j - 1 with probability 1/2, so no id appears more than
    twice in a token (the merged weight is then the same in any summation order)."""
    ids = torch.stack([torch.randperm(n_experts + 4, generator=gen)[:k] for _ in range(t)]) - 2
    odd = torch.arange(1, k, 2)
    repeat = torch.rand(t, len(odd), generator=gen) < 0.5
    ids[:, odd] = torch.where(repeat, ids[:, odd - 1], ids[:, odd])
    return ids.to(torch.int32)


def _assert_same_routing(a, b) -> None:
    for field in ("tiles", "slots", "weights", "positions", "n_valid"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and torch.equal(x, y), (field, x, y)


@interpreted
@pytest.mark.parametrize("routing", ["route_small", "route_blocked"])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("n_experts", [8, 256])
@pytest.mark.parametrize("k", [1, 6, 8])
@pytest.mark.parametrize("t", [1, 3, 16, 64])
def test_triton_routing_equals_torch_sort(experts, monkeypatch, routing, t, k, n_experts, block_m):
    """The routing kernels' tables equal the torch path's (every field, weights bitwise): random ids
    with out-of-range ids, repeated ids, empty experts and T*k not a multiple of BLOCK_M; the
    blocked routing in 32-slot blocks, so a key's rows span several blocks and the last is partial."""
    monkeypatch.setattr(experts, "ROUTE_BLOCK", 32)
    gen = torch.Generator().manual_seed(t * 1000 + k * 10 + n_experts + block_m)
    ids = _random_ids(t, k, n_experts, gen)
    weights = torch.rand(t, k, generator=gen)
    _assert_same_routing(getattr(experts, routing)(weights, ids, n_experts, block_m),
                         experts.route_sorted(weights, ids, n_experts, block_m))


@interpreted
def test_route_takes_the_blocked_routing_past_the_one_launch_rows(experts, monkeypatch):
    """Past ROUTE_KERNEL_MAX_ROWS routed rows route() is the blocked routing (V4-Flash prefill
    sizes: 1024 tokens x top-6 in 6 blocks of 1024 slots), and equal to the torch sort."""
    gen = torch.Generator().manual_seed(9)
    ids = _random_ids(1024, 6, 256, gen)
    weights = torch.rand(1024, 6, generator=gen)
    called = []
    monkeypatch.setattr(experts, "route_blocked", lambda *a: called.append(a) or experts.route_sorted(*a))
    experts.route(weights, ids, 256, 64)
    assert len(called) == 1
    monkeypatch.undo()
    _assert_same_routing(experts.route(weights, ids, 256, 64), experts.route_sorted(weights, ids, 256, 64))


@interpreted
@pytest.mark.parametrize("routing", ["route_small", "route_blocked"])
@pytest.mark.parametrize(
    "ids",
    [
        [[-1, -1, 9]] * 5,  # nothing routed (a pair of -1 and an id past E): every tile unused
        [[7, 7, 3]] * 5,  # every token repeats an expert; all rows on two experts
        [[0, 1, 2]] * 11,  # 11 rows an expert: two tiles of 8 each, the second partial
        [[2**40, -(2**40), 4]] * 2,  # int64 ids far outside [0, E)
    ],
    ids=["all-dropped", "repeats", "partial-tiles", "int64-out-of-range"],
)
def test_triton_routing_edge_cases(experts, monkeypatch, routing, ids):
    monkeypatch.setattr(experts, "ROUTE_BLOCK", 4)  # the blocked routing: several blocks, the last partial
    ids = torch.tensor(ids)
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    route = getattr(experts, routing)
    _assert_same_routing(route(weights, ids, E, 8), experts.route_sorted(weights, ids, E, 8))


DECODE_CALL = {"t": 1, "k": 6, "experts": 256, "dim": 4096, "inter": 2048}
"""V4-Flash decode, one token, FP4 experts: the call whose launches are counted."""


def launches_per_call() -> tuple[list[str], list[str], list[int]]:
    """(the Triton kernels, the other aten ops that would launch a device kernel, the K splits of
    the two grouped GEMMs) of a
    :data:`DECODE_CALL` moe_experts call after a first one (which makes the split-K arrival
    counters, as a CUDA graph's warm-up does), recorded as an H100 would see them
    (capture_launches), no GPU needed. Needs compiled kernels: run in a process without
    TRITON_INTERPRET."""
    from seahal.backends.cuda import moe_experts
    from seahal.testing.triton_compile import AtenKernels, capture_launches

    t, k, e, d, inter = DECODE_CALL.values()
    with capture_launches() as launches:
        def empty(*shape, dtype=torch.float32):
            return torch.empty(shape, dtype=dtype, device="cuda")

        def fp4(rows, cols):
            return empty(e, rows, cols // 2, dtype=torch.uint8), empty(e, rows, cols // 32, dtype=torch.float8_e8m0fnu)

        args = (empty(t, d, dtype=torch.bfloat16), empty(t, k), empty(t, k, dtype=torch.int64),
                *fp4(inter, d), *fp4(inter, d), *fp4(d, inter))
        moe_experts.moe_experts(*args)
        launches.clear()
        with AtenKernels() as aten:
            moe_experts.moe_experts(*args)
    splits = [launch.grid[2] for launch in launches if launch.name == "_grouped_gemm_kernel"]
    return [launch.name for launch in launches], aten.ops, splits


@pytest.mark.skipif(IN_INTERPRETER, reason="runs in the main pytest process (it starts its own)")
def test_decode_call_launches_only_triton_kernels():
    # a fresh process: an earlier test may have imported the kernels under TRITON_INTERPRET
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    triton_kernels, other_kernels, splits = json.loads(done.stdout.splitlines()[-1])
    # routing, gate-up (quantising x itself), down, combine; the torch routing was ~45 more kernels
    assert triton_kernels == ["_route_kernel", "_grouped_gemm_kernel", "_grouped_gemm_kernel", "_combine_kernel"]
    assert other_kernels == []
    assert splits == [4, 2]  # decode_splits: gate-up 6 x 16 column tiles of K 4096, down 6 x 32 of K 2048


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    print(json.dumps(launches_per_call()))
