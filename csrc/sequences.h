// What the attention kernels share: the offsets of packed sequences (cu_seqlens), checked once per call, and
// the split of a pass's (sequence, head) items among the threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace echo {

// cu_seqlens (of any integer type) as int64 offsets, after checking that `qkv` is a contiguous
// (total, 3 * heads * head_dim) tensor, that the offsets run from 0 to its rows and that every sequence has 1 to
// `max_tokens` tokens; `op` names the caller in the errors. The caller checks qkv's dtype.
inline at::Tensor checked_offsets(const char* op, const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t heads,
                                  int64_t head_dim, int64_t max_tokens) {
  // the width divided, not heads multiplied: 3 * heads * head_dim of a huge `heads` wraps around to the width
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && heads > 0 && qkv.size(1) % (3 * head_dim) == 0 &&
                  qkv.size(1) / (3 * head_dim) == heads,
              op, ": qkv must be a contiguous (total, 3 * heads * ", head_dim, ") tensor, got ", qkv.sizes(),
              " with heads=", heads);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 && cu_seqlens.is_cpu() &&
                  at::isIntegralType(cu_seqlens.scalar_type(), /*includeBool=*/false),
              op, ": cu_seqlens must be a 1-D CPU tensor of integers, got ", cu_seqlens.sizes(), " ",
              cu_seqlens.scalar_type());
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

// Runs run_range(begin, end) over the (sequence, head) items of a pass (item = sequence * heads + head), in
// contiguous ranges of about equal work, one per thread, an item of L tokens costing ~L (L + 16). Split by
// count, a pass whose one-token padding sequences trail its long ones gave one thread every long one: a 60 s
// signal's attention ran at one thread's speed. `grain`: items below which one thread takes the whole pass.
template <typename RunRange>
void parallel_over_items(const int64_t* bounds, int64_t sequences, int64_t heads, int64_t grain,
                         const RunRange& run_range) {
  const int64_t items = sequences * heads;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items / grain));
  const auto cost = [&](int64_t sequence) {
    const int64_t length = bounds[sequence + 1] - bounds[sequence];
    return length * (length + 16);
  };
  std::vector<int64_t> starts(tasks + 1, items);  // task t: items starts[t] .. starts[t + 1]
  starts[0] = 0;
  int64_t total = 0;
  for (int64_t s = 0; s < sequences; ++s) total += cost(s) * heads;
  int64_t done = 0, task = 1;
  for (int64_t item = 0; item < items && task < tasks; done += cost(item / heads), ++item)
    while (task < tasks && done * tasks >= task * total) starts[task++] = item;
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    if (starts[first] < starts[last]) run_range(starts[first], starts[last]);
  });
}

}  // namespace echo
