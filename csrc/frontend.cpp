// echo._C: the compiled ops of echo, registered with the torch dispatcher as torch.ops.echo.*.
//
// ragged_spectrogram: the whole front end of a call (contract: echo/ops/stft.py,
// ragged_spectrogram_reference) for all signals at once, on the CPU. The signals' frames are cut into
// chunks; each thread takes whole chunks and runs DC removal + framing + periodic Hann, a real FFT (ATen's,
// so MKL or pocketfft), magnitude, log + normalise on a chunk that stays in cache, then writes it straight
// into its signal's band image in the flat output buffer. The CUDA version lives in cuda/frontend.cu.
//
// All of it runs in double, like the reference, and only the result is rounded to float32. A float32 FFT's
// error is relative to the whole frame, so a bin far below the frame's energy (every bin but the first of a
// silent stretch after DC removal, common in real recordings) gets float32 rounding noise above the log's
// 1e-9 floor, and the log magnifies it: the bundled samples' embeddings moved by up to 5e-4.
//
// Geometry is not derived here: echo/geometry.py computes n_fft, hop, frames and bands per signal and the
// caller passes them in `signal_geometry`.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fft_r2c.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "frontend.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

namespace echo {
namespace {

// Frames per work item: 64 (~100 KB of spectrum at 16 kHz, in L2), fewer where 64 windows exceed kChunkSamples:
// at 1 MHz, 64 frames were 13 MB of frames and 13 MB of spectrum per thread, which glibc kept after the call.
constexpr int64_t kChunkFrames = 64;
constexpr int64_t kChunkSamples = 64 * 2400;  // 64 windows at 96 kHz

struct Chunk {
  int64_t signal, first_frame, frames;
};

// Periodic Hann window of each distinct n_fft, like torch.hann_window's definition.
std::map<int64_t, std::vector<double>> hann_windows(const int64_t* geometry, int64_t signals) {
  std::map<int64_t, std::vector<double>> windows;
  for (int64_t i = 0; i < signals; ++i) {
    const int64_t n = geometry[4 * i];
    if (windows.count(n)) continue;
    std::vector<double> w(n);
    for (int64_t k = 0; k < n; ++k) w[k] = 0.5 - 0.5 * std::cos(2.0 * M_PI * k / n);
    windows.emplace(n, std::move(w));
  }
  return windows;
}

at::Tensor ragged_spectrogram_cpu(const at::Tensor& waves, const at::Tensor& wave_offsets,
                                  const at::Tensor& spec_offsets, const at::Tensor& signal_geometry,
                                  double log_eps, double log_mean, double log_std,
                                  const std::optional<at::Tensor>& given_means) {
  check_spectrogram_inputs(waves, wave_offsets, spec_offsets, signal_geometry);
  check_spectrogram_means(given_means, signal_geometry.size(0));
  const at::Tensor geometry_table = signal_geometry.contiguous();
  const int64_t* geometry = geometry_table.data_ptr<int64_t>();
  const int64_t* bounds = wave_offsets.data_ptr<int64_t>();
  const int64_t* spec_bounds = spec_offsets.data_ptr<int64_t>();
  const int64_t signals = signal_geometry.size(0);
  const float* x = waves.data_ptr<float>();
  at::Tensor out = at::empty({spec_bounds[signals]}, waves.options());
  float* y = out.data_ptr<float>();

  // DC of each signal, summed in double like the reference, unless given.
  std::vector<double> means(signals);
  if (given_means) {
    std::copy_n(given_means->data_ptr<double>(), signals, means.begin());
  } else {
    at::parallel_for(0, signals, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double sum = 0;
        for (int64_t k = bounds[i]; k < bounds[i + 1]; ++k) sum += x[k];
        const int64_t length = bounds[i + 1] - bounds[i];
        means[i] = length ? sum / length : 0.0;
      }
    });
  }

  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < signals; ++i) {
    const int64_t step = std::clamp<int64_t>(kChunkSamples / geometry[4 * i], 1, kChunkFrames);
    for (int64_t t = 0; t < geometry[4 * i + 2]; t += step)
      chunks.push_back({i, t, std::min(step, geometry[4 * i + 2] - t)});
  }
  const auto windows = hann_windows(geometry, signals);
  const double inv_std = 1.0 / log_std;

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& chunk = chunks[c];
      const int64_t* g = geometry + 4 * chunk.signal;
      const int64_t n_fft = g[0], hop = g[1], total_frames = g[2], bands = g[3];
      const double* window = windows.at(n_fft).data();
      const double mean = means[chunk.signal];

      at::Tensor framed = at::empty({chunk.frames, n_fft}, waves.options().dtype(at::kDouble));
      double* f = framed.data_ptr<double>();
      const float* start = x + bounds[chunk.signal] + chunk.first_frame * hop;
      for (int64_t t = 0; t < chunk.frames; ++t)
        for (int64_t k = 0; k < n_fft; ++k) f[t * n_fft + k] = (start[t * hop + k] - mean) * window[k];

      // |rfft| -> (ln(m + eps) + mean) / std, vectorised by ATen on the in-cache chunk.
      at::Tensor spec = at::_fft_r2c(framed, {1}, /*normalization=*/0, /*onesided=*/true).abs();
      spec.add_(log_eps).log_().add_(log_mean).mul_(inv_std);
      const double* s = spec.data_ptr<double>();

      // Band layout: bin b goes to row b before the last band, to row b + pad inside it; pad rows are zero.
      const int64_t bins = n_fft / 2 + 1;
      const int64_t last_start = (bands - 1) * kBandBins;
      const int64_t pad = bands * kBandBins - bins;
      float* image = y + spec_bounds[chunk.signal] + chunk.first_frame;
      for (int64_t row = last_start; row < last_start + pad; ++row)
        std::fill_n(image + row * total_frames, chunk.frames, 0.f);
      for (int64_t b = 0; b < bins; ++b) {
        float* dst = image + (b < last_start ? b : b + pad) * total_frames;
        for (int64_t t = 0; t < chunk.frames; ++t) dst[t] = static_cast<float>(s[t * bins + b]);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(echo, m) {
  m.def(
      "ragged_spectrogram(Tensor waves, Tensor wave_offsets, Tensor spec_offsets, Tensor signal_geometry, "
      "float log_eps, float log_mean, float log_std, Tensor? means=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(echo, CPU, m) { m.impl("ragged_spectrogram", &ragged_spectrogram_cpu); }

}  // namespace echo

// An importable module whose only job is to run the registrations above when Python imports echo._C.
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "echo's compiled ops (torch.ops.echo)", -1,
                                    nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
