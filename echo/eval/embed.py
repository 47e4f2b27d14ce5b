"""Utterance embeddings of a whole data set through `echo.fast.encode`, cached on disk.

Files are read by a thread pool one batch ahead of the encoder and encoded in batches of mixed rates and
lengths, bounded in files and in decoded samples (`batched`). Each finished batch is written to the cache as one
safetensors shard (temporary file + rename), so an interrupted run loses at most one batch and a rerun encodes
only what is missing. A cache entry is keyed by (model hash, dtype, the reader and its version, resolved file
path, a hash of the file's bytes): a changed file, also one replaced keeping its size and time stamps, or a reader
that now returns other samples, is encoded again. A file that cannot be read or encoded (an embedding holding NaN
or Inf included) is reported with the reason and left out, never replaced by a zero vector.
"""
from __future__ import annotations

import functools
import hashlib
import os
import stat
import sys
import time
import types
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from .. import atomic, inputs, windows
from ..cli import WorkKept
from ..data.formats import libsndfile_words
from ..ops.backend import BackendError
from ..wording import counted
from . import require

BATCH_FILES = 64
# A batch's decoded samples at most (frames x channels, 256 MB of float32: ~23 minutes of 48 kHz mono), besides its
# files: a count alone had 32 one-hour recordings decoded at once, tens of GB. 64 clips of 10 s at 48 kHz stereo
# (61M samples) still make one batch.
BATCH_SAMPLES = 2 ** 26
READ_WORKERS = 4
# what Ctrl-C before the first finished batch leaves, said alike by eval and encode
NOTHING_KEPT = "no batch was finished, so nothing was kept; the same command starts again"
HASH_CHUNK = 1 << 20
# how EmbeddingCache.key names a file, part of the cache folder's name: entries keyed another way (path, size and
# mtime before) lie in another folder, never read
FILE_KEYS = "path+blake2b"


