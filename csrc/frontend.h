// What the CPU and CUDA kernels of ragged_spectrogram share: the check of where each signal's samples and band
// image lie, which both kernels then read and write unchecked. One check for both: the CUDA copy had drifted
// (it took negative frame counts).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace echo {

constexpr int64_t kBandBins = 32;

// waves a contiguous 1-D float32 tensor (its device is the caller's to check); wave_offsets rising within it;
// spec_offsets from 0, each signal's image (bands * 32 rows, frames columns) after the one before; the geometry
// (n_fft, hop, frames, bands) of each signal consistent: its frames within its samples, its n_fft / 2 + 1 bins
// in as many bands of 32 as they need (a band of padding only put the inserted zero rows past its image).
inline void check_spectrogram_inputs(const at::Tensor& waves, const at::Tensor& wave_offsets,
                                     const at::Tensor& spec_offsets, const at::Tensor& signal_geometry) {
  TORCH_CHECK(waves.dim() == 1 && waves.scalar_type() == at::kFloat && waves.is_contiguous(),
              "ragged_spectrogram: waves must be a contiguous 1-D float32 tensor, got ", waves.sizes(), " ",
              waves.scalar_type());
  TORCH_CHECK(signal_geometry.dim() == 2 && signal_geometry.size(1) == 4 && signal_geometry.is_cpu() &&
                  signal_geometry.scalar_type() == at::kLong,
              "ragged_spectrogram: signal_geometry must be a CPU int64 (signals, 4) tensor of "
              "(n_fft, hop, frames, bands), got ", signal_geometry.sizes());
  const int64_t signals = signal_geometry.size(0);
  for (const auto& offsets : {wave_offsets, spec_offsets}) {
    TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == signals + 1 && offsets.is_cpu() &&
                    offsets.scalar_type() == at::kLong && offsets.is_contiguous(),
                "ragged_spectrogram: offsets must be contiguous CPU int64 tensors of ", signals + 1,
                " entries, got ", offsets.sizes());
  }
  const at::Tensor geometry_table = signal_geometry.contiguous();  // held while `geometry` points into it
  const int64_t* geometry = geometry_table.data_ptr<int64_t>();
  const int64_t* bounds = wave_offsets.data_ptr<int64_t>();
  const int64_t* spec_bounds = spec_offsets.data_ptr<int64_t>();
  TORCH_CHECK(spec_bounds[0] == 0, "ragged_spectrogram: spec_offsets must start at 0, got ", spec_bounds[0]);
  for (int64_t i = 0; i < signals; ++i) {
    TORCH_CHECK(0 <= bounds[i] && bounds[i] <= bounds[i + 1] && bounds[i + 1] <= waves.numel(),
                "ragged_spectrogram: wave_offsets must rise within the ", waves.numel(), " samples of waves, signal ",
                i, " has ", bounds[i], "..", bounds[i + 1]);
    const int64_t n_fft = geometry[4 * i], hop = geometry[4 * i + 1], frames = geometry[4 * i + 2],
                  bands = geometry[4 * i + 3];
    const int64_t length = bounds[i + 1] - bounds[i];
    TORCH_CHECK(n_fft > 0 && hop > 0 && frames >= 0 && bands == (n_fft / 2 + 1 + kBandBins - 1) / kBandBins,
                "ragged_spectrogram: signal ", i, " has inconsistent geometry n_fft=", n_fft, " hop=", hop,
                " frames=", frames, " bands=", bands);
    TORCH_CHECK(frames == 0 || (n_fft <= length && frames - 1 <= (length - n_fft) / hop),
                "ragged_spectrogram: signal ", i, " has ", length, " samples, too few for ", frames, " frames of ",
                n_fft, " with hop ", hop);
    TORCH_CHECK(spec_bounds[i + 1] - spec_bounds[i] == bands * kBandBins * frames, "ragged_spectrogram: signal ",
                i, " needs ", bands * kBandBins * frames, " spectrogram values but spec_offsets give ",
                spec_bounds[i + 1] - spec_bounds[i]);
  }
}

// The DC to remove from each signal, when the caller gives it: a span of frames of a longer signal takes the
// whole signal's mean (the spec's DC removal), not the span's. One float64 per signal, on the CPU.
inline void check_spectrogram_means(const std::optional<at::Tensor>& means, int64_t signals) {
  if (!means) return;
  TORCH_CHECK(means->dim() == 1 && means->size(0) == signals && means->is_cpu() &&
                  means->scalar_type() == at::kDouble && means->is_contiguous(),
              "ragged_spectrogram: means must be a contiguous CPU float64 tensor of ", signals, " entries, got ",
              means->sizes(), " ", means->scalar_type(), " on ", means->device());
}

}  // namespace echo
