"""The cuda backend's Triton MoE router (op ``moe_gate``): under the Triton interpreter on CPU, and on a GPU.

Two independent figures: the CPU reference kernel (selection must match it exactly, ties to the
smaller expert included) and a float64 brute force of the formula (scores, per-token sorted
selection, renormalised weights) written out here. Interpreter tests run in a subprocess with
TRITON_INTERPRET=1 (see test_cuda_interpret.py for why); GPU tests need a CUDA device.
"""

from __future__ import annotations

import math

import pytest
import torch

from seahal.testing.triton_interpreter import require_triton

triton = require_triton()

from seahal.testing import triton_interpreter  # noqa: E402

from seahal.backends.cpu.reference.moe import moe_gate as reference

from cuda_marks import interpreted, on_gpu  # noqa: E402

WEIGHT_TOL = 1e-6
"""fp32 weights: logits summed in another order (~2^-24 * sqrt(D) relative, D <= 96 here), scores
and the renormalisation add a few ulp; 1e-6 absolute on weights <= route_scale = 1.5."""


def test_under_interpreter():
    run = triton_interpreter.rerun_test_file(__file__)
    assert run.passed(), run.report


@pytest.fixture(scope="module")
def gate():
    """The kernel module, imported under the interpreter (bf16 data goes through the fp32 dot there)."""
    from seahal.backends.cuda import moe_gate

    return moe_gate


def _brute_force(x, weight, bias, top_k, score_func, route_scale, n_groups=1, topk_groups=1, input_ids=None, tid2eid=None):
    """float64 weights [T, k] and indices [T, k]: one token at a time, sorted by (-key, expert)."""
    logits = x.double() @ weight.double().T
    weights, indices = [], []
    for t, row in enumerate(logits.tolist()):
        if score_func == "softmax":
            peak = max(row)
            total = sum(math.exp(v - peak) for v in row)
            scores = [math.exp(v - peak) / total for v in row]
        elif score_func == "sigmoid":
            scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
        else:
            scores = [math.sqrt(v if v > 20 else math.log1p(math.exp(v))) for v in row]
        if tid2eid is not None:
            picked = [int(e) for e in tid2eid[int(input_ids[t])]]
        else:
            key = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
            picked = sorted(range(len(key)), key=lambda e: (-key[e], e))[:top_k]
        w = [scores[e] for e in picked]
        if score_func != "softmax":
            w = [v / sum(w) for v in w]
        weights.append([v * route_scale for v in w])
        indices.append(picked)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(indices)


def _inputs(t, d, e, seed, dtype=torch.float32, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen).to(dtype)
    weight = (torch.randn(e, d, generator=gen) * d**-0.5).to(dtype)
    b = torch.randn(e, generator=gen) * 0.1 if bias else None
    return x, weight, b


def _check(gate, args):
    """Kernel vs reference (indices exact, weights to WEIGHT_TOL) and vs the brute force."""
    w, idx = gate.moe_gate(*args)
    ref_w, ref_idx = reference(*args)
    assert w.dtype == torch.float32 and idx.dtype == torch.int32 and w.shape == ref_w.shape
    assert torch.equal(idx, ref_idx)
    assert (w - ref_w).abs().max() < WEIGHT_TOL
    bf_w, bf_idx = _brute_force(*args)
    assert torch.equal(idx.long(), bf_idx)
    assert (w.double() - bf_w).abs().max() < 2e-6  # fp32 result vs float64: a few 2^-24 relative on ~1


@interpreted
@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_score_funcs(gate, score_func, dtype):
    # T=19: a partial token tile and route block; E=40: padded expert rows; D=96: 2 slices, partial blocks
    x, weight, bias = _inputs(19, 96, 40, seed=len(score_func), dtype=dtype)
    _check(gate, (x, weight, bias, 6, score_func, 1.5))


@interpreted
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_tokens_take_the_gemv(gate, t, dtype):
    # up to 4 tokens over a W the MMA does not take (always so under the interpreter) the logits are
    # a CUDA-core GEMV: a token tile of 1 or 4 rows (3 tokens: one masked), D=96 in 2 slices of 32-
    # feature steps, E=40 with padded experts
    x, weight, bias = _inputs(t, 96, 40, seed=t, dtype=dtype)
    config = gate.gate_config(t, 40, 96, x.device, mma=False)
    assert config.gemv and config.block_t == {1: 1, 3: 4}[t]
    _check(gate, (x, weight, bias, 6, "sqrtsoftplus", 1.5))


@interpreted
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_no_bias_and_top_k(gate, top_k):
    x, weight, _ = _inputs(9, 64, 16, seed=top_k)
    _check(gate, (x, weight, None, top_k, "sqrtsoftplus", 2.5))


