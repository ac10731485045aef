"""RMSNorm reference (op ``rms_norm``) against the formula row by row, and its contract's errors."""

from __future__ import annotations

import math

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference.norm import rms_norm
from seahal.hal import SpecError


def _row_by_row(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Python floats: y_i = x_i / sqrt(sum_j x_j^2 / D + eps) * w_i."""
    rows = x.double().reshape(-1, x.shape[-1]).tolist()
    w = weight.double().tolist() if weight is not None else [1.0] * x.shape[-1]
    out = []
    for row in rows:
        inverse = 1.0 / math.sqrt(sum(v * v for v in row) / len(row) + eps)
        out.append([v * inverse * wi for v, wi in zip(row, w)])
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


@pytest.mark.parametrize("dtype, rtol", [
    (torch.float64, 1e-14),  # fp64 math: a few roundings of 2^-53
    (torch.float32, 1e-6),  # fp32 math: sum of 48 squares (~48 u) halved by the root, + a few u
    (torch.bfloat16, 2.0**-8),  # the fp32 result rounded once to bf16 (2^-9), the reference's own input
])
@pytest.mark.parametrize("weighted", [True, False])
def test_reference_is_the_formula(dtype, rtol, weighted):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 48, generator=g, dtype=torch.float64) * 3).to(dtype)
    weight = torch.rand(48, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    weight = weight.to(torch.float64 if dtype == torch.float64 else torch.float32) if weighted else None
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), _row_by_row(x, weight, 1e-6), rtol=rtol, atol=0)


def test_unit_rms_and_eps():
    """Normalised rows have root mean square sqrt(m / (m + eps)) for m = mean(x^2) (~1 - 5e-7
    here); eps keeps an all-zero row at zero."""
    x = torch.randn(4, 256, dtype=torch.float64)
    x[2] = 0
    y = rms_norm(x, None, 1e-6)
    rms = y.square().mean(-1).sqrt()
    m = x.square().mean(-1)[[0, 1, 3]]
    torch.testing.assert_close(rms[[0, 1, 3]], (m / (m + 1e-6)).sqrt(), rtol=1e-14, atol=0)
    assert not y[2].any()


def test_contract_names_the_argument():
    plan = hal.plan("cpu", ops=["rms_norm"], announce=False)
    x = torch.randn(2, 8)
    with pytest.raises(SpecError, match=r"rms_norm: weight must be \[D=8\] float32 or float64 .*got \[4\] float32"):
        plan.ops.rms_norm(x, torch.ones(4), 1e-6)
    with pytest.raises(SpecError, match=r"rms_norm: weight must be .*got \[8\] bfloat16"):
        plan.ops.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(SpecError, match=r"rms_norm: x must be .*got \[2, 8\] int64"):
        plan.ops.rms_norm(torch.ones(2, 8, dtype=torch.int64), None, 1e-6)
    with pytest.raises(SpecError, match="eps must be a float >= 0, got -1.0"):
        plan.ops.rms_norm(x, None, -1.0)
