"""`echo encode --window SECONDS [--hop SECONDS]`: each file's equal windows encoded as signals of their own."""
import numpy as np
import pytest
import soundfile
import torch

import echo
from echo import cli, windows
from echo.encode_files import read_embeddings

from conftest import random_model, rel_err
from test_cli import interrupt_call


@pytest.fixture
def model_path(tmp_path):
    return echo.save(random_model("tiny", depth=2), tmp_path / "model" / "tiny.safetensors")


def run(*argv):
    return cli.main(["encode", *map(str, argv), "--quiet"])


@pytest.mark.parametrize("window,hop", [(1000, 1000), (1000, 250), (700, 1300), (1, 1), (4999, 1)])
def test_windows_cut_from_blocks_are_the_signals_slices(window, hop):
    rng = np.random.default_rng()
    signal = rng.standard_normal((2, 5003)).astype(np.float32)
    cuts = np.cumsum(rng.integers(1, 900, 20))
    blocks = np.split(signal, cuts[cuts < signal.shape[1]], axis=1)
    pieces = list(windows.cut(iter(blocks), window, hop))
    assert len(pieces) == len(range(0, signal.shape[1] - window + 1, hop))
    assert all(np.array_equal(piece, signal[:, i * hop : i * hop + window]) for i, piece in enumerate(pieces))
    assert list(windows.cut(iter([signal[:, : window - 1]]), window, hop)) == []


def test_a_window_of_many_blocks_is_joined_once(monkeypatch):
    """Joined to the held samples at every block, a window of minutes was copied again at each of its blocks (2-3x
    its size at the peak): the blocks are joined once the window is complete."""
    joins, concatenate = [], np.concatenate
    monkeypatch.setattr(windows.np, "concatenate", lambda arrays, **kwargs: joins.append(len(arrays)) or
                        concatenate(arrays, **kwargs))
    signal = np.arange(2 * 5000, dtype=np.float32).reshape(2, 5000)
    pieces = list(windows.cut(iter(np.split(signal, 50, axis=1)), 1000, 1000))
    assert len(pieces) == 5
    assert all(np.array_equal(piece, signal[:, i * 1000 : (i + 1) * 1000]) for i, piece in enumerate(pieces))
    assert joins == [10] * 5


def test_each_window_is_encoded_as_a_signal_of_its_own(tmp_path, model_path, capsys):
    """Windows at several rates and channel counts, overlapping and not: each row is model.encode of its span (DC
    removed from it alone), frames the windows' rows in order; the tail shorter than a window is left out, and a
    file shorter than one window is skipped, saying so."""
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng()
    files = {"a.wav": (rng.uniform(-0.5, 0.5, 8000 * 5 + 313) + 0.2, 8000),
             "b.flac": (rng.uniform(-0.5, 0.5, (22050 * 3 + 17, 2)), 22050),
             "c.wav": (rng.uniform(-0.5, 0.5, 48000 * 2 + 1), 48000)}
    for name, (signal, rate) in files.items():
        soundfile.write(str(folder / name), signal, rate, subtype="FLOAT" if name.endswith(".wav") else "PCM_24")
    soundfile.write(str(folder / "short.wav"), rng.uniform(-0.5, 0.5, 1100), 1000)
    out = tmp_path / "w.npz"
    assert run(folder, "--model", model_path, "--out", out, "--frames", "--window", "1.5", "--hop", "0.7") == 0
    printed = capsys.readouterr().out
    assert f"skipped {folder / 'short.wav'}: shorter than one window (1.100 s < 1.5 s)" in printed
    written = read_embeddings(out)
    assert written["window"] == (1.5, 0.7) and written["model"].startswith("window1.5s-hop0.7s-")
    model = echo.load(model_path)
    for name, (_, rate) in files.items():
        data, _ = soundfile.read(str(folder / name), dtype="float32", always_2d=True)
        signal = torch.from_numpy(np.ascontiguousarray(data.T))
        width, step = round(1.5 * rate), round(0.7 * rate)
        row = written["files"][str(folder / name)]
        count = (signal.shape[1] - width) // step + 1
        assert row["utterance"].shape[0] == count and np.allclose(row["starts"], np.arange(count) * step / rate)
        frames = []
        for i in range(count):
            utterance, rows = model.encode(signal[:, i * step : i * step + width], rate)
            assert rel_err(row["utterance"][i], utterance) < 1e-5, (name, i)
            frames.append(rows)
        assert rel_err(row["frames"], torch.cat(frames)) < 1e-5
    windows_written = sum(len(row["utterance"]) for row in written["files"].values())
    assert f"wrote {out}: 3 files in {windows_written} windows (0 reused from an earlier run), 1 skipped" in printed