@interpreted
@pytest.mark.parametrize("route_t", [2, 4, 8])
def test_route_blocks(gate, route_t):
    # T=11: the last routing block is partial for every block size
    x, weight, bias = _inputs(11, 64, 24, seed=route_t)
    w, idx = gate.route(gate.gate_logits(x, weight), bias, 6, "softmax", 1.5, route_t=route_t)
    ref_w, ref_idx = reference(x, weight, bias, 6, "softmax", 1.5)
    assert torch.equal(idx, ref_idx)
    assert (w - ref_w).abs().max() < WEIGHT_TOL


@interpreted
def test_fp32_gate_weight_multiplies_in_three_exact_parts(gate):
    """bf16 x against an fp32 W (the model's gate) above 4 tokens: W's three bf16 parts sum to W
    exactly, so a token that is one feature's power of two has W's column for logits, bit for bit
    (a part left out fails), and the router picks as the reference does."""
    t, d, e = 19, 96, 40
    x, weight, bias = _inputs(t, d, e, seed=13)
    feature = torch.arange(t) * 5 % d
    hot = torch.zeros(t, d, dtype=torch.bfloat16)
    hot[torch.arange(t), feature] = 2.0**-3
    assert not gate.gate_config(t, e, d, hot.device, mma=False).gemv
    assert torch.equal(gate.gate_logits(hot, weight).sum(0), weight[:, feature].T * 2.0**-3)
    _check(gate, (x.to(torch.bfloat16), weight, bias, 6, "sqrtsoftplus", 1.5))


@interpreted
def test_mixed_dtypes_and_strides(gate):
    x, weight, bias = _inputs(12, 64, 24, seed=3)
    x_sliced = torch.randn(12, 80)[:, 8:72]
    x_sliced.copy_(x)
    weight_t = weight.T.contiguous().T  # column-major [E, D]
    _check(gate, (x_sliced.to(torch.bfloat16), weight_t, bias, 6, "sigmoid", 1.0))


@interpreted
@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "softmax"])
def test_ties_go_to_the_smaller_expert(gate, score_func):
    x, weight, bias = _inputs(10, 64, 32, seed=7)
    weight[[5, 9, 20]] = weight[1].clone()  # four identical experts: exact ties in every token
    bias[[5, 9, 20]] = bias[1].clone()
    x[0] = 0.0  # every logit of token 0 ties
    w, idx = gate.moe_gate(x, weight, bias, 6, score_func, 1.5)
    ref_w, ref_idx = reference(x, weight, bias, 6, score_func, 1.5)
    assert torch.equal(idx, ref_idx)
    assert (w - ref_w).abs().max() < WEIGHT_TOL
    for row in idx.tolist():  # within a tied group the picks are the smallest indices, in order
        tied = [e for e in row if e in (1, 5, 9, 20)]
        assert tied == [1, 5, 9, 20][: len(tied)]
    assert sorted(idx[0].tolist()) == sorted(torch.argsort(-bias, stable=True)[:6].tolist())


@interpreted
def test_large_logits_and_saturated_softplus(gate):
    x, weight, bias = _inputs(6, 32, 16, seed=11)
    x *= 40.0  # logits of magnitude ~40: softplus past its threshold of 20, exp underflow below
    _check(gate, (x, weight, bias, 4, "sqrtsoftplus", 1.0))


@interpreted
@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "softmax"])
def test_hash_routing(gate, score_func):
    x, weight, bias = _inputs(11, 64, 24, seed=5)
    gen = torch.Generator().manual_seed(2)
    tid2eid = torch.stack([torch.randperm(24, generator=gen)[:6] for _ in range(50)])  # int64 table
    input_ids = torch.randint(0, 50, (11,), generator=gen, dtype=torch.int32)
    args = (x, weight, bias, 6, score_func, 1.5, 1, 1, input_ids, tid2eid)
    _check(gate, args)
    assert torch.equal(gate.moe_gate(*args)[1].long(), tid2eid[input_ids.long()])


@interpreted
def test_group_limited_routing_is_refused(gate):
    x, weight, bias = _inputs(4, 32, 16, seed=1)
    with pytest.raises(NotImplementedError):
        gate.moe_gate(x, weight, bias, 2, "sigmoid", 1.0, 4, 2)


# -- GPU ------------------------------------------------------------------------------------------

KEY_TOL = 1e-3
"""A pick may differ from the reference only at a near-tie: its float64 key within this of the
reference's k-th key. Logits: bf16 products exact, fp32 sums of D=4096 terms in another order:
~2^-24 * sqrt(D) * sum|x w| (~40) ~ 2e-4 typical, so 1e-3; scores have slope <= 1/2 in the logit."""


def _plan(routing: str):
    from seahal import hal

    p = hal.plan("cuda", ops={"moe_gate": {"routing": routing}}, announce=False)
    assert p["moe_gate"].kernel.qualified_name == "cuda.triton", p.table()
    return p


