"""The demo's task and scoring (echo/demo.py; the command itself is tested in test_cli.py) and the
evaluation script of the default model (scripts/evaluate_default.py) on a tiny corpus."""
import csv
import dataclasses
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import echo
from echo import demo
from echo.data import synth
from echo.data.wav import write_wav
from echo.eval import plots
from conftest import random_model
from test_cli import interrupt_call
from test_default_model import import_script

ROOT = Path(__file__).resolve().parents[1]


def test_task_layout_and_reproducibility():
    task = demo.build_task(seed=3, bank=3, tests=3, seconds=0.5)
    assert len(task.clips) == len(demo.MACHINES) * 9
    for spec in demo.MACHINES:
        members = task.machine_indices()[spec.name]
        clips = [task.clips[i] for i in members]
        assert [c.subset for c in clips] == ["train"] * 3 + ["test"] * 6
        assert [c.label for c in clips] == [None] * 3 + [0] * 3 + [1] * 3
        assert [task.faults[i] for i in members] == [None] * 6 + list(synth.FAULTS)
        assert {task.rates[i] for i in members} == {spec.sample_rate}
        assert all(len(task.signals[i]) == int(0.5 * spec.sample_rate) for i in members)
    again = demo.build_task(seed=3, bank=3, tests=3, seconds=0.5)
    other = demo.build_task(seed=4, bank=3, tests=3, seconds=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(task.signals, again.signals))
    assert not any(np.array_equal(a, b) for a, b in zip(task.signals, other.signals))


@pytest.mark.parametrize("options", [dict(bank=0), dict(tests=1.5), dict(seconds=float("nan")),
                                     dict(seconds=float("inf")), dict(seconds=1e-5)])
def test_task_rejects_empty_parts(options):
    """Fractional counts, NaN or infinite seconds, and clips too short to hold a sample at the slowest rate were
    refused by Python or numpy in words of their own ("can't multiply sequence by non-int of type 'float'",
    "cannot convert float NaN to integer", OverflowError, synth's "n_samples ... got 0")."""
    with pytest.raises(ValueError, match=r"demo task: need whole numbers bank >= 1 and tests >= 1, and seconds "
                                         r"that hold a sample at 8000 Hz, got"):
        demo.build_task(**{"bank": 1, "tests": 1, "seconds": 0.1, **options})


def test_the_clips_are_counted_on_a_bar_as_they_are_made_when_asked(monkeypatch, capsys):
    bars = []

    class Recorded(demo.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append((self, self.disable))  # closing disables it

    monkeypatch.setattr(demo, "tqdm", Recorded)
    task = demo.build_task(seed=0, bank=2, tests=1, seconds=0.3, progress=True)
    assert sum(bar.n for bar, _ in bars) == len(task.clips) and not any(disabled for _, disabled in bars)
    shown = capsys.readouterr().err
    assert all(f"generating {spec.name} clips" in shown for spec in demo.MACHINES)
    bars.clear()
    demo.build_task(seed=0, bank=2, tests=1, seconds=0.3)  # the scripts that score checkpoints show their own
    assert bars and all(disabled for _, disabled in bars) and capsys.readouterr().err == ""


def test_an_interrupted_bar_clears_its_line_for_the_interrupts_message(monkeypatch, capsys):
    """The bar stayed open on Ctrl-C: "interrupted: nothing was written" was printed at the end of its line."""
    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "_clip", interrupt)
    try:
        demo.build_task(seed=0, bank=2, tests=1, seconds=0.3, progress=True)
    except KeyboardInterrupt:  # read where the command prints its message: the traceback keeps an open bar alive
        shown = capsys.readouterr().err
    assert "generating pump clips" in shown and shown.endswith("\r")  # leave=False: the line is blanked


