// Fused CPU kernels for surge's model step: paged decode attention, RMSNorm (with the residual
// add), rotary embedding with the KV-cache write, and SiLU-and-multiply.
//
// Plain C++ with no torch headers, so it builds in seconds on first use (surge/kernels/__init__.py)
// and is called through ctypes on raw pointers. Loops are written for the compiler's
// auto-vectorizer (-O3 -march=native): fixed 16-lane partial sums instead of serial reductions,
// a branch-free exp. Every kernel computes each row (token or sequence) on its own, in a fixed
// order, so a row's result never depends on what else is in the batch. Compute is float32; bf16
// inputs are widened and outputs rounded to nearest even.
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

#include <cerrno>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

using surge::bf16;
constexpr int kLanes = 16;

// Below this many elements a kernel runs on the calling thread. Each parallel region waits for
// every OpenMP thread; when the server's other processes hold a core, that wait costs far more
// than the few microseconds a second thread would save on a small row count.
constexpr int64_t kParallelWork = int64_t(1) << 17;

using surge::load;
using surge::store;

// exp for softmax and SiLU: Cephes' range reduction and degree-6 polynomial, ~2 ulp; the
// library expf would not vectorize.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

template <class T>
inline void widen(float* dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = load(src[i]);
}

// n must be a multiple of kLanes (checked by the Python side: head_dim % 16 == 0)
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  for (int64_t i = 0; i < n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// any n: lanes first, then the tail, always in the same order
inline float sum_squares(const float* a, int64_t n) {
  float acc[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * a[i + j];
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (int64_t i = body; i < n; ++i) s += a[i] * a[i];
  return s;
}

// The KV-cache slots of positions [0, len) of a sequence, block by block (no division per token).
inline void fill_slots(int64_t* slots, const int32_t* table, int64_t len, int64_t block_size) {
  for (int64_t b = 0, t = 0; t < len; ++b) {
    const int64_t base = int64_t(table[b]) * block_size;
    for (int64_t o = 0; o < block_size && t < len; ++o, ++t) slots[t] = base + o;
  }
}

#if defined(__AVX512F__) && !defined(SURGE_GENERIC)
#define SURGE_AVX512 1
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Rows of a (sequence, kv head) task are head_dim values at a stride of every kv head's, in blocks
// scattered over the cache: too short a run for the hardware prefetcher to pick up. Asking for
// the row kPrefetchRows ahead keeps enough misses in flight on a cache the step evicted. Inline
// asm, because GCC 12 deletes an inlined _mm_prefetch whose address comes from a load.
constexpr int64_t kPrefetchRows = 32;
template <class T>
inline void prefetch_row(const T* base, const int64_t* slots, int64_t t, int64_t len,
                         int64_t slot_stride, int64_t row_bytes) {
  if (t + kPrefetchRows >= len) return;
  const char* p = reinterpret_cast<const char*>(base + slots[t + kPrefetchRows] * slot_stride);
  for (int64_t b = 0; b < row_bytes; b += 64) asm volatile("prefetcht0 %0" : : "m"(p[b]));
}

// The first kPrefetchRows rows, which the loops' look-ahead never asks for.
template <class T>
inline void prefetch_head(const T* base, const int64_t* slots, int64_t len, int64_t slot_stride,
                          int64_t row_bytes) {
  for (int64_t t = -kPrefetchRows; t < 0; ++t)
    prefetch_row(base, slots, t, len, slot_stride, row_bytes);
}

// fast_exp on 16 lanes, same constants
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i bits =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// Softmax numerators in place over n scores; returns their sum. Masked tail, fixed order.
inline float exp_and_sum(float* sc, int64_t n) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = n - t >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - t)) - 1);
    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, sc + t));
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = n - t >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - t)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + t), top));
    _mm512_mask_storeu_ps(sc + t, m, e);
    total = _mm512_mask_add_ps(total, m, total, e);
  }
  return _mm512_reduce_add_ps(total);
}

// Scaled q.k scores [group, len] of one (sequence, kv head) task, widening K to float32.
constexpr int kMaxVecs = 16;
template <class T>
void qk_scores_widened(float* scores, const float* qf, const T* k_cache, const int64_t* slots,
                       int64_t len, int64_t group, int64_t head_dim, int64_t slot_stride) {
  const int nv = int(head_dim / 16);
  __m512 row[kMaxVecs];
  for (int64_t t = 0; t < len; ++t) {
    prefetch_row(k_cache, slots, t, len, slot_stride, head_dim * int64_t(sizeof(T)));
    const T* k = k_cache + slots[t] * slot_stride;
    for (int v = 0; v < nv; ++v) row[v] = load16(k + 16 * v);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * head_dim;
      __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), row[0]);
      for (int v = 1; v < nv; ++v) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * v), row[v], a);
      scores[g * len + t] = _mm512_reduce_add_ps(a);
    }
  }
}

template <class T>
void qk_scores(float* scores, const T* /*q*/, const float* qf, const T* k_cache,
               const int64_t* slots, int64_t len, int64_t group, int64_t head_dim,
               int64_t slot_stride, float /*scale*/) {
  qk_scores_widened<T>(scores, qf, k_cache, slots, len, group, head_dim, slot_stride);
}

