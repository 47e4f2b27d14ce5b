"""The bundled default model (echo/data/default/, made by scripts/train_default.sh): loads by name, embeds
at three sample rates through the fast path as the reference does, and keeps the package small."""
import csv
import errno
import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import echo
from conftest import random_model, rel_err
from echo import fast, geometry, hub

PACKAGE_DATA = Path(echo.__file__).parent / "data"
PACKAGE_DATA_LIMIT = 15 * 2**20
bundled = pytest.mark.skipif(not hub.DEFAULT_CHECKPOINT.is_file(), reason="the default model is not bundled yet "
                             "(scripts/train_default.sh makes echo/data/default/model.safetensors)")


@bundled
def test_default_loads_and_embeds_at_three_rates():
    model = echo.load("default")
    assert model.config.size == "tiny"
    rates = (8000, 16000, 44100)
    signals = [torch.randn(int(rate * seconds)) for rate, seconds in zip(rates, (1.3, 0.7, 2.1))]
    fast_out = fast.encode(model, signals, list(rates))
    for signal, rate, utterance in zip(signals, rates, fast_out):
        assert utterance.shape == (geometry.n_bands(rate) * model.config.dim,)
        assert torch.isfinite(utterance).all()
        reference, _ = model.encode(signal, rate)
        assert rel_err(utterance, reference) < 1e-5


@bundled
def test_default_is_a_trained_fp16_file_with_its_record():
    from safetensors import safe_open

    with safe_open(str(hub.DEFAULT_CHECKPOINT), framework="pt") as handle:
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"F16"}
    record = json.loads((hub.DEFAULT_CHECKPOINT.parent / "training.json").read_text())
    assert record["steps_trained"] > 0 and record["pretrain_config"]["size"] == "tiny"
    saved = json.loads((hub.DEFAULT_CHECKPOINT.parent / "model.json").read_text())
    assert echo.load("default").config.to_dict() == saved


@bundled
def test_the_recipe_script_pretrains_with_the_bundled_models_config():
    """scripts/train_default.sh must reproduce the bundled file: every option its pretrain command sets (the
    default of each `${VAR:-value}`) is the value training.json records."""
    recipe = (Path(__file__).resolve().parents[1] / "scripts" / "train_default.sh").read_text()
    command = recipe[recipe.index("-m echo pretrain"):].split("\n# ")[0].replace("\\\n", " ")
    options = re.findall(r'--([a-z-]+) (?:"\$\{[A-Z_]+:-([^}]+)\}"|([^\s$"-][^\s]*))', command)
    recorded = json.loads((hub.DEFAULT_CHECKPOINT.parent / "training.json").read_text())["pretrain_config"]
    assert len(options) >= 15
    for option, default, literal in options:
        field, value = option.replace("-", "_"), default or literal
        if field in ("out", "save_every", "keep", "log_every"):  # where it writes, not what it learns
            continue
        assert str(recorded[field]) in (value, str(float(value) if value[0].isdigit() else value)), (option, value)


def test_package_data_stays_small():
    total = sum(path.stat().st_size for path in PACKAGE_DATA.rglob("*") if path.is_file()
                and "__pycache__" not in path.parts)
    assert total < PACKAGE_DATA_LIMIT, f"echo/data holds {total / 2**20:.1f} MiB"


REPO = Path(__file__).resolve().parents[1]
SCRIPTS = str(REPO / "scripts")


