"""mHC reference kernels (hc_pre, hc_post, hc_head) against brute force, Sinkhorn bounds and transformers.

The brute-force oracles below are written from v4_ops.md §5 with Python floats (float64) and explicit
loops over tokens, streams, rows and columns; they share no code with the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference.mhc import hc_head, hc_post, hc_pre

from hf_v4 import transformers_v4

N, D = 4, 32  # streams, hidden size: n*D = 128
ITERS, EPS, NORM_EPS = 20, 1e-6, 1e-6


def _params(seed: int, rows: int, n_scales: int, dtype=torch.float32, logit_scale: float = 1.0):
    """Random fn [rows, n*D], base [rows], scale [n_scales]; fn ~ N(0, 1/(n*D)) keeps mix ~ N(0, 1) and
    logit_scale sets the spread of the gate logits mix * scale + base."""
    g = torch.Generator().manual_seed(seed)
    fn = torch.randn(rows, N * D, generator=g, dtype=torch.float64) / math.sqrt(N * D)
    base = torch.randn(rows, generator=g, dtype=torch.float64) * 0.5 * logit_scale
    scale = (0.5 + torch.rand(n_scales, generator=g, dtype=torch.float64)) * logit_scale
    return fn.to(dtype), base.to(dtype), scale.to(dtype)


def _streams(seed: int, dtype, shape=(2, 3, N, D)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _brute_mix(x_tok: list[list[float]], fn: torch.Tensor, norm_eps: float) -> list[float]:
    """One token: mix_k = sum_e flat_e fn[k, e] / sqrt(mean(flat^2) + norm_eps), flat = streams concatenated."""
    flat = [v for stream in x_tok for v in stream]
    inv_rms = 1.0 / math.sqrt(math.fsum(v * v for v in flat) / len(flat) + norm_eps)
    return [math.fsum(a * b for a, b in zip(flat, row)) * inv_rms for row in fn.double().tolist()]


def _brute_sinkhorn(logits: list[list[float]], iters: int, eps: float) -> list[list[float]]:
    """Softmax over each row (j) + eps, column normalise, then (iters-1) x (rows, columns); explicit sums."""
    n = len(logits)
    c = []
    for row in logits:
        top = max(row)
        e = [math.exp(v - top) for v in row]
        total = math.fsum(e)
        c.append([v / total + eps for v in e])

    def columns(m):
        sums = [math.fsum(m[i][j] for i in range(n)) for j in range(n)]
        return [[m[i][j] / (sums[j] + eps) for j in range(n)] for i in range(n)]

    def rows(m):
        sums = [math.fsum(m[i]) for i in range(n)]
        return [[m[i][j] / (sums[i] + eps) for j in range(n)] for i in range(n)]

    c = columns(c)
    for _ in range(iters - 1):
        c = columns(rows(c))
    return c


def _brute_collapse(x_tok: list[list[float]], pre: list[float]) -> list[float]:
    return [math.fsum(pre[i] * x_tok[i][d] for i in range(len(pre))) for d in range(len(x_tok[0]))]


def _brute_hc_pre(x, fn, base, scale, iters=ITERS, eps=EPS, norm_eps=NORM_EPS):
    """float64 hc_pre by loops: returns (y, post, comb) as float64 tensors."""
    b_, s_, n, d = x.shape
    base_l, (s0, s1, s2) = base.double().tolist(), scale.double().tolist()
    ys, posts, combs = [], [], []
    for b in range(b_):
        for s in range(s_):
            x_tok = x[b, s].double().tolist()
            mix = _brute_mix(x_tok, fn, norm_eps)
            pre = [_sigmoid(mix[i] * s0 + base_l[i]) + eps for i in range(n)]
            posts.append([2 * _sigmoid(mix[n + i] * s1 + base_l[n + i]) for i in range(n)])
            logits = [[mix[2 * n + i * n + j] * s2 + base_l[2 * n + i * n + j] for j in range(n)] for i in range(n)]
            combs.append(_brute_sinkhorn(logits, iters, eps))
            ys.append(_brute_collapse(x_tok, pre))
    y, post, comb = (torch.tensor(v, dtype=torch.float64) for v in (ys, posts, combs))
    return y.reshape(b_, s_, d), post.reshape(b_, s_, n), comb.reshape(b_, s_, n, n)


def _brute_hc_head(x, fn, base, scale, eps=EPS, norm_eps=NORM_EPS):
    b_, s_, n, d = x.shape
    base_l, s0 = base.double().tolist(), float(scale[0])
    ys = []
    for b in range(b_):
        for s in range(s_):
            x_tok = x[b, s].double().tolist()
            mix = _brute_mix(x_tok, fn, norm_eps)
            ys.append(_brute_collapse(x_tok, [_sigmoid(mix[i] * s0 + base_l[i]) + eps for i in range(n)]))
    return torch.tensor(ys, dtype=torch.float64).reshape(b_, s_, d)


def _tol(dtype: torch.dtype) -> dict:
    """Tolerance for an output stored in dtype, computed from exactly representable inputs.

    float64: fp64 math, error ~ (n*D) * 2^-53 relative to the terms -> 1e-12.
    float32: fp32 math; a length-128 dot product is within 128 * 2^-24 ~ 8e-6 of the terms' magnitude
      (worst case), and sigmoid/softmax/Sinkhorn divisions add a few 2^-24 each -> rtol 2e-5, atol 2e-5
      (outputs are O(1): pre, post in (0, 2), comb in (0, 1), y ~ sum of 4 streams of std 2).
    bfloat16: the final cast rounds to 8 significant bits (half ulp 2^-9 relative) on top of fp32 math;
      one ulp (2^-8 relative) also covers a rounding flip -> rtol 2^-8, atol 2^-8 * 2^-4 for tiny y.
    """
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    if dtype == torch.float32:
        return dict(rtol=2e-5, atol=2e-5)
    return dict(rtol=2.0**-8, atol=2.0**-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_hc_pre_matches_brute_force(dtype):
    x = _streams(0, dtype)
    fn, base, scale = _params(1, (2 + N) * N, 3)
    y, post, comb = hc_pre(x, fn, base, scale, ITERS, EPS, NORM_EPS)
    y_ref, post_ref, comb_ref = _brute_hc_pre(x, fn, base, scale)
    assert y.dtype == dtype and post.dtype == torch.float32 and comb.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, **_tol(dtype))
    # post and comb are returned fp32 (contract): one fp32 rounding (2^-24) on top of the math above.
    params_tol = _tol(torch.float32)
    torch.testing.assert_close(post.double(), post_ref, **params_tol)
    torch.testing.assert_close(comb.double(), comb_ref, **params_tol)


def test_hc_pre_index_layout_and_iterations():
    """A non-default iteration count and eps are honoured, and a permuted fn changes the result.

    Swapping the pre and post rows of fn must swap the roles exactly as the brute force predicts, so a
    kernel reading mix in another order (e.g. comb column-major) cannot pass.
    """
    x = _streams(2, torch.float64, (1, 2, N, D))
    fn, base, scale = _params(3, (2 + N) * N, 3, torch.float64, logit_scale=3.0)
    for iters, eps in ((1, 1e-3), (3, 1e-6)):
        y, post, comb = hc_pre(x, fn, base, scale, iters, eps, 1e-3)
        y_ref, post_ref, comb_ref = _brute_hc_pre(x, fn, base, scale, iters, eps, 1e-3)
        torch.testing.assert_close(y, y_ref, **_tol(torch.float64))
        torch.testing.assert_close(post.double(), post_ref, rtol=2**-23, atol=0)  # fp32 rounding of fp64 math
        torch.testing.assert_close(comb.double(), comb_ref, rtol=2**-23, atol=0)
    # comb is not symmetric for these weights: a transposed layout would be caught above.
    assert (comb - comb.transpose(-1, -2)).abs().max() > 1e-2


def _birkhoff_rate(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """tanh(Delta/4) per token, Delta = log max_{i,j,k,l} (a_ij a_kl)/(a_il a_kj) of a = softmax_j + eps.

    Diagonal scalings (every Sinkhorn step) leave these cross ratios unchanged, so this is the
    Birkhoff-Hopf contraction ratio of the Hilbert projective metric for every iterate.
    """
    a = torch.softmax(logits.double(), dim=-1) + eps
    la = a.log()
    a_ij = la[..., :, :, None, None]  # dims (i, j, k, l)
    a_kl = la[..., None, None, :, :]
    a_il = la[..., :, None, None, :]
    a_kj = la.transpose(-1, -2)[..., None, :, :, None]
    delta = (a_ij + a_kl - a_il - a_kj).flatten(-4).amax(-1)
    return torch.tanh(delta / 4)


@pytest.mark.parametrize("logit_scale", [0.25, 1.0, 4.0])
def test_sinkhorn_is_nearly_doubly_stochastic(logit_scale):
    """Column sums: the last op divides each column by (its sum S + eps), so a column then sums to
    S/(S+eps) = 1 - eps/(S+eps): within eps (S ~ 1) plus fp32 rounding of n=4 terms (4 * 2^-24).

    Row sums: every step is a diagonal scaling, M_k = diag(u_k) A diag(v_k) with A = softmax_j + eps.
    After a column step the row sums are rho_k = u_k / u_{k+1}, so d_k = log(max rho_k / min rho_k) is
    the Hilbert distance between consecutive u's; u -> 1/(A (1/(A^T u))) contracts that distance by
    lambda^2, lambda = tanh(Delta(A)/4) (Birkhoff-Hopf), hence d_{iters-1} <= lambda^(2(iters-1)) d_0.
    Column sums ~1 make the mean row sum ~1, so |rho_i - 1| <= exp(d) - 1, plus (to first order) the
    eps and rounding slack n * (eps + 4 * 2^-24). Twenty iterations are NOT enough for wide logits:
    rows can be off by percents (logit_scale=4), which the bound states and the test accepts.
    """
    x = _streams(4, torch.float32, (3, 5, N, D))
    fn, base, scale = _params(5, (2 + N) * N, 3, logit_scale=logit_scale)
    _, _, comb = hc_pre(x, fn, base, scale, ITERS, EPS, NORM_EPS)
    col_sums, row_sums = comb.double().sum(-2), comb.double().sum(-1)
    rounding = 4 * 2.0**-24
    assert ((col_sums - 1).abs() <= EPS + rounding).all()

    # A and the first column normalisation, recomputed in float64 from the spec's mix formula
    flat = x.flatten(2).double()
    mix = flat @ fn.double().T / torch.sqrt(flat.square().mean(-1, keepdim=True) + NORM_EPS)
    logits = (mix[..., 2 * N :] * scale[2].double() + base[2 * N :].double()).unflatten(-1, (N, N))
    first = torch.softmax(logits, -1) + EPS
    first = first / (first.sum(-2, keepdim=True) + EPS)
    r0 = first.sum(-1)
    d0 = (r0.amax(-1) / r0.amin(-1)).log()
    lam = _birkhoff_rate(logits, EPS)
    bound = torch.expm1(lam ** (2 * (ITERS - 1)) * d0) + N * (EPS + rounding)
    assert ((row_sums - 1).abs().amax(-1) <= bound).all()
    if logit_scale == 0.25:  # narrow logits: the bound (and so the row sums) is at the eps level
        assert bound.max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_hc_post_matches_formula(dtype):
    """x'_j = post_j f + sum_i comb[i, j] x_i with an asymmetric comb (sum over the FIRST index)."""
    g = torch.Generator().manual_seed(6)
    b_, s_ = 2, 3
    x = _streams(7, dtype)
    f = torch.randn(b_, s_, D, generator=g, dtype=torch.float64).to(dtype)
    post = (2 * torch.rand(b_, s_, N, generator=g)).float()
    comb = torch.rand(b_, s_, N, N, generator=g).float()
    out = hc_post(f, x, post, comb)
    assert out.dtype == dtype and out.shape == x.shape

    expected = torch.empty(b_, s_, N, D, dtype=torch.float64)
    for b in range(b_):
        for s in range(s_):
            for j in range(N):
                for e in range(D):
                    terms = [float(post[b, s, j]) * float(f[b, s, e])]
                    terms += [float(comb[b, s, i, j]) * float(x[b, s, i, e]) for i in range(N)]
                    expected[b, s, j, e] = math.fsum(terms)
    torch.testing.assert_close(out.double(), expected, **_tol(dtype))
    # summing over the second index instead would be far off:
    wrong = post.double()[..., None] * f.double()[..., None, :] + comb.double() @ x.double()
    assert (wrong - expected).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_hc_head_matches_brute_force(dtype):
    x = _streams(8, dtype)
    fn, base, scale = _params(9, N, 1)
    y = hc_head(x, fn, base, scale, EPS, NORM_EPS)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), _brute_hc_head(x, fn, base, scale), **_tol(dtype))


