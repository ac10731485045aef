"""FP4 e2m1 weight blocks in Triton: decoding, and the K-block product of the FP8 x FP4 GEMMs.

A 128-wide K block of an FP4 weight row holds 64 bytes of codes (two per byte, low nibble first)
and four 1x32 power-of-two scales ``2^(s_g - 127)`` (v4_ops.md §11.4). :func:`fp4_block_dot` forms
``A_block · B_block^T`` for ``fp4_gemm`` and the FP4 experts of ``moe_experts`` in one of two ways,
both the same exact products summed in fp32 by a bf16 MMA:

- **mx** (``MX``, e8m0 scales): Triton's microscaling product ``tl.dot_scaled`` with the weight as
  the MMA's first operand (e2m1 codes with their e8m0 scales, k-packed as stored) and A's e4m3
  codes as the second, so the product comes out transposed, ``[weight rows, A rows]``: the
  accumulator of this form is kept that way round and transposed once after the K loop. On Hopper
  Triton upcasts both operands to bf16 (exact: an e2m1 value times a power of two has two
  significant bits, an e4m3 value four) with a byte-permute lookup in registers, and runs wgmma
  with the decoded weight straight from registers (sm_90 PTX: ~1.3k instructions per 128x128
  block and 16 rows, against ~2.6-3.0k for the hand-written decode below, which also ends in
  mma.sync: the first GPU run measured that form at 250 GB/s streaming FP4 weights).
- **bf16** (fp32 scales, or ``MX`` off): each value ``e2m1(c) · s_g`` decoded here in bf16, A's
  codes widened to bf16, a bf16 MMA; accumulator ``[A rows, weight rows]``.

An e8m0 scale of 255 is NaN in both forms.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._gemm import decode_e8m0


@triton.jit
def decode_e2m1(code):
    """e2m1 codes (sign<<3 | exponent<<1 | mantissa) -> fp32 {0, .5, 1, 1.5, 2, 3, 4, 6} with sign.

    The code's bits moved into an fp16 pattern, the sign to bit 15 and the three magnitude bits to
    bits 9-11 (the exponent's two low bits and the top mantissa bit), read e2m1(c) * 2^-14 exactly:
    normal ``2^(E - 15) (1 + M/2)`` for E >= 1, subnormal ``2^-15 M`` for E = 0. An exact fp16
    multiply by 2^14 and the exact widening to fp32 follow: about 4 instructions a value in the
    sm_90 SASS where taking exponent and mantissa apart took about 10."""
    c = code.to(tl.uint16)
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return (bits.to(tl.float16, bitcast=True) * 16384.0).to(tl.float32)


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
def as_bf16(codes, scale, SCALE_E8M0: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``e2m1(codes) · scale`` in bf16: codes [ROWS, COLS], scale [ROWS, COLS / 32] (fp32, or e8m0 bytes)."""
    if SCALE_E8M0:
        scale = decode_e8m0(scale)
    return (decode_e2m1(codes) * _per_element(scale, ROWS, COLS)).to(tl.bfloat16)


@triton.jit
def fp4_block_dot(
    acc, a, a_scale, packed, scale, SCALE_E8M0: tl.constexpr, MX: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """``acc + (A · B^T) · sA`` over one 128-wide K block of an FP4 weight, in the form's orientation.

    a: [BLOCK_M, COLS] e4m3 codes, a_scale: [BLOCK_M] fp32, packed: [ROWS, COLS / 2] e2m1 bytes,
    scale: [ROWS, COLS / 32] e8m0 bytes (MX) or fp32 / e8m0 bytes. MX: acc is [ROWS, BLOCK_M] (the
    product transposed, see the module docstring; the caller starts it with :func:`fp4_acc` and
    ends with :func:`fp4_result`); else [BLOCK_M, ROWS].
    """
    if MX:
        block = tl.dot_scaled(packed, scale, "e2m1", tl.trans(a), None, "e4m3")
        return acc + block * a_scale[None, :]
    else:
        b = as_bf16(unpack_codes(packed, ROWS, COLS), scale, SCALE_E8M0, ROWS, COLS)
        return acc + tl.dot(a.to(tl.bfloat16), tl.trans(b)) * a_scale[:, None]


@triton.jit
def fp4_acc(BLOCK_M: tl.constexpr, ROWS: tl.constexpr, MX: tl.constexpr):
    """A zero fp32 accumulator for :func:`fp4_block_dot`: [ROWS, BLOCK_M] for MX, else [BLOCK_M, ROWS]."""
    if MX:
        return tl.zeros((ROWS, BLOCK_M), dtype=tl.float32)
    else:
        return tl.zeros((BLOCK_M, ROWS), dtype=tl.float32)


@triton.jit
def fp4_result(acc, MX: tl.constexpr):
    """The [BLOCK_M, ROWS] product from a :func:`fp4_block_dot` accumulator."""
    if MX:
        return tl.trans(acc)
    else:
        return acc