#if defined(__AVX512BF16__)
// bf16 with native dot products: pairs of bf16 products summed in float32 (exact products),
// half the instructions and no widening; needs head_dim % 32 == 0.
template <>
void qk_scores<bf16>(float* scores, const bf16* q, const float* qf, const bf16* k_cache,
                     const int64_t* slots, int64_t len, int64_t group, int64_t head_dim,
                     int64_t slot_stride, float scale) {
  if (head_dim % 32 != 0) {
    qk_scores_widened<bf16>(scores, qf, k_cache, slots, len, group, head_dim, slot_stride);
    return;
  }
  const int nb = int(head_dim / 32);
  __m512bh row[kMaxVecs / 2];
  for (int64_t t = 0; t < len; ++t) {
    prefetch_row(k_cache, slots, t, len, slot_stride, head_dim * 2);
    const bf16* k = k_cache + slots[t] * slot_stride;
    for (int v = 0; v < nb; ++v) row[v] = (__m512bh)_mm512_loadu_si512(k + 32 * v);
    for (int64_t g = 0; g < group; ++g) {
      const bf16* qg = q + g * head_dim;
      __m512 a = _mm512_setzero_ps();
      for (int v = 0; v < nb; ++v)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qg + 32 * v), row[v]);
      scores[g * len + t] = _mm512_reduce_add_ps(a) * scale;
    }
  }
}
#endif

// acc[G][NV * 16] = sum_t p[g][t] * V[t] with the accumulators in registers (G * NV <= 24).
template <class T, int NV, int G>
void pv_registers(float* acc, const float* p, int64_t len, const T* v_cache,
                  const int64_t* slots, int64_t slot_stride) {
  __m512 a[G][NV];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) a[g][v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    prefetch_row(v_cache, slots, t, len, slot_stride, NV * 16 * int64_t(sizeof(T)));
    const T* vr = v_cache + slots[t] * slot_stride;
    __m512 row[NV];
    for (int v = 0; v < NV; ++v) row[v] = load16(vr + 16 * v);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * len + t]);
      for (int v = 0; v < NV; ++v) a[g][v] = _mm512_fmadd_ps(w, row[v], a[g][v]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + (g * NV + v) * 16, a[g][v]);
}

// Query heads in chunks of up to 24 / NV, each chunk one pass over V with register accumulators.
template <class T, int NV>
void pv_chunked(float* acc, const float* p, int64_t len, int64_t group, const T* v_cache,
                const int64_t* slots, int64_t slot_stride) {
  constexpr int kChunk = 24 / NV;  // at most 6: the cases below
  for (int64_t g0 = 0; g0 < group; g0 += kChunk) {
    float* a = acc + g0 * NV * 16;
    const float* pg = p + g0 * len;
    switch (std::min<int64_t>(kChunk, group - g0)) {
#define SURGE_PV_CASE(N)                                                   \
  case N:                                                                  \
    pv_registers<T, NV, N>(a, pg, len, v_cache, slots, slot_stride);       \
    break;
      SURGE_PV_CASE(1)
      SURGE_PV_CASE(2)
      SURGE_PV_CASE(3)
      SURGE_PV_CASE(4)
      SURGE_PV_CASE(5)
      SURGE_PV_CASE(6)
#undef SURGE_PV_CASE
    }
  }
}

// Any head_dim (multiple of 16): accumulators in memory.
template <class T>
void pv_memory(float* acc, const float* p, int64_t len, int64_t group, int64_t head_dim,
               const T* v_cache, const int64_t* slots, int64_t slot_stride) {
  const int nv = int(head_dim / 16);
  __m512 row[kMaxVecs];
  std::fill(acc, acc + group * head_dim, 0.0f);
  for (int64_t t = 0; t < len; ++t) {
    prefetch_row(v_cache, slots, t, len, slot_stride, head_dim * int64_t(sizeof(T)));
    const T* vr = v_cache + slots[t] * slot_stride;
    for (int v = 0; v < nv; ++v) row[v] = load16(vr + 16 * v);
    for (int64_t g = 0; g < group; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * len + t]);
      float* a = acc + g * head_dim;
      for (int v = 0; v < nv; ++v)
        _mm512_storeu_ps(a + 16 * v, _mm512_fmadd_ps(w, row[v], _mm512_loadu_ps(a + 16 * v)));
    }
  }
}

