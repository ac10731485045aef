"""CPU reference of the MoE ops (moe_gate, moe_experts) against independent references:
brute-force per-token loops in float64, hand-built routing cases, transformers' DeepSeek-V4
router/experts, and for bf16 / quantised experts an interval replay of every rounding step
(bf16 casts, FP8 activation quant, fp32 sums) that must contain the kernel's output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seahal import hal
from seahal.backends.cpu.reference.moe import moe_experts, moe_gate
from seahal.hal.formats import e8m0_scales

from hf_v4 import transformers_v4

FP32_U = 2.0**-24  # unit roundoff of fp32 (24 significant bits)
BF16_U = 2.0**-8  # bf16 (8 significant bits)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_TABLE = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float64)


def _assert_fp32_rounded(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 results of float64 math: only the final rounding, relative 2^-24 (2u for slack)."""
    assert ((actual.double() - expected).abs() <= 2 * FP32_U * expected.abs()).all()


def _assert_fp64_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float64 throughout: sums of ~100 terms of size <= 10 differ by far less than 1e-12."""
    assert ((actual - expected).abs() <= 1e-12 * (1 + expected.abs())).all()


# ---------------------------------------------------------------------------------------------
# gate


def _score(logit: float, score_func: str) -> float:
    if score_func == "sigmoid":
        return 1.0 / (1.0 + math.exp(-logit))
    softplus = logit if logit > 20 else math.log1p(math.exp(logit))
    return math.sqrt(softplus)


def _ranked(candidates, key):
    """Candidates by descending key, equal keys by smaller index."""
    return sorted(candidates, key=lambda i: (-key[i], i))


def _brute_force_gate(x, weight, bias, top_k, score_func, route_scale, n_groups=1, topk_groups=1, hash_ids=None):
    """Per-token loops in float64 -> (weights [T][k], indices [T][k]) as lists."""
    all_weights, all_indices = [], []
    for t, logits in enumerate((x.double() @ weight.double().T).tolist()):
        n_experts = len(logits)
        if score_func == "softmax":
            exps = [math.exp(v - max(logits)) for v in logits]
            scores = [v / sum(exps) for v in exps]
        else:
            scores = [_score(v, score_func) for v in logits]
        if hash_ids is not None:
            indices = hash_ids[t]
        else:
            key = [scores[e] + (0.0 if bias is None else bias[e].item()) for e in range(n_experts)]
            size = n_experts // n_groups
            group_score = [sum(sorted(key[g * size : (g + 1) * size])[-2:]) for g in range(n_groups)]
            kept = _ranked(range(n_groups), group_score)[:topk_groups]
            allowed = [e for e in range(n_experts) if e // size in kept]
            indices = _ranked(allowed, key)[:top_k]
        picked = [scores[e] for e in indices]
        if score_func != "softmax":
            picked = [v / (sum(picked) + 1e-20) for v in picked]
        all_weights.append([v * route_scale for v in picked])
        all_indices.append(indices)
    return all_weights, all_indices


def _gate_inputs(seed, tokens=12, dim=64, experts=16, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen, dtype=torch.float64)
    x[0] *= 40  # some logits beyond softplus' threshold of 20
    weight = torch.randn(experts, dim, generator=gen, dtype=torch.float64) / dim**0.5
    bias = torch.randn(experts, generator=gen, dtype=torch.float64) * 0.1
    return x.to(dtype), weight.to(dtype), bias.float()


def _score_relative_error_bound(x, weight, score_func):
    """Relative error of fp32 scores/weights per token.

    fp32 logits from D products err by <= D u sum|x_i w_i| (u = 2^-24); |d ln s / dl| <= 1 for
    sigmoid and sqrt(softplus) and <= 2 for softmax; normalising doubles it; +8u for the remaining
    roundings.
    """
    logit_err = x.shape[1] * FP32_U * (x.double().abs() @ weight.double().abs().T)
    per_token = logit_err.amax(dim=1, keepdim=True)
    slope = 2.0 if score_func == "softmax" else 1.0
    return 2 * slope * per_token + 8 * FP32_U


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gate_matches_brute_force(score_func, groups, dtype):
    x, weight, bias = _gate_inputs(seed=10, dtype=dtype)
    n_groups, topk_groups = groups
    weights, indices = moe_gate(x, weight, bias, 4, score_func, 2.5, n_groups, topk_groups)
    expected_w, expected_idx = _brute_force_gate(x, weight, bias, 4, score_func, 2.5, n_groups, topk_groups)
    assert weights.dtype == torch.float32 and indices.dtype == torch.int32
    # In fp32 too: this data's k-th/(k+1)-th key gaps (>= 6e-5) dwarf fp32 score errors (~1e-7).
    assert indices.tolist() == expected_idx
    # fp64 math: only the fp32 output rounding (relative 2^-24) remains.
    rtol = 2 * FP32_U if dtype == torch.float64 else _score_relative_error_bound(x, weight, score_func)
    expected = torch.tensor(expected_w, dtype=torch.float64)
    assert ((weights.double() - expected).abs() <= rtol * expected.abs()).all()


def test_gate_bias_changes_selection_but_not_weights():
    x, weight, _ = _gate_inputs(seed=11)
    bias = torch.zeros(16)
    bias[[3, 9]] = 10.0  # larger than any score difference: experts 3 and 9 always win
    weights, indices = moe_gate(x, weight, bias, 2, "sqrtsoftplus", 1.5)
    assert indices.sort(dim=1).values.tolist() == [[3, 9]] * x.shape[0]
    _, unbiased_idx = moe_gate(x, weight, None, 2, "sqrtsoftplus", 1.5)
    assert unbiased_idx.sort(dim=1).values.tolist() != indices.sort(dim=1).values.tolist()
    scores = F.softplus(x @ weight.T).sqrt().gather(1, indices.long())
    expected = scores / scores.sum(dim=1, keepdim=True) * 1.5
    _assert_fp32_rounded(weights.double(), expected)


def test_gate_ties_go_to_the_smaller_expert_index():
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(12))
    # All scores equal: the first k experts, in index order, each with weight 1/k.
    weights, indices = moe_gate(x, torch.zeros(8, 32), None, 3, "sigmoid", 1.0)
    assert indices.tolist() == [[0, 1, 2]] * 3
    assert torch.equal(weights, torch.full((3, 3), 1 / 3))
    # Equal biased keys 0.5 + 1 on experts 2, 4, 6, 7: the three smallest of them.
    bias = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    _, indices = moe_gate(x, torch.zeros(8, 32), bias, 3, "sigmoid", 1.0)
    assert indices.tolist() == [[2, 4, 6]] * 3
    # Duplicate weight rows: identical scores, the smaller index first.
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(13))
    weight[5] = weight[2] = 10 * x[0]
    _, indices = moe_gate(x[:1], weight, None, 2, "sqrtsoftplus", 1.0)
    assert indices.tolist() == [[2, 5]]


def test_gate_hash_routing_ignores_bias():
    x, weight, _ = _gate_inputs(seed=14)
    gen = torch.Generator().manual_seed(15)
    tid2eid = torch.stack([torch.randperm(16, generator=gen)[:3] for _ in range(50)]).to(torch.int32)
    input_ids = torch.randint(0, 50, (x.shape[0],), generator=gen)
    bias = torch.full((16,), 100.0)
    bias[0] = 1e4
    weights, indices = moe_gate(x, weight, bias, 3, "sqrtsoftplus", 1.5, input_ids=input_ids, tid2eid=tid2eid)
    assert torch.equal(indices, tid2eid[input_ids])
    expected_w, _ = _brute_force_gate(x, weight, None, 3, "sqrtsoftplus", 1.5, hash_ids=tid2eid[input_ids].tolist())
    _assert_fp32_rounded(weights.double(), torch.tensor(expected_w, dtype=torch.float64))


def test_gate_group_limited_hand_built():
    """Keys 0.5 + bias; group scores (top-2 sums) 1.9, 2.2, 1.95, 1.0: groups 1 and 2 survive, so
    expert 0 (the best single key) is excluded: top-2 = expert 4, then 2 (tie with 3)."""
    bias = torch.tensor([0.9, 0.0, 0.6, 0.6, 0.85, 0.1, 0.0, 0.0]) - 0.5
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(16))
    weights, indices = moe_gate(x, torch.zeros(8, 16), bias, 2, "sigmoid", 2.0, n_groups=4, topk_groups=2)
    assert indices.tolist() == [[4, 2]] * 2
    assert torch.equal(weights, torch.ones(2, 2))
    _, ungrouped = moe_gate(x, torch.zeros(8, 16), bias, 2, "sigmoid", 2.0)
    assert ungrouped.tolist() == [[0, 4]] * 2


def test_gate_softmax_weights_are_not_renormalised():
    x, weight, bias = _gate_inputs(seed=17)
    weights, indices = moe_gate(x, weight, bias, 4, "softmax", 1.0)
    probs = torch.softmax(x @ weight.T, dim=-1)
    _assert_fp32_rounded(weights.double(), probs.gather(1, indices.long()))
    assert (weights.sum(dim=1) < 1).all()


def test_gate_through_plan_rejects_top_k_beyond_kept_groups():
    plan = hal.plan("cpu", ops=["moe_gate"], announce=False, environ={"SEAHAL_OPS": "moe_gate=cpu.reference"})
    x, weight, bias = _gate_inputs(seed=18, dtype=torch.float32)
    weights, indices = plan.ops.moe_gate(x, weight, bias, 4, "sqrtsoftplus", 1.5, 4, 2)
    assert weights.shape == indices.shape == (x.shape[0], 4)
    with pytest.raises(Exception, match="top_k"):
        plan.ops.moe_gate(x, weight, bias, 5, "sqrtsoftplus", 1.5, 4, 1)


def _hf_config(**overrides):
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    args = dict(
        vocab_size=64, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2, n_routed_experts=16,
        num_experts_per_tok=4, routed_scaling_factor=1.5, swiglu_limit=10.0,
    )
    return DeepseekV4Config(**{**args, **overrides})


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid"])
def test_gate_matches_transformers_topk_router(score_func):
    modeling = transformers_v4()
    x, weight, bias = _gate_inputs(seed=19)
    router = modeling.DeepseekV4TopKRouter(_hf_config(scoring_func=score_func)).double()
    with torch.no_grad():
        router.weight.copy_(weight)
        router.e_score_correction_bias.copy_(bias)
        _, hf_weights, hf_indices = router(x)
    weights, indices = moe_gate(x, weight, bias, 4, score_func, 1.5)
    order = hf_indices.argsort(dim=1)  # HF's top-k is unsorted: compare as sets
    assert torch.equal(indices.sort(dim=1).values.long(), hf_indices.gather(1, order))
    ours = weights.double().gather(1, indices.long().argsort(dim=1))
    _assert_fp32_rounded(ours, hf_weights.gather(1, order))


def test_gate_matches_transformers_hash_router():
    modeling = transformers_v4()
    x, weight, bias = _gate_inputs(seed=20)
    gen = torch.Generator().manual_seed(21)
    tid2eid = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(64)])
    input_ids = torch.randint(0, 64, (x.shape[0],), generator=gen)
    router = modeling.DeepseekV4HashRouter(_hf_config()).double()
    with torch.no_grad():
        router.weight.copy_(weight)
        router.tid2eid.copy_(tid2eid)
        _, hf_weights, hf_indices = router(x, input_ids)
    weights, indices = moe_gate(x, weight, bias, 4, "sqrtsoftplus", 1.5, input_ids=input_ids, tid2eid=tid2eid)
    assert torch.equal(indices.long(), hf_indices)
    _assert_fp32_rounded(weights.double(), hf_weights)


# ---------------------------------------------------------------------------------------------
# experts


def _brute_force_experts(x, topk_weights, topk_ids, w1, w3, w2, limit):
    """Per token, per routed expert, in float64: ``sum_k W2 (w_k silu(min(g, L)) clamp(u, -L, L))``."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e < 0:
                continue
            gate, up = w1[e].double() @ x[t].double(), w3[e].double() @ x[t].double()
            if limit > 0:
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            out[t] += w2[e].double() @ (float(topk_weights[t, k]) * F.silu(gate) * up)
    return out


