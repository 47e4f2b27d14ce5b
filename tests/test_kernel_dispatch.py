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
    with pytest.raises(backends.BackendError, match=r"ECHO_BACKEND_TOKENS=triton: triton is not installed "
                                                    r"\(pip install 'echo-fm\[triton\]'\)"):
        backends.check_environment()  # the package's name, as in every extra's message: a user has no '.' to install


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


def test_a_triton_that_does_not_import_is_no_backend_and_no_traceback(clean_environment, broken_triton):
    """An installed triton whose import fails (a driver mismatch) made a forced CPU request raise ImportError
    from deep inside the dispatch."""
    assert not backends.triton_available(CPU)
    with pytest.raises(backends.BackendError, match="backend='triton'"):
        backends.choose("attention", CPU, "triton")


LOAD_ERROR = "echo._C failed to load: ImportError: undefined symbol: stand_in"
TOKENS_HAS_NO_CSRC = ("no 'csrc' backend here for tokens (the compiled extension echo._C has no tokens op; "
                      "tokens offers triton, torch, reference)")


@pytest.fixture(params=["loaded", "not loading"])
def extension_state(request, monkeypatch):
    """echo._C loaded, or as if it failed to load (`load_error` is what every availability check asks)."""
    from echo import extension

    if request.param == "loaded" and extension.load_error():
        pytest.skip(extension.load_error())
    if request.param == "not loading":
        monkeypatch.setattr(extension, "load_error", lambda: LOAD_ERROR)
    return request.param


def test_forcing_csrc_on_the_tokens_op_says_it_has_none(clean_environment, monkeypatch, extension_state):
    """The token stage has no compiled op in any build: forcing one said nothing more (the extension loaded) or
    gave the extension's load error, as if a rebuild would help."""
    from echo.ops import tokens as token_ops

    monkeypatch.setenv("ECHO_BACKEND_TOKENS", "csrc")
    with pytest.raises(backends.BackendError) as raised:
        backends.check_environment()
    assert str(raised.value) == f"ECHO_BACKEND_TOKENS=csrc: {TOKENS_HAS_NO_CSRC}"
    with pytest.raises(backends.BackendError) as raised:
        backends.choose("tokens", CPU, "csrc", token_ops.available_backends(CPU))
    assert str(raised.value) == f"backend='csrc': {TOKENS_HAS_NO_CSRC}"


def test_fast_encode_refuses_a_forced_backend_before_the_front_end_runs(clean_environment, monkeypatch,
                                                                        extension_state):
    """fast.encode(backend="csrc") ran the first pass's front end (seconds on a long call) before the token stage
    refused it."""
    from echo import fast
    from echo.model import EchoConfig, EchoModel
    from echo.ops import stft as stft_ops

    def front_end_ran(*args, **kwargs):
        raise AssertionError("the front end ran before the forced backend was checked")

    model = EchoModel(EchoConfig(dim=64, depth=1, heads=1))
    monkeypatch.setattr(stft_ops, "ragged_spectrogram", front_end_ran)
    with pytest.raises(backends.BackendError) as raised:
        fast.encode(model, [torch.randn(4000)], 16000, backend="csrc")
    # the ops in the order a call reaches them: the front end first, which lacks it only where echo._C does not load
    first_refusal = (f"no 'csrc' backend here for stft ({LOAD_ERROR})" if extension_state == "not loading"
                     else TOKENS_HAS_NO_CSRC)
    assert str(raised.value) == f"backend='csrc': {first_refusal}"


@pytest.mark.parametrize("op", ["stft", "attention", "norm"])
def test_forcing_csrc_where_the_extension_does_not_load_gives_the_load_error(clean_environment, monkeypatch, op):
    """An op that has a compiled backend, forced where echo._C does not load: the dispatch said the op had no
    'csrc' backend at all, hiding the load error and its rebuild command."""
    from echo import extension

    monkeypatch.setattr(extension, "load_error", lambda: LOAD_ERROR)
    monkeypatch.setenv(f"ECHO_BACKEND_{op.upper()}", "csrc")
    expected = f"ECHO_BACKEND_{op.upper()}=csrc: no 'csrc' backend here for {op} ({LOAD_ERROR})"
    with pytest.raises(backends.BackendError) as raised:
        backends.check_environment()
    assert str(raised.value) == expected
    available = importlib.import_module(f"echo.ops.{op}").available_backends(CPU)
    with pytest.raises(backends.BackendError) as raised:
        backends.choose(op, CPU, available=available)
    assert str(raised.value) == expected


def test_forcing_csrc_on_every_op_names_each_reason(clean_environment, monkeypatch, extension_state):
    """ECHO_BACKEND=csrc: the tokens op has no compiled op anywhere, the others none here only when echo._C does
    not load; the load error was appended after the hint as if it were the tokens op's reason too."""
    monkeypatch.setenv("ECHO_BACKEND", "csrc")
    with pytest.raises(backends.BackendError) as raised:
        backends.check_environment()
    not_loading = f"no 'csrc' backend here for stft, attention, norm ({LOAD_ERROR}); "
    assert str(raised.value) == ("ECHO_BACKEND=csrc: " + (not_loading if extension_state == "not loading" else "")
                                 + TOKENS_HAS_NO_CSRC + "; force it for single ops instead (ECHO_BACKEND_<OP>)")


