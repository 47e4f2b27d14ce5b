// short_attention: self-attention of many short packed sequences on the CPU (contract: echo/ops/attention.py,
// varlen_attention), for sequences of at most 32 tokens and head_dim 64. A clip of a few seconds gives ECHO
// sequences of 4-17 tokens (one band of one segment), and torch's SDPA spends about as long on such a
// (sequence, head) as on one of 32 tokens: a fifth of a bf16 encode of short clips went there.
//
// One work item is one (sequence, head). K is transposed into 16-key vectors; a query's scores are
// accumulated over the head dimension in registers (four chains, so the FMAs do not wait on each other), then
// masked past the sequence end, an fp32 softmax with a vectorised exp, and the output row is accumulated from
// the value rows. Inputs and output are float32 or bfloat16; all arithmetic is float32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

// The vector helpers here and in cpu_vector.h take and return 64-byte vectors; they are always inlined into
// the clones, so no call ever passes one by the ABI that GCC warns about.
#pragma GCC diagnostic ignored "-Wpsabi"
#include "cpu_vector.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define ECHO_INLINE inline __attribute__((always_inline))

namespace echo {
namespace {

constexpr int64_t kHeadDim = 64;
constexpr int64_t kMaxTokens = 32;
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

ECHO_INLINE v16 splat(float value) { return v16{} + value; }

ECHO_INLINE float lane_max(v16 x) {
  float top = x[0];
  for (int l = 1; l < 16; ++l) top = std::max(top, x[l]);
  return top;
}

ECHO_INLINE float lane_sum(v16 x) {
  const v16 half = x + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  const v16 quarter = half + __builtin_shufflevector(half, half, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
  return quarter[0] + quarter[1] + quarter[2] + quarter[3];
}

// e^x for x <= 0, vectorised (std::exp is a scalar libm call): x = n ln2 + r with |r| <= ln2 / 2, e^r by
// Cephes' expf polynomial (relative error ~1e-7), 2^n through the exponent bits; x below -87 gives ~1e-38.
ECHO_INLINE v16 exp_nonpositive(v16 x) {
  x = x < -87.f ? splat(-87.f) : x;
  const v16 shifted = x * 1.44269504088896341f + 0.5f;
  const v16 n = (shifted - 0.5f + 12582912.f) - 12582912.f;  // round to nearest: the 1.5 * 2^23 trick
  const v16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const i32x16 exponent = (__builtin_convertvector(n, i32x16) + 127) << 23;
  v16 power;
  std::memcpy(&power, &exponent, sizeof power);
  return p * power;
}

ECHO_INLINE float to_float(float x) { return x; }
ECHO_INLINE float to_float(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// 16 consecutive values as float32, and back (bf16: cpu_vector.h's rounding, as torch casts)
ECHO_INLINE v16 load16(const float* p) {
  v16 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
ECHO_INLINE v16 load16(const c10::BFloat16* p) {
  u16x16 half;
  std::memcpy(&half, p, sizeof half);
  const i32x16 bits = __builtin_convertvector(half, i32x16) << 16;
  v16 x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
ECHO_INLINE void store16(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }
ECHO_INLINE void store16(c10::BFloat16* p, v16 x) {
  u32x16 bits;
  std::memcpy(&bits, &x, sizeof bits);
  const u16x16 half = __builtin_convertvector(bfloat16_bits(bits), u16x16);
  std::memcpy(p, &half, sizeof half);
}

// One head of one sequence of `length` <= 16 * kBlocks tokens; q, k, v rows `stride` elements apart.
template <typename T, int kBlocks>
ECHO_VECTOR_CLONES void attend(const T* q, const T* k, const T* v, T* out, int64_t length, int64_t stride,
                               int64_t out_stride, float scale) {
  v16 keys[kHeadDim][kBlocks];  // keys[c][b][l]: channel c of key 16 b + l (zero past the end)
  v16 values[16 * kBlocks][kHeadDim / 16];
  for (int64_t c = 0; c < kHeadDim; ++c)
    for (int b = 0; b < kBlocks; ++b) keys[c][b] = v16{};
  for (int64_t j = 0; j < length; ++j) {
    for (int64_t c = 0; c < kHeadDim; ++c) keys[c][j / 16][j % 16] = to_float(k[j * stride + c]);
    for (int r = 0; r < kHeadDim / 16; ++r) values[j][r] = load16(v + j * stride + 16 * r);
  }
  v16 past_end[kBlocks];
  for (int b = 0; b < kBlocks; ++b)
    for (int l = 0; l < 16; ++l) past_end[b][l] = 16 * b + l < length ? 0.f : -INFINITY;
  for (int64_t i = 0; i < length; ++i) {
    v16 query[kHeadDim / 16];
    for (int r = 0; r < kHeadDim / 16; ++r) query[r] = load16(q + i * stride + 16 * r) * scale;
    v16 partial[4][kBlocks] = {};
    for (int64_t c = 0; c < kHeadDim; c += 4)
      for (int u = 0; u < 4; ++u)
        for (int b = 0; b < kBlocks; ++b) partial[u][b] += query[(c + u) / 16][(c + u) % 16] * keys[c + u][b];
    v16 scores[kBlocks];
    float top = -INFINITY;
    for (int b = 0; b < kBlocks; ++b) {
      scores[b] = past_end[b] + ((partial[0][b] + partial[1][b]) + (partial[2][b] + partial[3][b]));
      top = std::max(top, lane_max(scores[b]));
    }
    float total = 0.f;
    for (int b = 0; b < kBlocks; ++b) {
      scores[b] = exp_nonpositive(scores[b] - top);
      total += lane_sum(scores[b]);
    }
    const float inverse = 1.f / total;
    v16 row[kHeadDim / 16] = {};
    for (int64_t j = 0; j < length; ++j) {
      const float weight = scores[j / 16][j % 16] * inverse;
      for (int r = 0; r < kHeadDim / 16; ++r) row[r] += weight * values[j][r];
    }
    for (int r = 0; r < kHeadDim / 16; ++r) store16(out + i * out_stride + 16 * r, row[r]);
  }
}

template <typename T>
void run(const at::Tensor& qkv, const int64_t* bounds, int64_t sequences, int64_t heads, int64_t longest,
         at::Tensor& out) {
  const int64_t dim = qkv.size(1) / 3;
  const float scale = 1.f / std::sqrt(static_cast<float>(kHeadDim));
  const auto kernel = longest <= 16 ? &attend<T, 1> : &attend<T, 2>;
  const T* in = qkv.data_ptr<T>();
  T* result = out.data_ptr<T>();
  // grain: enough (sequence, head) items per task to amortise the scheduling
  at::parallel_for(0, sequences * heads, 32, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / heads, h = item % heads, first = bounds[s];
      const T* q = in + first * 3 * dim + h * kHeadDim;
      kernel(q, q + dim, q + 2 * dim, result + first * dim + h * kHeadDim, bounds[s + 1] - first, 3 * dim, dim,
             scale);
    }
  });
}

at::Tensor short_attention_cpu(const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && heads > 0 && qkv.size(1) == 3 * heads * kHeadDim &&
                  (qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16),
              "short_attention: qkv must be a contiguous float32 or bfloat16 (total, 3 * heads * ", kHeadDim,
              ") tensor, got ", qkv.sizes(), " ", qkv.scalar_type(), " with heads=", heads);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 && cu_seqlens.is_cpu(),
              "short_attention: cu_seqlens must be a 1-D CPU tensor, got ", cu_seqlens.sizes());
  const at::Tensor bounds_tensor = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* bounds = bounds_tensor.data_ptr<int64_t>();
  const int64_t sequences = bounds_tensor.size(0) - 1;
  TORCH_CHECK(bounds[0] == 0 && bounds[sequences] == qkv.size(0), "short_attention: cu_seqlens must run from 0 to the ",
              qkv.size(0), " rows of qkv, got ", bounds[0], "..", bounds[sequences]);
  int64_t longest = 0;
  for (int64_t s = 0; s < sequences; ++s) {
    const int64_t length = bounds[s + 1] - bounds[s];
    TORCH_CHECK(length >= 1 && length <= kMaxTokens, "short_attention: sequences must have 1 to ", kMaxTokens,
                " tokens, sequence ", s, " has ", length);
    longest = std::max(longest, length);
  }
  at::Tensor out = at::empty({qkv.size(0), qkv.size(1) / 3}, qkv.options());
  if (qkv.scalar_type() == at::kFloat)
    run<float>(qkv, bounds, sequences, heads, longest, out);
  else
    run<c10::BFloat16>(qkv, bounds, sequences, heads, longest, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(echo, m) { m.def("short_attention(Tensor qkv, Tensor cu_seqlens, int heads) -> Tensor"); }

TORCH_LIBRARY_IMPL(echo, CPU, m) { m.impl("short_attention", &short_attention_cpu); }

}  // namespace echo
