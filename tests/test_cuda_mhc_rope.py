"""The cuda backend's Triton mHC (hc_pre, hc_head, hc_post, hc_post_pre) and RoPE kernels, under the Triton interpreter.

Two independent figures per op: the CPU reference kernel and a float64 brute force of the
formula written out here. Tolerances are the conformance rules of ``seahal.testing.tolerances``
(derived there from fp32 accumulation and the output format), applied to the float64 brute force;
RoPE is also checked bit for bit where the op order fixes every rounding. Interpreter tests run
in a subprocess with TRITON_INTERPRET=1 (see test_cuda_interpret.py for why).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seahal.testing.triton_interpreter import require_triton

triton = require_triton()

from seahal.testing import triton_interpreter  # noqa: E402

from seahal.backends.cpu.reference import mhc as reference_mhc
from seahal.backends.cpu.reference import rope as reference_rope
from seahal.hal.ops.rope import Yarn, rope_frequencies

from seahal.testing.tolerances import checks_for

from cuda_marks import interpreted, on_gpu  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16


def test_under_interpreter():
    run = triton_interpreter.rerun_test_file(__file__)
    assert run.passed(skipped=14), run.report


@pytest.fixture(scope="module")
def kernels():
    """(mhc module, rope module), imported under the interpreter, with its bf16 dot fix (hc_pre's
    tensor-core tiles multiply bf16 x by bf16 parts of fn)."""
    from seahal.backends.cuda import mhc, rope

    with triton_interpreter.bf16_dot_fix():
        yield mhc, rope


def _assert_within_rules(op: str, args: tuple, got, want) -> None:
    """Each output of ``op`` within its conformance tolerance of ``want`` (float64)."""
    got, want = (got,) if isinstance(got, torch.Tensor) else got, (want,) if isinstance(want, torch.Tensor) else want
    for compared in checks_for(op, args):
        verdict = compared.check.compare(got[compared.outputs], want[compared.outputs])
        assert verdict.ok, f"{op} {compared.label}: {verdict.detail} (worst {verdict.worst})"


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dims stored transposed (non-unit last stride)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


# --------------------------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------------------------


def _rope_same_order(x, positions, freqs, inverse):
    """The reference's arithmetic with numpy's fp32 cos/sin (the interpreter's): fp32 angle, then
    each product and difference rounded to fp32, then one cast to x's dtype."""
    r = freqs.shape[0]
    theta = positions.to(F32)[:, :, None, None] * freqs.to(F32)
    theta = -theta if inverse else theta
    cos, sin = torch.from_numpy(np.cos(theta.numpy())), torch.from_numpy(np.sin(theta.numpy()))
    a, b = x[..., -2 * r :: 2].to(F32), x[..., -2 * r + 1 :: 2].to(F32)
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., : x.shape[-1] - 2 * r], rotated.to(x.dtype)), dim=-1)


def _rope_float64(x, positions, freqs, inverse):
    """Exact rotation in float64 of the fp32 frequencies (pair by pair)."""
    x64 = x.to(torch.float64)
    out = x64.clone()
    nope = x.shape[-1] - 2 * freqs.shape[0]
    sign = -1.0 if inverse else 1.0
    for i, f in enumerate(freqs.tolist()):
        theta = sign * positions.to(torch.float64)[:, :, None] * f
        a, b = x64[..., nope + 2 * i], x64[..., nope + 2 * i + 1]
        out[..., nope + 2 * i] = a * theta.cos() - b * theta.sin()
        out[..., nope + 2 * i + 1] = a * theta.sin() + b * theta.cos()
    return out


# (dtype, heads, dim, rope dims, inverse, layout, positions dtype): 18 heads = two head blocks, the
# second partial; 40 - 16 = 24 pass-through dims (padded to 32 in the kernel); full rotation.
ROPE_CASES = [
    (F32, 3, 32, 16, False, "contiguous", torch.int64),
    (BF16, 18, 40, 16, True, "contiguous", torch.int32),
    (F32, 2, 32, 32, True, "transposed", torch.int64),
    (BF16, 1, 64, 24, False, "transposed", torch.int64),
]


def _rope_inputs(dtype, h, d, r, layout, pos_dtype, seed, max_pos=1000, yarn=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, h, d, generator=gen).to(dtype)
    x = _transposed(x) if layout == "transposed" else x
    positions = torch.randint(0, max_pos, (2, 5), generator=gen, dtype=pos_dtype)
    freqs = rope_frequencies(r, 160000.0, Yarn(16, 4096)) if yarn else rope_frequencies(r, 10000.0)
    return x, positions, freqs


