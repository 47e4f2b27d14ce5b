"""`python -m echo info`: one row per op and device, with the backend that dispatch really picks and why."""
import importlib.util
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from echo import extension
from echo.cli import main
from echo.ops import backend as backends
from echo.ops import stft as stft_ops
from echo.plan import make_plan


def info_rows(capsys) -> tuple[str, dict[tuple[str, str], tuple[str, str]]]:
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    rows = {}
    for line in text.splitlines():
        match = re.match(r"(stft|tokens)\s+(cpu|cuda)\s+(\S+)\s+(.*)$", line)
        if match:
            rows[match[1], match[2]] = (match[3], match[4])
    assert set(rows) == {(op, device) for op in ("stft", "tokens") for device in ("cpu", "cuda")}, text
    return text, rows


@pytest.fixture(autouse=True)
def no_forcing(monkeypatch):
    """TRITON_INTERPRET stays as conftest set it: the CUDA rows import echo_kernels, and kernels defined without
    it would not run in the CPU kernel tests after these."""
    for name in ("ECHO_BACKEND", "ECHO_BACKEND_STFT", "ECHO_BACKEND_TOKENS"):
        monkeypatch.delenv(name, raising=False)


def test_info_matches_dispatch(capsys, monkeypatch):
    text, rows = info_rows(capsys)
    assert f"torch {torch.__version__}" in text
    built = extension.load_error() is None
    assert ("loaded; ops: ragged_spectrogram" in text) == built
    cpu_backend, cpu_why = rows["stft", "cpu"]
    assert cpu_backend == ("csrc" if built else "torch")
    # the Triton front end measured slower than torch on an H100: not a CUDA default (echo/ops/backend.py)
    assert rows["stft", "cuda"][0] == ("csrc" if extension.has_op("ragged_spectrogram", "cuda") else "torch")
    # not under the interpreter (the suite's TRITON_INTERPRET on a CPU machine): it would run through the CPU
    compiled = importlib.util.find_spec("triton") and not importlib.import_module("echo_kernels").INTERPRETED
    assert rows["tokens", "cuda"][0] == ("triton" if compiled else "torch")
    if rows["stft", "cuda"][0] == "torch" and importlib.util.find_spec("triton"):
        assert "triton measured slower here" in rows["stft", "cuda"][1]
    assert cpu_why.startswith("default")
    assert rows["tokens", "cpu"] == ("torch", rows["tokens", "cpu"][1])
    assert "no compiled op" in rows["tokens", "cpu"][1]
    # the reported choice is the one the dispatch makes on a real call
    called = []
    for backend in ("csrc", "torch", "reference"):
        name = f"ragged_spectrogram_{backend}"
        original = getattr(stft_ops, name)
        monkeypatch.setattr(stft_ops, name, lambda *args, b=backend, f=original: called.append(b) or f(*args))
    stft_ops.ragged_spectrogram(torch.randn(16000), torch.tensor([0, 16000]), make_plan([16000], [16000]))
    assert called == [cpu_backend]


def test_info_without_the_extension(capsys, monkeypatch):
    reason = "echo._C is not built (test)"
    monkeypatch.setattr(extension, "load_error", lambda: reason)
    text, rows = info_rows(capsys)
    assert f"compiled extension: {reason}" in text
    assert rows["stft", "cpu"][0] == "torch"
    assert f"csrc: {reason}" in rows["stft", "cpu"][1]


