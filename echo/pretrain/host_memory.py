"""glibc's malloc in a CPU pretraining run. Every step frees gigabytes of activations and allocates them again at
other sizes (a packed batch's token count varies), and the heap that serves blocks under glibc's mmap threshold
fragments: in a CPU run of 14 data workers the trainer grew to 14 GB by step 187 and was killed for memory on a
24 GB machine. With blocks over 4 MB mapped on their own (returned on free) on huge pages (cheap to fault in
again, where the kernel's transparent huge pages are `madvise` or `always`), bench/pretrain_memory.py measured
half the peak memory at 1.06x the step time, the same losses. glibc reads these settings only when a process
starts, so the trainer can only name them."""
from __future__ import annotations

import os
import platform

TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.hugetlb=1"


def allocator_advice(device_type: str, environ=os.environ, libc: str | None = None) -> str | None:
    """The line to print when a CPU run starts under glibc with its default malloc settings, else None."""
    libc = platform.libc_ver()[0] if libc is None else libc
    if device_type != "cpu" or libc != "glibc" or "GLIBC_TUNABLES" in environ:
        return None
    return (f"note: glibc's heap fragments over a CPU run (a trainer reached 14 GB by step 187); start long runs "
            f"with GLIBC_TUNABLES={TUNABLES} for half the peak memory at ~1.06x the step time "
            "(bench/pretrain_memory.py)")
