"""The recipe scripts (scripts/): rebuilding a corpus into an earlier one, resuming, failing with a message
(missing tools, bad arguments, unwritable outputs), and the shell recipes' argument handling."""
import csv
import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch

import echo
from echo import demo
from echo.data import debian
from test_default_model import fake_run_to_export, import_script

REPO = Path(__file__).resolve().parents[1]
build_corpus = import_script("build_corpus")
select = import_script("select_checkpoint")
PROGRESS = build_corpus.tqdm


def files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_resumes_as_one_build(build, out: Path, count: int, reused: int, capsys) -> None:
    """The same command finishes the interrupted build `out`, taking `reused` files from before, and it then
    holds what one uninterrupted build writes."""
    capsys.readouterr()
    build(out, count)
    assert f"({reused} from an earlier run)" in capsys.readouterr().out
    build(out.parent / "whole", count)
    assert files(out) == files(out.parent / "whole")


@pytest.fixture
def synthetic_only(tmp_path, monkeypatch):
    """build_corpus with no package (nothing fetched): the synthetic files alone. Returns a build function."""
    monkeypatch.setattr(build_corpus.debian, "fetch", lambda package, cache: tmp_path / "no-package")
    monkeypatch.setattr(build_corpus, "_package_items", lambda package, root, split: [])

    def build(out, count, seed=0, jobs=1):
        return build_corpus.main(["--out", str(out), "--synthetic", str(count), "--seed", str(seed),
                                  "--jobs", str(jobs), "--quiet"])
    return build


def test_a_rebuild_reuses_only_files_of_its_own_sources_and_removes_the_earlier_builds_others(tmp_path,
                                                                                              synthetic_only):
    """Seed 0 and seed 1 both name a file machine_00004_inner.wav (44.1 kHz): the seed-1 build must not take
    the seed-0 one, nor leave seed 0's sixth file (which no data list would credit) for pretraining."""
    synthetic_only(tmp_path / "fresh", 5, seed=1)
    synthetic_only(tmp_path / "rebuilt", 6, seed=0, jobs=2)
    synthetic_only(tmp_path / "rebuilt", 5, seed=1, jobs=2)
    assert files(tmp_path / "rebuilt") == files(tmp_path / "fresh")


def test_a_damaged_or_foreign_file_is_not_taken_for_a_finished_one(tmp_path, synthetic_only, capsys):
    out = tmp_path / "corpus"
    synthetic_only(out, 4)
    built = files(out)
    first, second = sorted(out.rglob("*.wav"))[:2]
    first.write_bytes(b"")
    second.write_bytes(second.read_bytes()[:200])  # a torn write of an older echo
    (out / "pretrain" / "x.wav.999999999.tmp").write_bytes(b"left by a killed writer")
    (out / "notes.2024.tmp").write_text("the user's own, in the corpus folder")  # no temporary of the build's
    capsys.readouterr()
    synthetic_only(out, 4)
    assert "(2 from an earlier run)" in capsys.readouterr().out
    assert (out / "notes.2024.tmp").exists()
    (out / "notes.2024.tmp").unlink()
    assert files(out) == built

    (out / "pretrain" / "mine.wav").write_bytes(built[str(first.relative_to(out))])
    with pytest.raises(SystemExit, match="1 audio file that no build of this script listed.*pretrain/mine.wav"):
        synthetic_only(out, 4)


def test_an_interrupted_build_resumes_from_the_files_it_finished(tmp_path, synthetic_only, monkeypatch, capsys):
    out = tmp_path / "corpus"
    waveform = build_corpus._waveform
    made = []

    def interrupted_after_three(source):
        if len(made) == 3:
            raise KeyboardInterrupt
        made.append(source)
        return waveform(source)
    monkeypatch.setattr(build_corpus, "_waveform", interrupted_after_three)
    with pytest.raises(SystemExit, match="interrupted; the same command resumes"):
        synthetic_only(out, 5)
    assert not (out / "datalist.csv").exists()  # the corpus is listed only once it is whole
    monkeypatch.setattr(build_corpus, "_waveform", waveform)
    assert_resumes_as_one_build(synthetic_only, out, 5, 3, capsys)


def test_a_build_interrupted_while_removing_the_earlier_builds_files_resumes(tmp_path, synthetic_only,
                                                                              monkeypatch):
    out = tmp_path / "corpus"
    synthetic_only(out, 6, seed=0)
    unlink = Path.unlink

    def interrupted(path, missing_ok=False):
        if "machine_00005" in path.name:  # seed 0's sixth file, which the seed-1 build removes
            raise KeyboardInterrupt
        return unlink(path, missing_ok=missing_ok)
    monkeypatch.setattr(Path, "unlink", interrupted)
    with pytest.raises(SystemExit, match="interrupted"):
        synthetic_only(out, 5, seed=1)
    monkeypatch.setattr(Path, "unlink", unlink)
    synthetic_only(out, 5, seed=1)
    synthetic_only(tmp_path / "fresh", 5, seed=1)
    assert files(out) == files(tmp_path / "fresh")