@interpreted
@pytest.mark.parametrize("dtype, h, d, r, inverse, layout, pos_dtype", ROPE_CASES)
def test_rope_bitwise_in_the_reference_order(kernels, dtype, h, d, r, inverse, layout, pos_dtype):
    _, rope = kernels
    x, positions, freqs = _rope_inputs(dtype, h, d, r, layout, pos_dtype, seed=h + d + r)
    out = rope.rope(x, positions, freqs, inverse)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, _rope_same_order(x, positions, freqs, inverse))
    assert torch.equal(out[..., : d - r], x[..., : d - r])
    # Against the reference itself only cos/sin differ (torch's vs numpy's, an ulp or so).
    _assert_within_rules("rope", (x, positions, freqs, inverse), out, reference_rope.rope(x, positions, freqs, inverse))


@interpreted
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rope_against_float64_at_long_positions(kernels, dtype):
    """Positions up to 2^16 with YaRN frequencies: the error grows with the angle as the rule says."""
    _, rope = kernels
    x, positions, freqs = _rope_inputs(dtype, 4, 64, 64, "contiguous", torch.int64, seed=3, max_pos=2**16, yarn=True)
    for inverse in (False, True):
        args = (x, positions, freqs, inverse)
        _assert_within_rules("rope", args, rope.rope(*args), _rope_float64(*args))


def _norm_rope_float64(x, weight, eps, positions, freqs):
    """rms_norm then rope in float64, the normalised heads unrounded."""
    x64 = x.to(torch.float64)
    y = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps)
    return _rope_float64(y if weight is None else y * weight.to(torch.float64), positions, freqs, False)


# (dtype, heads, dim, rope dims, weighted, layout): 18 heads = two head blocks; full rotation; the
# stacked projection's query heads (rows no single stride steps through); V4's KV head; heads of
# 1024 dims, 8 a program (NORM_ELEMENTS), the third block partial.
NORM_ROPE_CASES = [
    (BF16, 18, 40, 16, False, "contiguous"),
    (F32, 3, 32, 32, True, "transposed"),
    (BF16, 8, 64, 16, False, "heads"),
    (BF16, 1, 512, 64, True, "contiguous"),
    (F32, 18, 1024, 64, True, "contiguous"),
]


@interpreted
@pytest.mark.parametrize("dtype, h, d, r, weighted, layout", NORM_ROPE_CASES)
def test_rms_norm_rope_is_the_norm_and_rope_kernels_bit_for_bit(kernels, dtype, h, d, r, weighted, layout):
    """The one pass rounds each normalised head to x's dtype and rotates the rounded values, as the
    rms_norm and rope kernels in turn: the same bits (the interpreter sums x^2 in the same order),
    and both within the conformance rule of the float64 brute force."""
    from seahal.backends.cuda.norm import rms_norm
    from seahal.testing.cases import strided

    _, rope = kernels
    x, positions, freqs = _rope_inputs(dtype, h, d, r, "contiguous", torch.int64, seed=h + d)
    x = strided(x * torch.exp2(torch.randint(-8, 9, (*x.shape[:-1], 1), generator=torch.Generator().manual_seed(d))
                               ).to(dtype), layout)
    weight = torch.rand(d, generator=torch.Generator().manual_seed(r)) + 0.5 if weighted else None
    out = rope.rms_norm_rope(x, weight, 1e-6, positions, freqs)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, rope.rope(rms_norm(x, weight, 1e-6), positions, freqs))
    assert torch.equal(out, rope.rms_norm_then_rope(x, weight, 1e-6, positions, freqs))
    args = (x, weight, 1e-6, positions, freqs)
    _assert_within_rules("rms_norm_rope", args, out, _norm_rope_float64(*args))


@on_gpu
@pytest.mark.parametrize("h, weighted", [(64, False), (1, True), (128, False)])
def test_gpu_rms_norm_rope_at_v4_heads(h, weighted):
    """Never run on a GPU yet: V4's query heads (64, 128; no weight) and KV head (weighted), one
    token and a 1k-token prefill, within the rule of the float64 brute force, and within one bf16
    ulp of the norm and rope kernels in turn (only the order of sum(x^2) may differ)."""
    from seahal.backends.cuda import rope

    for tokens in (1, 1024):
        gen = torch.Generator().manual_seed(tokens + h)
        x = (torch.randn(1, tokens, h, 512, generator=gen) * 4).to(BF16)
        positions = torch.randint(0, 1 << 16, (1, tokens), generator=gen)
        weight = torch.rand(512, generator=gen) + 0.5 if weighted else None
        freqs = rope_frequencies(64, 160000.0, Yarn(16, 4096))
        args = (x, weight, 1e-6, positions, freqs)
        cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        out = rope.rms_norm_rope(*cuda_args)
        _assert_within_rules("rms_norm_rope", args, out.cpu(), _norm_rope_float64(*args))
        apart = rope.rms_norm_then_rope(*cuda_args)
        torch.testing.assert_close(out, apart, rtol=2**-8, atol=2**-8 * float(apart.abs().max()))


