"""`python -m echo eval` end to end on generated data sets: separable anomalies give AUC near 1, anomalies
drawn like the normals give AUC near 0.5; tables, JSON and non-empty plots are written."""
import csv
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import echo
from conftest import pipe_watch, random_model, seeded_rng
from echo import host_memory
from echo.cli import main
from echo.eval import datasets, embed, plots

soundfile = pytest.importorskip("soundfile")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

RATE = 8000
ENCODE = embed._encode  # the encoder, for tests that count or fail its calls


def tone(rng, frequency, seconds=0.3, noise=0.05):
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * frequency * t + rng.uniform(0, 6)) + noise * rng.normal(size=len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return echo.save(random_model("tiny", depth=2), tmp_path_factory.mktemp("model") / "tiny.safetensors")


def run_eval(*arguments):
    return main(["eval", "--quiet", *map(str, arguments)])


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_dcase2023_separable(tmp_path, model_path, capsys):
    rng = seeded_rng()
    root = tmp_path / "dcase"
    for domain, frequency in (("source", 300), ("target", 500)):
        folder = root / "dev_data" / "fan"
        for i in range(6):
            for subset, label in (("train", "normal"), ("test", "normal"), ("test", "anomaly")):
                if subset == "train" or i < 4:
                    signal = tone(rng, frequency) if label == "normal" else rng.normal(size=int(0.3 * RATE)).astype(np.float32)
                    path = folder / subset / f"section_00_{domain}_{subset}_{label}_{i:04d}.wav"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    soundfile.write(str(path), signal, RATE)
    out = tmp_path / "out"
    assert run_eval("--task", "dcase2023", "--data", root, "--model", model_path, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "official score (dev)" in printed and "files/s" in printed
    rows = read_rows(out / "results.csv")
    assert {(r["domain"], r["metric"]) for r in rows} == {("source", "AUC"), ("target", "AUC"), ("both", "pAUC")}
    assert all(float(r["value"]) > 0.9 for r in rows)
    result = json.loads((out / "results.json").read_text())
    assert result["summary"]["official score (dev)"] > 0.9 and result["speed"]["encoded"] == 28
    assert result["domain_auc"] == "official"  # 2023 scores a domain's AUC by a rule: the one it used
    assert len(read_rows(out / "scores.csv")) == 16
    for name in ("roc_dev_fan.png", "scores_dev_fan.png", "projection.png"):
        assert (out / name).stat().st_size > 1000
    # second run: everything from the cache
    assert run_eval("--task", "dcase2023", "--data", root, "--model", model_path, "--out", out, "--no-plots") == 0
    assert json.loads((out / "results.json").read_text())["speed"]["from_cache"] == 28


def test_folder_not_separable_and_a_bad_file_with_a_kept_heap_on_the_cpu(tmp_path, model_path, monkeypatch,
                                                                         capsys):
    calls, drawn, save = [], {}, plots.save
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append("kept"))

    def recording(figure, path):
        axis = figure.axes[0]
        drawn[path.name] = [axis.get_title(), *(axis.get_legend_handles_labels()[1] if axis.get_legend() else [])]
        return save(figure, path)

    monkeypatch.setattr(plots, "save", recording)
    rng = seeded_rng()
    for name, count in (("normal", 12), ("test/normal", 24), ("test/anomalous", 24)):
        for i in range(count):
            path = tmp_path / "machine" / name / f"{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(path), tone(rng, 400, seconds=0.1, noise=1.0), RATE)  # anomalies drawn as normals
    (tmp_path / "machine" / "test" / "broken.wav").write_bytes(b"not audio")
    out = tmp_path / "out"
    assert run_eval("--task", "folder", "--data", tmp_path / "machine", "--model", model_path, "--out", out,
                    "--device", "cpu") == 0
    assert calls == ["kept"]
    auc = next(float(r["value"]) for r in read_rows(out / "results.csv") if r["metric"] == "AUC")
    assert abs(auc - 0.5) < 0.35  # 4.2 standard deviations (0.084) of the AUC of 24 x 24 exchangeable scores
    failures = read_rows(out / "failures.csv")
    assert [f["path"].endswith("broken.wav") for f in failures] == [True]
    # named after the folder alone, as the table: "roc_dev_machine.png", "machine (dev)" and "section 00" made them up
    assert (out / "roc_machine.png").stat().st_size > 1000 and (out / "scores_machine.png").is_file()
    assert not list(out.glob("*_dev_*.png"))
    result = json.loads((out / "results.json").read_text())
    assert result["domain_auc"] is None  # no domains, no rule: "official"
    # one's own folder: no DCASE split, section, domain or "official score" made up for it; what was scored is said
    assert set(result["summary"]) == {"AUC", "pAUC"} and result["summary"]["AUC"] == pytest.approx(auc)
    assert [set(group) for group in result["groups"]] == [{"metric", "value", "normals", "anomalies"}] * 2
    assert sorted(drawn) == ["projection.png", "roc_machine.png", "scores_machine.png"]
    assert drawn["roc_machine.png"] == ["machine", f"AUC {auc:.3f}"]  # "machine (dev)", "section 00 (AUC ...)"
    assert drawn["scores_machine.png"][0] == "machine"
    assert result["clips"] == {"bank": 12, "test normal": 24, "test anomalous": 24, "test unlabelled": 0}
    assert list(read_rows(out / "results.csv")[0]) == ["metric", "value", "normals", "anomalies"]
    assert list(read_rows(out / "scores.csv")[0]) == ["path", "label", "score"]
    printed = capsys.readouterr().out
    assert "scored 48 test clips (24 normal, 24 anomalous, 0 unlabelled: scores.csv only) against 12 normal bank " \
        "clips" in printed and "official" not in printed and "section" not in printed


def test_files_of_other_rates_or_channel_counts_are_refused_before_any_encoding(tmp_path, model_path, monkeypatch,
                                                                                 capsys):
    """Embeddings of other band counts or channel counts cannot be compared: the folder was refused once every file
    had been encoded (hours on a large set). Headers tell it first; rates of one band count may be mixed."""
    monkeypatch.setattr(embed, "_encode", lambda *args, **kwargs: pytest.fail("encoded before the refusal"))
    rng = seeded_rng()
    files = [("normal", 8000, 1, 3), ("test/normal", 48000, 1, 2), ("test/anomalous", 8000, 2, 1)]
    for name, rate, channels, count in files:
        for i in range(count):
            path = tmp_path / "machine" / name / f"{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            signal = rng.normal(size=(rate // 10, channels)).astype(np.float32)
            soundfile.write(str(path), signal, rate)
    (tmp_path / "machine" / "test" / "broken.wav").write_bytes(b"not audio")  # left to its reading
    assert run_eval("--task", "folder", "--data", tmp_path / "machine", "--model", model_path, "--out",
                    tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "would differ in size" in error
    for name, rate, channels, count in files:
        kind = "mono" if channels == 1 else f"{channels} channels"
        assert f"{count} {'file' if count == 1 else 'files'} at {rate} Hz, {kind} (e.g. {tmp_path / 'machine' / name}" \
            in error
    assert not (tmp_path / "out" / "cache").exists()
    same_bands = [rate for rate in (8000, 8001, 8100) if echo.geometry.n_bands(rate) == echo.geometry.n_bands(8000)]
    for i, rate in enumerate(same_bands):  # one band count: compared, as before
        soundfile.write(str(tmp_path / "machine" / "normal" / f"{i}.wav"), rng.normal(size=800), rate)
    for folder in ("test/normal", "test/anomalous"):
        for path in (tmp_path / "machine" / folder).glob("*.wav"):
            soundfile.write(str(path), rng.normal(size=800), 8000)
    monkeypatch.setattr(embed, "_encode", ENCODE)
    assert run_eval("--task", "folder", "--data", tmp_path / "machine", "--out", tmp_path / "out",
                    "--no-plots") == 0 and len(same_bands) > 1
    assert json.loads((tmp_path / "out" / "results.json").read_text())["model"] == "default"  # as encode and demo


def test_channels_and_bands_of_one_embedding_size_are_not_compared(tmp_path, model_path, monkeypatch, capsys):
    """48 kHz stereo (2 x 19 bands) and 96 kHz mono (38 bands) give embeddings of one size: they were compared,
    one file's second channel against the other's upper bands, where the README says they are refused."""
    monkeypatch.setattr(embed, "_encode", lambda *args, **kwargs: pytest.fail("encoded before the refusal"))
    assert 2 * echo.geometry.n_bands(48000) == echo.geometry.n_bands(96000)
    rng = seeded_rng()
    for name, rate, channels in (("normal/0", 48000, 2), ("normal/1", 48000, 2), ("test/normal/0", 48000, 2),
                                 ("test/anomalous/0", 96000, 1)):
        path = tmp_path / "machine" / f"{name}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), rng.normal(size=(rate // 20, channels)).astype(np.float32), rate)
    assert run_eval("--task", "folder", "--data", tmp_path / "machine", "--model", model_path, "--out",
                    tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "3 files at 48000 Hz, 2 channels" in error and "1 file at 96000 Hz, mono" in error


def test_a_test_clip_equal_to_a_bank_clip_or_of_another_length_is_noted(tmp_path, model_path, capsys):
    """A recording copied into both the bank and the test set, or a dead sensor's silence in both, scores 0: as
    normal as can be, without a word. A clip far shorter than the bank's scores high for its length alone."""
    rng = seeded_rng()
    for name, count in (("normal", 3), ("test/normal", 2), ("test/anomalous", 2)):
        for i in range(count):
            path = tmp_path / "machine" / name / f"{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(path), tone(rng, 400, seconds=0.2, noise=1.0), RATE)
    copy = tmp_path / "machine" / "test" / "normal" / "copy.wav"
    copy.write_bytes((tmp_path / "machine" / "normal" / "1.wav").read_bytes())
    short = tmp_path / "machine" / "test" / "anomalous" / "short.wav"
    soundfile.write(str(short), tone(rng, 400, seconds=0.05, noise=1.0), RATE)
    out = tmp_path / "out"
    assert run_eval("--task", "folder", "--data", tmp_path / "machine", "--model", model_path, "--out", out,
                    "--no-plots") == 0
    printed, notes = capsys.readouterr().out, json.loads((out / "results.json").read_text())["notes"]
    for note in (f"1 test clip with an embedding equal to a bank clip's (score 0; e.g. {copy})",
                 f"1 test clip under half or over twice the bank clips' median length (0.20 s; e.g. {short}, "
                 f"0.05 s)"):
        assert f"note: {note}" in printed and any(line.startswith(note) for line in notes)
    scores = {row["path"]: float(row["score"]) for row in read_rows(out / "scores.csv")}
    assert scores[str(copy)] == 0 and sorted(scores.values())[1] > 0


def test_a_folder_with_one_test_class_says_what_it_could_not_measure(tmp_path, model_path, capsys):
    """A folder's test clips all normal: nothing to measure, said without DCASE's split, section and domain."""
    rng = seeded_rng()
    for name, count in (("normal", 3), ("test/normal", 2)):
        for i in range(count):
            path = tmp_path / "machine" / name / f"{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(path), tone(rng, 400, seconds=0.2, noise=1.0), RATE)
    assert run_eval("--task", "folder", "--data", tmp_path / "machine", "--model", model_path, "--out",
                    tmp_path / "out", "--no-plots") == 0
    printed = capsys.readouterr().out
    assert "no labelled test clip with both classes: nothing to measure" in printed
    excluded = [line for line in printed.splitlines() if line.startswith("excluded (one class only): ")]
    assert excluded and all(line.endswith(": 2 normal, 0 anomalous") and "section" not in line for line in excluded)


def write_classes(base, frequencies, count, rng):
    for label, frequency in frequencies.items():
        for i in range(count):
            path = base / label / ("take 1" if i % 2 else "") / f"{i}.wav"  # files at any depth in a class folder
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(path), tone(rng, frequency, seconds=0.2), RATE)


def test_classes_of_ones_own_folders_by_leave_one_out_k_fold_and_a_split(tmp_path, model_path, capsys):
    """Fault classification of one's own labelled recordings: a folder per class, or train/ and test/ of them."""
    rng = seeded_rng()
    frequencies = {"healthy": 300, "bearing": 1500, "Gear wear": 3000}
    write_classes(tmp_path / "plant", frequencies, 6, rng)
    out = tmp_path / "out"
    assert run_eval("--task", "classes", "--data", tmp_path / "plant", "--model", model_path, "--out", out, "--k",
                    "3", "--no-plots") == 0
    rows = read_rows(out / "results.csv")
    assert {(r["protocol"], r["view"], r["files"]) for r in rows} == {("loocv", "all", "18"), ("kfold", "all", "18")}
    assert all(float(r["accuracy"]) == 1.0 for r in rows)  # tones of three pitches
    details = json.loads((out / "results.json").read_text())["results"]
    assert all(sorted(d["classes"]) == sorted(frequencies) for d in details)
    write_classes(tmp_path / "split" / "Train", frequencies, 4, rng)
    write_classes(tmp_path / "split" / "test", {**frequencies, "cracked": 6000}, 2, rng)
    assert run_eval("--task", "classes", "--data", tmp_path / "split", "--model", model_path, "--out", out,
                    "--k", "3", "--no-plots") == 0
    rows = read_rows(out / "results.csv")
    assert [(r["protocol"], r["files"]) for r in rows] == [("split", "8")]
    assert float(rows[0]["accuracy"]) == 0.75  # the two cracked files, a class never trained, are always wrong
    assert "test classes with no train folder (always mispredicted): cracked" in capsys.readouterr().out


def test_classes_of_multi_channel_files_are_viewed_per_channel_and_fused(tmp_path, model_path):
    """A 3-axis accelerometer's files were only searched concatenated, and --channels was refused as if they had one
    channel; each channel is now viewed alone and fused, as MAFAULDA's. Only channel 1 tells the classes apart."""
    rng = seeded_rng()
    for label, frequency in {"healthy": 300, "bearing": 1500, "gear": 3000}.items():
        for i in range(4):
            path = tmp_path / "axes" / label / f"{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            noise = rng.normal(size=(2, 1600))
            soundfile.write(str(path), np.stack([noise[0], tone(rng, frequency, seconds=0.2), noise[1]], 1), RATE)
    out = tmp_path / "out"
    assert run_eval("--task", "classes", "--data", tmp_path / "axes", "--model", model_path, "--out", out,
                    "--k", "3", "--protocol", "loocv", "--channels", "0,1", "--no-plots") == 0
    accuracy = {r["view"]: float(r["accuracy"]) for r in read_rows(out / "results.csv")}
    assert set(accuracy) == {"all", "channel 0", "channel 1", "channel 2", "fused 0,1"}
    assert accuracy["channel 1"] == 1.0 and max(accuracy["channel 0"], accuracy["channel 2"]) < 1.0


def test_fault_searches_show_their_progress(tmp_path, model_path, capsys):
    """After the embedding bar, a fault set's searches (a view and protocol each, minutes for MAFAULDA's size)
    ran without a word until the table."""
    write_classes(tmp_path / "plant", {"healthy": 300, "bearing": 1500}, 5, seeded_rng())
    assert main(["eval", "--task", "classes", "--data", str(tmp_path / "plant"), "--model", str(model_path),
                 "--out", str(tmp_path / "out"), "--k", "1", "--no-plots"]) == 0
    printed = capsys.readouterr().err
    assert "searching: 100%" in printed and "2/2" in printed  # leave-one-out and 5-fold


def test_classes_layouts_that_would_lose_labels_are_refused(tmp_path):
    rng = seeded_rng()
    write_classes(tmp_path / "a", {"x": 300, "y": 600}, 2, rng)
    soundfile.write(str(tmp_path / "a" / "loose.wav"), tone(rng, 300), RATE)
    with pytest.raises(ValueError, match=r"1 audio file outside any class folder \(e.g. loose.wav\)"):
        datasets.load("classes", tmp_path / "a")
    write_classes(tmp_path / "b" / "train", {"x": 300, "y": 600}, 2, rng)
    with pytest.raises(ValueError, match="train/ without test/: a split needs both"):
        datasets.load("classes", tmp_path / "b")
    (tmp_path / "c" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="no audio file .* in class folders"):
        datasets.load("classes", tmp_path / "c")


def test_mafaulda_faults_with_channels(tmp_path, model_path):
    rng = seeded_rng()
    t = np.arange(2500) / 50000
    for label, frequency in (("normal", 800), ("imbalance", 3000), ("overhang/ball_fault/6g", 9000)):
        for i in range(5):
            table = np.stack([np.sin(2 * np.pi * frequency * (c + 1) * t + rng.uniform(0, 6)) for c in range(8)], 1)
            path = tmp_path / "mafaulda" / label / f"{i}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savetxt(path, table + 0.01 * rng.normal(size=table.shape), delimiter=",")
    out = tmp_path / "out"
    assert run_eval("--task", "mafaulda", "--data", tmp_path / "mafaulda", "--model", model_path, "--out", out,
                    "--k", "3") == 0
    rows = read_rows(out / "results.csv")
    views = {(r["protocol"], r["view"]) for r in rows}
    assert ("loocv", "all") in views and ("kfold", "channel 6") in views and ("loocv", "fused 0,1,2,3,4,5,6") in views
    assert len(rows) == 2 * (1 + 7 + 1)
    assert all(float(r["accuracy"]) == 1.0 for r in rows if r["view"] == "all")
    assert all(r["fold_mean"] for r in rows if r["protocol"] == "kfold")
    assert (out / "confusion_loocv_all.png").stat().st_size > 1000


def test_wrong_layout_is_a_clear_error(tmp_path, model_path, capsys):
    assert run_eval("--task", "dcase2021", "--data", tmp_path, "--model", model_path, "--out", tmp_path / "o",
                    "--cache", tmp_path / "c") == 2
    assert "no DCASE machine folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()  # a refused run leaves no empty folder


def test_a_model_that_does_not_load_leaves_no_empty_out_folder(tmp_path, capsys):
    for name in ("normal/a.wav", "test/b.wav"):
        (tmp_path / "machine" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "machine" / name).write_text("")
    assert run_eval("--task", "folder", "--data", tmp_path / "machine", "--model", tmp_path / "none.safetensors",
                    "--out", tmp_path / "out" / "run") == 2
    assert f"checkpoint {tmp_path / 'none.safetensors'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_deletes_the_temporaries_a_killed_run_left(tmp_path, model_path):
    """An eval killed while writing its results left `scores.csv.<pid>-<tid>.tmp` in --out, which no later run
    removed: one more at every kill."""
    out = tmp_path / "o"
    out.mkdir()
    killed = [out / f"scores.csv.{2**22 + 1}-7.tmp", out / f"roc_pump.png.{2**22 + 1}-7.tmp"]  # above any pid_max
    running = out / "results.json.1-1.tmp"  # process 1 runs: this one may be being written
    theirs = [out / "notes.2024.tmp", out / f"photo.png.{2**22 + 1}-7.tmp"]  # the user's, not eval's temporaries
    for path in killed + [running] + theirs:
        path.write_text("half")
    assert run_eval("--task", "folder", "--data", tmp_path / "none", "--model", model_path, "--out", out) == 2
    assert sorted(out.iterdir()) == sorted([running] + theirs)


def test_models_by_name_and_a_cache_per_dtype(tmp_path, capsys):
    """--model takes the names `encode` takes; bf16 embeddings (~5e-3 off) never answer a float32 run."""
    rng = seeded_rng()
    for name in ("normal/n", "test/normal/t", "test/anomalous/a"):
        for i in range(3):
            path = tmp_path / "machine" / f"{name}{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(path), tone(rng, 400), RATE)
    common = ("--task", "folder", "--data", tmp_path / "machine", "--model", "default", "--no-plots")
    assert run_eval(*common, "--out", tmp_path / "o", "--dtype", "bfloat16") == 0
    assert "(0 from the cache" in capsys.readouterr().out
    assert run_eval(*common, "--out", tmp_path / "o") == 0
    assert "(0 from the cache" in capsys.readouterr().out
    assert run_eval(*common, "--out", tmp_path / "o") == 0
    assert "(9 from the cache" in capsys.readouterr().out


def test_roc_figures_only_where_test_clips_have_both_labels(tmp_path):
    from pathlib import Path

    from echo.eval import plots
    from echo.eval.anomaly import Clip

    clips = [Clip(Path(f"{machine}{i}"), "dev", machine, "00", None, "test", label)
             for machine, labels in (("fan", [0, 1, 0, 1]), ("pump", [None] * 4)) for i, label in enumerate(labels)]
    written = plots.anomaly_plots(clips, np.linspace(0, 1, len(clips)), tmp_path)
    assert sorted(path.name for path in written) == ["roc_dev_fan.png", "scores_dev_fan.png", "scores_dev_pump.png"]
    assert all(path.stat().st_size > 1000 for path in written)


def test_score_histograms_count_whole_clips_and_write_small_scores_in_powers_of_ten(tmp_path, monkeypatch):
    """A random model's scores (~3e-4, a few 1e-6 apart) were ticked 0.000296, 0.000298, ... labels touching, and
    counts of 1-4 clips at 0.5, 1.5, ..."""
    from pathlib import Path

    from echo.eval import plots
    from echo.eval.anomaly import Clip

    axes, save = [], plots.save

    def recording(figure, path):
        figure.canvas.draw()  # ticks and the offset text are made when drawn
        axes.append(figure.axes[0])
        return save(figure, path)

    monkeypatch.setattr(plots, "save", recording)
    rng = seeded_rng()
    clips = [Clip(Path(f"{i}.wav"), "dev", "pump", "00", None, "test", i % 2) for i in range(40)]
    plots.anomaly_plots(clips, 3e-4 + rng.normal(0, 2e-6, 40) + np.arange(40) % 2 * 3e-6, tmp_path, dcase=False)
    histogram = axes[-1]
    assert all(float(tick).is_integer() for tick in histogram.get_yticks())
    assert histogram.xaxis.get_offset_text().get_text() != ""  # "1e-4" once, the ticks 2.96, 2.98, ...
    assert max(len(label.get_text()) for label in histogram.get_xticklabels()) <= 5


def test_score_histograms_over_two_decades_are_logarithmic(tmp_path, saved_figures):
    """The demo's pump (AUC 1: healthy 5e-6 to 1.3e-5, faults 4e-5 to 1.4e-3) drew every healthy clip and two faults
    in the first of 30 linear bars, as though they overlapped."""
    from pathlib import Path

    from echo.eval.anomaly import Clip

    def histogram(scores):
        labels = [0] * (len(scores) // 2) + [1] * (len(scores) - len(scores) // 2)
        clips = [Clip(Path(f"{i}.wav"), "dev", "pump", "00", None, "test", label) for i, label in enumerate(labels)]
        plots.anomaly_plots(clips, np.asarray(scores), tmp_path, dcase=False)
        return saved_figures["scores_pump.png"].axes[0]

    axis = histogram([*np.geomspace(5e-6, 1.3e-5, 12), *np.geomspace(4e-5, 1.4e-3, 12)])
    normal, anomalous = ([bar.get_height() for bar in bars] for bars in axis.containers)
    assert axis.get_xscale() == "log" and not any(n and a for n, a in zip(normal, anomalous))
    assert histogram(np.linspace(1e-5, 3e-5, 24)).get_xscale() == "linear"  # one decade: linear, as before


def test_a_score_histogram_of_one_repeated_score_draws_it_where_it_is(tmp_path, saved_figures):
    """Every test clip scoring 3e-4 (a collapsed encoder) was drawn as one bar at 0, on an axis from -0.5 to 0.5."""
    from pathlib import Path

    from echo.eval.anomaly import Clip

    clips = [Clip(Path(f"{i}.wav"), "dev", "pump", "00", None, "test", i % 2) for i in range(8)]
    plots.anomaly_plots(clips, np.full(8, 3e-4), tmp_path, dcase=False)
    low, high = saved_figures["scores_pump.png"].axes[0].get_xlim()
    assert low < 3e-4 < high and high - low < 1e-4


def test_a_section_whose_labelled_clips_are_all_normal_gets_no_roc_curve(tmp_path, monkeypatch):
    """AUC is undefined over one class: such a section is left out of the ROC figure (scikit-learn gives no curve
    and an AUC of NaN, or raises), while its machine's other sections and score histogram are drawn."""
    from pathlib import Path

    from echo.eval import plots
    from echo.eval.anomaly import Clip

    legends, save = {}, plots.save

    def recording(figure, path):
        legends[path.name] = figure.axes[0].get_legend_handles_labels()[1]
        return save(figure, path)

    monkeypatch.setattr(plots, "save", recording)
    clips = [Clip(Path(f"{section}-{i}"), "dev", "fan", section, None, "test", label)
             for section, labels in (("00", [0, 1, 0, 1]), ("01", [0, 0, 0])) for i, label in enumerate(labels)]
    written = plots.anomaly_plots(clips, np.linspace(0, 1, len(clips)), tmp_path)
    assert sorted(path.name for path in written) == ["roc_dev_fan.png", "scores_dev_fan.png"]
    assert [label.split(" (")[0] for label in legends["roc_dev_fan.png"]] == ["section 00"]


@pytest.fixture
def saved_figures(monkeypatch):
    """Each figure the plots write, by file name, as saved: laid out and drawn, so texts have their places."""
    figures, save = {}, plots.save

    def recording(figure, path):
        written = save(figure, path)
        figures[path.name] = figure
        return written

    monkeypatch.setattr(plots, "save", recording)
    return figures


def test_a_confusion_matrix_reads_on_dark_cells_and_long_class_names_fit(tmp_path, saved_figures):
    """Counts were black on every cell, unreadable on the dark blue of a good classifier's diagonal; and three
    30-character class names, in a figure of fixed size, pushed the title out of it."""
    from echo.eval import faults

    names = ["outer_race_fault_0.021in_load3", "inner_race_fault_0.007in_load0", "normal_baseline_load0"]
    truth = np.repeat(names, 4)
    predicted = truth.copy()
    predicted[::3] = names[0]
    plots.confusion_plot(faults.score(truth, predicted, sorted(names), "kfold", "all"), tmp_path / "c.png")
    figure = saved_figures["c.png"]
    axis = figure.axes[0]
    colours = {(text.get_text(), text.get_color()) for text in axis.texts}
    assert colours == {("4", "white"), ("3", "white"), ("1", "black"), ("0", "black")}
    for text in [axis.title, *axis.get_xticklabels(), *axis.get_yticklabels()]:
        assert figure.bbox.contains(*text.get_window_extent().p0) and \
            figure.bbox.contains(*text.get_window_extent().p1), text.get_text()


def test_a_projection_of_15_classes_tells_each_apart_and_its_legend_hides_no_point(tmp_path, saved_figures):
    """Past the ten colours of the cycle, five pairs of classes were drawn alike; and the legend, inside the axes,
    covered a third of the points."""
    from matplotlib.colors import to_rgb

    names = [f"{kind}_fault_0.0{size}in_load3" for kind in ("ball", "inner_race", "outer_race") for size in range(5)]
    plots.projection_plot(seeded_rng().normal(size=(45, 8)), names * 3, tmp_path / "p.png", "title")
    axis = saved_figures["p.png"].axes[0]
    looks = {(to_rgb(points.get_facecolor()[0]), points.get_paths()[0].vertices.round(3).tobytes())
             for points in axis.collections}
    assert len(axis.collections) == len(looks) == 15
    assert not axis.get_legend().get_window_extent().overlaps(axis.get_window_extent())


def test_unmeasured_figures_are_written_as_json_null():
    """A domain with one class has no AUC (NaN): results.json must stay JSON, which has no NaN."""
    from echo.eval.cli import _json_values

    summary = {"AUC (dev)": float("nan"), "pAUC": 0.5, "groups": [{"AUC": float("inf")}, ("x", float("-inf"))]}
    written = json.loads(json.dumps(_json_values(summary), allow_nan=False))
    assert written == {"AUC (dev)": None, "pAUC": 0.5, "groups": [{"AUC": None}, ["x", None]]}


def test_an_out_that_cannot_be_written_is_refused_before_the_encoding(tmp_path, model_path, capsys):
    (tmp_path / "file").write_text("")
    assert run_eval("--task", "folder", "--data", tmp_path, "--model", model_path,
                    "--out", tmp_path / "file" / "results") == 2
    assert f"cannot be written: {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    assert run_eval("--task", "folder", "--data", tmp_path, "--model", model_path, "--out", tmp_path / "file") == 2
    assert f"--out {tmp_path / 'file'} cannot be written: {tmp_path / 'file'} is a file, not a folder" in \
        capsys.readouterr().err  # was the OS's "File exists"


@pytest.mark.parametrize("task, option, message", [
    ("mafaulda", ("--channels", "0,9"), r"channels \[0, 9\] must be a non-empty subset of 0..6"),
    ("mafaulda", ("--channels", "0;1"), "--channels '0;1': channel numbers separated by commas"),
    ("folder", ("--channels", "0"), "--channels chooses the channels fault classification fuses; folder is anomaly"),
    ("mafaulda", ("--protocol", "split"), "--protocol split: mafaulda has no train/test split"),
    ("mafaulda", ("--k", "0"), "--k 0: at least one neighbour"),
    ("mafaulda", ("--folds", "1"), "--folds 1: k-fold needs two folds or more"),
    ("mafaulda", ("--seed", "-1"), r"--seed -1: a shuffle seed is from 0 to 2\*\*32 - 1"),  # was "choose fewer folds"
    ("folder", ("--batch-files", "0"), "--batch-files 0: at least one file per batch"),  # was after the model loaded
    ("folder", ("--eps", "0"), r"--eps 0.0: the harmonic means' floor must be in \(0, 1\)"),
    ("folder", ("--eps", "-1"), r"--eps -1.0: the harmonic means' floor must be in \(0, 1\)"),
    # ignored before: the user meant them to change something
    ("mafaulda", ("--labels", "list.csv"), "--labels: only the DCASE tasks read label lists"),
    ("folder", ("--domain-auc", "siren"), "--domain-auc: only DCASE 2022-2025 score a domain's AUC by either rule"),
    ("folder", ("--protocol", "loocv"), "--protocol chooses among fault classification protocols; folder is"),
    # were ignored: the anomaly score is the 1-NN cosine distance, fault classification searches with torch only
    ("folder", ("--k", "3"), "--k is an option of fault classification; folder is anomaly detection"),
    ("folder", ("--folds", "10"), "--folds is an option of fault classification; folder is anomaly detection"),
    ("folder", ("--seed", "2"), "--seed is an option of fault classification; folder is anomaly detection"),
    ("mafaulda", ("--search", "faiss"), "--search chooses the anomaly detection search; mafaulda is fault"),
    ("mafaulda", ("--protocol", "loocv", "--folds", "10"), "--folds: only the kfold protocol takes it; mafaulda runs "
                                                           "loocv"),
    ("mafaulda", ("--protocol", "loocv", "--seed", "2"), "--seed: only the kfold protocol takes it"),
])
def test_options_the_data_set_cannot_take_are_refused_before_the_encoding(tmp_path, model_path, capsys, monkeypatch,
                                                                          task, option, message):
    """They failed only after every file was encoded (hours on a large set), or were ignored (--channels)."""
    import echo.eval.cli

    monkeypatch.setattr(echo.eval.cli, "embed_files", lambda *args, **kwargs: pytest.fail("encoded"))
    for name in ("mafaulda/normal/0.csv", "mafaulda/imbalance/0.csv", "folder/normal/a.wav", "folder/test/b.wav"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert run_eval("--task", task, "--data", tmp_path / task, "--model", model_path, "--out", tmp_path / "out",
                    *option) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # made only for a run that goes ahead


def folder_task_without(tmp_path, model_path, monkeypatch, *packages) -> tuple:
    """eval's options for a folder task of two empty files, with `packages` not installed (importing one raises
    ImportError) and the encoding a test failure: what is refused must be refused before it."""
    import sys

    import echo.eval.cli

    for name in {*packages, *(name for name in sys.modules if name.split(".")[0] in packages)}:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(echo.eval.cli, "embed_files", lambda *args, **kwargs: pytest.fail("encoded"))
    for name in ("normal/a.wav", "test/b.wav"):
        (tmp_path / "machine" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "machine" / name).write_text("")
    return "--task", "folder", "--data", tmp_path / "machine", "--model", model_path, "--out", tmp_path / "out"


@pytest.mark.parametrize("missing, options, package, extra, purpose", [
    ("sklearn", (), "scikit-learn", "eval", "computing the evaluation's metrics"),
    ("matplotlib", (), "matplotlib", "eval", "drawing the plots (--no-plots leaves them out)"),
    ("faiss", ("--search", "faiss", "--no-plots"), "faiss-cpu", "faiss", "--search faiss")])
def test_a_missing_optional_package_is_named_before_the_encoding(tmp_path, model_path, capsys, monkeypatch, missing,
                                                                 options, package, extra, purpose):
    """scikit-learn (AUC), matplotlib (plots) and faiss (--search faiss) were first imported after every file was
    encoded; the demo checks them first, so does eval. The message is a sentence: it read "the evaluation's metrics
    needs" and "the plots (or --no-plots) needs"."""
    assert run_eval(*folder_task_without(tmp_path, model_path, monkeypatch, missing), *options) == 2
    error = capsys.readouterr().err
    assert f"error: {purpose} needs the package '{package}', which is not installed: pip install 'echo-fm[{extra}]'" \
        in error


def test_a_bare_install_is_told_the_extra_with_every_package_eval_needs(tmp_path, model_path, capsys, monkeypatch):
    """Without soundfile and scikit-learn (`pip install echo-fm`), eval named soundfile's own extra, `audio`, and
    once that was installed, `eval`: two installs where one does."""
    assert run_eval(*folder_task_without(tmp_path, model_path, monkeypatch, "soundfile", "sklearn")) == 2
    assert "pip install 'echo-fm[eval]'" in capsys.readouterr().err


def test_a_cache_that_cannot_be_written_is_refused_before_the_encoding(tmp_path, model_path, capsys, monkeypatch):
    """A --cache under a file failed in the first batch, after the data set was read and the model loaded."""
    import echo.eval.cli

    monkeypatch.setattr(echo.eval.cli, "embed_files", lambda *args, **kwargs: pytest.fail("encoded"))
    for name in ("normal/a.wav", "test/b.wav"):
        (tmp_path / "machine" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "machine" / name).write_text("")
    (tmp_path / "file").write_text("")
    assert run_eval("--task", "folder", "--data", tmp_path / "machine", "--model", model_path,
                    "--out", tmp_path / "out", "--cache", tmp_path / "file" / "cache") == 2
    assert (f"--cache {tmp_path / 'file' / 'cache'} cannot be written: {tmp_path / 'file'} is a file, not a folder"
            in capsys.readouterr().err)


def folder_task_of_nine(tmp_path, model_path) -> tuple:
    """A folder-task data set of 9 tones (3 bank clips, 3 normal and 3 anomalous test clips); eval's options for it,
    3 files a batch."""
    rng = seeded_rng()
    for name in ("normal/n", "test/normal/t", "test/anomalous/a"):
        for i in range(3):
            path = tmp_path / "machine" / f"{name}{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(path), tone(rng, 400, seconds=0.1), RATE)
    return ("--task", "folder", "--data", tmp_path / "machine", "--model", model_path, "--out", tmp_path / "out",
            "--batch-files", 3, "--no-plots")


def test_a_pipe_in_the_data_is_reported_not_opened_for_its_header(tmp_path, model_path):
    """The check of the files' headers before the encoding opened a pipe named .wav, which waits for a writer for
    ever: eval hung before its first batch. The timer lets such a reader go, and says it found one waiting."""
    options = folder_task_of_nine(tmp_path, model_path)
    pipe = tmp_path / "machine" / "normal" / "pipe.wav"
    os.mkfifo(pipe)
    with pipe_watch(pipe) as waited:
        assert run_eval(*options) == 0
    assert not waited
    assert [(row["path"], row["reason"]) for row in read_rows(tmp_path / "out" / "failures.csv")] == [
        (str(pipe), "ValueError: not a regular file")]


def counted_encoder(monkeypatch, error=None, from_call=1) -> list:
    """The sizes of the batches the encoder is called with; with `error`, raised from call number `from_call` on."""
    calls = []

    def encode(model, signals, *args, **kwargs):
        calls.append(len(signals))
        if error is not None and len(calls) >= from_call:
            raise error
        return ENCODE(model, signals, *args, **kwargs)

    monkeypatch.setattr(embed, "_encode", encode)
    return calls


DEVICE_ERROR = RuntimeError("CUDA error: an illegal memory access was encountered")
DEVICE_FAILURE = ("error: the encoder failed on a batch of 3 signals and on each of them alone, with the same error, "
                  "so the device or the model fails, not the signals: RuntimeError: CUDA error: an illegal memory "
                  "access was encountered\n")


@pytest.mark.parametrize("error, said, calls_made", [
    (MemoryError(), "\nMemoryError\n", [3, 3]),  # a traceback: no one foresaw it
    (DEVICE_ERROR, DEVICE_FAILURE, [3, 3, 1, 1, 1]),  # the second batch, then each of its files alone
], ids=["MemoryError", "CUDA error"])
def test_an_error_that_stops_the_embedding_is_followed_by_what_was_kept_and_how_to_resume(
        tmp_path, model_path, capsys, monkeypatch, error, said, calls_made):
    """An error other than Ctrl-C (a MemoryError, a failing GPU) ended in its traceback or line alone, silent on the
    batches saved in the cache before it and on the same command resuming from them."""
    options = folder_task_of_nine(tmp_path, model_path)
    calls = counted_encoder(monkeypatch, error, from_call=2)
    assert run_eval(*options) == 1
    printed, folder = capsys.readouterr().err, next((tmp_path / "out" / "cache").iterdir())
    assert calls == calls_made and printed.endswith(
        f"{said}embeddings of 3 files are kept in {folder}; the same command encodes only the other 6\n")
    calls = counted_encoder(monkeypatch)
    assert run_eval(*options) == 0
    speed = json.loads((tmp_path / "out" / "results.json").read_text())["speed"]
    assert calls == [3, 3] and (speed["from_cache"], speed["encoded"], speed["embedded"]) == (3, 6, 9)


def test_the_speed_line_times_the_plots_apart_from_the_search(tmp_path, model_path, monkeypatch, capsys):
    """Drawing the plots was counted as "search + metrics": 3.9 s on 300 clips, 0.5 s of them without plots."""
    options = [option for option in folder_task_of_nine(tmp_path, model_path) if option != "--no-plots"]
    clock, elapsed = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + elapsed[0])

    def plots_of_an_hour(*args, **kwargs):  # an hour on the clock, not in the test
        elapsed[0] += 3600
        return []
    monkeypatch.setattr(plots, "anomaly_plots", plots_of_an_hour)
    monkeypatch.setattr(plots, "projection_plot", lambda *args, **kwargs: Path("projection.png"))
    assert run_eval(*options) == 0
    speed = json.loads((tmp_path / "out" / "results.json").read_text())["speed"]
    assert speed["search_and_metrics_seconds"] < 3600 <= speed["plot_seconds"]
    assert f"plots {speed['plot_seconds']:.1f} s" in capsys.readouterr().out


def test_an_error_before_any_batch_was_saved_is_said_alone_as_before(tmp_path, model_path, capsys, monkeypatch):
    """With nothing in the cache there is nothing kept to tell of."""
    options = folder_task_of_nine(tmp_path, model_path)
    calls = counted_encoder(monkeypatch, DEVICE_ERROR)
    assert run_eval(*options) == 1
    assert calls == [3, 1, 1, 1] and capsys.readouterr().err == DEVICE_FAILURE
    counted_encoder(monkeypatch, MemoryError())
    with pytest.raises(MemoryError):  # no one foresaw it: Python's traceback, as before
        run_eval(*options)
    assert "kept" not in capsys.readouterr().err


def test_a_full_disk_at_the_results_names_the_folder_and_the_embeddings_kept(tmp_path, model_path, capsys,
                                                                             monkeypatch):
    """Once every file was embedded, a full disk at results.csv said "error: [Errno 28] No space left on device"
    alone: neither where, nor that the embeddings were kept and the same command would not encode them again."""
    from echo import atomic

    options = folder_task_of_nine(tmp_path, model_path)
    real_write_csv = atomic.write_csv

    def disk_full_at_the_results(path, *args):
        if path.name == "results.csv":
            raise OSError(28, "No space left on device")
        return real_write_csv(path, *args)

    monkeypatch.setattr(atomic, "write_csv", disk_full_at_the_results)
    assert run_eval(*options) == 1
    out = tmp_path / "out"
    assert capsys.readouterr().err == (
        f"error: {out}: the results could not be written ([Errno 28] No space left on device)\n"
        f"the embeddings of 9 files are kept in {out / 'cache'}; the same command writes the results without "
        f"encoding them again\n")
    monkeypatch.undo()  # space freed
    calls = counted_encoder(monkeypatch)
    assert run_eval(*options) == 0 and calls == [] and read_rows(out / "results.csv")


def test_a_full_stdout_during_the_results_is_not_blamed_on_the_out_folder(tmp_path, model_path, capsys,
                                                                          monkeypatch):
    """`echo eval ... > log` with the log's disk full: the error names standard output, not --out."""
    options = folder_task_of_nine(tmp_path, model_path)
    log = open(tmp_path / "log", "w")

    class FullDisk:
        encoding = "utf-8"

        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def fileno(self):
            return log.fileno()

    monkeypatch.setattr("sys.stdout", FullDisk())
    assert run_eval(*options) == 1
    log.close()
    assert capsys.readouterr().err == (
        "error: [Errno 28] No space left on device: 'standard output'\n"
        f"the embeddings of 9 files are kept in {tmp_path / 'out' / 'cache'}; the same command writes the results "
        f"without encoding them again\n")


def fault_data_set(root, files_per_folder: dict) -> None:
    """Readable files, as many as `files_per_folder` says in each folder under `root`: MAFAULDA tables (8
    columns) where the folder is a MAFAULDA class, tones otherwise."""
    rng = seeded_rng()
    for folder, count in files_per_folder.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            if folder in datasets.MAFAULDA_TOP:
                np.savetxt(root / folder / f"{i}.csv", rng.normal(size=(2500, 8)), delimiter=",")
            else:
                soundfile.write(str(root / folder / f"{i}.wav"), tone(rng, 400, seconds=0.1), RATE)


ONE_CLASS = {"normal": 4}
FEWER_PER_CLASS_THAN_FOLDS = {"normal": 3, "imbalance": 2}
TWO_CLASSES = {"normal": 5, "imbalance": 5}
TRAIN_AND_TEST = {"train_cut/good": 2, "train_cut/broken": 2, "test_cut/good": 1, "test_cut/broken": 1}
TRAIN_FILES = sum(count for folder, count in TRAIN_AND_TEST.items() if folder.startswith("train"))
FILES = sum(TWO_CLASSES.values())


@pytest.mark.parametrize("task, files_per_folder, options, message", [
    ("mafaulda", ONE_CLASS, (), "fault classification needs two classes or more; every file is 'normal'"),
    ("mafaulda", FEWER_PER_CLASS_THAN_FOLDS, ("--protocol", "kfold", "--folds", 4, "--k", 1),
     re.escape(f"4-fold cross-validation of {sum(FEWER_PER_CLASS_THAN_FOLDS.values())} files (per class: "
               + ", ".join(f"{label} {count}" for label, count in sorted(FEWER_PER_CLASS_THAN_FOLDS.items()))
               + ") is impossible: ") + ".*members in each class.* "
     + re.escape("Choose fewer folds (--folds of `echo eval`), or leave-one-out (--protocol loocv).")),
    ("mafaulda", TWO_CLASSES, ("--protocol", "loocv", "--k", FILES), re.escape(
        f"k={FILES} neighbours asked of the loocv protocol's bank of {FILES - 1} files (every file but the query)")),
    ("mafaulda", TWO_CLASSES, ("--protocol", "kfold", "--k", FILES), re.escape(  # 5 folds, each a fifth of a class
        f"k={FILES} neighbours asked of the kfold protocol's bank of {FILES - FILES // 5} files (the smallest "
        f"training part of the 5 folds)")),
    ("iiee", TRAIN_AND_TEST, ("--k", TRAIN_FILES + 1), re.escape(
        f"k={TRAIN_FILES + 1} neighbours asked of the split protocol's bank of {TRAIN_FILES} files (the train files)")),
], ids=["one class", "folds above a class", "k above loocv", "k above kfold", "k above split"])
def test_what_the_fault_protocols_cannot_take_is_refused_before_the_encoding(
        tmp_path, model_path, capsys, monkeypatch, task, files_per_folder, options, message):
    """One class, more folds than a class holds and a k above a protocol's bank were refused by the scoring, after
    every file was embedded (hours on a large set)."""
    fault_data_set(tmp_path / task, files_per_folder)
    calls = counted_encoder(monkeypatch)
    assert run_eval("--task", task, "--data", tmp_path / task, "--model", model_path, "--out", tmp_path / "out",
                    "--no-plots", *options) == 2
    assert calls == []
    assert re.search(message, capsys.readouterr().err)


def test_fault_classification_defaults_are_k5_five_folds_seed_1(tmp_path, model_path, monkeypatch):
    """Without --k, --folds or --seed every fault protocol runs as SIREN's: k = 5, 5 folds shuffled with seed 1."""
    import inspect

    from echo.eval import faults

    evaluate, calls = faults.evaluate, []

    def recording(*args, **kwargs):
        calls.append(inspect.signature(evaluate).bind(*args, **kwargs).arguments)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(faults, "evaluate", recording)
    rng = seeded_rng()
    t = np.arange(2500) / 50000
    for label, frequency in (("normal", 800), ("imbalance", 3000)):
        for i in range(6):
            table = np.stack([np.sin(2 * np.pi * frequency * (c + 1) * t + rng.uniform(0, 6)) for c in range(8)], 1)
            path = tmp_path / "mafaulda" / label / f"{i}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savetxt(path, table + 0.01 * rng.normal(size=table.shape), delimiter=",")
    assert run_eval("--task", "mafaulda", "--data", tmp_path / "mafaulda", "--model", model_path,
                    "--out", tmp_path / "out", "--protocol", "kfold", "--no-plots") == 0
    assert calls and all((c["k"], c["folds"], c["seed"]) == (5, 5, 1) for c in calls)


def test_the_embeddings_are_stacked_in_one_copy():
    """The search's rows were stacked, then copied again into float32 (which they were): twice their size at the
    search's start, 420 MB more for MAFAULDA's 1951 x 7 x 7680."""
    import tracemalloc
    from types import SimpleNamespace

    from echo.eval import cli as eval_cli

    rng = seeded_rng()
    vectors = [rng.normal(size=(7, 301)).astype(np.float32) for _ in range(53)]
    items = [SimpleNamespace(path=f"{i}.wav") for i in range(53)]
    tracemalloc.start()
    try:
        stacked = eval_cli._stack(vectors, items)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stacked.dtype == np.float32 and np.array_equal(stacked, np.stack(vectors))
    assert peak < 1.5 * stacked.nbytes


def test_a_projection_legend_names_a_class_whose_name_starts_with_an_underscore(tmp_path, saved_figures):
    """matplotlib leaves artists labelled "_..." out of a legend: a class folder _noise had points but no entry."""
    plots.projection_plot(seeded_rng().normal(size=(6, 8)), ["_noise", "hum"] * 3, tmp_path / "p.png", "title")
    entries = [text.get_text() for text in saved_figures["p.png"].axes[0].get_legend().get_texts()]
    assert entries == ["_noise (3)", "hum (3)"]


def test_class_names_holding_dollars_are_drawn_as_spelt(tmp_path, saved_figures):
    """matplotlib reads text between two "$" as TeX: a class $x_1^2$ was drawn as x with indices, and one named
    a$$b stopped the evaluation with a TeX parse error, its plots unwritten."""
    from echo.eval import faults

    names = ["$x_1^2$", "a$$b", "plain"]
    truth = np.repeat(names, 2)
    plots.confusion_plot(faults.score(truth, truth, sorted(names), "kfold", "all"), tmp_path / "c.png")
    plots.projection_plot(seeded_rng().normal(size=(6, 8)), truth, tmp_path / "p.png", "$x_1^2$ (PCA)")
    confusion, projection = saved_figures["c.png"].axes[0], saved_figures["p.png"].axes[0]
    drawn = [text._preprocess_math(text.get_text()) for text in
             [*confusion.get_xticklabels(), *projection.get_legend().get_texts(), projection.title]]
    assert drawn == [(name, False) for name in sorted(names)] + \
        [(f"{name} (2)", False) for name in sorted(names)] + [("$x_1^2$ (PCA)", False)]


def test_folder_windows_are_clips_scored_against_a_bank_of_normal_windows(tmp_path, model_path, capsys):
    """Long recordings: each file's windows are clips of their own, labelled as the file; the bank is every normal
    window. A score is the cosine distance of the window's own embedding (model.encode of its span) to its nearest
    bank window."""
    import torch

    rng = seeded_rng()
    files = {"normal/a.wav": 400, "normal/b.wav": 400, "test/normal/c.wav": 400, "test/anomalous/d.wav": 1500}
    for name, frequency in files.items():
        path = tmp_path / "machine" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), tone(rng, frequency, seconds=1.37), RATE)
    soundfile.write(str(tmp_path / "machine" / "test" / "short.wav"), tone(rng, 400, seconds=0.2), RATE)
    out = tmp_path / "out"
    assert run_eval("--task", "folder", "--data", tmp_path / "machine", "--model", model_path, "--out", out,
                    "--window", "0.4", "--hop", "0.3", "--no-plots") == 0
    printed = capsys.readouterr().out
    assert "clips: 16 windows of 0.4 s, one every 0.3 s, of 4 files" in printed  # 4 windows in 1.37 s
    assert [row["reason"] for row in read_rows(out / "failures.csv")] == ["shorter than one window (0.200 s < 0.4 s)"]
    model = echo.load(model_path)
    embed_window = lambda name, k: model.encode(torch.from_numpy(
        soundfile.read(str(tmp_path / "machine" / name), dtype="float32")[0][k * 2400 : k * 2400 + 3200]), RATE)[0]
    bank = torch.stack([embed_window(name, k) for name in ("normal/a.wav", "normal/b.wav") for k in range(4)])
    scores = read_rows(out / "scores.csv")
    assert [row["path"].rsplit("/", 1)[1] for row in scores] == \
        [f"{name}.wav#t={start:g},{start + 0.4:g}" for name in "dc" for start in (0, 0.3, 0.6, 0.9)]
    for row in scores:
        name, span = row["path"].split("machine/", 1)[1].split("#t=")
        window = embed_window(name, round(float(span.split(",")[0]) / 0.3))
        nearest = (1 - torch.nn.functional.cosine_similarity(window[None], bank)).min()
        assert float(row["score"]) == pytest.approx(float(nearest), rel=1e-3, abs=1e-6), row["path"]
        assert row["label"] == ("1" if "anomalous" in name else "0")
    result = json.loads((out / "results.json").read_text())
    assert result["window"] == {"seconds": 0.4, "hop": 0.3}
    assert result["clips"] == {"bank": 8, "test normal": 4, "test anomalous": 4, "test unlabelled": 0}


def test_windows_are_cached_apart_from_whole_files_and_from_other_windows(tmp_path, model_path, capsys):
    rng = seeded_rng()
    for name in ("normal/a.wav", "test/normal/b.wav", "test/anomalous/c.wav"):
        path = tmp_path / "machine" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), tone(rng, 400, seconds=1.0), RATE)
    arguments = ["--task", "folder", "--data", tmp_path / "machine", "--model", model_path, "--out", tmp_path / "out",
                 "--no-plots"]
    for window, cached in ((["--window", "0.5"], 0), ([], 0), (["--window", "0.5"], 3), (["--window", "0.25"], 0)):
        assert run_eval(*arguments, *window) == 0
        assert f"3 files ({cached} from the cache, 0 failed)" in capsys.readouterr().out


