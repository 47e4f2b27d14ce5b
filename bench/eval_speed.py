"""End-to-end speed of a DCASE-style evaluation (encode + 1-NN cosine scoring) against a per-file loop.

Half of the clips form the memory bank, half are scored. The batched path is echo.fast.encode in batches +
neighbors.nearest (chunked matrix products); the per-file loop is EchoModel.encode of one clip at a time +
one bank scan per query, timed on --loop-files clips and scaled to all of them (said so in the output); a first
call before them, with a first call's one-time costs, is timed apart and counted once, as the batched path's
first batch is. The loop runs EchoModel.encode in float32 whatever --dtype asks of the batched path.
Signals are generated in memory, outside the timed calls: neither file reading nor their generation is timed.

    python bench/eval_speed.py                          # 10^4 ten-second 16 kHz clips, ECHO-small, CPU
    python bench/eval_speed.py --files 512 --size tiny  # a quick look
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from _shared import device_option, positive_float, positive_int, sample_rate
from echo import fast, geometry
from echo.eval import neighbors
from echo.model import PRESETS, EchoConfig, EchoModel


def clips(count: int, seconds: float, rate: int, seed: int = 0):
    """Machine-like clips: a shaft tone with harmonics at a random speed, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * rate)) / rate
    for _ in range(count):
        shaft = 20 + 30 * torch.rand(1, generator=generator).item()
        signal = sum(0.6 ** h * torch.sin(2 * math.pi * shaft * (h + 1) * t) for h in range(6))
        yield signal + 0.05 * torch.randn(len(t), generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--seconds", type=positive_float, default=10.0)
    parser.add_argument("--rate", type=sample_rate, default=16000)
    parser.add_argument("--size", choices=list(PRESETS), default="small")
    parser.add_argument("--device", type=device_option, default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batch-files", type=positive_int, default=64)
    parser.add_argument("--loop-files", type=positive_int, default=32, help="clips timed in the per-file loop")
    args = parser.parse_args()
    if args.files < 2:
        parser.error(f"--files must be at least 2 (half form the bank, half are scored), got {args.files}")
    samples, window = int(args.seconds * args.rate), geometry.n_fft(args.rate)
    if samples < window:  # else the library's "shorter than one 25 ms window", after the model was built
        parser.error(f"--seconds {args.seconds:g} at --rate {args.rate} is {samples} samples, shorter than one "
                     f"25 ms window ({window} samples)")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: --device cuda but no CUDA device is available")
        return
    device = args.device
    dtype = getattr(torch, args.dtype)
    model = EchoModel(EchoConfig.preset(args.size)).eval().to(device)
    bank_count = args.files // 2

    # only the encode calls are timed: generating a 10 s clip takes about as long as encoding it in a batch
    vectors, batch, encode_seconds = [], [], 0.0
    for index, signal in enumerate(clips(args.files, args.seconds, args.rate)):
        batch.append(signal)
        if len(batch) == args.batch_files or index == args.files - 1:
            start = time.perf_counter()
            vectors += fast.encode(model, batch, args.rate, dtype=dtype, device=device)
            encode_seconds += time.perf_counter() - start
            batch = []
    embeddings = torch.stack(vectors).numpy()
    start = time.perf_counter()
    neighbors.nearest(embeddings[bank_count:], embeddings[:bank_count], 1, "cosine", device=device)
    search_seconds = time.perf_counter() - start
    batched = encode_seconds + search_seconds

    loop_count = min(args.loop_files, args.files)
    first, *loop_clips = clips(loop_count + 1, args.seconds, args.rate, seed=1)
    start = time.perf_counter()
    model.encode(first, args.rate)  # a first call's one-time costs: counted once, not scaled by files / loop
    first_seconds = time.perf_counter() - start
    loop_encode = 0.0
    for signal in loop_clips:
        start = time.perf_counter()
        model.encode(signal, args.rate)
        loop_encode += time.perf_counter() - start
    loop_encode = first_seconds + loop_encode / loop_count * (args.files - 1)
    bank = embeddings[:bank_count] / np.linalg.norm(embeddings[:bank_count], axis=1, keepdims=True)
    queries = embeddings[bank_count:bank_count + loop_count]  # fewer than loop_count when the files are few
    start = time.perf_counter()
    for query in queries:
        1 - np.max(bank @ (query / np.linalg.norm(query)))
    loop_search = (time.perf_counter() - start) / len(queries) * (args.files - bank_count)
    loop = loop_encode + loop_search

    print(f"ECHO-{args.size} on {device} ({args.dtype}), {args.files} clips of {args.seconds:g} s at {args.rate} Hz, "
          f"bank {bank_count}, {args.files - bank_count} scored, embedding size {embeddings.shape[1]}")
    print(f"batched:  {batched:8.1f} s  {args.files / batched:8.1f} files/s  encode {encode_seconds:.1f} s "
          f"({100 * encode_seconds / batched:.0f}%), search {search_seconds:.2f} s ({100 * search_seconds / batched:.0f}%)")
    print(f"per file: {loop:8.1f} s  {args.files / loop:8.1f} files/s  (EchoModel.encode, float32; timed on "
          f"{loop_count} clips after a first one and on {len(queries)} queries, scaled) encode {loop_encode:.1f} s, "
          f"search {loop_search:.2f} s")
    print(f"speed-up of the batched evaluation over the per-file loop: {loop / batched:.1f}x")


if __name__ == "__main__":
    main()
