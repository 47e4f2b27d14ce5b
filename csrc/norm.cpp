// residual_layer_norm: LayerNorm(x + residual) of the post-norm layer on the CPU in one pass over memory
// (contract: echo/ops/norm.py, residual_layer_norm), with bf16_copy also writing the result's bf16 copy that
// the next bf16 matrix product reads (else the second output is empty). Eagerly the add, the norm and the
// cast are three passes over a (tokens, D) buffer.
// x and the result are float32, the residual float32 or bfloat16; mean and variance in float32, two passes
// over the row (which stays in L1). Vectorised for the CPU it runs on (function multiversioning).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_vector.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace echo {
namespace {

template <typename R, bool kLowCopy>
ECHO_VECTOR_CLONES void norm_rows(const float* __restrict__ x, const R* __restrict__ residual,
                                  const float* __restrict__ weight, const float* __restrict__ bias, float eps,
                                  int64_t dim, int64_t begin, int64_t end, float* __restrict__ out,
                                  uint16_t* __restrict__ out_low, float* __restrict__ sum) {
  for (int64_t row = begin; row < end; ++row) {
    const float* xr = x + row * dim;
    const R* rr = residual + row * dim;
    float mean = 0.f;
#pragma omp simd reduction(+ : mean)
    for (int64_t c = 0; c < dim; ++c) {
      sum[c] = xr[c] + static_cast<float>(rr[c]);
      mean += sum[c];
    }
    mean /= static_cast<float>(dim);
    float variance = 0.f;
#pragma omp simd reduction(+ : variance)
    for (int64_t c = 0; c < dim; ++c) variance += (sum[c] - mean) * (sum[c] - mean);
    const float inverse = 1.f / std::sqrt(variance / static_cast<float>(dim) + eps);
    float* o = out + row * dim;
    uint16_t* low = kLowCopy ? out_low + row * dim : nullptr;
#pragma omp simd
    for (int64_t c = 0; c < dim; ++c) {
      o[c] = (sum[c] - mean) * inverse * weight[c] + bias[c];
      if constexpr (kLowCopy) {
        uint32_t bits;
        std::memcpy(&bits, &o[c], sizeof bits);
        low[c] = static_cast<uint16_t>(bfloat16_bits(bits));
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> residual_layer_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                           const at::Tensor& weight, const at::Tensor& bias,
                                                           double eps, bool bf16_copy) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "residual_layer_norm: x must be a contiguous (tokens, D) float32 tensor, got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.is_contiguous() &&
                  (residual.scalar_type() == at::kFloat || residual.scalar_type() == at::kBFloat16),
              "residual_layer_norm: residual must be a contiguous float32 or bfloat16 tensor shaped like x, got ",
              residual.sizes(), " ", residual.scalar_type());
  const int64_t tokens = x.size(0), dim = x.size(1);
  for (const auto& parameter : {weight, bias})
    TORCH_CHECK(parameter.dim() == 1 && parameter.size(0) == dim && parameter.scalar_type() == at::kFloat &&
                    parameter.is_contiguous(),
                "residual_layer_norm: weight and bias must be contiguous float32 (", dim, ",), got ",
                parameter.sizes(), " ", parameter.scalar_type());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor out_low = at::empty(bf16_copy ? x.sizes() : at::IntArrayRef{0}, x.options().dtype(at::kBFloat16));
  const auto run = [&](auto* residual_data, auto low_copy) {
    // grain: rows per task, enough to amortise the scheduling (a row is ~1.5 KB in, 2.3 KB out)
    at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> sum(dim);
      norm_rows<std::remove_const_t<std::remove_pointer_t<decltype(residual_data)>>, decltype(low_copy)::value>(
          x.data_ptr<float>(), residual_data, weight.data_ptr<float>(), bias.data_ptr<float>(),
          static_cast<float>(eps), dim, begin, end, out.data_ptr<float>(),
          reinterpret_cast<uint16_t*>(out_low.data_ptr<c10::BFloat16>()), sum.data());
    });
  };
  const auto with_copy = [&](auto low_copy) {
    if (residual.scalar_type() == at::kFloat)
      run(residual.data_ptr<float>(), low_copy);
    else
      run(residual.data_ptr<c10::BFloat16>(), low_copy);
  };
  if (bf16_copy)
    with_copy(std::true_type{});
  else
    with_copy(std::false_type{});
  return {out, out_low};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(echo, m) {
  m.def(
      "residual_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps, bool bf16_copy) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(echo, CPU, m) { m.impl("residual_layer_norm", &residual_layer_norm_cpu); }

}  // namespace echo
