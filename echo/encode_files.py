"""`python -m echo encode [PATH ...] --model default --out embeddings.npz`: audio files to ECHO embeddings.

Files (WAV/FLAC/OGG/Opus/MP3/AIFF/CAF/W64/RF64, any rate, any channel count: channels are encoded on their own and
concatenated) or folders (searched recursively, through links to folders) are read and encoded in batches through
`echo.fast.encode`, bounded in files (--batch-files) and in decoded samples, so that long recordings do not exhaust
memory (a file longer than a batch's samples is decoded a block at a time and streamed through one
`echo.fast.StreamEncoder` per channel); with no PATH the bundled samples are encoded. A file that cannot be read or
encoded is reported with the reason and left out; an encoder failing alike on a batch and on each of its files, or on
three single-file batches in a row, stops the run.

Every finished batch is saved at once in `OUT.parts/` (one shard per batch, written atomically), so an
interrupted run loses at most one batch; the output is written atomically at the end, and a re-run skips
every file already encoded by the same model in the same dtype, in the old output or in the shards (a run
over other files, in another dtype or with another model leaves those shards, and one without --frames their
frames, for the interrupted run to resume; a shard that cannot be read is set aside as `*.unreadable` and kept,
named at the end of every run until it is deleted, as are shards whose files are all gone). Under
`torchrun --nproc-per-node N -m echo encode ...` rank r encodes files r, r + N, ... and rank 0 merges. With
`--window SECONDS [--hop SECONDS]` each file's equal windows are encoded as signals of their own (echo.windows).

Output: `.npz` with `paths`, `keys`, `sample_rates`, `channels`, `model`, `model_name` and one array per file,
`utterance/{i}` (and `frames/{i}` with --frames), since embedding sizes differ between rates; or, for an
`.parquet` OUT (needs pyarrow), one row per file. `read_embeddings` reads either back.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import stat
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from . import atomic, folders, host_memory, inputs, process_group, windows
from .cli import WorkKept, on_every_rank, user_path
from .data import AUDIO_SUFFIXES
from .data.bundled import SAMPLES_DIR
from .data.wav import read_wav, wav_blocks
from .eval import embed, require
from .eval.datasets import audio_blocks, read_audio
from .eval.embed import (NOTHING_KEPT, READ_WORKERS, EmbeddingCache, FailureStreak, batch_files_help, batched,
                         checked_reading, decoded_sizes, encode_isolating_failures, encode_windows, encoding_key,
                         failure_reason, finite_or_failed, key_checked, model_hash, read_checked, shown)
from .ops.backend import BackendError
from .wording import counted

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FRAMES = "/frames"  # suffixes of a file's frame-embedding, (rate, channels) and real-path entries in the shards
META = "/meta"
PATH = "/path"


OUTPUT_HELP = (
    "The .npz holds paths, keys, sample_rates and channels (an entry per file), model, model_name, and an array per "
    "file: utterance/{i} (and frames/{i} with --frames), as embedding sizes differ between rates; a .parquet holds a "
    "row per file: path, key, sample_rate, channels, model, model_name, utterance (and frames). model is the model's "
    "hash (its config and weights), prefixed with the dtype where that is not float32, model_name the --model that "
    "made it (a name, or a file's absolute path); a key is a file's identity, a hash of its real "
    "path and its bytes: a re-run skips the files whose key the output holds for the same model. Paths are as given "
    "(relative ones to the folder the command ran in). The output holds this run's files only: to gather several "
    "folders in one, give them all (the files it holds already are reused). "
    "With --window, a file's utterance is (windows, features) and its frames the windows' rows one after another; "
    "model begins with the windows (window10.0s-hop5.0s-...) and keys end with them (...@window10.0s-hop5.0s). "
    "echo.encode_files.read_embeddings(OUT) reads either back.")


def add_arguments(parser) -> None:
    parser.epilog = OUTPUT_HELP
    parser.add_argument("paths", nargs="*", type=user_path,
                        help="audio files or folders (default: the bundled samples)")
    parser.add_argument("--model", default="default",
                        help="checkpoint path or name: default, echo-small, echo-tiny (default: default)")
    parser.add_argument("--out", type=user_path, default=Path("embeddings.npz"),
                        help=".npz or .parquet (default: embeddings.npz)")
    parser.add_argument("--frames", action="store_true", help="keep the frame embeddings too")
    parser.add_argument("--window", type=float, metavar="SECONDS",
                        help="embed each file window by window: spans of SECONDS (each encoded as a signal of its "
                        "own), one every --hop seconds; the tail shorter than a window is left out, a file shorter "
                        "than one is skipped")
    parser.add_argument("--hop", type=float, metavar="SECONDS", help="seconds between windows' starts (default: "
                        "--window, windows end to end)")
    parser.add_argument("--batch-files", type=int, default=32, help=batch_files_help(
        32, "a longer file is a batch alone, decoded and encoded a block at a time (StreamEncoder)"))
    parser.add_argument("--max-tokens", type=int, default=None, help="packed tokens per pass (echo.fast.encode)")
    parser.add_argument("--device", default=None,
                        help="default: cuda if present, else cpu; plain cuda is this rank's GPU (LOCAL_RANK)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="encoder compute dtype (bfloat16: 2-6x faster end to end on CPUs with AVX-512 BF16 "
                        "or AMX, relative error ~5e-3)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def find_files(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]], list[str]]:
    """Audio files under `paths` (folders searched recursively, following links to folders, each folder once,
    macOS's ._ metadata files left out as other files that are not audio; files taken as given), each once
    however it was spelt, and the paths that could not be used with the reason (a missing path, a folder that
    cannot be read or is reached a second time, a broken or looping link, a pipe), each once too; and notes on
    what was left out unread: a folder's files of other suffixes, the second spellings of a file."""
    files, unusable, notes = [], [], []
    for path in paths:
        kind = _kind(path)
        if kind == "folder":
            found, left_out = folders.by_suffix(path, folders.walk(path, lambda *skipped: unusable.append(skipped)),
                                                AUDIO_SUFFIXES)
            notes += [left_out] if left_out else []
            found = [entry for entry in found if not folders.finder_metadata(entry.name)]
            for entry in sorted(found):  # a link loop or a pipe is named as given ones are
                kind = _kind(entry)
                if kind == "file":
                    files.append(entry)
                else:
                    unusable.append((entry, kind))
        elif kind == "file":
            files.append(path)
        else:
            unusable.append((path, kind))
    first_spelling, repeated, bad = {}, [], {}
    for path in files:
        real = os.path.realpath(path)
        if real in first_spelling:
            repeated.append((path, first_spelling[real]))
        else:
            first_spelling[real] = path
    if repeated:  # as eval says it: a file left out without a word looked lost
        notes.append(f"encoded once: {counted(len(repeated), 'file')} reached a second time, through a link or by "
                     f"another path (e.g. {shown(repeated[0][0])}, the same file as {shown(repeated[0][1])})")
    for path, reason in unusable:  # its folder's real path: a broken link resolves to its target, not to itself
        bad.setdefault(os.path.join(os.path.realpath(path.parent), path.name), (path, reason))
    return list(first_spelling.values()), list(bad.values()), notes


def _kind(path: Path) -> str:
    """"folder" or "file" (a regular one), through links; else why `path` cannot be used. A name in a folder that
    may not be searched (no x permission) is one of these, not the end of the run (pathlib's is_dir raises)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if os.path.islink(path):
            return "a broken or looping symbolic link"
        return "no such file or folder" if error.errno in (errno.ENOENT, errno.ENOTDIR) else \
            f"not usable: {error.strerror}"
    if stat.S_ISDIR(mode):
        return "folder"
    return "file" if stat.S_ISREG(mode) else "not a regular file or folder"


def read_file(path: Path) -> tuple[np.ndarray, int]:
    """(waveform (N,) or (C, N), rate) with soundfile; plain 16-bit WAV needs no package."""
    return _read(path, read_audio, read_wav)


def _read(path: Path, with_soundfile: Callable, without_soundfile: Callable):
    """`with_soundfile(path)`, or where soundfile is missing and `path` is a WAV file, `without_soundfile(path)`."""
    try:
        return with_soundfile(path)
    except ImportError as missing:
        if path.suffix.lower() != ".wav":
            raise
        try:
            return without_soundfile(path)
        except ValueError as error:  # e.g. 24-bit PCM: soundfile's to read, and why it could not
            raise ValueError(f"{error}; soundfile is not usable here: {missing}") from None


def _check_reader(files: list[Path]) -> None:
    """Files other than WAV need soundfile: refused before the encoding, not at the first batch that holds one,
    which in a large folder came after hours of its WAV files."""
    others = [path for path in files if path.suffix.lower() != ".wav"]
    if others:
        try:
            require("soundfile", f"reading audio other than WAV ({counted(len(others), 'file')}, e.g. "
                                 f"{shown(others[0])})")
        except ImportError as error:
            raise ValueError(f"{error} (plain 16-bit WAV files need no package)") from None


def _encode(model, signals, rates, frames: bool, options: dict) -> list[dict]:
    from . import fast

    outputs = fast.encode(model, signals, rates, frames=frames, **options)
    if not frames:
        return [{"utterance": u.float().numpy()} for u in outputs]
    return [{"utterance": u.float().numpy(), "frames": f.float().numpy()} for u, f in outputs]


def _encode_batch(model, loaded: list, frames: bool, options: dict, streak: FailureStreak) -> list:
    """Embeddings of a batch of (signal, rate); if the batch fails, file by file, so only the bad one fails."""
    return encode_isolating_failures(partial(_encode, model, frames=frames, options=options),
                                     [s for s, _ in loaded], [r for _, r in loaded], streak)


def _read_and_encode(model, batch: list[Path], pool, frames: bool, options: dict, streak: FailureStreak) -> list:
    """Per file of `batch`, read whole in `pool` and encoded together: ((rate, channels, samples), embeddings), or
    the reason the file failed."""
    loaded = list(pool.map(partial(read_checked, read_file), batch))
    good = [(path, item) for path, item in zip(batch, loaded) if not isinstance(item, str)]
    # no call for a batch of unreadable files: it would end a failing device's streak of failures
    results = good and _encode_batch(model, [item for _, item in good], frames, options, streak)
    encoded = [(path, (rate, signal.shape[0] if signal.dim() == 2 else 1, signal.shape[-1]), result)
               for (path, (signal, rate)), result in zip(good, results)]
    return [(path, item) for path, item in zip(batch, loaded) if isinstance(item, str)] + \
        [(path, result if isinstance(result, str) else (facts, result)) for path, facts, result in encoded]


STREAM_BLOCK = 1 << 22  # samples (frames x channels) of a long file decoded and pushed at a time: 16 MB of float32


def _blocks_of(path: Path) -> tuple:
    """(rate, channels, frames, blocks of at most STREAM_BLOCK decoded samples) of a file, its rate checked."""
    rate, channels, length, blocks = _read(path, partial(audio_blocks, samples=STREAM_BLOCK),
                                           partial(wav_blocks, samples=STREAM_BLOCK))
    return inputs.check_sample_rate(rate), channels, length, blocks


def _stream_and_encode(model, path: Path, frames: bool, options: dict, streak: FailureStreak,
                       reading: Callable[[int, int], None] = lambda done, total: None):
    """A file over a batch's decoded samples, decoded a block at a time, each channel pushed through a StreamEncoder
    of its own (whose finish() is model.encode of the whole): ((rate, channels, samples), embeddings), or the reason
    it failed. Read whole, a long recording took twice its float32 size and more (bench/RESULTS.md); streamed, a
    few MB a channel and the frames' rows. It is decoded twice: first for its channels' means (`reading(done,
    total)` after each block), with which the streams keep nothing per frame (they kept band 0's bins to redo it
    with the mean at the end: ~1-2 MB a minute, bench/RESULTS.md), and which find bad samples before the encoding."""
    from .streaming import MeanMismatch, StreamEncoder

    def read_means(path: Path):
        rate, channels, length, blocks = _blocks_of(path)
        decoding = _Decoding(blocks, path, length, reading)
        with contextlib.closing(blocks):
            totals = _channel_totals(decoding, channels)
        if decoding.failure:
            return decoding.failure
        if not decoding.samples:
            raise ValueError("no samples decoded")
        return rate, channels, [(total / decoding.samples).item() for total in totals], decoding.samples

    first = checked_reading(read_means, path)
    if isinstance(first, str):
        return first
    rate, channels, means, length = first
    again = checked_reading(_blocks_of, path)
    if isinstance(again, str):
        return again
    blocks = again[3]
    if again[:2] != (rate, channels):  # the streams are made for the first reading's
        blocks.close()
        return (f"the file changed while it was read: {counted(channels, 'channel')} at {rate} Hz, then "
                f"{again[1]} at {again[0]} Hz")
    decoding = _Decoding(blocks, path, length, options["progress"])
    with contextlib.closing(blocks):
        try:  # making a stream copies the weights: out of memory on a full GPU is the file's failure, as in a push
            streams = [StreamEncoder(model, rate, frames=frames, dtype=options["dtype"],
                                     max_tokens=options["max_tokens"], mean=mean) for mean in means]
            for block in decoding:
                for channel, stream in enumerate(streams):
                    stream.push(torch.from_numpy(block[channel]))
            if decoding.failure:
                return decoding.failure
            samples = decoding.samples
            if samples != length:
                return f"the file changed while it was read: {length} samples a channel, then {samples}"
            outputs = [stream.finish() for stream in streams]
        except BackendError:  # a setting, not this file: the run stops
            raise
        except MeanMismatch:
            return "the file changed while it was read: its samples' mean is not its first reading's"
        except ValueError as error:  # the samples' (a NaN the first reading did not meet: a file changed)
            return failure_reason(error)
        except RuntimeError as error:  # the encoder's (out of memory, a failing device), as encode_isolating_failures
            streak.record(failure_reason(error))
            return f"encode failed: {error}"
    embeddings = {"utterance": _side_by_side([out[0] if frames else out for out in outputs], 0).numpy()}
    if frames:
        embeddings["frames"] = _side_by_side([out[1] for out in outputs], 1).numpy()
    streak.record()
    result = finite_or_failed([embeddings])[0]
    return result if isinstance(result, str) else ((rate, channels, samples), result)


def _channel_totals(decoding: _Decoding, channels: int) -> list[torch.Tensor]:
    """The sum of each channel of a file's blocks, in float64 as a stream sums them; a NaN or Inf sample is refused
    as a push refuses it, naming its channel where there are several."""
    totals = [torch.zeros((), dtype=torch.float64)] * channels
    for block in decoding:
        for channel in range(channels):
            row = torch.from_numpy(block[channel])
            totals[channel] = totals[channel] + inputs.float64_sum(row)  # float64 files' in float64: exact
            if not bool(torch.isfinite(totals[channel])):
                try:  # its words, naming the first NaN or Inf
                    inputs.as_float32(row, what=f"chunk at sample {decoding.samples - block.shape[1]}")
                except ValueError as error:
                    raise ValueError(f"channel {channel}: {error}" if channels > 1 else str(error)) from None
    return totals


SHOWN_SHARES = 1000  # steps of the bar's share that a file of a windowed batch takes


def _windows_and_encode(model, batch: list[Path], frames: bool, options: dict, streak: FailureStreak,
                        window: float, hop: float) -> list:
    """Per file of `batch`, (path, ((rate, channels, samples), embeddings)) or (path, the reason it failed): its
    windows (echo.windows), each a signal of its own, decoded a block at a time and encoded through
    embed.encode_windows, the batch's files' windows together (a call per file, of one window each, ran at 0.6-0.8x
    the speed of whole files); embeddings are (windows, features) utterances and, with `frames`, the windows' frame
    rows one after another."""
    opened = {}  # per file: the reason it failed before its windows, or (rate, channels, its _Decoding)

    def pieces():
        for index, path in enumerate(batch):
            reading = checked_reading(_blocks_of, path)
            if isinstance(reading, str):
                opened[index] = reading
                continue
            rate, channels, length, blocks = reading
            width, step = windows.spans(window, hop, rate)
            if length < width:  # by its header: decoded, it was held whole to be skipped
                blocks.close()
                opened[index] = windows.too_short(length, rate, window)
                continue

            def progress(done: int, total: int, index: int = index) -> None:
                options["progress"](index * SHOWN_SHARES + done * SHOWN_SHARES // total, len(batch) * SHOWN_SHARES)

            decoding = _Decoding(blocks, path, length, progress)
            opened[index] = (rate, channels, decoding)
            with contextlib.closing(blocks):
                for number, piece in enumerate(windows.cut(decoding, width, step)):
                    yield index, windows.named(number, step, rate), \
                        torch.from_numpy(piece[0] if channels == 1 else piece), rate

    # the bar shows the share of the files decoded, not each group's passes
    encode = partial(_encode, model, frames=frames, options={**options, "progress": None})
    encoded = encode_windows(encode, pieces(), streak)
    return [(path, _file_from_windows(opened[index], encoded.get(index), frames, window))
            for index, path in enumerate(batch)]


def _file_from_windows(opened, encoded, frames: bool, window: float):
    """A file's ((rate, channels, samples), embeddings) from its windows' outputs (`encoded`: a list, the reason one
    failed, or None for none), or the reason it failed (`opened`: one, or its (rate, channels, _Decoding))."""
    if isinstance(opened, str):
        return opened
    rate, channels, decoding = opened
    if decoding.failure or isinstance(encoded, str):
        return decoding.failure or encoded
    if encoded is None:
        return windows.too_short(decoding.samples, rate, window)
    embeddings = {"utterance": np.stack([result["utterance"] for result in encoded])}
    if frames:
        embeddings["frames"] = np.concatenate([result["frames"] for result in encoded])
    return (rate, channels, decoding.samples), embeddings


class _Decoding:
    """A file's blocks as they are decoded, counted and shown (`progress(done, total)`); a damaged stream ends them
    and its reason is kept in `failure`: the decoder's error is the file's, never the encoder's."""

    def __init__(self, blocks, path: Path, length: int, progress: Callable[[int, int], None]):
        self.blocks, self.path, self.length, self.progress = blocks, path, length, progress
        self.samples, self.failure = 0, ""

    def __iter__(self):
        while True:
            try:
                block = next(self.blocks, None)
            except Exception as error:
                self.failure = failure_reason(error, self.path)
                return
            if block is None:
                return
            self.samples += block.shape[1]
            self.progress(min(self.samples, self.length), self.length)
            yield block


def _side_by_side(channels: list, dim: int) -> torch.Tensor:
    """The channels' embeddings joined along `dim`; one channel's as it is: a long recording's frames joined alone
    were copied, their size again at the peak."""
    return channels[0] if len(channels) == 1 else torch.cat(channels, dim=dim)


def read_embeddings(path) -> dict:
    """{"model": the model's key, "model_name": the --model that made it ("" in outputs older than it), "window":
    (window, hop) in seconds, or None, "files": {file path: {"utterance", "frames" (if kept), "key", "sample_rate",
    "channels", and with windows "starts", each window's start in seconds}}} from an npz or parquet output of
    `encode`; a ValueError naming the file for any other file, whose parts are not an output's. With windows, a file's
    utterance is (windows, features) and its frames the windows' rows one after another."""
    path = Path(path)
    if path.suffix == ".parquet":  # before the check: without pyarrow an output was said to be none
        _require_pyarrow()
    problem = _not_an_output(path) if path.is_file() else ""  # a missing file is numpy's FileNotFoundError
    if problem:  # numpy read a WAV or a text file as a pickle, and advised loading it with allow_pickle
        raise ValueError(f"{path} is not an output of echo encode ({problem})")
    try:
        output = _read_output(path)
        output["window"] = windows.parsed(output["model"])
    except (KeyError, AttributeError, IndexError, TypeError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not an output of echo encode ({type(error).__name__}: {error})") from None
    for file, row in output["files"].items():  # a re-run reuses them: one edited by hand would go on unseen
        if not _embeddings_as_written(row, output["window"] is not None):
            shapes = ", ".join(f"{name} {getattr(row[name], 'dtype', None)}{list(getattr(row[name], 'shape', []))}"
                               for name in ("utterance", "frames") if name in row)
            wanted = "float32 vectors (frames: rows of the utterance's size)" if output["window"] is None else \
                "float32 (windows, features) utterances (frames: the same count of rows of those features a window)"
            raise ValueError(f"{path} is not an output of echo encode: {file} has {shapes}, not {wanted}")
        if output["window"] is not None:
            row["starts"] = windows.starts(len(row["utterance"]), output["window"][1], row["sample_rate"])
    return output


def _embeddings_as_written(row: dict, windowed: bool) -> bool:
    """A float32 utterance vector, (windows, features) with windows, and frames of rows of its features, the same
    count a window."""
    utterance, frames = row["utterance"], row.get("frames")
    if not isinstance(utterance, np.ndarray) or utterance.dtype != np.float32 or utterance.ndim != 1 + windowed \
            or windowed and not len(utterance):
        return False
    return frames is None or (isinstance(frames, np.ndarray) and frames.dtype == np.float32 and frames.ndim == 2
                              and (len(frames) == 0 or frames.shape[1] == utterance.shape[-1])
                              and len(frames) % (len(utterance) if windowed else 1) == 0)


def _read_output(path: Path) -> dict:
    if path.suffix == ".parquet":
        pyarrow = _require_pyarrow()
        fields = {name: [] for name in ("path", "model", "model_name", "key", "sample_rate", "channels")}
        utterances, frames = [], []
        handle = pyarrow.parquet.ParquetFile(str(path), buffer_size=PARQUET_READ_BUFFER, pre_buffer=False)
        try:
            for batch in handle.iter_batches(batch_size=PARQUET_READ_ROWS):
                for name, values in fields.items():
                    values += batch.column(name).to_pylist() if name in batch.schema.names else [""] * batch.num_rows
                utterances += _arrays(batch.column("utterance"), pyarrow)
                frames += _arrays(batch.column("frames"), pyarrow) \
                    if "frames" in batch.schema.names else [None] * batch.num_rows
        finally:
            handle.close()
        files = {}
        for i, file in enumerate(fields["path"]):  # the fields an npz row has, no more: "path" and "model" are keys
            files[file] = {name: fields[name][i] for name in ("key", "sample_rate", "channels")}
            files[file]["utterance"] = utterances[i]
            if frames[i] is not None:
                files[file]["frames"] = frames[i]
        return {"model": fields["model"][0] if fields["model"] else "",
                "model_name": fields["model_name"][0] if fields["model_name"] else "", "files": files}
    with np.load(path, allow_pickle=False) as data:
        files = {}
        # each column read once: data[name] reads and parses it from the archive at every access, and read per row
        # it made reading n files quadratic (16,000 files: 43 s, re-run's own start included)
        keys, rates, channels = data["keys"], data["sample_rates"], data["channels"]
        stored = set(data.files)  # `in data` read the whole array in older numpy (1.24: Mapping's __contains__)
        for i, name in enumerate(data["paths"]):
            row = {"key": str(keys[i]), "sample_rate": int(rates[i]), "channels": int(channels[i]),
                   "utterance": data[f"utterance/{i}"]}
            if f"frames/{i}" in stored:
                row["frames"] = data[f"frames/{i}"]
            files[str(name)] = row
        return {"model": str(data["model"]), "model_name": str(data["model_name"]) if "model_name" in stored else "",
                "files": files}


def _require_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError("writing or reading .parquet needs pyarrow (pip install 'echo-fm[parquet]'); "
                         "or use an .npz output") from None
    return pyarrow


# Parquet columns of embeddings go between numpy and Arrow through their joined values: as lists of Python floats
# (`tolist`, `to_pylist`) they took 10-12x their size in memory and 6-9x the time (1.3 GB and 7 s to write 129 MB).
LIST_VALUES = 2**31 - 1  # the most values one Arrow list array's int32 offsets reach: a column is chunked under it
# A parquet output is read back a few rows at a time, its column chunks through a small buffer, not read ahead whole:
# read as one table, 302 MB (3000 clips with frames) took +1.6 GB at the peak to decode, at every re-run.
PARQUET_READ_ROWS = 64
PARQUET_READ_BUFFER = 1 << 20
# ... and written a row group at a time, each of about this many bytes of embeddings: written as one table, the
# joined values and Arrow's encoding of every row were held together (+469 MB to write 123 MB of frames, now +142).
PARQUET_ROW_GROUP_BYTES = 16 << 20
# dictionary pages for these only: embeddings never repeat, and trying one for them cost time and bytes
DICTIONARY_COLUMNS = ["path", "key", "sample_rate", "channels", "model", "model_name"]


def _column(arrays: list[np.ndarray], pyarrow):
    """list<float32> of 1-D arrays, or list<list<float32>> (a list per row) of 2-D ones, float32 as computed."""
    chunks, start = [], 0
    while start < len(arrays):
        end, values = start + 1, arrays[start].size
        while end < len(arrays) and values + arrays[end].size <= LIST_VALUES:
            values, end = values + arrays[end].size, end + 1
        chunks.append(_list_chunk(arrays[start:end], pyarrow))
        start = end
    return pyarrow.chunked_array(chunks)


def _list_chunk(arrays: list[np.ndarray], pyarrow):
    values = pyarrow.array(np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32, copy=False))
    if arrays[0].ndim == 1:
        return pyarrow.ListArray.from_arrays(_offsets([a.size for a in arrays]), values)
    rows = pyarrow.ListArray.from_arrays(_offsets([a.shape[1] for a in arrays for _ in range(a.shape[0])]), values)
    return pyarrow.ListArray.from_arrays(_offsets([a.shape[0] for a in arrays]), rows)


def _offsets(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)


def _arrays(column, pyarrow) -> list[np.ndarray | None]:
    """Per row of a list<float32> or list<list<float32>> array, its float32 array (2-D for the second), or None."""
    missing = column.is_null().to_numpy(zero_copy_only=False)
    # the offsets index the whole of .values, whatever the array's own offset in it
    outer, rows = column.offsets.to_numpy(), column.values
    nested = pyarrow.types.is_list(rows.type)
    inner = rows.offsets.to_numpy() if nested else None
    values = (rows.values if nested else rows).to_numpy(zero_copy_only=False)
    out = []
    for i in range(len(column)):
        first, end = outer[i], outer[i + 1]
        if missing[i]:
            out.append(None)
        elif nested:
            width = inner[first + 1] - inner[first] if end > first else 0
            out.append(values[inner[first] : inner[end]].astype(np.float32).reshape(end - first, width))
        else:
            out.append(values[first:end].astype(np.float32))
    return out


def _write(out: Path, rows: list[dict], model_key: str, model_name: str, frames: bool) -> None:
    with atomic.replacing(out) as temporary:
        _write_table(temporary, out.suffix, rows, model_key, model_name, frames)


def _write_table(path: Path, suffix: str, rows: list[dict], model_key: str, model_name: str, frames: bool) -> None:
    if suffix == ".parquet":
        pyarrow = _require_pyarrow()
        writer = None
        try:
            for group in _row_groups(rows, frames):
                table = _parquet_table(group, model_key, model_name, frames, pyarrow)
                # compliant names said: pyarrow < 13 named list items "item" (13 on: "element"), so a file's schema
                # hung on the pyarrow that wrote it
                writer = writer or pyarrow.parquet.ParquetWriter(str(path), table.schema,
                                                                 use_dictionary=DICTIONARY_COLUMNS,
                                                                 use_compliant_nested_type=True)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
    else:
        arrays = {"paths": np.array([row["path"] for row in rows], dtype=str),
                  "keys": np.array([row["key"] for row in rows], dtype=str),
                  "sample_rates": np.array([row["sample_rate"] for row in rows], dtype=np.int64),
                  "channels": np.array([row["channels"] for row in rows], dtype=np.int64),
                  "model": np.array(model_key), "model_name": np.array(model_name)}
        for i, row in enumerate(rows):
            arrays[f"utterance/{i}"] = row["utterance"]
            if frames:
                arrays[f"frames/{i}"] = row["frames"]
        with open(path, "wb") as handle:  # a file object: numpy appends no ".npz" to the name
            np.savez(handle, **arrays)


def _row_groups(rows: list[dict], frames: bool):
    """Consecutive runs of rows holding about PARQUET_ROW_GROUP_BYTES of embeddings each (a row more at most)."""
    start, size = 0, 0
    for end, row in enumerate(rows, 1):
        size += row["utterance"].nbytes + (row["frames"].nbytes if frames else 0)
        if size >= PARQUET_ROW_GROUP_BYTES or end == len(rows):
            yield rows[start:end]
            start, size = end, 0


def _parquet_table(rows: list[dict], model_key: str, model_name: str, frames: bool, pyarrow):
    columns = {name: [row[name] for row in rows] for name in ("path", "key", "sample_rate", "channels")}
    columns["model"] = [model_key] * len(rows)
    columns["model_name"] = [model_name] * len(rows)
    columns["utterance"] = _column([row["utterance"] for row in rows], pyarrow)
    if frames:
        columns["frames"] = _column([row["frames"] for row in rows], pyarrow)
    return pyarrow.table(columns)


def _previous(out: Path, model_key: str, frames: bool) -> tuple[dict, str, list[str], tuple | None]:
    """Entries of an earlier output of the same model, keyed like the shards, to skip their files; that output's
    model and the paths of its files, to say what the new output leaves out of it (paths only: its rows of files
    this run does not write are let go before the encoding); and its _listing, to leave it as it is where this run
    would write it again (None without one)."""
    if not out.is_file():
        return {}, model_key, [], None
    try:
        old = read_embeddings(out)
    except Exception as error:  # an unreadable old output only means nothing is reused
        print(f"note: the existing {out} is not readable ({type(error).__name__}: {error}); encoding everything")
        return {}, model_key, [], None
    paths = list(old["files"])
    listing = _listing(old["model"], old["model_name"], [(path, row["key"]) for path, row in old["files"].items()],
                       bool(paths) and all("frames" in row for row in old["files"].values()))
    if old["model"] != model_key:  # another model's or dtype's embeddings are replaced
        return {}, old["model"], paths, listing
    entries = {}
    for row in old["files"].values():
        if frames and row.get("frames") is None:
            continue
        entries[row["key"]] = row["utterance"]
        entries[row["key"] + META] = np.array([row["sample_rate"], row["channels"]], dtype=np.int64)
        if row.get("frames") is not None:
            entries[row["key"] + FRAMES] = row["frames"]
    return entries, model_key, paths, listing


def _listing(model_key: str, model_name: str, paths_and_keys: list[tuple[str, str]], frames: bool) -> tuple:
    """What an output holds but its embeddings, which its model and files' keys make: two outputs of equal
    listings are the same."""
    return model_key, model_name, paths_and_keys, frames


def _left_out(out: Path, model_key: str, old_model: str, old_paths: list[str], files: list[Path]) -> str:
    """What this run's output leaves out of the existing `out` (of `old_model`, its `old_paths`): all of it when made
    by another model or dtype, else its files that still exist but are not among this run's `files`; "" if
    nothing. Both were replaced without a word: a user gathering folders into one output a run at a time, or
    trying another model on the same --out, lost the earlier run's embeddings unsaid."""
    if old_paths and old_model != model_key:
        return (f"{out} holds {counted(len(old_paths), 'file')} encoded by another model or dtype, or with other "
                f"windows ({old_model}); "
                f"this run's output replaces it (Ctrl-C keeps it as it is; another --out keeps both)")
    if not old_paths:  # a first run: no file's real path to look up
        return ""
    given = {os.path.realpath(path) for path in files}
    others = [path for path in old_paths if os.path.exists(path) and os.path.realpath(path) not in given]
    if not others:
        return ""
    return (f"{out} holds {counted(len(others), 'file')} this run was not given (e.g. {shown(others[0])}); the output "
            f"holds the files of this run's paths only, so they are left out of it (Ctrl-C keeps it as it is; give "
            f"their paths too to keep them: their embeddings are reused)")


def _held(key: str, entries: dict, frames: bool) -> bool:
    """Whether `entries` hold the file of `key` as this run wants it: its utterance, and its frames with --frames."""
    return key in entries and (not frames or key + FRAMES in entries)


def _remove_written_shards(cache: EmbeddingCache, written: dict[str, str], frames: bool) -> None:
    """Delete this model's shards that the output of `written` ({real path: key}) makes useless, and killed runs'
    half-written ones. Keep any holding a file it leaves out or frames it does not keep: the finished work of an
    interrupted run over other files or with --frames, which that run's command takes up again; and the
    unreadable ones set aside, which the user was told are kept."""
    for shard in sorted(cache.folder.iterdir()) if cache.folder.is_dir() else []:
        if shard.suffix == ".tmp" or shard.suffix == ".safetensors" and _useless(shard, written, frames):
            shard.unlink()
    with contextlib.suppress(OSError):  # gone, or left holding such work
        cache.folder.rmdir()


def _recorded(shard: Path) -> tuple[list[str], dict[str, str]]:
    """The names of `shard`'s entries, and {key: real path} of the files whose paths it records (older shards
    record none)."""
    with safe_open(str(shard), "numpy") as handle:  # the names from the header, and the small path entries
        names = list(handle.keys())
        paths = {name.removesuffix(PATH): os.fsdecode(handle.get_tensor(name).tobytes())
                 for name in names if name.endswith(PATH)}
    return names, paths


def _useless(shard: Path, written: dict[str, str], frames: bool) -> bool:
    """Whether an output of the files of `written` ({real path: key}, with their frames if `frames`) holds all
    that `shard` holds, or in place of a file's old content its new one, which no run can use again."""
    names, paths = _recorded(shard)
    keys = set(written.values())

    def useless(name: str) -> bool:
        key = name.partition("/")[0]
        path = paths.get(key)
        # its file's content changed; the same content in other windows (KEY@window...) is another run's to resume
        changed = path in written and written[path].partition("@")[0] != key.partition("@")[0]
        return changed or key in keys and (frames or not name.endswith(FRAMES))

    return all(useless(name) for name in names)


def _of_gone_files(shard: Path) -> bool:
    """Whether every file `shard` holds is gone from where it was encoded (moved, renamed or deleted): no run can
    use it unless they come back. Not so for one that cannot be read or does not record its files' paths."""
    try:
        names, paths = _recorded(shard)
    except (SafetensorError, OSError):
        return False
    return {name.partition("/")[0] for name in names} == set(paths) and not any(map(os.path.exists, paths.values()))


def _check_out(out: Path) -> None:
    """Refused before any work, not after every file is encoded: a wrong suffix, a folder, a file in the way."""
    if out.is_dir():  # before the suffix: `--out results` was told that its name lacks .npz, not that it is a folder
        raise ValueError(f"--out {out} is a folder; give the file to write, e.g. {out / 'embeddings.npz'}")
    if out.suffix not in (".npz", ".parquet"):
        raise ValueError(f"--out must end in .npz or .parquet, got {out.name}")
    atomic.nearest_folder(out.parent, f"--out {out}")
    if _parts(out).exists() and not _parts(out).is_dir():  # found only once the first batch was encoded
        raise ValueError(f"--out {out} cannot be written: {_parts(out)}, the folder its finished batches are saved "
                         f"in, is a file; move it away")
    if out.suffix == ".parquet":
        _require_pyarrow()
    if out.is_file():
        problem = _not_an_output(out)
        if problem:  # replacing it would destroy someone's data
            raise ValueError(f"--out {out} exists and is not an output of echo encode ({problem}); move it away "
                             f"or choose another --out")
    atomic.check_writable(out.parent, f"--out {out}")
    temporary = atomic.temporary_name(out)  # the longest name written beside OUT (OUT.parts is no longer)
    try:  # too long a name was refused only once every file was encoded
        open(temporary, "wb").close()
        temporary.unlink()
    except OSError as error:
        raise ValueError(f"--out {out} cannot be written: {error.strerror}: {temporary.name}") from None


def _parts(out: Path) -> Path:
    """The folder of the shards of an `out` being written."""
    return out.with_name(out.name + ".parts")


def _not_an_output(path: Path) -> str:
    """Why an existing file is not an `encode` output, or "" when it is one (or empty: made by mktemp, say)."""
    if path.stat().st_size == 0:
        return ""
    if path.suffix != ".parquet" and not zipfile.is_zipfile(path):  # np.load would try it as a pickle, and say so
        with open(path, "rb") as handle:
            return f"not an .npz file: it starts with {handle.read(16)!r}"
    try:
        if path.suffix == ".parquet":
            names = _require_pyarrow().parquet.read_schema(str(path)).names
        else:
            with np.load(path, allow_pickle=False) as data:
                names = data.files
    except Exception as error:  # anything unreadable is not ours
        return f"{type(error).__name__}: {error}"
    missing = [name for name in (("path", "model") if path.suffix == ".parquet" else ("paths", "model"))
               if name not in names]
    return f"it has no {', '.join(missing)}" if missing else ""


def _model_name(model: str) -> str:
    """--model as the output records it: a name (default, echo-small) as given, a file or folder by its absolute
    path, which still says which model it was when the output is read from another folder."""
    path = os.path.expanduser(model)
    return os.path.abspath(path) if os.path.exists(path) else model


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call made the process group) under torchrun, with a gloo group for the
    barriers; (0, 1, False) otherwise. A group the caller made is used, and left to the caller."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    made = not dist.is_initialized()
    if made:
        process_group.join("gloo")
    return dist.get_rank(), world, made


