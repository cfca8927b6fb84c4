// Linear layers on GGUF-quantized weights, never dequantized to a float copy: Q4_K, Q5_K, Q6_K
// (super-blocks of 256) read as the file stores them; Q8_0, Q4_0, Q4_1 (blocks of 32) repacked at
// load into 64-weight chunks of the same size (surge/models/quant.py), which decode in a few
// instructions.
//
// As llama.cpp does, each row of x is quantized to int8 in blocks of 32 (one float scale per
// block, round to nearest even), and the weights' integer codes meet it in integer dot products:
// AVX-512 VNNI's vpdpbusd multiplies 64 unsigned weight codes by 64 signed x codes at once. Every
// format is brought to one shape per 64 weights: 64 unsigned codes in element order, and for
// each 16 of them a scale and an offset (value = scale * code + offset), so one accumulation
// loop serves all six. Each output element is its own sum over K in a fixed order, whatever the
// batch: a row's result does not depend on the other rows (the rule the bf16 kernels keep).
// Without AVX-512 VNNI, AVX2 makes the same integer dot products from vpmaddubsw + vpmaddwd;
// without AVX2 a portable loop decodes each block to float and multiplies by x as is.
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using surge::bf16;
using surge::load;
using surge::store;

// GGUF type ids (ggml_type)
enum QType : int { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#endif
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      uint32_t m = man;
      do {
        ++e;
        m <<= 1;
      } while ((m & 0x400u) == 0);
      bits = sign | uint32_t(127 - 15 - e) << 23 | (m & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// K-quants' 6-bit scale and min of sub-block j (ggml's get_scale_min_k4)
inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

struct Format {
  int64_t block_elems, block_bytes;
};

inline Format format_of(int qtype) {
  switch (qtype) {
    case kQ8_0: return {64, 68};  // repacked at load (surge/models/quant.py): 64-weight chunks
    case kQ4_0: return {64, 40};
    case kQ4_1: return {64, 40};
    case kQ4_K: return {256, 144};
    case kQ5_K: return {256, 176};
    case kQ6_K: return {256, 210};
    default: return {0, 0};
  }
}

// Chunk c (64 weights) of a row as unsigned codes `u` and, per 16, scale and offset.
// Scalar decode, shared by the portable path and the tests of the vector one.
void decode_chunk(int qtype, const uint8_t* row, int64_t c, uint8_t* u, float* s16, float* o16) {
  switch (qtype) {
    case kQ8_0: {  // [f16 d0 d1][64 codes + 128]
      const uint8_t* b = row + c * 68;
      for (int h = 0; h < 2; ++h) {
        const float d = half_to_float(b + 2 * h);
        s16[2 * h] = s16[2 * h + 1] = d;
        o16[2 * h] = o16[2 * h + 1] = -128.0f * d;
      }
      std::memcpy(u, b + 4, 64);
      return;
    }
    case kQ4_0:
    case kQ4_1: {  // [f16 d0 d1 m0 m1][32 bytes: weight i low nibble, 32 + i high]
      const uint8_t* b = row + c * 40;
      for (int h = 0; h < 2; ++h) {
        s16[2 * h] = s16[2 * h + 1] = half_to_float(b + 2 * h);
        o16[2 * h] = o16[2 * h + 1] = half_to_float(b + 4 + 2 * h);
      }
      for (int i = 0; i < 32; ++i) {
        u[i] = b[8 + i] & 0xF;
        u[32 + i] = b[8 + i] >> 4;
      }
      return;
    }
    case kQ4_K:
    case kQ5_K: {
      const int64_t bytes = format_of(qtype).block_bytes;
      const uint8_t* b = row + (c / 4) * bytes;
      const int j = int(c % 4);
      const float d = half_to_float(b), dmin = half_to_float(b + 2);
      const uint8_t* scales = b + 4;
      const uint8_t* qh = b + 16;  // Q5_K only
      const uint8_t* qs = b + (qtype == kQ4_K ? 16 : 48) + 32 * j;
      for (int i = 0; i < 32; ++i) {
        int lo = qs[i] & 0xF, hi = qs[i] >> 4;
        if (qtype == kQ5_K) {
          lo += (qh[i] >> (2 * j)) & 1 ? 16 : 0;
          hi += (qh[i] >> (2 * j + 1)) & 1 ? 16 : 0;
        }
        u[i] = uint8_t(lo);
        u[32 + i] = uint8_t(hi);
      }
      for (int h = 0; h < 2; ++h) {
        int sc, mn;
        scale_min_k4(2 * j + h, scales, &sc, &mn);
        s16[2 * h] = s16[2 * h + 1] = d * float(sc);
        o16[2 * h] = o16[2 * h + 1] = -dmin * float(mn);
      }
      return;
    }
    case kQ6_K: {
      const uint8_t* b = row + (c / 4) * 210;
      const int half = int(c % 4) / 2, odd = int(c % 2);
      const uint8_t* ql = b + 64 * half;
      const uint8_t* qh = b + 128 + 32 * half;
      const auto* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * half + 4 * odd;
      const float d = half_to_float(b + 208);
      for (int i = 0; i < 32; ++i) {
        const int shift = 4 * odd;
        u[i] = uint8_t(((ql[i] >> shift) & 0xF) | (((qh[i] >> (4 * odd)) & 3) << 4));
        u[32 + i] = uint8_t(((ql[32 + i] >> shift) & 0xF) | (((qh[i] >> (4 * odd + 2)) & 3) << 4));
      }
      for (int i = 0; i < 4; ++i) {
        s16[i] = d * float(sc[i]);
        o16[i] = -32.0f * s16[i];
      }
      return;
    }
    default: return;
  }
}

// x rows quantized for the integer dot products: per row, K int8 codes, and per 16 values the
// lane scale (the 32-block's scale) and scale * sum(codes), the term the weights' offsets meet.
struct QuantizedRows {
  std::vector<int8_t> codes;   // [m][k]
  std::vector<float> scale16;  // [m][k / 16]
  std::vector<float> sum16;    // [m][k / 16]
  std::vector<float> lane_scale;  // [m][k / 4]: scale16 spread to the 4 lanes of each 16
};

// One block of 32 values: codes, and the scale and scale * sum(codes) of each half of 16.
template <class In>
inline void quantize_block(const In* x, int8_t* codes, float* scale16, float* sum16,
                           float* lane_scale) {
  float v[32], amax = 0.0f;
  for (int i = 0; i < 32; ++i) {
    v[i] = load(x[i]);
    amax = std::max(amax, std::fabs(v[i]));
  }
  const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
  int sums[2] = {0, 0};
  for (int i = 0; i < 32; ++i) {
    const int code = int(std::nearbyint(v[i] * inv));
    codes[i] = int8_t(code);
    sums[i / 16] += code;
  }
  for (int h = 0; h < 2; ++h) {
    scale16[h] = d;
    sum16[h] = d * float(sums[h]);
  }
  for (int i = 0; i < 8; ++i) lane_scale[i] = d;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(SURGE_GENERIC) && \
    !defined(SURGE_SCALAR_XQUANT)
// The same in registers, bit for bit: max is exact in any order, the products and the division
// are the scalar ones, and vcvtps2dq rounds to nearest even like nearbyint (the default MXCSR).
template <>
inline void quantize_block<bf16>(const bf16* x, int8_t* codes, float* scale16, float* sum16,
                                 float* lane_scale) {
  const auto widen = [](const bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  };
  const __m512 v0 = widen(x), v1 = widen(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
  const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
  const __m512i c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(c0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 16), _mm512_cvtepi32_epi8(c1));
  scale16[0] = scale16[1] = d;
  sum16[0] = d * float(_mm512_reduce_add_epi32(c0));
  sum16[1] = d * float(_mm512_reduce_add_epi32(c1));
  _mm256_storeu_ps(lane_scale, _mm256_set1_ps(d));
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__) && !defined(SURGE_GENERIC) && \
    !defined(SURGE_SCALAR_XQUANT)
// (SURGE_SCALAR_XQUANT keeps the scalar rule: tests compare the two bit for bit)
// The same in AVX2 registers, bit for bit (as the AVX-512 one above): the quantization of x is a
// visible share of a batch-1 step on a CPU without AVX-512.
inline void quantize_block8(const __m256 v[4], int8_t* codes, float* scale16, float* sum16,
                            float* lane_scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
  m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float amax = _mm_cvtss_f32(h);
  const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
  const __m256 iv = _mm256_set1_ps(inv);
  __m256i c[4];
  for (int i = 0; i < 4; ++i) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], iv));
  const auto hsum_epi32 = [](__m256i a, __m256i b) {
    const __m256i t = _mm256_add_epi32(a, b);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
  };
  scale16[0] = scale16[1] = d;
  sum16[0] = d * float(hsum_epi32(c[0], c[1]));
  sum16[1] = d * float(hsum_epi32(c[2], c[3]));
  // packs work per 128-bit lane: put the 8 groups of 4 codes back in order
  const __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]),
                                         _mm256_packs_epi32(c[2], c[3]));
  const __m256i ordered =
      _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), ordered);
  _mm256_storeu_ps(lane_scale, _mm256_set1_ps(d));
}

