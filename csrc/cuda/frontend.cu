// CUDA kernel of torch.ops.echo.ragged_spectrogram (contract: echo/ops/stft.py,
// ragged_spectrogram_reference; the CPU kernel and the op's schema are in ../frontend.cpp).
//
// Signals are grouped by (window, hop, bands): one group per distinct sample rate. Per group: 64 blocks per
// signal sum its samples (the DC, unless the caller gives it), one block per frame writes the windowed DC-free
// frame into a (frames, n_fft) buffer, cuFFT (through ATen) takes the real FFT of all frames at once, and a tiled transpose writes
// (ln|X| + eps + mean) / std straight into each signal's band image (bins x frames, zero rows inserted before
// the last band's real bins) in the flat output buffer. Frames, FFT and log run in double and only the result
// is rounded to float32, for the reason given in ../frontend.cpp (float32 FFT noise in near-silent bins).

#include <ATen/core/Tensor.h>
#include <ATen/ops/_fft_r2c.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../frontend.h"

#include <map>
#include <tuple>
#include <vector>

namespace echo {
namespace {

constexpr int kTile = 32;      // transpose tile: 32 frames x 32 rows
constexpr int kTileRows = 8;   // threads per tile column
constexpr int kThreads = 256;
constexpr int kSlices = 64;    // blocks per signal for its DC sum

// Per signal of a group: where its samples start, its first frame within the group, where its band image
// starts in the output, its frame count.
struct SignalRow {
  int64_t wave_start, group_frame, spec_offset, frames;
};

// grid: (signals, kSlices); each block adds its slice of a signal's samples to sums[signal] (double).
__global__ void signal_sums(const float* __restrict__ waves, const int64_t* __restrict__ wave_bounds,
                            double* __restrict__ sums) {
  __shared__ double partial[kThreads];
  const int64_t first = wave_bounds[2 * blockIdx.x], last = wave_bounds[2 * blockIdx.x + 1];
  const int64_t slice = (last - first + kSlices - 1) / kSlices;
  const int64_t begin = first + blockIdx.y * slice, end = min(last, begin + slice);
  double sum = 0;
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) sum += waves[k];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0 && begin < end) atomicAdd(sums + blockIdx.x, partial[0]);
}

// The signal (row of `rows`) holding group frame `frame`: the last row whose group_frame <= frame.
__device__ int find_signal(const SignalRow* rows, int count, int64_t frame) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (rows[mid].group_frame <= frame) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__global__ void window_frames(const float* __restrict__ waves, const SignalRow* __restrict__ rows, int count,
                              const int64_t* __restrict__ wave_bounds, const double* __restrict__ sums,
                              int64_t n_fft, int64_t hop, double* __restrict__ framed) {
  const int64_t frame = blockIdx.x;
  const int signal = find_signal(rows, count, frame);
  const float* start = waves + rows[signal].wave_start + (frame - rows[signal].group_frame) * hop;
  // The mean in double, as on the CPU (csrc/frontend.cpp says why).
  const double mean = sums[signal] / (wave_bounds[2 * signal + 1] - wave_bounds[2 * signal]);
  for (int64_t k = threadIdx.x; k < n_fft; k += blockDim.x) {
    const double window = 0.5 - 0.5 * cospi(2.0 * static_cast<double>(k) / static_cast<double>(n_fft));
    framed[frame * n_fft + k] = (start[k] - mean) * window;
  }
}

// grid: (group frames / 32, band rows / 32); block (32, 8). Reads spectrum rows (frame-major), writes band
// image rows (frame-contiguous) through a shared tile.
__global__ void log_band_layout(const double2* __restrict__ spectrum, const SignalRow* __restrict__ rows,
                                int count, int64_t total_frames, int64_t bins, int64_t bands, double log_eps,
                                double log_mean, double inv_std, float* __restrict__ out) {
  __shared__ float tile[kTile][kTile + 1];
  const int64_t frame0 = static_cast<int64_t>(blockIdx.x) * kTile, row0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t last_start = (bands - 1) * kBandBins, pad = bands * kBandBins - bins;
  for (int i = threadIdx.y; i < kTile; i += kTileRows) {  // read: threadIdx.x runs along rows (bins)
    const int64_t frame = frame0 + i, row = row0 + threadIdx.x;
    float value = 0.f;
    if (frame < total_frames && row < bands * kBandBins && (row < last_start || row >= last_start + pad)) {
      const double2 x = spectrum[frame * bins + (row < last_start ? row : row - pad)];
      value = static_cast<float>((log(hypot(x.x, x.y) + log_eps) + log_mean) * inv_std);
    }
    tile[i][threadIdx.x] = value;
  }
  __syncthreads();
  const int64_t frame = frame0 + threadIdx.x;  // write: threadIdx.x runs along frames
  if (frame >= total_frames) return;
  const SignalRow signal = rows[find_signal(rows, count, frame)];
  for (int i = threadIdx.y; i < kTile; i += kTileRows) {
    const int64_t row = row0 + i;
    if (row < bands * kBandBins)
      out[signal.spec_offset + row * signal.frames + (frame - signal.group_frame)] = tile[threadIdx.x][i];
  }
}

