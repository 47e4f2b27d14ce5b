"""`python -m echo info`: which backend each op runs on CPU and on CUDA, and why (built or not, Triton
importable or not, forced by the environment), so a slow or surprising run can be explained at a glance."""
from __future__ import annotations

import importlib

import torch

from . import extension
from .data.formats import AUDIO_SUFFIXES, missing_decoder
from .ops import attention as attention_ops
from .ops import backend as backends
from .ops import linear as linear_ops

# ops whose dispatch exposes available_backends(device): op name (as in ECHO_BACKEND_<OP>) -> module
OPS = {op: f"echo.ops.{op}" for op in backends.OPS}
DEVICES = (torch.device("cpu"), torch.device("cuda"))
CPUINFO = "/proc/cpuinfo"
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX-512, Arm (FEAT_BF16)


def skipped_reasons(op: str, device: torch.device, available: tuple[str, ...], chosen: str) -> list[str]:
    """Why the backends listed before the chosen one, and a compiled op that is not built, do not run."""
    reasons = []
    if "triton" in available[: available.index(chosen)]:
        if backends.triton_import_error():
            reasons.append("triton not importable")
        elif device.type != "cuda":
            forcing = ("when forced, it runs in Triton's CPU interpreter" if backends.triton_interpreted() else
                       "forcing it on CPU needs TRITON_INTERPRET=1 set before echo_kernels is imported")
            reasons.append(f"triton runs by default only on CUDA ({forcing})")
        elif op in backends.TRITON_OFF_BY_DEFAULT:
            reasons.append("triton measured slower here, runs only when forced (bench/RESULTS.md)")
        elif backends.triton_interpreted():
            reasons.append(f"triton not a default: {backends.INTERPRETED_ON_CUDA}")
    compiled = extension.compiled_op(op)
    if compiled is None:
        reasons.append("no compiled op")
    elif "csrc" not in available:
        why_not = extension.why_unavailable(compiled, device)
        reasons.append(f"csrc: {why_not}" if why_not else f"csrc: {compiled} runs in CPU inference (echo.packed)")
    return reasons


def describe(op: str, device: torch.device) -> tuple[str, str]:
    """(backend, why) of op on device."""
    available = importlib.import_module(OPS[op]).available_backends(device)
    _, forced = backends.request(op, None)
    try:
        # the row says what the one-time interpreter warning says: not printed beside it, nor used up
        chosen = backends.choose(op, device, available=available, warn=False)
    except ValueError as error:
        return "error", str(error)
    if forced:
        interpreted = chosen == "triton" and device.type == "cuda" and backends.triton_interpreted()
        return chosen, "; ".join([f"forced by {forced}", *[backends.INTERPRETED_ON_CUDA] * interpreted,
                                  *heads_taken(op, device, available, chosen, forced)])
    why = ["default"] + skipped_reasons(op, device, available, chosen) + heads_taken(op, device, available, chosen)
    return chosen, "; ".join(why)


def heads_taken(op: str, device: torch.device, available: tuple[str, ...], chosen: str,
                forced: str | None = None) -> list[str]:
    """Which heads the chosen attention backend takes, and where a custom config's others go: "csrc" alone
    read as if every model's attention ran compiled."""
    if op != "attention" or chosen not in attention_ops.TAKES:
        return []
    others = "are refused" if forced else "run on " + backends.choose(
        op, device, available=tuple(name for name in available if name != chosen))
    return [f"{chosen} takes {attention_ops.TAKES[chosen]}; other heads {others}"]


def cpu_flags() -> set[str] | None:
    """The CPU's features as Linux reports them (x86 `flags`, Arm `Features`); None where it does not."""
    try:
        with open(CPUINFO) as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), None)
    except OSError:
        return None
    return None if line is None else set(line.partition(":")[2].split())


def why_no_tiles() -> str:
    """Which of the tile kernel's three needs is missing: the compiled op, AMX in the CPU, the OS's permission."""
    if not extension.has_op("tile_attention", "cpu"):
        return "echo._C is not built with the tile kernel"
    flags = cpu_flags()
    if flags is None:
        return "a CPU with AMX, and an OS kernel that allows its tiles"
    return ("the kernel does not allow AMX tiles to this process" if "amx_tile" in flags
            else "no AMX reported by this CPU and kernel")