template <>
inline void quantize_block<float>(const float* x, int8_t* codes, float* scale16, float* sum16,
                                  float* lane_scale) {
  const __m256 v[4] = {_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8), _mm256_loadu_ps(x + 16),
                       _mm256_loadu_ps(x + 24)};
  quantize_block8(v, codes, scale16, sum16, lane_scale);
}

template <>
inline void quantize_block<bf16>(const bf16* x, int8_t* codes, float* scale16, float* sum16,
                                 float* lane_scale) {
  __m256 v[4];
  for (int i = 0; i < 4; ++i) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * i));
    v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  quantize_block8(v, codes, scale16, sum16, lane_scale);
}
#endif

template <class In>
void quantize_rows(QuantizedRows& q, const In* x, int64_t m, int64_t k, int64_t x_stride) {
  // resize keeps the capacity of earlier calls (q is reused per thread): no allocation a call
  q.codes.resize(m * k);
  q.scale16.resize(m * k / 16);
  q.sum16.resize(m * k / 16);
  q.lane_scale.resize(m * k / 4);
#pragma omp parallel for schedule(static) if (m * k >= (int64_t(1) << 16))
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < k / 32; ++b)
      quantize_block(x + r * x_stride + 32 * b, &q.codes[r * k + 32 * b],
                     &q.scale16[r * k / 16 + 2 * b], &q.sum16[r * k / 16 + 2 * b],
                     &q.lane_scale[r * k / 4 + 8 * b]);
  }
}