def import_script(name: str):
    sys.path.insert(0, SCRIPTS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(SCRIPTS)  # by value: the script may have put the repository before it


def test_import_script_leaves_no_scripts_folder_on_the_path(monkeypatch):
    monkeypatch.delitem(sys.modules, "evaluate_default", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != SCRIPTS])
    assert import_script("evaluate_default").__name__ == "evaluate_default"
    assert SCRIPTS not in sys.path


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A tiny run of 6 planned steps, stopped after step 4 (checkpoints of steps 2 and 4)."""
    from echo.pretrain import trainer
    from pretrain_corpus import tiny_config, write_corpus

    folder = tmp_path_factory.mktemp("stopped")
    run = folder / "run"
    config = tiny_config(write_corpus(folder / "audio", files=4), run, steps=6, log_every=1, save_every=2)
    trainer.train(config, progress=False, stop_at=4)
    return run


@pytest.mark.slow
def test_export_script_turns_an_unfinished_run_into_a_bundle(stopped_run, tmp_path):
    """A run stopped early is exported as it stands: fp16 teacher equal to the checkpoint's, its step count,
    its curve, and the credits of the data list."""
    from echo.pretrain import checkpoints

    datalist = tmp_path / "datalist.csv"
    rows = [("a.wav", "pretrain", "pkg1", "x", "8000", "30", "1", "", "CC0", "Someone"),
            ("b.wav", "pretrain", "pkg1", "x", "8000", "90", "1", "", "CC0", "Someone"),
            ("c.wav", "heldout", "pkg2", "x", "8000", "60", "1", "press", "GPL-2+", "Other")]
    with open(datalist, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "split", "source", "original", "sample_rate", "seconds", "channels",
                                       "label", "licence", "credit"), *rows])
    export_default = import_script("export_default")
    out = tmp_path / "bundle"
    assert export_default.main([str(stopped_run), "--out", str(out), "--datalist", str(datalist)]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["steps_trained"] == 4 and record["steps_planned"] == 6
    teacher = checkpoints.load_latest(stopped_run / "checkpoints")["teacher"]
    exported = echo.load(out / "model.safetensors").state_dict()
    assert all(torch.equal(exported[k], teacher[k].half().float()) for k in teacher)
    assert (out / "training_curve.png").stat().st_size > 0
    with open(out / "DATA_CREDITS.csv", newline="") as handle:
        credits = list(csv.DictReader(handle))
    assert credits == [{"source": "pkg1", "licence": "CC0", "credit": "Someone", "files": "2", "minutes": "2.00"}]

    assert export_default.main([str(stopped_run), "--step", "2", "--out", str(out), "--datalist", str(datalist)]) == 0
    earlier = torch.load(stopped_run / "checkpoints" / "step-000000002.pt", weights_only=True)["teacher"]
    exported = echo.load(out / "model.safetensors").state_dict()
    assert all(torch.equal(exported[k], earlier[k].half().float()) for k in earlier)
    assert json.loads((out / "training.json").read_text())["last_logged"]["step"] == 2
    with pytest.raises(SystemExit, match=r"no checkpoint of step 3 .*\[2, 4\]"):
        export_default.main([str(stopped_run), "--step", "3", "--out", str(out), "--datalist", str(datalist)])


@pytest.mark.slow
def test_export_removes_the_evaluation_of_the_model_it_replaces(stopped_run, tmp_path, capsys):
    """evaluation.json beside the exported file measured the model replaced: kept, it was taken for the new
    one's numbers whenever the evaluation after the export did not run to its end."""
    datalist = tmp_path / "datalist.csv"
    datalist.write_text("path,split,source,original,sample_rate,seconds,channels,label,licence,credit\n"
                        "a.wav,pretrain,pkg,a.wav,8000,30,1,,CC0,Someone\n")
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "evaluation.json").write_text('{"trained (default)": {"demo AUC": 0.99}}\n')
    export_default = import_script("export_default")
    assert export_default.main([str(stopped_run), "--out", str(out), "--datalist", str(datalist)]) == 0
    assert not (out / "evaluation.json").exists()
    assert "evaluation.json" in capsys.readouterr().out  # said, not silent


@pytest.mark.parametrize("data, recorded", [(str(REPO / "corpus" / "pretrain"), "corpus/pretrain"),
                                            ("/elsewhere/audio", "/elsewhere/audio")], ids=["in repo", "outside"])
def test_export_records_the_recipes_corpus_relative_to_the_repository(tmp_path, monkeypatch, data, recorded):
    """The trainer records --data absolute: the bundled training.json named the maintainer's own folders."""
    export_default = import_script("export_default")
    options = fake_run_to_export(tmp_path, monkeypatch, export_default, tmp_path / "bundle", data=data)
    assert export_default.main(options) == 0
    record = json.loads((tmp_path / "bundle" / "training.json").read_text())
    assert record["pretrain_config"]["data"] == recorded


def fake_run_to_export(tmp_path, monkeypatch, export_default, out: Path, data: str = "unused") -> list[str]:
    """export_default's arguments for a run of 4 steps whose encoder (a tiny random model, other weights at each
    export) is made up, with a one-file data list."""
    from echo.pretrain.trainer import PretrainConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "steps.csv").write_text("step,loss,frame_loss,utterance_loss,lr\n2,1.0,0.6,0.4,1e-4\n4,0.8,0.5,0.3,1e-4\n")
    config = PretrainConfig(data=data, out=str(run), dim=32, depth=1, heads=2, steps=4).to_dict()
    monkeypatch.setattr(export_default, "run_encoder", lambda run, step=None: (
        random_model(dim=32, depth=1, heads=2), {"step": 4, "config": config}))
    datalist = tmp_path / "datalist.csv"
    datalist.write_text("path,split,source,original,sample_rate,seconds,channels,label,licence,credit\n"
                        "a.wav,pretrain,pkg,a.wav,8000,30,1,,CC0,Someone\n")
    return [str(run), "--out", str(out), "--datalist", str(datalist)]