// One (sequence, kv head) task; head_dim is a multiple of 16 and at most kMaxVecs * 16.
template <class T>
void decode_task(T* out, const T* q, const float* qf, const T* k_cache, const T* v_cache,
                 const int64_t* slots, int64_t len, int64_t group, int64_t head_dim,
                 int64_t slot_stride, float scale, float* scores, float* acc, float* inv) {
  const int64_t row_bytes = head_dim * int64_t(sizeof(T));
  prefetch_head(k_cache, slots, len, slot_stride, row_bytes);
  qk_scores<T>(scores, q, qf, k_cache, slots, len, group, head_dim, slot_stride, scale);
  prefetch_head(v_cache, slots, len, slot_stride, row_bytes);  // arriving during the softmax
  for (int64_t g = 0; g < group; ++g) inv[g] = 1.0f / exp_and_sum(scores + g * len, len);
  if (head_dim == 64) {
    pv_chunked<T, 4>(acc, scores, len, group, v_cache, slots, slot_stride);
  } else if (head_dim == 128) {
    pv_chunked<T, 8>(acc, scores, len, group, v_cache, slots, slot_stride);
  } else {
    pv_memory<T>(acc, scores, len, group, head_dim, v_cache, slots, slot_stride);
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d)
      out[g * head_dim + d] = store<T>(acc[g * head_dim + d] * inv[g]);
}
#else
// Portable version of the same task, for CPUs without AVX-512.
template <class T>
void decode_task(T* out, const T* /*q*/, const float* qf, const T* k_cache, const T* v_cache,
                 const int64_t* slots, int64_t len, int64_t group, int64_t head_dim,
                 int64_t slot_stride, float /*scale*/, float* scores, float* acc, float* inv) {
  std::vector<float> row(head_dim);
  for (int64_t t = 0; t < len; ++t) {
    widen(row.data(), k_cache + slots[t] * slot_stride, head_dim);
    for (int64_t g = 0; g < group; ++g)
      scores[g * len + t] = dot(qf + g * head_dim, row.data(), head_dim);
  }
  for (int64_t g = 0; g < group; ++g) {
    float* sc = scores + g * len;
    float m = sc[0];
    for (int64_t t = 1; t < len; ++t) m = std::max(m, sc[t]);
    float total = 0.0f;
    for (int64_t t = 0; t < len; ++t) {
      sc[t] = fast_exp(sc[t] - m);
      total += sc[t];
    }
    inv[g] = 1.0f / total;
  }
  std::fill(acc, acc + group * head_dim, 0.0f);
  for (int64_t t = 0; t < len; ++t) {
    widen(row.data(), v_cache + slots[t] * slot_stride, head_dim);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * len + t];
      float* a = acc + g * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) a[d] += p * row[d];
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d)
      out[g * head_dim + d] = store<T>(acc[g * head_dim + d] * inv[g]);
}
#endif

// One decode query per sequence against its paged context. Tasks are (sequence, kv head): the
// group of query heads sharing a kv head reads each K/V row once.
template <class T>
void decode_attention(T* out, const T* q, const T* k_cache, const T* v_cache,
                      const int32_t* block_tables, const int32_t* context_lens, int64_t num_seqs,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      int64_t block_size, int64_t max_blocks, int64_t q_stride,
                      int64_t out_stride, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  int64_t work = 0;
  for (int64_t s = 0; s < num_seqs; ++s) work += int64_t(context_lens[s]) * num_kv_heads * head_dim;
#pragma omp parallel if (work >= kParallelWork)
  {
    std::vector<float> qf(group * head_dim), acc(group * head_dim), inv(group), scores;
    std::vector<int64_t> slots;
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t s = 0; s < num_seqs; ++s) {
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const int64_t len = context_lens[s];
        scores.resize(group * len);
        slots.resize(len);
        fill_slots(slots.data(), block_tables + s * max_blocks, len, block_size);
        const T* src = q + s * q_stride + h * group * head_dim;
        for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = load(src[i]) * scale;
        decode_task<T>(out + s * out_stride + h * group * head_dim, src, qf.data(),
                       k_cache + h * head_dim, v_cache + h * head_dim, slots.data(), len, group,
                       head_dim, num_kv_heads * head_dim, scale, scores.data(), acc.data(),
                       inv.data());
      }
    }
  }
}

// out = weight * round(x * rsqrt(mean(x^2) + eps)), as transformers computes it. With a
// residual: residual = round(residual + x) first, and the norm is taken of the new residual.
template <class T>
void rms_norm(T* out, T* residual, const T* x, const T* weight, int64_t rows, int64_t dim,
              float eps) {
#pragma omp parallel if (rows * dim >= kParallelWork)
  {
    std::vector<float> buf(dim);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* src = x + r * dim;
      if (residual != nullptr) {
        T* res = residual + r * dim;
        for (int64_t i = 0; i < dim; ++i) {
          res[i] = store<T>(load(res[i]) + load(src[i]));
          buf[i] = load(res[i]);
        }
      } else {
        widen(buf.data(), src, dim);
      }
      const float inv = 1.0f / std::sqrt(sum_squares(buf.data(), dim) / float(dim) + eps);
      T* dst = out + r * dim;
      for (int64_t i = 0; i < dim; ++i)
        dst[i] = store<T>(load(weight[i]) * load(store<T>(buf[i] * inv)));
    }
  }
}

