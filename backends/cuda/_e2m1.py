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
  block and 16 rows, against ~2.6-3.0k for the first hand-written decode, which also ended in
  mma.sync: the first GPU run measured that form at 250 GB/s streaming FP4 weights).
- **bf16** (fp32 scales, or ``MX`` off): the weight decoded here to bf16 (:func:`e2m1_bf16` from
  e8m0 scales, in bf16 bit arithmetic; :func:`as_bf16` from fp32 scales, through fp32), A's codes
  widened to bf16, a bf16 MMA; accumulator ``[A rows, weight rows]``. Both operands' K go in
  :func:`lane_order`, so that each lane decodes 16 consecutive bytes under one scale (the stored
  order cost a one-byte shared-memory load per byte: sm_90 SASS of the one-token experts' gate-up
  loop 777 -> 691 instructions a warp, 168 -> 114 registers). Weights first with e8m0 scales,
  the codes may come as 4-byte words (:func:`e2m1_bf16_words`, K in :func:`word_lane_order`):
  each word gives its four bf16 pairs in shifts and masks, with no byte taken apart (the
  one-token experts' gate-up loop 691 -> 607 instructions a warp, down 362 -> 320).

An e8m0 scale of 255 is NaN in both forms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cache_keys import settle_cache_keys
from ._gemm import decode_e8m0, oriented, oriented_dot
from ._numerics import INTERPRETED, cast_rne


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


def lane_order_columns() -> torch.Tensor:
    """int64 [128]: the stored column that each column of :func:`lane_order` takes (host side)."""
    h = torch.arange(128)
    return 32 * (h // 2 % 4) + 4 * (h // 16) + 2 * (h // 8 % 2) + h % 2


@triton.jit
def lane_order(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS] -> the same rows with the columns in *lane order*: column ``16g + 8c + 2j + p``
    takes column ``32j + 4g + 2c + p`` (j < 4, g < COLS / 16, c, p < 2; COLS = 128).

    A 16-bit MMA operand fragment gives lane j of each quad the K positions 2j, 2j+1, 2j+8, 2j+9 of
    every 16-wide step. In lane order those are, over a 128-wide K block, the columns 32j ... 32j+31
    as stored: 16 consecutive bytes of packed FP4 codes and one 1x32 scale, where the stored order
    hands a lane bytes 4 apart (a byte load each: 64 LDS.U8 a lane per block in the sm_90 SASS of
    the one-token experts). A product over K does not depend on the order of K, so both operands
    in lane order give the same products (summed in another order)."""
    tl.static_assert(COLS == 128, "lane order is laid out for 128-wide K blocks")
    return tl.permute(x.reshape(ROWS, 4, COLS // 16, 2, 2), (0, 2, 3, 1, 4)).reshape(ROWS, COLS)


def word_lane_order_columns() -> torch.Tensor:
    """int64 [128]: the stored column that each column of :func:`word_lane_order` takes (host side)."""
    c = torch.arange(128)
    q, a, b, g, h = c // 32, c // 16 % 2, c // 8 % 2, c // 2 % 4, c % 2
    return 32 * g + 8 * q + 4 * h + 2 * a + b


@triton.jit
def word_lane_order(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS] -> the same rows with the columns in *word lane order*: column ``32q + 16a +
    8b + 2g + h`` takes column ``32g + 8q + 4h + 2a + b`` (g, q < 4; a, b, h < 2; COLS = 128).

    As in :func:`lane_order`, lane g of each quad gets the stored columns 32g ... 32g+31 (four
    4-byte words of FP4 codes, one 1x32 scale); each pair of K positions that an MMA fragment
    holds in one 32-bit register is codes i and i + 4 of one word (i = 2a + b, h picks which),
    the two that :func:`e2m1_bf16_words` forms together."""
    tl.static_assert(COLS == 128, "word lane order is laid out for 128-wide K blocks")
    return tl.permute(x.reshape(ROWS, 4, 4, 2, 2, 2), (0, 2, 4, 5, 1, 3)).reshape(ROWS, COLS)


@triton.jit
def in_k_order(x, ROWS: tl.constexpr, COLS: tl.constexpr, ORDER: tl.constexpr):
    """[ROWS, COLS] with its columns in ``ORDER``: "stored" (as they are), "lanes"
    (:func:`lane_order`) or "words" (:func:`word_lane_order`)."""
    if ORDER == "words":
        return word_lane_order(x, ROWS, COLS)
    elif ORDER == "lanes":
        return lane_order(x, ROWS, COLS)
    else:
        return x


@triton.jit
def e2m1_bf16(packed, exponent, ROWS: tl.constexpr, COLS: tl.constexpr, LANES: tl.constexpr = False):
    """Packed e2m1 bytes [ROWS, COLS / 2] (element 2i the low nibble of byte i) with e8m0 bytes
    [ROWS, COLS / 32] -> bf16 [ROWS, COLS] ``e2m1(c) * 2^(e - 127)``, rounded as the fp32 product
    rounds to bf16 (exact unless it leaves bf16's normal range; e = 255 is NaN); LANES: in
    :func:`lane_order` (each lane's 32 values then share one scale).

    Both codes of a byte become the two bf16 halves of one 32-bit word in two multiply-and-mask
    steps: the three magnitude bits to bits 6-8 (16 higher for the high nibble), the sign to bit 15
    (31). Each half then reads ``e2m1(c) * 2^-126`` (exponent field E = the code's exponent bits,
    normal ``2^(E - 127) (1 + M/2)``, subnormal ``2^-126 M/2`` for E = 0), and two exact bf16
    multiplies by 2^126 and by the scale give the value: about 3 instructions a value in the sm_90
    SASS, against about 9 for decoding to fp32, scaling there and rounding to bf16. The
    interpreter, whose bf16 arithmetic is wrong, does the multiplies in fp32 on the same bits.
    """
    b = packed.to(tl.uint32)
    pair = ((b * 0x40040) & 0x01C001C0) | ((b * 0x1001000) & 0x80008000)
    bits = tl.join(pair.to(tl.uint16), (pair >> 16).to(tl.uint16)).reshape(ROWS, COLS)
    order: tl.constexpr = "lanes" if LANES else "stored"
    return _scaled_bf16(in_k_order(bits, ROWS, COLS, order), exponent, ROWS, COLS, order)


@triton.jit
def e2m1_bf16_words(words, exponent, ROWS: tl.constexpr, COLS: tl.constexpr):
    """:func:`e2m1_bf16` of codes packed in 4-byte words: words [ROWS, COLS / 8] uint32 (code i of
    a word at bits 4i: little-endian bytes, low nibble first) with e8m0 bytes [ROWS, COLS / 32] ->
    bf16 [ROWS, COLS] in :func:`word_lane_order`.

    Codes i and i + 4 of a word are shifted together into one 32-bit word of two bf16 patterns
    ``e2m1(c) * 2^-126`` (magnitude bits to bits 6-8 and 22-24, signs to bits 15 and 31): per word
    seven shifts and eight masks for eight values, where a byte at a time costs a byte extraction
    and two multiplies and two masks for two."""
    tl.static_assert(COLS == 128, "word lane order is laid out for 128-wide K blocks")
    magnitudes: tl.constexpr = 0x01C001C0
    signs: tl.constexpr = 0x80008000
    r0 = ((words << 6) & magnitudes) | ((words << 12) & signs)  # codes 0 (low half) and 4 (high half)
    r1 = ((words << 2) & magnitudes) | ((words << 8) & signs)  # codes 1 and 5
    r2 = ((words >> 2) & magnitudes) | ((words << 4) & signs)  # codes 2 and 6
    r3 = ((words >> 6) & magnitudes) | (words & signs)  # codes 3 and 7
    r = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [ROWS, 4g + q, a, b]: codes 2a + b and 2a + b + 4
    bits = tl.join(r.to(tl.uint16), (r >> 16).to(tl.uint16))  # [ROWS, 4g + q, a, b, h]
    bits = tl.permute(bits.reshape(ROWS, 4, 4, 2, 2, 2), (0, 2, 3, 4, 1, 5)).reshape(ROWS, COLS)
    return _scaled_bf16(bits, exponent, ROWS, COLS, "words")


@triton.jit
def _scaled_bf16(bits, exponent, ROWS: tl.constexpr, COLS: tl.constexpr, ORDER: tl.constexpr):
    """bf16 patterns ``e2m1(c) * 2^-126`` [ROWS, COLS] in ``ORDER`` (:func:`_per_element`) times
    their groups' e8m0 scales [ROWS, COLS / 32]: ``e2m1(c) * 2^(e - 127)`` in bf16. Two exact bf16
    multiplies, by 2^126 and by the scale (the patterns with E = 0 are bf16 subnormals; 2^126 times
    a scale above 2 would overflow, so they do not fold into one); the interpreter, whose bf16
    arithmetic is wrong, multiplies in fp32 and rounds once."""
    if INTERPRETED:
        unit = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True) * 2.0**126  # e2m1(c), exactly
        return cast_rne(unit * _per_element(decode_e8m0(exponent), ROWS, COLS, ORDER), tl.bfloat16)
    e = exponent.to(tl.uint16)
    scale_bits = tl.where(e == 0, 0x0040, tl.where(e == 255, 0x7FC0, e << 7)).to(tl.uint16)  # 2^(e - 127) in bf16
    scale = _per_element(scale_bits.to(tl.bfloat16, bitcast=True), ROWS, COLS, ORDER)
    return bits.to(tl.bfloat16, bitcast=True) * tl.full((), 2.0**126, tl.bfloat16) * scale


@triton.jit
def unpack_codes(packed, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS / 2] bytes -> [ROWS, COLS] e2m1 codes, element 2i the low nibble of byte i."""
    return tl.join(packed & 0xF, packed >> 4).reshape(ROWS, COLS)


@triton.jit
def _per_element(group_values, ROWS: tl.constexpr, COLS: tl.constexpr, ORDER: tl.constexpr = "stored"):
    """[ROWS, COLS / 32] values of the 1x32 groups -> [ROWS, COLS], each repeated over its group's
    columns in ``ORDER``: "stored", "lanes" (:func:`lane_order`) or "words" (:func:`word_lane_order`);
    in both lane orders group j is lane j's."""
    groups: tl.constexpr = COLS // 32
    if ORDER == "lanes":
        tl.static_assert(COLS == 128, "lane order is laid out for 128-wide K blocks")
        return tl.broadcast_to(group_values[:, None, None, :, None], (ROWS, COLS // 16, 2, 4, 2)).reshape(ROWS, COLS)
    elif ORDER == "words":
        tl.static_assert(COLS == 128, "word lane order is laid out for 128-wide K blocks")
        return tl.broadcast_to(group_values[:, None, None, None, :, None], (ROWS, 4, 2, 2, 4, 2)).reshape(ROWS, COLS)
    else:
        return tl.broadcast_to(group_values[:, :, None], (ROWS, groups, 32)).reshape(ROWS, COLS)


@triton.jit
def as_bf16(codes, scale, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``e2m1(codes) · scale`` rounded to bf16: codes [ROWS, COLS], fp32 scale [ROWS, COLS / 32]."""
    return cast_rne(decode_e2m1(codes) * _per_element(scale, ROWS, COLS), tl.bfloat16)


@triton.jit
def fp4_block_dot(
    acc, a, a_scale, packed, scale, SCALE_E8M0: tl.constexpr, MX: tl.constexpr, WEIGHTS_FIRST: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, A_SCALED: tl.constexpr = True,
):
    """``acc + (A · B^T) · sA`` over one 128-wide K block of an FP4 weight, in the given orientation;
    with A_SCALED off (activations first), ``acc + A · B^T`` on A's bf16 values, accumulated in the
    MMA (A already holds the scaled values: :func:`.quant.fp8_round_trip`).

    a: [BLOCK_M, COLS] e4m3 codes, a_scale: [BLOCK_M] fp32, packed: [ROWS, COLS / 2] e2m1 bytes
    (or, weights first with e8m0 scales, [ROWS, COLS / 8] uint32 words of eight codes),
    scale: [ROWS, COLS / 32] e8m0 bytes (MX) or fp32 / e8m0 bytes. WEIGHTS_FIRST (always for MX;
    for the bf16 form :func:`._gemm.weights_first`): acc is the product transposed, [ROWS,
    BLOCK_M], else [BLOCK_M, ROWS] (:func:`._gemm.oriented_acc`, :func:`._gemm.oriented`).

    Weights first, the decoded weight tile is the MMA's first operand, straight from registers, and
    the few activation rows its N (wgmma m64nBLOCK_Mk16). Activations first, 16 rows would make an
    mma.sync product whose four warps each widen all of A, with the decoded weights stored to
    shared memory on the way (sm_90 SASS, 16x64 tile: 494 -> 439 loop instructions a warp).
    """
    tl.static_assert(WEIGHTS_FIRST or not MX, "the mx form forms the product weights first")
    if MX:
        block = tl.dot_scaled(packed, scale, "e2m1", tl.trans(a), None, "e4m3")
        return acc + block * a_scale[None, :]
    else:  # both operands' K in (word) lane order: each lane decodes 16 consecutive bytes with one scale
        order: tl.constexpr = "words" if packed.dtype == tl.uint32 else "lanes"
        if order == "words":
            tl.static_assert(WEIGHTS_FIRST and SCALE_E8M0, "FP4 words decode weights first, from e8m0 scales")
            b = e2m1_bf16_words(packed, scale, ROWS, COLS)
        elif SCALE_E8M0:
            b = e2m1_bf16(packed, scale, ROWS, COLS, LANES=True)
        else:
            b = lane_order(as_bf16(unpack_codes(packed, ROWS, COLS), scale, ROWS, COLS), ROWS, COLS)
        a = in_k_order(a.to(tl.bfloat16), a.shape[0], COLS, order)
        if A_SCALED:
            product = oriented_dot(a, tl.trans(b), WEIGHTS_FIRST)
            return acc + product * oriented(a_scale[:, None], WEIGHTS_FIRST)
        else:
            tl.static_assert(not WEIGHTS_FIRST, "scaled activation values are multiplied activations first")
            return tl.dot(a, tl.trans(b), acc)


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
