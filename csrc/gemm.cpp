// Block-scaled quantised GEMMs on the CPU: C[M, N] = A[M, K] @ B[N, K]^T (v4_ops.md §11.2, §11.5);
// and, at the end of this file, grouped_linear over an FP8 weight (bf16 / fp32 activations).
//
// A is e4m3 with 1x128 fp32 scales sA. B is e4m3 with 128x128 scales (fp8_block_gemm) or packed
// e2m1 with 1x32 scales (fp4_gemm). K is walked in 128-wide blocks kb; for each, the fp32 dot
// product of the block is multiplied by sA[m, kb] * sB and added to an fp32 accumulator:
//
//   C[m, n] = sum_kb (sum_{k in kb} A[m, k] B'[n, k]) * (sA[m, kb] * sB'[n, kb])
//
// For FP8, B' = B and sB' is the 128x128 block scale: the reference's arithmetic. For FP4 the
// 1x32 scales vary inside a block, so they are applied while decoding (B' = e2m1(B) * sB[n, k/32],
// sB' = 1). With e8m0 (power-of-two) scales that product is exact and the result equals the
// reference's per-32-step sums up to summation order; with arbitrary fp32 scales each weight
// picks up one rounding (2^-24 relative) more.
//
// Each dot product runs in 8 independent fp32 lanes, each scaled and accumulated on its own, the
// lanes summed at the end (again only the summation order differs from the reference).
//
// Work items are tiles of up to 64 weight rows times passes of up to 256 activation rows (OpenMP,
// static schedule). For each 128-wide K block a tile's weight bytes (and e8m0 or fp32 scales, as
// stored) are decoded into a small fp32 panel (64 x 128 floats, about L1) that serves every
// activation row of the pass, 4 rows at a time: the weight is read once per pass and never
// expanded in full. The activations are decoded once up front. Hot loops use GCC vector
// extensions (8 fp32 lanes) and are compiled twice on x86-64: for the baseline ISA and, with
// AVX2+FMA+F16C weight decoders, for CPUs that have those (picked at run time). Each output
// element is summed by one work item in a fixed order: the result does not depend on the thread
// count.
//
// CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later) take a third variant: panels and
// activations in bf16, which holds every e4m3 and e2m1 value exactly, and products summed by
// VDPBF16PS (two exact products a lane, added to the fp32 lane in turn, rounding to nearest even):
// twice the multiply-adds of an FMA an instruction, half the panel bytes; weights decoded by table
// lookups in registers (VPERMW, VPERMT2W), a third of the AVX2 decode's instructions. VDPBF16PS
// flushes subnormal inputs and results, so an FP4 weight's decoded values are multiplied by their
// e8m0 scales (exactly) only when every scale of the call keeps all products normal; otherwise,
// and for fp32 scales, each 32-wide step's sum is multiplied by its scale (the reference kernel's
// form). The same sums in another order, and the same values for any thread count.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "formats.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifdef SEAHAL_HAVE_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace seahal {
namespace {

#define SEAHAL_INLINE inline __attribute__((always_inline))

constexpr int kBlock = 128;              // activation scale block along K
constexpr int kFp4Step = 32;             // FP4 weight scale step along K
constexpr int kLanes = 8;                // independent fp32 accumulation lanes per dot product
constexpr int64_t kRowGroup = 8;         // tile rows come in groups of 8 (the M=1 kernel's width)
constexpr int64_t kMaxTileRows = 64;     // panel: 64 rows x 128 x 4 B = 32 KiB
constexpr int64_t kTilesPerThread = 4;   // keeps threads balanced when N is small
constexpr int64_t kRowsPerPass = 256;    // activation rows per work item (bounds the accumulators)
constexpr int64_t kPrefetchBlocks = 1;   // weight prefetch distance, in K blocks

struct GemmArgs {
    const uint8_t* a;      // [M, K] e4m3
    const float* a_scale;  // [M, K/128]
    const uint8_t* b;      // fp8: [N, K] e4m3; fp4: [N, K/2] packed e2m1
    const void* b_scale;   // fp8: [ceil(N/128), K/128]; fp4: [N, K/32]; fp32, or e8m0 bytes
    void* out;             // [M, N] bf16 or fp32
    int64_t m, n, k;
    bool b_scale_e8m0;
    bool out_bf16;
};

// Weight scale number i, from fp32 or e8m0 storage.
SEAHAL_INLINE float weight_scale(const GemmArgs& g, int64_t i) {
    return g.b_scale_e8m0 ? e8m0_decode(static_cast<const uint8_t*>(g.b_scale)[i])
                          : static_cast<const float*>(g.b_scale)[i];
}

// A closed range of bytes (e8m0 scale exponents): whether it contains a byte, and whether it
// holds all of `count` bytes (a min/max scan the compiler vectorises).
struct ByteRange {
    uint8_t lowest, highest;