// Rotates q and k in place in the fused qkv rows ([q heads | k heads | v heads] per token), then
// writes each token's k and v into its KV-cache slot. cos/sin: float32 [tokens, rotary_dim / 2].
template <class T>
void rope_and_cache(T* qkv, int64_t qkv_stride, const float* cos, const float* sin,
                    const int64_t* slot_mapping, T* k_cache, T* v_cache, int64_t tokens,
                    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t rotary_dim,
                    int interleaved) {
  const int64_t half = rotary_dim / 2;
  const int64_t kv_width = num_kv_heads * head_dim;
#pragma omp parallel for schedule(static) if (tokens * qkv_stride >= kParallelWork)
  for (int64_t t = 0; t < tokens; ++t) {
    T* row = qkv + t * qkv_stride;
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
      T* x = row + h * head_dim;
      if (interleaved) {
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = load(x[2 * i]), x2 = load(x[2 * i + 1]);
          x[2 * i] = store<T>(x1 * c[i] - x2 * s[i]);
          x[2 * i + 1] = store<T>(x2 * c[i] + x1 * s[i]);
        }
      } else {
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = load(x[i]), x2 = load(x[i + half]);
          x[i] = store<T>(x1 * c[i] - x2 * s[i]);
          x[i + half] = store<T>(x2 * c[i] + x1 * s[i]);
        }
      }
    }
    const int64_t slot = slot_mapping[t];
    std::memcpy(k_cache + slot * kv_width, row + num_heads * head_dim, kv_width * sizeof(T));
    std::memcpy(v_cache + slot * kv_width, row + (num_heads + num_kv_heads) * head_dim,
                kv_width * sizeof(T));
  }
}

#if SURGE_AVX512
// x rounded to T's precision (nearest even), still as float32 lanes
template <class T>
inline __m512 round16(__m512 x);
template <>
inline __m512 round16<float>(__m512 x) {
  return x;
}
template <>
inline __m512 round16<bf16>(__m512 x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int(0xffff0000u))));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(bf16* p, __m512 x) {
  const __m512i top = _mm512_srli_epi32(_mm512_castps_si512(round16<bf16>(x)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(top));
}
#endif

#if SURGE_AVX512 && defined(__AVX512BF16__)
#define SURGE_LINEAR_BF16 1
// bf16 linear layers, y = x W^T + b, for the decode-sized batches the server runs.
//
// The weight is packed once into blocks of kLinearCols output columns: block b holds, for each
// pair of input features (2p, 2p+1), the 32 columns' pairs side by side ([K/2][32][2]), the
// layout vdpbf16ps multiplies against a broadcast pair of x. A block is swept once per group of
// up to kLinearRows rows of x, with every accumulator in a register. Each thread owns a fixed
// range of blocks and prefetches the next block's weights while it computes on the current one:
// at 32 rows the step is streaming 270 MB of weights, and without the overlap the first sweep
// over each block waited on memory. Each output element is one float32 dot product over K in
// order, plus the bias, rounded once: a row's result does not depend on the other rows.
constexpr int64_t kLinearTiles = 2;  // 16-lane tiles per block
constexpr int64_t kLinearCols = 16 * kLinearTiles;
constexpr int kLinearRows = 12;  // 24 accumulators + 2 weight vectors + 1 broadcast

inline int32_t load_pair(const bf16* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Prefetch into L2 from a register, without a memory operand: GCC keeps the accumulators in
// registers around it (an "m" operand made it spill them on every iteration).
inline void prefetch_l2(const char* p) { asm volatile("prefetcht1 (%0)" : : "r"(p)); }

// 16 bias values (masked columns and a null bias read as 0), widened to float32.
inline __m512 load_bias16(const bf16* bias, int64_t offset, __mmask16 cols) {
  if (bias == nullptr) return _mm512_setzero_ps();
  const __m256i raw = _mm256_maskz_loadu_epi16(cols, bias + offset);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// acc + bias, leaving acc untouched without one (-0 stays -0)
inline __m512 add_bias(__m512 acc, __m512 b, const bf16* bias) {
  return bias == nullptr ? acc : _mm512_add_ps(acc, b);
}

// A linear's 16 outputs, rounded once to bf16 (or kept float32), masked to the real columns.
template <class Out>
inline void store_out16(Out* out, __mmask16 cols, __m512 r) {
  if constexpr (std::is_same_v<Out, float>) {
    _mm512_mask_storeu_ps(out, cols, r);
  } else {
    _mm256_mask_storeu_epi16(out, cols, (__m256i)_mm512_cvtneps_pbh(r));
  }
}

template <int MB, class Out>
void linear_rows(Out* out, int64_t out_stride, const bf16* x, int64_t x_stride, const bf16* blk,
                 int64_t kpairs, const bf16* bias, const __mmask16* cols, const char* next,
                 int64_t next_lines) {
  __m512 acc[MB][kLinearTiles];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < kLinearTiles; ++j) acc[m][j] = _mm512_setzero_ps();
  const bf16* xr[MB];
  for (int m = 0; m < MB; ++m) xr[m] = x + m * x_stride;
  int64_t credit = 0;  // spreads next_lines prefetches evenly over the kpairs iterations
  for (int64_t k = 0; k < kpairs; ++k) {
    for (credit += next_lines; credit >= kpairs; credit -= kpairs, next += 64) prefetch_l2(next);
    __m512bh w[kLinearTiles];
    for (int j = 0; j < kLinearTiles; ++j)
      w[j] = (__m512bh)_mm512_loadu_si512(blk + (k * kLinearTiles + j) * 32);
    for (int m = 0; m < MB; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(load_pair(xr[m] + 2 * k));
      for (int j = 0; j < kLinearTiles; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], a, w[j]);
    }
  }
  for (int j = 0; j < kLinearTiles; ++j) {
    const __m512 b = load_bias16(bias, 16 * j, cols[j]);
    for (int m = 0; m < MB; ++m) {
      store_out16(out + m * out_stride + 16 * j, cols[j], add_bias(acc[m][j], b, bias));
    }
  }
}

void pack_linear_bf16(bf16* packed, const bf16* w, int64_t n, int64_t k) {
  const int64_t blocks = (n + kLinearCols - 1) / kLinearCols, kpairs = k / 2;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    bf16* dst = packed + b * kpairs * kLinearCols * 2;
    for (int64_t p = 0; p < kpairs; ++p)
      for (int64_t c = 0; c < kLinearCols; ++c) {
        const int64_t col = b * kLinearCols + c;
        bf16* d = dst + (p * kLinearCols + c) * 2;
        d[0] = col < n ? w[col * k + 2 * p] : 0;  // padding columns are zero, never stored
        d[1] = col < n ? w[col * k + 2 * p + 1] : 0;
      }
  }
}

