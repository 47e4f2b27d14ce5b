"""Peak memory and step time of CPU pretraining (`python -m echo pretrain`) under glibc's default malloc settings
and under the ones echo/host_memory.py advises (why: its docstring).

Each setting runs the same steps (same seed, same data, no data workers) in its own process, the settings
alternating; the script checks that the losses agree, then prints each setting's peak RSS and seconds per step.

    python bench/pretrain_memory.py                          # generated machines at the 7 rate families
    python bench/pretrain_memory.py --data corpus/pretrain   # the default model's corpus
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pretrain_loader import generated_folder, soundfile_missing

from echo.host_memory import TUNABLES

MMAP_THRESHOLD = TUNABLES.split(":")[0]  # the advised settings without huge pages
SETTINGS = {"glibc default": "", "mmap above 4 MB": MMAP_THRESHOLD, "mmap above 4 MB, huge pages": TUNABLES}


def run(data: Path, out: Path, tunables: str, args) -> dict:
    """One pretraining process; its peak RSS (from the kernel's accounting of the child) and its steps. The
    corpus's manifest goes beside the run folders (indexed by the first run, reused by the others), not into
    --data, where `echo pretrain` caches it by default."""
    command = [sys.executable, "-m", "echo", "pretrain", "--data", str(data), "--out", str(out), "--size", "tiny",
               "--manifest", str(out.parent / "manifest.csv"),
               "--steps", "1000", "--stop-at", str(args.steps), "--tokens-per-batch", str(args.tokens_per_batch),
               "--crop-seconds", "4", "--utterance-target", "layer-mean",
               "--precision", "bf16", "--workers", "0", "--seed", "0", "--log-every", "1", "--save-every", "100000",
               "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLIBC_TUNABLES": tunables}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if process.returncode:
        raise SystemExit(f"pretraining under {tunables or 'the default'} failed (exit status {process.returncode})")
    with open(out / "steps.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {"peak_mb": usage.ru_maxrss / 1024, "losses": [float(r["loss"]) for r in rows],
            "seconds": [1 / float(r["steps_per_s"]) for r in rows[args.skip:]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="a folder corpus (default: generated machines)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of the step time")
    parser.add_argument("--tokens-per-batch", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not 0 <= args.skip < args.steps:
        parser.error(f"--skip must leave a step to time (0 <= --skip < --steps), got --skip {args.skip} "
                     f"--steps {args.steps}")
    if reason := soundfile_missing():
        print(f"skipped: {reason}")
        return
    with tempfile.TemporaryDirectory() as scratch:
        if args.data is None:  # beside the run folders, not above them: the corpus is indexed at every start
            (Path(scratch) / "data").mkdir()
        data = args.data or generated_folder(Path(scratch) / "data", files=70, seconds=6.0)
        results = {name: [] for name in SETTINGS}
        for repeat in range(args.repeats):
            for index, (name, tunables) in enumerate(SETTINGS.items()):
                results[name].append(run(data, Path(scratch) / f"run{repeat}_{index}", tunables, args))
    reference = results["glibc default"][0]["losses"]
    for name, runs in results.items():
        for measured in runs:
            if measured["losses"] != reference:
                raise SystemExit(f"{name}: the losses differ from the default's; the comparison is void")
    print(f"{args.steps} steps of {args.tokens_per_batch} teacher tokens, ECHO-tiny, bf16, one torch thread; "
          f"losses equal under every setting")
    print(f"{'setting':30} {'peak RSS MB':>24} {'s per step (median, x default)':>32}")
    default = statistics.median(s for r in results["glibc default"] for s in r["seconds"])
    for name, runs in results.items():
        peaks = " / ".join(f"{r['peak_mb']:.0f}" for r in runs)
        seconds = statistics.median(s for r in runs for s in r["seconds"])
        print(f"{name:30} {peaks:>24} {seconds:>24.2f} ({seconds / default:.2f}x)")


if __name__ == "__main__":
    main()