#ifndef SURGE_PREFETCH_BYTES
#define SURGE_PREFETCH_BYTES 8192
#endif
constexpr int64_t kPrefetchBytes = SURGE_PREFETCH_BYTES;  // how far ahead to ask for weights

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    !defined(SURGE_GENERIC)
#define SURGE_QLINEAR_VNNI 1
constexpr int kQRows = 8;  // x rows sharing one decode of a weight chunk

inline __m512i nibbles_lo_hi(__m256i packed) {  // 32 bytes -> [low nibbles | high nibbles]
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(packed, mask);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// Per-lane scales from per-16 ones [s0 s1 s2 s3]: lanes 4i..4i+3 hold s_i (a lane of vpdpbusd's
// result sums 4 consecutive products, so 4 lanes are one group of 16).
inline __m512 spread16(__m128 s) {
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                               _mm512_castps128_ps512(s));
}

// The vector decode of chunk c: the same codes, scales and offsets as decode_chunk, the scales
// kept in registers (per lane, and per 16 for the offsets). A template, so each format's decode
// is inlined into its own copy of the loop.
template <int qtype>
__attribute__((always_inline)) inline __m512i chunk_codes(const uint8_t* row, int64_t c,
                                                         __m512* lane_scale, __m128* off16) {
  if constexpr (qtype == kQ8_0) {
    const uint8_t* b = row + c * 68;
    int32_t d2;
    std::memcpy(&d2, b, 4);
    const __m128 d = _mm_permute_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(d2)), _MM_SHUFFLE(1, 1, 0, 0));
    *lane_scale = spread16(d);
    *off16 = _mm_mul_ps(d, _mm_set1_ps(-128.0f));
    return _mm512_loadu_si512(b + 4);  // codes + 128, unsigned
  } else if constexpr (qtype == kQ4_0 || qtype == kQ4_1) {
    const uint8_t* b = row + c * 40;
    const __m128 v = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
    *lane_scale = spread16(_mm_permute_ps(v, _MM_SHUFFLE(1, 1, 0, 0)));  // [d0 d0 d1 d1]
    *off16 = _mm_permute_ps(v, _MM_SHUFFLE(3, 3, 2, 2));                // [m0 m0 m1 m1]
    return nibbles_lo_hi(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 8)));
  } else if constexpr (qtype == kQ4_K || qtype == kQ5_K) {
    constexpr int64_t bytes = qtype == kQ4_K ? 144 : 176;
    const uint8_t* b = row + (c / 4) * bytes;
    const int j = int(c % 4);
    int sc0, mn0, sc1, mn1;
    scale_min_k4(2 * j, b + 4, &sc0, &mn0);
    scale_min_k4(2 * j + 1, b + 4, &sc1, &mn1);
    const __m128 d = _mm_cvtph_ps(_mm_setr_epi16(*reinterpret_cast<const int16_t*>(b),
                                                 *reinterpret_cast<const int16_t*>(b + 2), 0, 0,
                                                 0, 0, 0, 0));  // [d dmin 0 0]
    const __m128 dd = _mm_permute_ps(d, _MM_SHUFFLE(0, 0, 0, 0));
    const __m128 dm = _mm_permute_ps(d, _MM_SHUFFLE(1, 1, 1, 1));
    *lane_scale = spread16(_mm_mul_ps(dd, _mm_cvtepi32_ps(_mm_setr_epi32(sc0, sc0, sc1, sc1))));
    *off16 = _mm_mul_ps(dm, _mm_cvtepi32_ps(_mm_setr_epi32(-mn0, -mn0, -mn1, -mn1)));
    const uint8_t* qs = b + (qtype == kQ4_K ? 16 : 48) + 32 * j;
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
    if constexpr (qtype == kQ4_K) {
      return nibbles_lo_hi(packed);
    } else {
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
      const __m256i mask = _mm256_set1_epi8(0x0F), sixteen = _mm256_set1_epi8(16);
      __m256i lo = _mm256_and_si256(packed, mask);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
      lo = _mm256_mask_add_epi8(
          lo, _mm256_test_epi8_mask(qh, _mm256_set1_epi8(char(1 << (2 * j)))), lo, sixteen);
      hi = _mm256_mask_add_epi8(
          hi, _mm256_test_epi8_mask(qh, _mm256_set1_epi8(char(1 << (2 * j + 1)))), hi, sixteen);
      return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
  } else {  // kQ6_K
    const uint8_t* b = row + (c / 4) * 210;
    const int half = int(c % 4) / 2, odd = int(c % 2);
    int32_t sc4;
    std::memcpy(&sc4, b + 192 + 8 * half + 4 * odd, 4);
    const __m128 d = _mm_cvtph_ps(_mm_set1_epi16(*reinterpret_cast<const int16_t*>(b + 208)));
    const __m128 s = _mm_mul_ps(d, _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(sc4))));
    *lane_scale = spread16(s);
    *off16 = _mm_mul_ps(s, _mm_set1_ps(-32.0f));
    __m512i ql = _mm512_loadu_si512(b + 64 * half);  // [ql 0..31 | ql 32..63]
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * half));
    const int shift = 4 * odd;
    // the two halves' high bits: (qh >> shift) & 3 and (qh >> (shift + 2)) & 3, then << 4
    __m512i h = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(qh, shift)),
                                   _mm256_srli_epi16(qh, shift + 2), 1);
    h = _mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi8(3)), 4);
    if (odd) ql = _mm512_srli_epi16(ql, 4);
    return _mm512_or_si512(_mm512_and_si512(ql, _mm512_set1_epi8(0x0F)), h);
  }
}