at::Tensor ragged_spectrogram_cuda(const at::Tensor& waves, const at::Tensor& wave_offsets,
                                   const at::Tensor& spec_offsets, const at::Tensor& signal_geometry,
                                   double log_eps, double log_mean, double log_std,
                                   const std::optional<at::Tensor>& means) {
  TORCH_CHECK(waves.is_cuda(), "ragged_spectrogram: waves must be a CUDA tensor here, got ", waves.device());
  check_spectrogram_inputs(waves, wave_offsets, spec_offsets, signal_geometry);
  const int64_t signals = signal_geometry.size(0);
  check_spectrogram_means(means, signals);
  const c10::cuda::CUDAGuard guard(waves.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor geometry_table = signal_geometry.contiguous();
  const int64_t* geometry = geometry_table.data_ptr<int64_t>();
  const int64_t* bounds = wave_offsets.data_ptr<int64_t>();
  const int64_t* spec_starts = spec_offsets.data_ptr<int64_t>();
  at::Tensor out = at::empty({spec_starts[signals]}, waves.options());

  std::map<std::tuple<int64_t, int64_t, int64_t>, std::vector<int64_t>> groups;  // (n_fft, hop, bands) -> signals
  for (int64_t i = 0; i < signals; ++i) {
    const int64_t n_fft = geometry[4 * i], hop = geometry[4 * i + 1], frames = geometry[4 * i + 2],
                  bands = geometry[4 * i + 3];
    if (frames > 0) groups[{n_fft, hop, bands}].push_back(i);
  }

  for (const auto& [key, members] : groups) {
    const auto [n_fft, hop, bands] = key;
    const int64_t bins = n_fft / 2 + 1;
    const int count = static_cast<int>(members.size());
    // One host table per group, copied once: rows (count x SignalRow) then sample bounds (count x 2).
    at::Tensor host = at::empty({count * 6}, geometry_table.options().pinned_memory(true));
    int64_t* table = host.data_ptr<int64_t>();
    int64_t group_frames = 0;
    for (int j = 0; j < count; ++j) {
      const int64_t i = members[j];
      table[4 * j] = bounds[i];
      table[4 * j + 1] = group_frames;
      table[4 * j + 2] = spec_starts[i];
      table[4 * j + 3] = geometry[4 * i + 2];
      table[4 * count + 2 * j] = bounds[i];
      table[4 * count + 2 * j + 1] = bounds[i + 1];
      group_frames += geometry[4 * i + 2];
    }
    const at::Tensor device_table = host.to(waves.device(), /*non_blocking=*/true);
    const auto* rows = reinterpret_cast<const SignalRow*>(device_table.data_ptr<int64_t>());
    const int64_t* sample_bounds = device_table.data_ptr<int64_t>() + 4 * count;

    at::Tensor sums;
    if (means) {  // given: each member's sum is its mean times its length, which window_frames divides again
      at::Tensor host_sums = at::empty({count}, means->options().pinned_memory(true));
      const double* given = means->data_ptr<double>();
      for (int j = 0; j < count; ++j) {
        const int64_t i = members[j];
        host_sums.data_ptr<double>()[j] = given[i] * static_cast<double>(bounds[i + 1] - bounds[i]);
      }
      sums = host_sums.to(waves.device(), /*non_blocking=*/true);
    } else {
      sums = at::zeros({count}, waves.options().dtype(at::kDouble));
      signal_sums<<<dim3(count, kSlices), kThreads, 0, stream>>>(waves.data_ptr<float>(), sample_bounds,
                                                                sums.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::Tensor framed = at::empty({group_frames, n_fft}, waves.options().dtype(at::kDouble));
    window_frames<<<static_cast<unsigned>(group_frames), kThreads, 0, stream>>>(
        waves.data_ptr<float>(), rows, count, sample_bounds, sums.data_ptr<double>(), n_fft, hop,
        framed.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const at::Tensor spectrum = at::_fft_r2c(framed, {1}, /*normalization=*/0, /*onesided=*/true).contiguous();
    const dim3 grid((group_frames + kTile - 1) / kTile, (bands * kBandBins + kTile - 1) / kTile);
    log_band_layout<<<grid, dim3(kTile, kTileRows), 0, stream>>>(
        reinterpret_cast<const double2*>(spectrum.data_ptr()), rows, count, group_frames, bins, bands, log_eps,
        log_mean, 1.0 / log_std, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(echo, CUDA, m) { m.impl("ragged_spectrogram", &ragged_spectrogram_cuda); }

}  // namespace echo