@pytest.fixture(scope="module")
def plan():
    return _plan("score")


@on_gpu
@pytest.mark.parametrize("t", [1, 16, 256, 16384])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16 W", "fp32 W"])
def test_gpu_plan(plan, t, weight_dtype):
    """bf16 x against a bf16 W, and against an fp32 W (the model's gate: a GEMV up to 4 tokens,
    above it W's three exact bf16 parts on the tensor cores)."""
    x, weight, bias = (v.cuda() for v in _inputs(t, 4096, 256, seed=t, dtype=torch.bfloat16))
    weight = weight.to(weight_dtype)
    w, idx = plan.ops.moe_gate(x, weight, bias, 6, "sqrtsoftplus", 1.5)
    ref_w, ref_idx = reference(x, weight, bias, 6, "sqrtsoftplus", 1.5)
    logits = x.double() @ weight.double().T
    key = torch.nn.functional.softplus(logits, threshold=20.0).sqrt() + bias.double()
    kth = key.gather(1, ref_idx.long()).min(dim=1).values
    assert (key.gather(1, idx.long()) >= kth[:, None] - KEY_TOL).all()
    same = (idx == ref_idx).all(dim=1)
    assert same.float().mean() > 0.995  # near-ties are rare
    assert (w[same] - ref_w[same]).abs().max() < 1e-5  # fp32 weights from logits within ~1e-5 relative


@on_gpu
def test_gpu_fp32_gate_weight_in_three_parts_is_exact():
    """One feature's power of two per token against an fp32 W at prefill sizes: the logits are W's
    column itself, bit for bit (the parts sum to W exactly in the MMA's fp32 accumulator)."""
    from seahal.backends.cuda import moe_gate

    t, d = 1024, 4096
    weight = _inputs(1, d, 64, seed=3)[1].cuda()
    feature = torch.arange(t, device="cuda") * 7 % d
    hot = torch.zeros(t, d, dtype=torch.bfloat16, device="cuda")
    hot[torch.arange(t, device="cuda"), feature] = 2.0**-3
    assert torch.equal(moe_gate.gate_logits(hot, weight).sum(0), weight[:, feature].T * 2.0**-3)


@on_gpu
def test_gpu_group_limited_falls_back():
    from seahal import hal

    p = hal.plan("cuda", ops={"moe_gate": {"routing": "group-limited"}}, announce=False)
    assert p["moe_gate"].kernel.qualified_name != "cuda.triton", p.table()


@on_gpu
def test_gpu_ties_and_hash(plan):
    x, weight, bias = (v.cuda() for v in _inputs(300, 4096, 256, seed=1, dtype=torch.bfloat16))
    weight[[5, 9, 200]] = weight[1].clone()
    bias[[5, 9, 200]] = bias[1].clone()
    w, idx = plan.ops.moe_gate(x, weight, bias, 6, "sigmoid", 2.5)
    ref_idx = reference(x, weight, bias, 6, "sigmoid", 2.5)[1]
    for row in idx.tolist():
        tied = [e for e in row if e in (1, 5, 9, 200)]
        assert tied == [1, 5, 9, 200][: len(tied)]
    assert (idx == ref_idx).all(dim=1).float().mean() > 0.99
    tid2eid = torch.stack([torch.randperm(256)[:6] for _ in range(1000)]).int().cuda()
    ids = torch.randint(0, 1000, (300,), device="cuda")
    w, idx = _plan("hash").ops.moe_gate(x, weight, bias, 6, "sqrtsoftplus", 1.5, 1, 1, ids, tid2eid)
    ref_w, ref_idx = reference(x, weight, bias, 6, "sqrtsoftplus", 1.5, 1, 1, ids, tid2eid)
    assert torch.equal(idx, ref_idx)
    assert (w - ref_w).abs().max() < 1e-5


@on_gpu
@pytest.mark.parametrize("t", [1, 16384])
def test_gpu_one_warp_routing_is_the_four_warp_routing(t):
    """The bench's one-warp routing programs (``route_warps=1``: a token's row reduced within a
    warp) pick the same experts with the same weights, bit for bit: only the reductions' lanes differ."""
    from seahal.backends.cuda import moe_gate

    x, weight, bias = (v.cuda() for v in _inputs(t, 4096, 256, seed=t, dtype=torch.bfloat16))
    logits = moe_gate.gate_logits(x, weight)
    w, idx = moe_gate.route(logits, bias, 6, "sqrtsoftplus", 1.5)
    w1, idx1 = moe_gate.route(logits, bias, 6, "sqrtsoftplus", 1.5, route_warps=1)
    assert torch.equal(idx1, idx) and torch.equal(w1, w)