def model_hash(model) -> str:
    """A hash of the weights and config: the model part of every cache key (a name or a file of the same
    weights gives the same key)."""
    digest = hashlib.sha256(repr(sorted(model.config.to_dict().items())).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def shown(path) -> str:
    """A path as printable text, also when its name is not valid UTF-8 (those bytes become \\xNN escapes)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def reader_identity(read: Callable) -> str:
    """Which reader made the samples: its qualified name; for a functools.partial what it binds (another sensor
    or channel choice reads other samples from the same file); for a Python function also its code and the values
    it closes over or takes by default: two lambdas, or a function edited between runs, had one name and were
    served each other's embeddings. Globals it reads are not seen: `reader_version` says when they change."""
    if isinstance(read, functools.partial):
        return f"{reader_identity(read.func)}{read.args!r}{sorted(read.keywords.items())!r}"
    if not isinstance(getattr(read, "__code__", None), types.CodeType):
        return _function(read)
    bound = [cell.cell_contents for cell in read.__closure__ or ()] + list(read.__defaults__ or ()) + sorted(
        (read.__kwdefaults__ or {}).items())
    return f"{_function(read)}{[_value_identity(value) for value in bound]!r}"


def _function(read: Callable) -> str:
    """A callable's qualified name, and a Python function's code by what it does, not where it stands in its
    file (its bytecode, constants and the names it reads)."""
    name = f"{getattr(read, '__module__', '')}.{getattr(read, '__qualname__', type(read).__name__)}"
    code = getattr(read, "__code__", None)
    return f"{name}:{_code_digest(code)}" if isinstance(code, types.CodeType) else name


def _code_digest(code: types.CodeType) -> str:
    return hashlib.sha256(repr((code.co_code, _constant(code.co_consts), code.co_names)).encode()).hexdigest()[:16]


def _constant(value) -> str:
    """A code constant as the same text in every process: a set literal's order follows the run's string hashes."""
    if isinstance(value, types.CodeType):
        return _code_digest(value)
    if isinstance(value, tuple):
        return f"({', '.join(map(_constant, value))})"
    if isinstance(value, frozenset):
        return f"frozenset({sorted(map(_constant, value))})"
    return repr(value)


def _value_identity(value) -> str:
    """A value a reader closes over or takes by default: a function by its code (its repr holds an address that
    changes from run to run; its own closure is not followed, which could loop), an array by a hash of its values
    (its repr elides all but its ends), a keyword default by its parts, anything else by its repr."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return f"{value[0]}={_value_identity(value[1])}"
    if isinstance(value, (np.ndarray, torch.Tensor)):
        values = np.ascontiguousarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
        return f"array {values.dtype} {values.shape} {hashlib.sha256(values.tobytes()).hexdigest()[:16]}"
    if isinstance(value, functools.partial):
        return reader_identity(value)
    return _function(value) if callable(value) else repr(value)


def encoding_key(model_key: str, dtype: torch.dtype) -> str:
    """What an embedding depends on besides its file: the model, and the dtype its products ran in (bf16 moves
    embeddings by ~5e-3, so a float32 run must not reuse bf16 ones). float32 keeps the bare model key."""
    return model_key if dtype == torch.float32 else f"{str(dtype).removeprefix('torch.')}-{model_key}"


class EmbeddingCache:
    """Embeddings of one model in `folder/<encoding key>/*.safetensors`, one shard per encoded batch."""

    def __init__(self, folder, model_key: str):
        self.folder = Path(folder) / model_key[:32]
        self.entries: dict[str, np.ndarray] = {}
        # a kill mid-write leaves its batch's temporary, one more at every kill (a folder not made yet holds none)
        atomic.remove_abandoned(self.folder, "*.safetensors.*.tmp")
        for shard in sorted(self.folder.glob("*.safetensors")):
            try:
                self.entries.update(load_file(str(shard)))
            except Exception as error:  # a damaged shard only costs its files an encode again
                aside = shard.with_name(shard.name + ".unreadable")
                try:
                    shard.replace(aside)
                except FileNotFoundError:  # another rank set it aside first, and said so
                    continue
                print(f"note: cached embeddings {shard} are unreadable ({type(error).__name__}: {error}); "
                      f"their files are encoded again; the shard is kept as {aside.name}")

    @staticmethod
    def key(path: Path) -> str:
        """The file's identity: where it is (a reader may choose by the name, as CWRU's does) and a hash of its
        bytes, as a file replaced by another keeps its size and times under `cp -p` or a restore (hashing a 10 s
        clip takes ~0.5 ms, encoding it ~200 ms on a CPU). Refused here: a name that is not valid UTF-8 (the
        outputs' path columns are text), and what is not a regular file (reading a pipe waits for ever)."""
        name = os.fsencode(os.path.realpath(path))  # its bytes, also where the locale held them as surrogates
        try:  # no loop error here: opening a looping link names it
            name.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("its name is not valid UTF-8 (rename it)") from None
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError("not a regular file")
        digest = hashlib.blake2b(name + b"\0", digest_size=20)
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def add(self, entries: dict[str, np.ndarray]) -> None:
        if not entries:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        shard = self.folder / f"{time.time_ns()}-{os.getpid()}.safetensors"
        try:
            with atomic.replacing(shard) as temporary:
                save_file({key: np.ascontiguousarray(value) for key, value in entries.items()}, str(temporary))
        except SafetensorError as error:  # a full disk, raised as safetensors' own error: a traceback, not OSError
            raise OSError(f"{self.folder}: a batch of embeddings could not be saved ({error}); the batches saved "
                          f"before it are kept") from None
        finally:  # also after a Ctrl-C in the folder's flush, once renamed: a rerun reuses the shard, so it is kept
            if shard.is_file():
                self.entries.update(entries)


@dataclass
class Embedded:
    """What `embed_files` returns. vectors: one (features,) float32 numpy array per path, in the order given,
    None where the file failed; failures: (Path, reason text) of each failed file, in the order found; cached:
    paths served from the cache; encoded: files encoded by this call (a file listed twice counts once);
    read_seconds, encode_seconds: time spent waiting for the readers, and encoding."""

    vectors: list
    failures: list = field(default_factory=list)
    cached: int = 0
    encoded: int = 0
    read_seconds: float = 0.0
    encode_seconds: float = 0.0


def failure_reason(error: Exception, path=None) -> str:
    """"Type: message"; an OSError about `path` itself without the path, which the line naming the file shows, and
    a libsndfile error without it either (it named the path as a bytes literal: b'/data/x.wav')."""
    soundfile = sys.modules.get("soundfile")  # none of its errors where it was never imported
    if soundfile is not None and isinstance(error, soundfile.LibsndfileError):
        return f"not a readable audio file (libsndfile: {libsndfile_words(error.error_string, path).rstrip('.')})"
    if isinstance(error, OSError) and error.strerror and error.filename is not None and error.filename2 is None \
            and path is not None and error.filename == os.fspath(path):
        return f"{type(error).__name__}: {error.strerror}"
    return f"{type(error).__name__}: {error}"


def key_checked(path: Path) -> tuple[str | None, str]:
    """(EmbeddingCache.key, "") or (None, the reason the file cannot be used)."""
    try:
        return EmbeddingCache.key(path), ""
    except (OSError, ValueError) as error:
        return None, failure_reason(error, path)


def read_checked(read: Callable, path: Path):
    """(signal tensor, rate) or the reason it cannot be used."""
    return checked_reading(functools.partial(_signal_read, read), path)


def checked_reading(read: Callable, path: Path):
    """`read(path)`, or the reason the file cannot be used: any reader failure (a corrupt file, a wrong format) is
    reported, not raised; a missing optional package is raised."""
    try:
        with open(path, "rb") as handle:  # a file we may not read is named as such, not as the decoder's "System error"
            if os.fstat(handle.fileno()).st_size == 0:  # else each reader's own words: "Format not recognised"
                return "empty file (0 bytes)"
        return read(path)
    except ImportError:  # a missing optional package is not a bad file
        raise
    except Exception as error:
        return failure_reason(error, path)


def _signal_read(read: Callable, path: Path):
    result = read(path)
    if not isinstance(result, (tuple, list)) or len(result) != 2:  # else "too many values to unpack"
        return f"the reader returned {type(result).__name__}, not a pair (signal, rate)"
    signal, rate = result
    rate = inputs.check_sample_rate(rate)
    return inputs.as_signal(signal, rate), rate


def batch_files_help(default: int, longer: str = "a longer file is a batch alone") -> str:
    """--batch-files' help, alike in encode and eval but for what a longer file is (`longer`)."""
    return (f"files encoded per batch at most (default: {default}); a batch also ends before {BATCH_SAMPLES:,} "
            f"decoded samples ({BATCH_SAMPLES * 4 >> 20} MB of float32, ~{BATCH_SAMPLES / 48000 / 60:.0f} minutes of "
            f"48 kHz mono); {longer}")


def decoded_sizes(paths: list, pool: Executor) -> list[int]:
    """Each file's decoded samples (frames x channels) from its header, without decoding it, read in `pool`:
    soundfile's where soundfile is usable and reads the header; else the file's bytes / 2, 16-bit PCM's count, a
    bound from above for the files read without it (a plain WAV: exact; eval's .mat files of float64 and .csv text:
    2-8 times too many). A file that cannot be opened counts 0: its read fails later and is reported as any."""
    try:
        soundfile = require("soundfile", "reading audio headers")
    except ImportError:
        soundfile = None
    return list(pool.map(functools.partial(_decoded_samples, soundfile), paths))


def audio_header(soundfile, path: Path):
    """soundfile's info of `path` (rate, channels, frames) from its header, by the name's bytes as read_audio
    opens it; None for a format it does not read (a .mat, a .csv) or a damaged header, and for what is not a regular
    file, never opened: opening a pipe waits for a writer for ever (the embedding reports it)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        return soundfile.info(str(path) if os.name == "nt" else os.fsencode(path))
    except Exception:
        return None


def _decoded_samples(soundfile, path: Path) -> int:
    info = soundfile and audio_header(soundfile, path)
    if info is not None:
        return info.frames * info.channels
    try:  # the size tells
        return os.stat(path).st_size // 2
    except OSError:
        return 0


def batched(items: list, sizes: list[int], batch_files: int) -> list[list]:
    """`items` in order, cut into batches of at most `batch_files` items and BATCH_SAMPLES decoded samples (`sizes`,
    one per item), an item over that limit alone, so a batch's memory is bounded whatever its files' lengths."""
    batches, samples = [], 0
    for item, size in zip(items, sizes):
        if not batches or len(batches[-1]) == batch_files or samples + size > BATCH_SAMPLES:
            batches.append([])
            samples = 0
        batches[-1].append(item)
        samples += size
    return batches


def _encode(model, signals: list, rates: list, device, dtype) -> list:
    from .. import fast

    return [u.float().cpu().numpy() for u in fast.encode(model, signals, rates, dtype=dtype, device=device)]


class EncoderFailure(OSError):
    """The encoder fails alike whatever it is given (a GPU in a sticky error state raises "CUDA error: ..." at every
    call): no signal's fault, so the job stops rather than skip every signal left. An OSError, the machine's: the
    command line says it in a line, with what was kept."""


REPEATED_FAILURES = 3


class FailureStreak:
    """A job's single-signal batches (batch size 1, or a last batch of one) failing with the same error in a row,
    no batch encoded between: REPEATED_FAILURES of them are the device's or the model's fault, which no batch of
    several told (a signal read and checked rarely fails to encode, and then most often says its length)."""

    def __init__(self):
        self.failure, self.count = "", 0

    def record(self, failure: str = "") -> None:
        """A batch's end: the error of a single signal that failed, or "" for any other batch."""
        self.count = self.count + 1 if failure and failure == self.failure else int(bool(failure))
        self.failure = failure
        if self.count == REPEATED_FAILURES:
            raise EncoderFailure(f"the encoder failed on {self.count} single-signal batches in a row with the same "
                                 f"error, so the device or the model fails, not the signals: {failure}")


def encode_isolating_failures(encode: Callable, signals: list, rates: list, streak: FailureStreak | None = None) \
        -> list:
    """`encode(signals, rates)`, one output (an array, or a dict of arrays) per signal; when the batch fails on
    its input, signal by signal, so that only the bad ones fail: their places hold "encode failed: REASON", as do
    outputs holding NaN or Inf (float16 overflows), which must never be saved or searched. A BackendError (a
    setting, not a signal) stops the job, and so does EncoderFailure: a batch and each of its signals alone failing
    with the same error, or the job's single-signal batches in a row (`streak`, kept across its batches)."""
    streak = streak or FailureStreak()
    try:
        results = encode(signals, rates)
    except BackendError:
        raise
    except (ValueError, RuntimeError) as error:
        batch_failure = failure_reason(error)
        if len(signals) == 1:  # tried alone already
            streak.record(batch_failure)
            return [f"encode failed: {error}"]
    else:
        streak.record()
        return finite_or_failed(results)
    # retried here, past the except clause: its traceback held the failed call's tensors (a GPU batch's, out of
    # memory) for the duration of the retries
    results, failures = [], []
    for signal, rate in zip(signals, rates):
        try:
            results += encode([signal], [rate])
        except BackendError:
            raise
        except (ValueError, RuntimeError) as error:
            results.append(f"encode failed: {error}")
            failures.append(failure_reason(error))
    if failures == [batch_failure] * len(signals):
        raise EncoderFailure(f"the encoder failed on a batch of {len(signals)} signals and on each of them alone, "
                             f"with the same error, so the device or the model fails, not the signals: "
                             f"{batch_failure}")
    streak.record()
    return finite_or_failed(results)


def _window_vectors(encode: Callable, loaded: list, window: tuple[float, float], streak: FailureStreak) \
        -> list:
    """Per (signal, rate) of `loaded`, its windows' vectors (windows, features), or the reason it failed."""
    def pieces():
        for owner, (signal, rate) in enumerate(loaded):
            width, step = windows.spans(*window, rate)
            for number, samples in enumerate(windows.of(signal, width, step)):
                yield owner, windows.named(number, step, rate), samples, rate

    results = encode_windows(encode, pieces(), streak)
    return [np.stack(results[owner]) if isinstance(results.get(owner), list) else
            results.get(owner) or windows.too_short(signal.shape[-1], rate, window[0])
            for owner, (signal, rate) in enumerate(loaded)]


WINDOW_GROUP = 1 << 24  # samples of windows encoded in one call: 64 MB of float32, ~35 windows of 10 s at 48 kHz


def encode_windows(encode: Callable, pieces: Iterable, streak: FailureStreak) -> dict:
    """Windows given as (owner, name, samples, rate), encoded through encode_isolating_failures a group of at most
    WINDOW_GROUP samples at a time, so that a long recording's windows, overlapping too, take bounded memory: {owner:
    its windows' outputs in order, or the reason its first failed window failed, after its name}; an owner whose
    windows are all shorter than a window never appears. Once an owner failed, its later windows are not encoded."""
    results, group, size = {}, [], 0

    def flush() -> None:
        nonlocal size
        outputs = encode_isolating_failures(encode, [samples for _, _, samples, _ in group],
                                            [rate for _, _, _, rate in group], streak)
        for (owner, name, _, _), output in zip(group, outputs):
            if isinstance(results.get(owner), str):
                continue
            if isinstance(output, str):
                results[owner] = f"{name}: {output}"
            else:
                results.setdefault(owner, []).append(output)
        group.clear()
        size = 0

    for owner, name, samples, rate in pieces:
        if isinstance(results.get(owner), str):
            continue
        # checked before the encoder: a group of one recording's windows, all NaN, failed alike together and each
        # alone, which encode_isolating_failures takes for a failing device, and the run stopped
        try:
            inputs.as_float32(samples, what="it")
        except ValueError as error:
            results[owner] = f"{name}: {error}"
            continue
        group.append((owner, name, samples, rate))
        size += samples.numel()
        if size >= WINDOW_GROUP:
            flush()
    if group:
        flush()
    return results


def finite_or_failed(results: list) -> list:
    return [result if isinstance(result, str) or _finite(result) else
            "encode failed: the embedding holds NaN or infinite values" for result in results]


def _finite(output) -> bool:
    return all(np.isfinite(value).all() for value in (output.values() if isinstance(output, dict) else [output]))


def embed_files(model, paths, read: Callable, cache_dir=None, model_key: str | None = None, device=None,
                dtype=torch.float32, batch_files: int = BATCH_FILES, progress: bool = True,
                reader_version: str = "", window: tuple[float, float | None] | None = None) -> Embedded:
    """Utterance embeddings of `paths`, each file read by `read(path) -> (signal, rate)` (any audio file:
    `echo.eval.datasets.read_audio`): `Embedded.vectors[i]` is `paths[i]`'s, None where the file failed (the
    reason is in `Embedded.failures`). With `cache_dir` (None: no cache) a rerun encodes only new or changed
    files. The cache is keyed by the reader too (reader_identity, and `reader_version`: change it when what the
    reader's code reads, a global say, changes what it returns), so embeddings of samples read another way are
    not served. `model_key` names the model in the cache key instead of the hash of its weights (model_hash).
    `device` and `dtype` are echo.fast.encode's (the cache keeps bf16 embeddings apart from float32 ones).
    `batch_files` files at most are encoded at a time (fewer when they are long: BATCH_SAMPLES); `progress`
    shows a progress bar on stderr. `window` = (seconds, hop seconds or None: end to end) embeds each file's
    windows (echo.windows), each a signal of its own: a file's vector is then (windows, features). A run stopped
    after it saved batches says what it kept and that the same command resumes: Ctrl-C in its KeyboardInterrupt, an
    error in a WorkKept from it (an ImportError excepted, named as such by the command line)."""
    from .. import fast

    if inputs.whole_number(batch_files) is None or batch_files < 1:  # a negative size made no batch: nothing encoded
        raise ValueError(f"batch_files={batch_files!r}: at least one file per batch, a whole number")
    # before any file is read: found by the encoder, a wrong argument failed every batch as if each file were bad,
    # or the job as if the device had failed
    fast.checked_encoder(model, device, dtype)
    if not callable(read):
        raise TypeError(f"read must be a function path -> (signal, rate), got {type(read).__name__} {read!r:.60}")
    if isinstance(paths, (str, bytes, os.PathLike)):  # one path was read as a list of its characters, each "a file"
        raise TypeError(f"paths must be a list of paths, got the one path {paths!r:.80}: pass [path]")
    paths = [Path(p) for p in paths]
    window = None if window is None else windows.checked(*window)
    cache = None
    if cache_dir is not None:
        key = (f"{encoding_key(model_key or model_hash(model), dtype)}\0{reader_identity(read)}\0{reader_version}"
               f"\0{FILE_KEYS}" + ("" if window is None else f"\0{windows.label(*window)}"))
        cache = EmbeddingCache(cache_dir, hashlib.sha256(key.encode()).hexdigest())
    result = Embedded([None] * len(paths))
    with ThreadPoolExecutor(READ_WORKERS) as pool:
        checked = list(pool.map(key_checked, paths))  # in threads: hashing lets go of the GIL
        keys, todo = [key for key, _ in checked], []
        for index, (path, (key, reason)) in enumerate(zip(paths, checked)):
            if reason:
                result.failures.append((path, reason))
            elif cache is not None and key in cache.entries:
                result.vectors[index] = cache.entries[key]
                result.cached += 1
            else:
                todo.append(index)
        batches = batched(todo, decoded_sizes([paths[i] for i in todo], pool), batch_files)
        bar = tqdm(total=len(paths), initial=len(paths) - len(todo), desc="embedding", unit="file",
                   disable=not progress)
        submit = lambda batch: [pool.submit(read_checked, read, paths[i]) for i in batch]  # noqa: E731
        pending = submit(batches[0]) if batches else []
        streak = FailureStreak()

        def kept() -> str:
            """What a stopped run leaves the next: the finished batches, each in its shard; "" when none."""
            saved = 0 if cache is None else sum(key in cache.entries for key in keys if key is not None)
            return f"embeddings of {counted(saved, 'file')} are kept in {cache.folder}; the same command encodes " \
                   f"only the other {len(paths) - saved}" if saved else ""

        try:
            for number, batch in enumerate(batches):
                start = time.perf_counter()
                loaded = [future.result() for future in pending]
                result.read_seconds += time.perf_counter() - start
                good = [(i, item) for i, item in zip(batch, loaded) if not isinstance(item, str)]
                result.failures += [(paths[i], item) for i, item in zip(batch, loaded) if isinstance(item, str)]
                # the next batch is read once `good` no longer holds the last one's signals: two batches alive, not 3
                pending = submit(batches[number + 1]) if number + 1 < len(batches) else []
                start = time.perf_counter()
                encode = functools.partial(_encode, model, device=device, dtype=dtype)
                if window is None:
                    vectors = good and encode_isolating_failures(encode, [s for _, (s, _) in good],
                                                                 [r for _, (_, r) in good], streak)
                else:
                    vectors = good and _window_vectors(encode, [item for _, item in good], window, streak)
                result.encode_seconds += time.perf_counter() - start
                fresh = {}
                for i, vector in zip([i for i, _ in good], vectors):  # no loop variable keeps a signal alive
                    if isinstance(vector, str):
                        result.failures.append((paths[i], vector))
                    else:
                        result.vectors[i] = vector
                        fresh[keys[i]] = vector
                result.encoded += len(fresh)
                if cache is not None:
                    cache.add(fresh)
                bar.update(len(batch))
        except KeyboardInterrupt:  # each finished batch is in its shard already: the command line says what is kept
            if cache is None:
                raise
            raise KeyboardInterrupt(kept() or NOTHING_KEPT) from None
        except ImportError:  # eval's command line names the missing package in a line, which a WorkKept would not
            raise
        except Exception as error:  # a long run's unforeseen end (a MemoryError, a failing GPU) keeps its batches too
            if said := kept():
                raise WorkKept(said) from error
            raise
        finally:  # an error or the interrupt's message starts a line of its own, after the progress bar
            bar.close()
    return result