    bool contains(uint8_t byte) const { return byte >= lowest && byte <= highest; }
    bool holds(const uint8_t* bytes, int64_t count) const {
        uint8_t low = 255, high = 0;
        for (int64_t i = 0; i < count; ++i) {
            low = std::min(low, bytes[i]);
            high = std::max(high, bytes[i]);
        }
        return count == 0 || (low >= lowest && high <= highest);
    }
};

// Weight-byte decoders, one per instruction set, writing fp32 values.
// e4m3(src, dst): 128 e4m3 bytes -> 128 exact values.
// e2m1(src, scales, dst): 64 packed bytes (128 codes) -> values * scales[k / 32], each 32-element
// step as its 16 even elements (low nibbles) then its 16 odd ones (high nibbles). The code -0 may
// come out as +0, which no sum can tell apart once the accumulator starts at +0.
struct BaselineDecoder {
    static SEAHAL_INLINE void e4m3(const uint8_t* src, float* dst) {
        for (int i = 0; i < kBlock; ++i) dst[i] = e4m3_decode(src[i]);
    }
    static SEAHAL_INLINE void e2m1(const uint8_t* src, const float* scales, float* dst) {
        for (int s = 0; s < kBlock; s += kFp4Step)
            for (int i = 0; i < kFp4Step / 2; ++i) {
                const uint8_t byte = src[s / 2 + i];
                dst[s + i] = e2m1_decode(byte & 0x0Fu) * scales[s / kFp4Step];
                dst[s + kFp4Step / 2 + i] = e2m1_decode(byte >> 4) * scales[s / kFp4Step];
            }
    }
};

#if defined(__x86_64__)
#define SEAHAL_AVX2 __attribute__((target("avx2,fma,f16c")))

struct Avx2Decoder {
    // e4m3 -> fp16 bits -> fp32 (F16C): the byte's 7 magnitude bits shifted left by 7 are the fp16
    // of value * 2^-8 (e4m3 and fp16 subnormals line up, and F16C converts fp16 subnormals exactly
    // whatever the MXCSR flush modes); doubling bit 14 moves the sign up to bit 15. Magnitude 0x7F
    // (NaN in e4m3fn) becomes the fp16 NaN 0x7E00.
    static SEAHAL_AVX2 void e4m3(const uint8_t* src, float* dst) {
        const __m256i sign_at_14 = _mm256_set1_epi16(0x4000), magnitude = _mm256_set1_epi16(0x7F);
        const __m256i fp16_nan = _mm256_set1_epi16(0x7E00);
        const __m256 rescale = _mm256_set1_ps(256.0f);
        for (int i = 0; i < kBlock; i += 16) {
            const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
            __m256i half = _mm256_slli_epi16(bytes, 7);
            half = _mm256_add_epi16(half, _mm256_and_si256(half, sign_at_14));
            const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(bytes, magnitude), magnitude);
            half = _mm256_or_si256(half, _mm256_and_si256(nan, fp16_nan));
            _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(half)), rescale));
            _mm256_storeu_ps(dst + i + 8, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(half, 1)), rescale));
        }
    }
    // e2m1 via a 16-entry byte shuffle to 2 * value (integers in [-12, 12]), int -> fp32, then one
    // multiply by scale / 2 (the same real product as value * scale, so the same rounding).
    static SEAHAL_AVX2 void e2m1(const uint8_t* src, const float* scales, float* dst) {
        const __m128i twice = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
        const __m128i nibble = _mm_set1_epi8(0x0F);
        for (int s = 0; s < kBlock; s += kFp4Step) {
            const __m256 half_scale = _mm256_set1_ps(0.5f * scales[s / kFp4Step]);
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + s / 2));
            const __m128i even = _mm_shuffle_epi8(twice, _mm_and_si128(bytes, nibble));
            const __m128i odd = _mm_shuffle_epi8(twice, _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
            const __m128i parts[4] = {even, _mm_srli_si128(even, 8), odd, _mm_srli_si128(odd, 8)};
            for (int q = 0; q < 4; ++q)
                _mm256_storeu_ps(dst + s + 8 * q,
                                 _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[q])), half_scale));
        }
    }
};
#endif

// The AVX512-BF16 variant, where the compiler knows the instruction set (GCC 11 and later).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define SEAHAL_HAVE_BF16 1
#define SEAHAL_BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512bf16")))
#endif

// A tile walks kMaxTileRows weight rows block by block, more concurrent streams than the hardware
// prefetchers follow, so each block asks for the same row's bytes kPrefetchBlocks blocks ahead.
// bytes: one block's bytes in the row; left: bytes from src to the row's end.
SEAHAL_INLINE void prefetch_ahead(const uint8_t* src, int64_t bytes, int64_t left) {
    const int64_t ahead = kPrefetchBlocks * bytes;
    if (ahead >= left) return;
    for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(src + ahead + line);
}

SEAHAL_INLINE void prefetch_scale(const GemmArgs& g, int64_t i) {
    __builtin_prefetch(g.b_scale_e8m0 ? static_cast<const void*>(static_cast<const uint8_t*>(g.b_scale) + i)
                                      : static_cast<const void*>(static_cast<const float*>(g.b_scale) + i));
}

// A weight format: where row `row`'s K block kb lies (`block`, which prefetches ahead and reads
// the block's kScales scales, one per kBlock / kScales elements along K), and whether its values
// are decoded in the order of its even elements then its odd ones in each 32-element step
// (kDeinterleaved: the activations are laid out the same way, so the decode needs no shuffle).

// FP8 weights: one e4m3 byte per element, one scale per 128x128 block.
struct Fp8Weights {
    static constexpr bool kDeinterleaved = false;
    static constexpr int kScales = 1;

    static SEAHAL_INLINE const uint8_t* block(const GemmArgs& g, int64_t row, int64_t kb, float* scales) {
        const uint8_t* src = g.b + row * g.k + kb * kBlock;
        prefetch_ahead(src, kBlock, g.k - kb * kBlock);
        scales[0] = weight_scale(g, (row / kBlock) * (g.k / kBlock) + kb);
        return src;
    }
};

// FP4 weights: two e2m1 codes per byte (even element in the low nibble), one scale per 1x32.
struct Fp4Weights {
    static constexpr bool kDeinterleaved = true;
    static constexpr int kScales = kBlock / kFp4Step;

    static SEAHAL_INLINE const uint8_t* block(const GemmArgs& g, int64_t row, int64_t kb, float* scales) {
        const int64_t first = first_scale(g, row, kb);
        for (int s = 0; s < kScales; ++s) scales[s] = weight_scale(g, first + s);
        return bytes(g, row, kb);
    }
    // The block's bytes alone (its scales' e8m0 bytes start at first_scale).
    static SEAHAL_INLINE const uint8_t* bytes(const GemmArgs& g, int64_t row, int64_t kb) {
        const uint8_t* src = g.b + row * (g.k / 2) + kb * (kBlock / 2);
        prefetch_ahead(src, kBlock / 2, (g.k - kb * kBlock) / 2);
        if (kb + kPrefetchBlocks < g.k / kBlock) prefetch_scale(g, first_scale(g, row, kb) + kPrefetchBlocks * kScales);
        return src;
    }
    static SEAHAL_INLINE int64_t first_scale(const GemmArgs& g, int64_t row, int64_t kb) {
        return row * (g.k / kFp4Step) + kb * kScales;
    }
};

// fp32 buffer aligned to a cache line, so that no 8-lane load straddles two lines.
using AlignedFloats = std::unique_ptr<float[], decltype(&std::free)>;