def _routing(seed, tokens, k, experts, *, no_token_expert=0):
    """Random distinct ids per token, never ``no_token_expert``, one -1 slot; weights in [0.1, 1.1)."""
    gen = torch.Generator().manual_seed(seed)
    choices = [e for e in range(experts) if e != no_token_expert]
    ids = torch.stack([torch.tensor(choices)[torch.randperm(len(choices), generator=gen)[:k]] for _ in range(tokens)])
    ids[1, -1] = -1
    weights = torch.rand(tokens, k, generator=gen) + 0.1
    return weights, ids.to(torch.int32)


def _dense_weights(seed, experts, inter, dim, dtype=torch.float64, gain=3.0):
    """W1, W3: [E, I, D], W2: [E, D, I]; gain makes some gate/up values pass the clamp limit 10."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(experts, inter, dim, generator=gen, dtype=torch.float64) * gain / dim**0.5
    w3 = torch.randn(experts, inter, dim, generator=gen, dtype=torch.float64) * gain / dim**0.5
    w2 = torch.randn(experts, dim, inter, generator=gen, dtype=torch.float64) / inter**0.5
    return w1.to(dtype), w3.to(dtype), w2.to(dtype)


@pytest.mark.parametrize("limit", [10.0, 0.0])
def test_experts_dense_match_brute_force_float64(limit):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(30), dtype=torch.float64) * 2
    w1, w3, w2 = _dense_weights(31, experts=5, inter=32, dim=64)
    weights, ids = _routing(32, tokens=6, k=2, experts=5, no_token_expert=0)
    ups = torch.einsum("td,eid->tei", x, w3)
    assert (ups.abs() > 10).any()  # the clamp matters on this data
    out = moe_experts(x, weights, ids, w1, None, w3, None, w2, None, limit)
    assert out.dtype == torch.float64
    expected = _brute_force_experts(x, weights, ids, w1, w3, w2, limit)
    _assert_fp64_close(out, expected)


def test_experts_tokens_all_on_one_expert_and_unrouted_tokens():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
    w1, w3, w2 = _dense_weights(34, experts=4, inter=32, dim=64)
    ids = torch.tensor([[2, -1], [2, -1], [-1, 2], [-1, -1]], dtype=torch.int32)
    weights = torch.tensor([[0.5, float("nan")], [1.0, 7.0], [float("nan"), 2.0], [float("nan"), 3.0]])
    x[3] = float("inf")  # an unrouted token contributes nothing, not inf * 0
    out = moe_experts(x, weights.double(), ids, w1, None, w3, None, w2, None, 10.0)
    assert torch.equal(out[3], torch.zeros(64, dtype=torch.float64))
    clean = torch.nan_to_num(weights, nan=0.0)
    expected = _brute_force_experts(x[:3], clean[:3], ids[:3], w1, w3, w2, 10.0)
    _assert_fp64_close(out[:3], expected)


def test_experts_match_transformers_experts_float64():
    """HF multiplies the routing weight after W2: identical for dense weights up to fp64 rounding."""
    modeling = transformers_v4()
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(35), dtype=torch.float64)
    w1, w3, w2 = _dense_weights(36, experts=16, inter=32, dim=64)
    weights, ids = _routing(37, tokens=7, k=4, experts=16)
    ids[1, -1] = 5  # HF has no -1 slots
    experts = modeling.DeepseekV4Experts(_hf_config()).double()
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.cat((w1, w3), dim=1))
        experts.down_proj.copy_(w2)
        expected = experts(x, ids.long(), weights.double())
    out = moe_experts(x, weights.double(), ids, w1, None, w3, None, w2, None, 10.0)
    _assert_fp64_close(out, expected)


def _fp8_block_quantise(w: torch.Tensor, e8m0: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[E, R, C] -> (e4m3, scales [E, R/128, C/128] fp32 or e8m0, float64 dequantised weight)."""
    experts, rows, cols = w.shape
    blocks = w.reshape(experts, rows // 128, 128, cols // 128, 128)
    scale = blocks.abs().amax(dim=(2, 4)) / 448
    if e8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    expand = scale[:, :, None, :, None]
    q = (blocks / expand).clamp(-448, 448).to(torch.float8_e4m3fn)
    dequantised = (q.double() * expand).reshape(w.shape)
    stored = e8m0_scales((torch.log2(scale) + 127).to(torch.uint8)) if e8m0 else scale.float()
    return q.reshape(w.shape), stored, dequantised


def _fp4_quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[E, R, C] -> (packed [E, R, C/2] uint8 low nibble first, e8m0 [E, R, C/32], float64 dequantised).

    Scale 2^ceil(log2(amax/6)) per 32 K; each value takes the nearest e2m1 code.
    """
    tiles = w.double().unflatten(-1, (-1, 32))
    scale = torch.exp2(torch.ceil(torch.log2(tiles.abs().amax(dim=-1) / 6)))
    code = ((tiles / scale[..., None]).unsqueeze(-1) - E2M1_TABLE).abs().argmin(dim=-1).flatten(-2)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    dequantised = (E2M1_TABLE[code].unflatten(-1, (-1, 32)) * scale[..., None]).flatten(-2)
    exponent = (torch.log2(scale) + 127).to(torch.uint8)
    return packed, e8m0_scales(exponent), dequantised


def _fp32_outward(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 interval holding [lo, hi] (float64 endpoints rounded down / up to fp32)."""
    lo32, hi32 = lo.float(), hi.float()
    lo32 = torch.where(lo32.double() > lo, torch.nextafter(lo32, torch.tensor(-math.inf)), lo32)
    hi32 = torch.where(hi32.double() < hi, torch.nextafter(hi32, torch.tensor(math.inf)), hi32)
    return lo32, hi32


def _round_interval(lo, hi, dtype):
    """Where fp32 values in [lo, hi] land after rounding to dtype (rounding is monotone)."""
    lo32, hi32 = _fp32_outward(lo, hi)
    return lo32.to(dtype).double(), hi32.to(dtype).double()


def _widen(lo, hi, relative):
    """Room for one fp32 operation with relative error <= ``relative``."""
    slack = relative * torch.maximum(lo.abs(), hi.abs())
    return lo - slack, hi + slack


def _fp8_act_quant_interval(lo, hi):
    """Where FP8 1x128 activation quant + dequant sends fp32 values in [lo, hi] (per element).

    Spec §11.1: ``s = 2^ceil(log2(max(amax, 1e-4) / 448))`` per 128-tile, ``q = e4m3(clamp(x/s))``.
    s is monotone in the tile's amax, so it lies between the scales of the smallest and largest
    possible amax; for each candidate scale ``s * e4m3(x/s)`` is monotone in x.
    """
    lo32, hi32 = (t.unflatten(-1, (-1, 128)) for t in _fp32_outward(lo, hi))
    crosses_zero = (lo32 <= 0) & (hi32 >= 0)
    magnitude_lo = torch.where(crosses_zero, 0.0, torch.minimum(lo32.abs(), hi32.abs()))
    magnitude_hi = torch.maximum(lo32.abs(), hi32.abs())
    scales = [
        torch.exp2(torch.ceil(torch.log2((m.amax(dim=-1, keepdim=True).clamp(min=1e-4) / 448).double())))
        for m in (magnitude_lo, magnitude_hi)
    ]
    assert (scales[1] <= 2 * scales[0]).all()  # powers of two: no candidate in between

    def dequantised(x32, scale):
        return (x32 / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn).double() * scale

    out_lo = torch.minimum(*(dequantised(lo32, sc) for sc in scales))
    out_hi = torch.maximum(*(dequantised(hi32, sc) for sc in scales))
    return out_lo.flatten(-2), out_hi.flatten(-2)


def _interval_matmul(lo, hi, w, equation):
    """Range of an fp32-accumulated ``v . w`` over v in [lo, hi], w exact: the float64 interval
    product plus fp32 summation error over K terms, <= (K + 4) u sum|v w| (+4: the scale products)."""
    mid, radius, w_abs = (lo + hi) / 2, (hi - lo) / 2, w.abs()
    center = torch.einsum(equation, mid, w)
    spread = torch.einsum(equation, radius, w_abs)
    spread += (w.shape[-1] + 4) * FP32_U * torch.einsum(equation, torch.maximum(lo.abs(), hi.abs()), w_abs)
    return center - spread, center + spread


def _interval_product(lo1, hi1, lo2, hi2):
    products = torch.stack((lo1 * lo2, lo1 * hi2, hi1 * lo2, hi1 * hi2))
    return _widen(products.amin(dim=0), products.amax(dim=0), FP32_U)


SILU_ARGMIN, SILU_MIN = -1.2784645427610738, -0.2784645427610738 - 1e-12


def _silu_interval(lo, hi):
    """silu falls until SILU_ARGMIN and rises after; fp32 silu errs by a few ulp (4u)."""
    silu_lo, silu_hi = F.silu(lo), F.silu(hi)
    low = torch.where(lo >= SILU_ARGMIN, silu_lo, torch.where(hi <= SILU_ARGMIN, silu_hi, SILU_MIN))
    return _widen(low, torch.maximum(silu_lo, silu_hi), 4 * FP32_U)


def _experts_interval(x, topk_weights, topk_ids, w1, w3, w2, limit, quantised):
    """Interval per output element certain to hold the kernel's result, by propagating intervals
    through every step of §10 (exact weights given in float64, dequantised for FP8/FP4): each
    rounding to bf16 / e4m3 maps its interval's endpoints (monotone), each fp32 sum or product
    widens it by its error bound. Not shared with the kernel: the quantisation here is written from
    the spec with torch casts."""
    ids, valid = topk_ids.long().clamp(min=0), (topk_ids >= 0).unsqueeze(-1)
    route = torch.where(valid.squeeze(-1), topk_weights.double(), 0.0).unsqueeze(-1)
    xd = x.double()
    x_lo, x_hi = _fp8_act_quant_interval(xd, xd) if quantised else (xd, xd)
    gate = _interval_matmul(x_lo, x_hi, w1[ids], "td,tkid->tki")
    up = _interval_matmul(x_lo, x_hi, w3[ids], "td,tkid->tki")
    if limit > 0:
        gate = (gate[0].clamp(max=limit), gate[1].clamp(max=limit))
        up = (up[0].clamp(-limit, limit), up[1].clamp(-limit, limit))
    h_lo, h_hi = _interval_product(*_silu_interval(*gate), *up)
    h_lo, h_hi = _round_interval(*_widen(route * h_lo, route * h_hi, FP32_U), x.dtype)
    if quantised:
        h_lo, h_hi = _fp8_act_quant_interval(h_lo, h_hi)
    out_lo, out_hi = _round_interval(*_interval_matmul(h_lo, h_hi, w2[ids], "tki,tkdi->tkd"), x.dtype)
    out_lo, out_hi = torch.where(valid, out_lo, 0.0), torch.where(valid, out_hi, 0.0)
    y_lo, y_hi = _widen(out_lo.sum(dim=1), out_hi.sum(dim=1), topk_ids.shape[1] * FP32_U)
    return _round_interval(y_lo, y_hi, x.dtype)


def _assert_in_interval(out, interval):
    lo, hi = interval
    out = out.double()
    assert ((lo <= out) & (out <= hi)).all(), f"max excess {torch.maximum(lo - out, out - hi).max().item()}"
    # The check is sharp: a typical interval is at most a bf16 step of the output's scale wide.
    assert (hi - lo).median() <= 2 * BF16_U * ((lo + hi) / 2).square().mean().sqrt()


def test_experts_bf16_dense_within_rounding_interval():
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(40)).to(torch.bfloat16)
    w1, w3, w2 = _dense_weights(41, experts=4, inter=64, dim=128, dtype=torch.bfloat16)
    weights, ids = _routing(42, tokens=8, k=2, experts=4)
    out = moe_experts(x, weights, ids, w1, None, w3, None, w2, None, 10.0)
    assert out.dtype == torch.bfloat16
    _assert_in_interval(out, _experts_interval(x, weights, ids, w1.double(), w3.double(), w2.double(), 10.0, False))


