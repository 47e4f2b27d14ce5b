"""Adapters for the published data-set layouts, each reading a folder the user downloaded.

Each adapter returns a `Dataset`: the files with their labels, the reader that turns one file into
(signal (N,) or (C, N), sample rate), and the protocols that apply. A wrong layout fails with a message
that names what is missing where. Nothing is downloaded.

    dcase<year>  DCASE Task 2 2020-2025: <root>/{dev_data,eval_data}/<machine>/{train,test}/*.wav (any depth;
                 2021 as published: source_test/ and target_test/ where there is no test/); eval test labels
                 from eval_data_list_<year>.csv, in 2020 also eval_data_list.csv (a one-field row names the
                 machine, then `file,reference_file` rows as published, label and domain read from the reference
                 name, or `file,reference_file,label`)
    cwru         CWRU 12 kHz drive-end and fan-end fault .mat files; 10 classes: end (DE/FE) x fault type
                 (B, IR, OR) with the outer-race position @3/@6/@12; signal = the accelerometer at the fault's
                 end, variable X<nnn>_DE_time or X<nnn>_FE_time
    mafaulda     MAFAULDA CSV files (50 kHz); 10 classes from the path (normal, imbalance,
                 horizontal-/vertical-misalignment, {under,over}hang x {ball_fault, cage_fault, outer_race});
                 7 channels: columns 2-8 of the 8 (MAFAULDA_CHANNELS), the tachometer (column 1) left out
    iiee         IDMT-ISA electric engine: train_cut/ and test_cut/ (or test/); classes good, broken, heavyload
    iica         IDMT-ISA compressed air (48 kHz): <leak>/<condition>/<session>/<prefix>_<iO|niO>_....wav; class
                 = leak folder + leak status from the name (tubeleak_leak, tubeleak_noleak, ...); group =
                 session folder
    folder       a user's machine: <root>/normal/* is the bank, <root>/test/{normal,anomalous}/* is scored
                 (any case; files directly in <root>/test/ are scored without a label; other sub-folders are an error)
"""
from __future__ import annotations

import csv
import fnmatch
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Callable, Iterator

import numpy as np

from .. import folders
from ..data.formats import (AUDIO_SUFFIXES, UNKNOWN_FRAMES, logged_truncation, missing_decoder, truncation,
                            unknown_length)
from ..wording import counted

# Part of the embedding cache's key (echo.eval.embed): raise it when a reader returns other samples for the same
# file (another channel choice or sensor, another scaling), so that embeddings of the old samples are not reused.
# 2: MAFAULDA without the tachometer column, CWRU fan-end files from their own sensor. 3: 64-bit float files read
# in float64 (and their DC taken off before float32, inputs.as_signal).
READERS_VERSION = "3"
from . import require
from .anomaly import Clip, check_year

CWRU_RATE = 12000
MAFAULDA_RATE = 50000
# the 8 columns of a MAFAULDA file; the tachometer's pulse train only marks the shaft speed (neither vibration
# nor sound), so the channels evaluated are the other seven, in column order
MAFAULDA_COLUMNS = ("tachometer", "underhang-axial", "underhang-radial", "underhang-tangential",
                    "overhang-axial", "overhang-radial", "overhang-tangential", "microphone")
MAFAULDA_CHANNELS = MAFAULDA_COLUMNS[1:]
MAFAULDA_TOP = ("normal", "imbalance", "horizontal-misalignment", "vertical-misalignment", "underhang", "overhang")
MAFAULDA_BEARING = ("ball_fault", "cage_fault", "outer_race")
IIEE_CLASSES = ("good", "broken", "heavyload")
IICA_LEAKS = ("tubeleak", "ventleak", "ventlow")
IICA_STATUS = {"niO": "leak", "iO": "noleak"}  # a field of the file name: (nicht) in Ordnung
# outer-race sizes recorded at one position only, so the mirror's OR/<size>/ folder has no @<position> folder
CWRU_SINGLE_POSITION = {("DE", "014"): "@6"}
DCASE_TEST_FOLDERS = ("test", "source_test", "target_test")  # source_test/ and target_test/: DCASE 2021 as published
DCASE_SPLIT_FOLDERS = ("dev_data", "eval_data")  # the published names: the only ones above --data that count
FOLDER_TEST_LABELS = {"normal": 0, "anomalous": 1, "anomaly": 1}  # test/ sub-folders, matched case-insensitively
NO_AUDIO = f"no audio file ({', '.join(sorted(AUDIO_SUFFIXES))})"  # a folder of MP3s is told what is read
# the data sets are published as archives (DCASE's dev_<machine>.zip, MAFAULDA's <class>.zip): one not extracted
# is never read, and its machine or class was missing from the results without a word
ARCHIVE_SUFFIXES = (".zip", ".7z", ".rar", ".tar", ".tgz", ".tar.gz", ".tar.xz", ".tar.bz2")
TASKS = tuple(f"dcase{year}" for year in range(2020, 2026)) + ("cwru", "mafaulda", "iiee", "iica", "folder",
                                                                 "classes")


@dataclass
class Sample:
    """One file of a fault-classification data set."""
    path: Path
    label: str
    subset: str | None = None  # "train" / "test" where the data set gives a split
    group: str | None = None  # the recording(s) the file was cut from: folds must keep a group on one side


