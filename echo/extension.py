"""The optional compiled extension echo._C (csrc/), loaded lazily on first use.

Importing echo._C registers its ops with the torch dispatcher as torch.ops.echo.<name>, with a kernel per
device type it was built for (CPU always, CUDA when built with nvcc against a CUDA torch). When it is
missing or fails to load, every op falls back to its next backend, and `why_unavailable()` says why.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import struct
import threading
import warnings
from pathlib import Path

import torch

ELF64_PROGRAM_HEADER = 56  # bytes of one 64-bit program header
PN_XNUM = 0xFFFF  # "the count is elsewhere" (section header 0): not read here
# compiled op -> the echo op (echo/ops/, backend name in ECHO_BACKEND_<OP>) whose contract it implements.
# residual_layer_norm is the norm's csrc backend on a CPU, run by the inference path (echo.packed) only.
# tile_attention runs inside attention's csrc backend, in bf16 where the CPU has AMX tiles.
OPS = {"ragged_spectrogram": "stft", "short_attention": "attention", "tile_attention": "attention",
       "residual_layer_norm": "norm"}
CUDA_KERNELS = frozenset({"ragged_spectrogram"})  # the compiled ops with a CUDA kernel too (csrc/cuda/)
REBUILD = "`pip install --no-build-isolation -e .` in echo's source tree (or `python setup.py build_ext --inplace` there)"
_loading = threading.Lock()


def load_error() -> str | None:
    """None once echo._C is imported; else the reason it could not be. A library that is there but does not
    load (a torch upgrade since it was built) is warned about once: every op would run slower, silently."""
    with _loading:  # threads encoding at once on first use: one load, one warning
        return _load_error()


@functools.cache
def _load_error() -> str | None:
    spec = importlib.util.find_spec("echo._C")
    if spec is None or spec.origin is None:
        return f"echo._C is not built (install with a C++ compiler and {REBUILD}; ECHO_BUILD_EXT=0 skips it)"
    damage = cut_short(Path(spec.origin))
    if damage:  # loading it would kill the process (SIGBUS), which no Python code can catch
        reason = f"{spec.origin} is cut short ({damage})"
    else:
        try:
            importlib.import_module("echo._C")
            return None
        except Exception as error:  # a missing symbol, a foreign build, an error in its own initialisation
            reason = f"{type(error).__name__}: {error}"
    reason = (f"echo._C failed to load: {reason}; echo runs its torch ops instead. Rebuild it against the "
              f"installed torch {torch.__version__}: {REBUILD}")
    warnings.warn(reason, RuntimeWarning)
    return reason


def cut_short(path: Path) -> str | None:
    """How an ELF shared library is shorter than its own program headers say (an interrupted copy or build),
    or None. Only plain 64-bit ELF is read; anything else (other formats, odd headers, an unreadable file) is
    left to the loader, which says what is wrong with it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
                return None
            order = "<" if header[5] == 1 else ">"
            (table_offset,) = struct.unpack_from(order + "Q", header, 0x20)
            entry_size, entries = struct.unpack_from(order + "HH", header, 0x36)
            if entry_size < ELF64_PROGRAM_HEADER or entries == PN_XNUM:
                return None
            handle.seek(table_offset)
            table = handle.read(entry_size * entries)
    except OSError:
        return None
    if len(table) < entry_size * entries:
        return f"{size} bytes, its program headers end at {table_offset + entry_size * entries}"
    for entry in range(entries):
        start = entry * entry_size
        (kind,) = struct.unpack_from(order + "I", table, start)
        offset, _, _, file_size = struct.unpack_from(order + "4Q", table, start + 8)
        # PT_LOAD: a segment mapped from the file (one of zero file bytes, all bss, may start past its end)
        if kind == 1 and file_size and offset + file_size > size:
            return f"{size} bytes, a loaded segment ends at byte {offset + file_size}"
    return None


def compiled_op(op: str) -> str | None:
    """The compiled op whose presence makes echo op `op`'s "csrc" backend, or None where echo._C has none."""
    return next((name for name, echo_op in OPS.items() if echo_op == op), None)


def has_op(name: str, device: torch.device | str) -> bool:
    """Whether echo._C is loaded and has a kernel of op `name` for this device's type."""
    return load_error() is None and _has_kernel(name, torch.device(device).type)


@functools.cache
def _has_kernel(name: str, device_type: str) -> bool:
    """Cached: the registrations do not change once echo._C is loaded, and the encoder's layers ask at
    every call. An op that a build from older sources never registered is asked about first: the dispatcher
    raises on a per-device query of it."""
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (dispatch_key is not None and torch._C._dispatch_has_kernel(f"echo::{name}")
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"echo::{name}", dispatch_key))


def why_unavailable(name: str, device: torch.device | str) -> str | None:
    """None when op `name` runs compiled on this device, else the reason it does not."""
    reason = load_error()
    if reason is not None:
        return reason
    if has_op(name, device):
        return None
    if not torch._C._dispatch_has_kernel(f"echo::{name}"):
        return f"echo._C has no op {name} (built from older sources); rebuild it: {REBUILD}"
    device_type = torch.device(device).type
    if device_type == "cuda" and name in CUDA_KERNELS:
        return "echo._C was built without CUDA (needs a CUDA torch and nvcc at build time)"
    return f"echo._C has no {device_type} kernel for {name}"