AlignedFloats aligned_floats(int64_t n) {
    const size_t bytes = (size_t(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64 * 64;
    float* data = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (data == nullptr) throw std::bad_alloc();
    return AlignedFloats(data, &std::free);
}

// One thread's buffers: a tile's decoded weight block and its scales, and the lane accumulators of
// every (activation row, tile row) pair.
struct Scratch {
    AlignedFloats panel;        // [kMaxTileRows, 128] values (fp32, or bf16 in its first half)
    AlignedFloats panel_scale;  // [kMaxTileRows, scales a row]
    AlignedFloats acc;          // [M, tile rows, kLanes]
};

// Eight fp32 lanes (GCC vector extension: one AVX register, or two SSE registers on the baseline).
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

SEAHAL_INLINE Lanes load_lanes(const float* p) {
    Lanes v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

SEAHAL_INLINE void store_lanes(float* p, Lanes v) { std::memcpy(p, &v, sizeof v); }

// For MR activation rows i and NR panel rows j of one K block:
// acc[i][j] += (lane partial dot of a_i and b_j) * (sa_i * sb_j).
// a: activation rows (stride lda), sa: their block scales (stride lds); b: panel rows (stride
// 128), sb: their block scales; acc: each (i, j) pair's lanes at acc[i * acc_stride + j * kLanes].
template <int MR, int NR>
SEAHAL_INLINE void dot_block(const float* a, int64_t lda, const float* sa, int64_t lds, const float* b,
                             const float* sb, float* acc, int64_t acc_stride) {
    Lanes part[MR][NR] = {};
    for (int k = 0; k < kBlock; k += kLanes) {
        Lanes av[MR], bv[NR];
        for (int i = 0; i < MR; ++i) av[i] = load_lanes(a + i * lda + k);
        for (int j = 0; j < NR; ++j) bv[j] = load_lanes(b + j * kBlock + k);
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) part[i][j] += av[i] * bv[j];
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            float* lanes = acc + i * acc_stride + j * kLanes;
            store_lanes(lanes, load_lanes(lanes) + part[i][j] * (sa[i * lds] * sb[j]));
        }
}

// How a tile's panel holds one K block of a weight format W. Fp32Panel: the weight's values, FP4
// ones times their 1x32 scales, and one factor a row (the FP8 block scale, or 1) for dot_block.
template <class W, class Decoder>
struct Fp32Panel {
    using Value = float;
    static constexpr int kScales = 1;  // panel_scale slots a row
    static constexpr int kRows = 4, kCols = 2;

    static SEAHAL_INLINE void decode(const GemmArgs& g, int64_t row, int64_t kb, float* dst, float* factor) {
        float scales[W::kScales];
        const uint8_t* src = W::block(g, row, kb, scales);
        if constexpr (W::kScales == 1) {
            Decoder::e4m3(src, dst);
            *factor = scales[0];
        } else {
            Decoder::e2m1(src, scales, dst);
            *factor = 1.0f;
        }
    }
    template <int MR, int NR>
    static SEAHAL_INLINE void dot(const float* a, int64_t lda, const float* sa, int64_t lds, const float* b,
                                  const float* sb, float* acc, int64_t acc_stride) {
        dot_block<MR, NR>(a, lda, sa, lds, b, sb, acc, acc_stride);
    }
};

// Activation e4m3 byte -> a panel value: fp32, or its bf16 pattern (exact).
template <class Value>
SEAHAL_INLINE Value activation_value(uint8_t byte) {
    if constexpr (sizeof(Value) == sizeof(float))
        return e4m3_decode(byte);
    else
        return uint16_t(float_bits(e4m3_decode(byte)) >> 16);
}

SEAHAL_INLINE float sum_lanes(const float* lanes) {
    return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

// One work item: output rows [m0, m0 + rows_m) x columns [n0, n0 + tile_rows). tile_rows is a
// multiple of 8, at most kMaxTileRows; weight rows past N are decoded as zeros and not written.
struct Tile {
    int64_t m0, rows_m, n0, tile_rows;
};

// activations: decoded activations [M, K] of Panel::Value; their scales are g.a_scale [M, K/128].
template <class W, class Panel>
SEAHAL_INLINE void gemm_tile(const GemmArgs& g, const void* activations, Tile tile, Scratch& scratch) {
    using Value = typename Panel::Value;
    constexpr int kScales = Panel::kScales;
    const int64_t rows_n = std::min(tile.tile_rows, g.n - tile.n0);
    const int64_t k_blocks = g.k / kBlock, acc_stride = tile.tile_rows * kLanes;
    const Value* a_rows = static_cast<const Value*>(activations) + tile.m0 * g.k;
    const float* sa_rows = g.a_scale + tile.m0 * k_blocks;
    Value* panel = reinterpret_cast<Value*>(scratch.panel.get());
    float* panel_scale = scratch.panel_scale.get();
    float* acc = scratch.acc.get();
    std::fill(acc, acc + tile.rows_m * acc_stride, 0.0f);
    std::fill(panel + rows_n * kBlock, panel + tile.tile_rows * kBlock, Value(0));
    std::fill(panel_scale + rows_n * kScales, panel_scale + tile.tile_rows * kScales, 0.0f);

    for (int64_t kb = 0; kb < k_blocks; ++kb) {
        for (int64_t j = 0; j < rows_n; ++j)
            Panel::decode(g, tile.n0 + j, kb, panel + j * kBlock, panel_scale + j * kScales);
        const Value* a_block = a_rows + kb * kBlock;
        int64_t m = 0;
        for (; m + Panel::kRows <= tile.rows_m; m += Panel::kRows)
            for (int64_t j = 0; j < tile.tile_rows; j += Panel::kCols)
                Panel::template dot<Panel::kRows, Panel::kCols>(
                    a_block + m * g.k, g.k, sa_rows + m * k_blocks + kb, k_blocks, panel + j * kBlock,
                    panel_scale + j * kScales, acc + m * acc_stride + j * kLanes, acc_stride);
        for (; m < tile.rows_m; ++m)
            for (int64_t j = 0; j < tile.tile_rows; j += kRowGroup)
                Panel::template dot<1, kRowGroup>(a_block + m * g.k, g.k, sa_rows + m * k_blocks + kb, k_blocks,
                                                  panel + j * kBlock, panel_scale + j * kScales,
                                                  acc + m * acc_stride + j * kLanes, acc_stride);
    }

    for (int64_t m = 0; m < tile.rows_m; ++m)
        for (int64_t j = 0; j < rows_n; ++j) {
            const float c = sum_lanes(acc + m * acc_stride + j * kLanes);
            const int64_t at = (tile.m0 + m) * g.n + tile.n0 + j;
            if (g.out_bf16)
                static_cast<uint16_t*>(g.out)[at] = bf16_encode(c);
            else
                static_cast<float*>(g.out)[at] = c;
        }
}

// Activation row m decoded into af[m] (each 32-element step as even then odd elements when the
// weights are decoded that way).
template <class W, class Value>
void decode_activation_row(const GemmArgs& g, int64_t m, void* activations) {
    const uint8_t* src = g.a + m * g.k;
    Value* dst = static_cast<Value*>(activations) + m * g.k;
    for (int64_t s = 0; s < g.k; s += kFp4Step)
        for (int i = 0; i < kFp4Step; ++i) {
            const int pos = W::kDeinterleaved ? (i % 2) * (kFp4Step / 2) + i / 2 : i;
            dst[s + pos] = activation_value<Value>(src[s + i]);
        }
}

// The instruction-set variants, in the order of preference.
enum class Simd : int { kBaseline, kAvx2, kAvx512Bf16 };
constexpr const char* kSimdNames[] = {"baseline", "avx2+fma+f16c", "avx512bf16"};

Simd detect_simd() {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
        return Simd::kBaseline;
#ifdef SEAHAL_HAVE_BF16
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512bf16"))
        return Simd::kAvx512Bf16;
#endif
    return Simd::kAvx2;
#else
    return Simd::kBaseline;
#endif
}

std::atomic<int> g_simd_limit{int(Simd::kAvx512Bf16)};  // set_simd lowers it, e.g. to test a variant

Simd best_simd() {
    static const Simd best = detect_simd();
    return best;
}

Simd simd() { return Simd(std::min(int(best_simd()), g_simd_limit.load())); }

bool use_avx2() { return simd() >= Simd::kAvx2; }

// One variant of the tile kernel: the tile itself, and the decoder of an activation row into the
// values its panels hold (value_bytes each).
struct TileKernel {
    void (*tile)(const GemmArgs&, const void*, Tile, Scratch&);
    void (*activation_row)(const GemmArgs&, int64_t, void*);
    int value_bytes;
};

template <class W>
void gemm_tile_baseline(const GemmArgs& g, const void* af, Tile tile, Scratch& s) {
    gemm_tile<W, Fp32Panel<W, BaselineDecoder>>(g, af, tile, s);
}

#if defined(__x86_64__)
template <class W>
SEAHAL_AVX2 void gemm_tile_avx2(const GemmArgs& g, const void* af, Tile tile, Scratch& s) {
    gemm_tile<W, Fp32Panel<W, Avx2Decoder>>(g, af, tile, s);
}
#endif

#ifdef SEAHAL_HAVE_BF16
// The bf16 patterns of the e4m3 magnitudes 0..127 (exact), cache-line aligned.
const std::array<uint16_t, 128>& e4m3_bf16_patterns() {
    alignas(64) static const std::array<uint16_t, 128> patterns = [] {
        std::array<uint16_t, 128> p{};
        for (int m = 0; m < 128; ++m) p[m] = uint16_t(float_bits(e4m3_decode(uint8_t(m))) >> 16);
        return p;
    }();
    return patterns;
}

// Weight bytes -> bf16 bit patterns (exact), unscaled, in the orders of the decoders above.
struct Bf16Decoder {
    // e4m3: each byte's magnitude looked up in a 128-entry table of bf16 patterns (two VPERMT2W
    // of 64 entries each, the byte's bit 6 choosing), its sign moved to bit 15: 32 values in about
    // 10 instructions. Magnitude 0x7F (NaN in e4m3fn) is a bf16 NaN.
    static SEAHAL_BF16 void e4m3(const uint8_t* src, uint16_t* dst) {
        const uint16_t* patterns = e4m3_bf16_patterns().data();
        __m512i table[4];
        for (int q = 0; q < 4; ++q) table[q] = _mm512_load_si512(patterns + 32 * q);
        const __m512i magnitude = _mm512_set1_epi16(0x7F), bit6 = _mm512_set1_epi16(0x40);
        const __m512i sign = _mm512_set1_epi16(0x80);
        for (int i = 0; i < kBlock; i += 32) {
            const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
            const __m512i index = _mm512_and_si512(bytes, magnitude);
            const __m512i low = _mm512_permutex2var_epi16(table[0], index, table[1]);
            const __m512i high = _mm512_permutex2var_epi16(table[2], index, table[3]);
            __m512i values = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(index, bit6), low, high);
            values = _mm512_or_si512(values, _mm512_slli_epi16(_mm512_and_si512(bytes, sign), 8));
            _mm512_storeu_si512(dst + i, values);
        }
    }
    // e2m1: each code's bf16 pattern looked up in a 16-entry table of 16-bit words (VPERMW), about
    // 0.3 instructions a value. With `exponents` (the 1x32 scales' e8m0 bytes, each within
    // kExactScaledFp4) each nonzero value is multiplied by its step's scale 2^(e - 127) exactly:
    // e - 127 added to the table's exponents once a step.
    static SEAHAL_BF16 void e2m1(const uint8_t* src, uint16_t* dst, const uint8_t* exponents = nullptr) {
        const __m256i table = _mm256_setr_epi16(0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,  //
                                                short(0x8000), short(0xBF00), short(0xBF80), short(0xBFC0),     //
                                                short(0xC000), short(0xC040), short(0xC080), short(0xC0C0));
        const __m256i nonzero = _mm256_setr_epi16(0, -1, -1, -1, -1, -1, -1, -1, 0, -1, -1, -1, -1, -1, -1, -1);
        const __m128i nibble = _mm_set1_epi8(0x0F);
        for (int s = 0; s < kBlock; s += kFp4Step) {
            __m256i values = table;
            if (exponents != nullptr) {
                const __m256i shift = _mm256_set1_epi16(short((int(exponents[s / kFp4Step]) - 127) * 128));
                values = _mm256_add_epi16(values, _mm256_and_si256(nonzero, shift));
            }
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + s / 2));
            const __m256i even = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, nibble));
            const __m256i odd = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
            uint16_t* out = dst + s;  // the step's even elements, then its odd ones
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutexvar_epi16(even, values));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kFp4Step / 2), _mm256_permutexvar_epi16(odd, values));
        }
    }
};