@pytest.mark.parametrize("arguments,said", [
    (["--task", "folder", "--hop", "1"], "--hop needs --window"),
    (["--task", "folder", "--window", "0.001"], "--window, --hop: a window must be at least 0.025 s"),
    (["--task", "folder", "--window", "1e305"], "both at most 1e+09 s"),
    (["--task", "classes", "--window", "1"], "--window: only --task folder scores windows; classes scores its files"),
])
def test_window_options_are_checked_before_the_encoding(tmp_path, model_path, capsys, arguments, said):
    rng = seeded_rng()
    for name in ("normal/a.wav", "test/normal/b.wav", "test/anomalous/c.wav", "x/d.wav", "y/e.wav"):
        path = tmp_path / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), tone(rng, 400, seconds=0.5), RATE)
    if arguments[1] == "classes":
        for name in ("normal", "test"):
            shutil.rmtree(tmp_path / "data" / name)
    assert run_eval(*arguments, "--data", tmp_path / "data", "--model", model_path, "--out", tmp_path / "out") != 0
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("window,hop,rate,fragments", [
    (0.5, 100000.25, RATE, ["#t=0,0.5", "#t=100000.25,100000.75"]),  # were 100000,100001: six digits
    (0.025, 5e-05, 20000, ["#t=0,0.025", "#t=0.00005,0.02505", "#t=0.0001,0.0251"]),  # 5e-05: no time a fragment says
    (0.4, 0.3, RATE, ["#t=0,0.4", "#t=0.3,0.7", "#t=0.6,1"]),
])
def test_a_window_is_named_by_its_exact_span(tmp_path, window, hop, rate, fragments):
    """scores.csv names a window by a media fragment of its start and end, in seconds as a fragment writes them
    (no exponent), to the sample: past 10,000 s six significant digits named windows a hop apart alike."""
    from echo.eval import anomaly
    from echo.eval.cli import _windows_as_clips

    path = tmp_path / "long.wav"
    soundfile.write(str(path), np.zeros(rate), rate)  # its header's rate is the windows'
    clip = anomaly.Clip(path, "dev", "machine", "00", None, "test", 0)
    clips, rows = _windows_as_clips([clip], [np.zeros((len(fragments), 2), np.float32)], (window, hop))
    assert [str(clip.path) for clip in clips] == [f"{path}{fragment}" for fragment in fragments]
    assert len(rows) == len(fragments)


def test_a_windowed_file_removed_after_its_embedding_is_a_clear_error(tmp_path, model_path, monkeypatch, capsys):
    """Its windows' times come from its header, read again after the embedding: an AttributeError's traceback."""
    import echo.eval.cli as command

    rng = seeded_rng()
    for name in ("normal/a.wav", "test/normal/b.wav", "test/anomalous/c.wav"):
        path = tmp_path / "machine" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), tone(rng, 400, seconds=1.0), RATE)
    real = command.embed_files

    def then_removed(*args, **kwargs):
        embedded = real(*args, **kwargs)
        (tmp_path / "machine" / "test" / "normal" / "b.wav").unlink()
        return embedded

    monkeypatch.setattr(command, "embed_files", then_removed)
    assert run_eval("--task", "folder", "--data", tmp_path / "machine", "--model", model_path, "--out",
                    tmp_path / "out", "--window", "0.5", "--no-plots") != 0
    assert "b.wav could not be read again for its windows' times" in capsys.readouterr().err
