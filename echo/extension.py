"""The optional compiled extension echo._C (csrc/), loaded lazily on first use.

Importing echo._C registers its ops with the torch dispatcher as torch.ops.echo.<name>, with a kernel per
device type it was built for (CPU always, CUDA when built with nvcc against a CUDA torch). When it is
missing or fails to load, every op falls back to its next backend, and `why_unavailable()` says why.
"""
from __future__ import annotations

import functools
import importlib

import torch

# compiled op -> the echo op (echo/ops/, backend name in ECHO_BACKEND_<OP>) whose contract it implements.
# residual_layer_norm is the norm's csrc backend on a CPU, run by the inference path (echo.packed) only.
# tile_attention runs inside attention's csrc backend, in bf16 where the CPU has AMX tiles.
OPS = {"ragged_spectrogram": "stft", "short_attention": "attention", "tile_attention": "attention",
       "residual_layer_norm": "norm"}


@functools.cache
def load_error() -> str | None:
    """None once echo._C is imported; else the reason it could not be."""
    try:
        importlib.import_module("echo._C")
    except ImportError as error:
        if getattr(error, "name", None) == "echo._C":
            return ("echo._C is not built (install with a C++ compiler and "
                    "`pip install --no-build-isolation -e .`; ECHO_BUILD_EXT=0 skips it)")
        return f"echo._C failed to load: {error} (rebuild it against the installed torch {torch.__version__})"
    except OSError as error:
        return f"echo._C failed to load: {error}"
    return None


def has_op(name: str, device: torch.device | str) -> bool:
    """Whether echo._C is loaded and has a kernel of op `name` for this device's type."""
    return load_error() is None and _has_kernel(name, torch.device(device).type)


@functools.cache
def _has_kernel(name: str, device_type: str) -> bool:
    """Cached: the registrations do not change once echo._C is loaded, and the encoder's layers ask at
    every call."""
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return dispatch_key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"echo::{name}", dispatch_key)


def why_unavailable(name: str, device: torch.device | str) -> str | None:
    """None when op `name` runs compiled on this device, else the reason it does not."""
    reason = load_error()
    if reason is not None:
        return reason
    if has_op(name, device):
        return None
    device_type = torch.device(device).type
    if device_type == "cuda":
        return "echo._C was built without CUDA (needs a CUDA torch and nvcc at build time)"
    return f"echo._C has no {device_type} kernel for {name}"
