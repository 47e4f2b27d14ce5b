"""What the bench scripts share (they run as files, bench/ first on sys.path): argparse types that turn a bad
number into a usage error naming the option and the value, where it was a traceback, and the run of a worker
process whose failure shows the worker's own error."""
from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys

WORKER_ERROR_LINES = 20  # of a failed worker's stderr: its traceback's last frames and its message


def _converted(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    """An argparse type for counts (calls, repeats, frames, files of a batch): at least 1, where 0 printed an empty
    table or a median of nothing and a negative count was a torch error."""
    value = _converted(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type for seconds and minutes: finite and above 0, where 0 or less, nan or inf was a traceback
    or a loop without end."""
    value = _converted(text, float, "a number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def sample_rate(text: str) -> int:
    """An argparse type for --rate, by echo's own rule (echo.inputs.check_sample_rate): a rate echo refuses was
    the library's traceback, after the model was built."""
    from echo import inputs  # here, not at the top: the parents that only start workers do not import echo

    try:
        return inputs.check_sample_rate(_converted(text, int, "a whole number of Hz"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def device_option(text: str):
    """An argparse type for --device: a device torch can compute on here (echo.inputs.checked_device's rule), or a
    CUDA one on a machine without a GPU, which the script skips with a line. A typo was torch's RuntimeError listing
    every device type it knows, after the option had been read."""
    import torch
    from echo import inputs

    try:
        if text.split(":")[0] == "cuda" and not torch.cuda.is_available():
            return torch.device(text)
        return inputs.checked_device(text)
    except RuntimeError:  # "cuda:x": torch's own text
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; e.g. cpu, cuda, cuda:1") from None
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def worker_result(script: str, arguments: list[str], env: dict | None = None) -> dict:
    """The JSON that `script` run with `arguments` in a fresh process prints last. A failed worker ends this
    process with the worker's own error (the end of its stderr), where check=True's CalledProcessError hid it
    in the captured output."""
    run = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, env=env)
    if run.returncode:
        how = (f"was killed by signal {-run.returncode} ({signal.strsignal(-run.returncode)})" if run.returncode < 0
               else f"exited with status {run.returncode}")
        error = "\n".join(run.stderr.strip().splitlines()[-WORKER_ERROR_LINES:])
        raise SystemExit(f"worker {' '.join(arguments)} {how}:\n{error}")
    return json.loads(run.stdout.strip().splitlines()[-1])