def test_info_names_the_forcing_variable(capsys, monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND_STFT", "reference")
    _, rows = info_rows(capsys)
    assert rows["stft", "cpu"] == ("reference", "forced by ECHO_BACKEND_STFT=reference")
    assert rows["tokens", "cpu"][1].startswith("default")


def test_info_reports_a_bad_forcing_instead_of_failing(capsys, monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "fortran")
    _, rows = info_rows(capsys)
    assert rows["stft", "cpu"][0] == "error" and "unknown backend 'fortran'" in rows["stft", "cpu"][1]


def test_info_names_a_setting_for_no_op(capsys, monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND_ATTENTON", "torch")  # a typo the ops would ignore
    assert main(["info"]) == 0
    assert "environment: ECHO_BACKEND_ATTENTON: no such op" in capsys.readouterr().out


def test_the_missing_need_of_the_tile_kernel_is_named(monkeypatch):
    from echo import info

    monkeypatch.setattr(extension, "has_op", lambda name, device: False)
    assert info.why_no_tiles() == "echo._C is not built with the tile kernel"
    monkeypatch.setattr(extension, "has_op", lambda name, device: True)
    monkeypatch.setattr(info, "cpu_flags", lambda: {"avx512f", "amx_tile"})
    assert info.why_no_tiles() == "the kernel does not allow AMX tiles to this process"
    monkeypatch.setattr(info, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert info.why_no_tiles() == "no AMX reported by this CPU and kernel"


@pytest.mark.parametrize("cpuinfo, flags", [
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: spectre\n", {"fpu", "avx2", "avx512_bf16"}),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd40\n", {"fp", "asimd", "sve", "bf16", "i8mm"}),
    ("processor\t: 0\n", None),
], ids=["x86", "Arm", "none listed"])
def test_the_cpu_features_are_read_as_linux_lists_them(tmp_path, monkeypatch, cpuinfo, flags):
    from echo import info

    (tmp_path / "cpuinfo").write_text(cpuinfo)
    monkeypatch.setattr(info, "CPUINFO", str(tmp_path / "cpuinfo"))
    assert info.cpu_flags() == flags
    monkeypatch.setattr(info, "CPUINFO", str(tmp_path / "absent"))
    assert info.cpu_flags() is None


def test_info_says_whether_the_cpu_multiplies_bf16_in_hardware(monkeypatch, capsys):
    """A user choosing --dtype bfloat16 for an edge CPU without bf16 instructions was told only that oneDNN runs
    bf16 products, not that they are converted on the way there."""
    from echo import info

    for flags, said in [({"avx2", "avx512_bf16", "amx_bf16"}, "in hardware (amx_bf16, avx512_bf16)"),
                        ({"asimd", "bf16"}, "in hardware (bf16)"),
                        ({"avx2", "fma"}, "not in hardware (no amx_bf16, avx512_bf16 or bf16 reported): bfloat16 "
                                          "may be slower than float32 here"),
                        (None, "unknown")]:
        monkeypatch.setattr(info, "cpu_flags", lambda flags=flags: flags)
        assert main(["info"]) == 0
        assert f"\nbf16 products on this CPU: {said}" in capsys.readouterr().out


def test_a_damaged_extension_is_named_not_loaded(tmp_path, monkeypatch):
    """A .so cut short by an interrupted copy killed the process (SIGBUS) when loaded; a library whose own
    initialisation raises escaped every fast.encode. Both are reasons now, and the torch paths run."""
    from types import SimpleNamespace

    from echo.ops.backend import check_environment

    spec = importlib.util.find_spec("echo._C")
    if spec is None:
        pytest.skip("echo._C is not built")
    built = open(spec.origin, "rb").read()
    assert extension.cut_short(Path(spec.origin)) is None
    cut = tmp_path / "_C.so"
    cut.write_bytes(built[: len(built) // 16])
    assert f"{len(built) // 16} bytes, a loaded segment ends at byte" in extension.cut_short(cut)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: SimpleNamespace(origin=str(cut)) if name == "echo._C" else real_find(name, *a))
    extension._load_error.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="is cut short"):
            assert "is cut short" in extension.load_error()
        monkeypatch.setenv("ECHO_BACKEND_NORM", "csrc")
        with pytest.raises(ValueError, match="no 'csrc' backend here for norm .*is cut short"):
            check_environment()
        monkeypatch.delenv("ECHO_BACKEND_NORM")
        monkeypatch.setattr(importlib.util, "find_spec", real_find)
        real_import = extension.importlib.import_module

        def failing(name, *a):
            if name == "echo._C":
                raise RuntimeError("registration failed")
            return real_import(name, *a)

        monkeypatch.setattr(extension.importlib, "import_module", failing)
        extension._load_error.cache_clear()
        with pytest.warns(RuntimeWarning, match="registration failed"):
            assert extension.load_error().startswith("echo._C failed to load: RuntimeError: registration failed")
    finally:
        monkeypatch.undo()
        extension._load_error.cache_clear()
    assert extension.load_error() is None


def test_odd_but_valid_library_headers_are_not_called_cut_short(tmp_path):
    """A segment of zero file bytes (all bss) may start past the file's end (lld writes such); a header too odd
    to read is left to the loader, never an exception out of every encode."""
    import struct

    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<Q", header, 0x20, 64)
    struct.pack_into("<HHH", header, 0x34, 64, 56, 2)
    code = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 176, 176, 0x1000)
    bss = struct.pack("<IIQQQQQQ", 1, 6, 0x2000, 0x2000, 0x2000, 0, 0x100, 0x1000)
    library = tmp_path / "_C.so"
    library.write_bytes(bytes(header) + code + bss)
    assert extension.cut_short(library) is None
    cut = struct.pack("<IIQQQQQQ", 1, 6, 0x2000, 0x2000, 0x2000, 0x10, 0x100, 0x1000)
    library.write_bytes(bytes(header) + code + cut)
    assert extension.cut_short(library) == "176 bytes, a loaded segment ends at byte 8208"
    struct.pack_into("<H", header, 0x36, 8)  # a program header size no ELF64 file has
    library.write_bytes(bytes(header) + code + bss)
    assert extension.cut_short(library) is None
    library.chmod(0)
    if not os.access(library, os.R_OK):  # root reads it anyway
        assert extension.cut_short(library) is None


def test_info_says_which_heads_the_attention_backend_takes(capsys, monkeypatch):
    """The CPU row said "csrc  default" for every model, but a custom config's heads (dim 40, 5 heads: dim 8)
    run on torch: the compiled kernel takes heads of dim 64 only."""
    from echo.ops import attention as attention_ops
    from echo.ops import backend as backends
    from echo.packed import Packing

    monkeypatch.delenv("ECHO_BACKEND_ATTENTION", raising=False)
    assert main(["info"]) == 0
    rows = dict(re.findall(r"^attention\s+(cpu|cuda)\s+\S+\s+(.*)$", capsys.readouterr().out, re.M))
    chosen, choose = [], backends.choose
    monkeypatch.setattr(backends, "choose", lambda *a, **k: chosen.append(choose(*a, **k)) or chosen[-1])
    packing = Packing.from_lengths(torch.tensor([5, 17]))
    for heads in (2, 5):  # heads of dim 64, then of dim 8
        attention_ops.packed_attention(torch.randn(packing.total_tokens, 3 * 128 if heads == 2 else 3 * 40),
                                       packing, heads)
    if chosen[0] in attention_ops.TAKES:
        assert f"{chosen[0]} takes {attention_ops.TAKES[chosen[0]]}; other heads run on {chosen[1]}" in rows["cpu"]
    else:
        assert "takes" not in rows["cpu"]


def test_an_older_build_without_an_op_falls_back_for_that_op_alone(capsys, monkeypatch):
    """An echo._C built from older sources lacks ops added since: asking the dispatcher about an op it never
    registered raised RuntimeError ("operator ... does not exist") out of every encode and of `echo info`."""
    from echo import info

    monkeypatch.setattr(extension, "load_error", lambda: None)
    monkeypatch.setitem(extension.OPS, "older_op", "stft")  # an op this process has no registration of
    assert not extension.has_op("older_op", "cpu")
    assert "rebuild" in extension.why_unavailable("older_op", "cpu")
    assert "older_op (no kernels)" in info.report()


@pytest.fixture
def stale_extension(tmp_path, monkeypatch):
    """echo._C found as a library that does not load (here not even ELF; after a torch upgrade, one with an
    undefined symbol): the package's path points at it and no echo._C is imported yet."""
    import sys
    from importlib.machinery import EXTENSION_SUFFIXES

    import echo

    (tmp_path / f"_C{EXTENSION_SUFFIXES[0]}").write_text("built against another torch\n")
    monkeypatch.setattr(echo, "__path__", [str(tmp_path)])
    monkeypatch.delitem(sys.modules, "echo._C", raising=False)
    extension._load_error.cache_clear()
    yield
    monkeypatch.undo()
    extension._load_error.cache_clear()


def test_a_stale_extension_warns_once_naming_the_rebuild(stale_extension):
    """A torch upgrade leaves an echo._C that no longer loads: echo fell back without a word (every encode
    slower), and the reason, in `echo info` only, did not say how to rebuild."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert not extension.has_op("ragged_spectrogram", "cpu")
    assert [str(w.message) for w in caught] == [extension.load_error()]
    for text in ("failed to load", "pip install --no-build-isolation -e .", "python setup.py build_ext --inplace"):
        assert text in extension.load_error()


def test_two_threads_on_first_use_load_the_extension_once(stale_extension, monkeypatch):
    """Encodes in two threads both reach the first load: it must run (and warn) once."""
    import threading
    import time

    loads, warned = [], []
    real_import = extension.importlib.import_module

    def slow_import(name, *args):
        if name == "echo._C":
            loads.append(name)
            time.sleep(0.2)
        return real_import(name, *args)

    monkeypatch.setattr(extension.importlib, "import_module", slow_import)
    monkeypatch.setattr(extension.warnings, "warn", lambda message, *a, **k: warned.append(message))
    threads = [threading.Thread(target=extension.has_op, args=("short_attention", "cpu")) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1 and len(warned) == 1


def test_info_says_a_triton_that_does_not_import_runs_nothing(capsys, broken_triton):
    """An installed triton whose import fails (a driver mismatch) was reported "importable" and as the CUDA
    default for tokens, which the dispatch then failed to import at every encode."""
    text, rows = info_rows(capsys)
    assert "triton not importable" in text.splitlines()[0]
    assert rows["tokens", "cuda"][0] == "torch" and "triton not importable" in rows["tokens", "cuda"][1]


@pytest.mark.parametrize("forced", [False, True])
def test_info_says_the_interpreter_keeps_triton_off_cuda(capsys, monkeypatch, forced):
    """Under TRITON_INTERPRET=1 (set when echo_kernels was imported) the CUDA rows named Triton the tokens
    default, which ran in the CPU interpreter; forced, the row said nothing of it."""
    monkeypatch.setattr(pytest.importorskip("echo_kernels"), "INTERPRETED", True)
    if forced:
        monkeypatch.setenv("ECHO_BACKEND_TOKENS", "triton")
    backends._warn_interpreted.cache_clear()  # another test may have used up the one-time warning
    with warnings.catch_warnings(record=True) as caught:  # the row says it: no RuntimeWarning beside it
        warnings.simplefilter("always")
        _, rows = info_rows(capsys)
    assert [str(w.message) for w in caught] == []
    backend, why = rows["tokens", "cuda"]
    assert backend == ("triton" if forced else "torch")
    assert "CPU interpreter here (TRITON_INTERPRET was set when echo_kernels was imported)" in why
    if forced:  # info left the one-time warning for a real call
        with pytest.warns(RuntimeWarning, match="CPU interpreter"):
            backends.choose("tokens", torch.device("cuda"))
    else:  # forcing on a CPU works under the interpreter: the row said it needed TRITON_INTERPRET=1 all the same
        assert "only on CUDA (when forced, it runs in Triton's CPU interpreter)" in rows["tokens", "cpu"][1]


def test_info_says_forcing_triton_on_cpu_needs_the_interpreter(capsys, monkeypatch):
    monkeypatch.setattr(pytest.importorskip("echo_kernels"), "INTERPRETED", False)
    _, rows = info_rows(capsys)
    assert ("triton runs by default only on CUDA (forcing it on CPU needs TRITON_INTERPRET=1 set before "
            "echo_kernels is imported)") in rows["tokens", "cpu"][1]


def test_info_names_the_audio_files_this_install_reads(capsys, monkeypatch):
    """An MP3 a system's libsndfile (before 1.1) cannot decode was "Format not recognised", as a damaged file; info
    says which files the install reads, and what reads the rest."""
    import sys

    from echo.data import AUDIO_SUFFIXES

    soundfile = pytest.importorskip("soundfile")
    text, _ = info_rows(capsys)
    found = f"audio files: soundfile {soundfile.__version__}, libsndfile {soundfile.__libsndfile_version__}: "
    if "MP3" in soundfile.available_formats() and "OPUS" in soundfile.available_subtypes("OGG"):
        assert found + " ".join(AUDIO_SUFFIXES) + "\n" in text
    monkeypatch.setattr(soundfile, "available_formats", lambda: {"WAV": "Microsoft WAV", "OGG": "OGG"})
    monkeypatch.setattr(soundfile, "available_subtypes", lambda kind=None: {"VORBIS": "Vorbis"})
    text, _ = info_rows(capsys)
    read = " ".join(suffix for suffix in AUDIO_SUFFIXES if suffix not in (".mp3", ".opus"))
    assert f"{found}{read}; not .opus .mp3 (pip install -U soundfile: its wheels read them)\n" in text
    monkeypatch.setitem(sys.modules, "soundfile", None)
    text, _ = info_rows(capsys)
    assert "audio files: plain 16-bit WAV only (soundfile: " in text and "pip install 'echo-fm[audio]')" in text