// R rows of x against one weight row (one output column): each chunk decoded once for the R.
template <int qtype, int R, class Out>
void qlinear_rows(Out* out, int64_t out_stride, const QuantizedRows& x, int64_t r0,
                  const uint8_t* row, int64_t k, float bias) {
  __m512 acc[R];
  __m128 off[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    off[r] = _mm_setzero_ps();
  }
  const int8_t* codes_x = x.codes.data() + r0 * k;
  const float* scale_x = x.lane_scale.data() + r0 * k / 4;
  const float* sum_x = x.sum16.data() + r0 * k / 16;
  for (int64_t c = 0; c < k / 64; ++c) {
    __m512 ws;
    __m128 wo;
    const __m512i codes = chunk_codes<qtype>(row, c, &ws, &wo);
    for (int r = 0; r < R; ++r) {
      const __m512i xc = _mm512_loadu_si512(codes_x + r * k + 64 * c);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xc);
      const __m512 xs = _mm512_loadu_ps(scale_x + r * k / 4 + 16 * c);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, xs), acc[r]);
      off[r] = _mm_fmadd_ps(wo, _mm_loadu_ps(sum_x + r * k / 16 + 4 * c), off[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(16) float o[4];
    _mm_store_ps(o, off[r]);
    const float sum = _mm512_reduce_add_ps(acc[r]) + ((o[0] + o[1]) + (o[2] + o[3])) + bias;
    out[(r0 + r) * out_stride] = store<Out>(sum);
  }
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(SURGE_GENERIC)
// AVX2 (a CPU without AVX-512: AMD Zen 2/3, Intel client cores): the same x codes, the same
// integer dot products 4 at a time, from vpmaddubsw (unsigned weight code x signed x code, pairs
// summed to int16) and vpmaddwd (pairs of those to int32). The pair sums fit int16 for codes up
// to 63 (63 * 127 * 2 < 32767); Q8_0's codes go to 255, so its weights are made signed again
// (code - 128, the same value with no offset) and meet x through vpsignb, as llama.cpp does.
#define SURGE_QLINEAR_AVX2 1
constexpr int kQRows = 4;  // x rows sharing one decode of a weight chunk (16 ymm registers)

inline void nibbles_lo_hi(__m256i packed, __m256i* lo, __m256i* hi) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  *lo = _mm256_and_si256(packed, mask);
  *hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
}

