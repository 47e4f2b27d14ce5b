"""Files that are whole or absent: a crash, a kill or a power cut never leaves a half-written one.

Long jobs (encoding a folder, pretraining, building a corpus) save finished work as they go and resume from
what they find, so what they find must be whole. A file is written under a temporary name beside its final
one, flushed to the disk, then renamed onto it (a rename within a folder is atomic), and the folder's entry
is flushed too. Without the flushes a power cut after the rename can leave the new name on an empty file.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """The temporary beside `path`, unique to this process (processes writing side by side never share one)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


@contextmanager
def replacing(path) -> Iterator[Path]:
    """`with replacing(path) as temporary:` write `temporary`; when the block ends without error it replaces
    `path`, durably. On an error the temporary is removed and `path` is left as it was."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        yield temporary
        _flush(temporary, os.O_RDWR)  # a descriptor that may write: Windows refuses to flush a read-only one
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:
        _flush(path.parent)
    except OSError:  # a folder that cannot be opened for a flush (Windows): the rename is still atomic
        pass


def write_text(path, text: str) -> None:
    with replacing(path) as temporary:
        temporary.write_text(text)


def write_csv(path, columns, rows) -> None:
    """Rows (dicts; keys outside `columns` are left out) under a header of `columns`."""
    with replacing(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _flush(path: Path, mode: int = os.O_RDONLY) -> None:
    descriptor = os.open(path, mode)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
