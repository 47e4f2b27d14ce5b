// short_attention: self-attention of many short packed sequences on the CPU (contract: echo/ops/attention.py,
// varlen_attention), for sequences of at most 128 tokens and head_dim 64: every ECHO sequence (one band of one
// segment: a CLS and at most 125 patches). torch's SDPA spends about as long on a short (sequence, head) as on
// one of 64 tokens: a fifth of a bf16 encode of short clips went there.
//
// One work item is one (sequence, head). Queries lie in vector lanes (Q transposed by in-register shuffles), so
// a key's scores against 16 queries are one vector and the softmax over keys is vertical arithmetic; key
// values are broadcast from memory into the FMAs, four keys at a time so the sums do not wait on each other.
// The weighted sum of the value rows then takes the queries four at a time. A sequence of more than 64 tokens
// runs its queries in two chunks against all its keys. Inputs and output are float32 or bfloat16; all
// arithmetic is float32. Scores more than 87 below the row maximum get weight exactly 0: a weight of ~1e-38
// would be a subnormal product, which costs the CPU a microcode assist per vector (that alone made an earlier
// version of this kernel 2x slower).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_vector.h"
#include "sequences.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <utility>

namespace echo {
namespace {

constexpr int64_t kHeadDim = 64;
constexpr int64_t kMaxTokens = 128;
constexpr int kMaxQueryBlocks = 4;  // 16-query blocks per chunk (64 queries): arrays as large as a 64-token sequence's
constexpr int kQueries = 4;         // queries per pass over the value rows

// One chunk of `count` <= 16 * kQueryBlocks queries (rows `stride` elements apart) against all `length` keys
// of their sequence. Queries lie in vector lanes (Q transposed), so the softmax over the keys of every query
// is vertical arithmetic on whole vectors; keys and values keep their row layout and are broadcast.
template <typename T, int kKeyBlocks, int kQueryBlocks>
ECHO_INLINE void attend_chunk(const T* q, const float (*keys)[kHeadDim], const v16 (*values)[kHeadDim / 16], T* out,
                              int64_t count, int64_t length, int64_t stride, int64_t out_stride, float scale) {
  v16 queries[kHeadDim][kQueryBlocks];  // queries[c][b][l]: channel c of query 16 b + l (zero past the end)
  for (int b = 0; b < kQueryBlocks; ++b)
    for (int r = 0; r < kHeadDim / 16; ++r) {
      v16 block[16];
      for (int l = 0; l < 16; ++l)
        block[l] = 16 * b + l < count ? load16(q + (16 * b + l) * stride + 16 * r) * scale : v16{};
      transpose16(block);
      for (int l = 0; l < 16; ++l) queries[16 * r + l][b] = block[l];
    }
  // scores[j][b][l]: query 16 b + l against key j, four keys at a time (independent sums for the FMA units)
  v16 scores[16 * kKeyBlocks][kQueryBlocks];
  for (int64_t j0 = 0; j0 < length; j0 += 4) {
    const int64_t keys_here = std::min<int64_t>(4, length - j0);
    constexpr int kSplit = kQueryBlocks <= 2 ? 2 : 1;  // independent sums per key: 8 to 16 in flight, no spills
    v16 sum[4][kSplit][kQueryBlocks] = {};
    for (int c = 0; c < kHeadDim; c += kSplit)
      for (int h = 0; h < kSplit; ++h)
        for (int b = 0; b < kQueryBlocks; ++b) {
          const v16 query = queries[c + h][b];
          for (int t = 0; t < 4; ++t) sum[t][h][b] += keys[j0 + t][c + h] * query;
        }
    for (int t = 0; t < keys_here; ++t)
      for (int b = 0; b < kQueryBlocks; ++b) {
        scores[j0 + t][b] = sum[t][0][b];
        for (int h = 1; h < kSplit; ++h) scores[j0 + t][b] += sum[t][h][b];
      }
  }
  alignas(64) float weights[16 * kKeyBlocks][16 * kQueryBlocks];  // weights[j][i]: of key j for query i
  for (int b = 0; b < kQueryBlocks; ++b) {
    v16 top = scores[0][b];
    for (int64_t j = 1; j < length; ++j) top = top > scores[j][b] ? top : scores[j][b];
    v16 total{};
    for (int64_t j = 0; j < length; ++j) {
      scores[j][b] = exp_nonpositive(scores[j][b] - top);
      total += scores[j][b];
    }
    const v16 inverse = 1.f / total;
    for (int64_t j = 0; j < length; ++j) store16(weights[j] + 16 * b, scores[j][b] * inverse);
  }
  for (int64_t first = 0; first < count; first += kQueries) {
    const int64_t rows_here = std::min<int64_t>(kQueries, count - first);
    v16 row[kQueries][kHeadDim / 16] = {};
    for (int64_t j = 0; j < length; ++j)
      for (int r = 0; r < kHeadDim / 16; ++r) {
        const v16 value = values[j][r];
        for (int u = 0; u < kQueries; ++u) row[u][r] += weights[j][first + u] * value;
      }
    for (int u = 0; u < rows_here; ++u)
      for (int r = 0; r < kHeadDim / 16; ++r) store16(out + (first + u) * out_stride + 16 * r, row[u][r]);
  }
}

// One head of one sequence of `length` <= 16 * kKeyBlocks tokens; q, k, v rows `stride` elements apart. Keys
// and values are read once; the queries go in chunks of 64 (a sequence of 65-128 tokens: 64, then the rest).
template <typename T, int kKeyBlocks>
ECHO_VECTOR_CLONES void attend(const T* q, const T* k, const T* v, T* out, int64_t length, int64_t stride,
                               int64_t out_stride, float scale) {
  alignas(64) float keys[16 * kKeyBlocks][kHeadDim];
  v16 values[16 * kKeyBlocks][kHeadDim / 16];
  for (int64_t j = 0; j < length; ++j)
    for (int r = 0; r < kHeadDim / 16; ++r) {
      store16(keys[j] + 16 * r, load16(k + j * stride + 16 * r));
      values[j][r] = load16(v + j * stride + 16 * r);
    }
  for (int64_t j = length; j < (length + 3) / 4 * 4; ++j)
    for (int r = 0; r < kHeadDim / 16; ++r) store16(keys[j] + 16 * r, v16{});
  if constexpr (kKeyBlocks <= kMaxQueryBlocks) {
    attend_chunk<T, kKeyBlocks, kKeyBlocks>(q, keys, values, out, length, length, stride, out_stride, scale);
  } else {
    constexpr int64_t kChunk = 16 * kMaxQueryBlocks;
    attend_chunk<T, kKeyBlocks, kMaxQueryBlocks>(q, keys, values, out, kChunk, length, stride, out_stride, scale);
    attend_chunk<T, kKeyBlocks, kKeyBlocks - kMaxQueryBlocks>(q + kChunk * stride, keys, values,
                                                                out + kChunk * out_stride, length - kChunk, length,
                                                                stride, out_stride, scale);
  }
}

template <typename T>
void run(const at::Tensor& qkv, const int64_t* bounds, int64_t sequences, int64_t heads, at::Tensor& out) {
  const int64_t dim = qkv.size(1) / 3;
  const float scale = 1.f / std::sqrt(static_cast<float>(kHeadDim));
  const T* in = qkv.data_ptr<T>();
  T* result = out.data_ptr<T>();
  // the kernel of each 16-token width, chosen per sequence
  constexpr decltype(&attend<T, 1>) kernels[] = {&attend<T, 1>, &attend<T, 2>, &attend<T, 3>, &attend<T, 4>,
                                                  &attend<T, 5>, &attend<T, 6>, &attend<T, 7>, &attend<T, 8>};
  static_assert(16 * std::size(kernels) == kMaxTokens);
  // grain: enough (sequence, head) items per thread to amortise the scheduling
  parallel_over_items(bounds, sequences, heads, 32, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / heads, h = item % heads, first = bounds[s], length = bounds[s + 1] - first;
      const T* q = in + first * 3 * dim + h * kHeadDim;
      kernels[(length - 1) / 16](q, q + dim, q + 2 * dim, result + first * dim + h * kHeadDim, length, 3 * dim, dim,
                                 scale);
    }
  });
}

at::Tensor short_attention_cpu(const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t heads) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16,
              "short_attention: qkv must be float32 or bfloat16, got ", qkv.scalar_type());
  const at::Tensor offsets = checked_offsets("short_attention", qkv, cu_seqlens, heads, kHeadDim, kMaxTokens);
  const int64_t* bounds = offsets.data_ptr<int64_t>();
  const int64_t sequences = offsets.size(0) - 1;
  at::Tensor out = at::empty({qkv.size(0), qkv.size(1) / 3}, qkv.options());
  if (qkv.scalar_type() == at::kFloat)
    run<float>(qkv, bounds, sequences, heads, out);
  else
    run<c10::BFloat16>(qkv, bounds, sequences, heads, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(echo, m) { m.def("short_attention(Tensor qkv, Tensor cu_seqlens, int heads) -> Tensor"); }

TORCH_LIBRARY_IMPL(echo, CPU, m) { m.impl("short_attention", &short_attention_cpu); }

}  // namespace echo
