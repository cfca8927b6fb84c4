// A whole decode step of a Llama-family decoder in one call: every layer's norms, linears, rotary
// and cache write, attention and SiLU·mul, then the final norm, for a batch of sequences that
// each add one token. The Python model makes ~10 kernel calls a layer; at batch 1 their
// marshalling costs as much as a third of the step (BENCHMARKS.md), so a decode-only step comes
// here instead. It calls the same kernels in the same order on the same shapes, so its results
// are bit-identical to the Python path's (tests/models/test_decode_step.py checks that).
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

using surge::bf16;

extern "C" {
#define SURGE_STEP_KERNELS(T)                                                                    \
  void surge_rms_norm_##T(void* out, void* residual, const void* x, const void* weight,           \
                          int64_t rows, int64_t dim, float eps);                                  \
  void surge_rope_and_cache_##T(void* qkv, int64_t qkv_stride, const float* cos, const float* sin, \
                                const int64_t* slot_mapping, void* k_cache, void* v_cache,        \
                                int64_t tokens, int64_t num_heads, int64_t num_kv_heads,          \
                                int64_t head_dim, int64_t rotary_dim, int interleaved);           \
  void surge_decode_attention_##T(void* out, const void* q, const void* k_cache,                  \
                                  const void* v_cache, const int32_t* block_tables,               \
                                  const int32_t* context_lens, int64_t num_seqs,                  \
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,      \
                                  int64_t block_size, int64_t max_blocks, int64_t q_stride,       \
                                  int64_t out_stride, float scale);                               \
  void surge_silu_and_mul_##T(void* out, const void* gate_up, int64_t rows, int64_t width);
SURGE_STEP_KERNELS(bf16)
SURGE_STEP_KERNELS(f32)
#undef SURGE_STEP_KERNELS
void surge_linear_bf16(void* out, const void* x, const void* packed, const void* bias, int64_t m,
                       int64_t n, int64_t k, int64_t x_stride, int64_t out_stride, int out_f32);
void surge_linear_amx(void* out, const void* x, const void* packed, const void* bias, int64_t m,
                      int64_t n, int64_t k, int64_t x_stride, int64_t out_stride, int out_f32);
void surge_qlinear(void* out, int64_t out_stride, const void* x, int64_t x_stride, int64_t m,
                   const void* w, int64_t n, int64_t k, int qtype, const void* bias, int out_f32,
                   int x_f32);
}

namespace {

constexpr int kMaxSegments = 4;

// The step's kernels for activations of type T (bf16 or float32 models)
template <class T>
struct StepKernels;
#define SURGE_STEP_TABLE(T, SUFFIX)                                    \
  template <>                                                          \
  struct StepKernels<T> {                                              \
    static constexpr auto rms_norm = surge_rms_norm_##SUFFIX;          \
    static constexpr auto rope_and_cache = surge_rope_and_cache_##SUFFIX; \
    static constexpr auto decode_attention = surge_decode_attention_##SUFFIX; \
    static constexpr auto silu_and_mul = surge_silu_and_mul_##SUFFIX;  \
  };
SURGE_STEP_TABLE(bf16, bf16)
SURGE_STEP_TABLE(float, f32)
#undef SURGE_STEP_TABLE
enum LinearKind : int32_t { kPackedAvx512 = 0, kPackedAmx = 1, kQuantized = 2 };

}  // namespace

// One linear, as the Python side resolved it (mirrored by ctypes in surge/kernels/decode_step.py):
// a packed bf16 weight, or quantized segments each filling its own output columns.
struct SurgeLinear {
  int32_t kind;
  int32_t num_segments;
  int64_t in_features;
  int64_t out_features;
  const void* weight;  // packed bf16 (kinds 0 and 1)
  const void* bias;    // the model's dtype [out_features] or null
  const void* segment_weight[kMaxSegments];
  int64_t segment_first[kMaxSegments];  // first output column
  int64_t segment_rows[kMaxSegments];
  int32_t segment_qtype[kMaxSegments];
};

struct SurgeLayer {
  const void* input_norm;
  const void* post_attention_norm;
  SurgeLinear qkv, o, gate_up, down;
  void* k_cache;
  void* v_cache;
};

struct SurgeDecoder {
  int64_t num_layers, hidden, intermediate, num_heads, num_kv_heads, head_dim, rotary_dim;
  int32_t interleaved;
  float eps, scale;
  const SurgeLayer* layers;
  const void* final_norm;
};