@interpreted
def test_rope_inverse_undoes_forward(kernels):
    _, rope = kernels
    x, positions, freqs = _rope_inputs(F32, 3, 32, 16, "contiguous", torch.int64, seed=5)
    back = rope.rope(rope.rope(x, positions, freqs), positions, freqs, inverse=True)
    # two fp32 rotations of the same angle: a few ulp of max|x| (|x| <= ~4 here)
    torch.testing.assert_close(back, x, rtol=0, atol=8 * 2**-24 * float(x.abs().max()))


# --------------------------------------------------------------------------------------------
# mHC
# --------------------------------------------------------------------------------------------


def _mix64(x, fn, base, scale, n_groups):
    """float64 logits ``mix * scale_g + base`` per group of the mix index, and the streams [T, n, D]."""
    t = x.shape[0] * x.shape[1]
    streams = x.to(torch.float64).reshape(t, x.shape[2], x.shape[3])
    flat = streams.reshape(t, -1)
    mix = flat @ fn.to(torch.float64).T / (flat.square().mean(-1, keepdim=True) + 1e-6).sqrt()
    return [mix[:, lo:hi] * float(scale[g]) + base[lo:hi].to(torch.float64) for g, (lo, hi) in enumerate(n_groups)], streams


def _sigmoid64(z):
    return 1.0 / (1.0 + torch.exp(-z))


def _hc_pre_float64(x, fn, base, scale, iters, eps=1e-6):
    """(y, post, comb) in float64, the Sinkhorn loop written per token."""
    b, s, n, d = x.shape
    (pre_z, post_z, comb_z), streams = _mix64(x, fn, base, scale, [(0, n), (n, 2 * n), (2 * n, (2 + n) * n)])
    pre = _sigmoid64(pre_z) + eps
    combs = []
    for logits in comb_z.reshape(-1, n, n):
        c = logits.exp() / logits.exp().sum(1, keepdim=True) + eps
        c = c / (c.sum(0, keepdim=True) + eps)
        for _ in range(iters - 1):
            c = c / (c.sum(1, keepdim=True) + eps)
            c = c / (c.sum(0, keepdim=True) + eps)
        combs.append(c)
    y = (pre[:, :, None] * streams).sum(1)
    return y.reshape(b, s, d), (2 * _sigmoid64(post_z)).reshape(b, s, n), torch.stack(combs).reshape(b, s, n, n)


def _hc_head_float64(x, fn, base, scale, eps=1e-6):
    """y in float64."""
    b, s, n, d = x.shape
    (pre_z,), streams = _mix64(x, fn, base, scale, [(0, n)])
    return ((_sigmoid64(pre_z) + eps)[:, :, None] * streams).sum(1).reshape(b, s, d)


def _hc_inputs(b, s, n, d, dtype, seed, layout="contiguous", mixes=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, n, d, generator=gen).to(dtype)
    x = _transposed(x) if layout == "transposed" else x
    mixes = mixes or (2 + n) * n
    fn = torch.randn(mixes, n * d, generator=gen) * (n * d) ** -0.5
    base = torch.randn(mixes, generator=gen) * 0.5
    scale = torch.rand(3 if mixes == (2 + n) * n else 1, generator=gen) * 1.5 + 0.5
    return x, fn, base, scale


# (batch, seq, n, D, dtype, Sinkhorn iters, (token tile, K chunk, K slices), layout). Tiles below 16
# tokens multiply on the CUDA cores, 16 on tl.dot (bf16 x: fn split into three bf16 parts). 6 tokens
# in a 16-token tile; 37 = three tiles, the last partial; 4 and 2 tokens in one GEMV tile; n = 3
# pads the 3 x 3 matrix to 4 x 4; D = 40 ends in a partial column block; n*D = 60 in 4 slices of
# 16 (the last one 12 wide), 128 in one slice of 4 chunks.
HC_PRE_CASES = [
    (2, 3, 4, 32, F32, 20, (16, 32, 2), "contiguous"),
    (1, 37, 4, 16, BF16, 20, (16, 32, 1), "contiguous"),
    (2, 2, 3, 20, F32, 20, (4, 16, 4), "transposed"),
    (1, 2, 2, 40, BF16, 1, (2, 16, 2), "contiguous"),
    (1, 2, 4, 32, BF16, 20, (2, 32, 1), "transposed"),
]


