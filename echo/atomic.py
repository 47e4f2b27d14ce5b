"""Files that are whole or absent: a crash, a kill or a power cut never leaves a half-written one.

Long jobs (encoding a folder, pretraining, building a corpus) save finished work as they go and resume from
what they find, so what they find must be whole. A file is written under a temporary name beside its final
one, flushed to the disk, then renamed onto it (a rename within a folder is atomic), and the folder's entry
is flushed too. Without the flushes a power cut after the rename can leave the new name on an empty file.
"""
from __future__ import annotations

import contextlib
import csv
import os
import re
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """The temporary beside `path`, unique to this thread of this process, NAME.PID-TID.tmp: writers side by side,
    processes or threads of one, never share one (threads sharing NAME.PID.tmp lost or tore each other's writes)."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.current_thread().native_id}.tmp")


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (another user's counts): a temporary named after it may be being written. A
    number no process can have counts as alive: such a file is no temporary of ours to delete."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return True


def remove_abandoned(folder: Path, pattern: str) -> None:
    """Delete the temporaries (files of temporary_name's form, or NAME.PID.tmp of earlier versions) under `folder`
    matching `pattern` ("x.csv.*.tmp", "sub/**/*.tmp") whose writers are gone: a kill mid-write leaves them, and
    nothing else ever would. This process's own id on one is a killed process's (a container restarted gives the
    same ids again) unless a live thread of this process has its thread id: that one may be being written. The
    pattern names the caller's own files: a user's note.2024.tmp is no temporary."""
    for temporary in Path(folder).glob(pattern):
        match = re.fullmatch(r".+\.(\d+)(?:-(\d+))?\.tmp", temporary.name)
        if match and temporary.is_file() and _abandoned(int(match[1]), match[2] and int(match[2])):
            temporary.unlink(missing_ok=True)


def _abandoned(pid: int, thread: int | None) -> bool:
    """Whether no live writer has the ids on a temporary (`thread`: None on an earlier version's, which no live
    writer of this process has)."""
    if pid != os.getpid():
        return not process_alive(pid)
    return thread not in {running.native_id for running in threading.enumerate()}


@contextmanager
def replacing(path) -> Iterator[Path]:
    """`with replacing(path) as temporary:` write `temporary`; when the block ends without error it replaces
    `path`, durably. On an error the temporary is removed and `path` is left as it was."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        # made here first, so it has the permissions any new file gets (the umask's); some writers (safetensors)
        # make their files readable by their owner alone, which another user loading a model then cannot
        temporary.unlink(missing_ok=True)  # left by a killed process whose id this one now has (containers)
        open(temporary, "xb").close()
        usual_mode = stat.S_IMODE(temporary.stat().st_mode)
        yield temporary
        os.chmod(temporary, usual_mode)
        _flush(temporary, os.O_RDWR)  # a descriptor that may write: Windows refuses to flush a read-only one
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error being raised says more than one about its temporary
            temporary.unlink(missing_ok=True)
        raise
    try:
        _flush(path.parent)
    except OSError:  # a folder that cannot be opened for a flush (Windows): the rename is still atomic
        pass


def nearest_folder(folder, what: str) -> Path:
    """`folder`, or its nearest parent that exists. ValueError naming `what` where a file or a link to nothing
    is in the way: making the folder would fail on "File exists" or "Not a directory", naming neither."""
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.parents) if path.exists() or path.is_symlink())
    if not existing.exists():  # a link to an unmounted disk
        raise ValueError(f"{what} cannot be written: {existing} is a link to {existing.readlink()}, which does not "
                         "exist")
    if not existing.is_dir():
        raise ValueError(f"{what} cannot be written: {existing} is a file, not a folder")
    return existing


def check_writable(folder, what: str) -> None:
    """Make `folder` if needed and create a file in it, before any work: a long job must not learn at its end
    that its output cannot be written. ValueError naming `what`, the reason and the folder (not the file tried,
    whose random name says nothing)."""
    folder = Path(folder)
    nearest_folder(folder, what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # the level that could not be made
        raise ValueError(f"{what} cannot be written: {error.strerror}: {error.filename or folder}") from None
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise ValueError(f"{what} cannot be written: {error.strerror}: {folder}") from None


def check_can_make(folder, what: str) -> None:
    """As check_writable, making nothing (its nearest existing folder is tried): a command refused later, its data
    found to hold no audio, leaves no empty output folder behind; it makes the folder once the data is checked."""
    check_writable(nearest_folder(folder, what), what)


def write_text(path, text: str) -> None:
    """In UTF-8, as write_csv: the credits name people whose names no locale's encoding need hold."""
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_csv(path, columns, rows) -> None:
    """Rows (dicts; keys outside `columns` are left out) under a header of `columns`, in UTF-8 whatever the locale:
    in its encoding (cp1252 on Windows, ASCII under LC_ALL=C PYTHONUTF8=0) a file named 日本.wav stopped eval."""
    with replacing(path) as temporary, open(temporary, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _flush(path: Path, mode: int = os.O_RDONLY) -> None:
    descriptor = os.open(path, mode)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