def test_the_demo_command_shows_the_clips_being_made(tmp_path, monkeypatch):
    """Making them takes seconds before the command prints anything."""
    from echo import cli

    asked = []
    real = demo.build_task

    def stop(*args, **kwargs):
        asked.append(inspect.signature(real).bind(*args, **kwargs).arguments)
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "build_task", stop)
    model = echo.save(random_model(dim=32, depth=1, heads=2), tmp_path / "small.safetensors")
    assert cli.main(["demo", "--model", str(model), "--out", str(tmp_path / "out")]) == 130
    assert asked[0]["progress"] is True


def test_score_separates_what_is_separable():
    """Faulty clips far from a tight healthy cluster score AUC 1; identical vectors score AUC 0.5."""
    task = demo.build_task(seed=0, bank=4, tests=4, seconds=0.3)
    rng = np.random.default_rng(0)
    centre = {rate: rng.standard_normal(8 + rate % 7) for rate in set(task.rates)}  # widths differ per machine
    embeddings = [centre[r] + (5.0 if f else 0.01) * rng.standard_normal(len(centre[r]))
                  for r, f in zip(task.rates, task.faults)]
    scores, rows, summary = demo.score(task, embeddings)
    assert {r["machine"] for r in rows} == {m.name for m in demo.MACHINES}
    assert all(r["value"] == 1.0 for r in rows) and summary["AUC (demo)"] == 1.0
    assert np.isnan(scores[[c.subset == "train" for c in task.clips]]).all()
    _, rows, _ = demo.score(task, [np.ones(5) for _ in task.clips])
    assert all(r["value"] == 0.5 for r in rows if r["metric"] == "AUC")
    with pytest.raises(ValueError, match="embeddings for"):
        demo.score(task, embeddings[:-1])


def key_switch_corpus(corpus: Path) -> Path:
    """A corpus of held-out key clips only: tones (press) and noise (release)."""
    rng = np.random.default_rng(0)
    lines = ["path,split,source,original,sample_rate,seconds,channels,label,licence,credit"]
    for index in range(6):
        for label in ("press", "release"):
            t = np.arange(4410) / 44100
            wave = np.sin(2 * np.pi * 900 * t) if label == "press" else rng.standard_normal(len(t))
            path = f"heldout/bucklespring/wav/{index:02d}-{label}.wav"
            (corpus / path).parent.mkdir(parents=True, exist_ok=True)
            write_wav(corpus / path, (0.3 * wave).astype(np.float32), 44100)
            lines.append(f"{path},heldout,test,{path},44100,0.1,1,{label},x,x")
    (corpus / "datalist.csv").write_text("\n".join(lines) + "\n")
    return corpus


