"""Triton interleaved partial RoPE (op ``rope``; v4_ops.md §4), forward and inverse.

One pass: each program takes BLOCK_H heads of one token, copies the D - r pass-through dims and
rotates the last r dims in interleaved pairs, loaded as a [BLOCK_H, r/2, 2] brick and split into
the pair's two lanes. The angles are computed once per token and shared by its heads.

Arithmetic, in the reference's order: ``theta = fp32(pos) * f`` (one fp32 rounding), negated
when inverse (exact), then ``(a cos - b sin, a sin + b cos)`` with every product and sum rounded
to fp32 — so the output equals the reference bit for bit whenever the two agree on ``cos`` and
``sin`` of the same fp32 angle. They need not: torch's CPU cos/sin, numpy's (the interpreter's)
and the GPU's (``tl.cos``/``tl.sin``, expected to lower to libdevice's full-range ``__nv_cosf``/
``__nv_sinf``; not yet checked in the PTX, TUNING.md) each round within an ulp or two differently,
and on the GPU the compiler may fuse a product and the sum into one FMA. Under the interpreter the tests therefore check
bitwise against the reference formula fed with numpy's cos/sin, and within the conformance
tolerance against the reference itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cache_keys import settle_cache_keys
from ._host import cdiv, next_power_of_2
from ._numerics import cast_rne
from ._pdl import pdl_options, wait_for_prior_grid

DTYPES = (torch.bfloat16, torch.float32)
"""fp32 math; float64 inputs (allowed by the contract) are left to the reference kernel."""
MAX_BLOCK_H = 16
MAX_NORM_D = 2048
"""Widest head ``rms_norm_rope`` normalises: a program holds its heads whole (V4: 512)."""
NORM_ELEMENTS = 8192
"""Elements of the heads an ``rms_norm_rope`` program holds at once (16 heads of V4's 512)."""


def rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last r = 2*len(freqs) dims of each head by ``positions * freqs`` (interleaved pairs).

    x: [B, S, H, D] bf16/fp32 (any strides), positions: [B, S] int, freqs: [r/2] fp32
    -> [B, S, H, D] contiguous, in x's dtype.

    ``theta_i = pos * f_i`` (``-theta_i`` when inverse); pair i of the rope part becomes
    ``(a cos theta_i - b sin theta_i, a sin theta_i + b cos theta_i)`` in fp32; the first
    D - r dims pass through unchanged.
    """
    check_dtype("rope", "x", x)
    return _launch(x, positions, freqs, inverse)


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, positions: torch.Tensor, freqs: torch.Tensor
) -> torch.Tensor:
    """``rope(rms_norm(x, weight, eps), positions, freqs)`` in one pass over each head.

    x: [B, S, H, D] bf16/fp32 (any strides; D <= :data:`MAX_NORM_D`), weight: [D] fp32 or None,
    positions: [B, S] int, freqs: [r/2] fp32 -> [B, S, H, D] contiguous, in x's dtype.

    Each head is read once more from L1 for its ``sum(x^2)`` (fp32, a tree), then normalised as
    ``rms_norm``'s kernel does (``x * rsqrt(mean + eps) * w``, rounded to x's dtype) on its way to
    the rotation: the pass-through dims are stored as normalised, the rope pairs rotated from the
    rounded values. Only the order of ``sum(x^2)`` can differ from the two ops in turn.
    """
    check_dtype("rms_norm_rope", "x", x)
    if x.shape[-1] > MAX_NORM_D:
        raise NotImplementedError(f"cuda.triton rms_norm_rope: heads of at most {MAX_NORM_D} dims, got D={x.shape[-1]}")
    return _launch(x, positions, freqs, False, (weight, float(eps)))


def rms_norm_then_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, positions: torch.Tensor, freqs: torch.Tensor
) -> torch.Tensor:
    """The ``rms_norm_rope`` contract as the ``rms_norm`` and ``rope`` kernels in turn: two launches
    of kernels verified on a GPU, where the one-pass :func:`rms_norm_rope` is not yet."""
    from .norm import rms_norm

    return rope(rms_norm(x, weight, eps), positions, freqs)


def _launch(
    x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool,
    norm: tuple[torch.Tensor | None, float] | None = None,
) -> torch.Tensor:
    """One ``_rope_kernel`` launch over x's heads; ``norm`` = (weight or None, eps) normalises them first."""
    b, s, h, d = x.shape
    pairs = freqs.shape[0]
    out = torch.empty((b, s, h, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    nope = d - 2 * pairs
    block_h = min(next_power_of_2(h), MAX_BLOCK_H)
    normalise = {}
    if norm is not None:
        weight, eps = norm
        normalise = {"w_ptr": weight, "eps": eps, "NORM": True, "D_PAD": next_power_of_2(d)}
        block_h = min(block_h, max(1, NORM_ELEMENTS // next_power_of_2(d)))
    _rope_kernel[(b * s, cdiv(h, block_h))](
        x, positions, freqs, out, s, h, d, nope, pairs,
        *x.stride(), *positions.stride(), freqs.stride(0),
        BLOCK_H=block_h, R_PAD=next_power_of_2(pairs),
        NOPE_PAD=next_power_of_2(nope) if nope else 0,
        INVERSE=bool(inverse), **normalise, **pdl_options(),
    )
    return out


def check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """Refuse float64 data (fp32 math here; the capabilities send it to the reference)."""
    if t.dtype not in DTYPES:
        raise NotImplementedError(
            f"cuda.triton {op}: {name} must be bfloat16 or float32, got {t.dtype} (float64 runs on the reference)"
        )


@triton.jit
def _rope_kernel(
    x_ptr, pos_ptr, freq_ptr, out_ptr, S, H, D, NOPE, R,
    stride_xb, stride_xs, stride_xh, stride_xd, stride_pb, stride_ps, stride_f,
    BLOCK_H: tl.constexpr, R_PAD: tl.constexpr, NOPE_PAD: tl.constexpr,
    INVERSE: tl.constexpr, w_ptr=None, eps=None, NORM: tl.constexpr = False, D_PAD: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """out[token, heads] = x[token, heads] with its last 2R dims rotated; program (token, head block).
    NORM: each head normalised first, ``x * rsqrt(mean(x^2) + eps) (* w)`` rounded to out's dtype
    (no weight when ``w_ptr`` is None)."""
    wait_for_prior_grid(PDL)
    token = tl.program_id(0)
    batch = token // S
    seq = token % S
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    live = heads < H
    x_row = x_ptr + batch.to(tl.int64) * stride_xb + seq.to(tl.int64) * stride_xs + heads[:, None].to(tl.int64) * stride_xh
    out_row = out_ptr + (token.to(tl.int64) * H + heads[:, None]) * D
    row_scale = 1.0  # NORM: each head's 1 / rms, shaped for its pass-through dims and its pairs
    pair_scale = 1.0
    if NORM:
        every = tl.arange(0, D_PAD)[None, :]
        whole = tl.load(x_row + every * stride_xd, mask=live[:, None] & (every < D), other=0.0).to(tl.float32)
        inverse_rms = tl.math.rsqrt(tl.sum(whole * whole, axis=1) / D + eps)
        row_scale = inverse_rms[:, None]
        pair_scale = inverse_rms[:, None, None]
    if NOPE_PAD > 0:
        cols = tl.arange(0, NOPE_PAD)[None, :]
        keep = live[:, None] & (cols < NOPE)
        tl.store(out_row + cols, _normalised(tl.load(x_row + cols * stride_xd, mask=keep), row_scale, w_ptr, cols,
                                             cols < NOPE, out_ptr.dtype.element_ty, NORM), mask=keep)

    pairs = tl.arange(0, R_PAD)
    pos = tl.load(pos_ptr + batch.to(tl.int64) * stride_pb + seq.to(tl.int64) * stride_ps).to(tl.float32)
    theta = pos * tl.load(freq_ptr + pairs * stride_f, mask=pairs < R, other=0.0).to(tl.float32)
    if INVERSE:
        theta = -theta
    cos = tl.cos(theta)[None, :]
    sin = tl.sin(theta)[None, :]
    cols = NOPE + 2 * pairs[None, :, None] + tl.arange(0, 2)[None, None, :]  # [1, R_PAD, 2]
    rot = live[:, None, None] & (pairs < R)[None, :, None]
    a, b = tl.split(_normalised(tl.load(x_row[:, :, None] + cols * stride_xd, mask=rot, other=0.0), pair_scale, w_ptr,
                                cols, (pairs < R)[None, :, None], out_ptr.dtype.element_ty, NORM).to(tl.float32))
    rotated = tl.join(a * cos - b * sin, a * sin + b * cos)
    tl.store(out_row[:, :, None] + cols, cast_rne(rotated, out_ptr.dtype.element_ty), mask=rot)


@triton.jit
def _normalised(values, inverse_rms, w_ptr, cols, in_row, dtype: tl.constexpr, NORM: tl.constexpr):
    """With NORM, ``values * inverse_rms (* w[cols])`` in fp32 rounded to ``dtype``, as ``rms_norm``
    stores it (no weight when ``w_ptr`` is None); else ``values`` as they are."""
    if not NORM:
        return values
    y = values.to(tl.float32) * inverse_rms
    if w_ptr is not None:
        y = y * tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    return cast_rne(y, dtype)


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
