"""RoPE: npu_rotary_mul (emulated from the torch_npu 2.14 docstring; interleave mode, Atlas A2/A3)."""

from __future__ import annotations

import torch

from ._emulation import check, on_device, soc_family

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _rotate(x: torch.Tensor, mode: str) -> torch.Tensor:
    """``x_new``: half ``cat(-x2, x1)``; interleave ``(-x_1, x_0, -x_3, x_2, ...)``."""
    if mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def npu_rotary_mul(self, r1, r2, rotary_mode="half", rotate=None):
    """``out = r1 * input + r2 * x_new`` (see :func:`_rotate`), in input's dtype.

    input: 4-D (read as BSND), D even and < 896; interleave mode: B * N < 1000, r1/r2 broadcast
    as 1S1D, in input's dtype, values in [-1, 1]; interleave mode on Atlas A2/A3 only. The
    ``rotate`` matrix form is not emulated.
    """
    for name, t in (("input", self), ("r1", r1), ("r2", r2)):
        on_device(name, t)
        check(t.dim() == 4 and t.dtype in _FLOATS, f"{name} must be a 4-D float16/bfloat16/float32 tensor")
    check(rotary_mode in ("half", "interleave"), f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    check(rotate is None, "the rotate matrix form is not emulated")
    b, s, n, d = self.shape
    check(d % 2 == 0 and d < 896, f"D must be even and < 896, got {d}")
    check(r1.dtype == r2.dtype == self.dtype, f"r1/r2 must have input's dtype {self.dtype}, got {r1.dtype}/{r2.dtype}")
    if rotary_mode == "interleave":
        check(soc_family() in ("A2", "A3"), f"rotary_mode='interleave' is supported on Atlas A2/A3, this is {soc_family()}")
        check(b * n < 1000, f"interleave mode needs B * N < 1000, got {b * n}")
        for name, t in (("r1", r1), ("r2", r2)):
            check(tuple(t.shape) == (1, s, 1, d), f"interleave mode takes {name} as 1S1D [1, {s}, 1, {d}], got {list(t.shape)}")
    for name, t in (("r1", r1), ("r2", r2)):
        check(bool((t.abs() <= 1).all()), f"{name} values must be in [-1, 1]")
    out = r1.float() * self.float() + r2.float() * _rotate(self.float(), rotary_mode)
    return out.to(self.dtype)