@interpreted
@pytest.mark.parametrize("b, s, n, d, dtype, iters, config, layout", HC_PRE_CASES)
def test_hc_pre(kernels, monkeypatch, b, s, n, d, dtype, iters, config, layout):
    mhc, _ = kernels
    monkeypatch.setattr(mhc, "mix_config", lambda t, k, m, device: mhc.MixConfig(*config))
    x, fn, base, scale = _hc_inputs(b, s, n, d, dtype, seed=s + n + d, layout=layout)
    args = (x, fn, base, scale, iters, 1e-6, 1e-6)
    y, post, comb = mhc.hc_pre(*args)
    assert (y.dtype, post.dtype, comb.dtype) == (dtype, F32, F32)
    _assert_within_rules("hc_pre", args, (y, post, comb), _hc_pre_float64(x, fn, base, scale, iters))
    _assert_within_rules("hc_pre", args, (y, post, comb), reference_mhc.hc_pre(*args))
    # Sinkhorn ends on a column normalisation: columns sum to 1 - eps / (colsum + eps), fp32-rounded
    torch.testing.assert_close(comb.sum(-2), torch.ones(b, s, n), rtol=0, atol=1e-5)


@interpreted
@pytest.mark.parametrize("b, s, n, d, dtype, layout, param_dtype", [
    (2, 3, 4, 32, BF16, "contiguous", F32), (1, 19, 3, 24, F32, "transposed", torch.float64),
])
def test_hc_head(kernels, b, s, n, d, dtype, layout, param_dtype):
    mhc, _ = kernels
    x, fn, base, scale = (t.to(param_dtype) for t in _hc_inputs(b, s, n, d, dtype, seed=d, layout=layout, mixes=n))
    x = x.to(dtype)
    args = (x, fn, base, scale, 1e-6, 1e-6)
    y = mhc.hc_head(*args)
    _assert_within_rules("hc_head", args, y, _hc_head_float64(x, fn, base, scale))
    _assert_within_rules("hc_head", args, y, reference_mhc.hc_head(*args))


# (batch, seq, n, D, dtype, K slices, Sinkhorn iters): 1, 3 and 16 tokens (a GEMV tile of 1 and 4,
# a tl.dot tile of 16) and 37 (three tiles, each with its own counter and last program); D = 40 and
# 24 end in a partial column block (16 wide on CPU), which the last program loops over; one K slice
# (the first program is also the last) and four asked (n*D = 160: three of 48 and one of 16; 96:
# three of 32), which the last program sums two at a time on CPU. Few Sinkhorn steps at 16 and 37
# tokens keep the interpreter quick.
ONE_LAUNCH_CASES = [
    (1, 1, 4, 40, F32, 2, 20), (1, 1, 4, 40, BF16, 2, 20),
    (3, 1, 3, 24, F32, 1, 20), (1, 3, 4, 40, BF16, 1, 20),
    (2, 8, 4, 40, F32, 4, 3), (2, 8, 3, 32, BF16, 4, 3),
    (1, 37, 3, 24, F32, 2, 2), (1, 37, 4, 40, BF16, 2, 2),
]


@interpreted
@pytest.mark.parametrize("b, s, n, d, dtype, split, iters", ONE_LAUNCH_CASES)
def test_one_launch_is_the_two_launches(kernels, monkeypatch, b, s, n, d, dtype, split, iters):
    """hc_pre and hc_head with the collapse in the mixing launch: the two launches' bits, call after
    call on the arrival counters it resets, and within the conformance rules of the float64 formula
    and the reference."""
    from seahal.backends.cuda._gemm import arrival_counters

    mhc, _ = kernels
    cpu_config = mhc.mix_config
    monkeypatch.setattr(mhc, "mix_config",
                        lambda t, k, m, device: mhc.MixConfig(cpu_config(t, k, m, device).block_t, 16, split))
    x, fn, base, scale = _hc_inputs(b, s, n, d, dtype, seed=b * s + d)
    _, head_fn, head_base, head_scale = _hc_inputs(b, s, n, d, dtype, seed=d, mixes=n)
    pre_args = (x, fn, base, scale, iters, 1e-6, 1e-6)
    head_args = (x, head_fn, head_base, head_scale, 1e-6, 1e-6)
    collapse_args = {False: pre_args, True: (x, head_fn, head_base, head_scale, 1, 1e-6, 1e-6)}
    one = {}
    for head, args in collapse_args.items():
        # One launch first, so that its workspaces are not the two launches' freed memory, where
        # stale partials could stand in for unwritten ones. The third call counts on the counters
        # the first one reset.
        one[head] = mhc.collapse_streams(*args, head=head, one_launch=True)
        two = mhc.collapse_streams(*args, head=head, one_launch=False)
        again = mhc.collapse_streams(*args, head=head, one_launch=True)
        assert not arrival_counters(1, x.device).any()
        for first, second, third in zip(one[head], two, again, strict=True):
            assert torch.equal(first, second) and torch.equal(first, third)
    _assert_within_rules("hc_pre", pre_args, one[False], _hc_pre_float64(x, fn, base, scale, iters))
    _assert_within_rules("hc_pre", pre_args, one[False], reference_mhc.hc_pre(*pre_args))
    _assert_within_rules("hc_head", head_args, one[True][0], _hc_head_float64(x, head_fn, head_base, head_scale))
    _assert_within_rules("hc_head", head_args, one[True][0], reference_mhc.hc_head(*head_args))


