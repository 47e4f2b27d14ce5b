"""Which implementation of an op runs: chosen per device, forced by an argument or an environment variable.

Backends: "triton" (CUDA, or CPU under TRITON_INTERPRET=1 when forced), "csrc" (the compiled extension, when
built), "torch" (batched pure-torch fast path), "reference" (the readable truth). Each op lists its own, fastest
first (ops/<op>.available_backends); Triton is a default only on CUDA, only for tokens and attention, and not
under Triton's interpreter.
`ECHO_BACKEND=torch` forces every op; `ECHO_BACKEND_ATTENTION=reference` forces one op.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("triton", "csrc", "torch", "reference")
# Measured on an H100 (bench/RESULTS.md, "GPU run"): the Triton front end (fp32 DFT on CUDA cores) is ~10x
# slower than cuFFT through torch, and the Triton residual+LayerNorm forward ~3x slower than torch's own; they
# run only when asked for. Tokens and attention kernels win and are the CUDA defaults.
TRITON_OFF_BY_DEFAULT = frozenset({"stft", "norm"})


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


TRITON_MISSING = "triton is not installed (pip install 'echo-fm[triton]')"


def triton_import_error() -> str | None:
    """Why the Triton kernels do not import, or None: a triton that is installed but does not import (a driver
    mismatch, say) runs nothing, on CUDA either, where it would otherwise be the default and fail at every call."""
    if not triton_installed():
        return TRITON_MISSING
    try:
        importlib.import_module("echo_kernels")
    except Exception as error:
        return f"triton does not import ({type(error).__name__}: {error})"
    return None


def triton_interpreted() -> bool:
    """Whether the Triton kernels were defined in Triton's interpreter (TRITON_INTERPRET=1 when echo_kernels was
    imported: Triton reads it then, not at each launch). They then run on CPU tensors, and on CUDA tensors only
    by copying them through the CPU."""
    return triton_import_error() is None and importlib.import_module("echo_kernels").INTERPRETED


INTERPRETED_ON_CUDA = ("the Triton kernels run in Triton's CPU interpreter here (TRITON_INTERPRET was set when "
                       "echo_kernels was imported): CUDA tensors go through the CPU, orders of magnitude slower")


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels run on `device`: CUDA, or a CPU when they were defined in the interpreter."""
    return triton_import_error() is None and (device.type == "cuda" or triton_interpreted())


OPS = ("stft", "tokens", "attention", "norm")
OP_VARIABLES = frozenset(f"ECHO_BACKEND_{op.upper()}" for op in OPS)


class BackendError(ValueError):
    """A backend asked for that cannot run (unknown, or not on this device): a setting to fix, so a job over many
    files stops at it rather than reporting every file as bad."""


def check_environment(environ=os.environ) -> None:
    """ECHO_BACKEND and ECHO_BACKEND_<OP> name known ops and backends: a typo in either would otherwise be
    ignored (the op runs its default) or fail file by file deep inside a long job."""
    for name, value in environ.items():
        if not name.startswith("ECHO_BACKEND") or not value:
            continue
        op = name.removeprefix("ECHO_BACKEND_").lower()
        if name != "ECHO_BACKEND" and name not in OP_VARIABLES:  # the dispatch reads these names exactly
            raise BackendError(f"{name}: no such op; set ECHO_BACKEND or ECHO_BACKEND_<OP> for an op of "
                             f"{', '.join(op.upper() for op in OPS)}")
        if value not in BACKENDS:
            raise BackendError(f"{name}={value}: unknown backend {value!r}; choose from {', '.join(BACKENDS)}")
        if value == "triton" and not triton_installed():
            raise BackendError(f"{name}={value}: {TRITON_MISSING}")
        # ECHO_BACKEND forces only the ops without an ECHO_BACKEND_<OP> of their own (which wins, as in `request`)
        ruled = [op] if name != "ECHO_BACKEND" else [
            other for other in OPS if not environ.get(f"ECHO_BACKEND_{other.upper()}")]
        lacking = [other for other in ruled if value not in _backends_of(other)]
        if lacking:  # e.g. ECHO_BACKEND=csrc: the token stage has no compiled op, so every encode would fail
            ops_by_reason = {}  # ECHO_BACKEND=csrc with echo._C not loading: tokens lacks it for another reason
            for other in lacking:
                ops_by_reason.setdefault(missing_backend(other, value, torch.device("cpu")), []).append(other)
            said = "; ".join(f"no {value!r} backend here for {', '.join(ops)} ({reason})"
                             for reason, ops in ops_by_reason.items())
            hint = "; force it for single ops instead (ECHO_BACKEND_<OP>)" if name == "ECHO_BACKEND" else ""
            raise BackendError(f"{name}={value}: {said}{hint}")