template <class Out>
void linear_bf16(Out* out, const bf16* x, const bf16* packed, const bf16* bias, int64_t m,
                 int64_t n, int64_t k, int64_t x_stride, int64_t out_stride) {
  if (m <= 0) return;
  const int64_t blocks = (n + kLinearCols - 1) / kLinearCols, kpairs = k / 2;
  const int64_t groups = (m + kLinearRows - 1) / kLinearRows;
  const int64_t block_elems = kpairs * kLinearCols * 2, block_lines = block_elems * 2 / 64;
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t first = t * blocks / threads, end = (t + 1) * blocks / threads;
    for (int64_t b = first; b < end; ++b) {
      const int64_t c0 = b * kLinearCols, width = std::min(kLinearCols, n - c0);
      __mmask16 cols[kLinearTiles];
      for (int j = 0; j < kLinearTiles; ++j) {
        const int64_t c = width - 16 * j;
        cols[j] = c >= 16 ? __mmask16(0xffff) : c <= 0 ? __mmask16(0) : __mmask16((1u << c) - 1);
      }
      const bf16* blk = packed + b * block_elems;
      const char* next = reinterpret_cast<const char*>(blk + block_elems);
      const int64_t next_lines = b + 1 < end ? block_lines : 0;
      for (int64_t g = 0; g < groups; ++g) {
        // rows split evenly (32 = 11 + 11 + 10, not 12 + 12 + 8); the prefetch likewise
        const int64_t r0 = g * m / groups, rows = (g + 1) * m / groups - r0;
        const int64_t l0 = g * next_lines / groups, l1 = (g + 1) * next_lines / groups;
        Out* o = out + r0 * out_stride + c0;
        const bf16* xg = x + r0 * x_stride;
        const bf16* bs = bias == nullptr ? nullptr : bias + c0;
        switch (rows) {
#define SURGE_LINEAR_CASE(N)                                                               \
  case N:                                                                                  \
    linear_rows<N, Out>(o, out_stride, xg, x_stride, blk, kpairs, bs, cols, next + l0 * 64, l1 - l0); \
    break;
          SURGE_LINEAR_CASE(1)
          SURGE_LINEAR_CASE(2)
          SURGE_LINEAR_CASE(3)
          SURGE_LINEAR_CASE(4)
          SURGE_LINEAR_CASE(5)
          SURGE_LINEAR_CASE(6)
          SURGE_LINEAR_CASE(7)
          SURGE_LINEAR_CASE(8)
          SURGE_LINEAR_CASE(9)
          SURGE_LINEAR_CASE(10)
          SURGE_LINEAR_CASE(11)
          SURGE_LINEAR_CASE(12)
#undef SURGE_LINEAR_CASE
          default:
            break;
        }
      }
    }
  }
}
#endif