// As dot_block over bf16 rows, by VDPBF16PS (16 values a step, two a lane), for a weight with
// kScales scales a K block: each kBlock / kScales step's lane sums times that step's scale sb[j *
// kScales + s] are summed first (FP4), then acc[i][j] += that * sa_i (* sb_j when kScales == 1).
template <int MR, int NR, int kScales>
SEAHAL_BF16 inline void dot_block_bf16(const uint16_t* a, int64_t lda, const float* sa, int64_t lds,
                                       const uint16_t* b, const float* sb, float* acc, int64_t acc_stride) {
    constexpr int kStep = kBlock / kScales;
    __m256 total[MR][NR];
    for (int s = 0; s < kScales; ++s) {
        __m256 part[MR][NR];
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) part[i][j] = _mm256_setzero_ps();
        for (int k = s * kStep; k < (s + 1) * kStep; k += 16) {
            __m256bh av[MR], bv[NR];
            for (int i = 0; i < MR; ++i) std::memcpy(&av[i], a + i * lda + k, sizeof av[i]);
            for (int j = 0; j < NR; ++j) std::memcpy(&bv[j], b + j * kBlock + k, sizeof bv[j]);
            for (int i = 0; i < MR; ++i)
                for (int j = 0; j < NR; ++j) part[i][j] = _mm256_dpbf16_ps(part[i][j], av[i], bv[j]);
        }
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) {
                if constexpr (kScales == 1)
                    total[i][j] = part[i][j];
                else if (s == 0)
                    total[i][j] = _mm256_mul_ps(part[i][j], _mm256_set1_ps(sb[j * kScales]));
                else
                    total[i][j] = _mm256_fmadd_ps(part[i][j], _mm256_set1_ps(sb[j * kScales + s]), total[i][j]);
            }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            float* lanes = acc + i * acc_stride + j * kLanes;
            const float factor = kScales == 1 ? sa[i * lds] * sb[j] : sa[i * lds];
            _mm256_storeu_ps(lanes, _mm256_fmadd_ps(total[i][j], _mm256_set1_ps(factor), _mm256_loadu_ps(lanes)));
        }
}

