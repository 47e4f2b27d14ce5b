"""The front end's backends on the encode benchmark's workloads: the per-signal reference, the batched torch
path, the compiled op (torch.ops.echo.ragged_spectrogram, csrc/) where built, and Triton on CUDA. Prints median
milliseconds per backend and the ratios reference / torch and torch / csrc (> 1: the second is faster), after
checking every backend against the float64 result.
Run: python bench/csrc_frontend.py [--device cuda] [--threads 1 2 16] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from _shared import device_option
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
    parser.add_argument("--device", type=device_option, default="cpu")
    parser.add_argument("--threads", type=int, nargs="*", default=[torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.repeats < 1 or not args.threads or min(args.threads) < 1:  # else a median of no times, a torch error
        parser.error("--repeats and every --threads must be at least 1")
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    reason = extension.why_unavailable("ragged_spectrogram", device)
    if reason:
        print(f"the compiled front end is not timed: {reason}")
    names = (["reference", "torch"] + ([] if reason else ["csrc"])
             + (["triton"] if backends.triton_available(device) else []))
    ratios = {"reference / torch": ("reference", "torch")} | ({} if reason else {"torch / csrc": ("torch", "csrc")})
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}")
    print(f"| workload | audio s | threads | {' | '.join(f'{b} ms' for b in names)} | {' | '.join(ratios)} |")
    print(f"| --- | ---: | ---: |{' ---: |' * (len(names) + len(ratios))}")
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
            cells = " | ".join([f"{ms[b]:.2f}" for b in names] + [f"{ms[a] / ms[b]:.2f}" for a, b in ratios.values()])
            print(f"| {label} | {seconds:.0f} | {threads} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