#if SURGE_LINEAR_BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define SURGE_LINEAR_AMX 1
// The same linear on AMX tiles, over the same packed weight: a block's [K/2][32][2] layout is
// two B tiles side by side (16 pairs x 16 columns x 2, a row stride of 128 bytes), and x's rows
// load as A tiles straight from memory. A C tile accumulates one output element's dot product
// over K in the order the AVX-512 kernel does, one pair of products at a time; the start-up
// probe (surge_amx_probe) checks the two agree bit for bit before this path is used, so the
// rule holds across the switch: a row's result does not depend on the other rows. K must be a
// multiple of 32 (a tile's depth); other shapes take the AVX-512 kernel.
constexpr int kAmxRows = 16;   // rows of an A / C tile
constexpr int kAmxDepth = 32;  // bf16 values of K per A tile row
constexpr int64_t kAmxSliceBytes = int64_t(1) << 20;  // bytes of x rows per pass over the blocks

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0-3: C (row group r, column tile j) at 2 r + j; 4-5: A (row group r); 6-7: B (tile j)
inline void amx_config(int rows0, int rows1) {
  TileConfig cfg;
  const int rows[2] = {rows0, rows1};
  for (int r = 0; r < 2; ++r) {
    for (int j = 0; j < 2; ++j) {
      cfg.rows[2 * r + j] = uint8_t(rows[r]);
      cfg.colsb[2 * r + j] = rows[r] ? 64 : 0;
    }
    cfg.rows[4 + r] = uint8_t(rows[r]);
    cfg.colsb[4 + r] = rows[r] ? 64 : 0;
  }
  for (int j = 0; j < 2; ++j) {
    cfg.rows[6 + j] = kAmxDepth / 2;
    cfg.colsb[6 + j] = 64;
  }
  // GCC 12's _tile_loadconfig tells the optimizer it reads 8 bytes of the 64, so it may drop
  // the stores that size the tiles (0x0 tiles: SIGILL, as llama.cpp's AMX kernel built with it
  // does here); the barrier makes every store land first
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// C tiles (float32 16 x 16) to out, with the bias added and bf16 rounding where Out is bf16.
template <class Out>
void amx_store(Out* out, int64_t out_stride, const float* c, int rows, const bf16* bias,
               const __mmask16* cols) {
  for (int j = 0; j < 2; ++j) {
    const __m512 b = load_bias16(bias, 16 * j, cols[j]);
    for (int m = 0; m < rows; ++m) {
      const __m512 acc = _mm512_loadu_ps(c + (j * kAmxRows + m) * 16);
      store_out16(out + m * out_stride + 16 * j, cols[j], add_bias(acc, b, bias));
    }
  }
}

// Up to 32 rows of x against one 32-column block: two row groups of up to 16 share each B load.
template <class Out>
void amx_block_rows(Out* out, int64_t out_stride, const bf16* x, int64_t x_stride, const bf16* blk,
                    int64_t k, int rows0, int rows1, const bf16* bias, const __mmask16* cols,
                    float* scratch, const char* next) {
  _tile_zero(0);
  _tile_zero(1);
  if (rows1) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t xs = x_stride * 2;
  const bf16* x1 = x + kAmxRows * x_stride;
  for (int64_t k0 = 0; k0 < k; k0 += kAmxDepth) {
    const bf16* b = blk + k0 * kLinearCols;  // (k0 / 2) pairs of 32 columns x 2
    if (next != nullptr) {
      const char* nb = next + k0 * kLinearCols * 2;
      for (int l = 0; l < kAmxDepth * kLinearCols * 2 / 64; ++l) prefetch_l2(nb + 64 * l);
    }
    _tile_loadd(6, b, kLinearCols * 4);
    _tile_loadd(7, b + 32, kLinearCols * 4);
    _tile_loadd(4, x + k0, xs);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (rows1) {
      _tile_loadd(5, x1 + k0, xs);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, scratch, 64);
  _tile_stored(1, scratch + kAmxRows * 16, 64);
  amx_store(out, out_stride, scratch, rows0, bias, cols);
  if (rows1) {
    _tile_stored(2, scratch, 64);
    _tile_stored(3, scratch + kAmxRows * 16, 64);
    amx_store(out + kAmxRows * out_stride, out_stride, scratch, rows1, bias, cols);
  }
}

template <class Out>
void linear_amx(Out* out, const bf16* x, const bf16* packed, const bf16* bias, int64_t m,
                int64_t n, int64_t k, int64_t x_stride, int64_t out_stride) {
  if (m <= 0) return;
  const int64_t blocks = (n + kLinearCols - 1) / kLinearCols, kpairs = k / 2;
  const int64_t block_elems = kpairs * kLinearCols * 2;
  const int64_t pairs_of_groups = (m + 2 * kAmxRows - 1) / (2 * kAmxRows);
  const int64_t slice_groups = std::max<int64_t>(1, kAmxSliceBytes / (2 * kAmxRows * k * 2));
#pragma omp parallel
  {
    alignas(64) float scratch[2 * kAmxRows * 16];
    int cfg0 = -1, cfg1 = -1;
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t first = t * blocks / threads, end = (t + 1) * blocks / threads;
    // rows in slices whose x stays in L2 while the thread's blocks stream past (a prefill's
    // thousands of rows would otherwise be re-read from memory for every block)
    for (int64_t g0 = 0; g0 < pairs_of_groups; g0 += slice_groups) {
      const int64_t g1 = std::min(pairs_of_groups, g0 + slice_groups);
      for (int64_t b = first; b < end; ++b) {
        const int64_t c0 = b * kLinearCols, width = std::min(kLinearCols, n - c0);
        __mmask16 cols[2];
        for (int j = 0; j < 2; ++j) {
          const int64_t c = width - 16 * j;
          cols[j] = c >= 16 ? __mmask16(0xffff) : c <= 0 ? __mmask16(0) : __mmask16((1u << c) - 1);
        }
        const bf16* blk = packed + b * block_elems;
        const bf16* bs = bias == nullptr ? nullptr : bias + c0;
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t r0 = g * 2 * kAmxRows, left = m - r0;
          const int rows0 = int(std::min<int64_t>(kAmxRows, left));
          const int rows1 = int(std::clamp<int64_t>(left - kAmxRows, 0, kAmxRows));
          if (rows0 != cfg0 || rows1 != cfg1) {
            amx_config(rows0, rows1);
            cfg0 = rows0;
            cfg1 = rows1;
          }
          amx_block_rows(out + r0 * out_stride + c0, out_stride, x + r0 * x_stride, x_stride, blk, k,
                         rows0, rows1, bs, cols, scratch,
                         g == g0 && b + 1 < end ? reinterpret_cast<const char*>(blk + block_elems)
                                                : nullptr);
        }
      }
    }
    if (cfg0 >= 0) _tile_release();
  }
}
#endif

// out = round(round(silu(gate)) * up) over rows of [gate | up], as torch computes it.
template <class T>
void silu_and_mul(T* out, const T* gate_up, int64_t rows, int64_t width) {
#pragma omp parallel for schedule(static) if (rows * width >= kParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gate_up + r * 2 * width;
    const T* u = g + width;
    T* dst = out + r * width;
    int64_t i = 0;
#if SURGE_AVX512
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= width; i += 16) {
      const __m512 x = load16(g + i);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
      const __m512 act = round16<T>(_mm512_div_ps(x, _mm512_add_ps(one, e)));
      store16(dst + i, _mm512_mul_ps(act, load16(u + i)));
    }
#endif
    for (; i < width; ++i) {
      const float x = load(g[i]);
      const float act = load(store<T>(x / (1.0f + fast_exp(-x))));
      dst[i] = store<T>(act * load(u[i]));
    }
  }
}

