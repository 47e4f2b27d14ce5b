"""`python -m echo encode`: files and folders to embeddings, checked against EchoModel.encode per file."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import echo
from echo import cli, host_memory
from echo.data import bundled
from echo.encode_files import read_embeddings
from conftest import random_model, rel_err

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
    assert not (tmp_path / "out" / "emb.npz.parts").exists() and not (tmp_path / "out" / "emb.npz.tmp").exists()


def test_rerun_and_interrupted_run_resume(tmp_path, model_path, capsys, monkeypatch):
    good = write_corpus(tmp_path / "data")
    out = tmp_path / "emb.npz"
    assert run(tmp_path / "data", "--model", model_path, "--out", out) == 0
    first = read_embeddings(out)
    soundfile.write(str(tmp_path / "data" / "new.wav"), np.random.uniform(-0.5, 0.5, 5000), 22050)
    capsys.readouterr()
    assert run(tmp_path / "data", "--model", model_path, "--out", out) == 0
    assert "5 files (4 reused from an earlier run)" in capsys.readouterr().out
    second = read_embeddings(out)
    for path in good:
        assert np.array_equal(second["files"][str(path)]["utterance"], first["files"][str(path)]["utterance"])

    # an interrupted run keeps its finished batches; the next run encodes only the rest
    import echo.encode_files as command

    out2, calls, real = tmp_path / "emb2.npz", [], command._encode_batch

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(command, "_encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "data", "--model", model_path, "--out", out2, "--batch-files", "2")
    assert not out2.exists() and any((tmp_path / "emb2.npz.parts").rglob("*.safetensors"))
    monkeypatch.setattr(command, "_encode_batch", real)
    capsys.readouterr()
    assert run(tmp_path / "data", "--model", model_path, "--out", out2, "--batch-files", "2") == 0
    # the finished first batch held a.wav and broken.wav (sorted), so one embedding was kept
    assert "5 files (1 reused from an earlier run)" in capsys.readouterr().out


def test_a_rerun_in_another_dtype_encodes_again(tmp_path, model_path, capsys):
    """bf16 embeddings differ from float32 ones by ~5e-3: a float32 run must not take them from a bf16 run's
    output or shards, and the other way round."""
    soundfile.write(str(tmp_path / "a.wav"), np.random.uniform(-0.5, 0.5, 6000), 16000)
    out = tmp_path / "emb.npz"
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", out, "--dtype", "bfloat16") == 0
    capsys.readouterr()
    assert run(tmp_path / "a.wav", "--model", model_path, "--out", out) == 0
    assert "1 files (0 reused from an earlier run)" in capsys.readouterr().out
    ref = reference(echo.load(model_path), tmp_path / "a.wav")[0]
    assert rel_err(torch.from_numpy(read_embeddings(out)["files"][str(tmp_path / "a.wav")]["utterance"]), ref) < 1e-5


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


def test_parquet_rows_match_npz(tmp_path, model_path):
    pytest.importorskip("pyarrow")
    write_corpus(tmp_path / "data")
    for name in ("e.npz", "e.parquet"):
        assert run(tmp_path / "data", "--model", model_path, "--out", tmp_path / name, "--frames") == 0
    npz, parquet = read_embeddings(tmp_path / "e.npz"), read_embeddings(tmp_path / "e.parquet")
    assert parquet["model"] == npz["model"] and set(parquet["files"]) == set(npz["files"])
    for path, row in npz["files"].items():
        assert np.array_equal(parquet["files"][path]["utterance"], row["utterance"])
        assert np.array_equal(parquet["files"][path]["frames"], row["frames"])


def test_no_path_encodes_the_bundled_samples_with_a_kept_heap_on_the_cpu(tmp_path, model_path, monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append("kept"))
    assert run("--model", model_path, "--out", tmp_path / "samples.npz", "--device", "cpu") == 0
    assert calls == ["kept"]
    files = read_embeddings(tmp_path / "samples.npz")["files"]
    assert {Path(p).stem for p in files} == set(bundled.names())
    assert len({row["sample_rate"] for row in files.values()}) >= 3


def test_missing_soundfile_stops_with_the_install_hint(tmp_path, model_path, capsys, monkeypatch):
    write_corpus(tmp_path / "data")
    monkeypatch.setitem(sys.modules, "soundfile", None)
    assert run(tmp_path / "data", "--model", model_path, "--out", tmp_path / "e.npz") == 2
    assert "needs the package 'soundfile'" in capsys.readouterr().err and not (tmp_path / "e.npz").exists()


def test_bad_arguments(tmp_path, model_path, capsys):
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "e.txt") == 2
    assert "--out must end in .npz or .parquet" in capsys.readouterr().err
    assert run(tmp_path / "nothing-here", "--model", model_path, "--out", tmp_path / "e.npz") == 2
    assert "no audio files" in capsys.readouterr().err
    # refused before any file is encoded
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "e.npz", "--max-tokens", "0") == 2
    assert "max_tokens must be a positive whole number of tokens, got 0" in capsys.readouterr().err
    (tmp_path / "folder.npz").mkdir()
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "folder.npz") == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert run(tmp_path, "--model", model_path, "--out", tmp_path / "file" / "e.npz") == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("name,value,message", [
    ("ECHO_BACKEND", "csrc", "op tokens has no 'csrc' backend"),  # skipped every file, wrote an empty output
    ("ECHO_BACKEND", "bogus", "ECHO_BACKEND=bogus: unknown backend"),
    ("ECHO_BACKEND_ATTENTON", "torch", "ECHO_BACKEND_ATTENTON: no such op"),  # was ignored
])
def test_a_backend_setting_that_cannot_run_stops_the_command_before_any_file(tmp_path, model_path, capsys,
                                                                             monkeypatch, name, value, message):
    write_corpus(tmp_path / "data")
    monkeypatch.setenv(name, value)
    assert run(tmp_path / "data", "--model", model_path, "--out", tmp_path / "e.npz") == 2
    assert message in capsys.readouterr().err and not (tmp_path / "e.npz").exists()


def test_ranks_share_the_files_and_rank_0_merges(tmp_path, model_path):
    good = write_corpus(tmp_path / "data")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "emb.npz"
    root = Path(__file__).resolve().parents[1]
    ranks = []
    for rank in range(2):  # what torchrun --nproc-per-node 2 sets up
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(root)}
        ranks.append(subprocess.Popen([sys.executable, "-m", "echo", "encode", str(tmp_path / "data"), "--model",
                                       str(model_path), "--out", str(out), "--quiet", "--batch-files", "1",
                                       "--device", "cpu"], env=env, stdout=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=120)[0] for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], outputs
    assert "wrote" in outputs[0] and "wrote" not in outputs[1]
    # each rank reports the bad files it met; the summary counts both ranks' (broken.wav, short.flac)
    assert sum(output.count("skipped ") for output in outputs) == 2, outputs
    assert f"{len(good)} files (0 reused from an earlier run), 2 skipped" in outputs[0]
    assert set(read_embeddings(out)["files"]) == {str(p) for p in good}
