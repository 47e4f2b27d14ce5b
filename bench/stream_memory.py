"""Resident memory of a long StreamEncoder stream: audio pushed in chunks for many minutes, RSS and the
stream's own state printed every minute. finish() needs a little per frame (band 0 with the exact mean), so
the state grows slowly with the stream; RSS should grow at about the same pace, not many times faster.

    python bench/stream_memory.py [--minutes 10] [--rate 8000] [--chunk-seconds 0.5] [--size tiny] [--frames]
"""
from __future__ import annotations

import argparse
import time

import torch

from _shared import positive_float, sample_rate


def main() -> int:
    import echo
    import echo.fast
    from echo.host_memory import current_rss_mb, peak_rss_mb

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=positive_float, default=10.0)
    parser.add_argument("--rate", type=sample_rate, default=8000)
    parser.add_argument("--chunk-seconds", type=positive_float, default=0.5)
    parser.add_argument("--size", choices=list(echo.PRESETS), default="tiny")
    parser.add_argument("--frames", action="store_true", help="keep frame embeddings (their outputs grow too)")
    args = parser.parse_args()
    chunk = int(args.rate * args.chunk_seconds)
    if chunk < 1:  # else empty pushes, and no audio to divide the RSS growth by
        parser.error(f"--chunk-seconds {args.chunk_seconds:g} at --rate {args.rate} is less than one sample")
    chunks = int(args.minutes * 60 / args.chunk_seconds)
    per_minute = max(1, int(60 / args.chunk_seconds))
    if chunks < per_minute:
        parser.error(f"RSS is read once a minute: --minutes must be at least 1 (and at least one chunk), got "
                     f"--minutes {args.minutes:g} with --chunk-seconds {args.chunk_seconds:g}")
    torch.manual_seed(0)
    model = echo.EchoModel(echo.EchoConfig.preset(args.size)).eval()
    stream = echo.fast.StreamEncoder(model, args.rate, frames=args.frames)
    generator = torch.Generator().manual_seed(1)
    started, readings, minutes = time.perf_counter(), [], []
    print(f"ECHO-{args.size}, {args.rate} Hz in {args.chunk_seconds:g} s chunks, frames={args.frames}; "
          f"RSS {current_rss_mb():.0f} MB before the stream")
    print(f"{'minute':>6} {'RSS MB':>8} {'state MB':>9}")
    for index in range(chunks):
        stream.push(torch.randn(chunk, generator=generator))
        if (index + 1) % per_minute == 0:
            state = sum(rows.buffer.numel() * rows.buffer.element_size()
                        for rows in (stream.dc_bins, stream.estimates, stream.low_rows))
            state += sum(out.numel() * out.element_size() for out in stream.outputs)
            readings.append(current_rss_mb())
            # the audio pushed, not the reading's count: 7 s chunks are read every 56 s
            minutes.append((index + 1) * chunk / args.rate / 60)
            print(f"{minutes[-1]:6.2f} {readings[-1]:8.0f} {state / 2**20:9.1f}", flush=True)
    with open("/proc/self/clear_refs", "w") as refs:  # the peak (VmHWM) from here on: finish()'s own
        refs.write("5")
    before_finish, finish_started = current_rss_mb(), time.perf_counter()
    stream.finish()
    finish_peak = peak_rss_mb() - before_finish
    # from the first reading on: the first minute also builds the inference copy and the first segment's buffers
    if len(readings) > 1:
        growth = (readings[-1] - readings[0]) / (minutes[-1] - minutes[0])
        grew = f"RSS grew {growth:.1f} MB a minute from minute {minutes[0]:.2f} to {minutes[-1]:.2f}"
    else:  # it said "grew 0.0 MB a minute from minute 1 to 1"
        grew = "one reading: no growth measured (--minutes 2 or more)"
    print(f"finish() {time.perf_counter() - finish_started:.2f} s, its peak +{finish_peak:.0f} MB; {grew} "
          f"({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