def _summed(failures: int, seconds: float, world: int, stopped: int | None = None) -> torch.Tensor:
    """The ranks' last meeting, once each has encoded its share and saved its shards, or stopped: every rank's
    failures and seconds of audio summed, then one flag per rank, set where that rank stopped."""
    totals = torch.zeros(2 + world, dtype=torch.float64)
    totals[0], totals[1] = failures, seconds
    if stopped is not None:
        totals[2 + stopped] = 1
    dist.all_reduce(totals)
    return totals


def run(args) -> int:
    if args.hop is not None and args.window is None:
        raise on_every_rank(ValueError("--hop needs --window"))
    if args.window is not None:
        try:
            args.window, args.hop = windows.checked(args.window, args.hop)
        except ValueError as error:
            raise on_every_rank(ValueError(f"--window, --hop: {error}")) from None
    if args.batch_files < 1:
        raise on_every_rank(ValueError(f"--batch-files must be at least 1, got {args.batch_files}"))
    if args.max_tokens is not None and args.max_tokens < 1:
        raise on_every_rank(ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}"))
    try:
        _check_out(args.out)
    except ValueError as error:
        on_every_rank(error)
        raise
    rank, world, own_group = _distributed()
    try:
        status = _encode_files(args, rank, world)
        if world > 1:  # the ranks leave together: rank 1 tearing down while rank 0 still merged aborted at times
            try:
                dist.barrier()
            except RuntimeError:  # gloo's "Connection closed by peer" and its traceback, where rank 0 ended on an
                if rank == 0:  # error after the others finished (writing OUT to a full disk, say)
                    raise
                print(f"error: rank 0 stopped while it merged the ranks' shares into {args.out} (that rank prints "
                      f"its error)", file=sys.stderr)
                return 1
        return status
    finally:  # however the command ends: a process that exits with its group alive can abort in gloo's threads
        if own_group:
            dist.destroy_process_group()