def test_a_long_file_is_windowed_a_block_and_a_group_at_a_time(tmp_path, model_path, monkeypatch):
    """The file is decoded a block at a time and its windows encoded a group at a time (WINDOW_GROUP samples): the
    same rows as in one go."""
    import echo.encode_files as command
    from echo.eval import embed

    path = tmp_path / "long.flac"
    soundfile.write(str(path), np.random.default_rng().uniform(-0.5, 0.5, (16000 * 6 + 99, 2)), 16000)
    assert run(path, "--model", model_path, "--out", tmp_path / "whole.npz", "--window", "0.5", "--hop", "0.3") == 0
    calls, real = [], command._encode

    def counted(model, signals, rates, *args, **kwargs):
        calls.append(len(signals))
        return real(model, signals, rates, *args, **kwargs)

    monkeypatch.setattr(command, "_encode", counted)
    monkeypatch.setattr(command, "STREAM_BLOCK", 5001)
    monkeypatch.setattr(embed, "WINDOW_GROUP", 16000 * 4)  # 4 windows of 2 x 8000 samples
    assert run(path, "--model", model_path, "--out", tmp_path / "cut.npz", "--window", "0.5", "--hop", "0.3") == 0
    whole = read_embeddings(tmp_path / "whole.npz")["files"][str(path)]["utterance"]
    cut = read_embeddings(tmp_path / "cut.npz")["files"][str(path)]["utterance"]
    assert calls == [4] * (len(whole) // 4) + [len(whole) % 4] * (len(whole) % 4 > 0) and len(whole) == 19
    assert rel_err(cut, whole) < 1e-6


def test_the_windows_of_a_batchs_files_are_encoded_together(tmp_path, model_path, monkeypatch):
    """A call per file, of one window each (10 s clips in 10 s windows), ran at 0.6-0.8x the speed of whole files."""
    import echo.encode_files as command

    calls, real = [], command._encode
    monkeypatch.setattr(command, "_encode", lambda model, signals, *args, **kwargs: calls.append(len(signals)) or
                        real(model, signals, *args, **kwargs))
    rng = np.random.default_rng()
    for name in "abcd":
        soundfile.write(str(tmp_path / f"{name}.flac"), rng.uniform(-0.5, 0.5, 8000 + 17), 8000)
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "w.npz", "--window", "1", "--batch-files", "3") == 0
    assert calls == [3, 1]
    rows = read_embeddings(tmp_path / "w.npz")["files"]
    model = echo.load(model_path)
    for name in "abcd":
        signal, _ = soundfile.read(str(tmp_path / f"{name}.flac"), dtype="float32")
        assert rel_err(rows[str(tmp_path / f"{name}.flac")]["utterance"][0],
                       model.encode(torch.from_numpy(signal[:8000]), 8000)[0]) < 1e-5


def test_a_windowed_run_resumes_and_other_windows_replace_it_with_a_note(tmp_path, model_path, capsys):
    soundfile.write(str(tmp_path / "a.flac"), np.random.uniform(-0.5, 0.5, 16000 * 3), 16000)
    out = tmp_path / "w.npz"
    assert run(tmp_path / "a.flac", "--model", model_path, "--out", out, "--window", "1") == 0
    first = read_embeddings(out)["files"][str(tmp_path / "a.flac")]["utterance"]
    capsys.readouterr()
    assert run(tmp_path / "a.flac", "--model", model_path, "--out", out, "--window", "1") == 0
    assert "left w.npz as it was" in capsys.readouterr().out.replace(str(tmp_path) + "/", "")
    assert run(tmp_path / "a.flac", "--model", model_path, "--out", out, "--window", "1", "--hop", "0.5") == 0
    printed = capsys.readouterr().out
    assert "encoded by another model or dtype, or with other windows (window1.0s-hop1.0s-" in printed
    again = read_embeddings(out)
    assert again["window"] == (1.0, 0.5) and len(again["files"][str(tmp_path / "a.flac")]["utterance"]) == 5
    assert run(tmp_path / "a.flac", "--model", model_path, "--out", out) == 0  # whole again: a vector
    whole = read_embeddings(out)
    assert whole["window"] is None and whole["files"][str(tmp_path / "a.flac")]["utterance"].shape == first.shape[1:]


