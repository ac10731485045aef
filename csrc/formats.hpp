// Scalar number-format codecs (v4_ops.md §11): FP8 e4m3fn, e8m0 scales, FP4 e2m1, bf16 output.
// Branch-free (both candidates computed, then a bit-mask select) so that loops over buffers
// auto-vectorise: with the default -ftrapping-math the compiler will not if-convert a ternary
// that guards float arithmetic.
#pragma once

#include <cstdint>
#include <cstring>

namespace seahal {

inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// condition ? if_true : if_false, as a bit-mask blend.
inline uint32_t select_bits(bool condition, uint32_t if_true, uint32_t if_false) {
    uint32_t mask = 0u - uint32_t(condition);
    return (if_true & mask) | (if_false & ~mask);
}

constexpr uint32_t kSignBit = 0x80000000u;
constexpr uint32_t kQuietNaN = 0x7FC00000u;

// e4m3fn byte -> fp32. Byte = s eeee mmm, bias 7, no infinities, s1111111 is NaN.
// Normal: the exponent/mantissa bits move up by 20 and the exponent is rebiased by +120
// (127 - 7); subnormal (e == 0): m * 2^-9.
inline float e4m3_decode(uint8_t byte) {
    uint32_t magnitude = byte & 0x7Fu;
    uint32_t sign = uint32_t(byte & 0x80u) << 24;
    uint32_t normal = (magnitude << 20) + (120u << 23);
    uint32_t subnormal = float_bits(float(int32_t(magnitude)) * 0x1p-9f);
    uint32_t bits = select_bits(magnitude < 8u, subnormal, normal);
    return bits_float(select_bits(magnitude == 0x7Fu, kQuietNaN, bits) | sign);
}

// fp32 -> e4m3fn byte, round to nearest even, saturating to ±448; NaN stays NaN (sign kept).
// Subnormals (|x| < 2^-6) round |x| * 2^9 to an integer 0..8 with the 2^23 trick (8 carries into
// the smallest normal 0x08). Normals drop 20 mantissa bits with RNE; the carry propagates into
// the exponent, and |x| < 448 never rounds past 448.
inline uint8_t e4m3_encode(float x) {
    uint32_t bits = float_bits(x);
    uint32_t sign = (bits & kSignBit) >> 24;
    uint32_t magnitude_bits = bits & ~kSignBit;
    float magnitude = bits_float(magnitude_bits);
    uint32_t subnormal = float_bits(magnitude * 0x1p9f + 0x1p23f) - float_bits(0x1p23f);
    uint32_t normal = ((magnitude_bits + 0x7FFFFu + ((magnitude_bits >> 20) & 1u)) >> 20) - (120u << 3);
    uint32_t code = select_bits(magnitude < 0x1p-6f, subnormal, normal);
    code = select_bits(magnitude >= 448.0f, 0x7Eu, code);
    code = select_bits(magnitude_bits > 0x7F800000u, 0x7Fu, code);
    return uint8_t(code | sign);
}

// e8m0 byte e -> 2^(e - 127); e = 0 is the fp32 subnormal 2^-127, e = 255 is NaN.
inline float e8m0_decode(uint8_t byte) {
    uint32_t bits = select_bits(byte == 0, 0x00400000u, uint32_t(byte) << 23);
    return bits_float(select_bits(byte == 0xFFu, kQuietNaN, bits));
}

// fp32 -> e8m0 byte: the nearest power of two of |x| in the linear domain as torch rounds it
// (the fp32 exponent field, plus one when the mantissa is at least half way, strictly more than
// half way for fp32 subnormals); NaN, ±inf and overflow past 2^127 give 255 (NaN).
inline uint8_t e8m0_encode(float x) {
    uint32_t bits = float_bits(x);
    uint32_t exponent = (bits >> 23) & 0xFFu;
    uint32_t mantissa = bits & 0x7FFFFFu;
    uint32_t round_up = select_bits(exponent > 0, mantissa >= 0x400000u, mantissa > 0x400000u);
    return uint8_t(select_bits(exponent == 0xFFu, 0xFFu, exponent + round_up));
}

// e2m1 magnitudes of codes 0..7; code 8 + i is the negative of code i.
constexpr float kE2m1Values[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

inline float e2m1_decode(uint8_t code) {
    float magnitude = kE2m1Values[code & 7u];
    return (code & 8u) ? -magnitude : magnitude;
}

// fp32 -> e2m1 code (0..15), nearest with ties to the even code, saturating at ±6; the sign is
// kept, so negatives that round to zero give -0 (code 8). The code counts the midpoints below
// |x|: a midpoint belongs to the upper neighbour when that neighbour's code is even.
inline uint8_t e2m1_encode(float x) {
    uint32_t bits = float_bits(x);
    float magnitude = bits_float(bits & ~kSignBit);
    uint32_t code = (magnitude > 0.25f) + (magnitude >= 0.75f) + (magnitude > 1.25f) + (magnitude >= 1.75f) +
                    (magnitude > 2.5f) + (magnitude >= 3.5f) + (magnitude > 5.0f);
    return uint8_t(code | ((bits & kSignBit) >> 28));
}

// fp32 -> bf16 bits, round to nearest even; any NaN becomes the quiet NaN 0x7FC0 (as torch).
inline uint16_t bf16_encode(float x) {
    uint32_t bits = float_bits(x);
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return uint16_t(select_bits((bits & ~kSignBit) > 0x7F800000u, kQuietNaN >> 16, rounded));
}

}  // namespace seahal
