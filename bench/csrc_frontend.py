"""The compiled front end (torch.ops.echo.ragged_spectrogram, csrc/) against the batched torch path (and
Triton on CUDA), on the encode benchmark's workloads. Prints median milliseconds per backend and the ratio
torch / csrc (> 1: the compiled op is faster), after checking every backend against the float64 reference.
Run: PYTHONPATH=. python bench/csrc_frontend.py [--device cuda] [--threads 1 2 16] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from encode_throughput import WORKLOADS, workload  # bench/encode_throughput.py: the encode benchmark's inputs
from echo import extension
from echo.ops import backend as backends
from echo.ops import stft as stft_ops
from echo.plan import make_plan


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up (FFT plans, allocator, kernel compilation)
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, nargs="*", default=[torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    reason = extension.why_unavailable("ragged_spectrogram", device)
    if reason:
        print(f"skipped: {reason}")
        return 0
    names = ["torch", "csrc"] + (["triton"] if backends.triton_available(device) else [])
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}")
    print(f"| workload | audio s | threads | {' | '.join(f'{b} ms' for b in names)} | torch / csrc |")
    print(f"| --- | ---: | ---: |{' ---: |' * len(names)} ---: |")
    for key, description in WORKLOADS.items():
        signals, rates = workload(key)
        lengths = [len(signal) for signal in signals]
        label = f"{key} {description}"
        plan = make_plan(lengths, rates)
        waves = torch.cat(signals).double()
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
        truth = stft_ops.ragged_spectrogram_torch(waves, offsets, plan)
        waves = waves.float().to(device)
        for threads in args.threads:
            torch.set_num_threads(threads)
            run = {b: (lambda b=b: stft_ops.ragged_spectrogram(waves, offsets, plan, backend=b)) for b in names}
            for backend, fn in run.items():
                error = ((fn().cpu().double() - truth).norm() / truth.norm()).item()
                if error > 1e-5:
                    print(f"{label}: {backend} differs from the float64 result, relative error {error:.2e}")
                    return 1
            ms = {b: 1e3 * median_seconds(fn, args.repeats, device) for b, fn in run.items()}
            seconds = sum(n / sr for n, sr in zip(lengths, rates))
            cells = " | ".join(f"{ms[b]:.2f}" for b in names)
            print(f"| {label} | {seconds:.0f} | {threads} | {cells} | {ms['torch'] / ms['csrc']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
