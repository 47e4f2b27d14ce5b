"""`python -m echo encode`: files and folders to embeddings, checked against EchoModel.encode per file."""
import contextlib
import os
import socket
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import echo
from echo import cli, host_memory
from echo.data import bundled
from echo.encode_files import read_embeddings
from conftest import random_model, rel_err
from test_cli import interrupt_call

soundfile = pytest.importorskip("soundfile")


@pytest.fixture
def model_path(tmp_path):
    return echo.save(random_model("tiny", depth=2), tmp_path / "model" / "tiny.safetensors")


def write_corpus(folder: Path) -> dict:
    """Good files at several rates, formats and channel counts, plus a corrupt and a too-short one."""
    good = {
        folder / "a.wav": (np.random.uniform(-0.5, 0.5, 4000), 16000),
        folder / "sub" / "b.flac": (np.random.uniform(-0.5, 0.5, (2, 9000)), 44100),  # stereo
        folder / "sub" / "deeper" / "c.ogg": (np.random.uniform(-0.5, 0.5, 3000), 8000),
        folder / "d.WAV": (np.random.uniform(-0.5, 0.5, (3, 2000)), 48000),  # 3 channels, upper-case suffix
    }
    for path, (signal, rate) in good.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), signal.T, rate)
    (folder / "broken.wav").write_bytes(b"RIFF not really a wav file")
    soundfile.write(str(folder / "short.flac"), np.zeros(100), 16000)  # under one 25 ms window
    (folder / "notes.txt").write_text("not audio: not picked up from a folder")
    return good


def reference(model, path):
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return model.encode(torch.from_numpy(np.ascontiguousarray(data.T)), rate)


def run(*argv):
    return cli.main(["encode", *map(str, argv), "--quiet"])


def test_folder_to_npz_matches_the_reference_and_skips_bad_files(tmp_path, model_path, capsys):
    good = write_corpus(tmp_path / "data")
    out = tmp_path / "out" / "emb.npz"
    assert run(tmp_path / "data", "--model", model_path, "--out", out, "--frames", "--batch-files", "3") == 0
    text = capsys.readouterr().out
    assert f"skipped {tmp_path / 'data' / 'broken.wav'}: " in text
    assert f"skipped {tmp_path / 'data' / 'short.flac'}: " in text and "shorter than one 25 ms window" in text
    assert "4 files (0 reused from an earlier run), 2 skipped" in text
    result = read_embeddings(out)
    assert set(result["files"]) == {str(p) for p in good}
    model = echo.load(model_path)
    for path, (signal, rate) in good.items():
        row = result["files"][str(path)]
        utterance, frames = reference(model, path)
        channels = signal.shape[0] if signal.ndim == 2 else 1
        assert row["sample_rate"] == rate and row["channels"] == channels
        assert row["utterance"].shape == (channels * echo.geometry.n_bands(rate) * 192,)
        assert rel_err(row["utterance"], utterance) < 1e-5 and rel_err(row["frames"], frames) < 1e-5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["emb.npz"]


# (suffix, soundfile format, subtype, rate): the containers besides WAV/FLAC/OGG/AIFF that field and monitoring
# recordings come in, each at a rate it takes (Opus: 8-48 kHz; MP3: up to 48 kHz)
MORE_CONTAINERS = [(".mp3", "MP3", "MPEG_LAYER_III", 22050), (".opus", "OGG", "OPUS", 12000),
                   (".rf64", "RF64", "PCM_24", 50000), (".w64", "W64", "FLOAT", 44100), (".caf", "CAF", "PCM_16", 8000)]


def test_mp3_opus_rf64_w64_and_caf_files_are_found_and_encoded_as_decoded(tmp_path, model_path, capsys):
    """A folder of MP3s was told that no audio file was found in it; RF64 and Wave64, the forms of recordings past
    4 GiB, were left out of folders too."""
    if "MP3" not in soundfile.available_formats():
        pytest.skip(f"this libsndfile ({soundfile.__libsndfile_version__}) has no MP3 codec")
    folder = tmp_path / "data"
    folder.mkdir()
    written = []
    for suffix, kind, subtype, rate in MORE_CONTAINERS:
        path = folder / f"clip{suffix.upper() if suffix == '.mp3' else suffix}"  # any case, as the other suffixes
        signal = np.random.uniform(-0.5, 0.5, (rate // 3 + 77, 2 if suffix == ".w64" else 1))
        soundfile.write(str(path), signal, rate, format=kind, subtype=subtype)
        written.append((path, rate, signal.shape[1]))
    out = tmp_path / "emb.npz"
    assert run(folder, "--model", model_path, "--out", out) == 0
    assert f"wrote {out}: 5 files (0 reused from an earlier run), 0 skipped" in capsys.readouterr().out
    files = read_embeddings(out)["files"]
    model = echo.load(model_path)
    for path, rate, channels in written:
        row = files[str(path)]
        assert row["sample_rate"] == rate and row["channels"] == channels
        assert rel_err(row["utterance"], reference(model, path)[0]) < 1e-5


def test_an_mp3_that_this_libsndfile_cannot_decode_is_named_so(tmp_path, model_path, capsys, monkeypatch):
    """A libsndfile before 1.1 (a system's) reads no MP3 and says "Format not recognised", as of a damaged file."""
    soundfile.write(str(tmp_path / "fine.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    (tmp_path / "song.mp3").write_bytes(b"ID3\x03\x00" + bytes(200))  # no frame a decoder would take
    monkeypatch.setattr(soundfile, "available_formats", lambda: {"WAV": "Microsoft WAV"})
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "emb.npz") == 0
    printed = capsys.readouterr().out
    assert (f"skipped {tmp_path / 'song.mp3'}: ValueError: this soundfile's libsndfile "
            f"({soundfile.__libsndfile_version__}) reads no MP3 files: pip install -U soundfile") in printed
    monkeypatch.undo()  # a libsndfile with MP3 says what is wrong with the file
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "emb.npz") == 0
    assert f"skipped {tmp_path / 'song.mp3'}: not a readable audio file" in capsys.readouterr().out


def test_a_multichannel_file_is_read_into_place_at_the_size_of_its_samples(tmp_path, monkeypatch):
    """A multichannel file was read whole, interleaved, then transposed, both held at once: twice its float32 size at
    the peak, the run's peak for a long one (30 minutes of 48 kHz stereo: +1318 MB, now +659 MB). Now read a block
    at a time into place, the same samples."""
    import tracemalloc

    from echo.encode_files import read_file
    from echo.eval import datasets

    monkeypatch.setattr(datasets, "READ_BLOCK", 4096, raising=False)  # blocks, and a last one cut short
    for name, subtype in (("long.flac", "PCM_24"), ("long.wav", "PCM_16"), ("long.ogg", "VORBIS")):
        soundfile.write(str(tmp_path / name), np.random.uniform(-0.5, 0.5, (100_000, 3)), 16000, subtype=subtype)
        tracemalloc.start()
        try:
            signal, rate = read_file(tmp_path / name)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        whole, _ = soundfile.read(str(tmp_path / name), dtype="float32", always_2d=True)
        assert rate == 16000 and signal.dtype == np.float32 and signal.flags.c_contiguous
        assert np.array_equal(signal, whole.T)
        assert peak < 1.2 * signal.nbytes, f"{peak / signal.nbytes:.2f}x the samples"


def test_a_batch_holds_files_up_to_the_sample_limit_with_the_same_embeddings(tmp_path, model_path, capsys,
                                                                             monkeypatch):
    """Batches were counted in files alone: 32 one-hour recordings were decoded at once, tens of GB."""
    import echo.encode_files as command
    from echo.eval import embed

    folder = tmp_path / "data"
    folder.mkdir()
    for name, shape in {"a.wav": (4000,), "b.wav": (3000, 2), "c.wav": (12000,), "d.wav": (2500,),
                        "e.wav": (2500,)}.items():
        soundfile.write(str(folder / name), np.random.uniform(-0.5, 0.5, shape), 16000)
    (folder / "broken.wav").write_bytes(b"RIFF not really a wav file")  # no header: sized 13, as 26 bytes of PCM
    assert run(folder, "--model", model_path, "--out", tmp_path / "whole.npz") == 0
    real, calls = command._encode_batch, []

    def counted(model, loaded, *args):
        calls.append([signal.numel() for signal, _ in loaded])
        return real(model, loaded, *args)

    monkeypatch.setattr(command, "_encode_batch", counted)
    monkeypatch.setattr(embed, "BATCH_SAMPLES", 10000)
    capsys.readouterr()
    assert run(folder, "--model", model_path, "--out", tmp_path / "cut.npz") == 0
    # a, b | broken (unreadable: no call) | c, over the limit, alone, streamed | d, e
    assert calls == [[4000, 6000], [2500, 2500]]
    printed = capsys.readouterr().out
    assert f"skipped {folder / 'broken.wav'}: " in printed and "5 files (0 reused from an earlier run), 1 skipped" \
        in printed
    whole, cut = read_embeddings(tmp_path / "whole.npz")["files"], read_embeddings(tmp_path / "cut.npz")["files"]
    assert set(cut) == set(whole) and len(cut) == 5
    # equal up to the order of float sums, which other passes of the encoder may change
    assert all(rel_err(cut[path]["utterance"], whole[path]["utterance"]) < 1e-6 for path in whole)


@pytest.fixture
def streamed(monkeypatch):
    """Files over 20,000 decoded samples are streamed, in blocks of 3001 samples; yields the paths streamed and each
    block's shape."""
    import echo.encode_files as command
    from echo.eval import embed

    monkeypatch.setattr(embed, "BATCH_SAMPLES", 20000)
    monkeypatch.setattr(command, "STREAM_BLOCK", 3001)
    seen = {"paths": [], "blocks": []}
    real = command._stream_and_encode

    def recorded(model, path, *args):
        seen["paths"].append(path.name)
        return real(model, path, *args)

    def watched(read_blocks):
        def read(path, samples):
            rate, channels, frames, blocks = read_blocks(path, samples)
            return rate, channels, frames, (seen["blocks"].append(b.shape) or b for b in blocks)
        return read

    monkeypatch.setattr(command, "_stream_and_encode", recorded)
    monkeypatch.setattr(command, "audio_blocks", watched(command.audio_blocks))
    monkeypatch.setattr(command, "wav_blocks", watched(command.wav_blocks))
    return seen


def test_a_file_over_a_batchs_samples_is_streamed_in_blocks_with_the_reference_embeddings(tmp_path, model_path,
                                                                                          capsys, streamed):
    """A long recording was decoded whole and encoded in one call: twice its float32 size and more at the peak (30
    minutes of 48 kHz mono: +660 MB), whatever --batch-files. Now decoded a block at a time through StreamEncoders,
    one per channel, with model.encode's embeddings; mono, stereo, a float64 file on a large offset, --frames."""
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(5)
    files = {"mono.wav": (rng.uniform(-0.5, 0.5, 41077), 16000, "PCM_16"),
             "stereo.flac": (rng.uniform(-0.5, 0.5, (12011, 2)), 44100, "PCM_24"),
             "offset.wav": (1e5 + 1e-2 * rng.standard_normal(30011), 8000, "DOUBLE"),  # a pressure in Pa
             "short.wav": (rng.uniform(-0.5, 0.5, 4000), 12000, "FLOAT")}  # a batch of its own kind
    for name, (signal, rate, subtype) in files.items():
        soundfile.write(str(folder / name), signal, rate, subtype=subtype)
    out = tmp_path / "e.npz"
    assert run(folder, "--model", model_path, "--out", out, "--frames") == 0
    assert "4 files (0 reused from an earlier run), 0 skipped" in capsys.readouterr().out
    assert sorted(streamed["paths"]) == ["mono.wav", "offset.wav", "stereo.flac"]
    assert max(rows * frames for rows, frames in streamed["blocks"]) <= 3001 and len(streamed["blocks"]) > 30
    rows = read_embeddings(out)["files"]
    model = echo.load(model_path)
    for name, (signal, rate, subtype) in files.items():
        data, _ = soundfile.read(str(folder / name), dtype="float64" if subtype == "DOUBLE" else "float32",
                                 always_2d=True)
        utterance, frames = model.encode(torch.from_numpy(np.ascontiguousarray(data.T)), rate)
        row = rows[str(folder / name)]
        assert (row["sample_rate"], row["channels"]) == (rate, data.shape[1])
        assert rel_err(row["utterance"], utterance) < 1e-5 and rel_err(row["frames"], frames) < 1e-5, name


def test_a_long_wav_is_streamed_without_soundfile(tmp_path, model_path, streamed, monkeypatch):
    from echo.data.wav import read_wav, write_wav

    signal = np.random.default_rng(6).uniform(-0.5, 0.5, (2, 11003))
    write_wav(tmp_path / "long.wav", signal, 22050)
    monkeypatch.setitem(sys.modules, "soundfile", None)
    assert run(tmp_path / "long.wav", "--model", model_path, "--out", tmp_path / "e.npz") == 0
    assert streamed["paths"] == ["long.wav"] and len(streamed["blocks"]) == 2 * 8  # 1500 frames a block, read twice
    row = read_embeddings(tmp_path / "e.npz")["files"][str(tmp_path / "long.wav")]
    waveform, rate = read_wav(tmp_path / "long.wav")
    assert rel_err(row["utterance"], echo.load(model_path).encode(torch.from_numpy(waveform), rate)[0]) < 1e-5


def test_a_streamed_file_with_bad_samples_or_a_damaged_stream_is_skipped_with_the_reason(tmp_path, model_path, capsys,
                                                                                         streamed):
    rng = np.random.default_rng(7)
    mono, stereo = rng.uniform(-0.5, 0.5, 30000), rng.uniform(-0.5, 0.5, (15000, 2))
    mono[25000] = np.nan
    stereo[9000, 1] = np.inf
    soundfile.write(str(tmp_path / "nan.wav"), mono, 16000, subtype="FLOAT")
    soundfile.write(str(tmp_path / "inf.wav"), stereo, 16000, subtype="FLOAT")
    soundfile.write(str(tmp_path / "whole.flac"), rng.uniform(-0.5, 0.5, 40000), 16000)
    flac = (tmp_path / "whole.flac").read_bytes()
    cut = len(flac) // 2
    (tmp_path / "damaged.flac").write_bytes(flac[:cut] + bytes(range(256)) * 8 + flac[cut + 2048:])
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "e.npz") == 0
    printed = capsys.readouterr().out
    assert (f"skipped {tmp_path / 'nan.wav'}: ValueError: chunk at sample 24008 contains 1 NaN or Inf sample(s), the "
            f"first at index 992") in printed  # 8 blocks of 3001 samples before
    assert (f"skipped {tmp_path / 'inf.wav'}: ValueError: channel 1: chunk at sample 9000 contains 1 NaN or Inf "
            f"sample(s), the first at index 0") in printed  # blocks of 1500 frames
    assert f"skipped {tmp_path / 'damaged.flac'}: " in printed
    assert "1 file (0 reused from an earlier run), 3 skipped" in printed


def test_a_stream_that_cannot_be_made_fails_its_file_and_counts_in_the_streak(tmp_path, model_path, capsys, streamed,
                                                                             monkeypatch):
    """Making a StreamEncoder copies the weights: out of memory there (a full GPU) stopped the run, where the same
    error in a push, or in fast.encode for a batch, fails the file and counts towards the encoder's failure streak."""
    from echo import streaming

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")

    rng = np.random.default_rng(8)
    for name in ("a.flac", "b.flac", "c.flac"):
        soundfile.write(str(tmp_path / name), rng.uniform(-0.5, 0.5, 30000), 16000)
    soundfile.write(str(tmp_path / "d.flac"), rng.uniform(-0.5, 0.5, 4000), 16000)
    monkeypatch.setattr(streaming.StreamEncoder, "__init__", out_of_memory)
    assert run(tmp_path / "a.flac", tmp_path / "b.flac", tmp_path / "d.flac", "--model", model_path, "--out",
               tmp_path / "e.npz") == 0
    printed = capsys.readouterr().out
    assert all(f"skipped {tmp_path / name}: encode failed: CUDA out of memory" in printed
               for name in ("a.flac", "b.flac"))
    assert "1 file (0 reused from an earlier run), 2 skipped" in printed
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "e.npz") == 1  # a, b, c in a row
    assert "the encoder failed on 3 single-signal batches in a row" in capsys.readouterr().err