@dataclass
class Dataset:
    """What `load` returns: the task's files as `items`, and `read(path) -> (signal, rate)` to read one. channels:
    the signals' channels; year: a DCASE task's; protocols: the fault protocols `echo eval` runs on it by default
    (none for anomaly data); notes: what the adapter left out, to be said."""

    task: str
    kind: str  # "anomaly" (items are anomaly.Clip) or "faults" (items are Sample)
    items: list
    read: Callable[[Path], tuple[np.ndarray, int]]
    channels: int = 1
    year: int | None = None
    protocols: tuple = ()
    notes: list = field(default_factory=list)


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """(float32 samples, (N,) or (C, N) channels first, sample rate) of any file soundfile reads: the reader of
    the folder and DCASE tasks, and the one to give `embed.embed_files` for your own files. A 64-bit float file's
    samples come as float64: read as float32 by libsndfile, values past float32's range became Inf (refused as
    "NaN or Inf" samples the file does not hold) and a large offset rounded away the signal on it."""
    with _opened(path) as handle:
        dtype = _dtype(handle)
        if handle.channels == 1 or not handle.seekable():
            # the header's frames, named: soundfile refuses "all" of a file it cannot seek in (GSM 6.10, G.721 and
            # NMS ADPCM decode from the start only), which read in blocks as any
            data = handle.read(handle.frames, dtype=dtype, always_2d=True)
            signal = data[:, 0] if data.shape[1] == 1 else np.ascontiguousarray(data.T)
        else:
            signal = _channels_first(handle, dtype)
        _check_decoded(handle, signal.shape[-1])
        return signal, handle.samplerate


