"""Where pretraining audio comes from: a folder tree indexed once into a cached manifest, or WebDataset tar
shards (see shards.py). Both give the same thing: per stream (one rank x one DataLoader worker), an endless,
seeded sequence of mono examples whose rate and length are known before any audio is decoded, so that
sampling can be replayed without reading audio when a run resumes.

Every channel of a file is its own example. A file that cannot be read, or is shorter than the minimum
duration, is logged and skipped, and the skipped count is reported. Damage that the header does not show (a
truncated or corrupt stream, NaN or infinite samples) surfaces only when a crop is read: the reader raises
UnreadableAudio and sampling drops that clip.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Callable, Iterator

import numpy as np

from .. import atomic, geometry
from ..data.formats import AUDIO_SUFFIXES, libsndfile_words, logged_truncation, missing_decoder, unknown_length
from ..wording import counted

log = logging.getLogger("echo.pretrain")

MANIFEST_NAME = ".echo_manifest.csv"
MANIFEST_FIELDS = ("path", "size", "mtime_ns", "sample_rate", "frames", "channels", "problem")
# Indexing saves the manifest at least this often, so that a stop (hours into a large corpus) keeps what it opened.
MANIFEST_SAVE_SECONDS = 60.0


def soundfile():
    """The soundfile module, or a clear message on how to get it."""
    try:
        import soundfile as sf
    except (ImportError, OSError) as error:  # OSError: installed without its C library (libsndfile)
        raise ValueError("pretraining reads audio with soundfile: pip install 'echo-fm[data]'") from error
    return sf


@dataclass
class Example:
    """One mono channel of one recording; `read(start, count)` returns float32 samples of that channel."""

    key: str
    sample_rate: int
    frames: int  # samples per channel
    channel: int
    read: Callable[[int, int], np.ndarray]


class UnreadableAudio(ValueError):
    """A crop that cannot be trained on although the file's header was fine."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


def checked_read(source: str, read: Callable[[], np.ndarray], count: int) -> np.ndarray:
    """`read()`'s samples, or UnreadableAudio when decoding fails, returns fewer than `count` samples, or
    returns NaN or infinite ones (a single one turns the loss, and then every weight, into NaN)."""
    try:
        data = read()
    except RuntimeError as error:  # soundfile's LibsndfileError: e.g. "flac decoder lost sync"
        raise UnreadableAudio(source, str(error).replace("\n", " ")) from error
    if len(data) < count:
        raise UnreadableAudio(source, f"{len(data)} of {count} samples read (truncated file)")
    if not np.isfinite(data).all():
        raise UnreadableAudio(source, "NaN or infinite samples")
    return data


def too_short(frames: int, sample_rate: int, min_seconds: float) -> bool:
    return frames < max(min_seconds * sample_rate, geometry.n_fft(sample_rate))


@dataclass
class FileEntry:
    path: str  # relative to the corpus root
    size: int
    mtime_ns: int
    sample_rate: int
    frames: int
    channels: int
    problem: str  # why the file is unusable, "" when it is fine


def probe(root: Path, relative: str) -> FileEntry:
    """Header facts of one file (no samples decoded); an unreadable file (a broken link, one deleted since the
    folder was listed) gets its error as `problem`, and so does what is not a regular file, never opened: a link
    to a pipe hung the indexing, waiting for a writer."""
    path = root / relative
    try:
        stat = path.stat()
    except OSError as error:
        return FileEntry(relative, 0, 0, 0, 0, 0, f"cannot be opened: {error.strerror}")
    if not S_ISREG(stat.st_mode):
        return FileEntry(relative, stat.st_size, stat.st_mtime_ns, 0, 0, 0, "not a regular file")
    try:
        info = soundfile().info(str(path))
        if info.frames <= 0 or info.samplerate < geometry.MIN_SAMPLE_RATE:
            raise RuntimeError(f"{info.frames} frames at {info.samplerate} Hz")
        # else "shorter than --min-seconds", or trained on as it is; crops past where libsndfile stops were dropped
        if problem := logged_truncation(info) or unknown_length(info):
            raise RuntimeError(problem)
        return FileEntry(relative, stat.st_size, stat.st_mtime_ns, info.samplerate, info.frames, info.channels, "")
    except RuntimeError as error:  # soundfile raises LibsndfileError (a RuntimeError) for bad files
        said = libsndfile_words(error.error_string, path) if hasattr(error, "error_string") else str(error)
        problem = missing_decoder(soundfile(), path) or said.replace("\n", " ")
        return FileEntry(relative, stat.st_size, stat.st_mtime_ns, 0, 0, 0, problem)


def audio_files(root: Path) -> list[str]:
    """Audio files under `root` (symbolic links to folders not followed); a broken link is kept, to be reported
    as unreadable rather than left out unseen."""
    return sorted(
        str(path.relative_to(root)) for path in root.rglob("*")
        if path.suffix.lower() in AUDIO_SUFFIXES and (path.is_file() or path.is_symlink())
    )


