"""Embedding a folder of files: equal to model.encode per file, cached, resumable, bad files reported."""
import errno
import functools
import hashlib
import os
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import random_model, rel_err, seeded_rng
from echo.cli import WorkKept
from echo.eval import embed
from echo.eval.datasets import read_audio
from echo.ops.backend import BackendError

soundfile = pytest.importorskip("soundfile")


def write(path, signal, rate):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), signal, rate)
    return path


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", depth=2)


def make_files(folder):
    rng = seeded_rng()
    return [
        write(folder / "a.wav", 0.3 * rng.normal(size=8000).astype(np.float32), 16000),
        write(folder / "b.flac", 0.3 * rng.normal(size=3000).astype(np.float32), 8000),
        write(folder / "c.wav", 0.3 * rng.normal(size=(12000, 2)).astype(np.float32), 12000),  # stereo
        write(folder / "d.wav", 0.3 * rng.normal(size=9000).astype(np.float32), 16000),
    ]


def reference(model, path):
    signal, rate = read_audio(path)
    return model.encode(torch.from_numpy(signal), rate)[0]


def test_embeddings_equal_model_encode_and_cache(tmp_path, model):
    files = make_files(tmp_path / "data")
    cache = tmp_path / "cache"
    first = embed.embed_files(model, files, read_audio, cache, "key", batch_files=3, progress=False)
    assert first.encoded == 4 and first.cached == 0 and not first.failures
    for path, vector in zip(files, first.vectors):
        assert rel_err(vector, reference(model, path)) < 1e-5
    assert len(first.vectors[2]) == 2 * 5 * 192  # two channels x 5 bands at 12 kHz, concatenated
    again = embed.embed_files(model, files, read_audio, cache, "key", progress=False)
    assert again.encoded == 0 and again.cached == 4
    for a, b in zip(first.vectors, again.vectors):
        np.testing.assert_array_equal(a, b)
    # a changed file is encoded again, the others come from the cache
    write(files[3], 0.3 * seeded_rng().normal(size=9000).astype(np.float32), 16000)
    stat = files[3].stat()
    os.utime(files[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = embed.embed_files(model, files, read_audio, cache, "key", progress=False)
    assert changed.encoded == 1 and changed.cached == 3
    assert rel_err(changed.vectors[3], reference(model, files[3])) < 1e-5
    assert not np.allclose(changed.vectors[3], first.vectors[3])
    # another model key never sees these entries, nor does another reader (a data set reading other channels)
    assert embed.embed_files(model, files[:1], read_audio, cache, "other", progress=False).encoded == 1

    def first_channel(path):
        signal, rate = read_audio(path)
        return (signal[0] if signal.ndim == 2 else signal), rate

    assert embed.embed_files(model, files, first_channel, cache, "key", progress=False).encoded == 4
    assert embed.embed_files(model, files, first_channel, cache, "key", progress=False).cached == 4
    # the same reader in another version, or bound to another choice, reads other samples
    assert embed.embed_files(model, files, first_channel, cache, "key", progress=False,
                             reader_version="2").encoded == 4

    def channel(path, index):
        signal, rate = read_audio(path)
        return (signal[min(index, len(signal) - 1)] if signal.ndim == 2 else signal), rate

    for index in (0, 1):
        assert embed.embed_files(model, files, functools.partial(channel, index=index), cache, "key",
                                 progress=False).encoded == 4


def test_readers_of_one_name_but_other_code_or_values_never_share_embeddings(tmp_path, model):
    """Two lambdas, or a function edited between runs, had one identity (its qualified name): a reader of the
    first half second was served the whole files' embeddings from the cache."""
    files, cache = make_files(tmp_path / "data")[:2], tmp_path / "cache"
    whole = lambda path: read_audio(path)  # noqa: E731
    head = lambda path: (read_audio(path)[0][:4000], read_audio(path)[1])  # noqa: E731
    assert embed.embed_files(model, files, whole, cache, "key", progress=False).encoded == 2
    again = embed.embed_files(model, files, head, cache, "key", progress=False)
    assert again.encoded == 2 and not np.allclose(again.vectors[0], reference(model, files[0]))

    def cut(samples):
        return lambda path: (read_audio(path)[0][:samples], read_audio(path)[1])
    assert embed.embed_files(model, files, cut(4000), cache, "key", progress=False).encoded == 2
    assert embed.embed_files(model, files, cut(4000), cache, "key", progress=False).cached == 2
    assert embed.embed_files(model, files, cut(2000), cache, "key", progress=False).encoded == 2
    taps = np.zeros(1001)
    twin = taps.copy()
    twin[500] = 1  # the same ends: their reprs are equal

    def filtered(kernel):
        return lambda path: (np.convolve(read_audio(path)[0], kernel, "same").astype(np.float32), read_audio(path)[1])
    assert repr(taps) == repr(twin)
    assert embed.reader_identity(filtered(taps)) != embed.reader_identity(filtered(twin))
    assert embed.reader_identity(filtered(twin)) == embed.reader_identity(filtered(twin.copy()))
    edited = {}
    for body in ("return read_audio(path)", "return read_audio(path)[0][::-1].copy(), 16000"):
        exec(f"def reader(path):\n    {body}\n", {"read_audio": read_audio}, edited)
        assert embed.embed_files(model, files, edited["reader"], cache, "key", progress=False).encoded == 2


def test_a_readers_identity_is_the_same_in_every_process():
    """The identity keys the cache across runs: a function's set literal (its order follows the run's string
    hashes) or a function it closes over (its repr holds an address) must not make every run miss."""
    script = ("from echo.eval import embed, datasets\n"
              "suffixes = lambda path: path.suffix in {'.wav', '.flac', '.ogg', '.aif', '.mp3', '.x'}\n"
              "def closing(read):\n    return lambda path: read(path)\n"
              "print(embed.reader_identity(suffixes), embed.reader_identity(closing(datasets.read_audio)))\n")
    import subprocess
    seen = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(seen) == 1 and seen.pop().strip()


def test_a_file_replaced_keeping_its_size_and_times_is_encoded_again(tmp_path, model):
    """The cache was keyed by path, size and mtime: other content of the same size copied over with `cp -p`, or
    times restored by a tool, was served the old content's embedding."""
    files = make_files(tmp_path / "data")
    first = embed.embed_files(model, files[:1], read_audio, tmp_path / "cache", "key", progress=False)
    before = files[0].stat()
    write(files[0], 0.3 * seeded_rng().normal(size=8000).astype(np.float32), 16000)
    os.utime(files[0], ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (files[0].stat().st_size, files[0].stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = embed.embed_files(model, files[:1], read_audio, tmp_path / "cache", "key", progress=False)
    assert again.encoded == 1 and again.cached == 0
    assert rel_err(again.vectors[0], reference(model, files[0])) < 1e-5
    assert not np.allclose(again.vectors[0], first.vectors[0])


def test_copies_of_one_file_at_two_places_each_get_their_own_embedding(tmp_path, model):
    """A reader may choose by where a file is (CWRU's sensor comes from the folder): two copies of the same bytes
    under other names read other samples, and neither may be served the other's embedding from the cache."""
    first = make_files(tmp_path / "drive")[0]
    second = tmp_path / "fan" / first.name
    second.parent.mkdir()
    second.write_bytes(first.read_bytes())

    def by_place(path):
        signal, rate = read_audio(path)
        return (signal if path.parent.name == "drive" else signal[::-1].copy()), rate

    fresh = embed.embed_files(model, [first, second], by_place, tmp_path / "cache", "key", progress=False)
    again = embed.embed_files(model, [first, second], by_place, tmp_path / "cache", "key", progress=False)
    assert again.cached == 2 and not np.allclose(fresh.vectors[0], fresh.vectors[1])
    for a, b in zip(fresh.vectors, again.vectors):
        np.testing.assert_array_equal(a, b)


def test_entries_keyed_by_size_and_mtime_are_not_read(tmp_path, model):
    """A cache written before files were keyed by their content holds entries that may be stale: none is served."""
    path = make_files(tmp_path / "data")[0]
    reader = f"{embed.encoding_key('key', torch.float32)}\0{embed.reader_identity(read_audio)}\0"
    old_cache = embed.EmbeddingCache(tmp_path / "cache", hashlib.sha256(reader.encode()).hexdigest())
    status = path.stat()
    old_key = hashlib.sha256(f"{path.resolve()}\0{status.st_size}\0{status.st_mtime_ns}".encode()).hexdigest()[:40]
    old_cache.add({old_key: np.zeros(8, np.float32)})  # where and how the cache kept it then
    result = embed.embed_files(model, [path], read_audio, tmp_path / "cache", "key", progress=False)
    assert result.encoded == 1 and result.cached == 0
    assert rel_err(result.vectors[0], reference(model, path)) < 1e-5


def test_a_pipe_or_a_looping_link_is_reported_not_waited_on(tmp_path, model):
    """A pipe named .wav was opened for reading, which waits for a writer for ever; a link loop crashed the run
    with pathlib's RuntimeError ("Symlink loop from ...")."""
    good, pipe, loop = tmp_path / "a.wav", tmp_path / "pipe.wav", tmp_path / "loop.wav"
    write(good, 0.3 * seeded_rng().normal(size=8000).astype(np.float32), 16000)
    os.mkfifo(pipe)
    loop.symlink_to(loop)
    release = threading.Timer(10, lambda: os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)))  # a reader waits
    release.start()
    try:
        result = embed.embed_files(model, [pipe, loop, good], read_audio, tmp_path / "cache", "key",
                                   progress=False)
    finally:
        release.cancel()
    assert [v is None for v in result.vectors] == [True, True, False]
    assert result.failures == [(pipe, "ValueError: not a regular file"), (loop, f"OSError: {os.strerror(errno.ELOOP)}")]


def test_the_reason_a_file_cannot_be_used_does_not_repeat_its_path(tmp_path):
    """"skipped P: FileNotFoundError: [Errno 2] No such file or directory: 'P'" named the file twice; a reader's
    error about another file still names that one."""
    gone = tmp_path / "gone.wav"
    missing = f"FileNotFoundError: {os.strerror(errno.ENOENT)}"
    assert embed.key_checked(gone) == (None, missing)
    assert embed.read_checked(read_audio, gone) == missing
    present = write(tmp_path / "a.wav", np.zeros(800, np.float32), 16000)

    def needs_a_sidecar(path):
        return open(path.with_suffix(".json"))

    assert embed.read_checked(needs_a_sidecar, present) == \
        f"FileNotFoundError: [Errno {errno.ENOENT}] {os.strerror(errno.ENOENT)}: {str(present.with_suffix('.json'))!r}"


def test_bad_files_are_reported_and_skipped(tmp_path, model):
    files = make_files(tmp_path)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF this is not audio")
    short = write(tmp_path / "short.wav", np.zeros(100, np.float32), 16000)  # under one 25 ms window
    missing = tmp_path / "missing.wav"
    result = embed.embed_files(model, [files[0], corrupt, short, missing, files[1]], read_audio, None,
                               progress=False)
    assert [v is None for v in result.vectors] == [False, True, True, True, False]
    reasons = {path.name: reason for path, reason in result.failures}
    assert set(reasons) == {"corrupt.wav", "short.wav", "missing.wav"}
    assert "shorter than one 25 ms window" in reasons["short.wav"]
    assert reasons["corrupt.wav"].startswith("not a readable audio file (libsndfile: ")
    assert rel_err(result.vectors[4], reference(model, files[1])) < 1e-5


def test_a_failed_batch_is_encoded_signal_by_signal_and_a_backend_error_stops_the_job():
    calls = []

    def encode(signals, rates):
        calls.append(len(signals))
        if "bad" in signals:
            raise ValueError("a bad signal")
        return [signal.upper() for signal in signals]
    assert embed.encode_isolating_failures(encode, ["a", "bad", "c"], [1, 2, 3]) == [
        "A", "encode failed: a bad signal", "C"]
    assert calls == [3, 1, 1, 1]

    def setting_at_retry(signals, rates):  # the batch fails on its input, then a setting fails the retry
        raise RuntimeError("batch") if len(signals) > 1 else BackendError("ECHO_BACKEND_ATTENTION=bogus")
    with pytest.raises(BackendError, match="bogus"):
        embed.encode_isolating_failures(setting_at_retry, ["a", "b"], [1, 1])


def test_an_encoder_failing_alike_on_a_batch_and_on_each_of_its_signals_stops_the_job():
    """A GPU in a sticky error state raises "CUDA error: ..." at every call: each signal of every batch was then
    retried alone, reported "encode failed" and left out, and the job ended well, its output missing them all."""
    calls = []

    def broken(signals, rates):
        calls.append(len(signals))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(embed.EncoderFailure, match=r"^the encoder failed on a batch of 3 signals and on each of "
                       r"them alone, with the same error, so the device or the model fails, not the signals: "
                       r"RuntimeError: CUDA error: an illegal memory access was encountered$"):
        embed.encode_isolating_failures(broken, ["a", "b", "c"], [1, 1, 1])
    assert calls == [3, 1, 1, 1]
    # one signal alone, or signals failing each their own way, are the signals' fault
    assert embed.encode_isolating_failures(broken, ["a"], [1]) == [
        "encode failed: CUDA error: an illegal memory access was encountered"]

    def each_its_own(signals, rates):
        raise ValueError(f"bad {'+'.join(signals)}")

    assert embed.encode_isolating_failures(each_its_own, ["a", "b"], [1, 1]) == [
        "encode failed: bad a", "encode failed: bad b"]


def test_single_signal_batches_failing_alike_in_a_row_stop_the_job():
    """With one signal per batch (batch_files=1, or a last batch of one) a broken GPU had every signal tried twice,
    alone, and skipped: no batch of several ever failed alike."""
    calls = []

    def broken(signals, rates):
        calls.append(len(signals))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    streak = embed.FailureStreak()
    for signal in ("a", "b"):
        assert embed.encode_isolating_failures(broken, [signal], [1], streak) == [
            "encode failed: CUDA error: an illegal memory access was encountered"]
    with pytest.raises(embed.EncoderFailure, match=r"^the encoder failed on 3 single-signal batches in a row with "
                       r"the same error, so the device or the model fails, not the signals: RuntimeError: CUDA "
                       r"error: an illegal memory access was encountered$"):
        embed.encode_isolating_failures(broken, ["c"], [1], streak)
    assert calls == [1, 1, 1]  # a signal alone is not retried


def test_embed_files_one_file_a_batch_stops_on_a_broken_device_keeping_its_work(tmp_path, model, monkeypatch):
    real, calls = embed._encode, []

    def broken_after_the_first_file(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args, **kwargs)

    monkeypatch.setattr(embed, "_encode", broken_after_the_first_file)
    files = make_files(tmp_path)
    with pytest.raises(WorkKept, match="^embeddings of 1 file are kept in .*; the same command encodes only the "
                       "other 3$") as stopped:
        embed.embed_files(model, files, read_audio, tmp_path / "cache", "key", batch_files=1, progress=False)
    assert isinstance(stopped.value.__cause__, embed.EncoderFailure)
    assert "3 single-signal batches in a row" in str(stopped.value.__cause__)
    monkeypatch.setattr(embed, "_encode", real)
    assert embed.embed_files(model, files, read_audio, tmp_path / "cache", "key", progress=False).cached == 1


def test_bad_signals_between_good_ones_or_failing_each_their_own_way_are_only_skipped():
    def encode(signals, rates):
        if signals[0].startswith("bad"):
            raise ValueError(f"{signals[0]} is too short" if signals[0][-1].isdigit() else "too short")
        return [signal.upper() for signal in signals]

    streak = embed.FailureStreak()
    outputs = [embed.encode_isolating_failures(encode, [signal], [1], streak)[0]
               for signal in ("bad", "bad", "a", "bad", "bad", "b", "bad1", "bad2", "bad3", "c")]
    assert outputs == ["encode failed: too short"] * 2 + ["A"] + ["encode failed: too short"] * 2 + ["B"] + [
        f"encode failed: bad{i} is too short" for i in (1, 2, 3)] + ["C"]


def test_a_failed_batch_holds_no_memory_while_its_signals_are_retried():
    """The retries ran inside the batch's `except` clause, whose traceback kept the failed call's locals (a GPU
    batch's intermediate tensors after an out-of-memory error) alive: the retries then ran out of memory too."""

    class Intermediate:
        pass

    held, alive = [], []

    def encode(signals, rates):
        if len(signals) > 1:
            intermediate = Intermediate()
            held.append(weakref.ref(intermediate))
            raise RuntimeError("out of memory")
        alive.append(held[0]() is not None)
        return signals

    assert embed.encode_isolating_failures(encode, ["a", "b"], [1, 1]) == ["a", "b"]
    assert alive == [False, False]


def test_an_embedding_with_nan_is_a_failure_of_its_file_and_not_cached(tmp_path, model, monkeypatch):
    """A model that overflows on one file (NaN or Inf in its embedding) fails that file, named in failures.csv;
    the evaluation then stopped on "embeddings: row(s) N hold NaN", N counting only the files kept, and the NaN
    was served from the cache on every rerun."""
    files = make_files(tmp_path / "data")
    original = embed._encode

    def overflowing(model, signals, rates, device, dtype):
        vectors = original(model, signals, rates, device, dtype)
        return [np.full_like(v, np.nan) if len(s.shape) == 2 else v for v, s in zip(vectors, signals)]  # c.wav

    monkeypatch.setattr(embed, "_encode", overflowing)
    result = embed.embed_files(model, files, read_audio, tmp_path / "cache", "key", progress=False)
    assert [v is None for v in result.vectors] == [False, False, True, False]
    assert [(path.name, "NaN" in reason) for path, reason in result.failures] == [("c.wav", True)]
    monkeypatch.setattr(embed, "_encode", original)
    again = embed.embed_files(model, files, read_audio, tmp_path / "cache", "key", progress=False)
    assert again.cached == 3 and again.encoded == 1 and not again.failures
    assert rel_err(again.vectors[2], reference(model, files[2])) < 1e-5


def test_batches_end_at_the_file_count_or_before_the_sample_limit_a_longer_item_alone(monkeypatch):
    monkeypatch.setattr(embed, "BATCH_SAMPLES", 10)
    sizes = {"a": 3, "b": 4, "c": 5, "long": 25, "d": 10, "e": 1, "f": 1, "g": 1, "h": 0}
    assert embed.batched(list(sizes), list(sizes.values()), 3) == [
        ["a", "b"], ["c"], ["long"], ["d"], ["e", "f", "g"], ["h"]]
    assert embed.batched([], [], 3) == []
    monkeypatch.undo()  # the real limit does not cut batches of ordinary clips: 64 of 10 s at 48 kHz, stereo
    assert embed.batched(list(range(64)), [2 * 10 * 48000] * 64, 64) == [list(range(64))]


def test_decoded_sizes_come_from_headers_else_from_the_file_size(tmp_path, monkeypatch):
    stereo = write(tmp_path / "stereo.wav", np.zeros((3000, 2), np.float32), 16000)
    flac = write(tmp_path / "mono.flac", 0.3 * seeded_rng().normal(size=5000).astype(np.float32), 8000)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF this header does not read")
    table = tmp_path / "table.csv"  # eval's MAFAULDA files: a format soundfile does not read
    table.write_text("0.25,0.5\n" * 10)
    paths = [stereo, flac, broken, table, tmp_path / "gone.wav"]
    with ThreadPoolExecutor(2) as pool:
        assert embed.decoded_sizes(paths, pool) == [6000, 5000, broken.stat().st_size // 2,
                                                    table.stat().st_size // 2, 0]
        monkeypatch.setitem(sys.modules, "soundfile", None)  # plain WAV files are read without it: sized alike
        assert embed.decoded_sizes(paths[:1], pool) == [stereo.stat().st_size // 2]  # 6022: its header's 44 bytes


def test_a_batch_holds_files_up_to_the_sample_limit_with_the_same_embeddings(tmp_path, model, monkeypatch):
    """Batches were counted in files alone: 64 one-hour recordings were decoded at once, tens of GB."""
    files = make_files(tmp_path / "data")  # 8000, 3000, 2 x 12000 and 9000 samples
    files.append(write(tmp_path / "data" / "e.wav", 0.3 * seeded_rng().normal(size=25000).astype(np.float32),
                       16000))
    whole = embed.embed_files(model, files, read_audio, None, progress=False)
    real, calls = embed._encode, []

    def counted(model, signals, rates, device, dtype):
        calls.append([signal.numel() for signal in signals])
        return real(model, signals, rates, device, dtype)

    monkeypatch.setattr(embed, "_encode", counted)
    monkeypatch.setattr(embed, "BATCH_SAMPLES", 20000)
    cut = embed.embed_files(model, files, read_audio, None, progress=False)
    assert calls == [[8000, 3000], [24000], [9000], [25000]]  # the stereo file and e.wav over the limit, alone
    assert cut.encoded == whole.encoded == 5 and not cut.failures
    # equal up to the order of float sums, which other passes of the encoder may change
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(cut.vectors, whole.vectors))


@pytest.mark.parametrize("batch_files", [0, -3, "4", 2.5])
def test_a_batch_size_under_one_is_refused(tmp_path, model, batch_files):
    """0 failed in range() ("arg 3 must not be zero"); a negative size made no batch, so no file was encoded
    and none reported as failed; "4" failed with a TypeError of '<' between str and int."""
    files = make_files(tmp_path)
    with pytest.raises(ValueError, match=f"batch_files={batch_files!r}: at least one file per batch, a whole number"):
        embed.embed_files(model, files, read_audio, None, batch_files=batch_files, progress=False)


def test_one_path_given_for_a_list_of_paths_is_refused(tmp_path, model):
    """A path string was a list of its characters: one "file" per character, each failed, and nothing said why."""
    path = make_files(tmp_path)[0]
    for given in (str(path), path):
        with pytest.raises(TypeError, match="paths must be a list of paths, got the one path .*: pass \\[path\\]"):
            embed.embed_files(model, given, read_audio, None, progress=False)


@pytest.mark.parametrize("argument, error", [
    ({"dtype": "bfloat16"}, "pass torch.bfloat16, not its name"), ({"dtype": torch.float64}, "dtype must be"),
    ({"device": "cpux"}, "unknown device 'cpux'"), ({"model": "tiny"}, "model must be an echo.EchoModel"),
    ({"read": None}, "read must be a function path -> \\(signal, rate\\)")])
def test_a_wrong_argument_is_named_before_any_file_is_read(tmp_path, model, argument, error):
    """Found by the encoder, a wrong dtype or device failed every file as if it were bad (one file a batch), or
    stopped the job saying "the device or the model fails, not the signals"; a model name failed in the cache
    key's hash ("'str' object has no attribute 'config'")."""
    files = make_files(tmp_path)
    reads = []

    def read(path):
        reads.append(path)
        return read_audio(path)
    arguments = {"model": model, "read": read, **argument}
    with pytest.raises((ValueError, TypeError), match=error):
        embed.embed_files(arguments.pop("model"), files[:1], arguments.pop("read"), tmp_path / "cache",
                          progress=False, **arguments)
    assert not reads


def test_a_reader_returning_no_pair_is_told_so():
    """A reader returning the samples alone failed each file with "too many values to unpack (expected 2)"."""
    assert embed.read_checked(lambda path: np.zeros(800, np.float32), __file__) == \
        "the reader returned ndarray, not a pair (signal, rate)"


def test_interrupted_run_resumes(tmp_path, model, monkeypatch):
    files = make_files(tmp_path / "data")
    calls = []
    original = embed._encode

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(embed, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed.embed_files(model, files, read_audio, tmp_path / "cache", "key", batch_files=2, progress=False)
    monkeypatch.setattr(embed, "_encode", original)
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    resumed = embed.embed_files(model, files, read_audio, tmp_path / "cache", "key", batch_files=2, progress=False)
    assert resumed.cached == 2 and resumed.encoded == 2


def test_a_damaged_shard_is_reported_once_by_the_process_that_sets_it_aside(tmp_path, monkeypatch, capsys):
    """Every torchrun rank that read the damaged shard before one set it aside printed the same note."""
    cache = embed.EmbeddingCache(tmp_path, "key")
    cache.add({"a": np.zeros(4, np.float32)})
    [shard] = cache.folder.glob("*.safetensors")
    shard.write_bytes(shard.read_bytes()[:20])
    real, ranks = embed.load_file, []

    def another_rank_reads_it_meanwhile(name):  # after this one did, before this one set it aside
        try:
            return real(name)
        finally:
            if not ranks:
                ranks.append(None)
                ranks[0] = embed.EmbeddingCache(tmp_path, "key")

    monkeypatch.setattr(embed, "load_file", another_rank_reads_it_meanwhile)
    assert embed.EmbeddingCache(tmp_path, "key").entries == {} and ranks[0].entries == {}
    assert capsys.readouterr().out.count(f"{shard} are unreadable") == 1
    assert [p.name for p in cache.folder.iterdir()] == [shard.name + ".unreadable"]


def test_a_killed_writers_half_shard_is_removed_when_the_cache_is_opened(tmp_path):
    """A kill -9 while a batch was saved left its temporary in the cache (eval's OUT/cache, encode's OUT.parts) for
    good: one more at every kill, each a batch's embeddings in size."""
    cache = embed.EmbeddingCache(tmp_path, "key")
    cache.add({"a": np.zeros(4, np.float32)})
    [shard] = cache.folder.glob("*.safetensors")
    dead = shard.with_name(f"{shard.name}.999999999-5.tmp")  # above any pid_max: its writer is gone
    dead.write_bytes(shard.read_bytes()[:20])
    alive = shard.with_name(f"1-2.safetensors.{os.getppid()}-7.tmp")  # a live writer's (another rank's)
    alive.write_bytes(b"")
    assert sorted(embed.EmbeddingCache(tmp_path, "key").entries) == ["a"]
    assert sorted(p.name for p in cache.folder.iterdir()) == sorted([shard.name, alive.name])


def test_a_batch_that_could_not_be_saved_is_not_counted_as_kept(tmp_path, monkeypatch):
    """A full disk under a shard's write: its entries are not in the cache, so the message saying what a stopped run
    kept must not count them, nor may this run serve them as cached."""
    from safetensors import SafetensorError

    cache = embed.EmbeddingCache(tmp_path, "key")
    cache.add({"a": np.zeros(4, np.float32)})

    def full_disk(tensors, filename):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(embed, "save_file", full_disk)
    with pytest.raises(OSError, match="could not be saved .*No space left"):
        cache.add({"b": np.ones(4, np.float32)})
    assert sorted(cache.entries) == ["a"] and sorted(embed.EmbeddingCache(tmp_path, "key").entries) == ["a"]


def test_model_hash_changes_with_weights():
    model = random_model("tiny", depth=1)
    before = embed.model_hash(model)
    with torch.no_grad():
        model.norm.bias[0] += 1
    assert embed.model_hash(model) != before


def test_windows_all_nan_fail_their_recording_alone_not_the_encoder(model, monkeypatch):
    """A group holding only one recording's windows, all NaN, failed alike together and each alone: taken for a
    failing device (EncoderFailure), it stopped the job. They are checked before the encoder; a group is at most
    WINDOW_GROUP samples, and a failed recording's later windows are not encoded."""
    monkeypatch.setattr(embed, "WINDOW_GROUP", 3000)
    calls = []

    def encode(signals, rates):
        calls.append(len(signals))
        return embed._encode(model, signals, rates, None, torch.float32)

    good, bad = torch.randn(4000), torch.full((4000,), float("nan"))
    bad[2500:] = 0.0  # its last window is finite, after the first failed one
    pieces = [(owner, f"w{k}", signal[k * 1000 : (k + 1) * 1000], 8000)
              for owner, signal in (("bad", bad), ("good", good)) for k in range(4)]
    results = embed.encode_windows(encode, iter(pieces), embed.FailureStreak())
    assert results["bad"].startswith("w0: it contains 1000 NaN or Inf sample(s)")
    assert calls == [3, 1] and len(results["good"]) == 4  # 3000 samples a group; the bad windows never encoded
    for k, vector in enumerate(results["good"]):
        assert rel_err(vector, embed._encode(model, [good[k * 1000 : (k + 1) * 1000]], [8000], None,
                                             torch.float32)[0]) < 1e-6