# (batch, seq, n, D, dtype): one and four tokens (one launch), six (two launches); D = 40 is a row
# of 64 columns with 24 masked, 32 a full one; n = 3 pads the stream axis.
NORMED_CASES = [(1, 1, 4, 40, BF16), (2, 2, 4, 32, F32), (1, 6, 3, 40, BF16)]


@interpreted
@pytest.mark.parametrize("b, s, n, d, dtype", NORMED_CASES)
def test_normed_collapse_is_the_collapse_then_the_rms_norm_kernel(kernels, b, s, n, d, dtype):
    """hc_pre and hc_head with norm_weight: in both launch forms, bit for bit the plain collapse
    then the rms_norm kernel (the same fp32 math on the rounded y), the same post and comb, and
    within the conformance rules of the reference."""
    from seahal.backends.cuda import norm

    mhc, _ = kernels
    x, fn, base, scale = _hc_inputs(b, s, n, d, dtype, seed=s * d)
    _, head_fn, head_base, head_scale = _hc_inputs(b, s, n, d, dtype, seed=d, mixes=n)
    weight = torch.randn(d, generator=torch.Generator().manual_seed(d))
    collapse_args = {False: (x, fn, base, scale, 20, 1e-6, 1e-6), True: (x, head_fn, head_base, head_scale, 1, 1e-6, 1e-6)}
    for head, args in collapse_args.items():
        plain = mhc.collapse_streams(*args, head=head)
        normed_y = norm.rms_norm(plain[0], weight, 1e-6)
        for one_launch in (True, False):
            got = mhc.collapse_streams(*args, head=head, norm_weight=weight, one_launch=one_launch)
            assert torch.equal(got[0], normed_y), (head, one_launch)
            assert torch.equal(got[1], plain[1]) and torch.equal(got[2], plain[2])
    pre_args = (*collapse_args[False], weight)
    _assert_within_rules("hc_pre", pre_args, mhc.hc_pre(*pre_args), reference_mhc.hc_pre(*pre_args))
    head_args = (x, head_fn, head_base, head_scale, 1e-6, 1e-6, weight)
    _assert_within_rules("hc_head", head_args, mhc.hc_head(*head_args), reference_mhc.hc_head(*head_args))


class _Launches:
    """A kernel stand-in that logs each launch's kernel name, then launches it."""

    def __init__(self, kernel, log: list[str]):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(self.kernel.fn.__name__)
        return self.kernel[grid]


@interpreted
def test_token_count_picks_one_or_two_launches(kernels, monkeypatch):
    mhc, _ = kernels
    log: list[str] = []
    for name in ("_mix_kernel", "_collapse_kernel"):
        monkeypatch.setattr(mhc, name, _Launches(getattr(mhc, name), log))
    for t, launches in ((mhc.ONE_LAUNCH_MAX_TOKENS, ["_mix_kernel"]),
                        (mhc.ONE_LAUNCH_MAX_TOKENS + 1, ["_mix_kernel", "_collapse_kernel"])):
        x, fn, base, scale = _hc_inputs(1, t, 4, 16, F32, seed=t)
        _, head_fn, head_base, head_scale = _hc_inputs(1, t, 4, 16, F32, seed=t, mixes=4)
        log.clear()
        mhc.hc_pre(x, fn, base, scale)
        mhc.hc_head(x, head_fn, head_base, head_scale)
        assert log == 2 * launches


