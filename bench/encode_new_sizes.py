"""echo.fast.encode on a stream of batches that are new at every call (clips of 0.3-6 s at the seven rate
families, 4-20 to a batch), as a folder encode or a service sees them, with a pass's rows padded to one of a
few sizes (echo.fast.CPU_ROW_COUNTS, the default on a CPU) and unpadded. oneDNN builds a product for every row
count it meets; the benchmarks with fixed workloads (encode_throughput.py) meet theirs in the warm-up only.

    python bench/encode_new_sizes.py [--calls 60] [--repeat 2] [--dtype bfloat16]

Each setting runs in its own process (same seed, same batches), alternating; prints the time of the calls after
the first `--calls / 2` (the padded setting's sizes are built by then) and of all, the process's peak and final
RSS, and the distinct row counts of the passes.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from _shared import positive_int, worker_result

RATES = (8000, 12000, 16000, 22050, 44100, 48000, 50000)
SETTINGS = ("padded", "unpadded")


def run(setting: str, calls: int, dtype: torch.dtype) -> dict:
    import echo
    import echo.fast
    from echo import host_memory, packed

    host_memory.keep_freed_memory()  # as `python -m echo encode`: page faults out of the comparison
    if setting == "unpadded":
        echo.fast.pass_row_step = lambda max_tokens, tokens, device: 1
    rows, forward = set(), packed.forward

    def recorded(model, tokens, *rest, **options):
        rows.add(tokens.shape[0])
        return forward(model, tokens, *rest, **options)

    packed.forward = recorded
    torch.manual_seed(0)
    model = echo.EchoModel(echo.EchoConfig.preset("small")).eval()
    rng = np.random.default_rng(0)
    echo.fast.encode(model, [torch.randn(16000)], [16000], dtype=dtype)  # the inference copy, built once
    seconds = []
    for _ in range(calls):
        rates = [int(r) for r in rng.choice(RATES, size=int(rng.integers(4, 21)))]
        signals = [torch.randn(int(rng.uniform(0.3, 6.0) * r)) for r in rates]
        start = time.perf_counter()
        echo.fast.encode(model, signals, rates, dtype=dtype)
        seconds.append(time.perf_counter() - start)
    return {"seconds": seconds, "row_counts": len(rows), "peak_rss_mb": host_memory.peak_rss_mb(),
            "final_rss_mb": host_memory.current_rss_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=positive_int, default=60)
    parser.add_argument("--repeat", type=positive_int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--serve", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.serve:
        print(json.dumps(run(args.serve, args.calls, dtype)))
        return 0
    half = args.calls // 2
    print(f"{args.calls} calls of new batches, {args.dtype}, {torch.get_num_threads()} threads; seconds of calls "
          f"{half + 1}-{args.calls} and of all")
    print("| run | setting | later calls s | all calls s | distinct pass rows | peak RSS MB | final RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for repeat in range(args.repeat):
        for setting in SETTINGS if repeat % 2 == 0 else SETTINGS[::-1]:
            result = worker_result(__file__, ["--serve", setting, "--calls", str(args.calls), "--dtype", args.dtype])
            later, total = sum(result["seconds"][half:]), sum(result["seconds"])
            print(f"| {repeat + 1} | {setting} | {later:.1f} | {total:.1f} | {result['row_counts']} | "
                  f"{result['peak_rss_mb']:.0f} | {result['final_rss_mb']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