def test_windowed_rows_round_trip_through_parquet(tmp_path, model_path):
    pytest.importorskip("pyarrow")
    soundfile.write(str(tmp_path / "a.flac"), np.random.uniform(-0.5, 0.5, (16000 * 3, 2)), 16000)
    for suffix in (".npz", ".parquet"):
        assert run(tmp_path / "a.flac", "--model", model_path, "--out", tmp_path / f"w{suffix}", "--window", "1.2",
                   "--hop", "0.9", "--frames") == 0
    npz, parquet = (read_embeddings(tmp_path / f"w{suffix}") for suffix in (".npz", ".parquet"))
    assert npz["window"] == parquet["window"] == (1.2, 0.9)
    for name in ("utterance", "frames", "starts"):
        assert np.array_equal(npz["files"][str(tmp_path / "a.flac")][name],
                              parquet["files"][str(tmp_path / "a.flac")][name]), name


def test_a_window_with_bad_samples_fails_its_file_naming_the_window(tmp_path, model_path, capsys):
    signal = np.random.uniform(-0.5, 0.5, 16000 * 3)
    signal[16000 * 2 + 5] = np.nan
    soundfile.write(str(tmp_path / "nan.wav"), signal, 16000, subtype="FLOAT")
    assert run(tmp_path / "nan.wav", "--model", model_path, "--out", tmp_path / "w.npz", "--window", "1") == 1
    assert f"skipped {tmp_path / 'nan.wav'}: window 2 (from 2.000 s): it contains 1 NaN or Inf sample(s), the " \
        f"first at index 5" in capsys.readouterr().out


def test_a_file_of_windows_all_nan_is_skipped_and_the_run_goes_on(tmp_path, model_path, capsys):
    """Every window of the group fails alike, together and each alone: the file's samples, not a failing device."""
    soundfile.write(str(tmp_path / "nan.wav"), np.full(16000 * 3, np.nan), 16000, subtype="FLOAT")
    soundfile.write(str(tmp_path / "a.flac"), np.random.uniform(-0.5, 0.5, 16000 * 2), 16000)
    out = tmp_path / "w.npz"
    assert run(tmp_path / "nan.wav", tmp_path / "a.flac", "--model", model_path, "--out", out, "--window", "1") == 0
    assert f"skipped {tmp_path / 'nan.wav'}: window 0 (from 0.000 s): it contains 16000 NaN" in \
        capsys.readouterr().out
    assert list(read_embeddings(out)["files"]) == [str(tmp_path / "a.flac")]


@pytest.mark.parametrize("argv,said", [
    (["--hop", "1"], "--hop needs --window"),
    (["--window", "0.01"], "--window, --hop: a window must be at least 0.025 s (one frame)"),
    (["--window", "1", "--hop", "0"], "its hop over 0 s"),
    (["--window", "inf"], "both at most 1e+09 s; got inf and inf"),
    (["--window", "1e305"], "both at most 1e+09 s"),  # its samples were inf: an OverflowError's traceback
    (["--window", "1", "--hop", "1e20"], "both at most 1e+09 s"),  # its output's starts overflowed int64 unread
    (["--window", "nan"], "a window must be at least"),
])
def test_window_arguments_are_checked(tmp_path, model_path, capsys, argv, said):
    soundfile.write(str(tmp_path / "a.flac"), np.random.uniform(-0.5, 0.5, 16000), 16000)
    assert run(tmp_path / "a.flac", "--model", model_path, "--out", tmp_path / "w.npz", *argv) != 0
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("window,hop", [(0.025, 1e-05), (1e-3, 5e-05), (0.1 + 0.2, 0.1 + 0.2), (3.0, 1e20)])
def test_the_windows_said_in_a_model_key_read_back(window, hop):
    """A hop under 1e-4 s is written 1e-05, whose "-" is also the key's separator."""
    for model_key in ("0123abcd", "bfloat16-0123abcd"):
        assert windows.parsed(f"{windows.label(window, hop)}-{model_key}") == (window, hop)
    assert windows.parsed("bfloat16-0123abcd") is None