// One chunk of 64 weights: codes of elements 0..31 and 32..63, per-lane scales of each half (a
// lane of vpmaddwd's result sums 4 consecutive products: lanes 0-3 are one 16, lanes 4-7 the
// next), and the offsets per 16. As chunk_codes of the AVX-512 path, format by format.
struct Chunk {
  __m256i w0, w1;
  __m256 s0, s1;
  __m128 off;
};

inline __m256 halves(float a, float b) {  // [a a a a b b b b]
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(a)), _mm_set1_ps(b), 1);
}

template <int qtype>
__attribute__((always_inline)) inline Chunk chunk_avx2(const uint8_t* row, int64_t c) {
  Chunk ch;
  if constexpr (qtype == kQ8_0) {
    const uint8_t* b = row + c * 68;
    int32_t d2;
    std::memcpy(&d2, b, 4);
    const __m128 d = _mm_cvtph_ps(_mm_cvtsi32_si128(d2));  // [d0 d1 . .]
    ch.s0 = _mm256_set1_ps(_mm_cvtss_f32(d));
    ch.s1 = _mm256_set1_ps(_mm_cvtss_f32(_mm_movehdup_ps(d)));
    ch.off = _mm_setzero_ps();
    const __m256i bias = _mm256_set1_epi8(char(0x80));
    ch.w0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 4)), bias);
    ch.w1 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 36)), bias);
  } else if constexpr (qtype == kQ4_0 || qtype == kQ4_1) {
    const uint8_t* b = row + c * 40;
    const __m128 v = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
    ch.s0 = _mm256_set1_ps(_mm_cvtss_f32(v));
    ch.s1 = _mm256_set1_ps(_mm_cvtss_f32(_mm_movehdup_ps(v)));
    ch.off = _mm_permute_ps(v, _MM_SHUFFLE(3, 3, 2, 2));  // [m0 m0 m1 m1]
    nibbles_lo_hi(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 8)), &ch.w0, &ch.w1);
  } else if constexpr (qtype == kQ4_K || qtype == kQ5_K) {
    constexpr int64_t bytes = qtype == kQ4_K ? 144 : 176;
    const uint8_t* b = row + (c / 4) * bytes;
    const int j = int(c % 4);
    int sc0, mn0, sc1, mn1;
    scale_min_k4(2 * j, b + 4, &sc0, &mn0);
    scale_min_k4(2 * j + 1, b + 4, &sc1, &mn1);
    const float d = half_to_float(b), dmin = half_to_float(b + 2);
    ch.s0 = _mm256_set1_ps(d * float(sc0));
    ch.s1 = _mm256_set1_ps(d * float(sc1));
    ch.off = _mm_setr_ps(-dmin * float(mn0), -dmin * float(mn0), -dmin * float(mn1),
                         -dmin * float(mn1));
    const uint8_t* qs = b + (qtype == kQ4_K ? 16 : 48) + 32 * j;
    nibbles_lo_hi(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs)), &ch.w0, &ch.w1);
    if constexpr (qtype == kQ5_K) {  // + 16 where the weight's high bit is set
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
      const __m256i sixteen = _mm256_set1_epi8(16), zero = _mm256_setzero_si256();
      const __m256i b0 = _mm256_and_si256(qh, _mm256_set1_epi8(char(1 << (2 * j))));
      const __m256i b1 = _mm256_and_si256(qh, _mm256_set1_epi8(char(1 << (2 * j + 1))));
      ch.w0 = _mm256_add_epi8(ch.w0, _mm256_andnot_si256(_mm256_cmpeq_epi8(b0, zero), sixteen));
      ch.w1 = _mm256_add_epi8(ch.w1, _mm256_andnot_si256(_mm256_cmpeq_epi8(b1, zero), sixteen));
    }
  } else {  // kQ6_K
    const uint8_t* b = row + (c / 4) * 210;
    const int half = int(c % 4) / 2, odd = int(c % 2);
    int32_t sc4;
    std::memcpy(&sc4, b + 192 + 8 * half + 4 * odd, 4);
    const __m128 d = _mm_set1_ps(half_to_float(b + 208));
    const __m128 s = _mm_mul_ps(d, _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(sc4))));
    const __m256 s2 = _mm256_castps128_ps256(s);
    ch.s0 = _mm256_permutevar8x32_ps(s2, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    ch.s1 = _mm256_permutevar8x32_ps(s2, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3));
    ch.off = _mm_mul_ps(s, _mm_set1_ps(-32.0f));
    const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * half));
    const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * half + 32));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * half));
    const int shift = 4 * odd;
    const __m128i sh = _mm_cvtsi32_si128(shift), sh2 = _mm_cvtsi32_si128(shift + 2);
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, sh), m2), 4);
    const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, sh2), m2), 4);
    ch.w0 = _mm256_or_si256(_mm256_and_si256(_mm256_srl_epi16(ql0, sh), m4), h0);
    ch.w1 = _mm256_or_si256(_mm256_and_si256(_mm256_srl_epi16(ql1, sh), m4), h1);
  }
  return ch;
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// R rows of x against one weight row (one output column): each chunk decoded once for the R.
template <int qtype, int R, class Out>
void qlinear_rows(Out* out, int64_t out_stride, const QuantizedRows& x, int64_t r0,
                  const uint8_t* row, int64_t k, float bias) {
  __m256 acc[R];
  __m128 off[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    off[r] = _mm_setzero_ps();
  }
  const int8_t* codes_x = x.codes.data() + r0 * k;
  const float* scale_x = x.lane_scale.data() + r0 * k / 4;
  const float* sum_x = x.sum16.data() + r0 * k / 16;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t c = 0; c < k / 64; ++c) {
    const Chunk ch = chunk_avx2<qtype>(row, c);
    // Q8_0: |w| meets sign(x, w) (vpmaddubsw takes its first operand unsigned)
    const __m256i u0 = qtype == kQ8_0 ? _mm256_sign_epi8(ch.w0, ch.w0) : ch.w0;
    const __m256i u1 = qtype == kQ8_0 ? _mm256_sign_epi8(ch.w1, ch.w1) : ch.w1;
    for (int r = 0; r < R; ++r) {
      const int8_t* xc = codes_x + r * k + 64 * c;
      __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc));
      __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + 32));
      if constexpr (qtype == kQ8_0) {
        x0 = _mm256_sign_epi8(x0, ch.w0);
        x1 = _mm256_sign_epi8(x1, ch.w1);
      }
      const __m256i d0 = _mm256_madd_epi16(_mm256_maddubs_epi16(u0, x0), ones);
      const __m256i d1 = _mm256_madd_epi16(_mm256_maddubs_epi16(u1, x1), ones);
      const float* xs = scale_x + r * k / 4 + 16 * c;
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(ch.s0, _mm256_loadu_ps(xs)),
                               acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1),
                               _mm256_mul_ps(ch.s1, _mm256_loadu_ps(xs + 8)), acc[r]);
      off[r] = _mm_fmadd_ps(ch.off, _mm_loadu_ps(sum_x + r * k / 16 + 4 * c), off[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(16) float o[4];
    _mm_store_ps(o, off[r]);
    const float sum = hsum(acc[r]) + ((o[0] + o[1]) + (o[2] + o[3])) + bias;
    out[(r0 + r) * out_stride] = store<Out>(sum);
  }
}
#endif