def check_argument(ops: tuple[str, ...], device: torch.device, backend: str | None, head_dim: int,
                   dtype: torch.dtype) -> None:
    """A backend forced for `ops` (argument or environment) that one of them cannot run on `device`, or whose
    attention cannot take heads of `head_dim` in `dtype`, is said before any work: the op would refuse it only
    when reached, after the front end's work (seconds on a long call)."""
    from . import attention

    for op in ops:
        if op == "attention":
            choose(op, device, backend, attention.fitting_backends(head_dim, dtype, device, backend))
        else:
            choose(op, device, backend, importlib.import_module(f"echo.ops.{op}").available_backends(device))


def _backends_of(op: str) -> tuple[str, ...]:
    return importlib.import_module(f"echo.ops.{op}").available_backends(torch.device("cpu"))


def offered_backends(op: str) -> tuple[str, ...]:
    """Every backend `op` has where everything is installed and built: all but "csrc" for an op that echo._C
    does not compile (tokens)."""
    from .. import extension

    return tuple(name for name in BACKENDS if name != "csrc" or extension.compiled_op(op))


def missing_backend(op: str, backend: str, device: torch.device) -> str:
    """Why `backend` is not among `op`'s backends on `device`, with the fix: an op that has no such backend in
    any build says which it has; a compiled op that is not built, did not load or has no kernel for the device
    says that (its rebuild command). Either way a user who forced it learns whether a rebuild would help."""
    from .. import extension

    offered = offered_backends(op)
    if backend not in offered:
        return f"the compiled extension echo._C has no {op} op; {op} offers {', '.join(offered)}"
    why_not = extension.why_unavailable(extension.compiled_op(op), device) if backend == "csrc" else None
    return why_not or f"the {backend!r} {op} does not take these inputs on {device}"


def forced(op: str, backend: str | None = None) -> str | None:
    """The backend asked for `op`: the argument, else ECHO_BACKEND_<OP>, else ECHO_BACKEND; None when free."""
    return request(op, backend)[0]


def request(op: str, backend: str | None) -> tuple[str | None, str]:
    """The backend asked for `op` and where the request came from, as an error message names it."""
    if backend:
        return backend, f"backend={backend!r}"
    for name in (f"ECHO_BACKEND_{op.upper()}", "ECHO_BACKEND"):
        if os.environ.get(name):
            return os.environ[name], f"{name}={os.environ[name]}"
    return None, ""


def choose(op: str, device: torch.device, requested: str | None = None, available: tuple[str, ...] = BACKENDS,
           warn: bool = True) -> str:
    """The backend for `op` on `device`: the requested one (argument, then environment), else the first of
    `available` (listed fastest first) that can run, Triton by default only on CUDA and where it measured faster.
    A request that cannot run is an error naming the setting that made it; one that runs in Triton's interpreter
    on CUDA warns once, unless `warn` is False (echo info says so in its own words)."""
    requested, source = request(op, requested)
    if requested:
        if requested not in BACKENDS:
            raise BackendError(f"{source}: unknown backend {requested!r} for {op}; choose from {', '.join(BACKENDS)}")
        if requested == "triton" and (why_not := triton_import_error()):
            raise BackendError(f"{source}: {op} cannot run on Triton: {why_not}")
        if requested == "triton" and not triton_available(device):
            raise BackendError(f"{source}: the Triton {op} runs on CUDA tensors, or on CPU tensors in Triton's "
                               f"interpreter (TRITON_INTERPRET=1 set before echo_kernels is imported); got {device}")
        if requested not in available:
            raise BackendError(f"{source}: no {requested!r} backend here for {op} "
                               f"({missing_backend(op, requested, device)})")
        if warn and requested == "triton" and device.type == "cuda" and triton_interpreted():
            _warn_interpreted(source)
        return requested
    # the interpreter on CUDA would pass every call through the CPU: the default falls to the next backend
    triton_by_default = (device.type == "cuda" and op not in TRITON_OFF_BY_DEFAULT and triton_available(device)
                         and not triton_interpreted())
    return next(name for name in available if name != "triton" or triton_by_default)


@functools.cache
def _warn_interpreted(source: str) -> None:
    """Once per setting: a forced Triton backend runs under the interpreter (its tests, a kernel being debugged),
    but a TRITON_INTERPRET left set from a test run would otherwise slow every call without a word."""
    warnings.warn(f"{source}: {INTERPRETED_ON_CUDA}; start without TRITON_INTERPRET for the GPU kernels",
                  RuntimeWarning, stacklevel=3)
