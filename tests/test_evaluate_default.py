"""scripts/evaluate_default.py's answer to "more than chance?": the exact McNemar test on the held-out clips and
the demo's task drawn with several clip seeds."""
import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

import echo
from conftest import random_model
from test_default_model import import_script
from test_demo import key_switch_corpus


@pytest.fixture
def evaluate_default():
    return import_script("evaluate_default")


@pytest.mark.parametrize("only, other_only, expected", [
    (0, 2, 2 * 0.5**2),             # both discordant clips the other's: P(0 of 2) twice
    (6, 0, 2 * 0.5**6),
    (1, 4, 2 * (1 + 5) / 2**5),     # P(X <= 1) for X ~ Bin(5, 1/2), both tails
    (3, 3, 1.0),
    (0, 0, 1.0),                    # no clip tells them apart
])
def test_mcnemar_counts_only_the_clips_one_gets_right(evaluate_default, only, other_only, expected):
    both, neither = 7, 2
    right = [1] * both + [0] * neither + [1] * only + [0] * other_only
    other_right = [1] * both + [0] * neither + [0] * only + [1] * other_only
    assert evaluate_default.mcnemar(right, other_right) == pytest.approx((only, other_only, expected))


def test_paired_difference_interval_is_students_t(evaluate_default):
    mean, low, high, ahead = evaluate_default.paired_difference([0.9, 0.8, 0.7], [0.8, 0.6, 0.4])
    half_width = 4.302652729911275 * 0.1 / np.sqrt(3)  # t(0.975, 2 degrees of freedom) x sd / sqrt(n)
    assert (mean, low, high, ahead) == pytest.approx((0.2, 0.2 - half_width, 0.2 + half_width, 3))
    assert evaluate_default.paired_difference([0.5, 0.5], [0.6, 0.6]) == pytest.approx((-0.1, -0.1, -0.1, 0))


def test_demo_seeds_redraw_the_clips_and_compare(tmp_path, evaluate_default, capsys):
    corpus = key_switch_corpus(tmp_path / "corpus")
    model = echo.save(random_model(dim=32, depth=1, heads=2), tmp_path / "small.safetensors")
    out = tmp_path / "results.json"
    assert evaluate_default.main(["--model", str(model), "--corpus", str(corpus), "--bank", "2", "--tests", "2",
                                  "--limit", "5", "--demo-seeds", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    for numbers in results.values():
        assert len(numbers["demo AUC over seeds"]) == len(numbers["demo pAUC over seeds"]) == 3
        assert numbers["demo AUC over seeds"][0] == numbers["demo AUC"]  # seed 0 is the one-seed task
        assert numbers["demo pAUC over seeds"][0] == numbers["demo pAUC"]
        per_machine = numbers["demo per machine over seeds"]
        assert {key: values[0] for key, values in per_machine.items()} == numbers["demo per machine"]
        for metric in ("AUC", "pAUC"):  # the demo's mean is the mean of its machines, in every draw
            machines = [values for key, values in per_machine.items() if key.endswith(f" {metric}")]
            assert np.mean(machines, axis=0) == pytest.approx(numbers[f"demo {metric} over seeds"])
        assert np.mean(numbers["bucklespring clips right"]) == pytest.approx(
            numbers["bucklespring 5-NN LOOCV accuracy"])
    assert len(set(results["log-spectrogram baseline"]["demo AUC over seeds"])) > 1  # other clips, other scores
    assert printed.count("exact McNemar p") == 2 and printed.count("clip seeds: trained - ") == 4
    assert "per machine, 3-draw mean" in printed


def test_the_first_draw_is_encoded_once(evaluate_default):
    """The draw of the first clip seed is the one-draw task, already scored: it was encoded a second time."""
    from echo import demo

    calls = []

    def embed(signals, rates):
        calls.append(len(signals))
        return evaluate_default.log_spectrogram_features(signals, rates)

    first = evaluate_default.demo_numbers(task := demo.build_task(0, 2, 2), embed(task.signals, task.rates))
    calls.clear()
    reused = evaluate_default.demo_over_seeds(embed, range(3), 2, 2, first)
    assert len(calls) == 2
    assert reused == evaluate_default.demo_over_seeds(embed, range(3), 2, 2) and len(calls) == 5


@pytest.mark.parametrize("options, message", [
    (["--demo-seeds", "0"], "--demo-seeds"),
    (["--seed", str(2**32 - 2), "--demo-seeds", "3"], "--seed must be in"),
])
def test_demo_seeds_option_checked_before_work(evaluate_default, options, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        evaluate_default.main(options)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_each_checkpoint_gets_the_mean_of_the_draws(tmp_path, evaluate_default):
    """--runs --demo-seeds: a checkpoint's mean over the draws is that of its exported file's draws."""
    from echo.pretrain.trainer import PretrainConfig

    corpus = key_switch_corpus(tmp_path / "corpus")
    student = random_model(dim=32, depth=1, heads=2)
    config = PretrainConfig(data="unused", out=str(tmp_path / "run"), dim=32, depth=1, heads=2, export="student")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"step": 3, "config": dataclasses.asdict(config), "student": student.state_dict(),
                "teacher": student.state_dict()}, tmp_path / "run" / "checkpoints" / "step-000000003.pt")
    options = ["--corpus", str(corpus), "--bank", "2", "--tests", "2", "--limit", "5", "--demo-seeds", "2"]
    assert evaluate_default.main(["--runs", str(tmp_path / "run"), "--csv", str(tmp_path / "rows.csv"),
                                  "--jobs", "1", *options]) == 0
    with open(tmp_path / "rows.csv", newline="") as handle:
        (row,) = csv.DictReader(handle)
    exported = echo.save(student, tmp_path / "model.safetensors", dtype=torch.float16)
    assert evaluate_default.main(["--model", str(exported), "--json", str(tmp_path / "one.json"), *options]) == 0
    draws = next(iter(json.loads((tmp_path / "one.json").read_text()).values()))
    for metric in ("AUC", "pAUC"):
        assert float(row[f"demo {metric} 2-draw mean"]) == pytest.approx(np.mean(draws[f"demo {metric} over seeds"]))
    for key, values in draws["demo per machine over seeds"].items():
        assert float(row[f"{key} 2-draw mean"]) == pytest.approx(np.mean(values))


def test_runs_without_a_readable_checkpoint_stop_with_the_reason(tmp_path, evaluate_default):
    """It printed an empty table and succeeded, leaving --csv as an earlier command wrote it."""
    corpus = key_switch_corpus(tmp_path / "corpus")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-000000003.pt").write_bytes(b"")  # torn: does not load
    with pytest.raises(SystemExit, match=r"no readable checkpoint in .*run"):
        evaluate_default.main(["--runs", str(tmp_path / "run"), "--csv", str(tmp_path / "rows.csv"), "--corpus",
                               str(corpus), "--bank", "2", "--tests", "2", "--limit", "5", "--jobs", "1"])
