"""The CPU's routed experts over the native GEMMs (backends/cpu/native_moe.py) against the reference.

Per token the same math as the reference; the GEMMs sum in another order, so an output may differ
where a gate or up value rounded to a neighbouring FP8 code of h: within the conformance rule of
``moe_experts``, and most outputs equal the reference's bit for bit. Routings the conformance
cases give dense weights only (empty slots, unused experts, one token picking an expert twice,
strided inputs) run here with FP8 and FP4 weights.
"""

from __future__ import annotations

import pytest
import torch

from seahal.backends.cpu import native
from seahal.backends.cpu.native_moe import moe_experts
from seahal.backends.cpu.reference.moe import moe_experts as reference
from seahal.testing.cases import moe_experts_case
from seahal.testing.tolerances import checks_for

pytestmark = pytest.mark.skipif(native.native_module() is None, reason="seahal._native is not built")

F32 = torch.float32

CASES = [  # (name, moe_experts_case keywords)
    ("fp8, empty slots", {"fmt": "fp8", "routing": "empty-slots"}),
    ("fp4 e8m0, unused experts", {"fmt": "fp4", "scale_fmt": "e8m0", "e": 8, "routing": "unused-experts"}),
    ("fp8 e8m0, fp32 x, 2 K blocks", {"fmt": "fp8", "scale_fmt": "e8m0", "dtype": F32, "d": 256, "inter": 256}),
    ("fp4, clamp active", {"fmt": "fp4", "values": "clamp"}),
    ("fp8, strided", {"fmt": "fp8", "layout": "strided"}),
    ("fp4, 40 tokens top-3 of 6", {"fmt": "fp4", "t": 40, "k": 3, "e": 6}),
]


def _assert_matches_reference(args: tuple) -> None:
    out, want = moe_experts(*args), reference(*args)
    assert out.dtype == want.dtype and out.shape == want.shape
    for compared in checks_for("moe_experts", args):
        verdict = compared.check.compare(out, want)
        assert verdict.ok, verdict
    if out.dtype == torch.bfloat16:  # fp32 sums in another order, rounded to bf16: mostly the same
        same = (out == want).float().mean()
        assert same >= 0.97, f"{same:.3f} of the outputs equal the reference's"


@pytest.mark.parametrize("name, kw", CASES, ids=[name for name, _ in CASES])
def test_matches_the_reference(name, kw):
    _assert_matches_reference(moe_experts_case(name, 3, **kw).calls[0])


def test_a_token_picking_an_expert_twice_gets_both_weights():
    """The reference sums a token's weights for an expert it picked in two slots; so does this."""
    x, weights, ids, *rest = moe_experts_case("dup", 5, fmt="fp8", t=4, k=2).calls[0]
    ids = ids.clone()
    ids[1] = ids[1, 0]
    _assert_matches_reference((x, weights, ids, *rest))


def test_dense_weights_and_float64_run_the_reference():
    args = moe_experts_case("dense", 1).calls[0]
    assert torch.equal(moe_experts(*args), reference(*args))
    x, *rest = moe_experts_case("fp8 fp64", 2, fmt="fp8").calls[0]
    args = (x.double(), *rest)
    assert torch.equal(moe_experts(*args), reference(*args))


def test_the_cpu_plan_binds_it():
    from seahal import hal

    assert hal.plan("cpu").entries["moe_experts"].label == "cpu.native"


def test_a_tensor_off_the_cpu_is_refused_naming_the_op():
    *tensors, limit = moe_experts_case("meta", 4, fmt="fp8").calls[0]
    with pytest.raises(ValueError, match="moe_experts .*cpu tensors.*meta"):
        moe_experts(*(t.to("meta") for t in tensors), limit)