@pytest.mark.parametrize("weight_format", ["fp8-fp32-scales", "fp8-e8m0-scales", "fp4"])
def test_experts_quantised_within_rounding_interval(weight_format):
    """Every FP8 activation quant (e4m3: 2^-4 relative), bf16 cast (2^-8) and fp32 sum of the kernel
    is replayed as an interval; the dequantised weights are exact in float64."""
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(43)).to(torch.bfloat16)
    w1, w3, w2 = _dense_weights(44, experts=4, inter=128, dim=256, dtype=torch.float32)
    weights, ids = _routing(45, tokens=8, k=2, experts=4)
    if weight_format == "fp4":
        quantised = [_fp4_quantise(w) for w in (w1, w3, w2)]
    else:
        quantised = [_fp8_block_quantise(w, e8m0=weight_format == "fp8-e8m0-scales") for w in (w1, w3, w2)]
    (q1, s1, d1), (q3, s3, d3), (q2, s2, d2) = quantised
    plan = hal.plan("cpu", ops=["moe_experts"], announce=False, environ={"SEAHAL_OPS": "moe_experts=cpu.reference"})
    out = plan.ops.moe_experts(x, weights, ids, q1, s1, q3, s3, q2, s2, 10.0)
    _assert_in_interval(out, _experts_interval(x, weights, ids, d1, d3, d2, 10.0, quantised=True))