// Index of each row's largest value: the first one on ties, and the first NaN if any (torch's
// argmax rule). float32 logits [rows, cols].
void argmax_rows(int64_t* out, const float* x, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols >= 4 * kParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    int64_t best = 0;
    int64_t i = 0;
    bool has_nan = false;
#if SURGE_AVX512
    if (cols >= 16) {
      __m512 vmax = _mm512_loadu_ps(row);
      __m512i vidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      __m512i idx = vidx;
      __mmask16 nan = _mm512_cmp_ps_mask(vmax, vmax, _CMP_UNORD_Q);
      const __m512i step = _mm512_set1_epi32(16);
      for (i = 16; i + 16 <= cols; i += 16) {
        idx = _mm512_add_epi32(idx, step);
        const __m512 v = _mm512_loadu_ps(row + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);  // strict: earliest wins
        vmax = _mm512_mask_mov_ps(vmax, gt, v);
        vidx = _mm512_mask_mov_epi32(vidx, gt, idx);
      }
      has_nan = nan != 0;
      const float top = _mm512_reduce_max_ps(vmax);
      const __mmask16 at_top = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(top), _CMP_EQ_OQ);
      best = _mm512_mask_reduce_min_epi32(at_top, vidx);
    }
#endif
    float top = row[best];
    for (; i < cols; ++i) {
      has_nan |= row[i] != row[i];
      if (row[i] > top) {
        top = row[i];
        best = i;
      }
    }
    if (has_nan || top != top) {
      for (int64_t j = 0; j < cols; ++j) {
        if (row[j] != row[j]) {
          best = j;
          break;
        }
      }
    }
    out[r] = best;
  }
}

}  // namespace

// 1 where the bf16 linear kernel was compiled in (AVX-512 BF16), else 0 and the two below are
// never called.
extern "C" int surge_linear_bf16_supported() {
#if SURGE_LINEAR_BF16
  return 1;
#else
  return 0;
#endif
}

// packed: ceil(n / 32) * 32 * k bf16 values; k even
extern "C" void surge_pack_linear_bf16(void* packed, const void* w, int64_t n, int64_t k) {
#if SURGE_LINEAR_BF16
  pack_linear_bf16(static_cast<bf16*>(packed), static_cast<const bf16*>(w), n, k);
#endif
}

// out: bf16, or float32 with out_f32 (logits: no rounding to bf16, whose steps of 1/8 at |16|
// tie a small model's top candidates)
extern "C" void surge_linear_bf16(void* out, const void* x, const void* packed, const void* bias,
                                  int64_t m, int64_t n, int64_t k, int64_t x_stride,
                                  int64_t out_stride, int out_f32) {
#if SURGE_LINEAR_BF16
  const auto* xb = static_cast<const bf16*>(x);
  const auto* pb = static_cast<const bf16*>(packed);
  const auto* bb = static_cast<const bf16*>(bias);
  if (out_f32) {
    linear_bf16(static_cast<float*>(out), xb, pb, bb, m, n, k, x_stride, out_stride);
  } else {
    linear_bf16(static_cast<bf16*>(out), xb, pb, bb, m, n, k, x_stride, out_stride);
  }
#endif
}

// 1 where the AMX linear was compiled in (the compiler targets AMX-BF16), else 0.
extern "C" int surge_linear_amx_supported() {
#if SURGE_LINEAR_AMX
  return 1;
#else
  return 0;
#endif
}

// Asks Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): without
// it the first tile instruction raises SIGILL. 0 on success, else errno.
extern "C" int surge_amx_request_permission() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0 ? 0 : errno;
#else
  return ENOSYS;