def test_an_export_failing_midway_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """A write failing after the weights and the curve are written (the credits') replaces none of the earlier
    export's files, not its evaluation either, and leaves no temporary in --out."""
    export_default = import_script("export_default")
    out = tmp_path / "bundle"
    options = fake_run_to_export(tmp_path, monkeypatch, export_default, out)
    assert export_default.main(options) == 0
    (out / "evaluation.json").write_text('{"trained (default)": {"demo AUC": 0.9}}\n')
    earlier = {path.name: path.read_bytes() for path in out.iterdir()}

    def full(totals, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(export_default, "_write_credits", full)
    with pytest.raises(OSError, match="No space left"):
        export_default.main(options)
    assert sorted(path.name for path in out.iterdir()) == sorted(earlier)  # no temporary left
    assert {name: (out / name).read_bytes() for name in earlier} == earlier


@pytest.mark.slow
def test_select_checkpoint_scores_every_checkpoint_and_prints_the_best(stopped_run, tmp_path, capsys):
    """Each checkpoint's validation AUC is that of its teacher on validation machines the demo does not use,
    and the printed step is the best row."""
    from echo import demo
    from echo.pretrain import trainer

    select = import_script("select_checkpoint")
    import_script("evaluate_default")  # which --baselines imports, from the script's folder: not on a test's path
    table = tmp_path / "validation.csv"
    options = [str(stopped_run), "--bank", "3", "--tests", "2"]
    assert select.main(options + ["--csv", str(table), "--baselines", "--jobs", "2"]) == 0
    printed = capsys.readouterr()
    chosen_step = int(printed.out.strip())
    assert "random weights" in printed.err and "log-spectrogram" in printed.err
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process of --jobs 2 scored
    try:
        assert select.main(options + ["--csv", str(tmp_path / "serial.csv"), "--jobs", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "serial.csv", newline="") as handle:
        assert list(csv.DictReader(handle)) == rows  # the same numbers, to the last digit
    assert [int(row["step"]) for row in rows] == [2, 4]
    best = max(float(row["validation AUC"]) for row in rows)
    assert chosen_step == min(int(r["step"]) for r in rows if float(r["validation AUC"]) == best)

    saved = torch.load(stopped_run / "checkpoints" / "step-000000004.pt", weights_only=True)
    model = echo.EchoModel(trainer.PretrainConfig(**saved["config"]).model_config)
    model.load_state_dict(saved["teacher"])  # tiny_config exports the teacher
    demo_clips = demo.build_task(0, 3, 2).signals
    aucs = []
    for machine_seed in select.VALIDATION_MACHINE_SEEDS:
        task = demo.build_task(select.VALIDATION_SEED, 3, 2, machine_seed=machine_seed)
        assert not any(np.array_equal(a, b) for a, b in zip(task.signals, demo_clips))  # not the demo's clips
        embeddings = demo.encode(model, task.signals, task.rates)
        aucs.append(demo.score(task, embeddings)[2]["AUC (demo)"])
    assert float(rows[1]["validation AUC"]) == pytest.approx(np.mean(aucs), abs=1e-9)


def test_select_checkpoint_chooses_across_the_runs_of_several_seeds(tmp_path, capsys, monkeypatch):
    """The highest validation AUC of all runs; on a tie the earlier step, then the run named first. Each run's
    rows go to its own validation.csv; the choice is printed as 'RUN STEP'."""
    select = import_script("select_checkpoint")
    runs = [tmp_path / "seed-0", tmp_path / "seed-1", tmp_path / "seed-2"]
    aucs = {(0, 2): 0.80, (0, 4): 0.90, (1, 2): 0.70, (1, 4): 0.90, (2, 2): 0.75, (2, 4): 0.90}
    rows = [{"run": runs[r], "step": step, "validation AUC": auc, "validation pAUC": 0.5, "embedding spread": 0.01}
            for (r, step), auc in aucs.items()]
    monkeypatch.setattr(select, "validate", lambda asked, *rest: [row for run in asked for row in rows
                                                                  if row["run"] == run])  # run by run, as asked
    monkeypatch.setattr(select.demo, "build_task", lambda *args, **kwargs: None)  # the tasks go unused here
    for run in runs:
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "step-000000002.pt").write_bytes(b"")  # scored by the validate above
    assert select.main([str(run) for run in runs]) == 0
    assert capsys.readouterr().out.strip() == f"{runs[0]} 4"  # three at 0.90, all at step 4: the first run
    assert select.main([str(runs[2]), str(runs[1])]) == 0
    assert capsys.readouterr().out.strip() == f"{runs[2]} 4"
    with open(runs[1] / "validation.csv", newline="") as handle:
        assert [(int(r["step"]), float(r["validation AUC"])) for r in csv.DictReader(handle)] == [(2, 0.7), (4, 0.9)]
    assert select.main([str(runs[0])]) == 0 and capsys.readouterr().out.strip() == "4"  # one run: the step alone


def test_the_corpus_takes_each_hydrogen_kit_with_its_recorded_licence_and_reads_flac(tmp_path, capsys):
    soundfile = pytest.importorskip("soundfile")
    build_corpus = import_script("build_corpus")
    kits = tmp_path / build_corpus.HYDROGEN_KITS_FOLDER
    (kits / "Audiophob").mkdir(parents=True)
    (kits / "Unlisted Kit").mkdir()
    samples = (np.random.uniform(-0.5, 0.5, (22050, 2)) * 32768).round() / 32768  # exact in 16-bit FLAC
    soundfile.write(kits / "Audiophob" / "tom hit.flac", samples, 44100, subtype="PCM_16")
    (kits / "Audiophob" / "drumkit.xml").write_text("<drumkit_info/>")
    soundfile.write(kits / "Unlisted Kit" / "kick.wav", samples, 44100, subtype="PCM_16")

    items = build_corpus._hydrogen_items(tmp_path, "pretrain/hydrogen-drumkits", "hydrogen-drumkits_test.deb")
    assert [item.relative for item, _ in items] == ["pretrain/hydrogen-drumkits/Audiophob/tom_hit.wav"]
    item, source = items[0]
    assert (item.licence, item.credit) == build_corpus.HYDROGEN_KITS["Audiophob"]
    assert "Unlisted Kit" in capsys.readouterr().out  # left out, and said so
    waveform, rate = build_corpus._waveform(source)
    assert rate == 44100 and waveform.shape == (2, 22050)
    np.testing.assert_array_equal(waveform, samples.T.astype(np.float32))


def test_the_corpus_is_the_same_whatever_the_number_of_processes_writing_it(tmp_path, monkeypatch):
    build_corpus = import_script("build_corpus")
    monkeypatch.setattr(build_corpus.debian, "fetch", lambda package, cache: tmp_path / "no-package")
    monkeypatch.setattr(build_corpus, "_package_items", lambda package, root, split: [])
    outputs = {jobs: tmp_path / f"jobs{jobs}" for jobs in (1, 2)}
    for jobs, out in outputs.items():
        build_corpus.main(["--out", str(out), "--synthetic", "5", "--jobs", str(jobs), "--quiet"])
    files = sorted(path.relative_to(outputs[1]) for path in outputs[1].rglob("*") if path.is_file())
    assert len(files) == 6 and files == sorted(p.relative_to(outputs[2]) for p in outputs[2].rglob("*") if p.is_file())
    for relative in files:
        assert (outputs[1] / relative).read_bytes() == (outputs[2] / relative).read_bytes(), relative


@pytest.mark.parametrize("content, error", [(None, "does not exist"), ("path,split,seconds\na.wav,pretrain,30\n",
                                                                          "has no column source, licence, credit")],
                         ids=["missing", "other columns"])
def test_a_bad_data_list_is_refused_by_its_option_before_the_run_is_read(tmp_path, monkeypatch, content, error):
    """A missing data list or one of other columns was found only once the checkpoint had loaded, and the second
    was named as a file with no word of --datalist."""
    export_default = import_script("export_default")
    options = fake_run_to_export(tmp_path, monkeypatch, export_default, tmp_path / "bundle")
    datalist = tmp_path / "datalist.csv"
    datalist.unlink()
    if content is not None:
        datalist.write_text(content)
    monkeypatch.setattr(export_default, "run_encoder", lambda *args, **kwargs: pytest.fail("the run was read first"))
    with pytest.raises(SystemExit, match=re.escape(f"--datalist {datalist} {error}")):
        export_default.main(options)
    assert not (tmp_path / "bundle").exists()