def test_evaluation_script_on_a_tiny_corpus(tmp_path):
    """Three embeddings, two tasks, numbers in range; key clips here are tones (press) vs noise (release)."""
    corpus = key_switch_corpus(tmp_path / "corpus")
    evaluate_default = import_script("evaluate_default")
    out = tmp_path / "results.json"
    model = echo.save(random_model(dim=32, depth=1, heads=2), tmp_path / "small.safetensors")
    assert evaluate_default.main(["--model", str(model), "--corpus", str(corpus), "--bank", "2", "--tests", "2",
                                  "--limit", "5", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert len(results) == 3 and "log-spectrogram baseline" in results
    for numbers in results.values():
        assert all(0 <= numbers[key] <= 1 for key in ("demo AUC", "demo pAUC", "bucklespring 5-NN LOOCV accuracy"))
        assert len(numbers["demo per machine"]) == 2 * len(demo.MACHINES)
    assert results["log-spectrogram baseline"]["bucklespring 5-NN LOOCV accuracy"] == 1.0  # tone vs noise


@pytest.mark.slow
def test_every_checkpoint_of_runs_scores_as_its_exported_file(tmp_path):
    """--runs: each checkpoint's row equals the evaluation of the fp16 file export_default.py would write."""
    from echo.pretrain.trainer import PretrainConfig

    corpus = key_switch_corpus(tmp_path / "corpus")
    evaluate_default = import_script("evaluate_default")
    config = PretrainConfig(data="unused", out=str(tmp_path / "run"), dim=32, depth=1, heads=2, export="student")
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    students = {}
    for step in (2, 4):
        students[step] = random_model(dim=32, depth=1, heads=2)
        torch.save({"step": step, "config": dataclasses.asdict(config), "student": students[step].state_dict(),
                    "teacher": random_model(dim=32, depth=1, heads=2).state_dict()}, folder / f"step-{step:09d}.pt")
    options = ["--corpus", str(corpus), "--bank", "2", "--tests", "2", "--limit", "5"]
    table = tmp_path / "heldout.csv"
    assert evaluate_default.main(["--runs", str(tmp_path / "run"), "--csv", str(table), "--jobs", "2", *options]) == 0
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [2, 4]
    for row in rows:
        exported = echo.save(students[int(row["step"])], tmp_path / "model.safetensors", dtype=torch.float16)
        assert evaluate_default.main(["--model", str(exported), "--json", str(tmp_path / "one.json"), *options]) == 0
        trained = next(iter(json.loads((tmp_path / "one.json").read_text()).values()))
        for column in ("demo AUC", "demo pAUC", "bucklespring 5-NN LOOCV accuracy"):
            assert float(row[column]) == pytest.approx(trained[column], abs=1e-12)
        assert int(row["bucklespring clips"]) == round(trained["bucklespring 5-NN LOOCV accuracy"] * 10)


def small_demo(tmp_path, monkeypatch, capsys) -> tuple[list[str], Path]:
    """`python -m echo demo` on a small random model and few short clips: (stdout lines, --out)."""
    from echo import cli

    full_task = demo.build_task
    monkeypatch.setattr(demo, "build_task", lambda seed, **options: full_task(seed, bank=3, tests=4, seconds=0.3))
    model = echo.save(random_model(dim=32, depth=1, heads=2), tmp_path / "small.safetensors")
    out = tmp_path / "demo out ü"
    assert cli.main(["demo", "--model", str(model), "--out", str(out), "--seed", "2"]) == 0
    return capsys.readouterr().out.splitlines(), out


def test_demo_table_matches_sklearn_on_the_written_scores_and_names_device_and_threads(tmp_path, monkeypatch,
                                                                                         capsys):
    """The table's AUC and pAUC (McClish, max_fpr 0.1) are sklearn's on scores.csv; the header names the
    device and the thread count the numbers came from."""
    from sklearn.metrics import roc_auc_score

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lines, out = small_demo(tmp_path, monkeypatch, capsys)
    finally:
        torch.set_num_threads(threads)
    assert "on cpu (torch threads: 1)" in lines[0]
    with open(out / "scores.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    table = {line.split()[0]: line.split() for line in lines[1:]}
    for spec in demo.MACHINES:
        rows = [row for row in written if row["machine"] == spec.name]
        assert {row["rate"] for row in rows} == {f"{spec.sample_rate} Hz"}
        labels = [int(row["fault"] != "") for row in rows]
        values = [float(row["score"]) for row in rows]
        assert table[spec.name][1:5] == [str(spec.sample_rate), "Hz", "4", "4"]
        assert float(table[spec.name][5]) == pytest.approx(roc_auc_score(labels, values), abs=5e-5)
        assert float(table[spec.name][6]) == pytest.approx(roc_auc_score(labels, values, max_fpr=0.1), abs=5e-5)
    assert lines[-1].startswith(f"wrote scores.csv and {3 * len(demo.MACHINES) + 2} figures to {out}/")


def quick_demo(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A one-clip-per-machine demo with stand-in embeddings: (its model file, its empty --out folder)."""
    full_task = demo.build_task
    monkeypatch.setattr(demo, "build_task", lambda seed, **options: full_task(seed, bank=1, tests=1, seconds=0.3))
    monkeypatch.setattr(demo, "encode", lambda model, signals, rates: [np.random.standard_normal(8) for _ in signals])
    model = echo.save(random_model(dim=32, depth=1, heads=2), tmp_path / "small.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    return model, out


@pytest.mark.parametrize("owner, name, number, message", [
    (demo, "score", 1, "nothing was written to {out}/"),
    (plots, "save", 2, "kept roc_demo_all-machines.png, scores.csv in {out}/; the rest was not written "
                       "(projection_fan.png there: an earlier run's)")])
def test_an_interrupted_demo_says_which_of_its_files_it_kept(tmp_path, monkeypatch, capsys, owner, name, number,
                                                             message):
    """Ctrl-C printed a bare "interrupted": whether scores.csv or any figure had been written was not said. An
    earlier run's files are not claimed, and those the demo writes are named: they read as this run's."""
    from echo import cli

    model, out = quick_demo(tmp_path, monkeypatch)
    for earlier in ("scores.csv", "projection_fan.png", "notes.txt"):  # notes.txt: the user's own
        (out / earlier).write_text("an earlier run's")
    interrupt_call(monkeypatch, owner, name, number)
    assert cli.main(["demo", "--model", str(model), "--out", str(out)]) == 130
    assert capsys.readouterr().err == f"interrupted: {message.format(out=out)}\n"


def test_a_full_disk_names_the_folder_and_the_files_written(tmp_path, monkeypatch, capsys):
    """A full disk at a figure said "error: [Errno 28] No space left on device" alone: neither the folder nor
    which of its files the demo had written."""
    from echo import cli

    model, out = quick_demo(tmp_path, monkeypatch)
    saved = []

    def disk_full_at_the_second_figure(figure, path):
        saved.append(path)
        if len(saved) == 2:
            raise OSError(28, "No space left on device")
        path.write_bytes(b"a figure")
        return path

    monkeypatch.setattr(plots, "save", disk_full_at_the_second_figure)
    assert cli.main(["demo", "--model", str(model), "--out", str(out)]) == 1
    assert capsys.readouterr().err.endswith(
        f"error: {out}/: the scores and figures could not be written ([Errno 28] No space left on device)\n"
        f"kept {saved[0].name}, scores.csv in {out}/; the rest was not written\n")


def test_demo_deletes_the_temporaries_a_killed_run_left(tmp_path, monkeypatch):
    """A demo killed while writing left `scores.csv.<pid>.tmp` in --out, which no later run removed."""
    from echo import cli

    model, out = quick_demo(tmp_path, monkeypatch)
    killed = out / f"scores.csv.{2**22 + 1}.tmp"  # above any pid_max: no process has this id
    running = out / "roc_demo_fan.png.1.tmp"  # process 1 runs: this one may be being written
    killed.write_text("half")
    running.write_text("half")
    assert cli.main(["demo", "--model", str(model), "--out", str(out)]) == 0
    assert not killed.exists() and running.exists() and (out / "scores.csv").is_file()


def test_demo_deletes_no_temporary_of_the_users_own_in_out(tmp_path, monkeypatch):
    """--out may be a folder of the user's files: one named like any temporary (`draft.<dead pid>.tmp`) was
    deleted as a killed demo's."""
    from echo import cli

    model, out = quick_demo(tmp_path, monkeypatch)
    dead = 2**22 + 1  # above any pid_max: no process has this id
    theirs = [out / f"draft.{dead}.tmp", out / f"scores.csv.old.{dead}.tmp", out / f"roc_{dead}.png.{dead}.tmp"]
    for path in theirs:
        path.write_text("the user's")
    assert cli.main(["demo", "--model", str(model), "--out", str(out)]) == 0
    assert all(path.read_text() == "the user's" for path in theirs)


def test_demo_without_scikit_learn_names_the_package_to_install(tmp_path, monkeypatch, capsys):
    """The message named 'sklearn', which is not the name pip installs scikit-learn by."""
    from echo import cli

    for name in {"sklearn", *(name for name in sys.modules if name.split(".")[0] == "sklearn")}:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    monkeypatch.setattr(demo, "build_task", lambda *args: pytest.fail("the work started"))
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "'scikit-learn'" in error and "echo-fm[eval]" in error and "Traceback" not in error


def test_an_interrupted_figure_leaves_the_earlier_file_and_no_open_figure(tmp_path, monkeypatch):
    """A PNG half written when Ctrl-C came replaced the earlier run's whole one, and the figure stayed open."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from echo.eval import plots

    def interrupted(figure, target, **kwargs):
        Path(target).write_bytes(b"\x89PNG\r\n")
        raise KeyboardInterrupt

    path = tmp_path / "projection.png"
    path.write_bytes(b"earlier run")
    monkeypatch.setattr(Figure, "savefig", interrupted)
    open_before = plt.get_fignums()
    with pytest.raises(KeyboardInterrupt):
        plots.projection_plot(np.eye(4), ["a", "a", "b", "b"], path, "title")
    assert path.read_bytes() == b"earlier run"
    assert [p.name for p in tmp_path.iterdir()] == ["projection.png"]
    assert plt.get_fignums() == open_before


def test_score_histogram_draws_both_classes_on_the_same_bins(tmp_path, monkeypatch):
    """Each class binned over its own range drew a tight normal class as invisible slivers beside the
    anomalies' wide bars."""
    from echo.eval import plots
    from echo.eval.anomaly import Clip

    widths = {}
    save = plots.save

    def recording(figure, path):
        widths[path.name] = [bar.get_width() for bar in figure.axes[0].patches]
        return save(figure, path)

    monkeypatch.setattr(plots, "save", recording)
    labels = [0] * 10 + [1] * 10
    clips = [Clip(Path(f"c{i}"), "demo", "fan", "16000 Hz", None, "test", label) for i, label in enumerate(labels)]
    scores = np.concatenate([np.linspace(1e-5, 1.1e-5, 10), np.linspace(0, 1e-3, 10)])
    plots.anomaly_plots(clips, scores, tmp_path)
    bars = widths["scores_demo_fan.png"]
    assert len(bars) == 60 and max(bars) == pytest.approx(min(bars), rel=1e-9)


def test_each_class_has_one_colour_in_every_figure(tmp_path, monkeypatch):
    """The score histogram drew normal blue and anomalous orange, the projection anomalous blue and normal
    orange; and a machine without normal test clips drew its anomalous ones in normal's colour."""
    from matplotlib.colors import to_rgb

    from echo.eval import plots
    from echo.eval.anomaly import Clip

    colours, save = [], plots.save

    def recording(figure, path):
        axis = figure.axes[0]
        drawn = [(bars.patches[0].get_label(), bars.patches[0].get_facecolor()) for bars in axis.containers] + \
            [(points.get_label(), points.get_facecolor()[0]) for points in axis.collections]
        colours.extend((label.split(" (")[0], to_rgb(colour)) for label, colour in drawn)
        return save(figure, path)

    monkeypatch.setattr(plots, "save", recording)
    names = {0: "normal", 1: "anomalous", None: "unlabelled"}
    for machine, labels in (("fan", [0, 1, None] * 3), ("pump", [1, None] * 3)):
        clips = [Clip(Path(f"{machine}{i}"), "dev", machine, "00", None, "test", label)
                 for i, label in enumerate(labels)]
        plots.anomaly_plots(clips, np.linspace(0, 1, len(clips)), tmp_path)
        plots.projection_plot(np.eye(len(labels)), [names[label] for label in labels], tmp_path / "p.png", "title")
    assert {name for name, _ in colours} == set(names.values())
    each = {name: {colour for drawn, colour in colours if drawn == name} for name in names.values()}
    assert all(len(drawn) == 1 for drawn in each.values()), each
    assert len({*each["normal"], *each["anomalous"], *each["unlabelled"]}) == 3


def test_plots_leave_the_users_matplotlib_backend_and_write_png(tmp_path):
    """An interactive session's backend is the user's: plots are Figures of their own, outside pyplot."""
    import matplotlib

    from echo.eval import plots

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        path = plots.projection_plot(np.eye(4), ["a", "a", "b", "b"], tmp_path / "projection.png", "title")
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("module, package, extra", [
    ("sklearn.metrics", "scikit-learn", "eval"), ("faiss", "faiss-cpu", "faiss"), ("scipy.io", "scipy", "eval"),
    ("soundfile", "soundfile", "audio")])
def test_a_missing_optional_module_is_named_by_what_pip_installs(monkeypatch, module, package, extra):
    from echo.eval import require

    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    assert any(requirement.startswith(package) for requirement in extras)  # the extra named does install it
    monkeypatch.setitem(sys.modules, module, None)  # an import of it raises ImportError
    with pytest.raises(ImportError, match=rf"needs the package '{package}'.*pip install 'echo-fm\[{extra}\]'"):
        require(module, "this")


def test_the_dev_extra_installs_on_macos_and_windows_where_triton_has_no_wheel():
    """triton publishes Linux wheels only: `pip install -e '.[dev]'` failed on macOS and Windows (no matching
    distribution for triton), where torch and every other dev package install and the Triton tests skip."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    requirements = pytest.importorskip("packaging.requirements")
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]

    def installed(platform: str, system: str) -> set[str]:
        environment = {"sys_platform": platform, "platform_system": system}
        return {requirement.name for requirement in map(requirements.Requirement, dev)
                if requirement.marker is None or requirement.marker.evaluate(environment)}

    assert "triton" in installed("linux", "Linux")
    assert "triton" not in installed("darwin", "Darwin") | installed("win32", "Windows")


def test_a_machines_clips_share_one_gain_that_puts_its_healthy_peak_at_PEAK():
    task = demo.build_task(seed=int(np.random.randint(1 << 30)), bank=3, tests=3, seconds=0.2)
    for members in task.machine_indices().values():
        healthy = [i for i in members if task.faults[i] is None]
        assert max(float(np.abs(task.signals[i]).max()) for i in healthy) == pytest.approx(demo.PEAK, rel=1e-6)


def test_each_machine_is_its_own_and_each_clip_has_its_fault_and_a_background_of_the_machines(monkeypatch):
    """The four machines are drawn from four seeds from MACHINE_SEED on (seeds pretraining never uses); a faulty
    clip's machine has the clip's fault at an incipient level, speed and load within the normal range; the
    backgrounds of a machine are drawn among all of its recordings."""
    bases, made, backgrounds = [], [], []
    random_machine, machine_signal, sample = synth.random_machine, synth.machine_signal, demo.bundled.sample

    def drawn(seed, *args, **kwargs):
        bases.append((seed, random_machine(seed, *args, **kwargs)))
        return bases[-1][1]

    def signal(machine, rate, *args, **kwargs):
        made.append(machine)
        return machine_signal(machine, rate, *args, **kwargs)

    def background(name):
        backgrounds.append(name)
        return sample(name)

    monkeypatch.setattr(synth, "random_machine", drawn)
    monkeypatch.setattr(synth, "machine_signal", signal)
    monkeypatch.setattr(demo.bundled, "sample", background)
    bank, tests = 20, 6
    task = demo.build_task(seed=int(np.random.randint(1 << 30)), bank=bank, tests=tests, seconds=0.2)
    seeds = [seed for seed, _ in bases]
    assert len(set(seeds)) == len(demo.MACHINES) and min(seeds) >= demo.MACHINE_SEED, seeds
    assert len(made) == len(task.clips) == len(backgrounds)
    per_machine = bank + 2 * tests
    for number, spec in enumerate(demo.MACHINES):
        base = bases[number][1]
        for i in task.machine_indices()[spec.name]:
            machine = made[i]
            assert machine.fault == task.faults[i]
            assert base.shaft_hz * 0.96 <= machine.shaft_hz <= base.shaft_hz * 1.04
            assert base.load * 0.75 <= machine.load <= base.load * 1.25
            assert base.fault_level * 0.05 <= machine.fault_level <= base.fault_level * 0.15
            assert (machine.bearing, machine.harmonics, machine.resonance_hz) == \
                (base.bearing, base.harmonics, base.resonance_hz)
        assert set(backgrounds[number * per_machine: (number + 1) * per_machine]) == set(spec.backgrounds)
