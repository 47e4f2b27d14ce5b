"""Joining the process group of a multi-process launch (torchrun), as `encode` and `pretrain` do.

A process whose environment holds WORLD_SIZE > 1 waits in torch's rendezvous for the others, silently and for up to
30 minutes: a shell in a cluster job's container or a stale `export WORLD_SIZE=...` made a single `python -m echo
...` look hung. It says what it waits for after a while, and a failed rendezvous names the variables too."""
from __future__ import annotations

import os
import signal
import sys
import threading

import torch.distributed as dist

WAITING_NOTE_SECONDS = 20.0  # torchrun starts its processes together: their rendezvous takes a second or two


def join(backend: str) -> None:
    """`dist.init_process_group(backend)` from the environment (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT); a
    ValueError naming them where it fails."""
    world = os.environ.get("WORLD_SIZE")
    setting = f"WORLD_SIZE={world} and RANK={os.environ.get('RANK', '(unset)')} in the environment"
    advice = "run it under torchrun (torchrun --nproc-per-node N -m echo ...), or unset WORLD_SIZE and RANK for " \
             "one process"
    address = f"{os.environ.get('MASTER_ADDR', '(unset)')}:{os.environ.get('MASTER_PORT', '(unset)')}"
    note = threading.Timer(WAITING_NOTE_SECONDS, print, args=(
        f"waiting for the other processes of a {world}-process run ({setting}, MASTER_ADDR:MASTER_PORT {address}); "
        f"if no other process was started, {advice}",), kwargs={"file": sys.stderr, "flush": True})
    note.daemon = True
    note.start()
    handlers = _ending_at_once()
    try:
        dist.init_process_group(backend)
    except (ValueError, dist.DistError) as error:  # the first: a missing variable; the second: a timeout, a port
        raise ValueError(f"{setting} make this process one of a {world}-process run, which could not be joined "
                         f"({error}); {advice}") from None
    finally:
        note.cancel()
        for number, handler in handlers.items():
            signal.signal(number, handler)


def _ending_at_once() -> dict:
    """Let Ctrl-C and SIGTERM end the process at once while it waits in the rendezvous: a Python handler (Ctrl-C's
    KeyboardInterrupt, the command line's for SIGTERM) runs only once torch's wait returns, up to 30 minutes on, so
    the waiting process ignored them (and torchrun, ending a run whose other rank failed, waited 30 s to kill it).
    Nothing is kept yet to say. The handlers replaced, to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.signal(number, signal.SIG_DFL) for number in (signal.SIGINT, signal.SIGTERM)
            if callable(signal.getsignal(number))}
