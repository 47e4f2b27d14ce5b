"""Walking folders of recordings for the commands that take them (encode, eval): symbolic links to folders are
followed, as data sets are often linked in from other disks, and each folder is listed once."""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .wording import counted


def finder_metadata(name: str) -> bool:
    """macOS's ._<name> files: another file's Finder metadata, one beside every recording copied from a Mac to a
    USB drive or a network share. They end in .wav like it, but hold no audio."""
    return name.startswith("._")


def by_suffix(top: Path, walked: Iterable[tuple[Path, list[str]]], suffixes) -> tuple[list[Path], str]:
    """The files of `walked` (what `walk(top)` yields) whose suffix, in any case, is one of `suffixes`; and a note
    counting the others by suffix ("" if none), as a folder of MP3s was left out without a word. Hidden names and
    what lies in hidden folders (.git/, macOS's ._ files) are not counted: no one took them for recordings."""
    found, others = [], Counter()
    for where, names in walked:
        hidden = any(part.startswith(".") for part in where.relative_to(top).parts)
        for name in names:
            suffix = Path(name).suffix.lower()
            if suffix in suffixes:
                found.append(where / name)
            elif not hidden and not name.startswith("."):
                others[suffix or "no suffix"] += 1
    counts = ", ".join(f"{suffix}: {count}" for suffix, count in sorted(others.items(), key=lambda s: (-s[1], s[0])))
    note = f"left out of {top}: {counted(others.total(), 'file')} with other suffixes ({counts}); files are read from " \
        f"folders by suffix: {', '.join(sorted(suffixes))}" if others else ""
    return found, note


def walk(top: Path, skip: Callable[[Path, str], None], recursive: bool = True) -> Iterator[tuple[Path, list[str]]]:
    """(folder, the names in it that are not folders) for `top` and, if `recursive`, every folder below it. A
    folder is listed once, under its real path where it has one below `top`; `skip(path, reason)` hears of each
    folder left out: a link back to a folder above it (a loop), a second link to one already listed, a folder
    that cannot be read."""
    def unreadable(error: OSError) -> None:
        skip(Path(error.filename), f"folder not readable: {error.strerror}")

    if not top.is_dir():
        return
    listed, starts = {}, [top]  # (device, inode) of each folder listed: the path it was listed under
    while starts:  # the real folders under a start first, then the linked ones found there
        for folder, subfolders, names in os.walk(starts.pop(0), onerror=unreadable):
            folder = Path(folder)
            try:
                status = folder.stat()
            except OSError as error:  # gone since its parent was listed
                unreadable(error)
                continue
            first = listed.setdefault((status.st_dev, status.st_ino), folder)
            if first != folder:
                skip(folder, f"a symbolic link loop back to {first}" if first in folder.parents
                     else f"the same folder as {first}, listed there")
                subfolders.clear()
                continue
            if recursive:
                # in sorted order, not the file system's: of two links to one folder, the one listed (and naming its
                # files) is the same on every machine
                subfolders.sort()
                # islink, not is_symlink: in a folder that may be read but not searched that raises, ending the walk
                starts += [folder / name for name in subfolders if os.path.islink(folder / name)]
            else:
                subfolders.clear()
            yield folder, names
