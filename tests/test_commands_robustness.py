"""What `python -m echo pretrain-shards` says when it is stopped: which finished shards it kept, and that the
same command resumes (the encode command's stops are tested in test_encode_files.py)."""
import pytest

from echo import cli
from echo.pretrain import shards
from pretrain_corpus import write_corpus
from test_cli import interrupt_call


@pytest.mark.parametrize("stop_at, message", [
    (1, "no shard was finished, so none was kept; the same command starts again"),
    (4, "2 finished shards are kept in {out} (shard-000000.tar to shard-000001.tar); the same command writes only "
        "the missing ones")])
def test_an_interrupted_shard_write_says_which_shards_it_kept_and_that_the_same_command_resumes(
        tmp_path, monkeypatch, capsys, stop_at, message):
    """Ctrl-C printed a bare "interrupted": whether any shard was kept, and that the same command writes only the
    missing ones, was not said."""
    pytest.importorskip("webdataset")
    root = write_corpus(tmp_path / "data", files=5)
    out = tmp_path / "shards"
    real = interrupt_call(monkeypatch, shards, "shard_sample", stop_at + 1)
    argv = ["pretrain-shards", "--data", str(root), "--out", str(out), "--per-shard", "2"]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.splitlines()[-1] == f"interrupted: {message.format(out=out)}"
    monkeypatch.setattr(shards, "shard_sample", real)
    assert cli.main(argv) == 0
    resumed = stop_at // 2
    assert capsys.readouterr().out.startswith(
        f"wrote {3 - resumed} shard{'s' * (resumed < 2)} ({resumed} more by an earlier run) to " if resumed
        else "wrote 3 shards to ")
    assert cli.main(argv) == 0  # a rerun writes nothing, and says so rather than "wrote 3 shards"
    assert capsys.readouterr().out.startswith(f"nothing to do: every shard in {out} (3) was written by an earlier run")


def test_a_folder_without_audio_leaves_no_shard_folder(tmp_path, capsys):
    """An empty --data was refused, after --out had been made, empty, to check it could be written."""
    (tmp_path / "data").mkdir()
    out = tmp_path / "new" / "shards"
    assert cli.main(["pretrain-shards", "--data", str(tmp_path / "data"), "--out", str(out)]) == 2
    assert "no audio files under" in capsys.readouterr().err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_minimum_length_that_is_not_one_is_refused(tmp_path, capsys, value):
    """-1 printed "skipping 1 file shorter than -1 s" and NaN was taken; pretraining let NaN through as well."""
    from echo.pretrain.trainer import PretrainConfig

    argv = ["pretrain-shards", "--data", str(tmp_path), "--out", str(tmp_path / "shards"), "--min-seconds", value]
    assert cli.main(argv) == 2
    assert f"--min-seconds must be 0 or more, got {float(value)}" in capsys.readouterr().err
    if value == "nan":
        with pytest.raises(ValueError, match="min_seconds must be at least"):
            PretrainConfig(data="unused", out=str(tmp_path / "run"), min_seconds=float(value))
