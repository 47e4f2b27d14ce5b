// short_attention: self-attention of many short packed sequences on the CPU (contract: echo/ops/attention.py,
// varlen_attention), for sequences of at most 64 tokens and head_dim 64. A clip of up to ten seconds gives ECHO
// sequences of 2-64 tokens (one band of one segment), and torch's SDPA spends about as long on such a
// (sequence, head) as on one of 64 tokens: a fifth of a bf16 encode of short clips went there.
//
// One work item is one (sequence, head). Queries lie in vector lanes (Q transposed by in-register shuffles), so
// a key's scores against 16 queries are one vector and the softmax over keys is vertical arithmetic; key
// values are broadcast from memory into the FMAs, four keys at a time so the sums do not wait on each other.
// The weighted sum of the value rows then takes the queries four at a time. Inputs and output are float32 or
// bfloat16; all arithmetic is float32. Scores more than 87 below the row maximum get weight exactly 0: a weight
// of ~1e-38 would be a subnormal product, which costs the CPU a microcode assist per vector (that alone made
// an earlier version of this kernel 2x slower).

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
constexpr int64_t kMaxTokens = 64;
constexpr int kQueries = 4;  // queries per pass over the value rows

// One head of one sequence of `length` <= 16 * kBlocks tokens; q, k, v rows `stride` elements apart.
// Queries lie in vector lanes (Q transposed), so the softmax over the keys of every query is vertical
// arithmetic on whole vectors; keys and values keep their row layout and are broadcast from memory.
template <typename T, int kBlocks>
ECHO_VECTOR_CLONES void attend(const T* q, const T* k, const T* v, T* out, int64_t length, int64_t stride,
                               int64_t out_stride, float scale) {
  v16 queries[kHeadDim][kBlocks];  // queries[c][b][l]: channel c of query 16 b + l (zero past the end)
  alignas(64) float keys[16 * kBlocks][kHeadDim];
  v16 values[16 * kBlocks][kHeadDim / 16];
  for (int b = 0; b < kBlocks; ++b)
    for (int r = 0; r < kHeadDim / 16; ++r) {
      v16 block[16];
      for (int l = 0; l < 16; ++l)
        block[l] = 16 * b + l < length ? load16(q + (16 * b + l) * stride + 16 * r) * scale : v16{};
      transpose16(block);
      for (int l = 0; l < 16; ++l) queries[16 * r + l][b] = block[l];
    }
  for (int64_t j = 0; j < length; ++j)
    for (int r = 0; r < kHeadDim / 16; ++r) {
      store16(keys[j] + 16 * r, load16(k + j * stride + 16 * r));
      values[j][r] = load16(v + j * stride + 16 * r);
    }
  for (int64_t j = length; j < (length + 3) / 4 * 4; ++j)
    for (int r = 0; r < kHeadDim / 16; ++r) store16(keys[j] + 16 * r, v16{});
  // scores[j][b][l]: query 16 b + l against key j, four keys at a time (independent sums for the FMA units)
  v16 scores[16 * kBlocks][kBlocks];
  for (int64_t j0 = 0; j0 < length; j0 += 4) {
    const int64_t count = std::min<int64_t>(4, length - j0);
    constexpr int kSplit = kBlocks <= 2 ? 2 : 1;  // independent sums per key: 8 to 16 in flight, no spills
    v16 sum[4][kSplit][kBlocks] = {};
    for (int c = 0; c < kHeadDim; c += kSplit)
      for (int h = 0; h < kSplit; ++h)
        for (int b = 0; b < kBlocks; ++b) {
          const v16 query = queries[c + h][b];
          for (int t = 0; t < 4; ++t) sum[t][h][b] += keys[j0 + t][c + h] * query;
        }
    for (int t = 0; t < count; ++t)
      for (int b = 0; b < kBlocks; ++b) {
        scores[j0 + t][b] = sum[t][0][b];
        for (int h = 1; h < kSplit; ++h) scores[j0 + t][b] += sum[t][h][b];
      }
  }
  alignas(64) float weights[16 * kBlocks][16 * kBlocks];  // weights[j][i]: of key j for query i
  for (int b = 0; b < kBlocks; ++b) {
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
  for (int64_t first = 0; first < length; first += kQueries) {
    const int64_t count = std::min<int64_t>(kQueries, length - first);
    v16 row[kQueries][kHeadDim / 16] = {};
    for (int64_t j = 0; j < length; ++j)
      for (int r = 0; r < kHeadDim / 16; ++r) {
        const v16 value = values[j][r];
        for (int u = 0; u < kQueries; ++u) row[u][r] += weights[j][first + u] * value;
      }
    for (int u = 0; u < count; ++u)
      for (int r = 0; r < kHeadDim / 16; ++r) store16(out + (first + u) * out_stride + 16 * r, row[u][r]);
  }
}

template <typename T>
void run(const at::Tensor& qkv, const int64_t* bounds, int64_t sequences, int64_t heads, at::Tensor& out) {
  const int64_t dim = qkv.size(1) / 3;
  const float scale = 1.f / std::sqrt(static_cast<float>(kHeadDim));
  const T* in = qkv.data_ptr<T>();
  T* result = out.data_ptr<T>();
  // the kernel of each 16-token width, chosen per sequence
  constexpr decltype(&attend<T, 1>) kernels[] = {&attend<T, 1>, &attend<T, 2>, &attend<T, 3>, &attend<T, 4>};
  static_assert(16 * std::size(kernels) == kMaxTokens);
  // grain: enough (sequence, head) items per task to amortise the scheduling
  at::parallel_for(0, sequences * heads, 32, [&](int64_t begin, int64_t end) {
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
