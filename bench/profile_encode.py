"""Where the time of echo.fast.encode goes, by kind of work (torch.profiler, self CPU time per op).

    python bench/profile_encode.py --workload W1 --dtype bfloat16        # ECHO-small, CPU
    python bench/profile_encode.py --device cuda --python --utterances   # on a GPU: host against device time

On a GPU the table gives the host's time per kind of work and the device's busy time: where the GPU waits on
the host, `--python` lists the echo functions that take the host's time (cProfile, cumulative).

Categories: matrix products, attention, norms, GELU, front end (FFT, magnitude, log, compiled op), data
movement (copies, gathers, concatenation, casts), other ops, and Python/dispatch (wall time not spent in ops).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from encode_throughput import WORKLOADS, workload

CATEGORIES = {
    "matrix products": ("addmm", "aten::mm", "bmm", "matmul", "linear", "baddbmm"),
    # echo's compiled CPU kernels: short_attention (FMA) and tile_attention (AMX, bf16 from TILE_FROM tokens)
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "short_attention", "tile_attention"),
    "norms": ("layer_norm",),
    "GELU": ("gelu",),
    "front end": ("fft", "stft", "aten::abs", "aten::log", "ragged_spectrogram"),
    "data movement": ("copy_", "index", "aten::cat", "_to_copy", "aten::pad", "constant_pad", "fill_", "aten::stack"),
}


def category(name: str) -> str:
    return next((label for label, keys in CATEGORIES.items() if any(key in name for key in keys)), "other ops")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W1", choices=list(WORKLOADS))
    parser.add_argument("--size", default="small")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--python", action="store_true", help="also the echo functions by cumulative time")
    parser.add_argument("--utterances", action="store_true",
                        help="frames=False, what the encode and eval commands ask for (default: frames too)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: --device cuda needs a CUDA GPU")
        return 0
    import echo
    import echo.fast

    torch.manual_seed(0)
    model = echo.EchoModel(echo.EchoConfig.preset(args.size)).eval().to(args.device)
    signals, rates = workload(args.workload)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    call = lambda: echo.fast.encode(model, signals, rates, dtype=dtype, frames=not args.utterances)  # noqa: E731
    call()  # warm-up (and the bf16 copy of the model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        sync()
        start = time.perf_counter()
        call()
        sync()
        wall = time.perf_counter() - start
    totals: dict[str, float] = {}
    device_busy = 0.0
    for event in prof.key_averages():
        totals[category(event.key)] = totals.get(category(event.key), 0.0) + event.self_cpu_time_total / 1e6
        device_busy += getattr(event, "self_device_time_total", 0.0) / 1e6
    # self times of both threads' ops can exceed wall; scale ops to the wall share they took on the main thread
    in_ops = sum(totals.values())
    totals["Python/dispatch (wall - ops)"] = max(0.0, wall - in_ops)
    print(f"ECHO-{args.size} {args.workload} ({WORKLOADS[args.workload]}), {args.dtype}, {args.device}, "
          f"{'utterances only' if args.utterances else 'with frames'}, "
          f"{torch.get_num_threads()} threads: {wall:.3f} s wall")
    if args.device == "cuda":
        print(f"GPU busy {device_busy:.3f} s of the {wall:.3f} s ({100 * device_busy / wall:.0f}%); host time below")
    print("| work | seconds | share |\n|---|---|---|")
    for label, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"| {label} | {seconds:.3f} | {100 * seconds / max(wall, in_ops):.0f}% |")
    if args.python:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: (call(), sync()))
        print()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"echo[/\\]", 15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