def test_a_streamed_files_progress_counts_its_samples(tmp_path, model_path, streamed):
    import echo.encode_files as command
    from echo.eval.embed import FailureStreak

    soundfile.write(str(tmp_path / "long.flac"), np.random.uniform(-0.5, 0.5, 25000), 16000)
    calls = []
    options = {"dtype": torch.float32, "max_tokens": None, "progress": lambda done, total: calls.append((done, total))}
    (rate, channels, samples), result = command._stream_and_encode(echo.load(model_path), tmp_path / "long.flac",
                                                                   False, options, FailureStreak())
    assert (rate, channels, samples) == (16000, 1, 25000) and result["utterance"].ndim == 1
    assert calls == [(min(done, 25000), 25000) for done in range(3001, 25000 + 3001, 3001)]


def test_a_streamed_file_is_read_first_for_its_channels_means(tmp_path, model_path, streamed, monkeypatch):
    """With each channel's mean, the streams keep nothing per frame: they kept band 0's bins to redo it with the
    mean at the end, ~1-2 MB a minute of audio. The first reading shows its own progress."""
    import echo.encode_files as command
    from echo import streaming
    from echo.eval.embed import FailureStreak

    means, real_init = [], streaming.StreamEncoder.__init__

    def recorded(self, *args, mean=None, **kwargs):
        means.append(mean)
        real_init(self, *args, mean=mean, **kwargs)

    monkeypatch.setattr(streaming.StreamEncoder, "__init__", recorded)
    signal = np.random.default_rng(10).uniform(-0.5, 0.5, (25000, 2)) + [0.1, -0.2]
    soundfile.write(str(tmp_path / "long.flac"), signal, 16000, subtype="PCM_24")
    reading, encoding = [], []
    options = {"dtype": torch.float32, "max_tokens": None, "progress": lambda done, total: encoding.append(done)}
    (rate, channels, samples), result = command._stream_and_encode(
        echo.load(model_path), tmp_path / "long.flac", False, options, FailureStreak(),
        lambda done, total: reading.append((done, total)))
    decoded, _ = soundfile.read(str(tmp_path / "long.flac"), dtype="float32")
    assert means == pytest.approx(decoded.astype(np.float64).mean(axis=0).tolist(), rel=1e-12, abs=0)
    assert reading == [(min(done, 25000), 25000) for done in range(1500, 25000 + 1500, 1500)]
    assert len(encoding) == len(reading) and len(streamed["blocks"]) == 2 * len(reading)
    model = echo.load(model_path)
    assert rel_err(result["utterance"], model.encode(torch.from_numpy(decoded.T.copy()), 16000)[0]) < 1e-5


@pytest.mark.parametrize("then", [
    (30000, 0.3, "its samples' mean is not its first reading's"),
    (40000, 0.0, "30000 samples a channel, then 40000")])
def test_a_file_that_changes_between_its_two_readings_is_skipped(tmp_path, model_path, capsys, streamed, monkeypatch,
                                                                 then):
    """A recording still being written, or replaced meanwhile: its first reading's means are not those of the
    samples streamed, which would be a silently wrong band 0."""
    import echo.encode_files as command

    path = tmp_path / "growing.wav"
    soundfile.write(str(path), np.random.default_rng(11).uniform(-0.5, 0.5, 30000), 16000, subtype="FLOAT")
    real_totals = command._channel_totals

    def then_changed(blocks, *args):
        result = real_totals(blocks, *args)
        soundfile.write(str(path), np.random.default_rng(12).uniform(-0.5, 0.5, then[0]) + then[1], 16000,
                        subtype="FLOAT")
        return result

    monkeypatch.setattr(command, "_channel_totals", then_changed)
    assert run(path, "--model", model_path, "--out", tmp_path / "e.npz") == 1
    assert f"skipped {path}: the file changed while it was read: {then[2]}" in capsys.readouterr().out


@pytest.mark.parametrize("channels,rate,said", [(1, 16000, "2 channels at 16000 Hz, then 1 at 16000 Hz"),
                                                  (2, 8000, "2 channels at 16000 Hz, then 2 at 8000 Hz")])
def test_a_file_whose_layout_changes_between_its_two_readings_is_skipped_and_the_run_goes_on(
        tmp_path, model_path, capsys, streamed, monkeypatch, channels, rate, said):
    """Streams made for the first reading's channels and rate: a second with fewer channels stopped the run (an
    IndexError's traceback), one at another rate was encoded as if at the first's."""
    import echo.encode_files as command

    path, other = tmp_path / "changing.wav", tmp_path / "other.wav"
    samples = np.random.default_rng(13).uniform(-0.5, 0.5, (30000, 2))
    soundfile.write(str(path), samples, 16000, subtype="FLOAT")
    soundfile.write(str(other), samples[:1000], 16000, subtype="FLOAT")
    real_totals = command._channel_totals

    def then_changed(blocks, *args):
        result = real_totals(blocks, *args)
        soundfile.write(str(path), samples[:, :channels], rate, subtype="FLOAT")  # the same samples
        return result

    monkeypatch.setattr(command, "_channel_totals", then_changed)
    assert run(path, other, "--model", model_path, "--out", tmp_path / "e.npz") == 0
    assert f"skipped {path}: the file changed while it was read: {said}" in capsys.readouterr().out
    assert list(read_embeddings(tmp_path / "e.npz")["files"]) == [str(other)]


def test_a_streamed_float64_file_of_a_small_variation_on_an_offset_is_encoded(tmp_path, model_path, streamed):
    """Its samples less the stream's offset peak at ~4e-5, and the float64 rounding of its mean (~1e-11) was refused
    as a mean that is not the samples': the file was skipped as one that changed while it was read."""
    path = tmp_path / "pressure.wav"
    signal = 1e5 + 0.3 + 1e-5 * np.random.default_rng(13).standard_normal(25000)
    soundfile.write(str(path), signal, 16000, subtype="DOUBLE")
    assert run(path, "--model", model_path, "--out", tmp_path / "e.npz") == 0
    assert streamed["paths"] == ["pressure.wav"]
    row = read_embeddings(tmp_path / "e.npz")["files"][str(path)]
    reference = echo.load(model_path).encode(torch.from_numpy(soundfile.read(str(path))[0]), 16000)[0]
    assert rel_err(row["utterance"], reference) < 1e-5


def test_a_streamed_mono_files_frames_are_kept_as_finished_not_copied(tmp_path, model_path, streamed, monkeypatch):
    """One channel's frames were "joined" by torch.cat, a copy: with --frames, their size again at the run's peak
    (20 minutes of 48 kHz mono, ECHO-tiny: +518 MB over the model, +416 MB now). Several channels are still joined."""
    import echo.encode_files as command
    from echo import streaming
    from echo.eval.embed import FailureStreak

    finished, real_finish = [], streaming.StreamEncoder.finish

    def kept(self):
        finished.append(real_finish(self))
        return finished[-1]

    monkeypatch.setattr(streaming.StreamEncoder, "finish", kept)
    options = {"dtype": torch.float32, "max_tokens": None, "progress": lambda done, total: None}
    rng = np.random.default_rng(9)
    for channels in (1, 2):
        soundfile.write(str(tmp_path / f"{channels}.flac"), rng.uniform(-0.5, 0.5, (25000, channels)), 16000)
        finished.clear()
        _, result = command._stream_and_encode(echo.load(model_path), tmp_path / f"{channels}.flac", True, options,
                                               FailureStreak())
        assert np.array_equal(result["frames"], torch.cat([rows for _, rows in finished], dim=1).numpy())
        assert np.shares_memory(result["frames"], finished[0][1].numpy()) == (channels == 1)


def interrupt_at_batch(monkeypatch, number=2):
    """The command's batch `number` raises KeyboardInterrupt, as Ctrl-C there would; returns the real encoder."""
    import echo.encode_files as command

    return interrupt_call(monkeypatch, command, "_encode_batch", number)


def test_the_bar_shows_the_passes_of_a_long_batch(tmp_path, model_path, capsys):
    """The bar counts files: over one long recording it sat at 0 for minutes, with no sign of life."""
    soundfile.write(str(tmp_path / "long.wav"), np.random.uniform(-0.5, 0.5, 16000 * 25), 16000)
    assert cli.main(["encode", str(tmp_path / "long.wav"), "--model", str(model_path), "--out",
                     str(tmp_path / "e.npz"), "--max-tokens", "300"]) == 0
    bar = capsys.readouterr().err
    assert "0/1 [" in bar and "batch 50%" in bar and "batch 100%" in bar


def test_rerun_and_interrupted_run_resume(tmp_path, model_path, capsys, monkeypatch):
    good = write_corpus(tmp_path / "data")
    out = tmp_path / "emb.npz"
    assert run(tmp_path / "data", "--model", model_path, "--out", out) == 0
    first = read_embeddings(out)
    soundfile.write(str(tmp_path / "data" / "new.wav"), np.random.uniform(-0.5, 0.5, 5000), 22050)
    capsys.readouterr()
    assert run(tmp_path / "data", "--model", model_path, "--out", out) == 0
    printed = capsys.readouterr().out
    # said before the bar, where a resumed run's bar counted the rest alone: "0/1"
    assert printed.startswith(f"encoded already: 4 files ({out} or {out}.parts); 3 to encode")  # 2 unreadable
    assert "5 files (4 reused from an earlier run)" in printed
    assert run(tmp_path / "data", "--model", model_path, "--out", out) == 0
    assert capsys.readouterr().out.startswith(f"encoded already: 5 files ({out} or {out}.parts); 2 to encode")
    second = read_embeddings(out)
    for path in good:
        assert np.array_equal(second["files"][str(path)]["utterance"], first["files"][str(path)]["utterance"])

    # an interrupted run keeps its finished batches; the next run encodes only the rest
    import echo.encode_files as command

    out2 = tmp_path / "emb2.npz"
    real = interrupt_at_batch(monkeypatch)
    capsys.readouterr()
    assert run(tmp_path / "data", "--model", model_path, "--out", out2, "--batch-files", "2") == 130
    assert "the same command resumes" in capsys.readouterr().err
    assert not out2.exists() and any((tmp_path / "emb2.npz.parts").rglob("*.safetensors"))
    monkeypatch.setattr(command, "_encode_batch", real)
    capsys.readouterr()
    assert run(tmp_path / "data", "--model", model_path, "--out", out2, "--batch-files", "2") == 0
    # the finished first batch held a.wav and broken.wav (sorted), so one embedding was kept
    assert "5 files (1 reused from an earlier run)" in capsys.readouterr().out


@pytest.mark.parametrize("batch, message", [
    (1, "no batch was finished, so nothing was kept; the same command starts again"),
    (3, "2 files encoded, kept in {parts}; the same command resumes with the 1 left")])