def interrupted_before_keeping_the_row_of_file(last: int):
    """A stand-in for build_corpus's progress bar that stops taking the files' outcomes with Ctrl-C once file
    number `last` (from 1) is written, before the build keeps its row, as when workers go on writing after it."""
    def interrupted(outcomes, **options):
        for number, outcome in enumerate(outcomes, 1):
            if number == last:
                raise KeyboardInterrupt
            yield outcome
    return interrupted


def test_the_corpus_progress_bar_ends_at_every_file(tmp_path, synthetic_only, capsys):
    """It stopped one file short (4/5) at the end of a build that wrote every file."""
    build_corpus.main(["--out", str(tmp_path / "corpus"), "--synthetic", "5", "--jobs", "1"])
    assert "5/5" in capsys.readouterr().err


def test_files_written_after_an_interruption_are_not_taken_for_strangers(tmp_path, synthetic_only, monkeypatch):
    """Workers go on writing after Ctrl-C; the parent never records those files. Here the third file is
    written and the interruption comes before its row is kept."""
    out = tmp_path / "corpus"
    monkeypatch.setattr(build_corpus, "tqdm", interrupted_before_keeping_the_row_of_file(3))
    with pytest.raises(SystemExit, match="interrupted"):
        synthetic_only(out, 5, seed=1)
    assert len(list(out.rglob("*.wav"))) == 3
    monkeypatch.setattr(build_corpus, "tqdm", PROGRESS)
    synthetic_only(out, 2, seed=0)  # other settings: the third file is removed, not refused
    assert len(list(out.rglob("*.wav"))) == 2


def test_a_file_finished_just_before_an_interruption_is_kept_not_written_again(tmp_path, synthetic_only,
                                                                              monkeypatch, capsys):
    """Its row never reached the partial data list, so the rerun did not know it as finished and wrote it again
    (hours of files, with workers finishing a chunk each after Ctrl-C)."""
    out = tmp_path / "corpus"
    monkeypatch.setattr(build_corpus, "tqdm", interrupted_before_keeping_the_row_of_file(1))
    with pytest.raises(SystemExit, match="interrupted"):
        synthetic_only(out, 3)
    [finished] = out.rglob("*.wav")
    before = (finished.stat().st_ino, finished.stat().st_mtime_ns)
    monkeypatch.setattr(build_corpus, "tqdm", PROGRESS)
    assert_resumes_as_one_build(synthetic_only, out, 3, 1, capsys)
    assert (finished.stat().st_ino, finished.stat().st_mtime_ns) == before


def test_a_file_cut_short_since_an_interruption_is_written_again(tmp_path, synthetic_only, monkeypatch, capsys):
    """A file whose row has no length yet is reused for being whole, not for reading at a recorded length."""
    out = tmp_path / "corpus"
    monkeypatch.setattr(build_corpus, "tqdm", interrupted_before_keeping_the_row_of_file(1))
    with pytest.raises(SystemExit, match="interrupted"):
        synthetic_only(out, 2)
    [finished] = out.rglob("*.wav")
    finished.write_bytes(finished.read_bytes()[:-2000])  # still reads, 1000 frames short
    monkeypatch.setattr(build_corpus, "tqdm", PROGRESS)
    assert_resumes_as_one_build(synthetic_only, out, 2, 0, capsys)


def test_an_unreadable_source_file_is_left_out_and_a_folder_named_like_a_temporary_is_kept(
        tmp_path, synthetic_only, monkeypatch, capsys):
    out = tmp_path / "corpus"
    (out / "pretrain" / "kit.wav.999999999.tmp").mkdir(parents=True)
    waveform = build_corpus._waveform

    def unreadable_second(source):
        if source[0] == 1:
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "package" / "b.wav"))
        return waveform(source)
    monkeypatch.setattr(build_corpus, "_waveform", unreadable_second)
    synthetic_only(out, 3)
    assert "2 files in" in capsys.readouterr().out
    assert (out / "pretrain" / "kit.wav.999999999.tmp").is_dir()


def test_the_corpus_stops_at_an_unwritable_output_before_any_work(tmp_path, synthetic_only, monkeypatch):
    (tmp_path / "a file").write_text("")
    monkeypatch.setattr(build_corpus, "_synthetic_items", lambda *args: pytest.fail("worked before the check"))
    with pytest.raises(SystemExit, match="corpus folder .*a file/corpus cannot be written"):
        synthetic_only(tmp_path / "a file" / "corpus", 3)