// Bf16Panel: the weight's values as bf16 patterns. Unscaled, with the weight's kScales scales a
// row; or, for FP4 weights whose scales all lie within kExactScaledFp4 (kScaledFp4), times their
// 1x32 scales (exact) with the factor 1 a row, which saves the sum and multiply a 32-wide step.
template <class W, bool kScaledFp4 = false>
struct Bf16Panel {
    using Value = uint16_t;
    static constexpr int kScales = kScaledFp4 ? 1 : W::kScales;
    static constexpr int kRows = 4, kCols = kScales == 1 ? 4 : 2;  // 24 of the 32 vector registers

    static SEAHAL_BF16 inline void decode(const GemmArgs& g, int64_t row, int64_t kb, uint16_t* dst, float* scales) {
        if constexpr (W::kScales == 1) {
            Bf16Decoder::e4m3(W::block(g, row, kb, scales), dst);
        } else if constexpr (kScaledFp4) {  // e8m0 scales, read as their bytes
            const uint8_t* exponents = static_cast<const uint8_t*>(g.b_scale) + W::first_scale(g, row, kb);
            Bf16Decoder::e2m1(W::bytes(g, row, kb), dst, exponents);
            scales[0] = 1.0f;
        } else {
            Bf16Decoder::e2m1(W::block(g, row, kb, scales), dst);
        }
    }
    template <int MR, int NR>
    static SEAHAL_BF16 inline void dot(const uint16_t* a, int64_t lda, const float* sa, int64_t lds,
                                       const uint16_t* b, const float* sb, float* acc, int64_t acc_stride) {
        dot_block_bf16<MR, NR, kScales>(a, lda, sa, lds, b, sb, acc, acc_stride);
    }
};

template <class W, bool kScaledFp4>
SEAHAL_BF16 void gemm_tile_bf16(const GemmArgs& g, const void* af, Tile tile, Scratch& s) {
    gemm_tile<W, Bf16Panel<W, kScaledFp4>>(g, af, tile, s);
}

// The e8m0 bytes e whose scales 2^(e - 127) keep every product of an e4m3 activation and a scaled
// e2m1 value (and every sum of such products) a normal fp32 number below 2^128: products are
// multiples of 2^(e - 137) and at most 2^(e - 115). VDPBF16PS flushes subnormals, which the fp32
// variants keep; within this range there are none to flush.
constexpr ByteRange kExactScaledFp4{11, 242};

// Whether every FP4 scale of `g` is an e8m0 byte within kExactScaledFp4 (a scan of the scale
// bytes, a 16th of the weight's).
bool fp4_scales_within_exact_range(const GemmArgs& g) {
    const int64_t count = g.n * (g.k / kFp4Step);
    return g.b_scale_e8m0 && kExactScaledFp4.holds(static_cast<const uint8_t*>(g.b_scale), count);
}
#endif

template <class W>
TileKernel tile_kernel(const GemmArgs& g) {
    switch (simd()) {
#ifdef SEAHAL_HAVE_BF16
        case Simd::kAvx512Bf16:
            if (W::kScales > 1 && fp4_scales_within_exact_range(g))
                return {gemm_tile_bf16<W, true>, decode_activation_row<W, uint16_t>, sizeof(uint16_t)};
            return {gemm_tile_bf16<W, false>, decode_activation_row<W, uint16_t>, sizeof(uint16_t)};
#endif
#if defined(__x86_64__)
        case Simd::kAvx2:
            return {gemm_tile_avx2<W>, decode_activation_row<W, float>, sizeof(float)};
#endif
        default:
            return {gemm_tile_baseline<W>, decode_activation_row<W, float>, sizeof(float)};
    }
}

int thread_index() {
#ifdef SEAHAL_HAVE_OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Weight rows per tile: as many as fit the panel, but at least kTilesPerThread tiles per thread.
int64_t tile_rows_for(int64_t n, int threads) {
    const int64_t tiles = int64_t(threads) * kTilesPerThread;
    const int64_t rows = (n + tiles - 1) / tiles;
    return std::clamp<int64_t>((rows + kRowGroup - 1) / kRowGroup * kRowGroup, kRowGroup, kMaxTileRows);
}

// Decode the activations (rows split over the threads), then run the work items: weight tiles
// times passes of at most kRowsPerPass activation rows (each weight tile is decoded once per pass).
template <class W>
void block_scaled_gemm(const GemmArgs& g, int threads) {
    threads = std::max(threads, 1);
    const TileKernel kernel = tile_kernel<W>(g);
    AlignedFloats af = aligned_floats((g.m * g.k * kernel.value_bytes + sizeof(float) - 1) / sizeof(float));
    const int64_t tile_rows = tile_rows_for(g.n, threads), rows_m = std::min(g.m, kRowsPerPass);
    const int64_t n_tiles = (g.n + tile_rows - 1) / tile_rows;
    const int64_t passes = rows_m == 0 ? 0 : (g.m + rows_m - 1) / rows_m;
    std::vector<Scratch> scratch;  // allocated here: nothing may throw inside the parallel region
    for (int t = 0; t < threads; ++t)
        scratch.push_back(Scratch{aligned_floats(kMaxTileRows * kBlock),
                                  aligned_floats(kMaxTileRows * Fp4Weights::kScales),  // the most scales a row
                                  aligned_floats(rows_m * tile_rows * kLanes)});
#ifdef SEAHAL_HAVE_OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
        Scratch& mine = scratch[thread_index()];
#ifdef SEAHAL_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t m = 0; m < g.m; ++m) kernel.activation_row(g, m, af.get());
#ifdef SEAHAL_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t item = 0; item < passes * n_tiles; ++item) {
            const int64_t m0 = item / n_tiles * rows_m;
            kernel.tile(g, af.get(), Tile{m0, std::min(rows_m, g.m - m0), item % n_tiles * tile_rows, tile_rows}, mine);
        }
    }
}

