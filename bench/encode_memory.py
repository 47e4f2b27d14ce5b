"""Peak memory of echo.fast.encode against the number of signals in one call: the token budget (`max_tokens`)
should keep the working memory flat however many signals a call holds.

Each (copies, max_tokens, dtype) runs in a fresh process, which builds `copies` copies of the W2 workload
(bench/encode_throughput.py: 128 segments of 0.5-2.5 s at 12, 16, 48 and 50 kHz), notes its resident memory,
encodes them all in one call and reports its peak (VmHWM: the process's own, see echo.host_memory.peak_rss_mb).
The working memory is the peak less the memory before the call less the embeddings it returns; the input
signals and the returned embeddings grow with the call by nature.

    python bench/encode_memory.py [--copies 1 4 16] [--max-tokens 4096] [--dtypes bfloat16 float32] [--size small]
    python bench/encode_memory.py --copies 1 4 --max-tokens 0          (0: the whole call in one pass)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from encode_throughput import workload  # bench/encode_throughput.py: the encode benchmark's inputs


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[4096], help="0: the whole call in one pass")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        copies, max_tokens, dtype, size = args.worker
        print(json.dumps(measure(int(copies), int(max_tokens), dtype, size)))
        return 0
    print("| dtype | max_tokens | signals | RSS before the call MB | peak RSS MB | embeddings returned MB | working MB |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        for max_tokens in args.max_tokens:
            for copies in args.copies:
                run = subprocess.run([sys.executable, __file__, "--worker", str(copies), str(max_tokens), dtype,
                                      args.size], capture_output=True, text=True, check=True)
                r = json.loads(run.stdout.strip().splitlines()[-1])
                print(f"| {dtype} | {max_tokens or 'one pass'} | {r['signals']} | {r['before_mb']:.0f} | "
                      f"{r['peak_mb']:.0f} | {r['returned_mb']:.1f} | {r['working_mb']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
