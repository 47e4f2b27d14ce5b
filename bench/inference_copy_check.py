"""What fast.encode pays on every call to know its cached inference copy is not stale: the comparison of the
model's weights with those the copy was built from (echo.packed.inference_model), against the call it guards:
one 1 s clip at 16 kHz and W1 (16 clips of 10 s), utterances only, best of --repeat calls.

    python bench/inference_copy_check.py [--sizes tiny small] [--repeat 20]
"""
from __future__ import annotations

import argparse
import time

import torch


def best_ms(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> int:
    import echo
    import echo.fast
    from echo import packed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--repeat", type=int, default=20, help="calls timed, the best kept (W1: a fifth of them)")
    args = parser.parse_args()
    if args.repeat < 1:  # else min() of no times, after the warm-up encodes
        parser.error("--repeat must be at least 1")
    generator = torch.Generator().manual_seed(0)
    clip = [torch.randn(16000, generator=generator)]
    w1 = [torch.randn(160000, generator=generator) for _ in range(16)]
    print(f"cpu, {torch.get_num_threads()} threads; times in ms, best of {args.repeat} (W1: {max(1, args.repeat // 5)})")
    print(f"{'model':8} {'dtype':9} {'check':>7} {'1 clip':>8} {'check/clip':>11} {'W1':>8} {'check/W1':>9}")
    for size in args.sizes:
        model = echo.EchoModel(echo.EchoConfig.preset(size)).eval()
        for dtype in (torch.float32, torch.bfloat16):
            echo.fast.encode(model, clip, 16000, dtype=dtype)  # builds the copy
            echo.fast.encode(model, w1, 16000, dtype=dtype)  # W1's pass sizes, met once before they are timed
            check = best_ms(lambda: packed.inference_model(model, dtype), args.repeat)
            one = best_ms(lambda: echo.fast.encode(model, clip, 16000, dtype=dtype), args.repeat)
            whole = best_ms(lambda: echo.fast.encode(model, w1, 16000, dtype=dtype), max(1, args.repeat // 5))
            print(f"{size:8} {str(dtype).removeprefix('torch.'):9} {check:7.1f} {one:8.1f} {check / one:11.0%} "
                  f"{whole:8.0f} {check / whole:9.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