template <class W>
void gemm_entry(uintptr_t a, uintptr_t a_scale, uintptr_t b, uintptr_t b_scale, bool b_scale_e8m0, uintptr_t out,
                int64_t m, int64_t n, int64_t k, bool out_bf16, int threads) {
    if (m < 0 || n < 0 || k % kBlock != 0) throw std::invalid_argument("need M, N >= 0 and K a multiple of 128");
    GemmArgs g{reinterpret_cast<const uint8_t*>(a), reinterpret_cast<const float*>(a_scale),
               reinterpret_cast<const uint8_t*>(b), reinterpret_cast<const void*>(b_scale),
               reinterpret_cast<void*>(out), m, n, k, b_scale_e8m0, out_bf16};
    py::gil_scoped_release release;
    block_scaled_gemm<W>(g, threads);
}

// ---------------------------------------------------------------------------------------------
// grouped_linear over an FP8 weight (the attention's wo_a, v4_ops.md §8):
//
//   out[t, n] = sum_k x[t, n / R, k] W'[n, k],   W'[n, k] = e4m3(W[n, k]) * s[n / 128, k / 128]
//
// with W' rounded to bf16 when x is bf16 (the weight the official code installs; a no-op for e8m0
// scales 2^-124 ... 2^119, where every e4m3 multiple is a bf16 value) and the products summed in
// kLanes fp32 lanes. A few tokens (decode): a work item decodes kRowGroup rows of one group a
// 128-wide block at a time into a panel and multiplies it into every token's lanes, one
// independent chain per row; the weight is read once, as stored, and the activations are widened
// to fp32 once up front (on AVX512-BF16, bf16 x with e8m0 scales stays bf16 and VDPBF16PS sums the
// products, where no product can be subnormal: bf16_gemv_is_exact). Work items (OpenMP, static
// schedule) never share an output element, so the result does not depend on the thread count.

constexpr int64_t kGroupedMaxTokens = 8;  // beyond, a GEMM over W' dequantised a group at a time wins
// The e8m0 bytes whose scales (2^-124 ... 2^119) make every e4m3 multiple a bf16 value: W' is then
// the e4m3 value times the scale exactly, and the scale can multiply a dot product instead.
constexpr ByteRange kBf16ExactFp8Scales{3, 246};

struct GroupedArgs {
    const void* x;         // [T, G, K] bf16 or fp32, strides (stride_t, stride_g, 1) in elements
    int64_t stride_t, stride_g;
    bool bf16;             // x, the output and W' are bf16 (else fp32)
    const uint8_t* w;      // [N, K] e4m3, N = G * R
    const void* scale;     // [ceil(N/128), K/128] fp32, or e8m0 bytes
    bool scale_e8m0;
    void* out;             // [T, N] (gemv) or [N, K] (dequantize), bf16 when `bf16`, else fp32
    int64_t t, n, k, r;
};

// Row n's block kb of W' -> dst[128] times the returned factor. With an e8m0 scale for which
// every e4m3 multiple is a bf16 value (2^-124 ... 2^119) dst holds the e4m3 values and the scale is
// returned, to multiply a dot product by once (exact: a power of two); otherwise dst holds W'
// itself (rounded to bf16 when x is bf16) and 1 is returned.
template <class Decoder>
SEAHAL_INLINE float dequantize_block(const GroupedArgs& g, int64_t n, int64_t kb, float* dst) {
    const uint8_t* src = g.w + n * g.k + kb * kBlock;
    prefetch_ahead(src, kBlock, g.k - kb * kBlock);
    Decoder::e4m3(src, dst);
    const int64_t at = (n / kBlock) * (g.k / kBlock) + kb;
    float s;
    if (g.scale_e8m0) {
        const uint8_t e = static_cast<const uint8_t*>(g.scale)[at];
        s = e8m0_decode(e);
        if (kBf16ExactFp8Scales.contains(e)) return s;
    } else {
        s = static_cast<const float*>(g.scale)[at];
    }
    for (int i = 0; i < kBlock; ++i) dst[i] *= s;
    if (g.bf16)
        for (int i = 0; i < kBlock; ++i) dst[i] = bits_float(uint32_t(bf16_encode(dst[i])) << 16);
    return 1.0f;
}

// out[t, n0 + j] for j < rows: the sum of the lanes of (t, j), lanes [T][kRowGroup][kLanes] (the
// GEMV's accumulators), rounded to bf16 when g.bf16.
SEAHAL_INLINE void store_row_sums(const GroupedArgs& g, int64_t n0, int64_t rows, const float* lanes) {
    for (int64_t t = 0; t < g.t; ++t)
        for (int64_t j = 0; j < rows; ++j) {
            const float c = sum_lanes(lanes + (t * kRowGroup + j) * kLanes);
            const int64_t at = t * g.n + n0 + j;
            if (g.bf16)
                static_cast<uint16_t*>(g.out)[at] = bf16_encode(c);
            else
                static_cast<float*>(g.out)[at] = c;
        }
}

// One work item: rows [n0, n0 + rows) of one group (rows <= kRowGroup), every token.
// x: x widened to fp32, [T, G, K]; panel: kRowGroup x 128 floats of scratch.
template <class Decoder>
SEAHAL_INLINE void grouped_gemv_rows(const GroupedArgs& g, const void* x, int64_t n0, int64_t rows, float* panel) {
    const int64_t k_blocks = g.k / kBlock, groups = g.n / g.r;
    const float* x_group = static_cast<const float*>(x) + (n0 / g.r) * g.k;
    Lanes acc[kGroupedMaxTokens][kRowGroup] = {};
    float factor[kRowGroup];
    std::fill(panel + rows * kBlock, panel + kRowGroup * kBlock, 0.0f);
    std::fill(factor + rows, factor + kRowGroup, 0.0f);
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
        for (int64_t j = 0; j < rows; ++j) factor[j] = dequantize_block<Decoder>(g, n0 + j, kb, panel + j * kBlock);
        for (int64_t t = 0; t < g.t; ++t) {
            const float* xb = x_group + t * groups * g.k + kb * kBlock;
            Lanes part[kRowGroup] = {};
            for (int i = 0; i < kBlock; i += kLanes) {
                const Lanes xv = load_lanes(xb + i);
                for (int j = 0; j < kRowGroup; ++j) part[j] += xv * load_lanes(panel + j * kBlock + i);
            }
            for (int j = 0; j < kRowGroup; ++j) acc[t][j] += part[j] * factor[j];
        }
    }
    store_row_sums(g, n0, rows, reinterpret_cast<const float*>(acc));
}

