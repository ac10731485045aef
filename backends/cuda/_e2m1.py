"""FP4 e2m1 weight blocks in Triton: decoding, and the K-block product of the FP8 x FP4 GEMMs.

A 128-wide K block of an FP4 weight row holds 64 bytes of codes (two per byte, low nibble first)
and four 1x32 power-of-two scales ``2^(s_g - 127)`` (v4_ops.md §11.4). :func:`fp4_block_dot` forms
``A_block · B_block^T`` for ``fp4_gemm`` and the FP4 experts of ``moe_experts`` in one of two ways:

- **bf16**: each value ``e2m1(c) · 2^(s_g - 127)`` in bf16 (exact: 2 significant bits), A's e4m3
  codes widened to bf16 (exact), a bf16 MMA.
- **e4m3** (``E4M3_MMA``, e8m0 scales only): per weight row, ``base = max_g s_g - 6``; each value
  is stored as the e4m3 ``e2m1(c) · 2^(s_g - base)`` and ``2^(base - 127)`` scales the row of the
  product, an FP8 MMA on A's codes as they are. The e4m3 values are exact when the row's four scales
  span at most 14 binades: ``s_g - base`` is then in [-8, 6], the largest value 6 · 2^6 = 384 <=
  448 and every value a multiple of 0.5 · 2^-8 = 2^-9, e4m3's least subnormal. The form also needs
  7 <= max s_g <= 252: the row scale stays a normal fp32 and no value overflows (the bf16 form's
  inf and NaN cases, e8m0 255 included, keep the bf16 form). A block where any row misses either
  takes the bf16 form, so both forms sum the same exact products. DeepSeek's checkpoints keep a
  128x128 block's scales within 6 binades (its convert.py re-expresses them as FP8 on that
  ground), so real weights stay in the e4m3 form.

The e4m3 form halves the decoded tile's shared-memory bytes, runs the FP8 tensor cores (twice the
bf16 rate on Hopper) and skips widening A; what it costs is one compare of the block's scales.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._gemm import decode_e8m0
from ._numerics import cast_rne

E4M3_SPREAD = tl.constexpr(14)
"""Most binades between a row's largest and smallest 1x32 scale in a K block for the e4m3 form."""


@triton.jit
def decode_e2m1(code):
    """e2m1 codes (sign<<3 | exponent<<1 | mantissa) -> fp32 {0, .5, 1, 1.5, 2, 3, 4, 6} with sign."""
    c = code.to(tl.int32)
    exponent = (c >> 1) & 3
    mantissa = c & 1
    normal = ((exponent + 126) << 23) | (mantissa << 22)
    bits = tl.where(exponent > 0, normal, mantissa * (126 << 23)) | ((c & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def unpack_codes(packed, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS / 2] bytes -> [ROWS, COLS] e2m1 codes, element 2i the low nibble of byte i."""
    return tl.join(packed & 0xF, packed >> 4).reshape(ROWS, COLS)


@triton.jit
def _per_element(group_values, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS / 32] values of the 1x32 groups -> [ROWS, COLS], each repeated over its group."""
    groups: tl.constexpr = COLS // 32
    return tl.broadcast_to(group_values[:, :, None], (ROWS, groups, 32)).reshape(ROWS, COLS)


@triton.jit
def _pow2(exponent):
    """``2^exponent`` as fp32 for int32 exponents in [-126, 127] (exact)."""
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def as_bf16(codes, scale, SCALE_E8M0: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``e2m1(codes) · scale`` in bf16: codes [ROWS, COLS], scale [ROWS, COLS / 32] (fp32, or e8m0 bytes)."""
    if SCALE_E8M0:
        scale = decode_e8m0(scale)
    return (decode_e2m1(codes) * _per_element(scale, ROWS, COLS)).to(tl.bfloat16)


@triton.jit
def e4m3_form_is_exact(scale_ptrs, kb_lo, kb_hi, stride_k, ROWS: tl.constexpr, KB_CHUNK: tl.constexpr = 8):
    """Whether K blocks [kb_lo, kb_hi) of ROWS weight rows all allow the exact e4m3 form (a scalar).

    scale_ptrs: [ROWS] pointers to each row's first e8m0 scale byte (column g of block kb at
    ``(4 kb + g) * stride_k``). Reads the rows' scales KB_CHUNK blocks at a time, before the K loop
    that then runs in one form: a branch inside the loop would stop Triton pipelining its loads.
    """
    cols = tl.arange(0, 4 * KB_CHUNK)
    misses = 0
    for kb in range(kb_lo, kb_hi, KB_CHUNK):
        offs = 4 * kb + cols
        exponents = tl.load(scale_ptrs[:, None] + offs[None, :] * stride_k, mask=offs[None, :] < 4 * kb_hi,
                            other=127).to(tl.int32).reshape(ROWS, KB_CHUNK, 4)
        hi = tl.max(exponents, axis=2)
        fits = (hi - tl.min(exponents, axis=2) <= E4M3_SPREAD) & (hi >= 7) & (hi <= 252)
        misses += tl.sum(tl.sum((~fits).to(tl.int32), axis=1), axis=0)
    return misses == 0


@triton.jit
def as_e4m3(codes, exponents, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The e4m3 form: codes [ROWS, COLS], e8m0 scale bytes [ROWS, COLS / 32] as int32 ->
    (``e4m3(e2m1(codes) · 2^(s_g - base))`` [ROWS, COLS], ``2^(base - 127)`` [ROWS] fp32),
    ``base = max_g s_g - 6``; exact where :func:`e4m3_form_is_exact`."""
    base = tl.max(exponents, axis=1) - 6
    relative = _pow2(_per_element(exponents - base[:, None], ROWS, COLS))
    values = cast_rne(decode_e2m1(codes) * relative, tl.float8e4nv)
    return values, _pow2(base - 127)


@triton.jit
def fp4_block_dot(
    acc, a, a_scale, packed, scale, SCALE_E8M0: tl.constexpr, E4M3: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """``acc + (A · B^T) · sA[:, None]`` over one 128-wide K block of an FP4 weight.

    a: [BLOCK_M, COLS] e4m3 codes, a_scale: [BLOCK_M] fp32, packed: [ROWS, COLS / 2] e2m1 bytes,
    scale: [ROWS, COLS / 32] fp32 or e8m0 bytes; acc: [BLOCK_M, ROWS] fp32. E4M3 (e8m0 scales, the
    block checked by :func:`e4m3_form_is_exact`): the e4m3 form, else the bf16 form.
    """
    codes = unpack_codes(packed, ROWS, COLS)
    if E4M3:
        b, row_scale = as_e4m3(codes, scale.to(tl.int32), ROWS, COLS)
        return acc + tl.dot(a, tl.trans(b)) * (a_scale[:, None] * row_scale[None, :])
    else:
        b = as_bf16(codes, scale, SCALE_E8M0, ROWS, COLS)
        return acc + tl.dot(a.to(tl.bfloat16), tl.trans(b)) * a_scale[:, None]