def name_problem(relative: str) -> str:
    """Why a file cannot be opened by its name ("" when it can): soundfile and the manifest need names that
    encode, and bytes that are not UTF-8 (a Windows archive unpacked on Linux) decode to ones that do not."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return f"the file name is not valid UTF-8 ({ascii(relative)}): rename it"
    return ""


def read_manifest(path: Path) -> dict[str, FileEntry]:
    """The cached entries, or none (with a warning) when the file is not a manifest of this version."""
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            return {
                row["path"]: FileEntry(row["path"], int(row["size"]), int(row["mtime_ns"]), int(row["sample_rate"]),
                                       int(row["frames"]), int(row["channels"]), row["problem"])
                for row in csv.DictReader(handle)
            }
    except (KeyError, TypeError, ValueError, csv.Error) as error:
        log.warning("ignoring the manifest %s, which is damaged or from another version (%s): indexing the folder "
                    "again", path, f"no column {error}" if isinstance(error, KeyError) else error)
        return {}


def write_manifest(path: Path, entries) -> bool:
    """The entries, less those whose names it could not hold (name_problem; they are never opened anyway). False,
    with a warning, where it cannot be written (a read-only corpus, a full disk): it is a cache, so the index is
    used without it (the error stopped a run once every file had been opened, hours in)."""
    try:
        atomic.write_csv(path, MANIFEST_FIELDS, (dataclasses.asdict(e) for e in entries if not name_problem(e.path)))
    except OSError as error:
        log.warning("the manifest %s cannot be written (%s): the folder is indexed without it, so the next start "
                    "opens every file again; give --manifest a path that can be written to keep it", path, error)
        return False
    return True


def index_folder(root, manifest: Path | None = None) -> tuple[list[FileEntry], Path]:
    """Every audio file under `root` with its rate, frames and channels. The manifest (default
    ROOT/.echo_manifest.csv) is reused: only files that are new or changed (size, mtime) are opened again."""
    root = Path(root)
    if not root.is_dir():
        why = "is a file: name the folder that holds it" if root.exists() else "does not exist"
        raise ValueError(f"audio folder {root} {why}")
    manifest = Path(manifest) if manifest is not None else root / MANIFEST_NAME
    cached = read_manifest(manifest)
    entries, probed, last_save, saving = [], 0, time.monotonic(), True
    for relative in audio_files(root):
        problem = name_problem(relative)
        if problem:
            entries.append(FileEntry(relative, 0, 0, 0, 0, 0, problem))
            continue
        entry = cached.get(relative)
        if entry is None or not unchanged(root / relative, entry):
            entry = probe(root, relative)
            probed += 1
            if saving and time.monotonic() - last_save >= MANIFEST_SAVE_SECONDS:
                kept = {**cached, **{e.path: e for e in entries}, entry.path: entry}  # + cached ones not reached yet
                saving = write_manifest(manifest, kept.values())
                last_save = time.monotonic()
        entries.append(entry)
    if saving and (probed or sum(not name_problem(entry.path) for entry in entries) != len(cached)):
        write_manifest(manifest, entries)
    log.info("indexed %d audio files under %s (%d opened, the rest from %s)", len(entries), root, probed, manifest)
    return entries, manifest


def unchanged(path: Path, entry: FileEntry) -> bool:
    """Whether the file still has the manifest entry's size and modification time; a file that still cannot be
    opened (a broken link) is unchanged when it was recorded so, else every start opened it and rewrote the
    manifest."""
    try:
        stat = path.stat()
    except OSError:
        return (entry.size, entry.mtime_ns) == (0, 0) and entry.problem.startswith("cannot be opened")
    return (entry.size, entry.mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def usable(entries: list[FileEntry], min_seconds: float) -> tuple[list[FileEntry], dict[str, int]]:
    """The entries long and readable enough, and the counts of those skipped. Each unreadable file is logged;
    short files, expected in most corpora, get one line naming a few (each at debug level)."""
    kept, short, skipped = [], [], {"unreadable": 0, "too short": 0}
    for entry in entries:
        if entry.problem:
            log.warning("skipping unreadable %s: %s", entry.path, entry.problem)
            skipped["unreadable"] += 1
        elif too_short(entry.frames, entry.sample_rate, min_seconds):
            log.debug("skipping %s: %.3f s is shorter than %g s", entry.path, entry.frames / entry.sample_rate,
                      min_seconds)
            short.append(entry.path)
        else:
            kept.append(entry)
    if short:
        more = f" and {len(short) - 3} more" if len(short) > 3 else ""
        log.warning("skipping %s shorter than %g s (--min-seconds): %s%s", counted(len(short), "file"), min_seconds,
                    ", ".join(short[:3]), more)
    skipped["too short"] = len(short)
    return kept, skipped


def skipped_text(skipped: dict[str, int]) -> str:
    """"skipped 3 (unreadable: 1, too short: 2)": the counts of `usable`, said as the summaries say them."""
    return f"skipped {sum(skipped.values())} ({', '.join(f'{reason}: {count}' for reason, count in skipped.items())})"


def content_hash(facts: list) -> str:
    """A short hash of JSON-able facts about a corpus's files, for telling corpora apart on resume."""
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The same permutation on every rank and worker (each then takes its own share of it)."""
    return np.random.default_rng([seed, epoch]).permutation(count)


class FolderCorpus:
    """Examples of a folder tree: each channel of each usable file, reshuffled every epoch."""

    def __init__(self, root, min_seconds: float, manifest: Path | None = None):
        self.root = Path(root)
        entries, self.manifest = index_folder(self.root, manifest)
        self.files, self.skipped = usable(entries, min_seconds)
        self.items = [(f, c) for f in self.files for c in range(f.channels)]
        if not entries:  # a folder of MP3s said "0 files, skipped {'unreadable': 0, 'too short': 0}"
            raise ValueError(f"no audio files under {self.root}: pretraining reads {', '.join(AUDIO_SUFFIXES)} files")
        if not self.items:
            raise ValueError(f"no usable audio under {self.root}: {counted(len(entries), 'file')}, "
                             f"{skipped_text(self.skipped)}")

    def describe(self) -> str:
        return (f"{counted(len(self.files), 'file')} ({counted(len(self.items), 'channel')} as examples) under "
                f"{self.root}, {skipped_text(self.skipped)}")

    def fingerprint(self) -> dict:
        """What a resumed run must find again: the usable files by path relative to the root, size and
        frames (a moved or copied folder passes; files added, removed or changed in size or length do not, but
        files rewritten at the same size and length, or another folder of such files, pass: the trainer says when
        --data names another folder)."""
        return {"examples": len(self.items),
                "hash": content_hash([(entry.path, entry.size, entry.frames) for entry in self.files])}

    def check_parts(self, parts: int) -> None:
        if len(self.items) < parts:
            raise ValueError(f"{counted(len(self.items), 'example')} cannot feed {parts} streams (ranks x workers)")

    def examples(self, seed: int, part: int, parts: int) -> Iterator[Example]:
        """Endless: epoch after epoch, this stream's share (every `parts`-th) of the epoch's permutation."""
        epoch = 0
        while True:
            for index in epoch_order(len(self.items), seed, epoch)[part::parts]:
                entry, channel = self.items[index]
                yield Example(f"{entry.path}:{channel}", entry.sample_rate, entry.frames, channel,
                              self._reader(self.root / entry.path, entry.sample_rate, entry.frames, channel))
            epoch += 1

    @staticmethod
    def _reader(path: Path, sample_rate: int, frames: int, channel: int) -> Callable[[int, int], np.ndarray]:
        return channel_reader(lambda: soundfile().SoundFile(str(path)), str(path), sample_rate, frames, channel)


def channel_reader(open_audio: Callable, source: str, sample_rate: int, frames: int, channel: int,
                   told_by: str = "its index") -> Callable[[int, int], np.ndarray]:
    """`read(start, count)` of one channel of the audio `open_audio()` opens (a soundfile.SoundFile); `source`
    names it in errors. Audio without the rate, length and channel that `told_by` gave (the folder's index: a file
    rewritten during the run; a shard sample's JSON member: a wrong one) is UnreadableAudio saying both: its samples
    read at that rate would be wrong ones, a channel it lacks crashed the worker, and a crop past its end failed in
    libsndfile ("Internal psf_fseek() failed")."""

    def read(start: int, count: int) -> np.ndarray:
        def decode() -> np.ndarray:
            with open_audio() as handle:
                if handle.samplerate != sample_rate or handle.channels <= channel or handle.frames < frames:
                    changed = "changed since it was indexed" if told_by == "its index" else \
                        f"{told_by} does not describe its audio"
                    raise UnreadableAudio(source, f"{changed}: the audio is {handle.samplerate} Hz, "
                                                  f"{handle.frames} frames, {counted(handle.channels, 'channel')}; "
                                                  f"{told_by} says {sample_rate} Hz, {frames} frames, at least "
                                                  f"{counted(channel + 1, 'channel')}")
                if handle.seekable():
                    handle.seek(start)
                else:
                    skip(handle, start)
                return handle.read(count, dtype="float32", always_2d=True)[:, channel]

        return checked_read(source, decode, count)

    return read


SKIP_BLOCK = 1 << 16  # frames decoded at a time on the way to a crop in a file that cannot seek


def skip(handle, frames: int) -> None:
    """Decode and drop `frames` frames of `handle` (fewer at its end): GSM 6.10, G.721 and NMS ADPCM decode from the
    start only, and libsndfile refuses any seek in them, so every crop of such a file was dropped as unreadable."""
    while frames > 0 and (read := len(handle.read(min(frames, SKIP_BLOCK), dtype="float32"))):
        frames -= read


def decoded_reader(data: bytes, sample_rate: int, frames: int, channel: int, source: str,
                   told_by: str) -> Callable[[int, int], np.ndarray]:
    """A reader over an in-memory audio file (a shard member); `source` names it in errors, `told_by` where its rate,
    length and channels were read (channel_reader)."""
    return channel_reader(lambda: soundfile().SoundFile(io.BytesIO(data)), source, sample_rate, frames, channel,
                          told_by)