// One work item: rows [n0, n0 + rows) of W' into out [N, K].
template <class Decoder>
SEAHAL_INLINE void dequantize_rows(const GroupedArgs& g, const void*, int64_t n0, int64_t rows, float* panel) {
    for (int64_t n = n0; n < n0 + rows; ++n)
        for (int64_t kb = 0; kb < g.k / kBlock; ++kb) {
            const float factor = dequantize_block<Decoder>(g, n, kb, panel);
            const int64_t at = n * g.k + kb * kBlock;
            for (int i = 0; i < kBlock; ++i) panel[i] *= factor;  // exact: a power of two, or 1
            if (g.bf16) {  // every value is a bf16 one: its upper 16 bits
                uint16_t* dst = static_cast<uint16_t*>(g.out) + at;
                for (int i = 0; i < kBlock; ++i) dst[i] = uint16_t(float_bits(panel[i]) >> 16);
            } else {
                std::memcpy(static_cast<float*>(g.out) + at, panel, kBlock * sizeof(float));
            }
        }
}

using RowsKernel = void (*)(const GroupedArgs&, const void*, int64_t, int64_t, float*);

template <bool kGemv>
void rows_baseline(const GroupedArgs& g, const void* xf, int64_t n0, int64_t rows, float* panel) {
    if constexpr (kGemv)
        grouped_gemv_rows<BaselineDecoder>(g, xf, n0, rows, panel);
    else
        dequantize_rows<BaselineDecoder>(g, xf, n0, rows, panel);
}

#if defined(__x86_64__)
template <bool kGemv>
SEAHAL_AVX2 void rows_avx2(const GroupedArgs& g, const void* xf, int64_t n0, int64_t rows, float* panel) {
    if constexpr (kGemv)
        grouped_gemv_rows<Avx2Decoder>(g, xf, n0, rows, panel);
    else
        dequantize_rows<Avx2Decoder>(g, xf, n0, rows, panel);
}
#endif

#ifdef SEAHAL_HAVE_BF16
// grouped_gemv_rows over bf16 x (x: its patterns, [T, G, K]) where bf16_gemv_is_exact: each
// block's e4m3 values as bf16 patterns, the products summed by VDPBF16PS, each block's sum times
// its e8m0 scale (the fp32 form's arithmetic for such a scale, the sums in another order).
SEAHAL_BF16 void gemv_rows_bf16(const GroupedArgs& g, const void* x, int64_t n0, int64_t rows, float*) {
    const int64_t k_blocks = g.k / kBlock, groups = g.n / g.r;
    const uint16_t* x_group = static_cast<const uint16_t*>(x) + (n0 / g.r) * g.k;
    alignas(64) uint16_t panel[kRowGroup * kBlock];
    float factor[kRowGroup];
    __m256 acc[kGroupedMaxTokens][kRowGroup];
    for (auto& token : acc)
        for (auto& lanes : token) lanes = _mm256_setzero_ps();
    std::fill(panel + rows * kBlock, panel + kRowGroup * kBlock, uint16_t(0));
    std::fill(factor + rows, factor + kRowGroup, 0.0f);
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
        for (int64_t j = 0; j < rows; ++j) {
            const uint8_t* src = g.w + (n0 + j) * g.k + kb * kBlock;
            prefetch_ahead(src, kBlock, g.k - kb * kBlock);
            Bf16Decoder::e4m3(src, panel + j * kBlock);
            factor[j] = e8m0_decode(static_cast<const uint8_t*>(g.scale)[((n0 + j) / kBlock) * k_blocks + kb]);
        }
        for (int64_t t = 0; t < g.t; ++t) {
            const uint16_t* xt = x_group + t * groups * g.k + kb * kBlock;
            __m256 part[kRowGroup];
            for (auto& lanes : part) lanes = _mm256_setzero_ps();
            for (int i = 0; i < kBlock; i += 16) {
                __m256bh xv, wv;
                std::memcpy(&xv, xt + i, sizeof xv);
                for (int j = 0; j < kRowGroup; ++j) {
                    std::memcpy(&wv, panel + j * kBlock + i, sizeof wv);
                    part[j] = _mm256_dpbf16_ps(part[j], xv, wv);
                }
            }
            for (int j = 0; j < kRowGroup; ++j)
                acc[t][j] = _mm256_fmadd_ps(part[j], _mm256_set1_ps(factor[j]), acc[t][j]);
        }
    }
    store_row_sums(g, n0, rows, reinterpret_cast<const float*>(acc));
}

// Whether gemv_rows_bf16 computes what the fp32 form does: x bf16 (xb, `count` patterns), e8m0
// scales within kBf16ExactFp8Scales (W' = e4m3 * s, the scale applied to the sum), and every
// nonzero |x| >= 2^-110, so that every product and partial sum is a normal fp32 number or zero
// (products are multiples of 2^-126 then), none for VDPBF16PS to flush.
bool bf16_gemv_is_exact(const GroupedArgs& g, const uint16_t* xb, int64_t count) {
    const int64_t scales = (g.n + kBlock - 1) / kBlock * (g.k / kBlock);
    if (!g.bf16 || !g.scale_e8m0 || !kBf16ExactFp8Scales.holds(static_cast<const uint8_t*>(g.scale), scales))
        return false;
    int tiny = 0;  // nonzero values with an exponent field below 127 - 110
    for (int64_t i = 0; i < count; ++i) tiny |= (xb[i] & 0x7FFF) != 0 && ((xb[i] >> 7) & 0xFF) < 17;
    return !tiny;
}
#endif

// The work items over W's rows, kRowGroup rows of one group each, split over `threads`; kernel:
// the rows' kernel, or (null) the best fp32 form.
template <bool kGemv>
void over_rows(const GroupedArgs& g, const void* x, int threads, RowsKernel kernel = nullptr) {
    if (kernel == nullptr) {
        kernel = rows_baseline<kGemv>;
#if defined(__x86_64__)
        if (use_avx2()) kernel = rows_avx2<kGemv>;
#endif
    }
    threads = std::max(threads, 1);
    std::vector<AlignedFloats> panels;  // allocated here: nothing may throw inside the parallel region
    for (int t = 0; t < threads; ++t) panels.push_back(aligned_floats(kRowGroup * kBlock));
    const int64_t per_group = (g.r + kRowGroup - 1) / kRowGroup, items = g.n / g.r * per_group;
#ifdef SEAHAL_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (int64_t item = 0; item < items; ++item) {
        const int64_t first = item % per_group * kRowGroup;
        kernel(g, x, item / per_group * g.r + first, std::min(kRowGroup, g.r - first), panels[thread_index()].get());
    }
}