def _encode_files(args, rank: int, world: int) -> int:
    from .checkpoint import load

    if rank == 0:  # only rank 0 writes OUT; a run killed while writing it left its temporary
        atomic.remove_abandoned(args.out.parent, f"{glob.escape(args.out.name)}.*.tmp")
    device = inputs.checked_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # this rank's GPU, as pretraining's: not all on GPU 0
        device = inputs.checked_device(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    if device.type == "cpu":
        host_memory.keep_freed_memory()
    model = load(args.model, device=device)
    options = {"dtype": DTYPES[args.dtype], "device": device, "max_tokens": args.max_tokens}
    model_key, model_name = encoding_key(model_hash(model), DTYPES[args.dtype]), _model_name(args.model)
    files, unusable, notes = find_files(args.paths or [SAMPLES_DIR])  # the same on every rank, unlike `failures`
    if not files:
        reasons = "".join(f"; {shown(path)}: {reason}" for path, reason in unusable)
        raise on_every_rank(ValueError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) found in "
                                       f"{', '.join(map(shown, args.paths))}{reasons}"))
    _check_reader(files)
    parts = _parts(args.out)
    cache = EmbeddingCache(parts, model_key)
    # windows are said in the output's model key, and in the files' keys: their entries sit in the model's shards
    # beside the same files' whole embeddings
    output_key = model_key if args.window is None else f"{windows.label(args.window, args.hop)}-{model_key}"
    done, old_model, old_paths, old_listing = _previous(args.out, output_key, args.frames)
    done.update(cache.entries)
    keys = {}
    with ThreadPoolExecutor(READ_WORKERS) as pool:  # in threads, as eval's: hashing lets go of the GIL
        for path, (key, reason) in zip(files, pool.map(key_checked, files)):
            if reason:
                unusable.append((path, reason))
            else:
                keys[path] = key if args.window is None else f"{key}@{windows.label(args.window, args.hop)}"
    wanted = [path for path in keys if not _held(keys[path], done, args.frames)]
    if world > 1:  # every rank has read the shards before any writes one, so all share out the same `wanted`
        dist.barrier()
        # rank 0's list and keys are every rank's: a file added or changed while the ranks scanned shifted one
        # rank's shares against the others', and files between them were encoded by none, and left out unsaid
        shared = [wanted, keys]
        dist.broadcast_object_list(shared, src=0)
        wanted, keys = shared
    # the earlier output's rows of files this run does not write (another folder's, files removed since) are let
    # go: all of it stayed in memory to the run's end (with --frames, 0.7 MB a 10 s clip at 16 kHz, ECHO-small)
    written_here = set(keys.values())
    done = {entry: value for entry, value in done.items() if entry.split("/", 1)[0] in written_here}
    mine = wanted[rank::world]
    # a re-run with nothing to encode, whose output would be the one there: left as it is, not written again
    unchanged = not wanted and old_listing == _listing(output_key, model_name,
                                                       [(shown(path), keys[path]) for path in files if path in keys],
                                                       args.frames)
    if rank == 0 and (left_out := _left_out(args.out, output_key, old_model, old_paths, files)):
        print(f"note: {left_out}")
    if rank == 0 and len(wanted) < len(keys):  # a resumed run says so before its bar, not only in its last line
        print(f"encoded already: {counted(len(keys) - len(wanted), 'file')} ({args.out} or {parts}); "
              + (f"{len(wanted)} to encode" if wanted else "nothing to encode" if unchanged else
                 f"nothing to encode: writing {args.out} from them"))
    failures, start, seconds, streak = [], time.perf_counter(), 0.0, FailureStreak()
    bar = tqdm(total=len(mine), desc=f"encoding (rank {rank})" if world > 1 else "encoding", unit="file",
               disable=args.quiet or rank != 0)

    # the bar counts files, and one long recording is minutes of one call: its passes are shown as they end
    options["progress"] = lambda done, passes: bar.set_postfix_str(f"batch {100 * done // passes}%")
    reading = lambda done, total: bar.set_postfix_str(f"reading {100 * done // total}%")  # a long file's first pass
    own = f"rank {rank}'s share: " if world > 1 else ""  # every rank says its own: unnamed, they read as the run's

    def kept(share: list) -> str:
        saved = sum(_held(keys[path], cache.entries, args.frames) for path in share)
        return f"{counted(saved, 'file')} encoded, kept in {parts}; the same command resumes with the " \
               f"{len(share) - saved} left" if saved else ""

    def encode_and_save(batch: list, pool, streamed: bool) -> float:
        """Read `batch` in `pool` (or its one long file a block at a time, `streamed`), encode it and save its shard;
        the seconds of audio encoded. Its signals are freed on return, before the next batch is read: held across,
        two batches were decoded at once."""
        if args.window is not None:
            encoded = _windows_and_encode(model, batch, args.frames, options, streak, args.window, args.hop)
        elif streamed:
            encoded = [(batch[0], _stream_and_encode(model, batch[0], args.frames, options, streak, reading))]
        else:
            encoded = _read_and_encode(model, batch, pool, args.frames, options, streak)
        fresh, seconds = {}, 0.0
        for path, outcome in encoded:
            if isinstance(outcome, str):
                failures.append((path, outcome))
                continue
            (rate, channels, samples), result = outcome
            fresh[keys[path]] = result["utterance"]
            fresh[keys[path] + META] = np.array([rate, channels], dtype=np.int64)
            fresh[keys[path] + PATH] = np.frombuffer(os.fsencode(os.path.realpath(path)), dtype=np.uint8)
            if args.frames:
                fresh[keys[path] + FRAMES] = result["frames"]
            seconds += samples / rate
        cache.add(fresh)
        return seconds

    try:
        with ThreadPoolExecutor(READ_WORKERS) as pool:
            sizes = decoded_sizes(mine, pool)
            long = {path for path, size in zip(mine, sizes) if size > embed.BATCH_SAMPLES}  # each a batch alone
            for batch in batched(mine, sizes, args.batch_files):
                seconds += encode_and_save(batch, pool, streamed=batch[0] in long)
                bar.set_postfix_str("", refresh=False)  # the next batch's reading is not this one's 100%
                bar.update(len(batch))
    except KeyboardInterrupt:  # every finished batch is in its shard already: the command line says what is kept
        raise KeyboardInterrupt(own + (kept(mine) or NOTHING_KEPT)) from None
    except Exception as error:  # a long run's unforeseen end (a MemoryError, a failing GPU) keeps its batches too
        if world > 1:  # the other ranks finish their shares, then learn that this one stopped, rather than wait on it
            reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            print(f"rank {rank} stopped ({reason}); it waits for the other ranks to finish their shares",
                  file=sys.stderr, flush=True)
            with contextlib.suppress(RuntimeError):  # a broken group: the error that stopped this rank is the one said
                _summed(0, 0.0, world, stopped=rank)
                dist.barrier()  # run's, which the other ranks meet next
            if rank == 0:  # the run's account, as rank 0 gives it when another rank stopped: the others' shares too
                cache = EmbeddingCache(parts, model_key)
                raise WorkKept(f"{args.out} was not written; {kept(wanted) or NOTHING_KEPT}") from error
        if said := kept(mine):
            raise WorkKept(own + said) from error
        raise
    finally:
        bar.close()
    for note in (notes if rank == 0 and args.paths else []):  # no PATH: their CREDITS.md is no recording
        print(f"note: {note}")
    for path, reason in (unusable if rank == 0 else []) + failures:
        print(f"skipped {shown(path)}: {reason}")
    skipped = len(unusable) + len(failures)
    totals = _summed(len(failures), seconds, world) if world > 1 else None  # the summary counts every rank
    # read once every rank has finished its share: rank 0's own time, against every rank's audio, claimed up to
    # N times the speed where another rank's share took longer
    elapsed = time.perf_counter() - start
    if totals is not None:
        skipped, seconds = len(unusable) + int(totals[0]), float(totals[1])
        stopped = [str(r) for r in range(world) if totals[2 + r]]
        if rank != 0:
            return 1 if stopped else 0
        cache = EmbeddingCache(parts, model_key)  # every rank's shards
        if stopped:  # an output without their files would pass for the whole run's
            which = f"rank {stopped[0]} stopped (that rank prints its error)" if len(stopped) == 1 else \
                f"ranks {', '.join(stopped)} stopped (each prints its error)"
            print(f"error: {which}, so {args.out} was not written; {kept(wanted) or NOTHING_KEPT}", file=sys.stderr)
            return 1
    done.update(cache.entries)
    rows, written, reused, encoded_here = [], {}, 0, set(wanted)
    for path in files:
        key = keys.get(path)
        if key is None or not _held(key, done, args.frames):
            continue
        reused += path not in encoded_here
        rate, channels = (int(v) for v in done[key + META])
        row = {"path": shown(path), "key": key, "sample_rate": rate, "channels": channels, "utterance": done[key]}
        if args.frames:
            row["frames"] = done[key + FRAMES]
        rows.append(row)
        written[os.path.realpath(path)] = key
    if not rows:
        print(f"error: no file could be encoded ({skipped} skipped); {args.out} was not written", file=sys.stderr)
        return 1
    try:
        if not unchanged:
            _write(args.out, rows, output_key, model_name, args.frames)
    except KeyboardInterrupt:  # a large output takes a while to write; its embeddings are all kept
        raise KeyboardInterrupt(f"{args.out} was left as it was; the same command writes it without encoding any "
                                f"file again") from None
    except OSError as error:  # a full disk: "[Errno 28]" alone reads as if the encoding were lost
        raise OSError(f"{args.out} could not be written ({error}); it was left as it was, and the same command "
                      f"writes it without encoding any file again") from None
    _remove_written_shards(cache, written, args.frames)
    with contextlib.suppress(OSError):  # gone, or left holding what is said below
        parts.rmdir()
    left = sorted(parts.rglob("*.safetensors"))  # the finished work of an interrupted run this output does not hold
    if left and all(map(_of_gone_files, left)):  # kept: a disk not mounted now, say, brings its files back
        print(f"kept {parts}: the saved batches of an interrupted run whose files are gone (moved, renamed or "
              f"deleted since); no run can use them unless those files come back, so it may be deleted")
    elif left:
        print(f"kept {parts}: the saved batches of an interrupted run over other files, with --frames, with "
              f"another model, another dtype or other windows, which {args.out} does not hold; that run's command "
              f"resumes from them")
    for aside in sorted(parts.rglob("*.unreadable")):  # said at every run's end until the user deletes it
        print(f"kept {aside}: a saved batch that could not be read; its files were encoded again, so it may be "
              f"deleted")
    speed = f"; {seconds:.1f} s of audio in {elapsed:.1f} s ({seconds / max(elapsed, 1e-9):.1f}x real time)" \
        if seconds else ""
    if unchanged:
        print(f"left {args.out} as it was: every file of this run ({counted(len(rows), 'file')}) was encoded "
              f"already, {skipped} skipped")
    else:
        windowed = f" in {counted(sum(len(row['utterance']) for row in rows), 'window')}" if args.window else ""
        print(f"wrote {args.out}: {counted(len(rows), 'file')}{windowed} ({reused} reused from an earlier run), "
              f"{skipped} skipped{speed}")
    return 0