# ---- transformers' DeepseekV4HyperConnection / DeepseekV4HyperHead as oracle ---------------------------


@pytest.fixture(scope="module")
def v4_modules():
    modeling = transformers_v4()
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    config = DeepseekV4Config(
        hidden_size=D, hc_mult=N, hc_sinkhorn_iters=ITERS, hc_eps=EPS, rms_norm_eps=NORM_EPS
    )
    hc = modeling.DeepseekV4HyperConnection(config)
    head = modeling.DeepseekV4HyperHead(config)
    fn, base, scale = _params(10, (2 + N) * N, 3, logit_scale=2.0)
    head_fn, head_base, head_scale = _params(11, N, 1)
    with torch.no_grad():
        hc.fn.copy_(fn), hc.base.copy_(base), hc.scale.copy_(scale)
        head.hc_fn.copy_(head_fn), head.hc_base.copy_(head_base), head.hc_scale.copy_(head_scale)
    return hc, head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_pre_and_post_match_transformers(v4_modules, dtype):
    hc, _ = v4_modules
    x = _streams(12, dtype)
    with torch.no_grad():
        post_tf, comb_tf, y_tf = hc(x)
    y, post, comb = hc_pre(x, hc.fn, hc.base, hc.scale, ITERS, EPS, NORM_EPS)
    # both compute in fp32, differing only in operation order (norm before/after the projection)
    torch.testing.assert_close(post, post_tf, **_tol(torch.float32))
    torch.testing.assert_close(comb, comb_tf, **_tol(torch.float32))
    torch.testing.assert_close(y.double(), y_tf.double(), **_tol(dtype))

    # the decoder layer's expansion (post f + comb^T @ x), evaluated in fp32 as our hc_post does
    f = _streams(13, torch.float32, (2, 3, D))
    x32 = x.float()
    expected = post_tf.unsqueeze(-1) * f.unsqueeze(-2) + torch.matmul(comb_tf.transpose(-1, -2), x32)
    torch.testing.assert_close(hc_post(f, x32, post, comb), expected, **_tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_head_matches_transformers(v4_modules, dtype):
    _, head = v4_modules
    x = _streams(14, dtype)
    with torch.no_grad():
        y_tf = head(x)
    y = hc_head(x, head.hc_fn, head.hc_base, head.hc_scale, EPS, NORM_EPS)
    torch.testing.assert_close(y.double(), y_tf.double(), **_tol(dtype))


# ---- through the HAL: contract, fake outputs and portability --------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_through_plan_outputs_match_contract(dtype):
    plan = hal.plan("cpu", ops=["hc_pre", "hc_post", "hc_head"], announce=False)
    x = _streams(15, dtype)
    fn, base, scale = _params(16, (2 + N) * N, 3)
    head_fn, head_base, head_scale = _params(17, N, 1)
    y, post, comb = plan.ops.hc_pre(x, fn, base, scale)
    out = plan.ops.hc_post(y, x, post, comb)
    z = plan.ops.hc_head(out, head_fn, head_base, head_scale)
    expected_meta = [
        *plan["hc_pre"].spec.contract(x, fn, base, scale),
        plan["hc_post"].spec.contract(y, x, post, comb),
        plan["hc_head"].spec.contract(out, head_fn, head_base, head_scale),
    ]
    for t, meta in zip((y, post, comb, out, z), expected_meta):
        assert (tuple(t.shape), t.dtype) == (meta.shape, meta.dtype)
    # whichever kernel the plan bound computes the reference's numbers
    y_ref, post_ref, comb_ref = hc_pre(x, fn, base, scale)
    torch.testing.assert_close(y.double(), y_ref.double(), **_tol(dtype))
    torch.testing.assert_close(comb, comb_ref, **_tol(torch.float32))
    torch.testing.assert_close(z.double(), hc_head(hc_post(y_ref, x, post_ref, comb_ref), head_fn, head_base,
                                                   head_scale).double(), **_tol(dtype))


def test_kernels_are_portable_on_meta_tensors():
    """No host synchronisation or value-dependent shapes: the kernels trace on the meta device."""
    meta = dict(device="meta")
    x = torch.empty(2, 3, N, D, dtype=torch.bfloat16, **meta)
    y, post, comb = hc_pre(
        x, torch.empty((2 + N) * N, N * D, **meta), torch.empty((2 + N) * N, **meta), torch.empty(3, **meta)
    )
    out = hc_post(y, x, post, comb)
    z = hc_head(out, torch.empty(N, N * D, **meta), torch.empty(N, **meta), torch.empty(1, **meta))
    assert [tuple(t.shape) for t in (y, post, comb, out, z)] == [
        (2, 3, D), (2, 3, N), (2, 3, N, N), (2, 3, N, D), (2, 3, D)
    ]
