"""glibc's malloc under echo's CPU work, which allocates and frees blocks of megabytes at every step.

Inference (`keep_freed_memory`): an encode pass frees its activations and the next pass asks for blocks of the
same sizes. By default glibc maps blocks over its mmap threshold on their own and returns a heap top over its
trim threshold to the kernel, so the next pass faults every page in again, zeroed: 12-78 thousand page faults
per call on the encode workloads. Keeping those blocks in the heap removes the faults at about the same peak
memory (+2-17 MB); bf16 encodes ran 1.00-1.35x faster (bench/encode_throughput.py, `fast-bf16-kept-heap`). It is
a process-wide setting, so echo's own commands make it and the library leaves it to the caller.

Pretraining (`allocator_advice`): a step's activations vary in size (a packed batch's token count varies), and
the heap that serves blocks under the mmap threshold fragments: in a CPU run of 14 data workers the trainer grew
to 14 GB by step 187 and was killed for memory on a 24 GB machine. With blocks over 4 MB mapped on their own
(returned on free) on huge pages (cheap to fault in again, where the kernel's transparent huge pages are
`madvise` or `always`), bench/pretrain_memory.py measured half the peak memory at 1.06x the step time, the same
losses. glibc reads the huge-page setting only when a process starts, so the trainer can only name it."""
from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Mapping

TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.hugetlb=1"

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Every block of a 4096-token pass of any preset comes from the heap (the largest, ECHO-large's float32 MLP hidden
# layer, is 64 MB; ECHO-small's is 25 MB), and up to 256 MB freed at the heap's top stays mapped for the next pass.
HEAP_BLOCK_LIMIT = 128 << 20
KEPT_HEAP_TOP = 256 << 20


def allocator_advice(device_type: str, environ: Mapping[str, str] | None = None, libc: str | None = None) -> str | None:
    """The line to print when a CPU run starts under glibc with its default malloc settings, else None.
    `environ` and `libc` (os.environ and the process's C library by default) are for tests. The default is None,
    not os.environ, whose repr help() would print: every variable of the environment, tokens included."""
    environ = os.environ if environ is None else environ
    libc = platform.libc_ver()[0] if libc is None else libc
    if device_type != "cpu" or libc != "glibc" or "GLIBC_TUNABLES" in environ:
        return None
    return (f"note: glibc's heap fragments over a CPU run (a trainer reached 14 GB by step 187); start long runs "
            f"with GLIBC_TUNABLES={TUNABLES} for half the peak memory at ~1.06x the step time "
            "(bench/pretrain_memory.py)")


@functools.cache
def keep_freed_memory() -> bool:
    """Makes glibc keep the blocks an encode frees for the next one, once per process; False where the C
    library is not glibc or GLIBC_TUNABLES already sets its malloc (the user's choice stands)."""
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_HEAP_TOP))


def _status_mb(field: str) -> float:
    """A kB field of /proc/self/status (Linux), in MiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:")) / 1024


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: the kernel's VmHWM of its own address space, not getrusage's
    ru_maxrss, which Linux carries across fork and exec (a benchmark's worker started by a parent that had
    reached 560 MB reported 560 MB whatever it used itself). ru_maxrss where /proc is missing."""
    try:
        return _status_mb("VmHWM")
    except (OSError, StopIteration):
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return usage / 2**20 if platform.system() == "Darwin" else usage / 1024  # bytes on macOS, KiB elsewhere
