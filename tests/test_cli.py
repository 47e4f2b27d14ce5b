"""`python -m echo demo` end to end, on a small random model saved to a file (fast, and independent of the
bundled weights)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import echo
from echo import demo
from conftest import random_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_command_prints_the_table_and_writes_the_plots(tmp_path):
    out = tmp_path / "demo"
    model = echo.save(random_model(dim=32, depth=1, heads=2), tmp_path / "small.safetensors")
    command = ["demo", "--model", str(model), "--out", str(out), "--seed", "1"]
    run = subprocess.run([sys.executable, "-m", "echo", *command],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = {line.split()[0]: line.split() for line in run.stdout.splitlines() if line.strip()}
    for spec in demo.MACHINES:
        row = lines[spec.name]
        assert row[1:3] == [str(spec.sample_rate), "Hz"] and row[3:5] == [str(demo.TEST_CLIPS)] * 2
        assert all(0 <= float(value) <= 1 for value in row[5:7])
        assert (out / f"roc_demo_{spec.name}.png").stat().st_size > 0
        assert (out / f"projection_{spec.name}.png").stat().st_size > 0
    assert (out / "roc_demo_all-machines.png").stat().st_size > 0
    scores = (out / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 2 * demo.TEST_CLIPS * len(demo.MACHINES)


def test_demo_command_reports_a_missing_model_and_makes_no_output_folder(tmp_path):
    run = subprocess.run([sys.executable, "-m", "echo", "demo", "--model", str(tmp_path / "none.safetensors"),
                          "--out", str(tmp_path / "plots")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "does not exist" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("option,message", [(["--out", "{file}"], "cannot be a folder"),
                                            (["--out", "{file}/sub"], "cannot be written: Not a directory"),
                                            (["--seed", "-1"], "--seed must be 0 or more, got -1")])
def test_demo_command_refuses_bad_options_before_the_work(tmp_path, option, message, monkeypatch, capsys):
    from echo import cli

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(demo, "build_task", lambda *args: pytest.fail("the work started"))
    argv = ["demo", "--out", str(tmp_path / "out"), *[o.format(file=tmp_path / "file") for o in option]]
    assert cli.main(argv) == 2 and message in capsys.readouterr().err


def test_demo_command_refuses_a_folder_it_cannot_write_before_the_work(tmp_path, monkeypatch, capsys):
    """A read-only --out was found only after the table was printed."""
    from echo import cli

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    monkeypatch.setattr(demo, "build_task", lambda *args: pytest.fail("the work started"))
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    assert "--out " + str(tmp_path / "out") + " cannot be written: Permission denied" in capsys.readouterr().err


class _NoAudio(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise ValueError("no usable audio under somewhere")


def test_an_error_raised_in_a_data_loader_worker_is_printed_as_its_own_message():
    """torch wraps a worker's exception with the worker's whole traceback; the command prints the message."""
    from echo import cli

    with pytest.raises(ValueError) as raised:
        next(iter(torch.utils.data.DataLoader(_NoAudio(), batch_size=None, num_workers=1)))
    assert "Original Traceback" in str(raised.value)
    assert cli.worker_message(raised.value) == "no usable audio under somewhere"
    assert cli.worker_message(ValueError("plain")) == "plain"
