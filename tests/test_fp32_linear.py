"""``fp32_linear`` (the output head, the compressors' projections): the reference against float64,
its row blocks, the contract, and the model keeping a bf16 checkpoint's head in bf16."""

from __future__ import annotations

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference import linear as reference
from seahal.hal import SpecError
from seahal.testing.tolerances import gamma


def _inputs(t: int, d: int, v: int, dtype: torch.dtype, weight_dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, d, generator=g).to(dtype), (torch.randn(v, d, generator=g) * d**-0.5).to(weight_dtype)


@pytest.mark.parametrize("dtype, weight_dtype", [
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
])
def test_reference_is_the_widened_product(dtype, weight_dtype, monkeypatch):
    """fp32 sums of exactly widened products, within gamma(D+1) of sum |x||w| (float64 formula);
    row blocks of 7 (V = 50: 8 blocks, the last partial) give the same logits as one block."""
    x, w = _inputs(3, 96, 50, dtype, weight_dtype)
    out = reference.fp32_linear(x, w)
    assert out.dtype == torch.float32 and out.shape == (3, 50)
    exact = x.double() @ w.double().T
    bound = gamma(97) * (x.double().abs() @ w.double().abs().T)
    assert ((out.double() - exact).abs() <= bound).all()
    monkeypatch.setattr(reference, "WIDEN_ROWS", 7)
    torch.testing.assert_close(reference.fp32_linear(x, w), out, rtol=0, atol=float(bound.max()))


def test_float64_operands_compute_in_float64():
    x, w = _inputs(2, 32, 10, torch.float64, torch.bfloat16)
    out = reference.fp32_linear(x, w)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x @ w.double().T, rtol=1e-15, atol=1e-15)


def test_contract_names_the_argument():
    plan = hal.plan("cpu", ops=["fp32_linear"], announce=False)
    x, w = _inputs(2, 32, 10, torch.float32, torch.bfloat16)
    with pytest.raises(SpecError, match=r"fp32_linear: weight must be \[N=10, D=32\] .*got \[10, 31\] bfloat16"):
        plan.ops.fp32_linear(x, w[:, :31])
    with pytest.raises(SpecError, match=r"fp32_linear: weight must be .*got \[10, 32\] float8_e4m3fn"):
        plan.ops.fp32_linear(x, w.to(torch.float8_e4m3fn))
    assert plan.ops.fp32_linear(x[None], w).shape == (1, 2, 10)


def test_model_keeps_a_bf16_head_in_bf16(tmp_path):
    """The release checkpoint's head is bf16: the model streams it as bf16 (half the bytes of the
    fp32 copy) and its logits are those of the fp32 head, the official computation."""
    from seahal.model import load
    from seahal.model.tiny import TINY_CONFIG, write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "tiny", seed=0)
    model = load(path, device="cpu", announce=False)
    assert model.head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, TINY_CONFIG["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(1))
    logits = model(ids, last_only=True)
    hidden = {}
    model.head.register_forward_hook(lambda module, args, out: hidden.update(x=args[0]))  # returns None: output kept
    model(ids, last_only=True)
    fp32_head = torch.nn.functional.linear(hidden["x"].float(), model.head.weight.float())
    torch.testing.assert_close(logits, fp32_head, rtol=1e-6, atol=1e-6)


def test_a_float64_model_gets_fp32_logits_from_its_head(tmp_path):
    """A float64 model (a debugging precision) runs, its indexer rotating in fp64, and its head
    rounds x to fp32 first, as the official ``x.float()`` does: fp32 logits of the fp32 product."""
    from seahal.model import load
    from seahal.model.tiny import TINY_CONFIG, write_tiny_checkpoint

    model = load(write_tiny_checkpoint(tmp_path / "tiny", seed=0), device="cpu", dtype=torch.float64, announce=False)
    hidden = {}
    model.head.register_forward_hook(lambda module, args, out: hidden.update(x=args[0]))  # returns None: output kept
    ids = torch.randint(0, TINY_CONFIG["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    logits = model(ids, last_only=True)
    assert logits.dtype == torch.float32 and hidden["x"].dtype == torch.float64
    expected = torch.nn.functional.linear(hidden["x"].float(), model.head.weight.float())
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