def test_an_op_variable_in_the_wrong_case_is_refused(clean_environment, monkeypatch):
    """ECHO_BACKEND_attention=reference passed the environment check (its op lowercased to a known one), yet the
    dispatch reads only ECHO_BACKEND_ATTENTION: the forced backend was silently ignored."""
    monkeypatch.setenv("ECHO_BACKEND_attention", "reference")
    with pytest.raises(backends.BackendError, match="ECHO_BACKEND_attention: no such op"):
        backends.check_environment()


def test_a_triton_that_does_not_import_is_no_default_on_cuda_either(clean_environment, broken_triton):
    """On CUDA an installed triton was taken for one that runs: one whose import fails (a driver mismatch) was the
    tokens and attention default, and every encode raised its ImportError from inside the dispatch."""
    from echo.ops import tokens as token_ops

    cuda = torch.device("cuda")
    assert not backends.triton_available(cuda)
    assert backends.choose("tokens", cuda, available=token_ops.available_backends(cuda)) == "torch"
    assert backends.choose("attention", cuda, available=attention_ops.available_backends(cuda)) == "torch"
    with pytest.raises(backends.BackendError, match="backend='triton': tokens cannot run on Triton: triton does not "
                                                    "import \\(ImportError: libcuda mismatch\\)"):
        backends.choose("tokens", cuda, "triton")


@pytest.mark.parametrize("interpreted", [False, True])
def test_the_interpreter_is_no_default_on_cuda(interpreted, clean_environment, monkeypatch):
    """TRITON_INTERPRET=1 left set when echo_kernels was imported on a GPU machine kept Triton the tokens and
    attention default on CUDA: every call ran in Triton's CPU interpreter, orders of magnitude slower, unsaid."""
    from echo.ops import tokens as token_ops

    monkeypatch.setattr(pytest.importorskip("echo_kernels"), "INTERPRETED", interpreted)
    cuda = torch.device("cuda")
    default = "torch" if interpreted else "triton"
    assert backends.choose("tokens", cuda, available=token_ops.available_backends(cuda)) == default
    assert backends.choose("attention", cuda, available=attention_ops.fitting_backends(64, torch.float32, cuda)) \
        == default


def test_forced_triton_on_cuda_under_the_interpreter_runs_and_warns_once(clean_environment, monkeypatch):
    """Forcing Triton on CUDA under the interpreter still runs it (its tests, a kernel being debugged), but once
    per setting it says the tensors go through the CPU; on CPU tensors the interpreter is the point: no warning."""
    import warnings

    monkeypatch.setattr(pytest.importorskip("echo_kernels"), "INTERPRETED", True)
    backends._warn_interpreted.cache_clear()
    monkeypatch.setenv("ECHO_BACKEND_TOKENS", "triton")
    cuda = torch.device("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [backends.choose("tokens", cuda) for _ in range(3)] == ["triton"] * 3
        assert backends.choose("tokens", CPU) == "triton"
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert str(caught[0].message).startswith("ECHO_BACKEND_TOKENS=triton: the Triton kernels run in Triton's CPU "
                                             "interpreter here (TRITON_INTERPRET was set")


def test_a_global_backend_is_not_checked_on_the_ops_that_override_it(clean_environment, monkeypatch,
                                                                     extension_state):
    """ECHO_BACKEND=csrc with ECHO_BACKEND_TOKENS=torch (the token stage has no compiled op) was refused as if
    tokens would run csrc, with the hint to do what was done: force single ops."""
    from echo.ops import tokens as token_ops

    monkeypatch.setenv("ECHO_BACKEND", "csrc")
    monkeypatch.setenv("ECHO_BACKEND_TOKENS", "torch")
    if extension_state == "not loading":
        with pytest.raises(backends.BackendError) as raised:
            backends.check_environment()
        assert str(raised.value) == (f"ECHO_BACKEND=csrc: no 'csrc' backend here for stft, attention, norm "
                                     f"({LOAD_ERROR}); force it for single ops instead (ECHO_BACKEND_<OP>)")
        return
    backends.check_environment()
    assert backends.choose("tokens", CPU, available=token_ops.available_backends(CPU)) == "torch"
    assert backends.choose("attention", CPU, available=attention_ops.available_backends(CPU)) == "csrc"


def test_a_backend_name_with_spaces_is_shown_as_it_is(clean_environment, monkeypatch):
    """ECHO_BACKEND_NORM='torch ' (a stray space from a shell script) was refused as 'ECHO_BACKEND_NORM=torch :
    unknown backend', which reads as if torch itself were unknown."""
    monkeypatch.setenv("ECHO_BACKEND_NORM", "torch ")
    with pytest.raises(backends.BackendError, match="unknown backend 'torch '"):
        backends.check_environment()
