"""`python -m echo pretrain` given paths a user plausibly types: an empty one, "~", a folder for the manifest, a
corpus whose folder cannot hold the manifest."""
import logging

import pytest

pytest.importorskip("soundfile")
from pretrain_corpus import write_corpus  # noqa: E402
from test_pretrain_robustness import command  # noqa: E402

from echo import atomic, cli  # noqa: E402
from echo.pretrain import checkpoints, corpus  # noqa: E402
from echo.pretrain import command as pretrain_command  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "data", files=4)


@pytest.mark.parametrize("option", ["--data", "--out", "--manifest"])
def test_an_empty_path_is_refused_naming_its_option(tmp_path, monkeypatch, capsys, option):
    """`--out "$RUN"` with RUN unset named the current folder: the run wrote config.json, steps.csv, checkpoints/
    and model.safetensors there (and `--data ""` trained on whatever audio lay under it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pretrain_command, "train", lambda *args, **kwargs: pytest.fail("the work started"))
    with pytest.raises(SystemExit) as stopped:
        cli.main([*command(tmp_path / "data", tmp_path / "run"), option, ""])
    assert stopped.value.code == 2
    assert f"argument {option}: an empty path; give a file or folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_paths_starting_with_a_tilde_are_the_users_home(tmp_path, monkeypatch):
    """`--out=~/runs/tiny` (no shell expands "~" after "=") or a quoted "~/runs/tiny" made a folder named "~" in the
    current folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    given = []
    monkeypatch.setattr(pretrain_command, "train", lambda config, **kwargs: given.append(config))
    assert cli.main([*command("~/data", "~/runs/tiny"), "--manifest=~/index.csv"]) == 0
    config = given[0]
    assert (config.data, config.out, config.manifest) == (
        str(tmp_path / "home" / "data"), str(tmp_path / "home" / "runs" / "tiny"), str(tmp_path / "home" / "index.csv"))


def test_a_manifest_path_naming_a_folder_is_refused_before_indexing(data, tmp_path, monkeypatch, capsys):
    """`--manifest DIR` indexed the whole corpus (hours) and then failed: "[Errno 21] Is a directory", exit 1."""
    monkeypatch.setattr(corpus, "probe", lambda *args: pytest.fail("the data was indexed"))
    folder = tmp_path / "manifests"
    folder.mkdir()
    assert cli.main([*command(data, tmp_path / "run"), "--manifest", str(folder)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --manifest {folder} is a folder: name the file, e.g. {folder / corpus.MANIFEST_NAME}")
    assert not (tmp_path / "run").exists()


def test_a_corpus_folder_that_cannot_hold_the_manifest_trains_without_it(tmp_path, monkeypatch, caplog):
    """A read-only corpus (a shared mount) failed once every file had been opened, on the manifest's temporary:
    "error: [Errno 13] Permission denied: 'DATA/.echo_manifest.csv.PID.tmp'", exit 1, no word of --manifest."""
    data = write_corpus(tmp_path / "data", files=4)
    real_write_csv = atomic.write_csv

    def read_only_corpus(path, *args):
        if path.parent == data:
            raise PermissionError(13, "Permission denied", f"{path}.1.tmp")
        return real_write_csv(path, *args)

    monkeypatch.setattr(atomic, "write_csv", read_only_corpus)
    monkeypatch.setattr(corpus, "MANIFEST_SAVE_SECONDS", 0.0)  # the saves as it goes are tried (once) too
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="echo.pretrain"):
        assert cli.main([*command(data, run), "--steps", "2"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert warnings == [f"the manifest {data / corpus.MANIFEST_NAME} cannot be written ([Errno 13] Permission denied: "
                        f"'{data / corpus.MANIFEST_NAME}.1.tmp'): the folder is indexed without it, so the next start "
                        "opens every file again; give --manifest a path that can be written to keep it"]
    assert checkpoints.load_latest(run / "checkpoints")["step"] == 2 and (run / "model.safetensors").is_file()
    assert not (data / corpus.MANIFEST_NAME).exists()


@pytest.mark.parametrize("under", [False, True])
def test_an_out_through_a_link_whose_target_is_gone_is_refused_before_indexing(data, tmp_path, monkeypatch, capsys,
                                                                               under):
    """`--out runs/tiny` with runs a link to an unmounted disk indexed the corpus, then failed on making the run
    folder: "error: [Errno 17] File exists: 'runs'", exit 1."""
    monkeypatch.setattr(corpus, "probe", lambda *args: pytest.fail("the data was indexed"))
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "unmounted")
    out = link / "tiny" if under else link
    assert cli.main(command(data, out)) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out} cannot be written: {link} is a link to {tmp_path / 'unmounted'}, which does not exist")
    assert not (tmp_path / "unmounted").exists()


def test_a_folder_without_audio_files_names_the_formats_read(tmp_path, capsys):
    """A folder of M4As said "no usable audio under DATA: 0 files, skipped {'unreadable': 0, 'too short': 0}":
    neither that its files were not audio to the command nor which files are."""
    from echo.data import AUDIO_SUFFIXES

    data = tmp_path / "data"
    data.mkdir()
    (data / "pump.m4a").write_bytes(b"\0\0\0\x20ftypM4A not read")
    assert cli.main(command(data, tmp_path / "run")) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: no audio files under {data}: pretraining reads {', '.join(AUDIO_SUFFIXES)} files")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options,said", [
    (["--tokens-per-batch", "0"], "error: --tokens-per-batch 0 is smaller than one clip can take"),
    (["--save-every", "0", "--log-every", "0"],
     "error: --save-every must be positive, got 0; --log-every must be positive, got 0"),
    (["--min-seconds", "0.001"], "error: --min-seconds must be at least"),
    (["--heads", "5"], "error: invalid ECHO config: --dim=64 must be even and divisible by --heads=5"),
])
def test_a_bad_option_is_named_as_the_option_not_the_config_field(tmp_path, capsys, options, said):
    """The command line said tokens_per_batch, save_every, min_seconds: the config's names, which no one typed."""
    assert cli.main([*command(tmp_path, tmp_path / "run"), *options]) == 2
    assert capsys.readouterr().err.startswith(said)
    assert not (tmp_path / "run").exists()


def test_export_only_needs_no_data_and_training_does(tmp_path, capsys):
    """--export-only reads the run's checkpoints alone: --data was still demanded, and any folder did."""
    assert cli.main(["pretrain", "--out", str(tmp_path / "run"), "--export-only"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert cli.main(["pretrain", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "error: --data is needed to train (only --export-only goes without it)"