void grouped_gemv_entry(uintptr_t x, int64_t stride_t, int64_t stride_g, bool bf16, uintptr_t w, uintptr_t scale,
                        bool scale_e8m0, uintptr_t out, int64_t t, int64_t n, int64_t k, int64_t r, int threads) {
    if (t < 1 || t > kGroupedMaxTokens || r < 1 || n % r != 0 || k % kBlock != 0)
        throw std::invalid_argument("need 1 <= T <= 8, N a multiple of R and K a multiple of 128");
    GroupedArgs g{reinterpret_cast<const void*>(x), stride_t, stride_g, bf16, reinterpret_cast<const uint8_t*>(w),
                  reinterpret_cast<const void*>(scale), scale_e8m0, reinterpret_cast<void*>(out), t, n, k, r};
    py::gil_scoped_release release;
    const int64_t groups = n / r;
#ifdef SEAHAL_HAVE_BF16
    if (bf16 && simd() == Simd::kAvx512Bf16) {  // x's patterns, contiguous
        std::vector<uint16_t> xb(t * groups * k);
        for (int64_t tok = 0; tok < t; ++tok)
            for (int64_t grp = 0; grp < groups; ++grp)
                std::memcpy(xb.data() + (tok * groups + grp) * k,
                            static_cast<const uint16_t*>(g.x) + tok * stride_t + grp * stride_g, k * sizeof(uint16_t));
        if (bf16_gemv_is_exact(g, xb.data(), int64_t(xb.size()))) {
            over_rows<true>(g, xb.data(), threads, gemv_rows_bf16);
            return;
        }
    }
#endif
    AlignedFloats xf = aligned_floats(t * groups * k);
    for (int64_t tok = 0; tok < t; ++tok)
        for (int64_t grp = 0; grp < groups; ++grp)
            for (int64_t i = 0; i < k; ++i) {
                const int64_t at = tok * stride_t + grp * stride_g + i;
                xf[(tok * groups + grp) * k + i] = bf16 ? bits_float(uint32_t(static_cast<const uint16_t*>(g.x)[at]) << 16)
                                                        : static_cast<const float*>(g.x)[at];
            }
    over_rows<true>(g, xf.get(), threads);
}

void fp8_dequantize_entry(uintptr_t w, uintptr_t scale, bool scale_e8m0, uintptr_t out, int64_t n, int64_t k,
                          bool out_bf16, int threads) {
    if (n < 0 || k % kBlock != 0) throw std::invalid_argument("need N >= 0 and K a multiple of 128");
    GroupedArgs g{nullptr, 0, 0, out_bf16, reinterpret_cast<const uint8_t*>(w), reinterpret_cast<const void*>(scale),
                  scale_e8m0, reinterpret_cast<void*>(out), 0, n, k, std::max<int64_t>(n, 1)};  // one group
    py::gil_scoped_release release;
    over_rows<false>(g, nullptr, threads);
}

}  // namespace

std::string simd_variant() { return kSimdNames[int(simd())]; }

std::vector<std::string> simd_variants() { return {kSimdNames, kSimdNames + int(best_simd()) + 1}; }

void set_simd(const std::string& name) {
    const std::vector<std::string> supported = simd_variants();
    const auto found = std::find(supported.begin(), supported.end(), name);
    if (found == supported.end()) throw std::invalid_argument("this CPU runs no SIMD variant " + name);
    g_simd_limit.store(int(found - supported.begin()));
}

}  // namespace seahal

void bind_gemm(py::module_& m) {
    using namespace seahal;
#define SEAHAL_GEMM_ARGS                                                                              \
    "; a, a_scale, b, b_scale, out: data pointers of contiguous buffers; b_scale holds e8m0 bytes when " \
    "b_scale_e8m0, else fp32; out is bf16 when out_bf16, else fp32; threads: OpenMP threads"
    m.def("fp8_block_gemm", &gemm_entry<Fp8Weights>,
          "C[M,N] = A[M,K] @ B[N,K]^T: A e4m3 with fp32 scales [M,K/128], B e4m3 with scales "
          "[ceil(N/128),K/128]" SEAHAL_GEMM_ARGS,
          py::arg("a"), py::arg("a_scale"), py::arg("b"), py::arg("b_scale"), py::arg("b_scale_e8m0"), py::arg("out"),
          py::arg("m"),
          py::arg("n"), py::arg("k"), py::arg("out_bf16"), py::arg("threads"));
    m.def("fp4_gemm", &gemm_entry<Fp4Weights>,
          "C[M,N] = A[M,K] @ B[N,K]^T: A e4m3 with fp32 scales [M,K/128], B packed e2m1 [N,K/2] (low "
          "nibble first) with scales [N,K/32]" SEAHAL_GEMM_ARGS,
          py::arg("a"), py::arg("a_scale"), py::arg("b"), py::arg("b_scale"), py::arg("b_scale_e8m0"), py::arg("out"),
          py::arg("m"),
          py::arg("n"), py::arg("k"), py::arg("out_bf16"), py::arg("threads"));
    m.def("fp8_grouped_gemv", &grouped_gemv_entry,
          "out[T, N] = per group g of R rows, x[T, g, K] @ W'[g R:(g+1) R, K]^T, W' = e4m3 W times its 128x128 "
          "block scale (rounded to bf16 when bf16); x strided (stride_t, stride_g, 1) in elements, T <= 8; "
          "x and out bf16 when bf16, else fp32; scale e8m0 bytes when scale_e8m0, else fp32",
          py::arg("x"), py::arg("stride_t"), py::arg("stride_g"), py::arg("bf16"), py::arg("w"), py::arg("scale"),
          py::arg("scale_e8m0"), py::arg("out"), py::arg("t"), py::arg("n"), py::arg("k"), py::arg("r"),
          py::arg("threads"));
    m.def("fp8_dequantize", &fp8_dequantize_entry,
          "out[N, K] = e4m3 W times its 128x128 block scale, rounded to bf16 when out_bf16 (else fp32)",
          py::arg("w"), py::arg("scale"), py::arg("scale_e8m0"), py::arg("out"), py::arg("n"), py::arg("k"),
          py::arg("out_bf16"), py::arg("threads"));
    m.def("simd_variant", &simd_variant, "the instruction-set variant the GEMM kernels use now");
    m.def("simd_variants", &simd_variants, "the variants this CPU runs, least to most preferred");
    m.def("set_simd", &set_simd, "use this variant, one of simd_variants() (e.g. to test each in turn)",
          py::arg("name"));
}