def test_experts_routing_weight_precedes_the_down_projection_quant():
    """Weight 1e-12 times |h| <= silu(10)*10 gives |w h| < 1e-10, below half the smallest e4m3 step
    at the floored scale (2^-22 * 2^-10 ~ 2.3e-10): the FP8 input of W2 is all zeros, y == 0 exactly.
    Applying the weight after W2 (transformers) would give a tiny non-zero y instead."""
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(46)).to(torch.bfloat16)
    w1, w3, w2 = (_fp8_block_quantise(w, e8m0=True) for w in _dense_weights(47, 2, 128, 128, torch.float32))
    ids = torch.tensor([[0, 1], [1, -1]], dtype=torch.int32)
    weights = torch.tensor([[1e-12, 1e-12], [1.0, 0.0]])
    out = moe_experts(x, weights, ids, w1[0], w1[1], w3[0], w3[1], w2[0], w2[1], 10.0)
    assert torch.equal(out[0], torch.zeros(128, dtype=torch.bfloat16))
    assert out[1].abs().sum() > 0


def test_moe_parts_round_the_routed_and_shared_sum_once():
    """MoE.parts hands the block (routed, shared) for hc_post to add (one rounding of their fp32
    sum, as torch's add); where the routed part is an fp32 partial sum (expert parallelism) it
    returns that sum with the shared output rounded once instead: a bf16 routed part first would
    round twice."""
    from seahal.model.config import ModelConfig
    from seahal.model.moe import MoE
    from seahal.model.tiny import TINY_CONFIG

    config = ModelConfig.from_dict({**TINY_CONFIG, "dtype": "bf16"})
    moe = MoE(config, 2, hal.plan("cpu", announce=False).ops)  # an fp32 gate, as the model's
    for experts in (moe.experts, moe.shared_experts):
        experts.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, config.dim, generator=gen).bfloat16()
    ids = torch.randint(0, config.vocab_size, (1, 5), generator=gen)
    routed, shared = moe.parts(x, ids)
    assert routed.dtype == shared.dtype == torch.bfloat16
    assert torch.equal(moe(x, ids), routed + shared)
    fp32_routed = routed.float() + 2.0**-12  # not a bf16 value: what an EP reduction may return
    moe._routed = lambda flat, ids, layout: fp32_routed.reshape(flat.shape)
    out, none = moe.parts(x, ids)
    assert none is None and torch.equal(out, (fp32_routed + shared.float()).bfloat16())
