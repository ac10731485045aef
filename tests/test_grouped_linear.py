"""``grouped_linear``: the attention's grouped output projection (wo_a) over a dequantised weight.

The contract's errors and the reference against a per-group float64 brute force; the helpers
here build the inputs and the checks of tests/test_cuda_grouped_linear.py too.
"""

from __future__ import annotations

import pytest
import torch

from seahal.backends.cpu.reference.linear import grouped_linear as reference
from seahal.hal import SpecError, get_spec
from seahal.hal.checks import SCALES, dtype_name
from seahal.hal.formats import dequantize_weight, e8m0_scales
from seahal.testing.tolerances import checks_for

F32, BF16, E4M3 = torch.float32, torch.bfloat16, torch.float8_e4m3fn


def _weight(rows: int, cols: int, scale_fmt: str, seed: int, device: str = "cpu"):
    """e4m3 codes of every magnitude and 128x128 block scales around 2^-8 (fp32, or e8m0 powers of two)."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=gen) * 96).clamp(-448, 448).to(E4M3)
    blocks = (-(-rows // 128), cols // 128)
    if scale_fmt == "e8m0":
        scale = e8m0_scales((torch.randint(-10, -5, blocks, generator=gen) + 127).to(torch.uint8))
    else:
        scale = (torch.rand(blocks, generator=gen) + 0.6) * 2.0**-8
    return w.to(device), scale.to(device)


def _x(lead: tuple[int, ...], g: int, i: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, g, i, generator=gen).to(dtype).to(device)


def _brute_force(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float64 sums of x and each group's rows of W dequantised and rounded to x's dtype, group by group."""
    g = x.shape[-2]
    w = dequantize_weight(weight.cpu(), None if scale is None else scale.cpu(), x.dtype).double()
    rows = w.shape[0] // g
    return torch.stack([x[..., j, :].cpu().double() @ w[j * rows:(j + 1) * rows].T for j in range(g)], dim=-2)


def _check(x, weight, scale, out) -> None:
    assert out.shape == (*x.shape[:-1], weight.shape[0] // x.shape[-2]) and out.dtype == x.dtype
    for compared in checks_for("grouped_linear", (x, weight, scale)):
        verdict = compared.check.compare(out.cpu(), _brute_force(x, weight, scale))
        assert verdict.ok, f"grouped_linear {compared.label}: {verdict.detail}"


# -- the contract and the reference (CPU) --------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (lambda x, w, s: (x, w, None), r"scale must be a torch.Tensor, got NoneType"),
    (lambda x, w, s: (x, w, s[:, :1]), rf"scale must be \[4, 2\] {' or '.join(map(dtype_name, SCALES))}, got \[4, 1\]"),
    (lambda x, w, s: (x, w.float(), s), r"scale must be None for float32 weights, got \[4, 2\] float32"),
    (lambda x, w, s: (x[..., :3, :], w, s), r"GR must be a multiple of 3 \(the weight's rows are G groups of R\)"),
    (lambda x, w, s: (x, w[:, :128], s[:, :1]), r"weight must be \[GR=512, I=256\] .*from an earlier argument\), got \[512, 128\]"),
    (lambda x, w, s: (x[0, 0, 0], w, s), r"x must have at least 2 dims"),
    (lambda x, w, s: (x.half(), w, s), r"x must be .*bfloat16 or float32 or float64, got .* float16"),
])
def test_contract_names_the_argument(args, message):
    x, (w, s) = _x((1, 1), 4, 256, BF16, 0), _weight(512, 256, "fp32", 0)
    with pytest.raises(SpecError, match=message):
        get_spec("grouped_linear").check(*args(x, w, s))


@pytest.mark.parametrize("dtype, scale_fmt", [(BF16, "e8m0"), (BF16, "fp32"), (F32, "fp32"), (torch.float64, "e8m0")])
def test_reference_is_the_grouped_product_of_the_dequantised_weight(dtype, scale_fmt):
    x, (w, s) = _x((2, 3), 4, 256, dtype, 1), _weight(4 * 96, 256, scale_fmt, 1)
    out = reference(x, w, s)
    _check(x, w, s, out)
    if dtype != torch.float64:  # fp32 sums against float64 ones: within the rule's sum term alone
        assert torch.allclose(out.double(), _brute_force(x, w, s), rtol=2**-7, atol=1e-3)


def test_reference_of_a_dense_weight_rounds_it_to_x_dtype():
    """W' is the weight in x's dtype: an fp32 weight with bf16 x takes bf16's nearest values."""
    x, w = _x((2,), 2, 64, BF16, 2), torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(reference(x, w), reference(x, w.to(BF16)))
    assert not torch.equal(reference(x.float(), w), reference(x.float(), w.to(BF16)))


def test_without_the_native_module_the_cpu_dequantises_wo_a_at_load(monkeypatch):
    """The reference would dequantise an FP8 wo_a on every call: a CPU built without
    seahal._native converts it to bf16 at load instead; with the module, the FP8 bytes stay."""
    from seahal.backends import cpu
    from seahal.backends.cpu import native

    built = native.native_module() is not None
    assert cpu._weight_conversions(None) == ({} if built else {"grouped_linear": "bfloat16"})
    monkeypatch.setattr(native, "native_module", lambda: None)
    assert cpu._weight_conversions(None) == {"grouped_linear": "bfloat16"}