#endif
}

// The start-up probe, run in a child process (a CPU or kernel that refuses the tile state kills
// it with SIGILL, not the server): asks for the tile state, runs the AMX linear on a small case
// with row and column tails, and checks it against double-precision sums. 0 when the path works;
// 2: the kernel refused the tile state; 3: wrong results; 4: not compiled in.
extern "C" int surge_amx_probe() {
#if SURGE_LINEAR_AMX
  if (surge_amx_request_permission() != 0) return 2;
  constexpr int64_t m = 37, n = 40, k = 96;
  std::vector<bf16> x(m * k), w(n * k), bias(n), packed(((n + kLinearCols - 1) / kLinearCols) *
                                                         kLinearCols * k);
  auto to_bf16 = [](float f) { return store<bf16>(f); };
  for (int64_t i = 0; i < m * k; ++i) x[i] = to_bf16(float((i * 37 + 11) % 17) / 8.0f - 1.0f);
  for (int64_t i = 0; i < n * k; ++i) w[i] = to_bf16(float((i * 53 + 5) % 13) / 6.0f - 1.0f);
  for (int64_t i = 0; i < n; ++i) bias[i] = to_bf16(float(i % 5) - 2.0f);
  pack_linear_bf16(packed.data(), w.data(), n, k);
  std::vector<float> out(m * n);
  linear_amx(out.data(), x.data(), packed.data(), bias.data(), m, n, k, k, n);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; ++c) {
      double ref = load(bias[c]);
      for (int64_t i = 0; i < k; ++i) ref += double(load(x[r * k + i])) * load(w[c * k + i]);
      if (std::fabs(out[r * n + c] - ref) > 1e-3 * (1.0 + std::fabs(ref))) return 3;
    }
  return 0;
#else
  return 4;
#endif
}

// out = x W^T + b on AMX tiles; same arguments as surge_linear_bf16, k a multiple of 32.
extern "C" void surge_linear_amx(void* out, const void* x, const void* packed, const void* bias,
                                 int64_t m, int64_t n, int64_t k, int64_t x_stride,
                                 int64_t out_stride, int out_f32) {
#if SURGE_LINEAR_AMX
  const auto* xb = static_cast<const bf16*>(x);
  const auto* pb = static_cast<const bf16*>(packed);
  const auto* bb = static_cast<const bf16*>(bias);
  if (out_f32) {
    linear_amx(static_cast<float*>(out), xb, pb, bb, m, n, k, x_stride, out_stride);
  } else {
    linear_amx(static_cast<bf16*>(out), xb, pb, bb, m, n, k, x_stride, out_stride);
  }
#endif
}

extern "C" void surge_argmax_rows(int64_t* out, const float* x, int64_t rows, int64_t cols) {
  argmax_rows(out, x, rows, cols);
}

#define SURGE_EXPORT_ALL(SUFFIX, T)                                                              \
  extern "C" void surge_decode_attention_##SUFFIX(                                               \
      void* out, const void* q, const void* k_cache, const void* v_cache,                        \
      const int32_t* block_tables, const int32_t* context_lens, int64_t num_seqs,                \
      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,             \
      int64_t max_blocks, int64_t q_stride, int64_t out_stride, float scale) {                   \
    decode_attention<T>(static_cast<T*>(out), static_cast<const T*>(q),                          \
                        static_cast<const T*>(k_cache), static_cast<const T*>(v_cache),          \
                        block_tables, context_lens, num_seqs, num_heads, num_kv_heads, head_dim, \
                        block_size, max_blocks, q_stride, out_stride, scale);                    \
  }                                                                                              \
  extern "C" void surge_rms_norm_##SUFFIX(void* out, void* residual, const void* x,              \
                                          const void* weight, int64_t rows, int64_t dim,         \
                                          float eps) {                                           \
    rms_norm<T>(static_cast<T*>(out), static_cast<T*>(residual), static_cast<const T*>(x),       \
                static_cast<const T*>(weight), rows, dim, eps);                                  \
  }                                                                                              \
  extern "C" void surge_rope_and_cache_##SUFFIX(                                                 \
      void* qkv, int64_t qkv_stride, const float* cos, const float* sin,                         \
      const int64_t* slot_mapping, void* k_cache, void* v_cache, int64_t tokens,                 \
      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t rotary_dim,             \
      int interleaved) {                                                                         \
    rope_and_cache<T>(static_cast<T*>(qkv), qkv_stride, cos, sin, slot_mapping,                  \
                      static_cast<T*>(k_cache), static_cast<T*>(v_cache), tokens, num_heads,     \
                      num_kv_heads, head_dim, rotary_dim, interleaved);                          \
  }                                                                                              \
  extern "C" void surge_silu_and_mul_##SUFFIX(void* out, const void* gate_up, int64_t rows,      \
                                              int64_t width) {                                   \
    silu_and_mul<T>(static_cast<T*>(out), static_cast<const T*>(gate_up), rows, width);          \
  }

SURGE_EXPORT_ALL(bf16, bf16)
SURGE_EXPORT_ALL(f32, float)