@interpreted
@pytest.mark.parametrize("m", [24, 4], ids=["hc_pre", "hc_head"])
@pytest.mark.parametrize("d", [4096, 7168], ids=["V4-Flash", "V4-Pro"])
@pytest.mark.parametrize("t", [1, 4, 64, 1024, 4096])
def test_gpu_mix_launch_spreads_the_weight_read(kernels, monkeypatch, m, d, t):
    """The pre-norm GEMM's launch on a 132-SM GPU: up to 64 tokens (decode) at least 64 programs,
    at one token none reading more than 32 KB of fn (one SM streams ~50-100 GB/s: < 0.5 us for the
    slice); a prefill more than 3 programs an SM; every tile's last program sums at most
    FINISH_ELEMENTS partials."""
    from types import SimpleNamespace

    mhc, _ = kernels
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    k = 4 * d
    config = mhc.mix_config(t, k, m, torch.device("cuda"))
    width, split = mhc.slices(k, config)
    assert (split - 1) * width < k <= split * width  # no empty slice
    assert split * config.block_t * m <= mhc.FINISH_ELEMENTS
    if t <= 64:
        assert -(-t // config.block_t) * split >= 64
    if t == 1:
        assert m * width * 4 <= 32 * 1024
    if t >= 1024:
        assert -(-t // config.block_t) * split > 3 * 132


@on_gpu
@pytest.mark.parametrize("t", [1, 4, 16, 64])
def test_gpu_one_launch_is_the_two_launches(t):
    """The same bits as the two launches at V4-Flash width (the same kernel computes the weights;
    the collapse's 4096- and 512-column blocks add each column's products in the same order; a
    normalised collapse holds the row in one block of the same warps either way), launch after
    launch on the counters it resets; normalised, within the rules of the CPU reference."""
    from seahal.backends.cuda import mhc

    x, fn, base, scale = (v.cuda() for v in _hc_inputs(1, t, 4, 4096, BF16, seed=t))
    _, head_fn, head_base, head_scale = (v.cuda() for v in _hc_inputs(1, t, 4, 4096, BF16, seed=t, mixes=4))
    weight = torch.randn(4096, generator=torch.Generator().manual_seed(t)).cuda()
    for _ in range(2):
        for args, head in (((x, fn, base, scale, 20), False), ((x, head_fn, head_base, head_scale, 1), True)):
            for norm_weight in (None, weight):
                one = mhc.collapse_streams(*args, 1e-6, 1e-6, head=head, norm_weight=norm_weight, one_launch=True)
                two = mhc.collapse_streams(*args, 1e-6, 1e-6, head=head, norm_weight=norm_weight, one_launch=False)
                assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    cpu = [v.cpu() for v in (x, fn, base, scale, head_fn, head_base, head_scale, weight)]
    pre_args = (*cpu[:4], 20, 1e-6, 1e-6, cpu[7])
    got = [v.cpu() for v in mhc.hc_pre(x, fn, base, scale, 20, 1e-6, 1e-6, weight)]
    _assert_within_rules("hc_pre", pre_args, got, reference_mhc.hc_pre(*pre_args))
    head_args = (cpu[0], *cpu[4:7], 1e-6, 1e-6, cpu[7])
    got = mhc.hc_head(x, head_fn, head_base, head_scale, 1e-6, 1e-6, weight).cpu()
    _assert_within_rules("hc_head", head_args, got, reference_mhc.hc_head(*head_args))


@on_gpu
@pytest.mark.parametrize("t", [1, 1024])
def test_gpu_hc_post_adds_the_two_parts_as_it_reads_f(t):
    """At V4-Flash width on a GPU: bit for bit hc_post of the parts' tensor sum (the fp32 sum of two
    bf16 values rounded once to bf16 in both)."""
    from seahal.backends.cuda import mhc

    gen = torch.Generator().manual_seed(t)
    f, addend = (torch.randn(1, t, 4096, generator=gen).to(BF16).cuda() for _ in range(2))
    x = torch.randn(1, t, 4, 4096, generator=gen).to(BF16).cuda()
    post = (2 * torch.sigmoid(torch.randn(1, t, 4, generator=gen))).cuda()
    comb = torch.softmax(torch.randn(1, t, 4, 4, generator=gen), dim=-2).cuda()
    assert torch.equal(mhc.hc_post(f, x, post, comb, addend), mhc.hc_post(f + addend, x, post, comb))


# (n, D, dtype, comb layout, post/comb dtype): D = 40 ends in a partial column block; n = 3 pads the stream axis.
@interpreted
@pytest.mark.parametrize("n, d, dtype, layout, param_dtype", [
    (4, 32, F32, "contiguous", F32), (3, 40, BF16, "transposed", F32), (4, 16, BF16, "contiguous", torch.float64),
])
def test_hc_post(kernels, n, d, dtype, layout, param_dtype):
    mhc, _ = kernels
    gen = torch.Generator().manual_seed(n * d)
    f = torch.randn(2, 3, d, generator=gen).to(dtype)
    x = torch.randn(2, 3, n, d, generator=gen).to(dtype)
    post = 2 * torch.sigmoid(torch.randn(2, 3, n, generator=gen))
    comb = torch.softmax(torch.randn(2, 3, n, n, generator=gen), dim=-2)
    comb = _transposed(comb) if layout == "transposed" else comb
    post, comb = post.to(param_dtype), comb.to(param_dtype)
    out = mhc.hc_post(f, x, post, comb)
    assert out.dtype == dtype and out.shape == x.shape
    exact = post.double()[..., None] * f.double()[..., None, :] + torch.einsum("bsij,bsid->bsjd", comb.double(), x.double())
    _assert_within_rules("hc_post", (f, x, post, comb), out, exact)
    _assert_within_rules("hc_post", (f, x, post, comb), out, reference_mhc.hc_post(f, x, post, comb))


@interpreted
@pytest.mark.parametrize("dtype, layout", [(BF16, "contiguous"), (F32, "every other column")])
def test_hc_post_adds_the_two_parts_as_it_reads_f(kernels, dtype, layout):
    """hc_post with the sub-layer output in two parts: bit for bit hc_post of their tensor sum (f
    rounded to its dtype once, as the add rounds it), the verified kernel after torch's add
    (``hc_post_after_the_add``) the same; parts that cancel exactly in some columns."""
    mhc, _ = kernels
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(2, 3, 40, generator=gen).to(dtype)
    addend = torch.randn(2, 3, 40, generator=gen).to(dtype)
    addend[..., ::7] = -f[..., ::7]
    if layout == "every other column":  # a column stride of 2
        wide = torch.zeros(2, 3, 80, dtype=dtype)
        wide[..., ::2] = addend
        addend = wide[..., ::2]
    x = torch.randn(2, 3, 4, 40, generator=gen).to(dtype)
    post = 2 * torch.sigmoid(torch.randn(2, 3, 4, generator=gen))
    comb = torch.softmax(torch.randn(2, 3, 4, 4, generator=gen), dim=-2)
    out = mhc.hc_post(f, x, post, comb, addend)
    assert torch.equal(out, mhc.hc_post(f + addend, x, post, comb))
    assert torch.equal(out, mhc.hc_post_after_the_add(f, x, post, comb, addend))
    args = (f, x, post, comb, addend)
    _assert_within_rules("hc_post", args, out, reference_mhc.hc_post(*args))


def _post_pre_inputs(b, s, n, d, dtype, seed, layout="contiguous"):
    """hc_post_pre's inputs: the finished sub-layer's output (in two parts), its weights as hc_pre
    makes them (post in (0, 2), comb column-stochastic) and the next sub-layer's mix parameters."""
    gen = torch.Generator().manual_seed(seed)
    f, addend = (torch.randn(b, s, d, generator=gen).to(dtype) for _ in range(2))
    post = 2 * torch.sigmoid(torch.randn(b, s, n, generator=gen))
    comb = torch.softmax(torch.randn(b, s, n, n, generator=gen), dim=-2)
    x, fn, base, scale = _hc_inputs(b, s, n, d, dtype, seed, layout)
    weight = torch.rand(d, generator=gen) + 0.5
    return f, addend, x, post, _transposed(comb) if layout == "transposed" else comb, fn, base, scale, weight


# (batch, seq, n, D, dtype, x layout): one token (a GEMV tile of one, the collapse in the mixing
# launch), 3 tokens (a GEMV tile of 4, one partial), and hc_post's kernel then hc_pre's at 6 tokens
# (a tl.dot tile); n = 3 pads the stream axis, D = 40 a partial column block.
POST_PRE_CASES = [
    (1, 1, 4, 32, BF16, "contiguous"), (3, 1, 3, 40, F32, "transposed"), (1, 3, 4, 40, BF16, "transposed"),
    (2, 3, 4, 32, F32, "contiguous"),
]


@interpreted
@pytest.mark.parametrize("b, s, n, d, dtype, layout", POST_PRE_CASES)
@pytest.mark.parametrize("parts, normed", [(False, False), (True, True)], ids=["plain", "addend+norm"])
def test_hc_post_pre_is_hc_post_then_hc_pre(kernels, b, s, n, d, dtype, layout, parts, normed):
    """hc_post_pre mixes the streams it makes in hc_pre's launch (up to 4 tokens): bit for bit
    hc_post's kernel then hc_pre's (the streams rounded to x's dtype before the mix, as hc_post
    stores them), its collapse in the mixing launch or in the collapse's launch after it; against
    the CPU reference within the rules."""
    mhc, _ = kernels
    f, addend, x, post, comb, fn, base, scale, weight = _post_pre_inputs(b, s, n, d, dtype, b * s + d, layout)
    addend, weight = (addend if parts else None), (weight if normed else None)
    args = (f, x, post, comb, fn, base, scale, 20, 1e-6, 1e-6, weight, addend)
    got = mhc.hc_post_pre(*args)
    streams = mhc.hc_post(f, x, post, comb, addend)
    want = (streams, *mhc.hc_pre(streams, fn, base, scale, 20, 1e-6, 1e-6, weight))
    for name, a, w in zip(("streams", "y", "post", "comb"), got, want, strict=True):
        assert a.dtype == w.dtype and a.shape == w.shape and torch.equal(a, w), name
    if b * s <= mhc.GEMV_MAX_TOKENS:  # the collapse's own launch reads the streams the mix stored
        posted = mhc.PostedStreams(f, post, comb, addend, torch.empty_like(streams))
        two = mhc.collapse_streams(x, fn, base, scale, 20, 1e-6, 1e-6, head=False, norm_weight=weight,
                                   one_launch=False, posted=posted)
        assert torch.equal(posted.out, streams) and all(torch.equal(a, w) for a, w in zip(two, want[1:]))
    reference = reference_mhc.hc_post_pre(*args)
    _assert_within_rules("hc_post", (f, x, post, comb, addend), got[0], reference[0])
    pre_args = (got[0], fn, base, scale, 20, 1e-6, 1e-6, weight)
    _assert_within_rules("hc_pre", pre_args, got[1:], reference_mhc.hc_pre(*pre_args))


@on_gpu
@pytest.mark.parametrize("t", [1, 4, 16, 1024])
def test_gpu_hc_post_pre_is_hc_post_then_hc_pre(t):
    """At V4-Flash width on a GPU: bit for bit hc_post's kernel then hc_pre's, with the MoE's two
    parts and the sub-layer norm (the model's boundary between an MoE and the next attention),
    launch after launch on the counters it resets."""
    from seahal.backends.cuda import mhc

    f, addend, x, post, comb, fn, base, scale, weight = (
        v.cuda() for v in _post_pre_inputs(1, t, 4, 4096, BF16, seed=t)
    )
    for _ in range(2):
        got = mhc.hc_post_pre(f, x, post, comb, fn, base, scale, 20, 1e-6, 1e-6, weight, addend)
        streams = mhc.hc_post(f, x, post, comb, addend)
        want = (streams, *mhc.hc_pre(streams, fn, base, scale, 20, 1e-6, 1e-6, weight))
        assert all(torch.equal(a, w) for a, w in zip(got, want, strict=True))


@interpreted
def test_empty_and_float64(kernels):
    mhc, rope = kernels
    x, fn, base, scale = _hc_inputs(0, 3, 4, 16, F32, seed=0)
    y, post, comb = mhc.hc_pre(x, fn, base, scale)
    assert (y.shape, post.shape, comb.shape) == ((0, 3, 16), (0, 3, 4), (0, 3, 4, 4))
    with pytest.raises(NotImplementedError, match="x must be bfloat16 or float32, got torch.float64"):
        mhc.hc_post(torch.zeros(1, 1, 8, dtype=torch.float64), torch.zeros(1, 1, 4, 8, dtype=torch.float64),
                    torch.zeros(1, 1, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(NotImplementedError, match="cuda.triton rope"):
        rope.rope(torch.zeros(1, 1, 1, 8, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.int64), torch.ones(2))
    with pytest.raises(NotImplementedError, match="cuda.triton rms_norm_rope: x must be bfloat16 or float32"):
        rope.rms_norm_rope(torch.zeros(1, 1, 1, 8, dtype=torch.float64), None, 1e-6, torch.zeros(1, 1, dtype=torch.int64),
                           torch.ones(2))
    with pytest.raises(NotImplementedError, match="heads of at most 2048 dims, got D=4096"):
        rope.rms_norm_rope(torch.zeros(1, 1, 1, 4096), None, 1e-6, torch.zeros(1, 1, dtype=torch.int64), torch.ones(2))
