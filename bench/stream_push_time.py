"""Time of each StreamEncoder.push in a long stream of small pushes (one hop each, or --samples each): it should
not grow with the position in the stream (a push copies only its own frames).

    python bench/stream_push_time.py [--rate 48000] [--frames 6000] [--size tiny] [--samples N]

Prints the median push time per 500-push stretch of the stream (pushes that emitted a segment left out), one
torch thread, random weights. `--samples 1 --frames 100`: the fixed cost of a push.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import echo
import echo.fast as fast
from _shared import positive_int, sample_rate
from echo import geometry

STRETCH = 500


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=sample_rate, default=48000)
    parser.add_argument("--frames", type=positive_int, default=6000)
    parser.add_argument("--size", choices=list(echo.PRESETS), default="tiny")
    parser.add_argument("--samples", type=positive_int, default=None, help="samples a push (default: one hop)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = echo.EchoModel(echo.EchoConfig.preset(args.size)).eval()
    hop, n_fft = geometry.hop(args.rate), geometry.n_fft(args.rate)
    size = args.samples or hop
    signal = torch.randn(n_fft + args.frames * hop)
    stream = fast.StreamEncoder(model, args.rate)
    stream.push(signal[:n_fft])
    times = []
    for start in range(n_fft, len(signal), size):
        began = time.perf_counter()
        emitted = stream.push(signal[start : start + size])
        times.append(None if emitted else time.perf_counter() - began)
    print(f"ECHO-{args.size}, {args.rate} Hz, {size} samples a push (a hop is {hop}), 1 thread: median ms a push")
    for first in range(0, len(times), STRETCH):
        kept = [t for t in times[first : first + STRETCH] if t is not None]
        median = f"{1e3 * statistics.median(kept):.3f}" if kept else "- (every push emitted a segment)"
        print(f"  pushes {first:7d}-{min(first + STRETCH, len(times)):7d}: {median}")


if __name__ == "__main__":
    main()