def test_the_corpus_refuses_synthetic_machines_held_out_for_the_demo_and_the_validation(tmp_path, monkeypatch,
                                                                                         capsys):
    """--seed 0 takes random_machine seeds 0 .. --synthetic - 1 (other seeds start above every held-out one): a
    count reaching demo.MACHINE_SEED would train the model on the machines it is then tested on."""
    held_out = [seed + index for seed in (demo.MACHINE_SEED, *select.VALIDATION_MACHINE_SEEDS)
                for index in range(len(demo.MACHINES))]
    assert [recipe[0] for _, recipe in build_corpus._synthetic_items(3, 0)] == [0, 1, 2]
    assert min(recipe[0] for _, recipe in build_corpus._synthetic_items(3, 1)) > max(held_out)
    assert min(held_out) == demo.MACHINE_SEED
    built = []
    monkeypatch.setattr(build_corpus, "_build", lambda args: built.append((args.synthetic, args.seed)) or 0)
    options = ["--out", str(tmp_path / "corpus")]
    with pytest.raises(SystemExit) as stopped:
        build_corpus.main([*options, "--synthetic", str(demo.MACHINE_SEED + 1)])
    assert stopped.value.code == 2 and built == []
    assert f"--synthetic must be at most {demo.MACHINE_SEED} with --seed 0" in capsys.readouterr().err
    assert build_corpus.main([*options, "--synthetic", str(demo.MACHINE_SEED)]) == 0
    assert build_corpus.main([*options, "--synthetic", str(demo.MACHINE_SEED + 1), "--seed", "1"]) == 0
    assert built == [(demo.MACHINE_SEED, 0), (demo.MACHINE_SEED + 1, 1)]


def test_a_full_disk_stops_the_corpus_instead_of_leaving_every_file_out(tmp_path, synthetic_only, monkeypatch):
    def full(path, waveform, rate):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(build_corpus, "write_wav", full)
    with pytest.raises(SystemExit, match="No space left on device; the same command resumes"):
        synthetic_only(tmp_path / "corpus", 3)