#if SURGE_QLINEAR_VNNI || SURGE_QLINEAR_AVX2
// Rows in blocks that stay in L2 (their codes and scales), each block against every column
// this thread owns (the same columns for every block: no barrier between blocks).
template <int qtype, class Out, class Bias>
void qlinear_blocks(Out* out, int64_t out_stride, const QuantizedRows& x, int64_t m,
                    const uint8_t* w, int64_t n, int64_t k, const Bias* bias) {
  const int64_t row_bytes = k / format_of(qtype).block_elems * format_of(qtype).block_bytes;
  const int64_t block_rows = std::max<int64_t>(kQRows, (int64_t(1) << 18) / (2 * k));
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / row_bytes);  // rows
#pragma omp parallel
  for (int64_t b0 = 0; b0 < m; b0 += block_rows) {
    const int64_t b1 = std::min(m, b0 + block_rows);
#pragma omp for schedule(static) nowait
    for (int64_t col = 0; col < n; ++col) {
      const uint8_t* row = w + col * row_bytes;
      // ask for the weights kPrefetchBytes ahead, a line per line used: one thread streaming on
      // its own keeps far fewer loads in flight than the memory needs to deliver its bandwidth
      // (the distance was chosen by measurement: BENCHMARKS.md)
      if (b0 == 0 && col + ahead < n)
        for (int64_t l = 0; l < row_bytes; l += 64)
          _mm_prefetch(reinterpret_cast<const char*>(row + ahead * row_bytes + l), _MM_HINT_T0);
      const float b = bias == nullptr ? 0.0f : load(bias[col]);
      for (int64_t r0 = b0; r0 < b1; r0 += kQRows) {
        Out* o = out + col;
        switch (std::min<int64_t>(kQRows, b1 - r0)) {
#define SURGE_QROWS_CASE(R)                                               \
  case R:                                                                 \
    if constexpr (R <= kQRows) qlinear_rows<qtype, R>(o, out_stride, x, r0, row, k, b); \
    break;
          SURGE_QROWS_CASE(1)
          SURGE_QROWS_CASE(2)
          SURGE_QROWS_CASE(3)
          SURGE_QROWS_CASE(4)
          SURGE_QROWS_CASE(5)
          SURGE_QROWS_CASE(6)
          SURGE_QROWS_CASE(7)
          SURGE_QROWS_CASE(8)
#undef SURGE_QROWS_CASE
          default:
            break;
        }
      }
    }
  }
}