def bf16_products() -> str:
    """Whether the CPU multiplies bf16 in hardware. Without it `--dtype bfloat16` still runs (converted on the
    way) and still rounds like bf16, but the products' speed-up over float32 (2.2x with AVX512-BF16, 4.5-10x
    with AMX: bench/RESULTS.md) is not to be counted on: one choosing a dtype for an edge CPU is told to measure."""
    flags = cpu_flags()
    if flags is None:
        return "unknown (this system does not list the CPU's features)"
    native = [flag for flag in BF16_FLAGS if flag in flags]
    if native:
        return f"in hardware ({', '.join(native)})"
    return (f"not in hardware (no {', '.join(BF16_FLAGS[:-1])} or {BF16_FLAGS[-1]} reported): bfloat16 may be "
            f"slower than float32 here; `python bench/encode_throughput.py` measures both")


def audio_files() -> str:
    """The audio files this install reads (encode, eval, pretrain): with soundfile, its libsndfile's; without it,
    plain 16-bit WAV. An MP3 read as "Format not recognised" is explained here at a glance."""
    try:
        import soundfile
    except (ImportError, OSError) as error:  # OSError: installed without its C library
        return f"plain 16-bit WAV only (soundfile: {error}; pip install 'echo-fm[audio]')"
    unread = [suffix for suffix in AUDIO_SUFFIXES if missing_decoder(soundfile, f"file{suffix}")]
    found = f"soundfile {soundfile.__version__}, libsndfile {soundfile.__libsndfile_version__}"
    if not unread:
        return f"{found}: {' '.join(AUDIO_SUFFIXES)}"
    read = [suffix for suffix in AUDIO_SUFFIXES if suffix not in unread]
    return f"{found}: {' '.join(read)}; not {' '.join(unread)} (pip install -U soundfile: its wheels read them)"


def report() -> str:
    lines = [
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'not built'}, "
        f"{'a GPU' if torch.cuda.is_available() else 'no GPU'} visible); "
        f"triton {'importable' if backends.triton_import_error() is None else 'not importable'}",
    ]
    load_error = extension.load_error()
    if load_error:
        lines.append(f"compiled extension: {load_error}")
    else:
        ops = [
            f"{name} ({', '.join(d.type for d in DEVICES if extension.has_op(name, d)) or 'no kernels'})"
            for name in extension.OPS
        ]
        lines.append(f"compiled extension echo._C: loaded; ops: {', '.join(ops)}")
    packed = [str(dtype)[6:] for dtype in (torch.float32, torch.bfloat16) if linear_ops.available(dtype)]
    lines.append(f"inference on the CPU: oneDNN packed products in {', '.join(packed) if packed else 'no dtype'}")
    lines.append(f"bf16 products on this CPU: {bf16_products()}")
    tiles = "yes" if attention_ops.tiles_usable() else f"no ({why_no_tiles()})"
    sizes = f"{attention_ops.TILE_FROM}-{attention_ops.TILE_TOKENS}"
    lines.append(f"bf16 attention of {sizes}-token sequences on AMX tiles: {tiles}")
    lines.append(f"audio files: {audio_files()}")
    try:
        backends.check_environment()
    except ValueError as error:  # other commands stop on it; here it is reported with the rows it affects
        lines.append(f"environment: {error}")
    lines.append("")
    rows = [(op, device.type, *describe(op, device)) for op in OPS for device in DEVICES]
    widths = [max(len(row[i]) for row in rows + [("op", "device", "backend")]) for i in range(3)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(("op", "device", "backend"), widths)) + "  why")
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return "\n".join(lines)


def add_arguments(parser) -> None:
    del parser  # no options


def run(args) -> int:
    print(report())
    return 0


if __name__ == "__main__":  # `python -m echo.info`, as `python -m echo info`
    raise SystemExit(run(None))
