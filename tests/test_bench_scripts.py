"""The bench scripts (bench/) on a user's plain mistakes: a bad option is a usage error that names it, before any
model is built, never a traceback; a failed worker shows its own error; the front-end microbenchmark times the
compiled CUDA op where it is built and says why not elsewhere."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # a script that runs on where it should refuse (millions of empty pushes) fails, not hangs, a test


def run_script(script: str, *arguments: str, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *arguments], capture_output=True,
                          text=True, cwd=REPO, timeout=TIMEOUT, env={**os.environ, **environment})


@pytest.mark.parametrize("script, option, value", [
    ("stream_memory.py", "--rate", "0"),
    ("stream_push_time.py", "--rate", "0"),
    ("eval_speed.py", "--rate", "0"),
    ("stream_memory.py", "--minutes", "nan"),
    ("stream_memory.py", "--chunk-seconds", "0.0001"),  # less than one sample at 8 kHz: empty pushes
    ("stream_memory.py", "--size", "huge"),
    ("stream_push_time.py", "--size", "huge"),
    ("eval_speed.py", "--size", "huge"),
    ("eval_speed.py", "--seconds", "inf"),
    ("eval_speed.py", "--seconds", "0.01"),  # shorter than one 25 ms window at 16 kHz
    ("eval_speed.py", "--device", "gpu"),
    ("csrc_frontend.py", "--device", "gpu"),
    ("pretrain_throughput.py", "--device", "gpu"),
    ("pretrain_throughput.py", "--device", "meta"),
    ("fault_groups_speed.py", "--groups", "1"),
    ("fault_groups_speed.py", "--k", "10000"),  # above every bank of 10^4 rows
    ("search_memory.py", "--k", "20000"),
    ("encode_long_file.py", "--minutes", "nan"),
    ("encode_long_file.py", "--rate", "0"),
    ("encode_long_file.py", "--modes", "10:0"),  # a hop of 0 s: echo encode's error, after the file was written
])
def test_a_bad_option_is_a_usage_error_naming_it(script, option, value):
    run = run_script(script, option, value)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    message = run.stderr.splitlines()[-1]
    assert option in message and value in message


def test_a_failed_worker_shows_its_own_error():
    """A misspelt backend fails in the worker (the parent never imports echo): the user reads the worker's own
    error, not CalledProcessError's command line."""
    run = run_script("encode_new_sizes.py", "--calls", "1", "--repeat", "1", ECHO_BACKEND_STFT="bogus")
    assert run.returncode == 1, run.stderr
    assert "CalledProcessError" not in run.stderr
    assert "worker --serve padded --calls 1 --dtype bfloat16 exited with status 1" in run.stderr
    assert "ECHO_BACKEND_STFT=bogus: unknown backend 'bogus'" in run.stderr.splitlines()[-1]


@pytest.fixture
def benchmark_stft(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # bench is a package: its conftest is bench.conftest
    return importlib.import_module("bench.benchmark_stft")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine times the compiled front end")
def test_the_compiled_front_end_is_skipped_with_its_reason_without_cuda():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "csrc",
                          "bench/benchmark_stft.py"], capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 skipped" in run.stdout
    assert "SKIPPED [2] bench/benchmark_stft.py" in run.stdout and "need a CUDA GPU" in run.stdout


@pytest.mark.parametrize("reason", [None, "echo._C was built without CUDA"])
def test_the_compiled_front_end_is_timed_where_cuda_and_its_kernel_are(benchmark_stft, monkeypatch, reason):
    """The extension's own answer decides, asked about the op and CUDA: None (a CUDA build) times it."""
    from echo import extension

    asked = []

    def why_unavailable(op, device):
        asked.append((op, device))
        return reason

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(extension, "why_unavailable", why_unavailable)
    assert benchmark_stft.compiled_op_skip_reason() == reason
    assert asked == [("ragged_spectrogram", "cuda")]


def test_without_cuda_the_compiled_front_end_is_not_timed(benchmark_stft, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert benchmark_stft.compiled_op_skip_reason() == benchmark_stft.NO_GPU
