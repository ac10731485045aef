"""Rounding device functions shared by the cuda backend's Triton kernels: RNE casts, FP8 tile quant,
dots whose products are exact.

Round to nearest even, everywhere. On a GPU ``v.to(tl.bfloat16)`` and ``v.to(tl.float8e4nv)`` are
the hardware's RNE conversions (``cvt.rn.bf16.f32``, ``cvt.rn.satfinite.e4m3x2.f32``). The Triton
interpreter (seen in 3.6-3.9) converts differently: fp32 -> bf16 truncates, and fp32 -> e4m3
rounds the mantissa without carrying into the exponent (31.9 -> 16, not 32). Under the interpreter
:func:`cast_rne` therefore rounds on the fp32 bits in integer arithmetic and bitcasts the result.

Which path is taken is :data:`INTERPRETED`, fixed when this module is imported from the same
switch ``triton.jit`` reads when it decorates a kernel (``TRITON_INTERPRET``): a process either
interprets every kernel or compiles every kernel, and the kernels importing these functions are
decorated in the same import. The flag is a ``tl.constexpr``, so the compiled GPU code holds only
the plain casts.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._cache_keys import settle_cache_keys

INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)
"""True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` at import)."""
FP8_MAX = tl.constexpr(448.0)
FP8_AMAX_FLOOR = tl.constexpr(1e-4)


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """fp32 v as ``dtype``, rounded to nearest even (ties to the even code), also in the interpreter.

    bf16: every fp32 value (NaN stays NaN). e4m3 (``tl.float8e4nv``): finite v in [-448, 448]
    (callers clamp; -0 keeps its sign). Other dtypes: a plain cast.
    """
    if INTERPRETED:
        if dtype == tl.bfloat16:
            return _bf16_rne_bits(v).to(tl.int16).to(tl.bfloat16, bitcast=True)
        if dtype == tl.float8e4nv:
            return _e4m3_rne_bits(v).to(tl.float8e4nv, bitcast=True)
    return v.to(dtype)


@triton.jit
def _bf16_rne_bits(v):
    """bf16 bit patterns (int32 in [0, 65535]) of fp32 v: the upper 16 bits, rounded to nearest
    even on the lower 16 (a carry runs into the exponent, up to inf); NaN -> the quiet NaN."""
    bits = v.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    return tl.where(v != v, 0x7FC0, rounded)


@triton.jit
def _e4m3_rne_bits(v):
    """e4m3 codes (uint8) of fp32 v in [-448, 448], rounded to nearest even.

    Normal (|v| >= 2^-6): RNE on the 20 dropped mantissa bits, the carry running into the
    exponent, rebiased 127 -> 7. Subnormal: a multiple of 2^-9, rounded by the fp32 add of 2^23
    (exact, as |v| 2^9 < 8).
    """
    bits = v.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
    subnormal = ((tl.abs(v) * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(mag >= 0x3C800000, normal, subnormal) | ((bits >> 24) & 0x80)
    return code.to(tl.uint8)


@triton.jit
def pow2_ceil(s):
    """``2^ceil(log2 s)`` for positive normal fp32 s, and its reciprocal, both exact: a set
    mantissa bit carries into the exponent and the mantissa is cleared."""
    bits = (s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000
    return bits.to(tl.float32, bitcast=True), ((254 << 23) - bits).to(tl.float32, bitcast=True)


@triton.jit
def fp8_quantize_tiles(x, UE8M0: tl.constexpr):
    """FP8 e4m3 quantisation of 1 x BLOCK tiles along the last axis (v4_ops.md §11).

    x: [..., BLOCK] fp32 (padding lanes zero) -> (q [..., BLOCK] float8e4nv, s [...] fp32).
    ``s = max(amax, 1e-4) / 448`` by a correctly rounded division (``div_rn``; Triton's ``/`` is
    approximate on the GPU), with UE8M0 rounded up to ``2^ceil(log2 s)``; ``q = e4m3_rne(clamp(x / s,
    -448, 448))``, ``x / s`` as ``x * 2^-k`` (exact) for a power-of-two s, else by ``div_rn``.
    """
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=-1), FP8_AMAX_FLOOR), FP8_MAX)
    if UE8M0:
        s, inv = pow2_ceil(s)
        y = x * tl.expand_dims(inv, -1)
    else:
        y = tl.math.div_rn(x, tl.expand_dims(s, -1))
    return cast_rne(tl.clamp(y, -FP8_MAX, FP8_MAX), tl.float8e4nv), s


@triton.jit
def exact_dot(a, b, acc, LOW_PRECISION: tl.constexpr):
    """``acc + a @ b`` with exact products summed in fp32. LOW_PRECISION (bf16 operands, on the
    GPU): straight into the MMA, whose bf16 products are exact. Otherwise both operands are widened
    to fp32 (the same products for bf16: the interpreter's dot misreads bf16) and multiplied in IEEE
    fp32, never TF32."""
    if LOW_PRECISION:
        return tl.dot(a, b, acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def bf16_parts(v):
    """fp32 v as three bf16 parts whose sum is exactly v: ``hi = bf16(v)``, ``mid = bf16(v - hi)``,
    ``lo = bf16(v - hi - mid)`` (24 significant bits in three 8-bit pieces; each difference is
    exact in fp32 however the casts round, so the interpreter's truncating cast gives parts too)."""
    hi = v.to(tl.bfloat16)
    rest = v - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    return hi, mid, (rest - mid.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def split_dot(a, b, acc, SPLIT_A: tl.constexpr, LOW_PRECISION: tl.constexpr):
    """``acc + a @ b`` for one fp32 and one bf16 operand (a the fp32 one if SPLIT_A, else b): the
    fp32 operand as its three exact bf16 parts (:func:`bf16_parts`), each multiplied by the other
    operand with :func:`exact_dot`, so every product is exact and the 3K of them are summed in fp32
    (on the tensor cores where LOW_PRECISION)."""
    if SPLIT_A:
        hi, mid, lo = bf16_parts(a)
        acc = exact_dot(hi, b, acc, LOW_PRECISION)
        acc = exact_dot(mid, b, acc, LOW_PRECISION)
        acc = exact_dot(lo, b, acc, LOW_PRECISION)
    else:
        hi, mid, lo = bf16_parts(b)
        acc = exact_dot(a, hi, acc, LOW_PRECISION)
        acc = exact_dot(a, mid, acc, LOW_PRECISION)
        acc = exact_dot(a, lo, acc, LOW_PRECISION)
    return acc


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