def test_an_interrupted_run_says_once_what_it_kept_and_how_to_resume(tmp_path, model_path, capsys, monkeypatch,
                                                                      batch, message):
    """The command's own "interrupted: ... kept" line was followed by the command line's bare "interrupted"."""
    for name in ("a.wav", "b.wav", "c.wav"):
        soundfile.write(str(tmp_path / name), np.random.uniform(-0.5, 0.5, 4000), 16000)
    interrupt_at_batch(monkeypatch, batch)
    out = tmp_path / "e.npz"
    assert run(tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "c.wav", "--model", model_path, "--out", out,
               "--batch-files", "1") == 130
    parts = tmp_path / "e.npz.parts"
    assert capsys.readouterr().err == f"interrupted: {message.format(parts=parts)}\n"


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_a_rerun_with_every_file_encoded_already_leaves_the_output_as_it_was(tmp_path, model_path, capsys, suffix):
    """A re-run over a finished output wrote it again, the same, however large: now it is left alone, and said so.
    One that would write other rows (a file less, frames left out) still writes it."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    files = [tmp_path / name for name in ("a.wav", "b.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / f"e{suffix}"
    assert run(*files, "--model", model_path, "--out", out, "--frames") == 0
    before = out.stat()
    capsys.readouterr()
    assert run(*files, "--model", model_path, "--out", out, "--frames") == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"encoded already: 2 files ({out} or {out}.parts); nothing to encode\n")
    assert f"left {out} as it was: every file of this run (2 files) was encoded already, 0 skipped" in printed
    assert (out.stat().st_ino, out.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not (tmp_path / f"e{suffix}.parts").exists()

    assert run(*files, "--model", model_path, "--out", out) == 0  # without frames: rewritten without them
    assert f"wrote {out}: 2 files (2 reused" in capsys.readouterr().out
    assert all("frames" not in row for row in read_embeddings(out)["files"].values())
    assert run(files[0], "--model", model_path, "--out", out) == 0  # b.wav left out
    assert f"wrote {out}: 1 file (1 reused" in capsys.readouterr().out
    assert list(read_embeddings(out)["files"]) == [str(files[0])]


def test_an_interrupted_output_write_says_that_nothing_is_lost_and_the_rerun_encodes_nothing(tmp_path, model_path,
                                                                                            capsys, monkeypatch):
    """Ctrl-C while the output was written (seconds to minutes for one with frames) printed a bare "interrupted",
    as if the encoding were lost."""
    import echo.encode_files as command

    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    real = interrupt_call(monkeypatch, command, "_write_table", 1)
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", out) == 130
    assert capsys.readouterr().err == (f"interrupted: {out} was left as it was; the same command writes it without "
                                       f"encoding any file again\n")
    assert not out.exists()
    monkeypatch.setattr(command, "_write_table", real)
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", out) == 0
    assert "1 file (1 reused from an earlier run)" in capsys.readouterr().out


def test_a_rerun_in_another_dtype_encodes_again(tmp_path, model_path, capsys):
    """bf16 embeddings differ from float32 ones by ~5e-3: a float32 run must not take them from a bf16 run's
    output or shards, and the other way round."""
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 6000), 16000)
    out = tmp_path / "emb.npz"
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", out, "--dtype", "bfloat16") == 0
    capsys.readouterr()
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", out) == 0
    assert "1 file (0 reused from an earlier run)" in capsys.readouterr().out
    ref = reference(echo.load(model_path), tmp_path / "a.wav")[0]
    assert rel_err(torch.from_numpy(read_embeddings(out)["files"][str(tmp_path / "a.wav")]["utterance"]), ref) < 1e-5


def test_an_output_that_a_rerun_leaves_files_of_or_another_models_embeddings_out_of_says_so(tmp_path, model_path,
                                                                                            capsys):
    """A run over another folder, or in another dtype, into an existing --out replaced what it held without a word:
    a user gathering folders into one output a run at a time lost the earlier runs' embeddings unsaid."""
    files = [tmp_path / name for name in ("a.wav", "b.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    assert run(files[0], "--model", model_path, "--out", out) == 0
    capsys.readouterr()
    assert run(files[1], "--model", model_path, "--out", out) == 0
    said = capsys.readouterr().out
    assert f"note: {out} holds 1 file this run was not given (e.g. {files[0]})" in said
    assert "give their paths too" in said
    assert run(*files, "--model", model_path, "--out", out) == 0  # both given: nothing left out, nothing said
    assert "note:" not in capsys.readouterr().out
    assert run(*files, "--model", model_path, "--out", out, "--dtype", "bfloat16") == 0
    said = f"note: {out} holds 2 files encoded by another model or dtype, or with other windows ("
    assert said in capsys.readouterr().out


def test_a_finished_run_keeps_the_saved_batches_of_an_interrupted_run_in_another_dtype(tmp_path, model_path,
                                                                                       capsys, monkeypatch):
    """A completed run deleted all of OUT.parts/, so the finished batches of an interrupted bf16 run to the same
    OUT were lost to a float32 run in between, and the bf16 run started over."""
    import echo.encode_files as command

    for name in ("a.wav", "b.wav"):
        soundfile.write(str(tmp_path / name), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    bf16 = (tmp_path / "a.wav", tmp_path / "b.wav", "--model", model_path, "--out", out, "--batch-files", "1",
            "--dtype", "bfloat16")
    real = interrupt_at_batch(monkeypatch)
    assert run(*bf16) == 130  # a.wav's batch was saved, b.wav's was not
    monkeypatch.setattr(command, "_encode_batch", real)
    assert run(tmp_path / "a.wav", tmp_path / "b.wav", "--model", model_path, "--out", out) == 0
    assert "kept" in capsys.readouterr().out
    assert run(*bf16) == 0
    assert "2 files (1 reused from an earlier run)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "b.wav", "e.npz", "model"]


def test_the_frames_of_an_interrupted_frames_run_outlive_a_run_without_them(tmp_path, model_path, capsys,
                                                                            monkeypatch):
    """A run without --frames deleted every shard of its model once its output was written, the frames of an
    interrupted --frames run to the same OUT with them: the next --frames run encoded those files again."""
    import echo.encode_files as command

    files = [tmp_path / name for name in ("a.wav", "b.wav", "c.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    options = ("--model", model_path, "--out", out, "--batch-files", "1")
    real = interrupt_at_batch(monkeypatch)
    assert run(*files, *options, "--frames") == 130  # a.wav's batch was saved, with its frames
    monkeypatch.setattr(command, "_encode_batch", real)
    assert run(*files, *options) == 0
    assert f"kept {tmp_path / 'e.npz.parts'}: " in capsys.readouterr().out
    assert run(*files, *options, "--frames") == 0
    assert "3 files (1 reused from an earlier run)" in capsys.readouterr().out
    row = read_embeddings(out)["files"][str(files[0])]
    utterance, frames = reference(echo.load(model_path), files[0])
    assert rel_err(row["utterance"], utterance) < 1e-5 and rel_err(row["frames"], frames) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "b.wav", "c.wav", "e.npz", "model"]


def test_an_interrupted_run_over_other_files_keeps_its_work_through_a_finished_run_to_the_same_out(
        tmp_path, model_path, capsys, monkeypatch):
    """A finished run deleted every shard of its model once its output was written, those of an interrupted run
    over other files to the same OUT too: that run's command encoded them again."""
    import echo.encode_files as command

    files = [tmp_path / name for name in ("a.wav", "b.wav", "c.wav", "d.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    options = ("--model", model_path, "--out", out, "--batch-files", "1")
    real = interrupt_at_batch(monkeypatch, 3)
    assert run(*files[:3], *options) == 130  # a.wav and b.wav saved
    monkeypatch.setattr(command, "_encode_batch", real)
    assert run(files[1], files[3], *options) == 0  # b.wav reused, d.wav encoded
    assert "2 files (1 reused from an earlier run)" in capsys.readouterr().out
    assert run(*files[:3], *options) == 0
    assert "3 files (2 reused from an earlier run)" in capsys.readouterr().out
    assert not (tmp_path / "e.npz.parts").exists()  # all of it written, all of it removed


def test_a_rerun_over_other_files_lets_go_of_the_earlier_outputs_rows_it_does_not_write(tmp_path, model_path,
                                                                                        monkeypatch):
    """A rerun read the earlier output and held all of it to its end, the rows of files it does not write too: an
    output of another folder's frames (0.7 MB a 10 s clip at 16 kHz, ECHO-small) stayed in memory the whole run."""
    import echo.encode_files as command

    files = [tmp_path / name for name in ("a.wav", "b.wav", "c.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    assert run(*files[:2], "--model", model_path, "--out", out, "--frames") == 0
    read, encode, dropped, held = command.read_embeddings, command._encode_batch, [], []

    def recorded(path):
        earlier = read(path)
        dropped.extend(weakref.ref(earlier["files"][str(files[0])][name]) for name in ("utterance", "frames"))
        return earlier

    def encoded(*args):
        held.append(sum(ref() is not None for ref in dropped))
        return encode(*args)

    monkeypatch.setattr(command, "read_embeddings", recorded)
    monkeypatch.setattr(command, "_encode_batch", encoded)
    assert run(*files[1:], "--model", model_path, "--out", out, "--frames") == 0  # b.wav reused, c.wav encoded
    assert len(dropped) == 2 and held == [0]
    assert set(read_embeddings(out)["files"]) == {str(path) for path in files[1:]}


def test_a_file_changed_since_an_interrupted_run_is_encoded_again_and_its_old_batch_dropped(tmp_path, model_path,
                                                                                          capsys, monkeypatch):
    """A file rewritten after an interrupted run saved it (same path, size and times, new samples) was encoded
    anew, but the shard of its old samples was kept for good, called "the saved batches of an interrupted run ...
    that run's command resumes from them" at every run's end, though no run could ever use it."""
    import echo.encode_files as command

    files = [tmp_path / name for name in ("a.wav", "b.wav", "c.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    options = (*files, "--model", model_path, "--out", tmp_path / "e.npz", "--batch-files", "1")
    real = interrupt_at_batch(monkeypatch)
    assert run(*options) == 130  # a.wav's batch was saved
    monkeypatch.setattr(command, "_encode_batch", real)
    times = os.stat(files[0])
    soundfile.write(str(files[0]), np.random.uniform(-0.5, 0.5, 4000), 16000)
    os.utime(files[0], ns=(times.st_atime_ns, times.st_mtime_ns))
    capsys.readouterr()
    assert run(*options) == 0
    printed = capsys.readouterr().out
    assert "3 files (0 reused from an earlier run)" in printed and "kept" not in printed
    row = read_embeddings(tmp_path / "e.npz")["files"][str(files[0])]
    assert rel_err(row["utterance"], reference(echo.load(model_path), files[0])[0]) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "b.wav", "c.wav", "e.npz", "model"]


def test_the_saved_batches_of_files_gone_since_an_interrupted_run_are_said_to_be_of_no_use_till_they_return(
        tmp_path, model_path, capsys, monkeypatch):
    """A file renamed or deleted after an interrupted run saved it left its shard for good, called at every run's
    end "the saved batches of an interrupted run ... that run's command resumes from them", which no run could."""
    import echo.encode_files as command

    folder, parts = tmp_path / "data", tmp_path / "e.npz.parts"
    folder.mkdir()
    for name in ("a.wav", "b.wav", "c.wav"):
        soundfile.write(str(folder / name), np.random.uniform(-0.5, 0.5, 4000), 16000)
    options = (folder, "--model", model_path, "--out", tmp_path / "e.npz", "--batch-files", "1")
    real = interrupt_at_batch(monkeypatch)
    assert run(*options) == 130  # a.wav's batch was saved
    monkeypatch.setattr(command, "_encode_batch", real)
    (folder / "a.wav").rename(folder / "z.wav")
    capsys.readouterr()
    assert run(*options) == 0
    printed = capsys.readouterr().out
    assert "3 files (0 reused from an earlier run)" in printed and "resumes" not in printed
    assert f"kept {parts}: the saved batches of an interrupted run whose files are gone (moved, renamed or deleted " \
           f"since); no run can use them unless those files come back, so it may be deleted" in printed
    (folder / "z.wav").rename(folder / "a.wav")  # back where it was encoded: its saved batch serves again
    assert run(*options) == 0
    printed = capsys.readouterr().out
    assert "3 files (3 reused from an earlier run)" in printed and "kept" not in printed and not parts.exists()


def test_a_batch_saved_before_a_ctrl_c_in_its_folders_flush_is_counted_as_kept(tmp_path, model_path, capsys,
                                                                             monkeypatch):
    """Ctrl-C after a shard was renamed into place, while its folder was flushed, said "nothing was kept", though
    the batch was on disk and the rerun reused it."""
    from echo import atomic

    files = [tmp_path / name for name in ("a.wav", "b.wav", "c.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    real = atomic._flush

    def interrupted_at_a_folder(path, *mode):
        if Path(path).is_dir():
            raise KeyboardInterrupt
        return real(path, *mode)

    monkeypatch.setattr(atomic, "_flush", interrupted_at_a_folder)
    options = (*files, "--model", model_path, "--out", tmp_path / "e.npz", "--batch-files", "1")
    assert run(*options) == 130
    assert capsys.readouterr().err == (f"interrupted: 1 file encoded, kept in {tmp_path / 'e.npz.parts'}; the "
                                       f"same command resumes with the 2 left\n")
    monkeypatch.setattr(atomic, "_flush", real)
    assert run(*options) == 0
    assert "3 files (1 reused from an earlier run)" in capsys.readouterr().out


@pytest.mark.parametrize("error, status, said", [
    (MemoryError(), 1, "\nMemoryError\n"),  # a traceback: no one foresaw it
    (ValueError("a.flac needs the package 'soundfile'"), 2, "error: a.flac needs the package 'soundfile'\n")])
def test_an_error_that_stops_a_run_is_followed_by_what_was_kept_and_how_to_resume(tmp_path, model_path, capsys,
                                                                                  monkeypatch, error, status, said):
    """A run that died of an error other than Ctrl-C (MemoryError, a RuntimeError out of torch, a package missing
    for a later batch's files) said nothing of the batches it had saved, nor that the same command resumes."""
    import echo.encode_files as command

    files = [tmp_path / name for name in ("a.wav", "b.wav", "c.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    real, calls = command._encode_batch, []

    def fails_at_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args)

    monkeypatch.setattr(command, "_encode_batch", fails_at_the_second)
    assert run(*files, "--model", model_path, "--out", tmp_path / "e.npz", "--batch-files", "1") == status
    printed = capsys.readouterr().err
    assert said in printed and printed.endswith(
        f"{said}1 file encoded, kept in {tmp_path / 'e.npz.parts'}; the same command resumes with the 2 left\n")


@pytest.mark.parametrize("batch_files, said, kept, calls", [
    (2, "the encoder failed on a batch of 2 signals and on each of them alone, with the same error", 2,
     4),  # the first batch; the second, then each of its files
    (1, "the encoder failed on 3 single-signal batches in a row with the same error", 1,
     4),  # the first file, then three failing once each
])
def test_a_device_failing_on_every_file_stops_the_run_and_keeps_its_work(tmp_path, model_path, capsys, monkeypatch,
                                                                         batch_files, said, kept, calls):
    """A GPU in a sticky error state ("CUDA error: ..." at every call) had every file after it retried alone and
    skipped: the run ended with status 0 and an output missing them all; with --batch-files 1 no batch of several
    could fail alike, and every file was tried twice and skipped."""
    import echo.encode_files as command

    files = [tmp_path / f"{name}.wav" for name in "abcde"[: 4 + (batch_files == 1)]]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    real, made = command._encode, []

    def broken_after_the_first_batch(*args, **kwargs):
        made.append(1)
        if len(made) > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args, **kwargs)

    monkeypatch.setattr(command, "_encode", broken_after_the_first_batch)
    out = tmp_path / "e.npz"
    options = (*files, "--model", model_path, "--out", out, "--batch-files", str(batch_files))
    assert run(*options) == 1
    assert capsys.readouterr().err == (
        f"error: {said}, so the device or the model fails, not the signals: RuntimeError: CUDA error: an illegal "
        f"memory access was encountered\n{kept} file{'s' * (kept > 1)} encoded, kept in {tmp_path / 'e.npz.parts'}; "
        f"the same command resumes with the {len(files) - kept} left\n")
    assert len(made) == calls and not out.exists()
    monkeypatch.setattr(command, "_encode", real)
    assert run(*options) == 0
    assert f"{len(files)} files ({kept} reused from an earlier run), 0 skipped" in capsys.readouterr().out


def test_unreadable_files_between_a_failing_devices_one_file_batches_do_not_let_the_run_go_on(tmp_path, model_path,
                                                                                              capsys, monkeypatch):
    """A batch of unreadable files called the encoder with no signal, which returned nothing and so ended the streak
    of failures: a device failing on every file, among unreadable ones, had the run go on skipping them all."""
    import echo.encode_files as command

    files = []
    for number in range(4):  # unreadable, readable, unreadable, ...
        (tmp_path / f"{number}-broken.wav").write_bytes(b"RIFF not really a wav file")
        soundfile.write(str(tmp_path / f"{number}-good.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
        files += [tmp_path / f"{number}-broken.wav", tmp_path / f"{number}-good.wav"]
    tried = []

    def broken(model, signals, rates, **kwargs):
        if not signals:  # nothing to compute, nothing that fails: fast.encode's answer to no signal
            return []
        tried.append(signals)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(command, "_encode", broken)
    assert run(*files, "--model", model_path, "--out", tmp_path / "e.npz", "--batch-files", "1") == 1
    assert "error: the encoder failed on 3 single-signal batches in a row" in capsys.readouterr().err
    assert len(tried) == 3 and not (tmp_path / "e.npz").exists()


def test_a_file_the_encoder_fails_on_among_good_ones_is_only_skipped(tmp_path, model_path, capsys, monkeypatch):
    import echo.encode_files as command

    files = [tmp_path / f"{name}.wav" for name in "abcd"]
    for path in files:  # c.wav, longer, is the one the encoder fails on
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 6000 if path.stem == "c" else 4000), 16000)
    real = command._encode

    def failing_on_c(model, signals, rates, **kwargs):
        if signals[0].shape[-1] == 6000:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(model, signals, rates, **kwargs)

    monkeypatch.setattr(command, "_encode", failing_on_c)
    out = tmp_path / "e.npz"
    assert run(*files, "--model", model_path, "--out", out, "--batch-files", "1") == 0
    printed = capsys.readouterr().out
    assert f"skipped {files[2]}: encode failed: CUDA error: an illegal memory access was encountered" in printed
    assert "wrote" in printed and "3 files (0 reused from an earlier run), 1 skipped" in printed
    assert sorted(read_embeddings(out)["files"]) == sorted(str(path) for path in files if path.stem != "c")


def test_an_interrupted_frames_run_does_not_count_utterances_saved_without_frames_as_kept(tmp_path, model_path,
                                                                                         capsys, monkeypatch):
    """An earlier run's shard of a.wav's utterance alone was counted as this --frames run's kept work: "1 files
    encoded are kept", when none was."""
    import echo.encode_files as command

    files = [tmp_path / name for name in ("a.wav", "b.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    options = ("--model", model_path, "--out", tmp_path / "e.npz", "--batch-files", "1")
    real = interrupt_at_batch(monkeypatch)
    assert run(*files, *options) == 130  # a.wav's utterance was saved
    monkeypatch.setattr(command, "_encode_batch", real)
    interrupt_at_batch(monkeypatch, 1)
    capsys.readouterr()
    assert run(*files, *options, "--frames") == 130
    assert capsys.readouterr().err == "interrupted: no batch was finished, so nothing was kept; the same command " \
                                      "starts again\n"


def test_an_embedding_that_overflows_is_a_failure_of_its_file_never_written_or_kept(tmp_path, capsys):
    """float16 products overflow (beyond 65504) on a model whose float32 products do not: every embedding held
    NaN, and was written as a success, and reused by every rerun. (The last MLP is scaled, whose output the final
    norm brings back: scaled patch projections made the float32 encode itself ill-conditioned, 2.5e-5 off.)"""
    model = random_model("tiny", depth=2)
    with torch.no_grad():
        model.encoder.layers[-1].linear2.weight.mul_(1e6)
    model_path = echo.save(model, tmp_path / "model" / "hot.safetensors")
    files = [tmp_path / "a.wav", tmp_path / "b.wav"]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    for _ in range(2):  # nothing kept from the first run to serve the second
        assert run(*files, "--model", model_path, "--out", out, "--dtype", "float16") == 1
        printed = capsys.readouterr()
        for path in files:
            assert f"skipped {path}: encode failed: the embedding holds NaN or infinite values" in printed.out
        # the run's failure on stderr, as every other error: a log of stdout alone read as a quiet success
        assert f"error: no file could be encoded (2 skipped); {out} was not written" in printed.err
        assert not out.exists()
    assert run(*files, "--model", model_path, "--out", out) == 0  # float32 holds them
    for path in files:
        utterance = read_embeddings(out)["files"][str(path)]["utterance"]
        assert rel_err(utterance, reference(model, path)[0]) < 1e-5


def test_a_file_name_that_is_not_utf8_is_reported_and_skipped(tmp_path, model_path, capsys):
    if sys.platform != "linux":
        pytest.skip("needs a file system that takes any bytes in names")
    folder = tmp_path / "data"
    folder.mkdir()
    soundfile.write(str(folder / "good.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    soundfile.write(str(folder / "bad.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    os.rename(os.fsencode(folder / "bad.wav"), os.fsencode(folder) + b"/bad\xff.wav")
    out = tmp_path / "emb.npz"
    assert run(folder, "--model", model_path, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "bad\\xff.wav" in printed and "not valid UTF-8" in printed and "1 skipped" in printed
    assert list(read_embeddings(out)["files"]) == [str(folder / "good.wav")]


def test_a_utf8_name_is_encoded_and_written_as_itself_under_an_ascii_locale(tmp_path, model_path, capsys):
    """Under LC_ALL=C without UTF-8 mode Python holds a name's non-ASCII bytes as surrogate escapes: a file named
    in UTF-8 was skipped as "not valid UTF-8". Its name is written as the UTF-8 text any other locale reads."""
    if sys.platform != "linux":
        pytest.skip("needs a locale whose file system encoding is ASCII")
    folder = tmp_path / "dü"
    folder.mkdir()
    files = [folder / "ä.wav", folder / "plain.wav"]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    ascii_locale = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    encoded = subprocess.run([sys.executable, "-m", "echo", "encode", folder, "--model", model_path, "--out", out,
                              "--quiet"], capture_output=True, cwd=Path(__file__).resolve().parents[1],
                             env=ascii_locale)
    assert encoded.returncode == 0 and b"2 files (0 reused" in encoded.stdout, encoded.stdout + encoded.stderr
    assert set(read_embeddings(out)["files"]) == {str(path) for path in files}
    assert run(folder, "--model", model_path, "--out", out) == 0  # here, in a UTF-8 locale: the same files
    assert "every file of this run (2 files) was encoded already" in capsys.readouterr().out


def test_parquet_rows_match_npz(tmp_path, model_path):
    """read_embeddings gave a parquet row two fields more than an npz one ("path" and "model")."""
    pytest.importorskip("pyarrow")
    write_corpus(tmp_path / "data")
    for name in ("e.npz", "e.parquet"):
        assert run(tmp_path / "data", "--model", model_path, "--out", tmp_path / name, "--frames") == 0
    npz, parquet = read_embeddings(tmp_path / "e.npz"), read_embeddings(tmp_path / "e.parquet")
    assert parquet["model"] == npz["model"] and set(parquet["files"]) == set(npz["files"])
    for path, row in npz["files"].items():
        assert parquet["files"][path].keys() == row.keys()
        assert all(parquet["files"][path][name] == row[name] for name in ("key", "sample_rate", "channels"))
        assert np.array_equal(parquet["files"][path]["utterance"], row["utterance"])
        assert np.array_equal(parquet["files"][path]["frames"], row["frames"])
    schema = pytest.importorskip("pyarrow.parquet").read_schema(str(tmp_path / "e.parquet"))
    assert str(schema.field("utterance").type) == "list<element: float>"  # float32, as computed


@pytest.mark.parametrize("edit", ["float64", "2-D", "frames of another width"])
def test_embeddings_edited_in_an_output_are_not_reused_by_a_rerun(tmp_path, model_path, capsys, edit):
    """An output whose arrays were changed by hand (cast, reshaped) kept its model and keys, and a re-run reused the
    arrays as they were, into its own output: they are refused, and the files encoded again."""
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", out, "--frames") == 0
    with np.load(out) as data:
        arrays = {name: data[name] for name in data.files}
    utterance, frames = arrays["utterance/0"], arrays["frames/0"]
    arrays.update({"float64": {"utterance/0": utterance.astype(np.float64)},
                   "2-D": {"utterance/0": utterance.reshape(2, -1)},
                   "frames of another width": {"frames/0": frames[:, 1:]}}[edit])
    np.savez(out, **arrays)
    with pytest.raises(ValueError, match=f"^{out} is not an output of echo encode: {tmp_path / 'a.wav'} has "):
        read_embeddings(out)
    capsys.readouterr()
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", out, "--frames") == 0
    assert f"note: the existing {out} is not readable" in capsys.readouterr().out
    row = read_embeddings(out)["files"][str(tmp_path / "a.wav")]
    assert row["utterance"].shape == utterance.shape and row["frames"].shape == frames.shape
    assert rel_err(row["utterance"], utterance) < 1e-5 and rel_err(row["frames"], frames) < 1e-5


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_the_output_names_the_model_given_and_an_older_output_without_it_still_resumes(tmp_path, model_path, capsys,
                                                                                      monkeypatch, suffix):
    """The output held the model's hash only: read later, it could not say which model made it. A path is recorded
    absolute (it is read from other folders), a name as given."""
    from echo.encode_files import _model_name

    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / f"e{suffix}"
    monkeypatch.chdir(model_path.parent)
    assert run(tmp_path / "a.wav", "--model", model_path.name, "--out", out) == 0
    assert read_embeddings(out)["model_name"] == str(model_path)
    assert _model_name("default") == "default"

    if suffix == ".npz":  # an output of the echo before it: no model_name
        with np.load(out) as data:
            older = {name: data[name] for name in data.files if name != "model_name"}
        with open(out, "wb") as handle:
            np.savez(handle, **older)
    else:
        parquet = pytest.importorskip("pyarrow.parquet")
        table = parquet.read_table(str(out))
        parquet.write_table(table.select([name for name in table.column_names if name != "model_name"]), str(out))
    assert read_embeddings(out)["model_name"] == ""
    capsys.readouterr()
    assert run(tmp_path / "a.wav", "--model", model_path.name, "--out", out) == 0
    assert "1 file (1 reused from an earlier run)" in capsys.readouterr().out
    assert read_embeddings(out)["model_name"] == str(model_path)


def test_reading_an_npz_output_reads_each_column_once(tmp_path, model_path, monkeypatch):
    """read_embeddings read an npz's keys, sample_rates and channels arrays out of the archive again for every row,
    so reading n files back (and every re-run's start) took time quadratic in n: 16,000 files 43 s, now 6.6 s."""
    write_corpus(tmp_path / "data")
    assert run(tmp_path / "data", "--model", model_path, "--out", tmp_path / "e.npz", "--frames") == 0
    getitem, reads = np.lib.npyio.NpzFile.__getitem__, []

    def counted(self, key):
        reads.append(key)
        return getitem(self, key)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", counted)
    files = read_embeddings(tmp_path / "e.npz")["files"]
    assert len(files) == 4 and all(row["frames"].ndim == 2 for row in files.values())
    columns = ["paths", "keys", "sample_rates", "channels", "model", "model_name"]
    assert {name: reads.count(name) for name in columns} == dict.fromkeys(columns, 1)
    assert sorted(reads) == sorted(columns
                                   + [f"{kind}/{i}" for kind in ("utterance", "frames") for i in range(4)])


def test_a_parquet_output_is_read_back_a_few_rows_at_a_time(tmp_path, model_path, monkeypatch):
    """read_embeddings read a parquet output whole: Arrow took 3.6x the table to decode it (a re-run's start over
    3000 clips with frames: +1.6 GB at the peak for 292 MB of embeddings, now +0.38 GB). Now a few rows at a time
    through a small buffer (both made small here), the same rows."""
    import echo.encode_files as command

    pyarrow = pytest.importorskip("pyarrow")
    pytest.importorskip("pyarrow.parquet")
    (tmp_path / "data").mkdir()
    for i in range(16):  # 10 s at 48 kHz: 63 x 19 x 192 frame values each, 0.9 MB
        soundfile.write(str(tmp_path / "data" / f"{i:02d}.wav"), np.random.uniform(-0.5, 0.5, 480000), 48000)
    for name in ("e.npz", "e.parquet"):
        assert run(tmp_path / "data", "--model", model_path, "--out", tmp_path / name, "--frames") == 0
    table_size = pyarrow.parquet.read_table(str(tmp_path / "e.parquet")).nbytes
    monkeypatch.setattr(command, "PARQUET_READ_ROWS", 2, raising=False)
    monkeypatch.setattr(command, "PARQUET_READ_BUFFER", 1 << 16, raising=False)
    default, watched = pyarrow.default_memory_pool(), pyarrow.proxy_memory_pool(pyarrow.default_memory_pool())
    pyarrow.set_memory_pool(watched)
    try:
        parquet = read_embeddings(tmp_path / "e.parquet")
    finally:
        pyarrow.set_memory_pool(default)
    assert watched.max_memory() < table_size, f"{watched.max_memory() / table_size:.2f}x the table"  # was 2.5x
    npz = read_embeddings(tmp_path / "e.npz")
    assert parquet["model"] == npz["model"] and list(parquet["files"]) == list(npz["files"]) and len(npz["files"]) == 16
    for path, row in npz["files"].items():
        assert all(parquet["files"][path][name] == row[name] for name in ("key", "sample_rate", "channels"))
        assert all(np.array_equal(parquet["files"][path][name], row[name]) for name in ("utterance", "frames"))


def test_a_parquet_output_is_written_a_row_group_at_a_time(tmp_path, model_path, monkeypatch):
    """A parquet output was written as one table: the joined values and Arrow's encoding of every row held
    together, ~4x the frames at the peak. Now a row group of about PARQUET_ROW_GROUP_BYTES at a time (made small
    here), names alone dictionary-encoded: Arrow holds a fraction of the output, and the rows read back are the npz
    output's, in order."""
    import echo.encode_files as command

    pyarrow = pytest.importorskip("pyarrow")
    pytest.importorskip("pyarrow.parquet")
    (tmp_path / "data").mkdir()
    for i in range(12):  # 10 s at 48 kHz: 63 x 19 x 192 frame values each, 0.9 MB
        soundfile.write(str(tmp_path / "data" / f"{i:02d}.wav"), np.random.uniform(-0.5, 0.5, 480000), 48000)
    assert run(tmp_path / "data", "--model", model_path, "--out", tmp_path / "e.npz", "--frames") == 0
    npz = read_embeddings(tmp_path / "e.npz")
    row_bytes = [row["utterance"].nbytes + row["frames"].nbytes for row in npz["files"].values()]
    monkeypatch.setattr(command, "PARQUET_ROW_GROUP_BYTES", 2 * max(row_bytes) + 1)  # 3 rows a group
    default, watched = pyarrow.default_memory_pool(), pyarrow.proxy_memory_pool(pyarrow.default_memory_pool())
    pyarrow.set_memory_pool(watched)
    try:
        assert run(tmp_path / "data", "--model", model_path, "--out", tmp_path / "e.parquet", "--frames") == 0
    finally:
        pyarrow.set_memory_pool(default)
    metadata = pyarrow.parquet.ParquetFile(str(tmp_path / "e.parquet")).metadata
    assert [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)] == [3, 3, 3, 3]
    for i in range(metadata.num_columns):  # embeddings never repeat: no dictionary tried (it cost time and bytes)
        column = metadata.row_group(0).column(i)
        assert column.has_dictionary_page == (column.path_in_schema not in ("utterance.list.element",
                                                                            "frames.list.element.list.element"))
    assert watched.max_memory() < sum(row_bytes) / 2, f"{watched.max_memory() / sum(row_bytes):.2f}x the output"
    parquet = read_embeddings(tmp_path / "e.parquet")
    assert parquet["model"] == npz["model"] and list(parquet["files"]) == list(npz["files"])
    for path, row in npz["files"].items():
        assert all(parquet["files"][path][name] == row[name] for name in ("key", "sample_rate", "channels"))
        assert all(np.array_equal(parquet["files"][path][name], row[name]) for name in ("utterance", "frames"))


def test_parquet_columns_go_through_their_joined_values_in_chunks_of_what_arrow_offsets_reach(tmp_path, model_path,
                                                                                             monkeypatch):
    """Embeddings went to and from parquet as lists of Python floats, 10-12x their size in memory (1.3 GB to write
    129 MB of frames). Now as their joined float32 values, in list arrays of at most the values int32 offsets
    reach: here made small, so the frames are several chunks."""
    import echo.encode_files as command

    pyarrow = pytest.importorskip("pyarrow")
    pytest.importorskip("pyarrow.parquet")
    write_corpus(tmp_path / "data")
    list_chunk, chunks = command._list_chunk, []

    def recorded(arrays, pyarrow):
        chunks.append((arrays[0].ndim, sum(a.size for a in arrays), len(arrays)))
        return list_chunk(arrays, pyarrow)

    monkeypatch.setattr(command, "LIST_VALUES", 5000)  # a file's frames are 0.3-1.4 chunks' worth
    monkeypatch.setattr(command, "_list_chunk", recorded)
    for name in ("e.npz", "e.parquet"):
        assert run(tmp_path / "data", "--model", model_path, "--out", tmp_path / name, "--frames") == 0
    frame_chunks = [(values, files) for ndim, values, files in chunks if ndim == 2]
    assert len(frame_chunks) > 1 and sum(files for _, files in frame_chunks) == 4
    assert all(values <= 5000 or files == 1 for values, files in frame_chunks)
    npz, parquet = read_embeddings(tmp_path / "e.npz")["files"], read_embeddings(tmp_path / "e.parquet")["files"]
    assert set(parquet) == set(npz) and len(npz) == 4
    for path, row in npz.items():
        for name in ("utterance", "frames"):
            got = parquet[path][name]
            assert got.dtype == np.float32 and got.shape == row[name].shape and np.array_equal(got, row[name])
            assert (got if got.base is None else got.base).nbytes == got.nbytes  # not a view holding the column
    # a table written elsewhere, a row group a file, its second row without frames: that file reads without them
    table = pyarrow.parquet.read_table(str(tmp_path / "e.parquet"))
    frames = table.column("frames").combine_chunks()
    valid = pyarrow.array([True, False] + [True] * (len(table) - 2))
    table = table.set_column(table.column_names.index("frames"), "frames", pyarrow.ListArray.from_arrays(
        frames.offsets, frames.values, mask=pyarrow.compute.invert(valid)))
    pyarrow.parquet.write_table(table, str(tmp_path / "f.parquet"), row_group_size=1)
    files = read_embeddings(tmp_path / "f.parquet")["files"]
    second = table.column("path")[1].as_py()
    assert "frames" not in files[second]
    for path, row in npz.items():
        assert path == second or np.array_equal(files[path]["frames"], row["frames"])
        assert np.array_equal(files[path]["utterance"], row["utterance"])


def test_no_path_encodes_the_bundled_samples_with_a_kept_heap_on_the_cpu(tmp_path, model_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append("kept"))
    assert run("--model", model_path, "--out", tmp_path / "samples.npz", "--device", "cpu") == 0
    assert calls == ["kept"]
    assert "note:" not in capsys.readouterr().out  # the samples' CREDITS.md is no recording left out
    files = read_embeddings(tmp_path / "samples.npz")["files"]
    assert {Path(p).stem for p in files} == set(bundled.names())
    assert len({row["sample_rate"] for row in files.values()}) >= 3


def test_missing_soundfile_stops_with_the_install_hint(tmp_path, model_path, capsys, monkeypatch):
    write_corpus(tmp_path / "data")
    monkeypatch.setitem(sys.modules, "soundfile", None)
    assert run(tmp_path / "data", "--model", model_path, "--out", tmp_path / "e.npz") == 2
    assert "needs the package 'soundfile'" in capsys.readouterr().err and not (tmp_path / "e.npz").exists()


def test_missing_soundfile_is_named_before_the_wav_files_are_encoded(tmp_path, model_path, capsys, monkeypatch):
    """WAV files need no package, other files soundfile: a folder whose last batch held its one FLAC file stopped
    there, after encoding every WAV file before it (hours in a large folder)."""
    from echo.data.wav import write_wav

    (tmp_path / "data").mkdir()
    for i in range(3):
        write_wav(tmp_path / "data" / f"a{i}.wav", np.zeros(800, dtype=np.float32), 8000)
    (tmp_path / "data" / "z.flac").write_bytes(b"fLaC")  # never read: refused before any file is
    monkeypatch.setitem(sys.modules, "soundfile", None)
    assert run(tmp_path / "data", "--model", model_path, "--out", tmp_path / "e.npz", "--batch-files", "1") == 2
    assert "reading audio other than WAV (1 file, e.g. " in capsys.readouterr().err
    assert not list(tmp_path.glob("e.npz*"))  # neither the output nor the kept batches of an encoding


def test_bad_arguments(tmp_path, model_path, capsys):
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "e.txt") == 2
    assert "--out must end in .npz or .parquet" in capsys.readouterr().err
    assert run(tmp_path / "nothing-here", "--model", model_path, "--out", tmp_path / "e.npz") == 2
    assert "no audio files" in capsys.readouterr().err
    # refused before any file is encoded
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "e.npz", "--max-tokens", "0") == 2
    assert "--max-tokens must be at least 1, got 0" in capsys.readouterr().err
    (tmp_path / "folder.npz").mkdir()
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "folder.npz") == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "results").mkdir()  # a folder without a suffix: the folder is the problem, not the name
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "results") == 2
    assert f"--out {tmp_path / 'results'} is a folder; give the file to write, e.g. " \
           f"{tmp_path / 'results' / 'embeddings.npz'}" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "file" / "e.npz") == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_bad_places_are_refused_before_any_work(tmp_path, model_path, capsys, monkeypatch):
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    # someone's own npz is not replaced
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, weights=np.arange(3))
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", theirs) == 2
    assert "exists and is not an output of echo encode (it has no paths, model)" in capsys.readouterr().err
    assert np.array_equal(np.load(theirs)["weights"], np.arange(3))
    notes = tmp_path / "notes.npz"  # not even a zip: np.load tried it as a pickle and said so
    notes.write_text("hi\n")
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", notes) == 2
    assert "exists and is not an output of echo encode (not an .npz file: it starts with b'hi\\n')" in \
        capsys.readouterr().err
    assert notes.read_text() == "hi\n"
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", tmp_path / "e.npz", "--device", "bogus") == 2
    assert "unknown device 'bogus'" in capsys.readouterr().err
    (tmp_path / "e.npz.parts").write_text("")  # was found once a batch was encoded: "[Errno 20] Not a directory"
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", tmp_path / "e.npz") == 2
    assert f"{tmp_path / 'e.npz.parts'}, the folder its finished batches are saved in, is a file" in \
        capsys.readouterr().err
    (tmp_path / "e.npz.parts").unlink()
    (tmp_path / "made-by-mktemp.npz").write_bytes(b"")  # an empty file holds nothing to lose
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", tmp_path / "made-by-mktemp.npz") == 0

    def no_room(*args, dir, **kwargs):  # as the OS says it: of the file tried, whose random name says nothing
        raise OSError(28, "No space left on device", str(Path(dir) / "tmpsyt6__bf"))

    monkeypatch.setattr("tempfile.TemporaryFile", no_room)
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", tmp_path / "e.npz") == 2
    assert f"cannot be written: No space left on device: {tmp_path}\n" in capsys.readouterr().err


def test_each_file_once_however_spelt_and_unusable_paths_named(tmp_path, model_path, capsys, lock_folder):
    folder = tmp_path / "d"
    (folder / "locked").mkdir(parents=True)
    soundfile.write(str(folder / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    soundfile.write(str(folder / "locked" / "b.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    (tmp_path / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    (folder / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    (tmp_path / "link.wav").symlink_to(folder / "a.wav")
    lock_folder(folder / "locked")
    out = tmp_path / "e.npz"
    spellings = [folder, folder.resolve() / "a.wav", folder / ".." / "d" / "a.wav", tmp_path / "link.wav",
                 tmp_path / "dangling.wav"]
    assert run(*spellings, "--model", model_path, "--out", out) == 0
    printed = capsys.readouterr().out
    assert list(read_embeddings(out)["files"]) == [str(folder / "a.wav")]
    assert f"skipped {folder / 'locked'}: folder not readable: Permission denied" in printed
    assert f"skipped {tmp_path / 'dangling.wav'}: a broken or looping symbolic link" in printed
    assert f"skipped {folder / 'dangling.wav'}: a broken or looping symbolic link" in printed


def test_a_looping_link_or_a_pipe_in_a_folder_is_named_and_skipped(tmp_path, model_path, capsys):
    """A link loop inside a folder crashed the run (pathlib's RuntimeError from resolve(), a deep traceback),
    and a named pipe called x.wav was dropped without a word; given by name, both were reported."""
    folder = tmp_path / "d"
    folder.mkdir()
    soundfile.write(str(folder / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    (folder / "loop1.wav").symlink_to(folder / "loop2.wav")
    (folder / "loop2.wav").symlink_to(folder / "loop1.wav")
    os.mkfifo(folder / "pipe.wav")
    out = tmp_path / "e.npz"
    assert run(folder, "--model", model_path, "--out", out) == 0
    printed = capsys.readouterr().out
    assert list(read_embeddings(out)["files"]) == [str(folder / "a.wav")]
    for name in ("loop1.wav", "loop2.wav"):
        assert f"skipped {folder / name}: a broken or looping symbolic link" in printed
    assert f"skipped {folder / 'pipe.wav'}: not a regular file or folder" in printed
    assert "1 file (0 reused from an earlier run), 3 skipped" in printed


def test_a_linked_folder_is_followed_and_a_link_loop_named(tmp_path, model_path, capsys):
    """A folder linked in from another disk was left out without a word (os.walk lists links to folders as
    folders and does not enter them); eval's folder scans follow them, and so does encode, each folder once."""
    elsewhere, folder = tmp_path / "other disk" / "fan", tmp_path / "d"
    elsewhere.mkdir(parents=True)
    folder.mkdir()
    soundfile.write(str(folder / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    soundfile.write(str(elsewhere / "b.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    (folder / "fan").symlink_to(elsewhere)
    (folder / "fan again").symlink_to(elsewhere)
    (elsewhere / "up").symlink_to(folder)  # a loop: d/fan/up/fan/up/...
    out = tmp_path / "e.npz"
    assert run(folder, "--model", model_path, "--out", out) == 0
    printed = capsys.readouterr().out
    assert sorted(read_embeddings(out)["files"]) == [str(folder / "a.wav"), str(folder / "fan" / "b.wav")]
    assert f"skipped {folder / 'fan' / 'up'}: a symbolic link loop back to {folder}" in printed
    assert f"skipped {folder / 'fan again'}: the same folder as {folder / 'fan'}, listed there" in printed


@pytest.mark.parametrize("listing", ["as listed", "reversed"])
def test_a_folder_linked_from_two_folders_is_listed_under_the_same_path_whatever_the_listing_order(
        tmp_path, monkeypatch, listing):
    """Subfolders were walked in the file system's order, so which of two links to one folder was listed (and named
    the files in the output) depended on that order: the first in sorted order is the one listed."""
    from echo.encode_files import find_files

    shared, folder = tmp_path / "shared", tmp_path / "d"
    shared.mkdir()
    soundfile.write(str(shared / "b.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    for name in ("x", "y"):
        (folder / name).mkdir(parents=True)
        (folder / name / "link").symlink_to(shared)
    if listing == "reversed":
        scandir = os.scandir

        class Reversed(contextlib.nullcontext):  # os.walk iterates a scandir inside `with`
            def __init__(self, path):
                with scandir(path) as entries:
                    super().__init__(iter(list(entries)[::-1]))

            def __next__(self):
                return next(self.enter_result)

        monkeypatch.setattr(os, "scandir", Reversed)
    files, unusable, _ = find_files([folder])
    assert files == [folder / "x" / "link" / "b.wav"]
    assert unusable == [(folder / "y" / "link", f"the same folder as {folder / 'x' / 'link'}, listed there")]


def test_a_damaged_shard_is_set_aside_kept_and_named_at_the_end_of_every_run(tmp_path, model_path, capsys,
                                                                            monkeypatch):
    """A shard that cannot be read is set aside as *.unreadable, with a note that it is kept: the run's end
    deleted it all the same, and meanwhile called the folder holding it the saved batches of an interrupted run.
    It stays until the user deletes it, and every run's end says where it is and that it may be deleted."""
    import echo.encode_files as command

    files = [tmp_path / name for name in ("a.wav", "b.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    options = (*files, "--model", model_path, "--out", out, "--batch-files", "1")
    real = interrupt_at_batch(monkeypatch)
    assert run(*options) == 130  # a.wav's batch was saved
    monkeypatch.setattr(command, "_encode_batch", real)
    [shard] = (tmp_path / "e.npz.parts").rglob("*.safetensors")
    shard.write_bytes(shard.read_bytes()[:100])  # cut short by a power failure
    damaged, aside = shard.read_bytes(), shard.with_name(shard.name + ".unreadable")
    kept = f"kept {aside}: a saved batch that could not be read; its files were encoded again, so it may be deleted"
    capsys.readouterr()
    assert run(*options) == 0
    printed = capsys.readouterr().out
    assert f"{shard} are unreadable" in printed and "2 files (0 reused from an earlier run)" in printed
    assert kept in printed and "interrupted run" not in printed
    assert aside.read_bytes() == damaged and list(aside.parent.iterdir()) == [aside]
    model = echo.load(model_path)
    for path in files:
        assert rel_err(read_embeddings(out)["files"][str(path)]["utterance"], reference(model, path)[0]) < 1e-5
    assert run(*options) == 0  # still there, and said again
    printed = capsys.readouterr().out
    assert kept in printed and "every file of this run (2 files) was encoded already" in printed and aside.exists()
    aside.unlink()
    assert run(*options) == 0 and kept not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "b.wav", "e.npz", "model"]


def test_the_half_written_output_of_a_killed_run_is_removed(tmp_path, model_path):
    """A run killed while writing its output left OUT.<pid>.tmp, as big as the output, beside it for good."""
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    killed, writing = subprocess.Popen(["true"]), subprocess.Popen(["sleep", "30"])
    killed.wait()
    abandoned = tmp_path / f"e[1].npz.{killed.pid}.tmp"
    in_progress = tmp_path / f"e[1].npz.{writing.pid}.tmp"  # another process's write, still going on
    others = [tmp_path / f"other.npz.{killed.pid}.tmp", tmp_path / f"e1.npz.{killed.pid}.tmp"]
    for path in [abandoned, in_progress, *others]:
        path.write_bytes(b"PK half a zip")
    try:
        assert run(tmp_path / "a.wav", "--model", model_path, "--out", tmp_path / "e[1].npz") == 0
    finally:
        writing.kill()
        writing.wait()
    assert not abandoned.exists() and in_progress.exists() and all(path.exists() for path in others)


def test_nothing_encodable_leaves_the_earlier_output(tmp_path, model_path, capsys):
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", out) == 0
    before = out.read_bytes()
    (tmp_path / "bad.wav").write_bytes(b"RIFF nothing")
    assert run(tmp_path / "bad.wav", "--model", model_path, "--out", out) == 1
    assert "was not written" in capsys.readouterr().err and out.read_bytes() == before


@pytest.mark.parametrize("name,value,message", [
    ("ECHO_BACKEND", "csrc", "ECHO_BACKEND=csrc: no 'csrc' backend here for tokens"),  # skipped every file
    ("ECHO_BACKEND_TOKENS", "csrc", "ECHO_BACKEND_TOKENS=csrc: no 'csrc' backend here for tokens"),
    ("ECHO_BACKEND", "bogus", "ECHO_BACKEND=bogus: unknown backend"),
    ("ECHO_BACKEND_ATTENTON", "torch", "ECHO_BACKEND_ATTENTON: no such op"),  # was ignored
])
def test_a_backend_setting_that_cannot_run_stops_the_command_before_any_file(tmp_path, model_path, capsys,
                                                                             monkeypatch, name, value, message):
    write_corpus(tmp_path / "data")
    monkeypatch.setenv(name, value)
    assert run(tmp_path / "data", "--model", model_path, "--out", tmp_path / "e.npz") == 2
    assert message in capsys.readouterr().err and not (tmp_path / "e.npz").exists()


def two_ranks(command) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of `command(rank)` (an argv) run as two processes, as torchrun
    --nproc-per-node 2 sets them up; each must end within two minutes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    ranks = []
    try:
        for rank in range(2):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(root)}
            ranks.append(subprocess.Popen(command(rank), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        outputs = [process.communicate(timeout=120) for process in ranks]
        return [(process.returncode, *output) for process, output in zip(ranks, outputs)]
    finally:
        for process in ranks:  # one left waiting on the other
            process.kill()


def as_two_ranks(command) -> list[str]:
    """The stdout of `command(rank)` run as two ranks (two_ranks); both must succeed."""
    ranks = two_ranks(command)
    assert [status for status, _, _ in ranks] == [0, 0], ranks
    return [stdout for _, stdout, _ in ranks]


def test_ranks_share_the_files_and_rank_0_merges(tmp_path, model_path):
    good = write_corpus(tmp_path / "data")
    out = tmp_path / "emb.npz"
    outputs = as_two_ranks(lambda rank: [sys.executable, "-m", "echo", "encode", str(tmp_path / "data"), "--model",
                                         str(model_path), "--out", str(out), "--quiet", "--batch-files", "1",
                                         "--device", "cpu"])
    assert "wrote" in outputs[0] and "wrote" not in outputs[1]
    # each rank reports the bad files it met; the summary counts both ranks' (broken.wav, short.flac)
    assert sum(output.count("skipped ") for output in outputs) == 2, outputs
    assert f"{len(good)} files (0 reused from an earlier run), 2 skipped" in outputs[0]
    assert set(read_embeddings(out)["files"]) == {str(p) for p in good}


LATE_FILE_RANK = """
import sys
from pathlib import Path
import echo.encode_files as command
from echo import cli

found = command.find_files
if sys.argv[1] == "1":  # this rank's scan came after a file was added
    command.find_files = lambda paths: ([Path(sys.argv[2]), *found(paths)[0]], *found(paths)[1:])
sys.exit(cli.main(sys.argv[3:]))
"""


def test_ranks_that_scan_different_files_still_encode_every_file_rank_0_found(tmp_path, model_path):
    """Each rank shared out the files of its own scan: a file added while they scanned shifted one rank's shares,
    and files between them were encoded by no rank and left out of the output without a word."""
    good = write_corpus(tmp_path / "data")
    late = tmp_path / "late" / "late.wav"
    late.parent.mkdir()
    soundfile.write(str(late), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "emb.npz"
    as_two_ranks(lambda rank: [sys.executable, "-c", LATE_FILE_RANK, str(rank), str(late), "encode",
                               str(tmp_path / "data"), "--model", str(model_path), "--out", str(out), "--quiet",
                               "--batch-files", "1", "--device", "cpu"])
    assert set(read_embeddings(out)["files"]) == {str(p) for p in good}  # rank 0's scan; a rerun takes the late one


FAILING_RANK = """
import sys
import echo.encode_files as command
from echo import cli

real, batches = command._encode_batch, []


def fails_at_the_second(*args):
    batches.append(1)
    if len(batches) == 2:
        raise MemoryError()
    return real(*args)


if sys.argv[1] == "1":
    command._encode_batch = fails_at_the_second
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_rank_that_stops_is_said_by_rank_0_once_the_others_finished_their_shares(tmp_path, model_path,
                                                                                     monkeypatch, capsys):
    """A rank that stopped on an error never met the others at the summary: they waited there until gloo gave up
    (a traceback) or torchrun killed them, and their finished shares were not said to be kept."""
    import echo.encode_files as command

    files = [tmp_path / "data" / f"{number}.wav" for number in range(6)]  # rank 0: 0, 2, 4; rank 1: 1, 3, 5
    files[0].parent.mkdir()
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "emb.npz"
    options = ("--model", model_path, "--out", out, "--batch-files", "1", "--device", "cpu")
    ranks = two_ranks(lambda rank: [sys.executable, "-c", FAILING_RANK, str(rank), "encode", str(files[0].parent),
                                    *map(str, options), "--quiet"])
    assert [status for status, _, _ in ranks] == [1, 1], ranks
    parts = tmp_path / "emb.npz.parts"
    assert ranks[0][2] == f"error: rank 1 stopped (that rank prints its error), so {out} was not written; 4 files " \
                          f"encoded, kept in {parts}; the same command resumes with the 2 left\n", ranks
    assert ranks[1][2].startswith("rank 1 stopped (MemoryError); it waits for the other ranks to finish their "
                                  "shares\n"), ranks  # said at once, not only once the others finished
    assert "\nMemoryError\n" in ranks[1][2] and ranks[1][2].endswith(  # its share's, not the run's: named so
        f"rank 1's share: 1 file encoded, kept in {parts}; the same command resumes with the 2 left\n"), ranks
    assert not out.exists()
    real, encoded = command._encode_batch, []

    def counted(model, loaded, *args):
        encoded.extend(loaded)
        return real(model, loaded, *args)

    monkeypatch.setattr(command, "_encode_batch", counted)
    assert run(files[0].parent, *options) == 0
    assert "6 files (4 reused from an earlier run), 0 skipped" in capsys.readouterr().out and len(encoded) == 2
    assert set(read_embeddings(out)["files"]) == {str(path) for path in files}


CLOCKED_RANK = """
import sys
from types import SimpleNamespace
import echo.encode_files as command
from echo import cli

met = []
summed = command._summed


def meets(*args, **kwargs):
    met.append(True)
    return summed(*args, **kwargs)


command._summed = meets  # rank 0's clock: 0 s until the ranks meet, once each has finished its share, then 100 s
command.time = SimpleNamespace(perf_counter=lambda: 100.0 if met else 0.0)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_the_speed_of_a_run_of_ranks_counts_to_the_last_rank_s_end(tmp_path, model_path):
    """Rank 0 read its clock when its own share was done: every rank's seconds of audio over rank 0's time claimed
    up to N times the speed where another rank's share took longer (41 s of audio "in 0.8 s" where the slower rank
    took 1.7 s)."""
    files = tmp_path / "data"
    files.mkdir()
    for number in range(2):
        soundfile.write(str(files / f"{number}.wav"), np.random.uniform(-0.5, 0.5, 16000), 16000)
    out = tmp_path / "emb.npz"
    outputs = as_two_ranks(lambda rank: [sys.executable, "-c", CLOCKED_RANK, "encode", str(files), "--model",
                                         str(model_path), "--out", str(out), "--quiet", "--device", "cpu"])
    assert outputs[0].endswith("2 files (0 reused from an earlier run), 0 skipped; 2.0 s of audio in 100.0 s "
                               "(0.0x real time)\n"), outputs


def test_a_world_size_left_in_the_environment_is_named_with_the_way_out(tmp_path, model_path, monkeypatch, capsys):
    """A stale WORLD_SIZE (a shell in a cluster job's container) failed with torch's "environment variable
    MASTER_ADDR expected, but not set", which did not say why one `python -m echo encode` needed it."""
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", tmp_path / "e.npz") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: WORLD_SIZE=2 and RANK=0 in the environment make this process one of a 2-process "
                          "run, which could not be joined (") and "MASTER_ADDR" in err, err
    assert err.endswith("run it under torchrun (torchrun --nproc-per-node N -m echo ...), or unset WORLD_SIZE and "
                        "RANK for one process\n"), err


WAITING_RANK = """
import sys
import echo.process_group
from echo import cli

echo.process_group.WAITING_NOTE_SECONDS = 0
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_process_waiting_for_ranks_that_never_start_says_what_it_waits_for(tmp_path, model_path):
    """With WORLD_SIZE=2 and MASTER_ADDR/MASTER_PORT left in the environment, one process waited in torch's
    rendezvous for 30 minutes without a word: it looked hung."""
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", WAITING_RANK, "encode", str(tmp_path / "a.wav"), "--model",
                                str(model_path), "--out", str(tmp_path / "e.npz")], env=env, stderr=subprocess.PIPE,
                               text=True)
    deadline = threading.Timer(60, process.kill)  # a process that waits without a word is ended: no line
    deadline.start()
    try:
        line = process.stderr.readline()  # the process waits on: its first line is the note
    finally:
        deadline.cancel()
        process.kill()
        process.communicate()
    assert line == (f"waiting for the other processes of a 2-process run (WORLD_SIZE=2 and RANK=0 in the environment, "
                    f"MASTER_ADDR:MASTER_PORT 127.0.0.1:{port}); if no other process was started, run it under "
                    f"torchrun (torchrun --nproc-per-node N -m echo ...), or unset WORLD_SIZE and RANK for one "
                    f"process\n")


FULL_DISK_RANK_0 = """
import errno
import sys
import echo.encode_files as command
from echo import cli


def full_disk(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


if sys.argv[1] == "0":
    command._write = full_disk
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_rank_0_failing_to_write_the_output_is_said_once_without_a_traceback_from_the_others(tmp_path, model_path):
    """Rank 0 stopped on a full disk while the others waited for it at their last barrier: rank 1 then printed
    gloo's "Connection closed by peer ... GLHF!" in a traceback of 30 lines, beside rank 0's own error."""
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "emb.npz"
    ranks = two_ranks(lambda rank: [sys.executable, "-c", FULL_DISK_RANK_0, str(rank), "encode", str(tmp_path),
                                    "--model", str(model_path), "--out", str(out), "--quiet", "--device", "cpu"])
    assert [status for status, _, _ in ranks] == [1, 1], ranks
    assert ranks[0][2].startswith(f"error: {out} could not be written ([Errno 28] No space left on device)"), ranks
    assert ranks[1][2] == f"error: rank 0 stopped while it merged the ranks' shares into {out} (that rank prints " \
                          f"its error)\n", ranks


@pytest.mark.slow
def test_rank_0_stopping_says_what_the_run_kept_once_the_others_finished_their_shares(tmp_path, model_path):
    """Rank 0, stopped, said only its own share's one file, kept, and "19 left": not that the output was not
    written, nor the other ranks' shares, finished and kept."""
    files = [tmp_path / "data" / f"{number}.wav" for number in range(6)]  # rank 0: 0, 2, 4; rank 1: 1, 3, 5
    files[0].parent.mkdir()
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "emb.npz"
    ranks = two_ranks(lambda rank: [sys.executable, "-c", FAILING_RANK, str(1 - rank),  # "1": rank 0 fails
                                    "encode", str(files[0].parent), "--model", str(model_path), "--out", str(out),
                                    "--batch-files", "1", "--device", "cpu", "--quiet"])
    assert [status for status, _, _ in ranks] == [1, 1], ranks
    assert "\nMemoryError\n" in ranks[0][2] and ranks[0][2].endswith(
        f"{out} was not written; 4 files encoded, kept in {out}.parts; the same command resumes with the 2 left\n"), \
        ranks
    assert not out.exists()


@pytest.mark.parametrize("ending, status", [(ValueError("a bad setting"), 2), (KeyboardInterrupt(), 130)])
def test_the_process_group_it_made_is_destroyed_however_the_command_ends(tmp_path, model_path, monkeypatch,
                                                                        ending, status):
    """A rank that left with its gloo group alive could abort at exit ("terminate called without an active
    exception") instead of reporting what stopped it."""
    import echo.encode_files as command

    destroyed = []
    monkeypatch.setattr(command, "_distributed", lambda: (1, 2, True))
    monkeypatch.setattr(command.dist, "destroy_process_group", lambda: destroyed.append(True))

    def stopped(*args):
        raise ending

    monkeypatch.setattr(command, "_encode_files", stopped)
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "e.npz") == status
    assert destroyed == [True]


def test_a_soundfile_without_its_c_library_falls_back_for_plain_wav(tmp_path, monkeypatch):
    """`import soundfile` raises OSError when libsndfile is missing: that was no ImportError, so plain 16-bit
    WAV files, which need no package, were reported unreadable."""
    import echo.eval
    from echo.data.wav import write_wav
    from echo.encode_files import read_file

    real_import = echo.eval.importlib.import_module

    def no_library(name, *args):
        if name == "soundfile":
            raise OSError("sndfile library not found")
        return real_import(name, *args)

    monkeypatch.setattr(echo.eval.importlib, "import_module", no_library)
    samples = np.array([0.5, -0.25, 0.125], dtype=np.float32)
    waveform, rate = read_file(write_wav(tmp_path / "plain.wav", samples, 8000))
    assert rate == 8000 and np.array_equal(waveform, samples)
    (tmp_path / "x.flac").write_bytes(b"fLaC")
    with pytest.raises(ImportError, match=r"'soundfile', which does not load \(sndfile library not found\)"):
        read_file(tmp_path / "x.flac")
    # a WAV the plain reader cannot take: the error says soundfile would, and why it did not
    import soundfile

    monkeypatch.setattr(echo.eval.importlib, "import_module", real_import)
    soundfile.write(tmp_path / "deep.wav", samples, 8000, subtype="PCM_24")
    monkeypatch.setattr(echo.eval.importlib, "import_module", no_library)
    with pytest.raises(ValueError, match=r"24-bit PCM samples.*soundfile.*sndfile library not found"):
        read_file(tmp_path / "deep.wav")


def test_an_empty_path_is_refused_as_bad_usage_and_a_tilde_is_the_home_folder(tmp_path, model_path, monkeypatch,
                                                                             capsys):
    """`encode "$DIR"` with DIR unset encoded the current folder and all below it; `--out=~/e.npz`, which a shell
    leaves as typed, made a folder named "~" in the current one."""
    here, home = tmp_path / "here", tmp_path / "home"
    here.mkdir()
    home.mkdir()
    soundfile.write(str(here / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(SystemExit) as exited:
        run("", "--model", model_path, "--out", tmp_path / "e.npz")
    assert exited.value.code == 2 and "an empty path" in capsys.readouterr().err
    assert not (tmp_path / "e.npz").exists()
    assert cli.main(["encode", "a.wav", "--model", str(model_path), "--out=~/e.npz", "--quiet"]) == 0
    assert list(read_embeddings(home / "e.npz")["files"]) == ["a.wav"]
    assert sorted(p.name for p in here.iterdir()) == ["a.wav"]


def test_a_bad_path_named_several_times_is_reported_and_counted_once(tmp_path, model_path, capsys):
    """A broken link given by name and found in its folder and its parent folder, both given, was reported three
    times and counted as 3 skipped, when good files named so are encoded once."""
    folder = tmp_path / "d" / "sub"
    folder.mkdir(parents=True)
    soundfile.write(str(folder / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    (folder / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    out = tmp_path / "e.npz"
    assert run(tmp_path / "d", folder, folder / "dangling.wav", folder / "a.wav", "--model", model_path,
               "--out", out) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped ") == 1 and "1 file (0 reused from an earlier run), 1 skipped" in printed
    assert list(read_embeddings(out)["files"]) == [str(folder / "a.wav")]


def test_paths_in_a_folder_that_may_not_be_searched_are_reported_and_skipped(tmp_path, model_path, capsys,
                                                                            monkeypatch):
    """The names in a folder one may read but not search (mode r--), or a file given in a folder one may not
    enter, cannot be looked up: pathlib's is_dir/is_file raised "Permission denied", which ended the whole run
    (exit 1, nothing encoded) instead of skipping those paths as unreadable folders are."""
    locked = tmp_path / "d" / "locked"
    (locked / "sub").mkdir(parents=True)
    for path in (tmp_path / "d" / "a.wav", locked / "b.wav", locked / "c.wav", locked / "sub" / "d.wav"):
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    real_stat, real_lstat = os.stat, os.lstat

    def refused(real):  # as for a user without the folder's x permission (the tests run as root)
        def stat(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and Path(path).parent == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)
        return stat

    monkeypatch.setattr(os, "stat", refused(real_stat))
    monkeypatch.setattr(os, "lstat", refused(real_lstat))
    out = tmp_path / "e.npz"
    assert run(tmp_path / "d", locked / "c.wav", "--model", model_path, "--out", out) == 0
    printed = capsys.readouterr().out
    for name in ("b.wav", "c.wav"):
        assert f"skipped {locked / name}: not usable: Permission denied" in printed
    assert f"skipped {locked / 'sub'}: folder not readable: Permission denied" in printed
    assert "1 file (0 reused from an earlier run), 3 skipped" in printed
    monkeypatch.setattr(os, "stat", real_stat)
    monkeypatch.setattr(os, "lstat", real_lstat)
    assert list(read_embeddings(out)["files"]) == [str(tmp_path / "d" / "a.wav")]


def test_a_full_disk_while_a_batch_is_saved_is_one_line_and_the_saved_batches_resume(tmp_path, model_path,
                                                                                     capsys, monkeypatch):
    """safetensors raises its own SafetensorError, no OSError, when the disk fills while a batch is saved: the
    command ended in a traceback."""
    from safetensors import SafetensorError

    from echo.eval import embed

    files = [tmp_path / name for name in ("a.wav", "b.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    real, saved = embed.save_file, []

    def fills_up(*args, **kwargs):
        saved.append(True)
        if len(saved) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args, **kwargs)

    monkeypatch.setattr(embed, "save_file", fills_up)
    options = ("--model", model_path, "--out", out, "--batch-files", "1")
    assert run(*files, *options) == 1
    error, parts = capsys.readouterr().err, tmp_path / "e.npz.parts"
    assert error.startswith(f"error: {parts}") and "No space left on device" in error and not out.exists()
    assert error.endswith(f"kept\n1 file encoded, kept in {parts}; the same command resumes with the 1 left\n")
    assert error.count("\n") == 2
    monkeypatch.setattr(embed, "save_file", real)
    assert run(*files, *options) == 0
    assert "2 files (1 reused from an earlier run)" in capsys.readouterr().out
    model = echo.load(model_path)
    for path in files:
        assert rel_err(read_embeddings(out)["files"][str(path)]["utterance"], reference(model, path)[0]) < 1e-5


def test_a_full_disk_while_the_output_is_written_says_that_nothing_is_lost(tmp_path, model_path, capsys,
                                                                          monkeypatch):
    """"error: [Errno 28] No space left on device" named neither the file nor what became of the encoding, as if
    it were lost; the earlier output is left as it was and the same command writes the new one."""
    import echo.encode_files as command

    files = [tmp_path / name for name in ("a.wav", "b.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.npz"
    assert run(files[0], "--model", model_path, "--out", out) == 0
    before = out.read_bytes()
    real = command._write_table

    def fills_up(path, *args):
        Path(path).write_bytes(b"PK half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(command, "_write_table", fills_up)
    capsys.readouterr()
    assert run(*files, "--model", model_path, "--out", out) == 1
    assert capsys.readouterr().err == (f"error: {out} could not be written ([Errno 28] No space left on device); it "
                                       f"was left as it was, and the same command writes it without encoding any "
                                       f"file again\n")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.wav", "b.wav", "e.npz", "e.npz.parts", "model"]
    monkeypatch.setattr(command, "_write_table", real)
    assert run(*files, "--model", model_path, "--out", out) == 0
    assert "2 files (2 reused from an earlier run)" in capsys.readouterr().out
    model = echo.load(model_path)
    for path in files:
        assert rel_err(read_embeddings(out)["files"][str(path)]["utterance"], reference(model, path)[0]) < 1e-5


def test_plain_cuda_is_this_ranks_gpu(tmp_path, model_path, monkeypatch):
    """`torchrun ... encode --device cuda` put every rank on GPU 0 ("cuda" is the current device, never set),
    where the default and pretraining take each rank's own (LOCAL_RANK)."""
    import echo.checkpoint
    import echo.encode_files as command

    placed = []

    def load(name, device):
        placed.append(device)
        raise ValueError("stop here")

    monkeypatch.setattr(command.inputs, "checked_device", torch.device)  # no GPU needed to choose one
    monkeypatch.setattr(echo.checkpoint, "load", load)
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    for device in ("cuda", "cuda:0", "cpu"):
        assert run(tmp_path, "--model", model_path, "--out", tmp_path / "e.npz", "--device", device) == 2
    assert placed == [torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cpu")]


def test_an_out_whose_temporary_name_is_too_long_is_refused_before_any_work(tmp_path, model_path, capsys,
                                                                           monkeypatch):
    """OUT is written as OUT.<pid>.tmp first: a name that fits while that one does not (over 255 bytes) was
    refused only once every file was encoded, and by every rerun again."""
    import echo.encode_files as command

    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    monkeypatch.setattr(command, "_encode_batch", lambda *args: pytest.fail("the work started"))
    out = tmp_path / ("x" * (255 - len(".npz.parts")) + ".npz")  # OUT.parts fits, OUT.<pid>.tmp does not
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", out) == 2
    assert f"--out {out} cannot be written: File name too long" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "model"]


def test_macos_metadata_files_in_a_folder_are_not_taken_for_recordings(tmp_path):
    """Every recording copied from a Mac to a USB drive has a ._<name>.wav beside it, Finder's metadata: each was
    read, failed and reported, one "skipped" line per recording. Named on the command line, it is read as given."""
    from echo.encode_files import find_files

    folder = tmp_path / "usb"
    (folder / "day1").mkdir(parents=True)
    for name in ("a.wav", "day1/b.WAV"):
        soundfile.write(str(folder / name), np.zeros(800), 8000)
        (folder / name).with_name(f"._{Path(name).name}").write_bytes(b"\x00\x05\x16\x07Mac OS X        ")
    assert find_files([folder]) == ([folder / "a.wav", folder / "day1" / "b.WAV"], [], [])
    assert find_files([folder / "._a.wav"]) == ([folder / "._a.wav"], [], [])


def test_a_rerun_writes_the_rate_and_channels_of_each_reused_file(tmp_path, model_path, capsys):
    """The rows a rerun takes from the earlier output keep their own sample rate and channel count, as the
    files have them, next to the embeddings they were encoded with."""
    good = write_corpus(tmp_path / "data")
    out = tmp_path / "emb.npz"
    assert run(tmp_path / "data", "--model", model_path, "--out", out) == 0
    soundfile.write(str(tmp_path / "data" / "new.wav"), np.random.uniform(-0.5, 0.5, 5000), 22050)
    capsys.readouterr()
    assert run(tmp_path / "data", "--model", model_path, "--out", out) == 0
    assert "5 files (4 reused from an earlier run)" in capsys.readouterr().out
    rows = read_embeddings(out)["files"]
    model = echo.load(model_path)
    for path, (signal, rate) in good.items():
        row = rows[str(path)]
        assert (row["sample_rate"], row["channels"]) == (rate, signal.shape[0] if signal.ndim == 2 else 1), path
        assert rel_err(row["utterance"], reference(model, path)[0]) < 1e-5
    assert (rows[str(tmp_path / "data" / "new.wav")]["sample_rate"], rows[str(tmp_path / "data" / "new.wav")]
            ["channels"]) == (22050, 1)


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_files_given_out_of_order_each_keep_their_own_embedding(tmp_path, model_path, suffix):
    """Files named on the command line in no sorted order: each path's row holds that file's embedding (the
    output's path column and its embeddings in the same order)."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    files = [tmp_path / name for name in ("c.wav", "a.wav", "d.wav", "b.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / f"emb{suffix}"
    assert run(*files, "--model", model_path, "--out", out, "--batch-files", "3", "--frames") == 0
    rows = read_embeddings(out)["files"]
    assert sorted(rows) == sorted(map(str, files))
    model = echo.load(model_path)
    for path in files:
        utterance, frames = reference(model, path)
        assert rel_err(rows[str(path)]["utterance"], utterance) < 1e-5, path
        assert rel_err(rows[str(path)]["frames"], frames) < 1e-5, path


def test_a_frames_run_encodes_again_the_files_an_interrupted_run_saved_without_frames(tmp_path, model_path,
                                                                                    capsys, monkeypatch):
    """A shard holding a file's utterance alone does not hold what a --frames run wants: the file is encoded
    again, and written with its frames."""
    import echo.encode_files as command

    files = [tmp_path / name for name in ("a.wav", "b.wav", "c.wav")]
    for path in files:
        soundfile.write(str(path), np.random.uniform(-0.5, 0.5, 4000), 16000)
    options = ("--model", model_path, "--out", tmp_path / "e.npz", "--batch-files", "1")
    real = interrupt_at_batch(monkeypatch)
    assert run(*files, *options) == 130  # a.wav's utterance was saved, without its frames
    monkeypatch.setattr(command, "_encode_batch", real)
    capsys.readouterr()
    assert run(*files, *options, "--frames") == 0
    assert "3 files (0 reused from an earlier run)" in capsys.readouterr().out
    rows = read_embeddings(tmp_path / "e.npz")["files"]
    model = echo.load(model_path)
    for path in files:
        utterance, frames = reference(model, path)
        assert rel_err(rows[str(path)]["utterance"], utterance) < 1e-5
        assert rel_err(rows[str(path)]["frames"], frames) < 1e-5


def test_hidden_recordings_are_found_only_macos_metadata_is_left_out(tmp_path):
    """Only ._<name> files are Finder's metadata: a recording whose name starts with a dot is a recording."""
    from echo.encode_files import find_files

    folder = tmp_path / "data"
    folder.mkdir()
    for name in (".take1.wav", "a.wav"):
        soundfile.write(str(folder / name), np.zeros(800), 8000)
    (folder / "._a.wav").write_bytes(b"\x00\x05\x16\x07Mac OS X        ")
    assert find_files([folder]) == ([folder / ".take1.wav", folder / "a.wav"], [], [])


def test_a_folders_files_of_other_suffixes_are_counted_in_one_note(tmp_path, model_path, capsys):
    """A folder of M4As (even WAVs renamed .m4a) was encoded as if empty without a word, while the same file named
    on the command line was encoded. Hidden names, macOS's ._ files, what hidden folders hold and folders are not
    counted."""
    from echo.data import AUDIO_SUFFIXES

    folder = tmp_path / "my_pump"
    (folder / "sub.m4a").mkdir(parents=True)
    (folder / ".git").mkdir()
    for name in ("a.wav", "x.m4a", "sub.m4a/y.M4A", "sub.m4a/b.wav"):
        soundfile.write(str(folder / name), np.random.uniform(-0.5, 0.5, 4000), 16000, format="WAV")
    for name in ("notes.txt", "README", ".DS_Store", ".hidden.txt", "._a.wav", ".git/config"):
        (folder / name).write_bytes(b"not audio")
    assert run(folder, "--model", model_path, "--out", tmp_path / "e.npz") == 0
    printed = capsys.readouterr().out
    assert sorted(read_embeddings(tmp_path / "e.npz")["files"]) == [str(folder / "a.wav"),
                                                                     str(folder / "sub.m4a" / "b.wav")]
    assert (f"note: left out of {folder}: 4 files with other suffixes (.m4a: 2, .txt: 1, no suffix: 1); files "
            f"are read from folders by suffix: {', '.join(sorted(AUDIO_SUFFIXES))}\n") in printed
    assert printed.count("note:") == 1


def test_a_file_reached_twice_in_a_folder_is_encoded_once_with_a_note(tmp_path, model_path, capsys):
    """A link and its target under the encoded folder were kept once without a word, where eval notes it."""
    folder = tmp_path / "d"
    folder.mkdir()
    for name in ("a.wav", "b.wav"):
        soundfile.write(str(folder / name), np.random.uniform(-0.5, 0.5, 4000), 16000)
    (folder / "link-a.wav").symlink_to(folder / "a.wav")
    (folder / "link-b.wav").symlink_to("b.wav")
    assert run(folder, "--model", model_path, "--out", tmp_path / "e.npz") == 0
    assert sorted(read_embeddings(tmp_path / "e.npz")["files"]) == [str(folder / "a.wav"), str(folder / "b.wav")]
    assert (f"note: encoded once: 2 files reached a second time, through a link or by another path (e.g. "
            f"{folder / 'link-a.wav'}, the same file as {folder / 'a.wav'})\n") in capsys.readouterr().out


def test_an_empty_or_unrecognised_file_is_said_so_without_the_bytes_of_its_path(tmp_path, model_path, capsys):
    """A 0-byte file read "LibsndfileError: Error opening b'/.../empty.wav': Format not recognised.": the path as
    a bytes literal, after the path the line already names, and nothing said that the file was empty."""
    folder = tmp_path / "d"
    folder.mkdir()
    soundfile.write(str(folder / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "broken.wav").write_bytes(b"RIFF not really a wav file")
    with pytest.raises(soundfile.LibsndfileError) as opening:
        soundfile.SoundFile(str(folder / "broken.wav"))
    assert run(folder, "--model", model_path, "--out", tmp_path / "e.npz") == 0
    printed = capsys.readouterr().out
    assert f"skipped {folder / 'empty.wav'}: empty file (0 bytes)\n" in printed
    assert (f"skipped {folder / 'broken.wav'}: not a readable audio file (libsndfile: "
            f"{opening.value.error_string.rstrip('.')})\n") in printed
    assert "b'" not in printed


def test_the_help_and_readme_name_every_field_of_the_outputs_and_how_to_read_them(tmp_path, model_path, capsys):
    """What an output holds and what its model and keys are was said nowhere but in the code."""
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    fields = set()
    for out in (tmp_path / "e.npz", tmp_path / "e.parquet"):
        assert run(tmp_path / "a.wav", "--model", model_path, "--out", out, "--frames") == 0
    with np.load(tmp_path / "e.npz") as data:  # utterance/0 is utterance/{i}
        fields |= {name.split("/")[0] + "/{i}" if "/" in name else name for name in data.files}
    fields |= set(pyarrow_parquet.read_schema(str(tmp_path / "e.parquet")).names)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["encode", "--help"])
    helped = " ".join(capsys.readouterr().out.split())
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Encoding files", 1)[1].split("\n## ", 1)[0]
    for field in fields:
        assert f" {field}" in helped and f"`{field}`" in section, field
    reader = f"echo.encode_files.{read_embeddings.__name__}"
    assert reader in helped and reader in section


def test_reading_back_a_file_that_is_no_output_says_so(tmp_path):
    """read_embeddings(a .wav), or of any file that is no zip, got numpy's "This file contains pickled (object) data.
    If you trust the file you can load it unsafely using the `allow_pickle=` keyword argument"; another program's
    npz or parquet got a KeyError."""
    audio = tmp_path / "a.wav"
    soundfile.write(str(audio), np.random.uniform(-0.5, 0.5, 4000), 16000)
    with pytest.raises(ValueError, match=f"{audio} is not an output of echo encode \\(not an .npz file: it starts "
                                         f"with b'RIFF"):
        read_embeddings(audio)
    other = tmp_path / "other.npz"  # a zip of someone else's arrays
    np.savez(other, weights=np.random.rand(3))
    with pytest.raises(ValueError, match=f"{other} is not an output of echo encode \\(it has no paths, model\\)"):
        read_embeddings(other)
    pyarrow = pytest.importorskip("pyarrow")
    pytest.importorskip("pyarrow.parquet").write_table(pyarrow.table({"path": ["a.wav"]}), str(tmp_path / "o.parquet"))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'o.parquet'} is not an output of echo encode \\("):
        read_embeddings(tmp_path / "o.parquet")


def test_reading_back_a_parquet_output_without_pyarrow_names_pyarrow(tmp_path, model_path, monkeypatch):
    """Without pyarrow a parquet output was said to be no output of echo encode (the check of its parts could not
    read it), not that reading it needs pyarrow."""
    pytest.importorskip("pyarrow")
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 4000), 16000)
    out = tmp_path / "e.parquet"
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", out) == 0
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    with pytest.raises(ValueError, match=r"^writing or reading \.parquet needs pyarrow \(pip install"):
        read_embeddings(out)


def test_reading_back_an_empty_file_says_it_is_no_output(tmp_path):
    """An empty .npz (made by mktemp, or cut off) got numpy's bare "EOFError: No data left in file", naming no file."""
    empty = tmp_path / "e.npz"
    empty.touch()
    with pytest.raises(ValueError, match=f"^{empty} is not an output of echo encode \\(EOFError"):
        read_embeddings(empty)
