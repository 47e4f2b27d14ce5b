"""Which backend an op runs (echo/ops/backend.py): the documented precedence, and a forced Triton backend that
cannot run is an error naming the setting that forced it and what is missing."""
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from echo.ops import attention as attention_ops
from echo.ops import backend as backends
from echo.packed import Packing

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("ECHO_BACKEND"):
            monkeypatch.delenv(name)


def test_argument_beats_op_variable_beats_global_variable(clean_environment, monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "reference")
    monkeypatch.setenv("ECHO_BACKEND_ATTENTION", "torch")
    assert backends.choose("norm", CPU) == "reference"
    assert backends.choose("attention", CPU) == "torch"
    assert backends.choose("attention", CPU, "reference") == "reference"


def test_a_misspelt_value_names_its_variable(clean_environment, monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND_ATTENTION", "Triton")
    with pytest.raises(backends.BackendError, match="ECHO_BACKEND_ATTENTION=Triton: unknown backend 'Triton'"):
        backends.choose("attention", CPU)


def test_missing_triton_is_named_and_torch_still_runs(clean_environment, monkeypatch):
    """Without triton the torch backends run; forcing Triton (argument or variable) says triton is not installed,
    where it said 'needs triton and a CUDA device' (and the environment check let the variable pass)."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.split(".")[0] == "triton" else real_find_spec(name, *args))
    lengths = torch.tensor([3, 5])
    qkv, packing = torch.randn(8, 3 * 128), Packing.from_lengths(lengths)
    got = attention_ops.packed_attention(qkv, packing, 2, backend="torch")
    assert torch.allclose(got, attention_ops.varlen_attention(qkv, packing.cu_seqlens, 2), atol=1e-5)
    with pytest.raises(backends.BackendError, match="backend='triton': .*triton is not installed"):
        attention_ops.packed_attention(qkv, packing, 2, backend="triton")
    monkeypatch.setenv("ECHO_BACKEND_TOKENS", "triton")
    with pytest.raises(backends.BackendError, match="ECHO_BACKEND_TOKENS=triton: triton is not installed"):
        backends.check_environment()


FORCED_ON_CPU = """
import os, torch
from echo.ops import attention as attention_ops, backend as backends
from echo.packed import Packing
if os.environ.get("IMPORT_KERNELS_FIRST"):
    import echo_kernels
    os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels were defined for a GPU
try:
    attention_ops.packed_attention(torch.randn(8, 384), Packing.from_lengths(torch.tensor([3, 5])), 2)
except backends.BackendError as error:
    print(error)
"""


@pytest.mark.parametrize("late_interpreter", [False, True])
def test_forced_triton_on_cpu_without_the_interpreter(late_interpreter, clean_environment):
    """ECHO_BACKEND_ATTENTION=triton on a CPU tensor, TRITON_INTERPRET unset (or set after the kernels were
    defined, which Triton ignores: that failed with 'RuntimeError: 0 active drivers'), is an error that names the
    variable and TRITON_INTERPRET."""
    pytest.importorskip("triton")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.update(ECHO_BACKEND_ATTENTION="triton", PYTHONPATH=str(ROOT))
    if late_interpreter:
        env["IMPORT_KERNELS_FIRST"] = "1"
    result = subprocess.run([sys.executable, "-c", FORCED_ON_CPU], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ECHO_BACKEND_ATTENTION=triton: the Triton attention runs on CUDA tensors" in result.stdout
    assert "TRITON_INTERPRET=1 set before echo_kernels is imported" in result.stdout


def test_a_triton_that_does_not_import_is_no_backend_and_no_traceback(clean_environment, monkeypatch):
    """An installed triton whose import fails (a driver mismatch) made a forced CPU request raise ImportError
    from deep inside the dispatch."""
    real_import = importlib.import_module

    def broken(name, *args):
        if name == "echo_kernels":
            raise ImportError("libcuda mismatch")
        return real_import(name, *args)

    monkeypatch.setattr(backends.importlib, "import_module", broken)
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    assert not backends.triton_available(CPU)
    with pytest.raises(backends.BackendError, match="backend='triton'"):
        backends.choose("attention", CPU, "triton")
