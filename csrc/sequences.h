// What the attention kernels share: the offsets of packed sequences (cu_seqlens), checked once per call.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace echo {

// cu_seqlens as int64 offsets, after checking that `qkv` is a contiguous (total, 3 * heads * head_dim) tensor,
// that the offsets run from 0 to its rows and that every sequence has 1 to `max_tokens` tokens; `op` names the
// caller in the errors. The caller checks the dtype.
inline at::Tensor checked_offsets(const char* op, const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t heads,
                                  int64_t head_dim, int64_t max_tokens) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && heads > 0 && qkv.size(1) == 3 * heads * head_dim, op,
              ": qkv must be a contiguous (total, 3 * heads * ", head_dim, ") tensor, got ", qkv.sizes(),
              " with heads=", heads);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 && cu_seqlens.is_cpu(), op,
              ": cu_seqlens must be a 1-D CPU tensor, got ", cu_seqlens.sizes());
  at::Tensor offsets = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* bounds = offsets.data_ptr<int64_t>();
  const int64_t sequences = offsets.size(0) - 1;
  TORCH_CHECK(bounds[0] == 0 && bounds[sequences] == qkv.size(0), op, ": cu_seqlens must run from 0 to the ",
              qkv.size(0), " rows of qkv, got ", bounds[0], "..", bounds[sequences]);
  for (int64_t s = 0; s < sequences; ++s) {
    const int64_t length = bounds[s + 1] - bounds[s];
    TORCH_CHECK(length >= 1 && length <= max_tokens, op, ": sequences must have 1 to ", max_tokens,
                " tokens, sequence ", s, " has ", length);
  }
  return offsets;
}

}  // namespace echo
