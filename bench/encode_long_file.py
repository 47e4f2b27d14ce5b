"""Peak memory and time of `echo encode` on one long recording: whole (over 2^26 decoded samples, 23 minutes of 48
kHz mono, streamed through a StreamEncoder per channel given the channel's mean from a first reading) and window by
window (`--window`, each window encoded as a signal of its own). Both decode a long file a block at a time, so the
peak should not grow with its length.

    python bench/encode_long_file.py [--minutes 30 120] [--rate 48000] [--modes whole 10 10:5] [--model default]

Each (length, mode) is a fresh process (the command line's `main`, as `python -m echo encode FILE --quiet`) whose
own peak resident memory (VmHWM) is printed with the command's time; a mode is `whole`, or WINDOW[:HOP] seconds.
The recording is random noise at 0.1 written as 16-bit WAV (mono) in the system's temporary folder, and deleted.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _shared import positive_float, sample_rate, worker_result

WRITE_SECONDS = 60  # of noise generated and written at a time


def mode_arguments(mode: str) -> list[str]:
    """`echo encode`'s options for a mode: none for whole, --window [--hop] for WINDOW[:HOP]."""
    if mode == "whole":
        return []
    window, _, hop = mode.partition(":")
    return ["--window", window] + (["--hop", hop] if hop else [])


def mode_type(text: str) -> str:
    try:
        for value in mode_arguments(text)[1::2]:
            positive_float(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not whole or WINDOW[:HOP] seconds, e.g. 10 or 10:1") from None
    return text


def write_noise(path: Path, minutes: float, rate: int) -> None:
    import soundfile

    rng = np.random.default_rng(0)
    left = int(minutes * 60 * rate)
    with soundfile.SoundFile(str(path), "w", rate, 1, subtype="PCM_16") as handle:
        while left > 0:
            count = min(left, WRITE_SECONDS * rate)
            handle.write((0.1 * rng.standard_normal(count)).astype(np.float32))
            left -= count


def measure(path: str, mode: str, model: str) -> dict:
    from echo import cli
    from echo.host_memory import peak_rss_mb

    out = Path(tempfile.mkdtemp()) / "embeddings.npz"
    started = time.perf_counter()
    status = cli.main(["encode", path, "--model", model, "--out", str(out), "--quiet", *mode_arguments(mode)])
    seconds = time.perf_counter() - started
    out.unlink(missing_ok=True)
    out.parent.rmdir()
    return {"status": status, "seconds": seconds, "peak_mb": peak_rss_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=positive_float, nargs="+", default=[30.0, 120.0])
    parser.add_argument("--rate", type=sample_rate, default=48000)
    parser.add_argument("--modes", type=mode_type, nargs="+", default=["whole", "10", "10:5"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(*args.worker)))
        return 0
    print("| recording | mode | peak RSS MB | s | x real time |")
    print("|---|---|---|---|---|")
    for minutes in args.minutes:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "noise.wav"
            write_noise(path, minutes, args.rate)
            for mode in args.modes:
                r = worker_result(__file__, ["--worker", str(path), mode, args.model])
                if r["status"] != 0:
                    print(f"echo encode failed on {mode} (status {r['status']})", file=sys.stderr)
                    return 1
                shown = "whole file" if mode == "whole" else \
                    "windows of {} s every {} s".format(*(mode.split(":") + [mode])[:2])
                print(f"| {minutes:g} min, {args.rate / 1000:g} kHz mono | {shown} | {r['peak_mb']:.0f} | "
                      f"{r['seconds']:.1f} | {minutes * 60 / r['seconds']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
