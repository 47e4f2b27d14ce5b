"""Ragged front end (DC removal + STFT magnitude + log/normalise + band layout) on W1 / W2:
the compiled CUDA op (echo._C, csrc/cuda/frontend.cu) vs Triton DFT-as-GEMM vs torch rFFT grouped by rate vs the
per-signal reference (torch.stft).

    pytest bench/benchmark_stft.py --benchmark-only -s -rs
"""
import pytest
import torch

from echo import extension, geometry
from echo.ops import stft as stft_ops

from .conftest import NO_GPU, ragged_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


def costs(plan) -> tuple[float, float]:
    """Bytes a perfect kernel moves (each sample read once, each output written once, fp32) and the FLOPs of
    the DFT as two real matrix products (cos and sin) over the real bins."""
    samples = sum(plan.lengths)
    flops = sum(
        2 * 2 * geometry.n_fft(sr) * geometry.n_bins(sr) * frames for sr, frames in zip(plan.sample_rates, plan.frames)
    )
    return 4 * (samples + int(plan.spec_offsets[-1])), flops


def compiled_op_skip_reason() -> str | None:
    """Why the compiled op is not timed here, or None: it needs a CUDA device and an echo._C built with its CUDA
    kernel (a CPU-only build has none, and backend="csrc" on CUDA tensors would be refused)."""
    if not torch.cuda.is_available():
        return NO_GPU
    return extension.why_unavailable("ragged_spectrogram", "cuda")


@pytest.mark.parametrize("workload", ["W1", "W2"])
@pytest.mark.parametrize("backend", ["csrc", "triton", "torch", "reference"])
def test_ragged_spectrogram(benchmark, measure, workload, backend):
    if backend == "csrc" and (reason := compiled_op_skip_reason()):
        pytest.skip(reason)
    waves, offsets, plan = ragged_inputs(workload)
    benchmark.group = f"stft {workload}"
    bytes_moved, flops = costs(plan)
    measure(lambda: stft_ops.ragged_spectrogram(waves, offsets, plan, backend), bytes_moved, flops,
            label=f"stft {workload} {backend}")
