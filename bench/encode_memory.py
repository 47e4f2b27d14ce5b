"""Peak memory of echo.fast.encode against the number of signals in one call (the token budget should keep the
working memory flat however many signals a call holds), and on long signals (`--long`).

Each (copies, max_tokens, dtype) runs in a fresh process, which builds `copies` copies of the W2 workload
(bench/encode_throughput.py: 128 segments of 0.5-2.5 s at 12, 16, 48 and 50 kHz), notes its resident memory,
encodes them all in one call and reports its peak (VmHWM: the process's own, see echo.host_memory.peak_rss_mb).
The working memory is the peak less the memory before the call less the embeddings it returns; the input
signals and the returned embeddings grow with the call by nature.

    python bench/encode_memory.py [--copies 1 4 16] [--max-tokens 4096] [--dtypes bfloat16 float32] [--size small]
    python bench/encode_memory.py --copies 1 4 --max-tokens 0          (0: the whole call in one pass)

`--long RATE:SECONDS[:SIGNALS] ...` measures long signals instead: each item is one call on SIGNALS (default 1)
random signals of that length, default max_tokens, for each front end of `--stft` (ECHO_BACKEND_STFT); it
prints the peak over the call's start against the signals' float32 size. A signal's whole band-layout
spectrogram would be ~1.3x that size (bands x 32 rows of float32 per hop of samples); fast.encode's passes
make only their own segments'.

    python bench/encode_memory.py --long 48000:600 16000:1800 --size tiny --dtypes bfloat16 --stft csrc torch
    python bench/encode_memory.py --long 48000:600 --api encode stream --size tiny --dtypes bfloat16 --stft csrc
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from _shared import worker_result  # a failed worker (an unknown --stft, --dtypes or --size) shows its own error
from encode_throughput import workload  # bench/encode_throughput.py: the encode benchmark's inputs

API_NAMES = {"encode": "fast.encode", "stream": "StreamEncoder, one push"}


def measure(copies: int, max_tokens: int, dtype: str, size: str) -> dict:
    import echo
    import echo.fast
    from echo import host_memory

    torch.manual_seed(0)
    model = echo.EchoModel(echo.EchoConfig.preset(size)).eval()
    signals, rates = workload("W2")
    echo.fast.encode(model, signals[:4], rates[:4], dtype=getattr(torch, dtype))  # the inference copy, built once
    signals, rates = signals * copies, rates * copies
    before = host_memory.current_rss_mb()
    out = echo.fast.encode(model, signals, rates, dtype=getattr(torch, dtype), max_tokens=max_tokens or 10**9)
    returned = sum(u.numel() * u.element_size() for u in out) / 2**20
    peak = host_memory.peak_rss_mb()
    return {"signals": len(signals), "before_mb": before, "peak_mb": peak, "returned_mb": returned,
            "working_mb": peak - before - returned}


def measure_long(rate: int, seconds: float, signals: int, dtype: str, size: str, api: str) -> dict:
    import echo
    import echo.fast
    from echo import host_memory

    torch.manual_seed(0)
    model = echo.EchoModel(echo.EchoConfig.preset(size)).eval()
    dtype = getattr(torch, dtype)
    echo.fast.encode(model, torch.randn(rate), rate, dtype=dtype)  # the inference copy, built once
    waves = [torch.randn(int(rate * seconds)) for _ in range(signals)]
    with open("/proc/self/clear_refs", "w") as clear:  # VmHWM from here on (Linux): making `waves` peaked higher
        clear.write("5")
    before = host_memory.current_rss_mb()
    started = time.perf_counter()
    if api == "encode":
        echo.fast.encode(model, waves, rate, dtype=dtype)
    else:  # each signal as one push of a whole file, then finish()
        for wave in waves:
            stream = echo.fast.StreamEncoder(model, rate, dtype=dtype)
            stream.push(wave)
            stream.finish()
    return {"seconds": time.perf_counter() - started, "signal_mb": sum(w.numel() * 4 for w in waves) / 2**20,
            "over_start_mb": host_memory.peak_rss_mb() - before}


def long_item(text: str) -> tuple[int, float, int]:
    """RATE:SECONDS[:SIGNALS] of --long, refused by argparse when malformed (it was a traceback)."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        return int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not RATE:SECONDS[:SIGNALS], e.g. 48000:600 or 16000:60:4")


def main_long(args) -> int:
    print("| api | front end | signals | dtype | ECHO | signals MB (float32) | peak over the call's start MB | "
          "x signals | call s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rate, seconds, signals in args.long:
        for api in args.api:
            for stft in args.stft:
                for dtype in args.dtypes:
                    arguments = ["--long-worker", str(rate), str(seconds), str(signals), dtype, args.size, api]
                    r = worker_result(__file__, arguments, env={**os.environ, "ECHO_BACKEND_STFT": stft})
                    what = f"{signals} x {seconds:g} s at {rate / 1000:g} kHz"
                    print(f"| {API_NAMES[api]} | {stft} | {what} | {dtype} | {args.size} | {r['signal_mb']:.0f} | "
                          f"{r['over_start_mb']:.0f} | {r['over_start_mb'] / r['signal_mb']:.2f} | "
                          f"{r['seconds']:.1f} |", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[4096], help="0: the whole call in one pass")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--long", nargs="+", type=long_item, metavar="RATE:SECONDS[:SIGNALS]",
                        help="long signals, one call per item, instead of copies of W2")
    parser.add_argument("--stft", nargs="+", default=["csrc", "torch"], help="front ends of --long")
    parser.add_argument("--api", nargs="+", choices=sorted(API_NAMES), default=["encode"],
                        help="--long through fast.encode, or each signal as one StreamEncoder push (stream)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--long-worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.long_worker:
        rate, seconds, signals, dtype, size, api = args.long_worker
        print(json.dumps(measure_long(int(rate), float(seconds), int(signals), dtype, size, api)))
        return 0
    if args.long:
        return main_long(args)
    if args.worker:
        copies, max_tokens, dtype, size = args.worker
        print(json.dumps(measure(int(copies), int(max_tokens), dtype, size)))
        return 0
    if min(args.copies) < 1:  # else a row of no signals
        parser.error("--copies must be at least 1")
    print("| dtype | max_tokens | signals | RSS before the call MB | peak RSS MB | embeddings returned MB | working MB |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        for max_tokens in args.max_tokens:
            for copies in args.copies:
                r = worker_result(__file__, ["--worker", str(copies), str(max_tokens), dtype, args.size])
                print(f"| {dtype} | {max_tokens or 'one pass'} | {r['signals']} | {r['before_mb']:.0f} | "
                      f"{r['peak_mb']:.0f} | {r['returned_mb']:.1f} | {r['working_mb']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