namespace {

template <class T>
void run_linear(const SurgeLinear& l, T* out, const T* x, int64_t m) {
  constexpr int f32 = std::is_same_v<T, float>;
  const int64_t n = l.out_features, k = l.in_features;
  if (l.kind == kQuantized) {
    for (int s = 0; s < l.num_segments; ++s) {
      const int64_t first = l.segment_first[s];
      const T* bias = l.bias == nullptr ? nullptr : static_cast<const T*>(l.bias) + first;
      surge_qlinear(out + first, n, x, k, m, l.segment_weight[s], l.segment_rows[s], k,
                    l.segment_qtype[s], bias, f32, f32);
    }
  } else if constexpr (f32) {
    return;  // packed weights are bf16 only: the Python side never builds such a step
  } else if (l.kind == kPackedAmx) {
    surge_linear_amx(out, x, l.weight, l.bias, m, n, k, k, n, 0);
  } else {
    surge_linear_bf16(out, x, l.weight, l.bias, m, n, k, k, n, 0);
  }
}

// hidden [S, hidden] (bf16, or float32 in surge_decode_step_f32): in, the step's embedded tokens;
// out, the final norm's output (what the Python DecoderModel returns). cos/sin float32
// [S, rotary_dim / 2]; slot_mapping int64 [S]; block_tables int32 [S, max_blocks]; context_lens
// int32 [S].
template <class T>
void decode_step(const SurgeDecoder* d, void* hidden, const float* cos, const float* sin,
                 const int64_t* slot_mapping, const int32_t* block_tables,
                 const int32_t* context_lens, int64_t num_seqs, int64_t max_blocks,
                 int64_t block_size) {
  using K = StepKernels<T>;
  const int64_t s = num_seqs, h = d->hidden;
  const int64_t qkv_width = (d->num_heads + 2 * d->num_kv_heads) * d->head_dim;
  const int64_t attn_width = d->num_heads * d->head_dim;
  auto* x = static_cast<T*>(hidden);
  // the residual stream starts as the embedding (layer 0 norms it without an add)
  std::vector<T> residual(x, x + s * h), normed(s * h), qkv(s * qkv_width),
      attended(s * attn_width), gate_up(s * 2 * d->intermediate), act(s * d->intermediate);
  T* out = x;  // each block's output not yet added to the residual (as the Python layers)
  for (int64_t i = 0; i < d->num_layers; ++i) {
    const SurgeLayer& l = d->layers[i];
    K::rms_norm(normed.data(), i == 0 ? nullptr : residual.data(), i == 0 ? residual.data() : out,
                l.input_norm, s, h, d->eps);
    run_linear(l.qkv, qkv.data(), normed.data(), s);
    K::rope_and_cache(qkv.data(), qkv_width, cos, sin, slot_mapping, l.k_cache, l.v_cache, s,
                      d->num_heads, d->num_kv_heads, d->head_dim, d->rotary_dim, d->interleaved);
    K::decode_attention(attended.data(), qkv.data(), l.k_cache, l.v_cache, block_tables,
                        context_lens, s, d->num_heads, d->num_kv_heads, d->head_dim, block_size,
                        max_blocks, qkv_width, attn_width, d->scale);
    run_linear(l.o, out, attended.data(), s);
    K::rms_norm(normed.data(), residual.data(), out, l.post_attention_norm, s, h, d->eps);
    run_linear(l.gate_up, gate_up.data(), normed.data(), s);
    K::silu_and_mul(act.data(), gate_up.data(), s, d->intermediate);
    run_linear(l.down, out, act.data(), s);
  }
  K::rms_norm(normed.data(), residual.data(), out, d->final_norm, s, h, d->eps);
  std::copy(normed.begin(), normed.end(), x);
}

}  // namespace

extern "C" void surge_decode_step(const SurgeDecoder* d, void* hidden, const float* cos,
                                  const float* sin, const int64_t* slot_mapping,
                                  const int32_t* block_tables, const int32_t* context_lens,
                                  int64_t num_seqs, int64_t max_blocks, int64_t block_size) {
  decode_step<bf16>(d, hidden, cos, sin, slot_mapping, block_tables, context_lens, num_seqs,
                    max_blocks, block_size);
}

// The same for a float32 model (its linears all quantized: packed weights are bf16)
extern "C" void surge_decode_step_f32(const SurgeDecoder* d, void* hidden, const float* cos,
                                      const float* sin, const int64_t* slot_mapping,
                                      const int32_t* block_tables, const int32_t* context_lens,
                                      int64_t num_seqs, int64_t max_blocks, int64_t block_size) {
  decode_step<float>(d, hidden, cos, sin, slot_mapping, block_tables, context_lens, num_seqs,
                     max_blocks, block_size);
}