def fake_tool(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\nPATH=/usr/bin:/bin\n{script}\n")
    (folder / name).chmod(0o755)


def test_a_missing_tool_or_network_ends_the_scripts_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    fake_tool(tmp_path / "bin", "ls", "")  # the folder exists, without apt-get
    with pytest.raises(SystemExit, match="fetching openttd-opensfx: `apt-get` is not available"):
        build_corpus.main(["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    fetch_samples = import_script("fetch_samples")
    fake_tool(tmp_path / "bin", "apt-get", "echo 'E: Temporary failure resolving deb.debian.org' >&2; exit 100")
    with pytest.raises(SystemExit, match="`apt-get download openttd-opensfx` failed .*Temporary failure resolving"):
        fetch_samples.main(["--out", str(tmp_path / "samples"), "--cache", str(tmp_path / "cache")])


def test_a_torn_deb_is_named_for_deletion(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    fake_tool(tmp_path / "bin", "dpkg-deb", "echo 'dpkg-deb: error: unexpected end of file' >&2; exit 2")
    deb = tmp_path / "cache" / "debs" / "pkg_1_all.deb"
    deb.parent.mkdir(parents=True)
    deb.write_bytes(b"!<arch>\n")
    with pytest.raises(debian.FetchError, match=f"{deb} may be damaged .*delete it"):
        debian.fetch("pkg", tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache" / "extracted").iterdir()) == []


def test_side_by_side_fetches_each_work_in_their_own_folder_and_the_first_one_done_wins(tmp_path, monkeypatch):
    """apt-get downloads into a folder of its own; dpkg-deb extracts into one, and when another process has put
    its copy in place meanwhile (done here by the fake dpkg-deb), that copy is used."""
    cache = tmp_path / "cache"
    winner = cache / "extracted" / "pkg"
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    fake_tool(tmp_path / "bin", "apt-get", '[ "$(basename "$PWD")" != debs ] && echo deb > pkg_1_all.deb')
    fake_tool(tmp_path / "bin", "dpkg-deb", f'echo mine > "$3/sound"; mkdir -p "{winner}" && '
                                            f'echo theirs > "{winner}/sound" && echo pkg_1_all.deb > "{winner}/.extracted"')
    assert debian.fetch("pkg", cache) == winner
    assert (winner / "sound").read_text() == "theirs\n" and debian.version(winner) == "pkg_1_all.deb"
    assert sorted(p.name for p in cache.rglob("*")) == [".extracted", "debs", "extracted", "pkg", "pkg_1_all.deb",
                                                        "sound"]


def test_a_package_extracted_once_is_reused_without_apt_or_dpkg(tmp_path, monkeypatch):
    """A finished extraction is the package's files: a rebuild reads them again without downloading or extracting
    anything, also where the .deb was deleted since and no Debian tool is at hand."""
    root = tmp_path / "cache" / "extracted" / "pkg"
    root.mkdir(parents=True)
    (root / "sound").write_text("mine\n")
    (root / ".extracted").write_text("pkg_1_all.deb\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    fake_tool(tmp_path / "bin", "ls", "")  # the folder exists, without apt-get or dpkg-deb
    assert debian.fetch("pkg", tmp_path / "cache") == root
    assert (root / "sound").read_text() == "mine\n" and debian.version(root) == "pkg_1_all.deb"


def test_an_extraction_that_cannot_be_put_in_place_is_an_error(tmp_path, monkeypatch):
    """Where the extracted folder cannot be renamed into place (a file in the way) and no finished copy is there,
    the fetch fails: what lies at the place is not the package's files."""
    root = tmp_path / "cache" / "extracted" / "pkg"
    root.parent.mkdir(parents=True)
    root.write_text("a file in the way")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    fake_tool(tmp_path / "bin", "apt-get", 'echo deb > pkg_1_all.deb')
    fake_tool(tmp_path / "bin", "dpkg-deb", 'echo mine > "$3/sound"')
    with pytest.raises(OSError):
        debian.fetch("pkg", tmp_path / "cache")
    assert root.read_text() == "a file in the way" and sorted(p.name for p in root.parent.iterdir()) == ["pkg"]


def test_a_fetch_removes_dead_processes_folders_and_renames_a_half_extracted_root_before_deleting_it(
        tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    root = cache / "extracted" / "pkg"
    (root / "usr").mkdir(parents=True)  # half-extracted: no .extracted
    for left in (cache / "extracted" / "pkg.999999999.tmp", cache / "debs" / "pkg.999999999.tmp"):
        (left / "sound").mkdir(parents=True)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    fake_tool(tmp_path / "bin", "apt-get", 'echo deb > pkg_1_all.deb')
    fake_tool(tmp_path / "bin", "dpkg-deb", 'echo mine > "$3/sound"')
    removed = []
    rmtree = debian.shutil.rmtree
    monkeypatch.setattr(debian.shutil, "rmtree",
                        lambda path, **options: (removed.append(path), rmtree(path, **options)))
    assert debian.fetch("pkg", cache) == root and (root / "sound").read_text() == "mine\n"
    assert root not in removed  # another process's finished copy may be there by the time it would be deleted
    assert sorted(p.name for p in cache.rglob("*")) == [".extracted", "debs", "extracted", "pkg", "pkg_1_all.deb",
                                                        "sound"]


def write_checkpoints(run: Path, steps) -> None:
    (run / "checkpoints").mkdir(parents=True)
    for step in steps:
        (run / "checkpoints" / f"step-{step:09d}.pt").write_bytes(b"")


def test_select_checkpoint_keeps_scores_as_it_goes_and_a_rerun_scores_only_the_rest(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    write_checkpoints(run, (2, 4, 6))
    scored = []

    def score(path, which):
        step = int(path.stem.split("-")[1])
        if step == 6 and not scored.count("allow 6"):
            raise KeyboardInterrupt
        scored.append(step)
        return {"run": path.parents[1], "step": step, "validation AUC": step / 10, "validation pAUC": 0.5,
                "embedding spread": 0.25}
    monkeypatch.setattr(select, "_score_checkpoint", score)
    monkeypatch.setattr(select.demo, "build_task", lambda *args, **kwargs: None)
    table = tmp_path / "new folder" / "validation.csv"
    options = [str(run), "--csv", str(table), "--jobs", "1", "--print-run"]
    with pytest.raises(KeyboardInterrupt):
        select.main(options)
    with open(table, newline="") as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == ["2", "4"]
    scored[:] = ["allow 6"]
    assert select.main(options) == 0
    assert scored == ["allow 6", 6] and capsys.readouterr().out.strip() == f"{run} 6"
    assert select.main([*options, "--seed", "5"]) == 0  # another task: every checkpoint again
    assert scored[2:] == [2, 4, 6]


def test_select_checkpoint_progress_bar_ends_at_every_checkpoint(tmp_path, monkeypatch, capsys):
    """It stopped one checkpoint short (1/2) once both were scored."""
    write_checkpoints(tmp_path / "run", (2, 4))
    monkeypatch.setattr(select, "_score_checkpoint", lambda path, which: {
        "run": path.parents[1], "step": int(path.stem.split("-")[1]), "validation AUC": 0.5,
        "validation pAUC": 0.5, "embedding spread": 0.25})
    monkeypatch.setattr(select.demo, "build_task", lambda *args, **kwargs: None)
    assert select.main([str(tmp_path / "run"), "--jobs", "1"]) == 0
    assert "2/2" in capsys.readouterr().err


def test_select_checkpoint_says_it_scores_the_baselines_before_the_table(tmp_path, monkeypatch, capsys):
    """The baselines took a checkpoint's time or two after the table's header, with nothing said."""
    write_checkpoints(tmp_path / "run", (2,))
    (tmp_path / "run" / "config.json").write_text('{"data": "unused", "out": "unused"}')
    monkeypatch.setattr(select, "_score_checkpoint", lambda path, which: {
        "run": path.parents[1], "step": 2, "validation AUC": 0.5, "validation pAUC": 0.5, "embedding spread": 0.25})
    monkeypatch.setattr(select.demo, "build_task", lambda *args, **kwargs: None)
    said = []
    monkeypatch.setattr(select, "baselines", lambda *args: said.append(capsys.readouterr().err) or [])
    assert select.main([str(tmp_path / "run"), "--jobs", "1", "--baselines"]) == 0
    assert "scoring random weights and the log-spectrogram baseline" in said[0] and "validation AUC" not in said[0]
    assert "validation AUC" in capsys.readouterr().err


def test_select_checkpoint_baselines_of_an_init_run_score_the_model_it_started_from(tmp_path, monkeypatch):
    """An --init run's checkpoints were shown against random weights only, which they beat from step 0: the model
    the run started from is the baseline that says whether the continued pretraining helped."""
    config = echo.EchoConfig.preset("tiny", dim=64, depth=2, heads=1)
    start = echo.save(echo.EchoModel(config), tmp_path / "start.safetensors")
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # the script's own folder, where it imports evaluate_default
    scored_models = []
    monkeypatch.setattr(select, "encoder", lambda model: model)
    monkeypatch.setattr(select, "scored", lambda embed, tasks: scored_models.append(embed) or {})
    rows = select.baselines(config, [], str(start))
    assert [row["step"] for row in rows] == ["random weights", f"--init {start}", "log-spectrogram"]
    weights = echo.load(start).state_dict()
    assert all(torch.equal(value, weights[key]) for key, value in scored_models[1].state_dict().items())
    start.unlink()  # moved since the run began: said, and the other rows are still scored
    assert [row["step"] for row in select.baselines(config, [], str(start))] == ["random weights", "log-spectrogram"]


def test_select_checkpoint_interrupted_from_the_command_line_says_what_is_kept(tmp_path, monkeypatch, capsys):
    write_checkpoints(tmp_path / "run", (2,))
    monkeypatch.setattr(select, "_score_checkpoint", lambda path, which: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(select.demo, "build_task", lambda *args, **kwargs: None)
    assert select.cli([str(tmp_path / "run"), "--jobs", "1"]) == 130
    assert "the same command scores the rest" in capsys.readouterr().err


def test_select_checkpoint_names_a_run_that_is_a_file(tmp_path, monkeypatch):
    write_checkpoints(tmp_path / "seed-0", (2,))
    (tmp_path / "seed-0.log").write_text("a log, caught by seed-*")
    monkeypatch.setattr(select.demo, "build_task", lambda *args, **kwargs: pytest.fail("scored"))
    with pytest.raises(SystemExit, match=r"not a run folder: .*seed-0\.log \(give the folders"):
        select.main([str(tmp_path / "seed-0"), str(tmp_path / "seed-0.log")])


def test_select_checkpoint_scores_a_retrained_checkpoint_again_and_rewrites_only_its_runs_table(
        tmp_path, monkeypatch, capsys):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        write_checkpoints(run, (2, 4))

    def score(path, which):  # the AUC is the file's content: retraining changes it
        return {"run": path.parents[1], "step": int(path.stem.split("-")[1]),
                "validation AUC": float(path.read_bytes() or 0), "validation pAUC": 0.5, "embedding spread": 0.25}
    monkeypatch.setattr(select, "_score_checkpoint", score)
    monkeypatch.setattr(select.demo, "build_task", lambda *args, **kwargs: None)
    options = [*map(str, runs), "--jobs", "1"]
    (runs[0] / "checkpoints" / "step-000000002.pt").write_bytes(b"0.9")
    assert select.main(options) == 0 and capsys.readouterr().out.strip() == f"{runs[0]} 2"
    (runs[0] / "checkpoints" / "step-000000002.pt").write_bytes(b"0.15")  # retrained in the same folder
    (runs[0] / "checkpoints" / "step-000000004.pt").write_bytes(b"0.8")
    writes = []
    monkeypatch.setattr(select, "write_csv", lambda rows, path, task: writes.append(path))
    assert select.main(options) == 0 and capsys.readouterr().out.strip() == f"{runs[0]} 4"
    tables = [run / "validation.csv" for run in runs]
    assert writes[:2] == tables and writes[2:-2] == [tables[0]] * 2 and writes[-2:] == tables


def test_select_checkpoint_records_the_scoring_thread_count_with_the_task(monkeypatch):
    monkeypatch.setattr(select.torch, "get_num_threads", lambda: 7)
    assert select.scoring_threads(1) == 7
    assert select.scoring_threads(4) == (1 if "fork" in select.multiprocessing.get_all_start_methods() else 7)


@pytest.mark.parametrize("arguments, message", [
    (["--bank", "0"], "must be at least 1"), (["--seed", "-1"], "must be in [0, 2**32)"),
    (["--machine-seeds", "-3"], "must be in [0, 2**32)"), (["--jobs", "0"], "must be at least 1")],
    ids=["bank", "seed", "machine-seeds", "jobs"])
def test_select_checkpoint_refuses_bad_arguments(tmp_path, capsys, arguments, message):
    write_checkpoints(tmp_path / "run", (2,))
    with pytest.raises(SystemExit):
        select.main([str(tmp_path / "run"), *arguments])
    assert message in capsys.readouterr().err


def test_select_checkpoint_stops_before_scoring_without_checkpoints_or_a_writable_table(tmp_path, monkeypatch):
    monkeypatch.setattr(select.demo, "build_task", lambda *args, **kwargs: pytest.fail("scored"))
    with pytest.raises(SystemExit, match="no checkpoint in .*nothing/checkpoints"):
        select.main([str(tmp_path / "nothing")])
    write_checkpoints(tmp_path / "run", (2,))
    (tmp_path / "a file").write_text("")
    with pytest.raises(SystemExit, match="cannot write the validation table"):
        select.main([str(tmp_path / "run"), "--csv", str(tmp_path / "a file" / "validation.csv")])


def test_evaluate_default_checks_its_arguments_and_corpus_before_evaluating(tmp_path):
    evaluate = import_script("evaluate_default")
    with pytest.raises(SystemExit, match="datalist.csv does not exist: run scripts/build_corpus.py"):
        evaluate.main(["--corpus", str(tmp_path)])
    (tmp_path / "datalist.csv").write_text("path,split,label\nheldout/bucklespring/a-0.wav,heldout,press\n")
    with pytest.raises(SystemExit, match="a held-out clip of .* does not read .*rewrites missing and damaged"):
        evaluate.main(["--corpus", str(tmp_path)])
    for arguments in (["--limit", "-1"], ["--bank", "0"], ["--seed", "-1"], ["--seed", str(2**64)]):
        with pytest.raises(SystemExit) as stopped:
            evaluate.main(["--corpus", str(tmp_path), *arguments])
        assert stopped.value.code == 2, arguments  # argparse's usage error, not a traceback
    (tmp_path / "a file").write_text("")
    with pytest.raises(SystemExit, match="--json .*a file/e.json cannot be written"):
        evaluate.main(["--corpus", str(tmp_path), "--json", str(tmp_path / "a file" / "e.json")])
    with pytest.raises(SystemExit, match="is a folder: it takes the file"):
        evaluate.main(["--corpus", str(tmp_path), "--json", str(tmp_path)])
    write_checkpoints(tmp_path / "run", (2,))
    with pytest.raises(SystemExit, match=r"--csv .* is a folder: it takes the file"):  # not after the scoring
        evaluate.main(["--corpus", str(tmp_path), "--runs", str(tmp_path / "run"), "--csv", str(tmp_path)])
    for arguments in (["--runs", str(tmp_path / "run"), "--json", "x.json"], ["--csv", "x.csv"]):
        with pytest.raises(SystemExit) as stopped:
            evaluate.main(["--corpus", str(tmp_path), *arguments])
        assert stopped.value.code == 2, arguments  # an option that would be ignored: a usage error
    with pytest.raises(SystemExit, match=r"no checkpoint in .*nothing \(give the folders"):
        evaluate.main(["--corpus", str(tmp_path / "no corpus"), "--runs", str(tmp_path / "nothing")])


def test_fetch_samples_stops_at_an_unwritable_output_before_fetching(tmp_path, monkeypatch):
    fetch_samples = import_script("fetch_samples")
    monkeypatch.setattr(fetch_samples.debian, "fetch", lambda *args: pytest.fail("fetched before the check"))
    (tmp_path / "a file").write_text("")
    with pytest.raises(SystemExit, match="--out .*a file/samples cannot be written"):
        fetch_samples.main(["--out", str(tmp_path / "a file" / "samples"), "--cache", str(tmp_path)])


def test_fetch_samples_names_the_files_a_newer_package_no_longer_holds(tmp_path, monkeypatch):
    """A release that moved or renamed files the cuts take ends with the package, its .deb and every such file,
    before any sample is cut, not with a traceback at the first."""
    fetch_samples = import_script("fetch_samples")
    root = tmp_path / "cache" / "extracted" / "pkg"
    (root / "usr/share/sounds").mkdir(parents=True)
    (root / ".extracted").write_text("pkg_2.0-1_all.deb\n")
    (root / "usr/share/sounds/kept.wav").write_bytes(b"")
    monkeypatch.setattr(fetch_samples, "CUTS", [fetch_samples.Cut(name, "pkg", f"usr/share/sounds/{name}.wav", 0.0,
                                                                  1.0, name) for name in ("kept", "moved", "renamed")])
    monkeypatch.setattr(fetch_samples.debian, "fetch", lambda package, cache: root)
    options = ["--out", str(tmp_path / "samples"), "--cache", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match=r"^pkg \(pkg_2\.0-1_all\.deb\) has no usr/share/sounds/moved\.wav, "
                                         r"usr/share/sounds/renamed\.wav: the package changed"):
        fetch_samples.main(options)
    assert list((tmp_path / "samples").iterdir()) == []
    (root / ".extracted").unlink()
    with pytest.raises(SystemExit, match=r"^pkg has no usr/share/sounds/moved\.wav, "):  # its version unknown
        fetch_samples.main(options)


def test_export_default_refuses_a_file_for_its_output_folder(tmp_path):
    (tmp_path / "a file").write_text("")
    with pytest.raises(SystemExit, match="is a file: it takes the folder"):
        import_script("export_default").main([str(tmp_path / "run"), "--out", str(tmp_path / "a file")])


@pytest.fixture
def fake_python(tmp_path):
    """A PYTHON for the shell recipes that logs each call (one line, arguments joined by '|') and answers
    select_checkpoint with step 4 of the first run ('RUN 4' with --print-run)."""
    log = tmp_path / "calls.log"
    fake_tool(tmp_path / "bin", "python", f"""
IFS='|'; echo "$*" >> "{log}"
case "$*" in
  -c*) exit 1 ;;
  *select_checkpoint.py*--print-run*) echo "$2 4" ;;
  *select_checkpoint.py*) echo 4 ;;
esac""")
    return tmp_path / "bin" / "python", log


def run_recipe(script: str, cwd: Path, python: Path, *arguments, **env):
    return subprocess.run(["bash", str(REPO / "scripts" / script), *arguments], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": str(python), **env})


def test_train_seeds_with_one_seed_exports_that_run_at_its_chosen_step(tmp_path, fake_python):
    python, log = fake_python
    done = run_recipe("train_seeds.sh", tmp_path, python, "my runs", SEEDS="5")
    assert done.returncode == 0, done.stderr
    calls = [line.split("|") for line in log.read_text().splitlines()]
    pretrain = next(call for call in calls if call[:3] == ["-m", "echo", "pretrain"])
    assert pretrain[pretrain.index("--out") + 1] == f"{tmp_path}/my runs/seed-5"  # where the script was started
    export = next(call for call in calls if call[0] == "scripts/export_default.py")
    assert export[1:6] == [f"{tmp_path}/my runs/seed-5", "--step", "4", "--out", f"{tmp_path}/my runs/chosen"]


def test_train_seeds_ignores_an_out_set_for_other_tools(tmp_path, fake_python):
    """CI and other tools name their own output folder OUT: the export stays under ROOT."""
    python, log = fake_python
    done = run_recipe("train_seeds.sh", tmp_path, python, "runs", SEEDS="5", OUT=str(tmp_path / "tool output"))
    assert done.returncode == 0, done.stderr
    export = next(line.split("|") for line in log.read_text().splitlines() if "export_default.py" in line)
    assert export[export.index("--out") + 1] == f"{tmp_path}/runs/chosen"


@pytest.mark.parametrize("seeds", ["", "   "], ids=["empty", "blank"])
def test_train_seeds_stops_on_empty_seeds_before_building_anything(tmp_path, fake_python, seeds):
    python, log = fake_python
    done = run_recipe("train_seeds.sh", tmp_path, python, "runs", SEEDS=seeds)
    assert done.returncode != 0 and "SEEDS is empty" in done.stderr
    assert not log.exists() and not (tmp_path / "runs").exists()


def test_train_default_logs_a_step_by_every_checkpoint(tmp_path, fake_python):
    python, log = fake_python
    done = run_recipe("train_default.sh", tmp_path, python, "run", SAVE_EVERY="10", CORPUS_BUILT="1")
    assert done.returncode == 0, done.stderr
    calls = [line.split("|") for line in log.read_text().splitlines()]
    pretrain = next(call for call in calls if call[:3] == ["-m", "echo", "pretrain"])
    assert pretrain[pretrain.index("--log-every") + 1] == "10"
    assert pretrain[pretrain.index("--out") + 1] == f"{tmp_path}/run"
    export = next(call for call in calls if call[0] == "scripts/export_default.py")
    assert export[1:4] == [f"{tmp_path}/run", "--step", "4"]


def test_train_seeds_passes_short_crop_settings_to_every_seed_and_none_by_default(tmp_path, fake_python):
    python, log = fake_python
    done = run_recipe("train_seeds.sh", tmp_path, python, "runs", SEEDS="1 2", SHORTEST_CROP="0.25",
                      MIN_SECONDS="0.3")
    assert done.returncode == 0, done.stderr
    calls = [line.split("|") for line in log.read_text().splitlines() if "pretrain" in line]
    assert len(calls) == 2
    for call in calls:
        assert call[call.index("--shortest-crop-seconds") + 1] == "0.25"
        assert call[call.index("--min-seconds") + 1] == "0.3"
    log.unlink()
    done = run_recipe("train_default.sh", tmp_path, python, "run", CORPUS_BUILT="1")
    assert done.returncode == 0, done.stderr
    pretrain = next(line for line in log.read_text().splitlines() if "pretrain" in line)
    assert "--shortest-crop-seconds" not in pretrain and "--min-seconds" not in pretrain


def test_the_recipes_take_a_relative_python_and_out_from_where_they_were_started(tmp_path, fake_python):
    python, log = fake_python
    done = run_recipe("train_seeds.sh", tmp_path, Path("bin/python"), "runs", SEEDS="5", EXPORT_DIR="out")
    assert done.returncode == 0, done.stderr
    export = next(line.split("|") for line in log.read_text().splitlines() if "export_default.py" in line)
    assert f"{tmp_path}/out" in export


@pytest.mark.parametrize("script", ["train_default.sh", "train_seeds.sh"])
@pytest.mark.parametrize("arguments", [["--help"], ["runs/a", "runs/b"]], ids=["option", "two folders"])
def test_the_recipes_refuse_arguments_they_do_not_take_before_running_anything(tmp_path, fake_python, script,
                                                                               arguments):
    """`--help` was taken for the run folder: hours of training into ./--help, then the bundled model replaced."""
    python, log = fake_python
    done = run_recipe(script, tmp_path, python, *arguments, SEEDS="5", CORPUS_BUILT="1")
    assert done.returncode == 2 and f"usage: bash scripts/{script}" in done.stderr
    assert not log.exists() and list(tmp_path.iterdir()) == [tmp_path / "bin"]


@pytest.mark.parametrize("seeds", ["1 2 1", "0,1"], ids=["repeated", "not a number"])
def test_train_seeds_refuses_repeated_or_malformed_seeds_before_building_anything(tmp_path, fake_python, seeds):
    """A repeated seed started two trainings into one run folder at once, each overwriting the other's files."""
    python, log = fake_python
    done = run_recipe("train_seeds.sh", tmp_path, python, "runs", SEEDS=seeds)
    assert done.returncode == 2 and "SEEDS" in done.stderr
    assert not log.exists() and not (tmp_path / "runs").exists()


def test_an_export_removes_the_staging_folders_of_killed_exports_and_keeps_a_running_ones(tmp_path, monkeypatch):
    """An export killed mid-write (kill -9, out of memory) left its export-*.tmp folder, a model's worth, in
    --out for good. One of a live process is another export's, into the same folder: it is left alone."""
    export_default = import_script("export_default")
    out = tmp_path / "bundle"
    options = fake_run_to_export(tmp_path, monkeypatch, export_default, out)
    # a dead process's; this process's own id on one is a killed one's (a restarted container gives it again)
    killed = [out / "export-999999999-k1ll3d_x.tmp", out / f"export-{os.getpid()}-restart.tmp"]
    running = out / f"export-{os.getppid()}-running.tmp"
    for staging in (*killed, running):
        staging.mkdir(parents=True)
        (staging / "model.safetensors").write_bytes(b"half written")
    assert export_default.main(options) == 0
    assert sorted(path.name for path in out.iterdir()) == sorted([*export_default.BUNDLE, running.name])
    assert (running / "model.safetensors").read_bytes() == b"half written"