template <class Out, class Bias>
void qlinear_dispatch(Out* out, int64_t out_stride, const QuantizedRows& x, int64_t m,
                      const uint8_t* w, int64_t n, int64_t k, int qtype, const Bias* bias) {
  switch (qtype) {
#define SURGE_QLINEAR_CASE(T)                                        \
  case T:                                                            \
    qlinear_blocks<T>(out, out_stride, x, m, w, n, k, bias); \
    break;
    SURGE_QLINEAR_CASE(kQ8_0)
    SURGE_QLINEAR_CASE(kQ4_0)
    SURGE_QLINEAR_CASE(kQ4_1)
    SURGE_QLINEAR_CASE(kQ4_K)
    SURGE_QLINEAR_CASE(kQ5_K)
    SURGE_QLINEAR_CASE(kQ6_K)
#undef SURGE_QLINEAR_CASE
    default:
      break;
  }
}
#endif

// Portable: each chunk decoded to float and multiplied by x as is (no x quantization).
template <class In, class Out>
void qlinear_portable(Out* out, int64_t out_stride, const In* x, int64_t x_stride, int64_t m,
                      const uint8_t* w, int64_t n, int64_t k, int qtype, const In* bias) {
  const int64_t row_bytes = k / format_of(qtype).block_elems * format_of(qtype).block_bytes;
#pragma omp parallel for schedule(static)
  for (int64_t col = 0; col < n; ++col) {
    const uint8_t* row = w + col * row_bytes;
    std::vector<float> wf(k);
    for (int64_t c = 0; c < k / 64; ++c) {
      uint8_t u[64];
      float s16[4], o16[4];
      decode_chunk(qtype, row, c, u, s16, o16);
      for (int i = 0; i < 64; ++i) wf[64 * c + i] = s16[i / 16] * float(u[i]) + o16[i / 16];
    }
    for (int64_t r = 0; r < m; ++r) {
      const In* xr = x + r * x_stride;
      float lanes[16] = {};
      for (int64_t i = 0; i < k; ++i) lanes[i % 16] += wf[i] * load(xr[i]);
      float sum = bias == nullptr ? 0.0f : load(bias[col]);
      for (float v : lanes) sum += v;
      out[r * out_stride + col] = store<Out>(sum);
    }
  }
}

