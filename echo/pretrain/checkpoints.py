"""Training checkpoints: everything a killed run needs to continue exactly (student, teacher, decoder,
optimizer, scheduler, step, RNG states, each data stream's place in its plan, the meter's sums not yet logged,
the corpus's fingerprint, whether it trained in bf16), written atomically, the last K kept."""
from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .. import atomic

log = logging.getLogger("echo.pretrain")

NAME = re.compile(r"^step-(\d{9})\.pt$")
TRAINING_STATE = ("step", "config", "student", "teacher")  # what a checkpoint holds, at the least


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


def step_of(path: Path) -> int:
    return int(NAME.match(path.name)[1])


def save(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Write step-NNNNNNNNN.pt through a temporary file and a rename (a crash leaves the previous checkpoints
    whole), then delete all but the newest `keep` up to this step. Files of later steps (not this run's
    history) neither count nor go, so the checkpoint just written is never the one deleted."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / file_name(step)
    try:
        with atomic.replacing(final) as temporary:
            torch.save(state, temporary)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as "[enforce fail ...] unexpected pos"
        free = shutil.disk_usage(folder).free / 2**20
        raise OSError(f"checkpoint {final} could not be written ({error}; {free:.0f} MiB free on its disk); "
                      f"{resume_note(folder)}") from error
    for old in [p for p in checkpoint_paths(folder) if step_of(p) <= step][:-keep]:
        old.unlink()
    return final


def resume_note(folder: Path) -> str:
    """Where the same command would resume the run of `folder`, for a run that stops early."""
    kept = checkpoint_paths(folder)
    if not kept:
        return "no checkpoint yet: the same command starts the run over"
    return f"the same command resumes from {kept[-1]} (step {step_of(kept[-1])})"


def remove_temporaries(folder: Path) -> None:
    """Delete the temporaries of checkpoints whose writing a crash or kill interrupted (`step-*.pt.PID-TID.tmp`)."""
    atomic.remove_abandoned(folder, "step-*.pt.*.tmp")


def read(path: Path) -> dict:
    """The checkpoint at `path`; ValueError naming it when it does not load, or holds no training state (another
    tool's file of that name: resuming from it ended in a KeyError)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn or foreign file fails in many ways inside the unpickler
        raise ValueError(f"checkpoint {path} does not load: {error}") from error
    missing = [key for key in TRAINING_STATE if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is no echo pretraining checkpoint: it holds no {', '.join(missing)}")
    return state


def read_or_report(path: Path) -> dict | None:
    """The checkpoint at `path`, or None when it does not load (reported, so a caller can pass it over)."""
    try:
        return read(path)
    except ValueError as error:
        log.warning("skipping: %s", error)
        return None


def newest_readable(folder: Path) -> tuple[dict | None, list[Path]]:
    """(the newest checkpoint that loads, the newer ones that do not): (None, []) for a folder without
    checkpoints. ValueError when it holds checkpoints and none loads: starting over would overwrite the run."""
    paths = checkpoint_paths(folder)
    for index in reversed(range(len(paths))):
        state = read_or_report(paths[index])
        if state is not None:
            return state, paths[index + 1:]
    if paths:
        raise ValueError(f"no checkpoint in {folder} loads ({', '.join(p.name for p in paths)}"
                         f"); restore a readable one, or move them away to start the run over")
    return None, []


def check_run_folder(out: Path, saved: dict | None) -> None:
    """Refused before any step is trained: a run that could keep no checkpoint (it failed at the first, minutes
    or hours in), and a new run over a finished one whose checkpoints are gone (it would overwrite that export)."""
    folder = out / "checkpoints"
    if folder.is_symlink() and not folder.exists() or folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is not a folder (a file or a broken link), and the run keeps its checkpoints "
                         "there: move it away")
    exported = out / "model.safetensors"
    if saved is None and exported.exists():
        raise ValueError(f"{out} holds an exported encoder ({exported.name}) and no checkpoint to resume: a new run "
                         f"there would overwrite it; give another --out, or move {exported.name} away to train "
                         "from step 0 again")


def load_latest(folder: Path) -> dict | None:
    """The newest readable checkpoint (an unreadable one is reported and the one before it used), or None
    when there is none; ValueError when there are checkpoints and none loads."""
    return newest_readable(folder)[0]


def set_aside(paths: list[Path]) -> None:
    """Rename unreadable checkpoints newer than the one a run resumes from to NAME.unreadable, kept for a look
    but never tried, counted among the kept ones or reported again."""
    for path in paths:
        aside = path.with_name(path.name + ".unreadable")
        path.rename(aside)
        print(f"note: {path.name} does not load; set aside as {aside}, the run resumes from an older checkpoint")