def audio_blocks(path: Path, samples: int) -> tuple[int, int, int, Iterator[np.ndarray]]:
    """(rate, channels, frames in all, blocks) of what read_audio reads: its samples as (C, n) blocks of at most
    `samples` samples (at least a frame), decoded one at a time, so a long recording is never whole in memory."""
    handle = _opened(path)
    return handle.samplerate, handle.channels, handle.frames, _blocks(handle, max(samples // handle.channels, 1))


def _blocks(handle, frames: int) -> Iterator[np.ndarray]:
    with handle:
        decoded = 0
        while len(block := handle.read(frames, dtype=_dtype(handle), always_2d=True)):
            decoded += len(block)
            yield np.ascontiguousarray(block.T)
        _check_decoded(handle, decoded)


def _opened(path: Path):
    """`path` opened by soundfile, refused where its header promises more than it holds, or gives no length."""
    soundfile = require("soundfile", "reading audio files")
    with open(path, "rb"):  # a missing or unreadable file is named as such, not as libsndfile's "System error"
        pass
    # soundfile encodes a str name with the locale's codec, strictly: under LC_ALL=C a UTF-8 name fails there;
    # its bytes open it (Windows opens by wide-character name)
    name = str(path) if os.name == "nt" else os.fsencode(path)
    try:
        handle = soundfile.SoundFile(name)
    except soundfile.LibsndfileError:
        if missing := missing_decoder(soundfile, path):
            raise ValueError(missing) from None
        raise
    if problem := logged_truncation(handle) or unknown_length(handle):
        handle.close()
        raise ValueError(problem)
    return handle


# frames an MP3 whole may decode short of its header's count: lame's own files did by 216 (22.05 kHz, its Xing tag's
# count) and 625 (no tag: libsndfile's estimate from the size), under two MPEG frames of 1152
MP3_SHORTFALL = 2 * 1152


def _check_decoded(handle, decoded: int) -> None:
    """Refuses a file that decoded to fewer frames than its header gives: an MP3 cut short keeps its header's (its
    Xing tag's) count, and libsndfile decodes what is there, a shorter clip with nothing said."""
    allowed = MP3_SHORTFALL if handle.format == "MP3" else 0
    if decoded + allowed < handle.frames < UNKNOWN_FRAMES:
        raise ValueError(truncation(handle.frames, decoded, "frames", UNKNOWN_FRAMES))


def _dtype(handle) -> str:
    return "float64" if handle.subtype == "DOUBLE" else "float32"


READ_BLOCK = 1 << 16  # frames a multichannel file is read in


def _channels_first(handle, dtype: str = "float32") -> np.ndarray:
    """A multichannel file's samples (C, N) in `dtype`, read a block at a time into their place: read whole, its
    interleaved (N, C) samples and their transposed copy were both held, twice the file's float32 size (+1.3 GB at
    the peak for 30 minutes of 48 kHz stereo)."""
    out = np.empty((handle.channels, handle.frames), dtype=dtype)  # soundfile.read trusts the header alike
    block = np.empty((min(READ_BLOCK, handle.frames), handle.channels), dtype=dtype)
    done = 0
    while done < handle.frames:
        read = handle.read(dtype=dtype, always_2d=True, out=block[: handle.frames - done])
        out[:, done : done + len(read)] = read.T
        done += len(read)
        if not len(read):
            break
    return out if done == handle.frames else np.ascontiguousarray(out[:, :done])  # a file cut short of its header


def read_cwru(path: Path, end: str) -> tuple[np.ndarray, int]:
    """The accelerometer at `end` ("DE" drive end, "FE" fan end) of a CWRU .mat file; where a file holds
    several, the one whose number is the file's own. A lone variable of another number is taken (174.mat
    holds X173, the 0.028" files X048-X059); among several, none is guessed."""
    io = require("scipy.io", "reading CWRU .mat files")
    content = _mat_contents(io, path)
    keys = sorted(key for key in content if re.fullmatch(rf"X\d+_{end}_time", key))
    if not keys:
        raise ValueError(f"{path}: no X<nnn>_{end}_time variable (has {', '.join(k for k in content if k[0] != '_')})")
    number = re.match(r"\d+", path.stem)
    own = [key for key in keys if number and int(key[1:].split("_")[0]) == int(number.group())]
    if not own and len(keys) > 1:
        raise ValueError(f"{path}: {len(keys)} variables {', '.join(keys)} and none numbered as the file; "
                         f"cannot tell which recording is this file's")
    key = (own or keys)[0]
    data = np.asarray(content[key])
    # CWRU stores one (N, 1) column; ravel would interleave a second column and casting would drop an imaginary part
    signal = data.reshape(-1) if data.ndim == 2 and 1 in data.shape else data
    if signal.ndim != 1 or data.dtype.kind not in "iuf":
        raise ValueError(f"{path}: variable {key} has shape {data.shape} and dtype {data.dtype}; expected one "
                         f"real-valued column (N, 1)")
    return signal.astype(np.float32), CWRU_RATE


def _mat_contents(io, path: Path) -> dict:
    """scipy's loadmat of `path`, whose failures on what is no .mat it reads were its own words ("IndexError: index
    out of range" for a web page saved under the name, "use HDF reader" for MATLAB v7.3, "could not read bytes")."""
    try:
        version = io.matlab.matfile_version(str(path))[0]
    except (ValueError, IndexError, io.matlab.MatReadError):
        version = None
    if version == 2:
        raise ValueError(f"{path}: a MATLAB v7.3 (HDF5) file, which is not read: save it again with save -v7 "
                         f"(CWRU publishes its files in the v5 format)")
    if version is None:
        with open(path, "rb") as handle:
            start = handle.read(16)
        raise ValueError(f"{path}: not a MATLAB .mat file (it starts {start!r}): an error page or an interrupted "
                         f"download saved under the name? download it again")
    try:
        return io.loadmat(str(path))
    except (ValueError, io.matlab.MatReadError) as error:
        raise ValueError(f"{path}: a damaged .mat file ({error}): download it again") from None
    except OSError as error:
        if error.errno is not None:  # the system's own failure (a disk error), not scipy's "could not read bytes"
            raise
        raise ValueError(f"{path}: a .mat file cut short ({error}): download it again") from None


def read_mafaulda(path: Path) -> tuple[np.ndarray, int]:
    """The MAFAULDA_CHANNELS of a MAFAULDA csv file, (7, N)."""
    with warnings.catch_warnings():  # an empty file is reported as such below, not as numpy's warning
        warnings.filterwarnings("ignore", "loadtxt: input contained no data")
        table = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    if table.size == 0:
        raise ValueError(f"{path}: empty file")
    if table.shape[1] != len(MAFAULDA_COLUMNS):
        raise ValueError(f"{path}: {table.shape[1]} columns, MAFAULDA files have {len(MAFAULDA_COLUMNS)}")
    return np.ascontiguousarray(table[:, 1:].T), MAFAULDA_RATE


def _root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder {root} {'is a file, not a folder' if root.exists() else 'does not exist'}")
    return root


def _note(notes: list, note: str) -> None:
    if note not in notes:  # a folder walked twice (a DCASE root) would say it twice
        notes.append(note)


def _walk(top: Path, notes: list, recursive: bool = True):
    return folders.walk(top, lambda path, reason: _note(notes, f"skipped {path}: {reason}"), recursive)


def _archives(walked) -> list[Path]:
    """The archive files among `walked` (what `_walk` yields), hidden ones left out."""
    return sorted(folder / name for folder, names in walked for name in names
                  if name.lower().endswith(ARCHIVE_SUFFIXES) and not name.startswith("."))


def _archives_said(archives: list) -> str:
    one, shown = len(archives) == 1, ", ".join(map(str, archives[:3])) + (", ..." if len(archives) > 3 else "")
    return f"{counted(len(archives), 'archive')} ({shown}) that {'is' if one else 'are'} not read: extract " \
        f"{'it' if one else 'them'} first"


def _files(folder: Path, suffixes, notes: list, recursive: bool = False) -> list[Path]:
    """The files in `folder` (and below it, if `recursive`) ending in one of `suffixes`, sorted, each once
    however many links lead to it. Whatever is not a folder counts: a broken link or a pipe is reported as
    unreadable (failures.csv) rather than left out unseen; but not macOS's ._<name> files
    (folders.finder_metadata), with a note; files of other suffixes are counted in a note."""
    found, left_out = folders.by_suffix(folder, _walk(folder, notes, recursive), suffixes)
    if left_out:
        _note(notes, left_out)
    found = sorted(found)
    metadata = [path for path in found if folders.finder_metadata(path.name)]
    if metadata:
        _note(notes, f"skipped {counted(len(metadata), 'macOS metadata file')} under {folder} (e.g. {metadata[0]}): "
                     f"not audio")
        found = [path for path in found if not folders.finder_metadata(path.name)]
    first_spelling, repeated = {}, []
    for path in found:
        first = first_spelling.setdefault(os.path.realpath(path), path)
        if first != path:
            repeated.append((path, first))
    if repeated:
        _note(notes, f"listed once: {counted(len(repeated), 'file')} under {folder} reached through a second link (e.g. "
                     f"{repeated[0][0]}, the same file as {repeated[0][1]})")
    return list(first_spelling.values())


# ---------------------------------------------------------------- DCASE

def read_label_lists(paths, year: int) -> dict:
    """{(machine, file name): (reference file name, label)} from eval_data_list csv files: rows
    `file,reference_file` (the published lists: the label is read from the reference name) or
    `file,reference_file,label`. Cells count by position, as the official 2020 evaluator reads them: the label
    is the third (an empty one leaves it to the reference name), columns after it are not read."""
    table = {}
    for path in paths:
        if not Path(path).is_file():  # a folder (--labels eval_data/) was said not to exist
            state = "is a folder, not a csv file" if Path(path).is_dir() else "does not exist"
            raise ValueError(f"label list {path} {state}")
        machine, rows, line = None, [], 0
        try:
            with open(path, newline="", encoding="utf-8-sig") as handle:  # a byte order mark (Excel) is no name
                reader = csv.reader(handle, strict=True)
                for row in reader:
                    rows.append(row)
                    line = reader.line_num
        except UnicodeDecodeError as error:  # UTF-16 ("Unicode text"), or not a text file at all
            raise ValueError(f"label list {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
        except csv.Error as error:  # a quote left open took the rest of the file as one cell, or crashed on its size
            hint = ": a quote opened there and never closed?" if _quote_left_open(path, line + 1) else ""
            raise ValueError(f"{path}:{line + 1}: not readable as csv ({error}){hint}") from None
        for line, row in enumerate(rows, 1):
            row = [cell.strip() for cell in row]
            while row and not row[-1]:  # Excel pads every row to the widest: a machine row reads `fan,,`
                row.pop()
            if len(row) == 1:
                separator = next((mark for mark in ";\t" if mark in row[0]), None)
                if separator:  # every row one cell, a machine's name: no clip found its label
                    raise ValueError(f"{path}:{line}: {row[0]!r} is one cell: label lists are comma-separated, this "
                                     f"one by {separator!r} (a spreadsheet's export in another locale?)")
                machine = row[0]
            elif len(row) >= 2:
                if machine is None:
                    raise ValueError(f"{path}:{line}: a file row before any machine-name row")
                # a cell's file name after a folder written either way (eval_data\raw\saw\test\x.wav from Windows)
                reference = PureWindowsPath(row[1]).name
                label = _binary_label(row[2], path, line) if len(row) >= 3 and row[2] else \
                    _dcase_fields(reference, year)[2]
                if label is None:
                    raise ValueError(f"{path}:{line}: no label: the reference name {reference!r} holds neither "
                                     f"normal nor anomaly, and there is no third (label) column")
                table[(machine, PureWindowsPath(row[0]).name)] = (reference, label)
    return table


def _quote_left_open(path, line: int) -> bool:
    """Whether `line` of a file ends inside quotes (an odd count of them), which reads the rest of the file as one
    cell: the likely cause where csv fails on a row starting there, but not for one cell too long without quotes,
    nor a quote closed early ("a"b)."""
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for _ in range(line - 1):
            handle.readline()
        text = handle.readline(csv.field_size_limit())  # not a whole file of one line (not a label list) in memory
    return text.count('"') % 2 == 1


def _binary_label(cell: str, path, line: int) -> int:
    """0 or 1, also written 0.0 / 1.0; anything else (0.7, 2, inf) is an error, never rounded to a class."""
    try:
        value = float(cell)
    except ValueError:
        value = None
    if value not in (0.0, 1.0):
        raise ValueError(f"{path}:{line}: label {cell!r} is not 0 or 1")
    return int(value)


def _dcase_fields(name: str, year: int):
    key = re.search(r"(?:^|_)id_(\d+)" if year == 2020 else r"(?:^|_)section_(\d+)", name)
    domain = re.search(r"_(source|target)(?:_|\.|$)", name)
    label = re.search(r"(?:^|_)(normal|anomaly)(?:_|\.|$)", name)
    return (key and key.group(1), domain and domain.group(1),
            None if label is None else int(label.group(1) == "anomaly"))


def _dcase_test_folders(machine_dir: Path, notes: list) -> list[Path]:
    """test/, or where there is none (DCASE 2021 as published) source_test/ and target_test/. The 2021 baseline
    copies those two into test/: the copy is read, never both, and only if it holds the same files."""
    test, originals = machine_dir / "test", [machine_dir / n for n in DCASE_TEST_FOLDERS[1:]]
    originals = [folder for folder in originals if folder.is_dir()]
    if not test.is_dir():
        if not originals:
            raise ValueError(f"{machine_dir}: has train/ but no test/ folder (nor source_test/, target_test/)")
        return originals
    names = lambda dirs: {p.name for folder in dirs for p in _files(folder, AUDIO_SUFFIXES, notes)}  # noqa: E731
    if originals and names([test]) != names(originals):
        raise ValueError(f"{machine_dir}: test/ and {', '.join(f.name + '/' for f in originals)} hold different "
                         f"files; keep test/ as a copy of them, or remove it to read them")
    return [test]


def _dcase_split(machine_dir: Path, root: Path) -> str:
    """"eval" or "dev": the nearest folder above the machine folder that says. Up to the data folder (the folder
    holding the machine folder, where that is the data folder itself), any name starting with dev or eval says,
    so a data folder named e.g. evaluation_sets keeps dev_data as dev; the data folder as given (also as `.`,
    whose name is ""), else a linked one's target. Above it only DCASE's own dev_data and eval_data say (a data
    folder eval_data/raw/ is eval), as a home or project folder's name may start with either."""
    top = [Path(os.path.abspath(root)), root.resolve()]
    if machine_dir == root:  # its own name is the machine's
        top = [folder.parent for folder in top]
    nearby = [*reversed(machine_dir.relative_to(root).parts[:-1]), *(folder.name for folder in top)]
    said = [name for name in nearby if name.lower().startswith(("dev", "eval"))] or \
        [folder.name for above in top for folder in above.parents if folder.name.lower() in DCASE_SPLIT_FOLDERS]
    return "eval" if said and said[0].lower().startswith("eval") else "dev"


def dcase(root, year: int, label_lists=None) -> Dataset:
    """A DCASE `year`'s anomaly-detection data under `root` (<machine>/train/ and test/ folders at any depth);
    `label_lists`: the eval_data_list csv files that label its evaluation clips (read_label_lists)."""
    root, year = _root(root), check_year(year)
    naming = "id_XX" if year == 2020 else "section_XX"
    notes = []
    tree = list(_walk(root, notes))
    machine_dirs = sorted({folder.parent for folder, _ in tree if folder.name == "train" and folder != root})
    # DCASE publishes an evaluation set's training clips apart from its test clips: test clips without them were
    # left out unseen, and the evaluation set with them
    benchless = sorted({folder.parent for folder, names in tree
                        if folder.name in DCASE_TEST_FOLDERS and folder != root and folder.parent not in machine_dirs
                        and any(Path(name).suffix.lower() in AUDIO_SUFFIXES for name in names)})
    if benchless:
        raise ValueError(f"{benchless[0]}: test clips but no train/ folder to build their memory bank from (DCASE "
                         f"publishes the evaluation set's training clips as a download of their own); add them, or "
                         f"point --data at the folders that have them")
    if not machine_dirs:
        raise ValueError(f"{root}: no DCASE machine folder: expected <root>/dev_data/<machine>/train/ and "
                         f"<root>/dev_data/<machine>/test/ (and eval_data/... for the evaluation set)")
    if archives := _archives(tree):  # the other adapters note each file they leave out; this one reads machines
        _note(notes, _archives_said(archives))
    # only the year's own lists (or the user's): another year's list would label this year's clips wrongly;
    # 2020's official evaluator names its list eval_data_list.csv
    found = [] if label_lists else sorted(folder / name for folder, names in tree for name in names
                                          if fnmatch.fnmatchcase(name, "eval_data_list*.csv"))
    lists = list(label_lists) if label_lists else [
        p for p in found if str(year) in p.name or (year == 2020 and p.name == "eval_data_list.csv")]
    labels = read_label_lists(lists, year)
    items, unlabelled, seen, listed, layout_2021 = [], 0, {}, set(), []
    for machine_dir in machine_dirs:
        machine = Path(os.path.abspath(machine_dir)).name  # also where the machine folder is given as `.`
        split = _dcase_split(machine_dir, root)
        if (split, machine) in seen:  # two copies would merge into one bank and double its clips
            raise ValueError(f"two {split} folders for machine {machine!r}: {seen[split, machine]} and "
                             f"{machine_dir}; point --data at one copy of the data")
        seen[split, machine] = machine_dir
        test_dirs = _dcase_test_folders(machine_dir, notes)
        if test_dirs[0].name != "test":
            layout_2021.append(machine_dir)
        for subset, subset_dirs in (("train", [machine_dir / "train"]), ("test", test_dirs)):
            files = [path for folder in subset_dirs for path in _files(folder, AUDIO_SUFFIXES, notes)]
            if not files:
                raise ValueError(f"{' and '.join(map(str, subset_dirs))}: {NO_AUDIO}")
            for path in files:
                section, domain, label = _dcase_fields(path.name, year)
                if subset == "test" and label is None:
                    reference, label = labels.get((machine, path.name), ("", None))
                    listed.add((machine, path.name))
                    domain = domain or _dcase_fields(reference, year)[1]
                label = 0 if subset == "train" and label is None else label
                if section is None:
                    raise ValueError(f"{path}: the file name has no {naming} (DCASE {year} naming)")
                if year > 2020 and domain is None and label is not None:
                    raise ValueError(f"{path}: no source/target domain in the file name or the label list")
                unlabelled += label is None
                items.append(Clip(path, split, machine, section, domain, subset, label))
    if unlabelled:
        source = "the --labels lists" if label_lists else \
            f"eval_data_list_{year}.csv{' or eval_data_list.csv' if year == 2020 else ''} under {root}"
        others = [str(p) for p in found if p not in lists]
        notes.append(f"no label (no entry in {source}): {counted(unlabelled, 'test clip')}, scored but not "
                     f"measured" + (f"; other years' lists found, pass one with --labels if it applies: "
                                    f"{', '.join(others)}" if others else ""))
    if layout_2021 and year != 2021:  # the clips' names are alike, the years' rules are not: a task name mixed up?
        machines = counted(len(layout_2021), "machine folder")
        notes.append(f"source_test/ and target_test/ folders are DCASE 2021's layout ({machines}, e.g. "
                     f"{layout_2021[0]}); scored by DCASE {year}'s rules, as asked")
    # a machine labelled from the lists that lacks clips they name: a partial download, whose AUCs are measured on
    # the clips found
    labelled_machines = {machine for machine, name in listed if (machine, name) in labels}
    missing = sorted(key for key in labels if key[0] in labelled_machines and key not in listed)
    if missing:
        machines = " and ".join(sorted({machine for machine, _ in missing}))
        notes.append(f"the label lists name {counted(len(missing), 'test clip')} of {machines} not found under {root} "
                     f"(e.g. {'/'.join(missing[0])}): a partial download? {machines} measured on the clips found")
    _check_banks(items)
    return Dataset(f"dcase{year}", "anomaly", items, read_audio, year=year, notes=notes)


def _check_banks(clips: list) -> None:
    """Refused before the encoding (hours on a large set), not while scoring after it: a test clip whose
    bank (split, machine, section) has no training clip, and a file reached twice within one bank through a
    link: as a bank clip and a test clip it is its own nearest neighbour (score 0, a perfect normal), as two
    test clips (test/normal/ and test/anomalous/) it is counted under both labels."""
    banks = {(clip.split, clip.machine, clip.section) for clip in clips if clip.subset == "train"}
    first = {}
    for clip in clips:
        bank = (clip.split, clip.machine, clip.section)
        if bank not in banks:
            raise ValueError(f"{clip.path}: {clip.split} {clip.machine} section {clip.section} has test clips but "
                             f"no training clip to build the memory bank from")
        other = first.setdefault((*bank, os.path.realpath(clip.path)), clip)
        if other is not clip:
            raise ValueError(f"{clip.path} is the same file as {other.path} (a {clip.subset} and a {other.subset} "
                             f"clip of {clip.machine} section {clip.section}), reached through a link; keep one")


def _any_case(root: Path, name: str) -> Path:
    """root/name, or the one folder whose name is `name` in another case (Normal/, TEST/), as test/'s sub-folders
    are matched; two spellings of it are refused rather than one left out."""
    found = sorted(p for p in root.glob("*") if p.is_dir() and p.name.lower() == name)
    if len(found) > 1:
        raise ValueError(f"{root}: {' and '.join(p.name for p in found)} are the same folder to a folder task; "
                         f"merge them into {name}/")
    return found[0] if found else root / name


def folder(root) -> Dataset:
    """One machine's anomaly detection: <root>/normal/* is the bank, <root>/test/{normal,anomalous}/* (or
    unlabelled <root>/test/*) is scored; folder names in any case."""
    root, notes = _root(root), []
    normal, test = _any_case(root, "normal"), _any_case(root, "test")
    bank = _files(normal, AUDIO_SUFFIXES, notes, recursive=True)
    if not bank:
        raise ValueError(f"{normal}: {NO_AUDIO}; a folder task needs <root>/normal/* (the normal "
                         f"bank) and <root>/test/{{normal,anomalous}}/* (folder names in any case)")
    tests = [(path, None) for path in _files(test, AUDIO_SUFFIXES, notes)]
    for sub in sorted(p for p in test.glob("*") if p.is_dir()):
        label = FOLDER_TEST_LABELS.get(sub.name.lower())
        if label is None and not _files(sub, AUDIO_SUFFIXES, notes, recursive=True):
            continue  # no audio (plots/, .ipynb_checkpoints): nothing is left out
        if label is None:  # an unknown folder would drop its clips from the evaluation unseen
            raise ValueError(f"{sub}: unknown test folder; test/ may hold {', '.join(FOLDER_TEST_LABELS)} "
                             f"(any case) and unlabelled files")
        tests += [(path, label) for path in _files(sub, AUDIO_SUFFIXES, notes, recursive=True)]
    if not tests:
        raise ValueError(f"{test}: {NO_AUDIO} to score; expected test/normal/*, test/anomalous/* or test/*")
    elsewhere = [(folder, names) for folder, names in _walk(root, [])  # normal/ and test/ note theirs as left out
                 if not any(folder == read or read in folder.parents for read in (normal, test))]
    if archives := _archives(elsewhere):  # a download of more clips not yet extracted was left out unseen
        _note(notes, _archives_said(archives))
    machine = root.resolve().name  # the folder's own name, also where it is given as `.`
    clip = lambda path, subset, label: Clip(path, "dev", machine, "00", None, subset, label)  # noqa: E731
    items = [clip(path, "train", 0) for path in bank] + [clip(path, "test", label) for path, label in tests]
    _check_banks(items)
    return Dataset("folder", "anomaly", items, read_audio, notes=notes)


# ---------------------------------------------------------------- fault data sets

def _cwru_end(relative: Path) -> str | None:
    """The end named nearest the file: a folder above the end's own (a 'gdrive_backup' above 12k_Fan_End) made
    every fan-end file a drive-end one, as 'drive' was looked for in the whole path first."""
    for part in reversed(relative.parts):
        text = part.lower()
        if re.search(r"drive|(?:^|[^a-z])de(?:[^a-z]|$)", text):
            return "DE"
        if re.search(r"fan|(?:^|[^a-z])fe(?:[^a-z]|$)", text):
            return "FE"
    return None


def _cwru_label(relative: Path) -> str | None:
    end = _cwru_end(relative)
    tokens = re.split(r"[/_\s\-]+", relative.with_suffix("").as_posix())
    fault = position = size = None
    for token, following in zip(tokens, tokens[1:] + [""]):
        match = re.fullmatch(r"(IR|B|OR)(\d{3})?(@\d+)?", token, flags=re.IGNORECASE)
        if match:
            fault = match.group(1).upper()
            size = match.group(2) or (following if re.fullmatch(r"\d{3}", following) else size)  # OR/014/
            position = match.group(3) or position
        elif re.fullmatch(r"@(3|6|12)", token):
            position = token
    position = position or CWRU_SINGLE_POSITION.get((end, size))
    if end is None or fault is None or (fault == "OR" and position not in ("@3", "@6", "@12")):
        return None
    return f"{end}_{fault}{position if fault == 'OR' else ''}"


def cwru(root) -> Dataset:
    """Case Western's 12 kHz drive-end and fan-end fault .mat files under `root`, each read at its faulty end."""
    root, notes = _root(root), []
    files = _files(root, {".mat"}, notes, recursive=True)
    if not files:
        raise ValueError(f"{root}: no .mat file; expected the CWRU 12k drive-end and fan-end fault folders, "
                         f"e.g. <root>/12k_Drive_End/IR007_0.mat, <root>/12k_Fan_End/OR007@6_1.mat")
    items, skipped = [], []
    for path in files:
        relative = path.relative_to(root)
        text = relative.as_posix().lower()
        if "48k" in text or "normal" in text:
            skipped.append(path)
            continue
        label = _cwru_label(relative)
        if label is None:
            raise ValueError(f"{path}: cannot tell the class from the path: it needs the end (a 'Drive_End' or "
                             f"'Fan_End' folder) and the fault (B007, IR014, OR021@6, or B/IR/OR folders with "
                             f"@3/@6/@12 for the outer race)")
        items.append(Sample(path, label))
    if not items:  # else "no file could be embedded (0 failures)", after the model was loaded
        raise ValueError(f"{root}: no 12 kHz fault file: the {len(skipped)} .mat files are 48 kHz or normal baseline "
                         f"data (e.g. {skipped[0]}); expected the 12k_Drive_End and 12k_Fan_End fault folders")
    if skipped:
        notes.append(f"skipped {counted(len(skipped), 'file')} outside the 12 kHz fault data (48k or normal)")
    # DE_... / FE_...: the sensor at the faulty bearing, by real path: the reader's identity (the embedding cache's
    # key) holds these, the same however --data is spelt
    ends = {os.path.realpath(item.path): item.label[:2] for item in items}
    return Dataset("cwru", "faults", items, lambda path: read_cwru(path, ends[os.path.realpath(path)]),
                   protocols=("loocv", "kfold"), notes=notes)


def mafaulda(root) -> Dataset:
    """MAFAULDA's .csv files under `root`, the class from their folders, 7 channels (MAFAULDA_CHANNELS)."""
    root, notes = _root(root), []
    files = _files(root, {".csv"}, notes, recursive=True)
    if not files:
        raise ValueError(f"{root}: no .csv file; expected the MAFAULDA folders {', '.join(MAFAULDA_TOP)}")
    items = []
    for path in files:
        parts = path.relative_to(root).parts
        if parts[0] not in MAFAULDA_TOP:
            raise ValueError(f"{path}: the first folder under {root} must be one of {', '.join(MAFAULDA_TOP)}")
        label = parts[0]
        if label in ("underhang", "overhang"):
            if len(parts) < 3 or parts[1] not in MAFAULDA_BEARING:
                raise ValueError(f"{path}: a {label} file must lie in {label}/<{'|'.join(MAFAULDA_BEARING)}>/")
            label = f"{label}-{parts[1]}"
        items.append(Sample(path, label))
    return Dataset("mafaulda", "faults", items, read_mafaulda, channels=len(MAFAULDA_CHANNELS),
                   protocols=("loocv", "kfold"), notes=notes)


def iiee(root) -> Dataset:
    """IDMT-ISA electric engine: <root>/train_cut/ and test_cut/ (or test/), the class in the folder names; the
    split protocol only."""
    root = _root(root)
    test_dir = next((root / name for name in ("test_cut", "test") if (root / name).is_dir()), None)
    if not (root / "train_cut").is_dir() or test_dir is None:
        raise ValueError(f"{root}: IDMT-ISA electric engine needs train_cut/ and test_cut/ (or test/) folders")
    items, notes = [], []
    for subset, base in (("train", root / "train_cut"), ("test", test_dir)):
        for path in _files(base, AUDIO_SUFFIXES, notes, recursive=True):
            found = [c for part in path.relative_to(base).parts[:-1] for c in IIEE_CLASSES if c in part.lower()]
            if not found:
                raise ValueError(f"{path}: no class ({', '.join(IIEE_CLASSES)}) in its folder names")
            items.append(Sample(path, found[-1], subset))
    for subset in ("train", "test"):
        if not any(item.subset == subset for item in items):
            raise ValueError(f"{root}: {NO_AUDIO} in the {subset} folder")
    return Dataset("iiee", "faults", items, read_audio, protocols=("split",), notes=notes)


def iica(root) -> Dataset:
    """The class is the leak folder plus the status in the file name, as SIREN's metadata: the session folders
    1/2/3 are recording sessions, not classes. A session's files are cut from the same recordings, so the
    session folder is each file's group."""
    root = _root(root)
    layout = f"<{'|'.join(IICA_LEAKS)}>/<condition>/<session>/<prefix>_<iO|niO>_....wav"
    notes = []
    files = _files(root, AUDIO_SUFFIXES, notes, recursive=True)
    if not files:
        raise ValueError(f"{root}: {NO_AUDIO}; IDMT-ISA compressed air expects {layout}")
    items = []
    for path in files:
        parts = path.relative_to(root).parts[:-1]
        if len(parts) < 3 or parts[-3] not in IICA_LEAKS:
            raise ValueError(f"{path}: not in the IDMT-ISA compressed air layout {layout}")
        # the field after the prefix; looked up by value, as a prefix such as hydr_low holds an underscore
        status = [IICA_STATUS[field] for field in path.stem.split("_") if field in IICA_STATUS]
        if len(status) != 1:  # a guessed status would mislabel the file
            raise ValueError(f"{path}: the file name must hold one field niO (leak) or iO (no leak), as in "
                             f"lab_niO_k1_1m_0.wav")
        items.append(Sample(path, f"{parts[-3]}_{status[0]}", group="/".join(parts)))
    return Dataset("iica", "faults", items, read_audio, protocols=("kfold", "loocv"), notes=notes)


def classes(root) -> Dataset:
    """Your own labelled recordings, a folder per class (its name is the label, files found at any depth below
    it): <root>/<class>/ for leave-one-out and k-fold, or <root>/train/<class>/ and <root>/test/<class>/ (any
    case) for the split. Audio files outside any class folder are refused rather than left unlabelled."""
    root, notes = _root(root), []
    train, test = _any_case(root, "train"), _any_case(root, "test")
    if train.is_dir() != test.is_dir():
        have, lack = ("train", "test") if train.is_dir() else ("test", "train")
        raise ValueError(f"{root}: {have}/ without {lack}/: a split needs both, each holding a folder per class; "
                         f"without one, the class folders go in {root} itself")
    split = train.is_dir()
    items = []
    for base, subset in ((train, "train"), (test, "test")) if split else ((root, None),):
        loose = _files(base, AUDIO_SUFFIXES, notes)
        if loose:
            raise ValueError(f"{base}: {counted(len(loose), 'audio file')} outside any class folder (e.g. "
                             f"{loose[0].name}): the classes task reads {base}/<class>/..., the folder's name its "
                             f"class")
        for folder in sorted(p for p in base.glob("*") if p.is_dir() and not p.name.startswith(".")):
            items += [Sample(path, folder.name, subset)
                      for path in _files(folder, AUDIO_SUFFIXES, notes, recursive=True)]
    if not items:
        raise ValueError(f"{root}: {NO_AUDIO} in class folders; the classes task reads <root>/<class>/... or "
                         f"<root>/train/<class>/... and <root>/test/<class>/...")
    unseen = sorted({item.label for item in items if item.subset == "test"}
                    - {item.label for item in items if item.subset == "train"})
    if unseen:  # never predicted: each of their files counts as an error
        _note(notes, f"test classes with no train folder (always mispredicted): {', '.join(unseen)}")
    return Dataset("classes", "faults", items, read_audio, protocols=("split",) if split else ("loocv", "kfold"),
                   notes=notes)


def _load(task: str, root, label_lists) -> Dataset:
    if task.startswith("dcase") and task in TASKS:
        return dcase(root, int(task[5:]), label_lists)
    adapters = {"cwru": cwru, "mafaulda": mafaulda, "iiee": iiee, "iica": iica, "folder": folder, "classes": classes}
    if task not in adapters:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return adapters[task](root)


def load(task: str, root, label_lists=None) -> Dataset:
    """The adapter for `task` (one of TASKS) applied to folder `root`; a layout it refuses is also told of the
    archives under `root`, where a download not yet extracted is the likely cause."""
    try:
        return _load(task, root, label_lists)
    except ValueError as error:
        archives = _archives(_walk(Path(root), [])) if Path(root).is_dir() else []
        if not archives:
            raise
        raise ValueError(f"{error}; {root} holds {_archives_said(archives)}") from None