template <class In, class Out>
void qlinear_typed(Out* out, int64_t out_stride, const In* x, int64_t x_stride, int64_t m,
                   const uint8_t* w, int64_t n, int64_t k, int qtype, const In* bias) {
#if SURGE_QLINEAR_VNNI || SURGE_QLINEAR_AVX2
  thread_local QuantizedRows q;  // kept between calls: a decode step makes hundreds
  quantize_rows(q, x, m, k, x_stride);
  qlinear_dispatch(out, out_stride, q, m, w, n, k, qtype, bias);
#else
  qlinear_portable(out, out_stride, x, x_stride, m, w, n, k, qtype, bias);
#endif
}

template <class In>
void qlinear_in(void* out, int64_t out_stride, const void* x, int64_t x_stride, int64_t m,
                const uint8_t* w, int64_t n, int64_t k, int qtype, const void* bias,
                int out_f32) {
  const auto* xt = static_cast<const In*>(x);
  const auto* bt = static_cast<const In*>(bias);
  if (out_f32) {
    qlinear_typed(static_cast<float*>(out), out_stride, xt, x_stride, m, w, n, k, qtype, bt);
  } else {
    qlinear_typed(static_cast<bf16*>(out), out_stride, xt, x_stride, m, w, n, k, qtype, bt);
  }
}

}  // namespace

// Bytes per row of k weights in this GGUF type, or 0 where the type or k is not supported
// (k must be a multiple of 64, and of 256 for the K-quants).
extern "C" int64_t surge_qlinear_row_bytes(int qtype, int64_t k) {
  const Format f = format_of(qtype);
  if (f.block_elems == 0 || k % 64 != 0 || k % f.block_elems != 0) return 0;
  return k / f.block_elems * f.block_bytes;
}

// Which quantized linear is compiled in: 2 AVX-512 VNNI, 1 AVX2 (both quantize x to int8), 0 the
// portable loop (x as is).
extern "C" int surge_qlinear_isa() {
#if SURGE_QLINEAR_VNNI
  return 2;
#elif SURGE_QLINEAR_AVX2
  return 1;
#else
  return 0;
#endif
}

// out [m, n] (bf16, or float32 with out_f32; row stride out_stride) = x [m, k] (bf16, or float32
// with x_f32; row stride x_stride) @ W^T + bias (x's type), W [n, k] in GGUF type qtype, rows of
// surge_qlinear_row_bytes bytes.
extern "C" void surge_qlinear(void* out, int64_t out_stride, const void* x, int64_t x_stride,
                              int64_t m, const void* w, int64_t n, int64_t k, int qtype,
                              const void* bias, int out_f32, int x_f32) {
  if (m <= 0 || surge_qlinear_row_bytes(qtype, k) == 0) return;
  const auto* wb = static_cast<const uint8_t*>(w);
  if (x_f32) {
    qlinear_in<float>(out, out_stride, x, x_stride, m, wb, n, k, qtype, bias, out_f32);
  } else {
    qlinear_in<bf16>(out, out_stride, x, x_stride, m, wb, n, k, qtype, bias, out_f32);
  }
}

namespace {

template <class Out>
void dequant_rows(Out* o, const uint8_t* w, const int64_t* ids, int64_t count, int64_t k,
                  int qtype, int64_t row_bytes) {
#pragma omp parallel for schedule(static) if (count * k >= (int64_t(1) << 16))
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t* row = w + ids[i] * row_bytes;
    for (int64_t c = 0; c < k / 64; ++c) {
      uint8_t u[64];
      float s16[4], o16[4];
      decode_chunk(qtype, row, c, u, s16, o16);
      for (int j = 0; j < 64; ++j)
        o[i * k + 64 * c + j] = store<Out>(s16[j / 16] * float(u[j]) + o16[j / 16]);
    }
  }
}

}  // namespace

// Rows `ids` of a quantized matrix [*, k] decoded to bf16, or float32 with out_f32 (an
// embedding lookup).
extern "C" void surge_qdequant_rows(void* out, const void* w, const int64_t* ids, int64_t count,
                                    int64_t k, int qtype, int out_f32) {
  const int64_t row_bytes = surge_qlinear_row_bytes(qtype, k);
  if (row_bytes == 0) return;
  const auto* wb = static_cast<const uint8_t*>(w);
  if (out_f32) {
    dequant_rows(static_cast<float*>(out), wb, ids, count, k, qtype, row_bytes);
  } else {
    dequant_rows(static_cast<bf16*>(out), wb, ids, count, k, qtype, row_bytes);
  }
}
