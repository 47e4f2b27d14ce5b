"""Training checkpoints: everything a killed run needs to continue exactly (student, teacher, decoder,
optimizer, scheduler, step, RNG states, batches consumed), written atomically, the last K kept."""
from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("echo.pretrain")

NAME = re.compile(r"^step-(\d{9})\.pt$")


def rng_states() -> dict:
    """Every global generator, as tensors and plain containers (so loading needs no pickled objects)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def file_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def checkpoint_paths(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if NAME.match(p.name))


def save(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Write step-NNNNNNNNN.pt through a temporary file and a rename (a crash leaves the previous checkpoints
    whole), then delete all but the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / file_name(step)
    temporary = final.with_name(final.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, final)
    for old in checkpoint_paths(folder)[:-keep]:
        old.unlink()
    return final


def read(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_or_report(path: Path) -> dict | None:
    """The checkpoint at `path`, or None when it does not load (reported, so a caller can pass it over)."""
    try:
        return read(path)
    except Exception as error:  # a torn or foreign file fails in many ways inside the unpickler
        log.warning("skipping unreadable checkpoint %s: %s", path, error)
        return None


def readable(folder: Path, newest_first: bool = False) -> Iterator[dict]:
    """The checkpoints in `folder` that load; an unreadable one is reported and passed over."""
    paths = checkpoint_paths(folder)
    for path in reversed(paths) if newest_first else paths:
        state = read_or_report(path)
        if state is not None:
            yield state


def load_latest(folder: Path) -> dict | None:
    """The newest readable checkpoint (an unreadable one is reported and the one before it used), or None."""
    return next(readable(folder, newest_first=True), None)