def test_an_output_of_a_hop_under_a_ten_thousandth_of_a_second_is_read_and_resumed(tmp_path, model_path, capsys):
    soundfile.write(str(tmp_path / "a.flac"), np.random.uniform(-0.5, 0.5, 800), 16000)
    out = tmp_path / "w.npz"
    for _ in range(2):
        assert run(tmp_path / "a.flac", "--model", model_path, "--out", out, "--window", "0.025", "--hop", "5e-05") == 0
    assert "left w.npz as it was" in capsys.readouterr().out.replace(str(tmp_path) + "/", "")
    written = read_embeddings(out)
    assert written["window"] == (0.025, 5e-05) and len(written["files"][str(tmp_path / "a.flac")]["utterance"]) == 401
    edited = dict(np.load(out), model=np.array("windowXs-hop1s-0123abcd"))  # begins as windows do, says none
    np.savez(tmp_path / "edited.npz", **edited)
    with pytest.raises(ValueError, match="edited.npz is not an output of echo encode"):
        read_embeddings(tmp_path / "edited.npz")


@pytest.mark.parametrize("interrupted,between", [
    ([], ["--window", "1"]),
    (["--window", "1"], []),
    (["--window", "1", "--hop", "0.5"], ["--window", "1"]),
])
def test_an_interrupted_run_in_other_windows_keeps_its_work_through_a_finished_run_to_the_same_out(
        tmp_path, model_path, capsys, monkeypatch, interrupted, between):
    """A finished run dropped the saved batches holding its files in other windows (or whole), taken for the files'
    old content: the interrupted run's command started over, unlike one in another dtype's."""
    import echo.encode_files as command

    paths = []
    for name in ("a.flac", "b.flac"):
        soundfile.write(str(tmp_path / name), np.random.uniform(-0.5, 0.5, 16000 * 2), 16000)
        paths.append(tmp_path / name)
    common = (*paths, "--model", model_path, "--out", tmp_path / "w.npz", "--batch-files", "1")
    real = interrupt_call(monkeypatch, command, "_encode", 2)
    assert run(*common, *interrupted) == 130  # a.flac's batch was saved, b.flac's was not
    monkeypatch.setattr(command, "_encode", real)
    assert run(*common, *between) == 0
    assert f"kept {tmp_path / 'w.npz.parts'}" in capsys.readouterr().out
    assert run(*common, *interrupted) == 0
    assert "2 files" in (printed := capsys.readouterr().out) and "(1 reused from an earlier run)" in printed


def test_a_file_shorter_than_one_window_is_skipped_undecoded(tmp_path, model_path, capsys, monkeypatch):
    """Its header says its length: decoded, all of it was held (twice at a block's joining) only to be skipped."""
    import echo.encode_files as command

    soundfile.write(str(tmp_path / "a.flac"), np.random.uniform(-0.5, 0.5, 16000 * 2), 16000)
    decoded, real = [], command.audio_blocks

    def counted(*args, **kwargs):
        rate, channels, length, blocks = real(*args, **kwargs)
        return rate, channels, length, (decoded.append(block.shape[1]) or block for block in blocks)

    monkeypatch.setattr(command, "audio_blocks", counted)
    assert run(tmp_path / "a.flac", "--model", model_path, "--out", tmp_path / "w.npz", "--window", "5") == 1
    assert f"skipped {tmp_path / 'a.flac'}: shorter than one window (2.000 s < 5 s)" in capsys.readouterr().out
    assert decoded == []


def test_an_empty_file_is_said_to_be_one_with_windows_too(tmp_path, model_path, capsys):
    """Windowed files are read a block at a time, which named an empty file by libsndfile's words ("Format not
    recognised"), where a whole file's reading says what it is."""
    (tmp_path / "empty.wav").write_bytes(b"")
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 16000), 16000)
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "w.npz", "--window", "0.5") == 0
    assert f"skipped {tmp_path / 'empty.wav'}: empty file (0 bytes)" in capsys.readouterr().out
